"""``chaos``: its parts (process tree, sink lock, options) and a short run of the whole thing.

The short run uses a fixed seed and injects every fault twice against the real local pipeline,
its own broker and SQLite sink; it must end with a strict audit that finds nothing lost and
nothing duplicated, and with every fault survived (the pipeline healing by itself).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import chaos
from tools.chaos_faults import SinkLock, _alive, descendants
from tools.chaos_traffic import CODECS
from tools.produce import BAD_KINDS

REPO = Path(__file__).resolve().parent.parent


def test_bad_options_are_named(capsys):
  for argv, name in (
    (["--faults=kill_worker,nope"], "--faults"),
    (["--workers=1"], "--workers"),
    (["--minutes=0"], "--minutes"),
    (["--broker_down_secs=1"], "--broker_down_secs"),
  ):
    with pytest.raises(SystemExit) as e:
      chaos.parse_args(argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err
  cfg, as_json = chaos.parse_args(
    ["--cycles=3", "--seed=9", "--faults=sink_lock,kill_all", "--json"]
  )
  assert (cfg.cycles, cfg.seed, cfg.faults, as_json) == (3, 9, ("sink_lock", "kill_all"), True)


def test_the_process_tree_is_found_through_new_sessions_and_killed_by_pid():
  # a parent with one plain child and one that starts a session of its own, like the workers
  parent = subprocess.Popen(
    ["sh", "-c", "sleep 300 & setsid sleep 300 & wait"], start_new_session=True
  )
  try:
    deadline = time.monotonic() + 10
    while len(descendants(parent.pid)) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    found = descendants(parent.pid)
    assert len(found) == 2
    for pid in found:
      assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
      os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in found) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not any(_alive(p) for p in found)
    assert parent.wait(timeout=10) == 0  # its `wait` returned: the children are gone
  finally:
    if parent.poll() is None:
      parent.kill()
      parent.wait()


def test_the_sink_lock_makes_writers_fail_until_it_is_released(tmp_path):
  db = tmp_path / "sink.db"
  conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
  conn.execute("PRAGMA journal_mode=WAL")
  conn.execute("CREATE TABLE t (x INTEGER)")
  lock = SinkLock(db, seconds=60).start()
  assert lock.acquired.wait(10)
  with pytest.raises(sqlite3.OperationalError, match="locked"):
    conn.execute("INSERT INTO t VALUES (1)")
  assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)  # readers still read
  lock.release()
  assert lock.released.is_set() and lock.error is None
  conn.execute("INSERT INTO t VALUES (1)")
  assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)
  conn.close()


def test_the_table_says_failed_when_a_fault_was_not_survived():
  result = {
    "seed": 1,
    "elapsed_s": 10.0,
    "restarts_by_chaos": 1,
    "final_catch_up": True,
    "drain_exit_code": 0,
    "audit_ok": True,
    "lost": 0,
    "duplicated": 0,
    "produced": 10,
    "records": 10,
    "rows": 9,
    "dead_letters": 1,
    "duplicate_events": 0,
    "repeated_event_ids_in_sink": 0,
    "not_records": 0,
    "traffic": {"kinds": {"valid": 9, "bad_not_json": 1}, "codecs": {"gzip": 10}, "aborted": 3},
    "faults": {
      "kill_worker": {"injected": 2, "survived": 1, "notes": ["stuck"]},
      "sink_lock": {"injected": 1, "survived": 1, "notes": []},
    },
  }
  table = chaos.format_table(result)
  assert "kill_worker               2        1   e.g. stuck" in table
  assert table.endswith("RESULT: FAILED") and not chaos.result_ok(result)
  result["faults"]["kill_worker"]["survived"] = 2
  assert chaos.result_ok(result) and chaos.format_table(result).endswith("RESULT: OK")
  result["lost"] = 1
  assert not chaos.result_ok(result)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_short_chaos_run_loses_nothing_duplicates_nothing_and_survives_every_fault(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "tools.chaos",
    "--cycles=10",
    "--minutes=8",
    "--seed=20261130",
    "--rate=80",
    "--gap_secs=4",
    "--broker_down_secs=8",
    "--sink_lock_secs=8",
    "--recovery_secs=45",
    "--json",
  ]
  log = tmp_path / "chaos.log"
  with open(log, "w") as err:
    proc = subprocess.run(
      cmd,
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)},
      stdout=subprocess.PIPE,
      stderr=err,
      text=True,
      timeout=1150,
      check=False,
    )
  tail = "\n".join(log.read_text(errors="replace").splitlines()[-45:])
  assert proc.stdout.strip(), f"no result (exit {proc.returncode}):\n{tail}"
  r = json.loads(proc.stdout)
  # what the run did: every fault twice, every codec, every bad kind, aborted transactions
  assert {k: f["injected"] for k, f in r["faults"].items()} == {k: 2 for k in chaos.FAULTS}, tail
  kinds, codecs = r["traffic"]["kinds"], r["traffic"]["codecs"]
  assert all(codecs.get(c, 0) > 0 for c in CODECS), codecs
  assert all(kinds.get(f"bad_{k}", 0) > 0 for k in BAD_KINDS), kinds
  assert kinds["transactional"] > 0 and r["traffic"]["aborted"] > 0 and kinds["repeated_event"] > 0
  assert r["records"] >= r["produced"] > 1000
  assert (
    r["rows"] + r["dead_letters"]
    <= r["records"]
    <= r["rows"] + r["dead_letters"] + r["duplicate_events"]
  )
  # the promise
  assert (r["lost"], r["duplicated"], r["not_records"], r["committed_ahead"]) == (0, 0, 0, 0), tail
  assert r["audit_ok"] is True, tail
  not_survived = {k: f["notes"] for k, f in r["faults"].items() if f["survived"] != f["injected"]}
  assert not not_survived, f"faults not survived: {json.dumps(not_survived, indent=1)}\n{tail}"
  assert r["final_catch_up"] is True and r["drain_exit_code"] == 0, tail
  assert proc.returncode == 0, tail


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_ctrl_c_stops_everything_chaos_started_and_removes_its_folder(tmp_path):
  log = tmp_path / "chaos.log"
  with open(log, "w") as err:
    proc = subprocess.Popen(
      [sys.executable, "-m", "tools.chaos", "--minutes=10", "--seed=3", "--rate=50"],
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)},
      stdout=subprocess.DEVNULL,
      stderr=err,
    )
  try:
    deadline = time.monotonic() + 300
    while "pipeline up" not in log.read_text() and time.monotonic() < deadline:
      assert proc.poll() is None, log.read_text()[-3000:]
      time.sleep(0.5)
    text = log.read_text()
    assert "pipeline up" in text, text[-3000:]
    folder = Path(text.split("folder ", 1)[1].split(",", 1)[0])
    assert folder.is_dir()
    started = descendants(proc.pid)
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in started if _alive(p)]
    assert any(b"kafka.Kafka" in c for c in cmdlines) and any(
      b"runners.main" in c for c in cmdlines
    )
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not [p for p in started if _alive(p)]
    assert not folder.exists()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
