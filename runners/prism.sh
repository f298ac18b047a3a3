#!/usr/bin/env bash
# Prism, Beam's portable local runner (Go), built from the Go module proxy at the
# same version as the pinned apache-beam, for `./run_pipeline.sh local --runner=PrismRunner`.
#
#   runners/prism.sh build     builds github.com/apache/beam/sdks/v2/go/cmd/prism@v<beam> from
#                              the Go module proxy into .cache/prism-127/bin (skipped when the
#                              binary there already has that version); needs Go >= 1.2x.
#                              Patched in one line: Prism's job server (its only listener,
#                              which also carries the workers' control and data streams)
#                              binds 127.0.0.1 instead of every interface; Prism has no flag
#                              for it (jobservices/server.go listens on ":<port>").
#   runners/prism.sh path      print the binary's path (exit 1 if it is not built)
#   runners/prism.sh version   print the Beam version the binary must have
#
# Also reachable as `./run_pipeline.sh prism build|path|version`.
# PRISM_BIN=/path/to/prism overrides the binary for `path` (and runners/prism.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.cache/prism-127/bin"
SRC_ROOT="$ROOT/.cache/prism-127/src"
PATCHED_SUFFIX="+bind127"
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
  # A patched build reports "(devel)" to `go version -m`: the stamp beside it says what it is.
  if [[ "$bin" == "$BIN" && -f "$STAMP" ]]; then
    sed "s/$PATCHED_SUFFIX\$//" "$STAMP"
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
  mkdir -p "$BIN_DIR" "$SRC_ROOT"
  echo "Building Prism v$want with $("$go" version) (a few minutes, CPU heavy) ..." >&2
  local mod src
  mod="$("$go" mod download -json "github.com/apache/beam/sdks/v2@v$want" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')" \
    || die "go mod download github.com/apache/beam/sdks/v2@v$want failed (is the Go module proxy reachable? GOPROXY=$("$go" env GOPROXY))"
  [[ -d "$mod" ]] || die "go mod download gave no source folder for github.com/apache/beam/sdks/v2@v$want"
  src="$SRC_ROOT/v$want"
  rm -rf "$src.tmp" && mkdir -p "$src.tmp"
  cp -r "$mod/go.mod" "$mod/go.sum" "$mod/go" "$src.tmp/" && chmod -R u+w "$src.tmp"
  local server="$src.tmp/go/pkg/beam/runners/prism/internal/jobservices/server.go"
  grep -q 'net.Listen("tcp", fmt.Sprintf(":%d", port))' "$server" \
    || die "Prism v$want: the job server's listen call changed ($server); update the bind patch in runners/prism.sh"
  sed -i 's/net.Listen("tcp", fmt.Sprintf(":%d", port))/net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))/' "$server"
  rm -rf "$src" && mv "$src.tmp" "$src"
  (cd "$src" && GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=mod" "$go" build -o "$BIN.tmp" ./go/cmd/prism) \
    || die "go build of Prism v$want failed"
  mv -f "$BIN.tmp" "$BIN"
  echo "$want$PATCHED_SUFFIX" > "$STAMP"
  echo "Prism v$want (job server on 127.0.0.1): $BIN" >&2
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
