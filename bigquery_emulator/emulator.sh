#!/usr/bin/env bash
# Local BigQuery emulator (PyPI `local-bigquery`, GoogleSQL on DuckDB) for tests and local trials.
# Runs offline, bound to 127.0.0.1, from its own Python 3.13 venv.
#
# Usage: emulator.sh install|start|stop|status
#
#   install  create/refresh the venv from requirements.txt (also done by `start` when needed)
#   start    start the emulator in the background and wait until its HTTP API answers (idempotent)
#   stop     stop it by PID (idempotent)
#   status   print whether it runs; exit 0 if it does, 3 if it does not
#
# Environment:
#   BQ_EMULATOR_PORT           REST port (default 9050): endpoint http://127.0.0.1:PORT
#   BQ_EMULATOR_GRPC_PORT      Storage Read/Write API gRPC port (default 9060)
#   BQ_EMULATOR_PROJECT        default project id (default smartgrid-local; any project id works)
#   BQ_EMULATOR_STATE_DIR      data dir, log and pid file (default <repo>/.cache/bq-emulator)
#   BQ_EMULATOR_VENV           venv location (default <repo>/.cache/bq-emulator-venv)
#   BQ_EMULATOR_PYTHON         Python 3.13 interpreter to build the venv with (default: python3.13 on
#                              PATH, then ~/.pyenv/versions/3.13*/bin/python3.13)
#   BQ_EMULATOR_START_TIMEOUT  seconds to wait for the API at start (default 60)
#
# Offline DuckDB: the emulator attaches DuckLake catalogs and runs `INSTALL spatial`, and its DuckDB
# connection sets TimeZone, which autoloads icu. DuckDB would download those extensions from its own
# server. Instead the duckdb-extension-* wheels from PyPI are installed and their files are symlinked
# into a private HOME ($VENV/duckdb-home/.duckdb/extensions/vX.Y.Z/linux_amd64/), which is the HOME the
# emulator runs with, so DuckDB finds them there as already installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$HERE")"
REQUIREMENTS="$HERE/requirements.txt"
VENV="${BQ_EMULATOR_VENV:-$REPO_ROOT/.cache/bq-emulator-venv}"
STATE_DIR="${BQ_EMULATOR_STATE_DIR:-$REPO_ROOT/.cache/bq-emulator}"
PORT="${BQ_EMULATOR_PORT:-9050}"
GRPC_PORT="${BQ_EMULATOR_GRPC_PORT:-9060}"
PROJECT="${BQ_EMULATOR_PROJECT:-smartgrid-local}"
START_TIMEOUT="${BQ_EMULATOR_START_TIMEOUT:-60}"
HOST=127.0.0.1

DATA_DIR="$STATE_DIR/data"
LOG_FILE="$STATE_DIR/emulator.log"
PID_FILE="$STATE_DIR/emulator.pid"
INFO_FILE="$STATE_DIR/emulator.info"
DUCKDB_HOME="$VENV/duckdb-home"
STAMP="$VENV/.bq-emulator-requirements.sha256"
SERVICE_NAME=bq-emulator
SERVICE_MATCH=local-bigquery
STOP_GRACE=10
# shellcheck source=../scripts/lib/service.sh
source "$REPO_ROOT/scripts/lib/service.sh"

check_platform() {
    # The pinned duckdb-extension-* wheels carry linux x86_64 binaries only.
    [[ "$(uname -s)-$(uname -m)" == Linux-x86_64 ]] ||
        die "the pinned DuckDB extension wheels are built for Linux x86_64 only; this is $(uname -s)-$(uname -m)"
}

find_python() {
    local cand real
    local -a candidates=()
    [[ -n "${BQ_EMULATOR_PYTHON:-}" ]] && candidates+=("$BQ_EMULATOR_PYTHON")
    if command -v python3.13 >/dev/null 2>&1; then candidates+=("$(command -v python3.13)"); fi
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    while IFS= read -r cand; do
        [[ -n "$cand" ]] && candidates+=("$cand")
    done < <(ls -d "$pyenv_root"/versions/3.13*/bin/python3.13 2>/dev/null | sort -rV)
    for cand in "${candidates[@]}"; do
        # A pyenv shim exists even when 3.13 is not selected; it then fails here and is skipped.
        if real="$("$cand" -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 13); print(sys.executable)' 2>/dev/null)"; then
            echo "$real"
            return 0
        fi
    done
    die "no usable Python 3.13 found (tried \$BQ_EMULATOR_PYTHON, python3.13 on PATH, $pyenv_root/versions/3.13*/bin/python3.13; it needs the venv module). Install one (e.g. 'pyenv install 3.13', or 'apt-get install python3.13 python3.13-venv') or set BQ_EMULATOR_PYTHON."
}

link_extensions() {
    local site f vdir n=0
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    for f in "$site"/duckdb_extension_*/extensions/v*/*.duckdb_extension; do
        [[ -e "$f" ]] || continue
        vdir="$DUCKDB_HOME/.duckdb/extensions/$(basename "$(dirname "$f")")/linux_amd64"
        mkdir -p "$vdir"
        ln -sfn "$f" "$vdir/$(basename "$f")"
        n=$((n + 1))
    done
    ((n > 0)) || die "no duckdb-extension-* files found under $site"
}

check_offline() {
    # Loads every extension the emulator needs from the private HOME; fails instead of downloading.
    HOME="$DUCKDB_HOME" "$VENV/bin/python" - <<'EOF' || die "DuckDB cannot load its extensions offline (see above)"
import duckdb
con = duckdb.connect(config={"TimeZone": "UTC", "autoinstall_known_extensions": False})
con.execute("INSTALL spatial; LOAD spatial; LOAD ducklake; LOAD icu")
EOF
}

do_install() {
    check_platform
    [[ -f "$REQUIREMENTS" ]] || die "missing $REQUIREMENTS"
    mkdir -p "$(dirname "$VENV")"
    local want py
    want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    (
        # Serialise concurrent installs (e.g. two test runs starting at once).
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        if [[ -x "$VENV/bin/local-bigquery" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
            link_extensions
            exit 0
        fi
        if [[ -e "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
            log "removing unusable venv $VENV"
            rm -rf "$VENV"
        fi
        if [[ ! -e "$VENV" ]]; then
            py="$(find_python)"
            log "creating venv $VENV with $py"
            "$py" -m venv "$VENV"
        fi
        log "installing $REQUIREMENTS into $VENV"
        # --no-deps: see requirements.txt (local-bigquery declares duckdb>=2, runs on the pinned 1.5.5).
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            --no-deps -r "$REQUIREMENTS" >&2
        link_extensions
        check_offline
        echo "$want" >"$STAMP"
        log "installed"
    ) 9>"$VENV.lock"
}

http_ready() {
    # Listing datasets makes the emulator open its DuckDB catalog, so an answer means it is usable.
    service_http_ok "http://$HOST:$1/bigquery/v2/projects/$2/datasets"
}

do_start() {
    service_check_port BQ_EMULATOR_PORT "$PORT"
    service_check_port BQ_EMULATOR_GRPC_PORT "$GRPC_PORT"
    [[ "$PORT" != "$GRPC_PORT" ]] || die "BQ_EMULATOR_PORT and BQ_EMULATOR_GRPC_PORT must differ"
    mkdir -p "$STATE_DIR" "$DATA_DIR"
    local pid
    if pid="$(service_running_pid)"; then
        local r_port r_grpc r_project
        read -r r_port r_grpc r_project <"$INFO_FILE" || die "$INFO_FILE unreadable"
        if [[ "$r_port $r_grpc $r_project" != "$PORT $GRPC_PORT $PROJECT" ]]; then
            die "already running (pid $pid) with port=$r_port grpc=$r_grpc project=$r_project from $STATE_DIR; stop it first or use another BQ_EMULATOR_STATE_DIR"
        fi
        service_wait_ready "$pid" http_ready "$PORT" "$PROJECT" || die "running emulator (pid $pid) does not answer"
        echo "already running: pid=$pid endpoint=http://$HOST:$PORT grpc=$HOST:$GRPC_PORT project=$PROJECT"
        return 0
    fi
    rm -f "$PID_FILE" "$INFO_FILE"
    do_install
    SERVICE_PYTHON="$VENV/bin/python"
    service_port_free "$PORT" || die "port $PORT on $HOST is already in use; free it or set BQ_EMULATOR_PORT"
    service_port_free "$GRPC_PORT" || die "port $GRPC_PORT on $HOST is already in use; free it or set BQ_EMULATOR_GRPC_PORT"
    echo "=== $(date -u +%FT%TZ) start port=$PORT grpc=$GRPC_PORT project=$PROJECT" >>"$LOG_FILE"
    HOME="$DUCKDB_HOME" nohup "$VENV/bin/local-bigquery" --host "$HOST" --port "$PORT" \
        --grpc-port "$GRPC_PORT" --project "$PROJECT" --data-dir "$DATA_DIR" serve \
        </dev/null >>"$LOG_FILE" 2>&1 &
    pid=$!
    service_started "$pid" "$PORT $GRPC_PORT $PROJECT" http_ready "$PORT" "$PROJECT"
    echo "started: pid=$pid endpoint=http://$HOST:$PORT grpc=$HOST:$GRPC_PORT project=$PROJECT log=$LOG_FILE"
}

do_stop() { service_stop; }

do_status() {
    local pid r_port r_grpc r_project
    if ! pid="$(service_running_pid)"; then
        echo "not running"
        return 3
    fi
    read -r r_port r_grpc r_project <"$INFO_FILE" || true
    if http_ready "$r_port" "$r_project"; then
        echo "running: pid=$pid endpoint=http://$HOST:$r_port grpc=$HOST:$r_grpc project=$r_project"
    else
        echo "running but not answering yet: pid=$pid endpoint=http://$HOST:$r_port"
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
