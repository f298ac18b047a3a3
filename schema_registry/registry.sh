#!/usr/bin/env bash
# Apicurio Registry 3.3.3 (a Confluent-compatible schema registry) for tests and local trials.
# Runs on 127.0.0.1 with in-memory storage (H2): every start begins empty.
#
# Usage: registry.sh install|start|stop|status
#
#   install  fetch the Quarkus app from Maven Central into .cache/apicurio/3.3.3 (idempotent)
#   start    start it in the background and wait until /health/ready answers (idempotent)
#   stop     stop it by PID (idempotent)
#   status   print whether it runs; exit 0 if it does, 3 if it does not
#
# Environment:
#   SCHEMA_REGISTRY_PORT           HTTP port (default 8081); Confluent API at
#                                  http://127.0.0.1:PORT/apis/ccompat/v7
#   SCHEMA_REGISTRY_MGMT_PORT      management port, /health/ready (default 9081)
#   SCHEMA_REGISTRY_STATE_DIR      log and pid file (default <repo>/.run/schema-registry-PORT)
#   SCHEMA_REGISTRY_CACHE          where the app is installed (default <repo>/.cache/apicurio)
#   SCHEMA_REGISTRY_JAVA           java binary to use (must be Java 21 or newer); else $JAVA_HOME,
#                                  java on PATH, then the newest under /usr/lib/jvm
#   SCHEMA_REGISTRY_START_TIMEOUT  seconds to wait for readiness (default 90)
#
# Why so: Confluent's registry is not served by the reachable registries; Apicurio's whole app is
# one Maven artifact (io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all, about 151 MiB). Maven is
# run from an empty folder, since without a pom it leaves a marker folder behind. It needs Java 21+
# (Java 17 fails with UnsupportedClassVersionError). Quarkus binds 0.0.0.0 unless told otherwise.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$HERE")"
VERSION=3.3.3
ARTIFACT="io.apicurio:apicurio-registry-app:$VERSION:tar.gz:all"
CACHE="${SCHEMA_REGISTRY_CACHE:-$REPO_ROOT/.cache/apicurio}"
APP_DIR="$CACHE/$VERSION"
PORT="${SCHEMA_REGISTRY_PORT:-8081}"
MGMT_PORT="${SCHEMA_REGISTRY_MGMT_PORT:-9081}"
STATE_DIR="${SCHEMA_REGISTRY_STATE_DIR:-$REPO_ROOT/.run/schema-registry-$PORT}"
START_TIMEOUT="${SCHEMA_REGISTRY_START_TIMEOUT:-90}"
HOST=127.0.0.1

LOG_FILE="$STATE_DIR/registry.log"
PID_FILE="$STATE_DIR/registry.pid"
INFO_FILE="$STATE_DIR/registry.info"

log() { echo "schema-registry: $*" >&2; }
die() { echo "schema-registry: ERROR: $*" >&2; exit 1; }

java_major() {
    # 'openjdk version "25.0.1" ...' or 'java version "1.8.0_400"' -> 25 / 8
    local v
    v="$("$1" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
    [[ -n "$v" ]] || return 1
    [[ "$v" == 1.* ]] && v="${v#1.}"
    echo "${v%%[.+-]*}"
}

find_java() {
    local cand major
    local -a candidates=()
    [[ -n "${SCHEMA_REGISTRY_JAVA:-}" ]] && candidates+=("$SCHEMA_REGISTRY_JAVA")
    [[ -n "${JAVA_HOME:-}" ]] && candidates+=("$JAVA_HOME/bin/java")
    command -v java >/dev/null 2>&1 && candidates+=("$(command -v java)")
    while IFS= read -r cand; do
        candidates+=("$cand")
    done < <(ls -d /usr/lib/jvm/*/bin/java 2>/dev/null | sort -rV)
    for cand in "${candidates[@]}"; do
        [[ -x "$cand" ]] || continue
        major="$(java_major "$cand")" || continue
        if [[ "$major" =~ ^[0-9]+$ ]] && ((major >= 21)); then
            echo "$cand"
            return 0
        fi
    done
    die "Apicurio Registry $VERSION needs Java 21 or newer; none found (tried \$SCHEMA_REGISTRY_JAVA, \$JAVA_HOME, java on PATH, /usr/lib/jvm/*). Install one (e.g. 'apt-get install openjdk-21-jre-headless' or Temurin 21+) or set SCHEMA_REGISTRY_JAVA=/path/to/java"
}

do_install() {
    [[ -f "$APP_DIR/quarkus-run.jar" ]] && return 0
    command -v mvn >/dev/null 2>&1 || die "Maven (mvn) is needed to fetch $ARTIFACT (apt-get install maven)"
    mkdir -p "$CACHE"
    (
        # Serialise concurrent installs (two test runs starting at once).
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        [[ -f "$APP_DIR/quarkus-run.jar" ]] && exit 0
        local work partial
        work="$(mktemp -d "$CACHE/mvn.XXXXXX")"
        partial="$APP_DIR.partial.$$"
        rm -rf "$partial"
        log "fetching $ARTIFACT from Maven (about 151 MiB, first run only)"
        if ! (cd "$work" && mvn -B -q org.apache.maven.plugins:maven-dependency-plugin:3.8.1:unpack \
                -Dartifact="$ARTIFACT" -DoutputDirectory="$partial" >&2); then
            rm -rf "$work" "$partial"
            die "Maven could not fetch $ARTIFACT"
        fi
        rm -rf "$work"
        [[ -f "$partial/quarkus-run.jar" ]] || { rm -rf "$partial"; die "$ARTIFACT has no quarkus-run.jar"; }
        mv "$partial" "$APP_DIR"
        log "installed in $APP_DIR"
    ) 9>"$CACHE/install.lock"
}

check_port() {
    [[ "$2" =~ ^[0-9]+$ ]] && (("$2" > 0 && "$2" < 65536)) || die "$1 must be a port number, got '$2'"
}

port_free() {
    # bash's /dev/tcp: a connection that succeeds means something listens there.
    ! (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl --noproxy '*' -fsS -m 5 -o /dev/null "$1" 2>/dev/null
    else
        python3 -c 'import sys, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read()' "$1" 2>/dev/null
    fi
}

ready() {
    http_ok "http://$HOST:$2/health/ready" && http_ok "http://$HOST:$1/apis/ccompat/v7/subjects"
}

# Prints the PID recorded in PID_FILE if that process is alive and is this registry.
running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'quarkus-run.jar' || return 1
    echo "$pid"
}

wait_ready() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || {
            log "registry process $pid exited during startup; last log lines ($LOG_FILE):"
            tail -n 30 "$LOG_FILE" >&2 || true
            return 1
        }
        ready "$PORT" "$MGMT_PORT" && return 0
        sleep 0.2
    done
    log "registry (pid $pid) not ready on http://$HOST:$MGMT_PORT/health/ready within ${START_TIMEOUT}s; last log lines ($LOG_FILE):"
    tail -n 30 "$LOG_FILE" >&2 || true
    return 1
}

kill_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for 15s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

url() { echo "http://$HOST:$1/apis/ccompat/v7"; }

do_start() {
    check_port SCHEMA_REGISTRY_PORT "$PORT"
    check_port SCHEMA_REGISTRY_MGMT_PORT "$MGMT_PORT"
    [[ "$PORT" != "$MGMT_PORT" ]] || die "SCHEMA_REGISTRY_PORT and SCHEMA_REGISTRY_MGMT_PORT must differ"
    mkdir -p "$STATE_DIR"
    local pid java
    if pid="$(running_pid)"; then
        local r_port r_mgmt
        read -r r_port r_mgmt <"$INFO_FILE" || die "$INFO_FILE unreadable"
        [[ "$r_port $r_mgmt" == "$PORT $MGMT_PORT" ]] ||
            die "already running (pid $pid) on ports $r_port/$r_mgmt from $STATE_DIR; stop it first"
        wait_ready "$pid" || die "running registry (pid $pid) does not answer"
        echo "already running: pid=$pid url=$(url "$PORT")"
        return 0
    fi
    rm -f "$PID_FILE" "$INFO_FILE"
    java="$(find_java)"
    do_install
    port_free "$PORT" || die "port $PORT on $HOST is already in use; free it or set SCHEMA_REGISTRY_PORT"
    port_free "$MGMT_PORT" || die "port $MGMT_PORT on $HOST is already in use; free it or set SCHEMA_REGISTRY_MGMT_PORT"
    echo "=== $(date -u +%FT%TZ) start port=$PORT management=$MGMT_PORT java=$java" >>"$LOG_FILE"
    # From the state dir: Quarkus may write files to its working directory.
    (cd "$STATE_DIR" && exec nohup "$java" -Xmx256m \
        -Dquarkus.http.host=$HOST -Dquarkus.http.port="$PORT" \
        -Dquarkus.management.host=$HOST -Dquarkus.management.port="$MGMT_PORT" \
        -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=h2 \
        -Dapicurio.datasource.url="jdbc:h2:mem:registry" \
        -jar "$APP_DIR/quarkus-run.jar" </dev/null >>"$LOG_FILE" 2>&1) &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "$PORT $MGMT_PORT" >"$INFO_FILE"
    if ! wait_ready "$pid"; then
        kill_pid "$pid"
        rm -f "$PID_FILE" "$INFO_FILE"
        die "registry failed to start"
    fi
    echo "started: pid=$pid url=$(url "$PORT") log=$LOG_FILE"
}

do_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE" "$INFO_FILE"
        echo "not running"
        return 0
    fi
    kill_pid "$pid"
    rm -f "$PID_FILE" "$INFO_FILE"
    echo "stopped: pid=$pid"
}

do_status() {
    local pid r_port r_mgmt
    if ! pid="$(running_pid)"; then
        echo "not running"
        return 3
    fi
    read -r r_port r_mgmt <"$INFO_FILE" || true
    if ready "$r_port" "$r_mgmt"; then
        echo "running: pid=$pid url=$(url "$r_port")"
    else
        echo "running but not ready: pid=$pid url=$(url "$r_port")"
    fi
}

case "${1:-}" in
install) do_install ;;
start) do_start ;;
stop) do_stop ;;
status) do_status ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
