"""The benchmark's measuring tools (benchmarks/measure.py) against real processes and the real
broker: CPU and peak RSS of a whole process tree, and the first committed offset of a group seen
from another client. The issue-13 figures are only as good as these."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from benchmarks.measure import CommitWatch, run_measured
from broker.kafka_broker import REPO, free_port

# A parent that starts a child holding ~120 MB and burning CPU, then burns CPU itself.
_TREE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import time\\nb = bytearray(120 * 1024 * 1024)\\nb[::4096] = b'x' * len(b[::4096])\\n"
        "t = time.process_time()\\nwhile time.process_time() - t < 0.4: pass\\ntime.sleep(0.6)"])
    t = time.process_time()
    while time.process_time() - t < 0.3: pass
    child.wait()
""")


def test_run_measured_sees_the_whole_process_tree():
  m = run_measured([sys.executable, "-c", _TREE], {}, REPO)
  assert m.returncode == 0, m.stderr
  assert len(m.rss_mb) >= 2, m.rss_mb  # the parent and the child, sampled apart
  biggest = max(m.rss_mb.values())
  smallest = min(m.rss_mb.values())
  assert 120 <= biggest < 200, m.rss_mb  # the child's bytearray, not a sum over processes
  assert smallest < 60, m.rss_mb  # the parent did not inherit the child's peak
  assert m.cpu_s >= 0.7 - 0.05, m.cpu_s  # both processes' CPU, the reaped child's included
  assert m.wall_s >= 0.6


def test_run_measured_reports_failure_and_stderr():
  m = run_measured(
    [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], {}, REPO
  )
  assert m.returncode == 3
  assert "boom" in m.stderr


def test_free_port_skips_excluded_ports():
  first = free_port()
  for _ in range(50):
    assert free_port(exclude=(first,)) != first


def _commit(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
  c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
  try:
    c.assign([tp])
    c.commit(offsets={tp: OffsetAndMetadata(offset, "", -1)})
  finally:
    c.close(autocommit=False)


def _wait(cond, deadline_s: float = 30.0) -> bool:
  end = time.monotonic() + deadline_s
  while time.monotonic() < end:
    if cond():
      return True
    time.sleep(0.05)
  return False


def test_commit_watch_sees_only_a_new_commit(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=2, prefix="watch")
  tp = TopicPartition(topic, 1)
  group = f"g-{topic}"
  _commit(kafka_bootstrap, group, tp, 5)  # already there before the watch: not "first"
  watch = CommitWatch(kafka_bootstrap, group, [topic])
  assert watch.baseline == {tp: 5}
  watch.start()
  try:
    time.sleep(0.5)  # several polls of the watch pass: none may count the old commit
    assert watch.first is None
    before = time.monotonic()
    committer = threading.Thread(target=_commit, args=(kafka_bootstrap, group, tp, 7))
    committer.start()
    committer.join()
    assert _wait(lambda: watch.first is not None), "the new commit was never seen"
    assert watch.first >= before
  finally:
    watch.done.set()
    watch.join(timeout=10)


def test_commit_watch_on_a_group_that_does_not_exist_yet(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=1, prefix="watchnew")
  group = f"g-{topic}"
  watch = CommitWatch(kafka_bootstrap, group, [topic])
  assert watch.baseline == {}
  watch.start()
  try:
    _commit(kafka_bootstrap, group, TopicPartition(topic, 0), 1)
    assert _wait(lambda: watch.first is not None)
  finally:
    watch.done.set()
    watch.join(timeout=10)


def test_broker_start_prints_no_connection_errors(tmp_path):
  """Issue 13: the bench started with a screen of ECONNREFUSED while its broker started."""
  code = textwrap.dedent(f"""
      import logging
      logging.basicConfig(level=logging.WARNING)
      from broker.kafka_broker import Broker, free_port
      b = Broker(port=free_port(), run_dir={str(tmp_path / 'k')!r})
      b.start()
      b.stop()
      print("started and stopped")
  """)
  out = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=180,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    check=False,
  )
  assert out.returncode == 0, out.stderr
  assert "started and stopped" in out.stdout
  assert "ECONNREFUSED" not in out.stderr and "ERROR" not in out.stderr, out.stderr


def test_the_strict_loop_commits_as_rarely_as_the_sink_and_keeps_one_row_per_event(
  kafka_bootstrap, make_topic, tmp_path, monkeypatch
):
  """The bench's floor for the sink's guarantees: every record read, one row per event_id
  (a later copy of an event at another offset is not stored), and the last partial
  transaction committed; its transaction size is the sink's default flush."""
  import json
  import sqlite3

  from benchmarks import baselines, sink_bench
  from pipelines.options import SmartGridOptions
  from tests import support

  assert baselines.STRICT_COMMIT_ROWS == SmartGridOptions([]).sink_flush_rows
  assert sink_bench.FLUSH_ROWS == SmartGridOptions([]).sink_flush_rows
  monkeypatch.setattr(baselines, "STRICT_COMMIT_ROWS", 7)  # several commits and a partial one
  topic = make_topic(partitions=2, prefix="strict")
  events = [
    {"event_id": f"e{i % 20}", "sensor_id": "s", "value": float(i), "timestamp": "t"}
    for i in range(25)  # e0..e4 twice
  ]
  # one partition: the read order is the produce order, so the first copy is known
  support.produce(kafka_bootstrap, topic, [(None, json.dumps(e)) for e in events], partition=1)
  db = tmp_path / "strict.db"
  assert baselines.sqlite_loop(kafka_bootstrap, [topic], 25, str(db), strict=True) == 25
  conn = sqlite3.connect(db)
  try:
    rows = conn.execute("SELECT event_id, value FROM events ORDER BY value").fetchall()
  finally:
    conn.close()
  assert rows == [(f"e{i}", float(i)) for i in range(20)]  # the first copy of each, no gap
