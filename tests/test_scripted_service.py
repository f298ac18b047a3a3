"""scripts/service.py with a real script: a start that finds its port taken is tried again
on new ports, a failure keeps the script's output, stop runs once and removes the state
folder it made."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from scripts.service import ScriptedService, run_script, start_service

# start: fails "already in use" on the first call (a marker file counts calls), then writes
# a pid file; stop: records that it ran.
_SCRIPT = """
set -eu
case "$1" in
  start)
    n=$(cat "$LOG_DIR/starts" 2>/dev/null || echo 0); echo $((n + 1)) > "$LOG_DIR/starts"
    echo "port $SVC_PORT" >> "$LOG_DIR/ports"
    if [ "$n" = 0 ] && [ "${FAIL_FIRST:-}" = 1 ]; then echo "port $SVC_PORT already in use" >&2; exit 1; fi
    if [ "${FAIL_ALWAYS:-}" = 1 ]; then echo "no java here" >&2; exit 3; fi
    echo 4242 > "$SVC_STATE_DIR/svc.pid" ;;
  stop) echo stopped >> "$LOG_DIR/stops" ;;
esac
"""


class FakeError(RuntimeError):
  pass


@dataclasses.dataclass
class Fake(ScriptedService):
  error = FakeError

  port: int
  pid: int
  state_dir: Path
  _env: dict = dataclasses.field(repr=False)
  _remove_state_dir: bool = dataclasses.field(default=False, repr=False)
  _stopped: bool = dataclasses.field(default=False, repr=False)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  script = tmp_path / "svc.sh"
  script.write_text(_SCRIPT)
  monkeypatch.setattr(Fake, "script", script, raising=False)
  logs = tmp_path / "logs"
  logs.mkdir()
  ports = iter(range(41000, 41010))

  def start(attempts=3, **env):
    def env_for(sdir: Path) -> dict:
      return {
        **os.environ,
        "LOG_DIR": str(logs),
        "SVC_PORT": str(next(ports)),
        "SVC_STATE_DIR": str(sdir),
        **env,
      }

    def build(sdir: Path, e: dict, remove: bool) -> Fake:
      pid = int((sdir / "svc.pid").read_text())
      return Fake(int(e["SVC_PORT"]), pid, sdir, e, remove)

    return start_service(
      Fake, env_for, build, state_dir=None, prefix="svc-test-", attempts=attempts, timeout=30
    )

  return start, logs


def test_a_taken_port_is_tried_again_on_new_ports_and_stop_runs_once(fake):
  start, logs = fake
  with start(FAIL_FIRST="1") as svc:
    assert svc.pid == 4242 and svc.state_dir.is_dir()
    assert (logs / "ports").read_text().split("\n")[:2] == ["port 41000", "port 41001"]
    assert svc.port == 41001
  assert not svc.state_dir.exists()  # its own temporary folder, removed on stop
  svc.stop()  # again: nothing more happens
  assert (logs / "stops").read_text().count("stopped") == 1


def test_a_failure_keeps_the_scripts_words_and_is_not_retried(fake):
  start, logs = fake
  with pytest.raises(FakeError, match=r"svc.sh start failed \(exit 3\):\nno java here"):
    start(FAIL_ALWAYS="1")
  assert (logs / "starts").read_text().strip() == "1"  # not a port problem: no second try
  assert not (logs / "stops").exists()


def test_with_one_attempt_a_taken_port_fails(fake):
  start, _ = fake
  with pytest.raises(FakeError, match="already in use"):
    start(attempts=1, FAIL_FIRST="1")


def test_run_script_returns_the_output(tmp_path):
  script = tmp_path / "s.sh"
  script.write_text('echo "hello $1"')
  assert run_script(script, "there", dict(os.environ), 10, FakeError).stdout == "hello there\n"
