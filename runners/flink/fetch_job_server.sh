#!/usr/bin/env bash
# Fetch Beam's Flink job-server jar with Maven into <repo>/.cache/jars/ and print its path.
# Idempotent: once the jar is in .cache/jars/ no network (and no Maven) is used.
#
# Usage: runners/flink/fetch_job_server.sh
#
# Environment (all optional):
#   BEAM_VERSION         Beam version of the jar  (default: apache_beam.__version__ of <repo>/.venv, else 2.77.0)
#   FLINK_LINE           Flink minor line, e.g. 2.2, 2.0, 1.20, 1.19   (default 2.2)
#   JOB_SERVER_ARTIFACT  full groupId:artifactId:version to fetch instead
#                        (default org.apache.beam:beam-runners-flink-$FLINK_LINE-job-server:$BEAM_VERSION)
#   JARS_DIR             target folder            (default <repo>/.cache/jars)
#
# The jar is a self-contained shaded jar, so it is fetched without its dependencies.
# Pass the printed path to the pipeline as --flink_job_server_jar=<path>.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
JARS_DIR="${JARS_DIR:-$REPO_ROOT/.cache/jars}"
FLINK_LINE="${FLINK_LINE:-2.2}"

die() { echo "fetch_job_server: error: $*" >&2; exit 1; }

if [[ -z "${JOB_SERVER_ARTIFACT:-}" && -z "${BEAM_VERSION:-}" ]]; then
  BEAM_VERSION=$("$REPO_ROOT/.venv/bin/python" -c 'import apache_beam; print(apache_beam.__version__)' 2>/dev/null || true)
  BEAM_VERSION="${BEAM_VERSION:-2.77.0}"
fi
ARTIFACT="${JOB_SERVER_ARTIFACT:-org.apache.beam:beam-runners-flink-$FLINK_LINE-job-server:$BEAM_VERSION}"
IFS=: read -r GROUP_ID ARTIFACT_ID VERSION <<<"$ARTIFACT"
[[ -n "$GROUP_ID" && -n "$ARTIFACT_ID" && -n "$VERSION" ]] || die "bad artifact '$ARTIFACT' (want group:artifact:version)"
JAR="$JARS_DIR/$ARTIFACT_ID-$VERSION.jar"

if [[ -s "$JAR" ]]; then
  echo "$JAR"
  exit 0
fi

command -v mvn >/dev/null 2>&1 || die "mvn not found (needed to fetch $ARTIFACT)"
mkdir -p "$JARS_DIR"
LOG="$JARS_DIR/.fetch-$ARTIFACT_ID-$VERSION.log"
# -U: retry even if an earlier failure is cached in ~/.m2 (*.lastUpdated files)
if ! mvn -B -q -U org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
      -Dartifact="$GROUP_ID:$ARTIFACT_ID:$VERSION:jar" \
      -DoutputDirectory="$JARS_DIR" -Dmdep.overWriteIfNewer=true >"$LOG" 2>&1; then
  reason=$(grep -m1 -oE '(Could not find artifact|was not found|Could not transfer|Could not resolve)[^(]*' "$LOG" || true)
  rm -f "$JAR"
  die "could not fetch $ARTIFACT from Maven: ${reason:-see $LOG}"
fi
[[ -s "$JAR" ]] || die "Maven reported success but $JAR is missing (see $LOG)"
rm -f "$LOG"
echo "$JAR"
