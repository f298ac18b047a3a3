#!/usr/bin/env bash
# Prism, Beam's portable local runner (Go), built from the Go module proxy at the
# same version as the pinned apache-beam, for `./run_pipeline.sh local --runner=PrismRunner`.
#
#   runners/prism.sh build     go install github.com/apache/beam/sdks/v2/go/cmd/prism@v<beam>
#                              into .cache/prism/bin (skipped when the binary there already
#                              reports that version); needs Go >= 1.2x on PATH
#   runners/prism.sh path      print the binary's path (exit 1 if it is not built)
#   runners/prism.sh version   print the Beam version the binary must have
#
# Also reachable as `./run_pipeline.sh prism build|path|version`.
# PRISM_BIN=/path/to/prism overrides the binary for `path` (and pipelines/prism.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.cache/prism/bin"
BIN="$BIN_DIR/prism"
STAMP="$BIN.version"  # the version the binary was built at (checked without Go too)
MODULE="github.com/apache/beam/sdks/v2/go/cmd/prism"

die() { echo "error: $*" >&2; exit 1; }

beam_version() {
  # The pinned apache-beam, read from .venv when it exists, else from requirements.txt.
  local v=""
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    v="$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("apache-beam"))' 2>/dev/null || true)"
  fi
  if [[ -z "$v" ]]; then
    v="$(sed -n 's/^apache-beam\(\[[^]]*\]\)\{0,1\}==\([0-9][0-9.]*\).*/\2/p' "$ROOT/requirements.txt" | head -1)"
  fi
  [[ -n "$v" ]] || die "cannot tell the apache-beam version (no .venv and no apache-beam==X pin in requirements.txt)"
  echo "$v"
}

find_go() {
  local g
  for g in "${GO:-}" go /usr/local/go/bin/go "${HOME:-/nonexistent}/go/bin/go" /usr/lib/go/bin/go; do
    [[ -n "$g" ]] || continue
    if command -v "$g" >/dev/null 2>&1; then command -v "$g"; return 0; fi
  done
  return 1
}

# The Beam module version the binary at $1 was built from ("" if unknown).
binary_version() {
  local bin="$1" go
  [[ -x "$bin" ]] || return 0
  if go="$(find_go)"; then
    "$go" version -m "$bin" 2>/dev/null | awk '$1 == "mod" && $2 == "github.com/apache/beam/sdks/v2" {sub(/^v/, "", $3); print $3; exit}'
  elif [[ "$bin" == "$BIN" && -f "$STAMP" ]]; then
    cat "$STAMP"
  fi
}

cmd_build() {
  local want have go
  want="$(beam_version)"
  have="$(binary_version "$BIN")"
  if [[ "$have" == "$want" ]]; then
    echo "Prism v$want is already built: $BIN" >&2
    return 0
  fi
  go="$(find_go)" || die "Go is not installed (or not on PATH): Prism is built with 'go install'. \
Install Go (https://go.dev/dl/; Prism v2.77 needs Go 1.26, which Go 1.21+ fetches by itself) or set GO=/path/to/go, then run ./run_pipeline.sh prism build again."
  [[ -z "$have" && -e "$BIN" ]] && echo "Rebuilding $BIN (its version is unknown)" >&2
  [[ -n "$have" ]] && echo "Rebuilding $BIN: it is v$have, apache-beam is $want" >&2
  mkdir -p "$BIN_DIR"
  echo "Building Prism v$want with $("$go" version) (a few minutes, CPU heavy) ..." >&2
  GOBIN="$BIN_DIR" GOFLAGS="${GOFLAGS:-} -buildvcs=false" "$go" install "$MODULE@v$want" \
    || die "go install $MODULE@v$want failed (is the Go module proxy reachable? GOPROXY=$("$go" env GOPROXY))"
  have="$(binary_version "$BIN")"
  [[ "$have" == "$want" ]] || die "built $BIN but it reports version '${have:-unknown}', expected $want"
  echo "$want" > "$STAMP"
  echo "Prism v$want: $BIN" >&2
}

cmd_path() {
  local bin="${PRISM_BIN:-$BIN}"
  [[ -x "$bin" ]] || die "Prism is not built ($bin is missing): run ./run_pipeline.sh prism build"
  echo "$bin"
}

case "${1:-help}" in
  build)   cmd_build ;;
  path)    cmd_path ;;
  version) beam_version ;;
  help|-h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "runners/prism.sh: unknown command '$1' (build, path or version)" ;;
esac
