#!/usr/bin/env bash
# The project's one entry point. Every command installs what it needs on first use.
#
#   ./run_pipeline.sh demo                       the main job on embedded defaults
#   ./run_pipeline.sh test [pytest args]         the whole test suite, set-up included
#   ./run_pipeline.sh broker start|stop|status   the local Kafka broker (127.0.0.1:$KAFKA_PORT, default 9092;
#                                                Kafka $KAFKA_VERSION, default 3.9.1; also 4.1.1)
#   ./run_pipeline.sh topics create|describe [--partitions N] [topic ...]   (default: the smart-grid topics)
#   ./run_pipeline.sh produce [--count N] [--rate R] [--bad-ratio F]
#   ./run_pipeline.sh local  [pipeline options]  streaming until drained (Ctrl-C / SIGTERM / drain)
#   ./run_pipeline.sh batch  [pipeline options]  committed offsets -> end offsets seen at start, then exit
#   ./run_pipeline.sh flink  [pipeline options]
#   ./run_pipeline.sh dataflow [pipeline options]
#   ./run_pipeline.sh drain [local|flink|dataflow] [job]
#   ./run_pipeline.sh bench [reader|pipeline|bigquery|idle|profile|parse|sink] [--events N]
#   ./run_pipeline.sh prism build|path           Prism (Go, same version as apache-beam) for local --runner=PrismRunner
#   ./run_pipeline.sh audit [pipeline options] [--strict] [--json]   the sink vs the topics and the group, offset by offset
#   ./run_pipeline.sh chaos [--minutes N] [--cycles N] [--seed S]    random faults on a private broker and sink, then audit
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

die() { echo "error: $*" >&2; exit 1; }

find_python() {
  # Beam 2.77 supports Python 3.10-3.13; prefer the machine's python3, then pyenv's.
  local c
  for c in "${PYTHON:-}" python3 python3.11 python3.12 python3.10 python3.13 \
           "$HOME"/.pyenv/versions/3.11*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3; do
    [[ -n "$c" ]] || continue
    command -v "$c" >/dev/null 2>&1 || [[ -x "$c" ]] || continue
    if "$c" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

ensure_venv() {
  local stamp="$VENV/.requirements.sha256" want
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
  local base; base="$(find_python)" || die "no Python 3.10-3.13 found (set PYTHON=/path/to/python3.11)"
  if [[ ! -x "$PY" ]]; then
    echo "Creating the virtualenv in .venv with $base ..." >&2
    "$base" -m venv "$VENV" || die "could not create .venv (on Debian: apt-get install python3-venv)"
  fi
  echo "Installing the pinned requirements into .venv (first run only) ..." >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2 \
    || die "pip could not install requirements.txt"
  echo "$want" > "$stamp"
}

py() { ensure_venv; PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" "$@"; }

cmd="${1:-help}"; shift || true
case "$cmd" in
  test)
    ensure_venv
    # Every broker version the integration tests run against ($KAFKA_TEST_VERSIONS, default 3.9.1,4.1.1).
    PYTHONPATH="$ROOT" "$PY" -m broker.kafka_broker fetch --tested >/dev/null
    # Prism for the streaming tests that run on it too (built once from the Go module proxy).
    bash "$ROOT/runners/prism.sh" build >&2 || echo "warning: Prism could not be built; its tests will fail" >&2
    bash "$ROOT/schema_registry/registry.sh" install || echo "warning: the schema registry could not be installed; its tests will fail" >&2
    bash "$ROOT/bigquery_emulator/emulator.sh" install \
      || echo "warning: the BigQuery emulator could not be installed; its tests will fail" >&2
    set +e
    # One formatter and one linter (ruff.toml): a change that breaks either fails the run.
    "$PY" -m ruff format --check --quiet "$ROOT" && "$PY" -m ruff check --quiet "$ROOT"
    lint=$?
    [ $lint -eq 0 ] || echo "error: ruff format/check failed (fix: .venv/bin/ruff format . && .venv/bin/ruff check --fix .)" >&2
    PYTHONPATH="$ROOT" "$PY" -m pytest "$@"
    rc=$?
    set -e
    [ $rc -ne 0 ] || rc=$lint
    exit $rc
    ;;
  broker)   py -m broker.kafka_broker "$@" ;;
  topics)   py -m broker.topics "$@" ;;
  produce)  py -m tools.produce "$@" ;;
  local)    py -m runners.main --mode=local "$@" ;;
  batch)    py -m runners.main --mode=batch "$@" ;;
  flink)    py -m runners.main --mode=flink "$@" ;;
  dataflow) py -m runners.main --mode=dataflow "$@" ;;
  drain)    py -m runners.drain "$@" ;;
  demo)     py -m tools.demo "$@" ;;
  audit)    py -m tools.audit "$@" ;;
  chaos)    py -m tools.chaos "$@" ;;
  prism)    ensure_venv; exec bash "$ROOT/runners/prism.sh" "$@" ;;
  bench)    case "${1:-pipeline}" in
              reader)   shift; py -m benchmarks.reader_bench "$@" ;;
              pipeline) [[ $# -gt 0 ]] && shift; py -m benchmarks.pipeline_bench "$@" ;;
              bigquery) shift; py -m benchmarks.bigquery_bench "$@" ;;
              idle)     shift; py -m benchmarks.idle_cpu "$@" ;;
              profile)  shift; py -m benchmarks.profile_pipeline "$@" ;;
              parse)    shift; py -m benchmarks.parse_bench "$@" ;;
              sink)     shift; py -m benchmarks.sink_bench "$@" ;;
              *) die "bench: expected reader, pipeline, bigquery, idle, profile, parse or sink, got $1" ;;
            esac ;;
  help|-h|--help)
    # The comment block at the top, however many commands it lists.
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
    ;;
  *) die "unknown command '$cmd' (try ./run_pipeline.sh help)" ;;
esac
