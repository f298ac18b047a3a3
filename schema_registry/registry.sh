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
SERVICE_NAME=schema-registry
SERVICE_MATCH=quarkus-run.jar
STOP_GRACE=15
# shellcheck source=../scripts/lib/service.sh
source "$REPO_ROOT/scripts/lib/service.sh"

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

ready() {
    service_http_ok "http://$HOST:$2/health/ready" && service_http_ok "http://$HOST:$1/apis/ccompat/v7/subjects"
}

url() { echo "http://$HOST:$1/apis/ccompat/v7"; }

do_start() {
    service_check_port SCHEMA_REGISTRY_PORT "$PORT"
    service_check_port SCHEMA_REGISTRY_MGMT_PORT "$MGMT_PORT"
    [[ "$PORT" != "$MGMT_PORT" ]] || die "SCHEMA_REGISTRY_PORT and SCHEMA_REGISTRY_MGMT_PORT must differ"
    mkdir -p "$STATE_DIR"
    local pid java
    if pid="$(service_running_pid)"; then
        local r_port r_mgmt
        read -r r_port r_mgmt <"$INFO_FILE" || die "$INFO_FILE unreadable"
        [[ "$r_port $r_mgmt" == "$PORT $MGMT_PORT" ]] ||
            die "already running (pid $pid) on ports $r_port/$r_mgmt from $STATE_DIR; stop it first"
        service_wait_ready "$pid" ready "$PORT" "$MGMT_PORT" || die "running registry (pid $pid) does not answer"
        echo "already running: pid=$pid url=$(url "$PORT")"
        return 0
    fi
    rm -f "$PID_FILE" "$INFO_FILE"
    java="$(find_java)"
    do_install
    service_port_free "$PORT" || die "port $PORT on $HOST is already in use; free it or set SCHEMA_REGISTRY_PORT"
    service_port_free "$MGMT_PORT" || die "port $MGMT_PORT on $HOST is already in use; free it or set SCHEMA_REGISTRY_MGMT_PORT"
    echo "=== $(date -u +%FT%TZ) start port=$PORT management=$MGMT_PORT java=$java" >>"$LOG_FILE"
    # From the state dir: Quarkus may write files to its working directory.
    (cd "$STATE_DIR" && exec nohup "$java" -Xmx256m \
        -Dquarkus.http.host=$HOST -Dquarkus.http.port="$PORT" \
        -Dquarkus.management.host=$HOST -Dquarkus.management.port="$MGMT_PORT" \
        -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=h2 \
        -Dapicurio.datasource.url="jdbc:h2:mem:registry" \
        -jar "$APP_DIR/quarkus-run.jar" </dev/null >>"$LOG_FILE" 2>&1) &
    pid=$!
    service_started "$pid" "$PORT $MGMT_PORT" ready "$PORT" "$MGMT_PORT"
    echo "started: pid=$pid url=$(url "$PORT") log=$LOG_FILE"
}

do_stop() { service_stop; }

do_status() {
    local pid r_port r_mgmt
    if ! pid="$(service_running_pid)"; then
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
