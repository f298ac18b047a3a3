# shellcheck shell=bash
# Helpers shared by the scripts that run a local service in the background on 127.0.0.1 and
# manage it by PID (schema_registry/registry.sh, bigquery_emulator/emulator.sh). Sourced, not run.
#
# The sourcing script sets, before calling them:
#   SERVICE_NAME       prefix of log lines ("schema-registry")
#   SERVICE_MATCH      a string the service's command line contains (to tell its PID from a reused one)
#   PID_FILE           where its PID is recorded
#   INFO_FILE          where the settings it was started with are recorded (one line)
#   LOG_FILE           its log (shown on a failed start)
#   START_TIMEOUT      seconds to wait for readiness
#   HOST               the address it binds (127.0.0.1)
#   STOP_GRACE         seconds between SIGTERM and SIGKILL (default 10)
#   SERVICE_PYTHON     a python for the port and HTTP probes (default python3 on PATH)

log() { echo "$SERVICE_NAME: $*" >&2; }
die() { echo "$SERVICE_NAME: ERROR: $*" >&2; exit 1; }

# service_check_port NAME VALUE: dies unless VALUE is a port number.
service_check_port() {
    [[ "$2" =~ ^[0-9]+$ ]] && (("$2" > 0 && "$2" < 65536)) || die "$1 must be a port number, got '$2'"
}

# service_port_free PORT: whether PORT on $HOST can be bound (SO_REUSEADDR, as servers bind:
# a connection in TIME_WAIT is no conflict). Without a python3, whether nothing listens there.
service_port_free() {
    local py="${SERVICE_PYTHON:-$(command -v python3 || true)}"
    if [[ -z "$py" ]]; then
        ! (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
        return
    fi
    "$py" - "$HOST" "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

# service_http_ok URL: whether URL answers 2xx within 5 s (no proxy: the service is local).
service_http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl --noproxy '*' -fsS -m 5 -o /dev/null "$1" 2>/dev/null
    else
        "${SERVICE_PYTHON:-python3}" -c 'import sys, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read()' "$1" 2>/dev/null
    fi
}

# service_running_pid: prints the PID in PID_FILE if that process is alive and is this service.
service_running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$SERVICE_MATCH" || return 1
    echo "$pid"
}

# service_wait_ready PID COMMAND...: runs COMMAND every 0.2 s until it succeeds (0), the
# process dies or START_TIMEOUT passes (1, with the end of the log).
service_wait_ready() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
    shift
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || {
            log "process $pid exited during startup; last log lines ($LOG_FILE):"
            tail -n 30 "$LOG_FILE" >&2 || true
            return 1
        }
        "$@" && return 0
        sleep 0.2
    done
    log "pid $pid not ready within ${START_TIMEOUT}s; last log lines ($LOG_FILE):"
    tail -n 30 "$LOG_FILE" >&2 || true
    return 1
}

# service_kill_pid PID GRACE_SECS: SIGTERM, then SIGKILL after GRACE_SECS.
service_kill_pid() {
    local pid="$1" grace="$2" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq $((grace * 10))); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${grace}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# service_started PID INFO COMMAND...: records a just-launched PID and its settings, then waits
# for COMMAND to succeed; on failure stops the process, forgets it and dies.
service_started() {
    local pid="$1" info="$2"
    shift 2
    echo "$pid" >"$PID_FILE"
    echo "$info" >"$INFO_FILE"
    if ! service_wait_ready "$pid" "$@"; then
        service_kill_pid "$pid" "${STOP_GRACE:-10}"
        rm -f "$PID_FILE" "$INFO_FILE"
        die "failed to start"
    fi
}

# service_stop: stops the recorded process by PID (idempotent).
service_stop() {
    local pid
    if ! pid="$(service_running_pid)"; then
        rm -f "$PID_FILE" "$INFO_FILE"
        echo "not running"
        return 0
    fi
    service_kill_pid "$pid" "${STOP_GRACE:-10}"
    rm -f "$PID_FILE" "$INFO_FILE"
    echo "stopped: pid=$pid"
}
