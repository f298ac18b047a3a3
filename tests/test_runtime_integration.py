"""The runtime's promises against the real broker: start positions that hold across
rounds and restarts, offsets that no record covers (transaction markers) committed,
so an idle run stays idle, and offset gaps that stop the run or are recorded.

Every test ends offset by offset: each produced (topic, partition, offset) the run was
meant to read is in the sink exactly once, nothing else is, and the group's committed
offsets equal the end offsets (never ahead of the sink).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import shutil
import time

import pytest

from tests import support
from tests.pipeline_support import (
  PipelineEnv,
  assert_exactly_once,
  produce_transactions,
  query,
  row_count,
)
from tools.produce import EventFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

streaming_runners = pytest.mark.parametrize(
  "runner",
  [
    "FnApiRunner",
    # Built by ./run_pipeline.sh test (runners/prism.sh build): a missing binary fails the case.
    "PrismRunner",
  ],
)


@pytest.fixture
def env(kafka_bootstrap, make_topic, tmp_path, request):
  runner = request.node.callspec.params.get("runner") if hasattr(request.node, "callspec") else None
  return PipelineEnv(kafka_bootstrap, make_topic, tmp_path, runner=runner)


def _events(n: int, seed: int):
  return list(EventFactory(seed).events(n, meter_ratio=0.3))


def _iso(ms: int) -> str:
  return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat()


def _wait_committed_at_end(env, timeout: float = 60.0) -> None:
  def done():
    c, e = env.committed(), env.ends()
    return all(c.get(k) == v for k, v in e.items())

  support.wait_for(done, timeout=timeout, what="committed offsets to reach the end offsets")


def _rounds(p):
  """The round count of the latest progress line (None before the first)."""
  found = re.findall(r"\] round (\d+) read", p.output)
  return int(found[-1]) if found else None


def _drain(p) -> None:
  assert p.alive(), p.tail()
  p.terminate()
  assert p.wait(90) == 0, p.tail()


# ---------------------------------------------------------------------------
# Start positions on topics with history


def _expected_with_gap(env, produced: list, start: int, cut: int) -> list:
  """What the sink must hold after sensor-0's offsets [start, cut) were skipped: every other
  produced offset, and one offset_gap dead letter at the gap's first offset."""
  deleted = {(env.sensor, 0, o) for o in range(start, cut)}
  return [r for r in produced if r not in deleted] + [(env.sensor, 0, start)]


def _assert_gap_recorded(env, expected: list, start: int, cut: int) -> None:
  by_table = assert_exactly_once(env.db, expected)
  assert (env.sensor, 0, start) in by_table["dead_letters"]
  [(error,)] = query(
    env.db,
    "SELECT error FROM dead_letters WHERE kafka_topic = ? AND "
    "kafka_partition = 0 AND kafka_offset = ?",
    (env.sensor, start),
  )
  assert error.startswith("offset_gap") and f"[{start}, {cut})" in error, error
  env.assert_committed_equals_end()


@streaming_runners
@pytest.mark.parametrize("start", ["latest", "timestamp"])
def test_streaming_start_holds_across_rounds_and_restarts(env, runner, start):
  """History exists; the run starts at latest (or at a timestamp newer than all of it:
  every partition is quiet there). Only what is written after the start may arrive, in
  later rounds too, and a restart from the committed offsets goes on from there."""
  old_ms = int(time.time() * 1000) - 3_600_000
  history = env.produce(_events(40, seed=1), timestamp_ms=old_ms)
  flag = "--start=latest" if start == "latest" else f"--start={_iso(old_ms + 60_000)}"
  with env.pipeline(flag) as p:
    _wait_committed_at_end(env)  # the resolved start is committed before any record
    new = env.produce(_events(30, seed=2))
    support.wait_for(
      lambda: row_count(env.db) >= len(new) or not p.alive(),
      timeout=60,
      what="the new events in the sink",
    )
    _wait_committed_at_end(env)
    more = env.produce(_events(20, seed=3))  # a later round, still nothing of the history
    support.wait_for(
      lambda: row_count(env.db) >= len(new) + len(more) or not p.alive(),
      timeout=60,
      what="the later events in the sink",
    )
    _drain(p)
  assert_exactly_once(env.db, new + more)
  env.assert_committed_equals_end()
  last = env.produce(_events(10, seed=4))
  rerun = env.batch()  # restart from the committed offsets: never the history
  assert rerun.proc.returncode == 0, rerun.tail()
  assert_exactly_once(env.db, new + more + last)
  env.assert_committed_equals_end()
  assert not set(history) & {r for r in new + more + last}


@pytest.mark.parametrize("start", ["latest", "timestamp", "earliest", "committed", "offsets"])
def test_batch_start_positions_read_the_same_records_as_streaming(env, start):
  old_ms = int(time.time() * 1000) - 3_600_000
  history = env.produce(_events(40, seed=5), timestamp_ms=old_ms)
  recent = env.produce(_events(25, seed=6))
  flag = {
    "latest": "--start=latest",
    "timestamp": f"--start={_iso(old_ms + 60_000)}",
    "earliest": "--start=earliest",
    "committed": "--start=committed",
    "offsets": f"--start={env.sensor}@0=7,{env.meter}@1=3",
  }[start]
  first = env.batch(flag)
  assert first.proc.returncode == 0, first.tail()
  explicit = {(env.sensor, 0): 7, (env.meter, 1): 3}
  expected = {
    "latest": [],
    "timestamp": recent,
    "offsets": [r for r in history + recent if r[2] >= explicit.get(r[:2], 0)],
  }.get(start, history + recent)
  if expected:
    assert_exactly_once(env.db, expected)
  else:
    assert row_count(env.db) == 0
  env.assert_committed_equals_end()  # latest: the start itself, though nothing was read
  later = env.produce(_events(15, seed=7))
  second = env.batch()
  assert second.proc.returncode == 0, second.tail()
  assert_exactly_once(env.db, expected + later)
  env.assert_committed_equals_end()


# ---------------------------------------------------------------------------
# Transactions: markers are committed, an idle run stays idle


def test_transactional_topics_commit_the_markers_and_an_idle_run_starts_no_rounds(env):
  kept = produce_transactions(env.bs, env.sensor, env.meter, _events(120, seed=8))
  with env.pipeline("--progress_secs=1") as p:
    support.wait_for(
      lambda: row_count(env.db) >= len(kept) or not p.alive(),
      timeout=90,
      what="the committed transactions in the sink",
    )
    _wait_committed_at_end(env)  # the trailing commit/abort markers are committed too
    support.wait_for(lambda: _rounds(p) is not None, what="a progress line")
    rounds = _rounds(p)
    # Idle: no new round may start (the progress line counts them; the round that committed
    # the markers may still be finishing). A spinning run starts one every second or so.
    time.sleep(6)  # an observation window, not a synchronization: nothing may happen
    assert _rounds(p) <= rounds + 1, p.tail()
    more = produce_transactions(env.bs, env.sensor, env.meter, _events(30, seed=9))
    support.wait_for(
      lambda: row_count(env.db) >= len(kept) + len(more) or not p.alive(),
      timeout=60,
      what="the later transactions",
    )
    _wait_committed_at_end(env)
    _drain(p)
  assert_exactly_once(env.db, kept + more)
  env.assert_committed_equals_end()


# ---------------------------------------------------------------------------
# Offset gaps: never silent


def _delete_records(bootstrap: str, topic: str, partition: int, before: int) -> None:
  from kafka import KafkaAdminClient, TopicPartition

  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  try:
    admin.delete_records({TopicPartition(topic, partition): before})
  finally:
    admin.close()
  support.wait_for(
    lambda: _log_start(bootstrap, topic, partition) == before,
    what=f"{topic}-{partition} to start at {before}",
  )


def _log_start(bootstrap: str, topic: str, partition: int) -> int:
  from kafka import KafkaConsumer, TopicPartition

  c = KafkaConsumer(bootstrap_servers=bootstrap)
  try:
    tp = TopicPartition(topic, partition)
    return c.beginning_offsets([tp])[tp]
  finally:
    c.close()


def test_unread_offsets_deleted_by_retention_stop_the_run_or_are_recorded_as_a_gap(env):
  first = env.produce(_events(40, seed=10))
  run = env.batch()
  assert run.proc.returncode == 0, run.tail()
  env.assert_committed_equals_end()
  second = env.produce(_events(60, seed=11))
  committed_before = env.committed()
  start = committed_before[(env.sensor, 0)]
  end = env.ends()[(env.sensor, 0)]
  assert end - start >= 6, "the test needs unread offsets on the partition"
  cut = end - 3  # offsets [start, cut) are deleted before the pipeline reads them
  _delete_records(env.bs, env.sensor, 0, cut)

  refused = env.batch()
  assert refused.proc.returncode == 2, refused.tail()
  assert f"{env.sensor}-0: offsets [{start}, {cut}) were deleted" in refused.output
  assert "--on_offset_gap=skip" in refused.output
  assert env.committed() == committed_before  # nothing moved past the gap

  skipped = env.batch("--on_offset_gap=skip")
  assert skipped.proc.returncode == 0, skipped.tail()
  expected = _expected_with_gap(env, first + second, start, cut)
  _assert_gap_recorded(env, expected, start, cut)


def test_a_committed_offset_past_the_end_of_a_recreated_topic_stops_the_run(env):
  from kafka import KafkaAdminClient
  from kafka.admin import NewTopic

  env.produce(_events(60, seed=12))
  run = env.batch()
  assert run.proc.returncode == 0, run.tail()
  old = env.committed()
  rows = row_count(env.db)
  admin = KafkaAdminClient(bootstrap_servers=env.bs)
  try:
    admin.delete_topics([env.sensor])
    support.wait_for(lambda: env.sensor not in admin.list_topics(), what="the topic deleted")
    support.wait_for(
      lambda: _try_create(admin, NewTopic(env.sensor, 2, 1)), timeout=60, what="the topic recreated"
    )
  finally:
    admin.close()
  support.wait_for(lambda: len(support.partitions_of(env.bs, env.sensor)) == 2, what="metadata")
  env.produce([e for e in _events(10, seed=13) if e.topic_kind == "sensor"][:3])
  # Kafka drops a deleted topic's group offsets, but a group that committed during the
  # recreation (a consumer still running, offsets restored by a tool) keeps them.
  _commit(env.bs, env.group, {k: v for k, v in old.items() if k[0] == env.sensor and v})

  refused = env.batch()
  assert refused.proc.returncode == 2, refused.tail()
  past = [k for k, v in old.items() if k[0] == env.sensor and v]
  assert any(
    f"{t}-{p}: offset {old[(t, p)]} is past the partition's end offset" in refused.output
    for t, p in past
  ), refused.tail()
  assert "--on_offset_gap=skip" in refused.output
  assert row_count(env.db) == rows  # nothing written, and nothing committed:
  assert {k: v for k, v in env.committed().items() if k[0] == env.meter} == {
    k: v for k, v in old.items() if k[0] == env.meter
  }


def _commit(bootstrap: str, group: str, offsets: dict) -> None:
  from kafka import KafkaConsumer, TopicPartition
  from kafka.structs import OffsetAndMetadata

  c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
  try:
    c.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
  finally:
    c.close()


def _try_create(admin, topic) -> bool:
  try:
    admin.create_topics([topic])
    return True
  except Exception:  # noqa: BLE001 - the deletion may still be under way: try again
    return False


# ---------------------------------------------------------------------------
# Topics that do not exist yet, a broker that does not answer


def test_streaming_waits_for_topics_says_so_once_and_reads_them_when_they_appear(
  kafka_bootstrap, tmp_path
):
  env = PipelineEnv.__new__(PipelineEnv)
  env.bs, env.dir, env.db, env.runner = kafka_bootstrap, tmp_path, tmp_path / "out.db", None
  env.sensor, env.meter = support.unique_topic("sensor"), support.unique_topic("meter")
  env.group = support.unique_topic("g")
  with env.pipeline("--local_workers=2") as p:
    support.wait_for(
      lambda: "waiting for topic(s)" in p.output or not p.alive(),
      timeout=60,
      what="the waiting message",
    )
    assert p.alive(), p.tail()
    time.sleep(3)  # an observation window: the run must not create the topics itself
    assert not support.partitions_of(env.bs, env.sensor)
    support.create_topic(env.bs, env.sensor, 2)
    support.create_topic(env.bs, env.meter, 2)
    produced = env.produce(_events(50, seed=14))
    support.wait_for(
      lambda: row_count(env.db) >= len(produced) or not p.alive(),
      timeout=90,
      what="the events of the new topics",
    )
    _drain(p)
  assert p.output.count("to be created") == 1, p.output  # said once, not once per worker
  assert_exactly_once(env.db, produced)
  env.assert_committed_equals_end()


def test_batch_over_missing_topics_has_nothing_to_read_unless_they_are_required(
  kafka_bootstrap, tmp_path
):
  from tests.pipeline_support import run_to_end

  sensor, meter = support.unique_topic("sensor"), support.unique_topic("meter")
  p = run_to_end(kafka_bootstrap, sensor, meter, "g-missing", tmp_path, "--local_workers=2")
  assert p.proc.returncode == 0, p.tail()
  assert p.output.count("nothing to read") == 1, p.output
  strict = run_to_end(kafka_bootstrap, sensor, meter, "g-missing", tmp_path, "--require_topics")
  assert strict.proc.returncode == 2, strict.tail()
  assert sensor in strict.output and meter in strict.output and "--require_topics" in strict.output
  assert not support.partitions_of(kafka_bootstrap, sensor)  # looking never created them


def test_an_unreachable_broker_at_start_is_one_clear_line(tmp_path):
  from broker.kafka_broker import free_port
  from tests.pipeline_support import run_to_end

  p = run_to_end(f"127.0.0.1:{free_port()}", "s", "m", "g", tmp_path, timeout=60)
  assert p.proc.returncode == 2, p.tail()
  lines = [line for line in p.output.splitlines() if line.strip()]
  assert len(lines) == 1, p.output
  assert "cannot reach Kafka" in lines[0] and "./run_pipeline.sh broker start" in lines[0]
  assert "KAFKA_PORT" in lines[0] and "--bootstrap_servers" in lines[0]


# ---------------------------------------------------------------------------
# Workers: a dead one is restarted; a signal to every process drains


def _children(pid: int) -> list[int]:
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(c) for c in f.read().split()]
  except FileNotFoundError:
    return []


def _workers_of(p) -> list[int]:
  return support.wait_for(
    lambda: (lambda c: c if len(c) == 2 else None)(_children(p.proc.pid)),
    timeout=30,
    what="the 2 workers",
  )


def test_a_worker_sigkilled_alone_while_producing_is_restarted_and_nothing_is_lost(env):
  import os
  import signal

  from tests.pipeline_support import BackgroundProducer

  producer = BackgroundProducer(env.bs, env.sensor, env.meter, rate=300.0).start()
  try:
    with env.pipeline("--local_workers=2") as p:
      support.wait_for(
        lambda: row_count(env.db) > 100 or not p.alive(), timeout=60, what="rows while streaming"
      )
      victim = _workers_of(p)[0]
      os.kill(victim, signal.SIGKILL)
      support.wait_for(
        lambda: "restarting it" in p.output or not p.alive(),
        timeout=30,
        what="the supervisor to restart the worker",
      )
      support.wait_for(
        lambda: len(_children(p.proc.pid)) == 2 and victim not in _children(p.proc.pid),
        timeout=30,
        what="the restarted worker",
      )
      n = row_count(env.db)
      support.wait_for(
        lambda: row_count(env.db) > n + 100 or not p.alive(),
        timeout=60,
        what="rows after the restart",
      )
      produced = producer.stop()
      support.wait_for(
        lambda: row_count(env.db) >= len(produced) or not p.alive(),
        timeout=90,
        what="the workers to catch up",
      )
      env.commits_not_past_sink()
      _drain(p)
  finally:
    producer.stop()
  assert "All 2 workers drained" in p.output and "1 restarts" in p.output, p.tail()
  assert_exactly_once(env.db, produced)
  env.assert_committed_equals_end()


def test_sigterm_to_every_process_at_once_drains(env):
  import os
  import signal

  from tests.pipeline_support import BackgroundProducer

  producer = BackgroundProducer(env.bs, env.sensor, env.meter, rate=300.0).start()
  try:
    with env.pipeline("--local_workers=2") as p:
      support.wait_for(
        lambda: row_count(env.db) > 100 or not p.alive(), timeout=60, what="rows while streaming"
      )
      produced = producer.stop()
      support.wait_for(
        lambda: row_count(env.db) >= len(produced) or not p.alive(),
        timeout=90,
        what="the workers to catch up",
      )
      tree = [p.proc.pid, *_workers_of(p)]
      for pid in tree:  # as pkill -f or systemd's KillMode=control-group would
        os.kill(pid, signal.SIGTERM)
      assert p.wait(90) == 0, p.tail()
  finally:
    producer.stop()
  assert "All 2 workers drained" in p.output, p.tail()
  assert "aborting" not in p.output.lower(), p.tail()
  assert_exactly_once(env.db, produced)
  env.assert_committed_equals_end()


# ---------------------------------------------------------------------------
# A broker outage in the middle of a stream


@contextlib.contextmanager
def _private_broker(tmp_path):
  """A broker of this test's own (the outage tests stop it) and an env on it."""
  from broker.kafka_broker import Broker, free_port

  broker = Broker(port=free_port(), run_dir=tmp_path / "broker")
  broker.start()
  try:
    bs = broker.bootstrap_servers
    yield (
      broker,
      PipelineEnv(
        bs, lambda n, prefix: support.create_topic(bs, support.unique_topic(prefix), n), tmp_path
      ),
    )
  finally:
    broker.stop()
    shutil.rmtree(tmp_path / "broker", ignore_errors=True)


def _stop_broker_once_written(env, broker, p, before: list, *, report_timeout: float) -> float:
  """Waits until the run has written and committed ``before``, stops the broker and waits for
  the progress line to report the outage; returns when the broker stopped (monotonic)."""
  support.wait_for(
    lambda: row_count(env.db) >= len(before) or not p.alive(),
    timeout=90,
    what="the events written before the outage",
  )
  _wait_committed_at_end(env)
  broker.stop()
  stopped = time.monotonic()
  support.wait_for(
    lambda: "Kafka unreachable since" in p.output or not p.alive(),
    timeout=report_timeout,
    what="the progress line to report the outage",
  )
  return stopped


@pytest.mark.timeout(420)
def test_a_broker_stopped_for_45s_mid_stream_is_waited_out_without_loss_or_duplicate(tmp_path):
  with _private_broker(tmp_path) as (broker, env):
    before = env.produce(_events(80, seed=15))
    with env.pipeline("--progress_secs=1") as p:
      stopped = _stop_broker_once_written(env, broker, p, before, report_timeout=60)
      while time.monotonic() - stopped < 45:  # the outage lasts 45 s; the run must live through it
        assert p.alive(), p.tail()
        time.sleep(1)
      broker.start()
      assert p.alive(), p.tail()
      after = env.produce(_events(70, seed=16))
      support.wait_for(
        lambda: row_count(env.db) >= len(before) + len(after) or not p.alive(),
        timeout=120,
        what="the events written after the outage",
      )
      _wait_committed_at_end(env, timeout=90)
      _drain(p)
    assert "Traceback" not in p.output, p.tail(80)
    assert_exactly_once(env.db, before + after)
    env.assert_committed_equals_end()


@pytest.mark.timeout(300)
def test_a_drain_during_an_outage_ends_the_run_soon_with_nothing_unwritten_committed(tmp_path):
  """The broker goes away mid-stream, then the user drains: the run ends cleanly within a
  minute (it does not sit out the 120 s of offset-resolution retries or a backoff), what
  was written stays exactly once, and after the broker is back the committed offsets are
  those of the written rows, never past them."""
  with _private_broker(tmp_path) as (broker, env):
    before = env.produce(_events(60, seed=21))
    with env.pipeline("--progress_secs=1") as p:
      _stop_broker_once_written(env, broker, p, before, report_timeout=90)
      assert p.alive(), p.tail()
      p.terminate()
      assert p.wait(60) == 0, p.tail()
    broker.start()
    assert "Traceback" not in p.output, p.tail(80)
    assert_exactly_once(env.db, before)
    env.assert_committed_equals_end()


def test_an_idle_stream_recommits_its_offsets_every_recommit_interval(env):
  """Unchanged offsets are committed again (a round re-commits each partition's start)
  so that the broker's offsets.retention.minutes never expires them."""
  produced = env.produce(_events(30, seed=17))
  with env.pipeline("--recommit_interval_secs=2") as p:
    _wait_committed_at_end(env)
    support.wait_for(lambda: row_count(env.db) >= len(produced), what="the rows")
    support.wait_for(lambda: _rounds(p) is not None, what="a progress line")
    rounds = _rounds(p)
    # Idle: rounds still come, one per interval, and each commits every partition again.
    support.wait_for(
      lambda: _rounds(p) >= rounds + 2 or not p.alive(),
      timeout=30,
      what="two more rounds while idle",
    )
    _drain(p)
  assert_exactly_once(env.db, produced)
  env.assert_committed_equals_end()


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode()
  except FileNotFoundError:
    return ""


@pytest.mark.timeout(300)
def test_a_worker_that_keeps_dying_ends_the_run_naming_its_partitions(env):
  import os
  import signal

  produced = env.produce(_events(60, seed=18))
  with env.pipeline("--local_workers=2") as p:
    support.wait_for(
      lambda: row_count(env.db) >= len(produced) or not p.alive(), timeout=60, what="the rows"
    )
    os.kill(_workers_of(p)[0], signal.SIGKILL)
    restarted = support.wait_for(
      lambda: next((c for c in _children(p.proc.pid) if "--partition_shard=" in _cmdline(c)), None),
      timeout=60,
      what="the restarted worker",
    )
    shard = _cmdline(restarted).split("--partition_shard=")[1].split()[0]
    for n in range(2, 7):  # the same worker dies again and again
      victim = support.wait_for(
        lambda n=n: (
          next(
            (c for c in _children(p.proc.pid) if f"--partition_shard={shard}" in _cmdline(c)), None
          )
          if p.output.count("restarting it") == n - 1
          else None
        ),
        timeout=60,
        what=f"restart {n - 1}",
      )
      time.sleep(1)  # let it get past its imports, as a crash in the pipeline would
      os.kill(victim, signal.SIGKILL)
    assert p.wait(120) == 1, p.tail()
  assert "giving up" in p.output and f"worker {shard.split('/')[0]} (partitions " in p.output, (
    p.tail()
  )
  assert "All 2 workers FAILED" in p.output, p.tail()
  env.commits_not_past_sink()
  assert_exactly_once(env.db, produced)  # everything was written before the failures


def test_offsets_deleted_while_a_stream_runs_are_recorded_with_skip(env):
  import os
  import signal

  first = env.produce(_events(40, seed=19))
  with env.pipeline("--on_offset_gap=skip") as p:
    support.wait_for(
      lambda: row_count(env.db) >= len(first) or not p.alive(), timeout=60, what="the first rows"
    )
    _wait_committed_at_end(env)
    os.kill(p.proc.pid, signal.SIGSTOP)  # hold the run between two rounds
    try:
      second = env.produce(_events(60, seed=20))
      start = env.committed()[(env.sensor, 0)]
      cut = env.ends()[(env.sensor, 0)] - 2
      assert cut - start >= 4, "the test needs unread offsets on the partition"
      _delete_records(env.bs, env.sensor, 0, cut)  # retention, before the run read them
    finally:
      os.kill(p.proc.pid, signal.SIGCONT)
    expected = _expected_with_gap(env, first + second, start, cut)
    support.wait_for(
      lambda: row_count(env.db) >= len(expected) or not p.alive(),
      timeout=60,
      what="the rest of the rows and the gap",
    )
    _wait_committed_at_end(env)
    _drain(p)
  _assert_gap_recorded(env, expected, start, cut)


def test_offsets_deleted_while_two_workers_stream_stop_the_run_by_default(env):
  import os
  import signal

  first = env.produce(_events(40, seed=21))
  with env.pipeline("--local_workers=2") as p:
    support.wait_for(
      lambda: row_count(env.db) >= len(first) or not p.alive(), timeout=60, what="the first rows"
    )
    _wait_committed_at_end(env)
    tree = [p.proc.pid, *_workers_of(p)]
    for pid in tree:
      os.kill(pid, signal.SIGSTOP)  # hold the run between two rounds
    try:
      env.produce(_events(60, seed=22))
      start = env.committed()[(env.sensor, 0)]
      cut = env.ends()[(env.sensor, 0)] - 2
      _delete_records(env.bs, env.sensor, 0, cut)
    finally:
      for pid in tree:
        os.kill(pid, signal.SIGCONT)
    assert p.wait(120) == 2, p.tail()
  assert f"{env.sensor}-0: offsets [{start}, {cut}) were deleted" in p.output, p.tail()
  assert "--on_offset_gap=skip" in p.output and "stopped with exit code 2" in p.output
  assert env.committed()[(env.sensor, 0)] == start  # never acked past the gap
  env.commits_not_past_sink()
