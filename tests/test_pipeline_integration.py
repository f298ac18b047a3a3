"""The whole pipeline against the real broker and a real SQLite file, as a subprocess.

Each test writes to fresh topics with an independent producer, runs
``python -m runners.main --mode=local|batch``, stops it in one of the ways the
pipeline promises to survive (SIGTERM drain, SIGKILL, a locked sink, a second run),
and compares the sink with the topic offset by offset: every produced
(topic, partition, offset) in exactly one table exactly once, committed offsets never
past what is written, and equal to the end offsets after a clean stop.

The streaming tests (``@both_runners``) run on FnApiRunner (the default local engine,
streaming in rounds) and on Prism (``--runner=PrismRunner``: one unbounded pipeline); the
test command builds Prism (``runners/prism.sh build``, cached), and a missing binary fails
the Prism cases (no skip). Batch runs always use FnApiRunner: Prism refuses bounded runs, because it
drops rows buffered in GroupIntoBatches when a bounded input ends (runners/prism.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
import sqlite3
import time
import uuid

import pytest

from tests import support
from tests.pipeline_support import (
  BackgroundProducer,
  Pipeline,
  assert_commits_not_past_sink,
  assert_exactly_once,
  committed,
  contiguous_frontier,
  ends,
  produce_events,
  query,
  row_count,
  run_to_end,
)
from tests.support import wait_for
from tools.produce import BAD_KINDS, EventFactory
from transforms.events import decode_raw_value
from transforms.sinks.sqlite import SqliteStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

both_runners = pytest.mark.parametrize(
  "runner",
  [
    "FnApiRunner",
    # Built by ./run_pipeline.sh test (runners/prism.sh build): a missing binary fails the case.
    "PrismRunner",
  ],
)


@pytest.fixture
def runner():
  """The local engine of a test not marked @both_runners: the default, FnApiRunner."""
  return "FnApiRunner"


@pytest.fixture
def env(kafka_bootstrap, make_topic, tmp_path, runner):
  """Fresh sensor and meter topics (2 partitions each), a fresh group, a work dir; the
  test's streaming runs on `runner`."""

  class Env:
    bs = kafka_bootstrap
    sensor = make_topic(2, "sensor")
    meter = make_topic(2, "meter")
    group = f"g-{uuid.uuid4().hex[:8]}"
    dir = tmp_path
    db = tmp_path / "out.db"

    def pipeline(self, *extra, mode="local"):
      return Pipeline(
        self.bs, self.sensor, self.meter, self.group, self.dir, *extra, mode=mode, runner=runner
      )

    def batch(self, *extra, timeout=120.0):
      # Batch (restarts included) is FnApiRunner's: Prism refuses bounded runs.
      return run_to_end(
        self.bs, self.sensor, self.meter, self.group, self.dir, *extra, timeout=timeout
      )

    def produce(self, events, **kw):
      return produce_events(self.bs, self.sensor, self.meter, list(events), **kw)

    def committed(self):
      return committed(self.bs, self.group, self.sensor, self.meter)

    def ends(self):
      return ends(self.bs, self.sensor, self.meter)

    def commits_not_past_sink(self):
      return assert_commits_not_past_sink(self.bs, self.group, self.db, self.sensor, self.meter)

  e = Env()
  return e


def _events(n: int, seed: int = 1, meter_ratio: float = 0.3):
  return list(EventFactory(seed).events(n, meter_ratio=meter_ratio))


def _assert_clean_exit(p: Pipeline):
  assert p.proc.returncode == 0, f"exit {p.proc.returncode}:\n{p.tail()}"


def _assert_committed_equals_end(env):
  c, e = env.committed(), env.ends()
  # a partition that never held a record has nothing to commit
  assert {k: v for k, v in c.items() if e[k]} == {k: v for k, v in e.items() if v}, (c, e)


# ---------------------------------------------------------------------------
# (1) 50 events, streaming, SIGTERM


@both_runners
def test_sigterm_drains_50_events_and_commits_the_end(env):
  produced = env.produce(_events(50))
  with env.pipeline() as p:
    support.wait_for(
      lambda: row_count(env.db) >= 50 or not p.alive(), timeout=60, what="50 rows in the sink"
    )
    assert p.alive(), p.tail()
    p.terminate()
    assert p.wait(60) == 0, p.tail()
  assert "drained" in p.output
  assert_exactly_once(env.db, produced)
  assert row_count(env.db) == 50
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (2) 75 events and a failure while processing


@pytest.mark.timeout(150)
@both_runners
def test_kill_while_processing_then_restart_writes_all_75_once(env):
  first = env.produce(_events(40, seed=2))
  with env.pipeline() as p:
    support.wait_for(
      lambda: row_count(env.db) >= 40 and env.committed() == env.ends(),
      timeout=60,
      what="the first 40 rows written and committed",
    )
    # The sink is now stuck (a writer holds the file); the next 35 are read, never written:
    # the round that reads them waits on the sink (the start-up reconciliation, then the write).
    lock = sqlite3.connect(env.db, isolation_level=None, timeout=30)
    try:
      lock.execute("BEGIN EXCLUSIVE")
      second = env.produce(_events(35, seed=3))
      support.wait_for(
        lambda: "database is locked); retrying" in p.output,
        timeout=60,
        what="the pipeline to retry the locked sink",
      )
      p.kill()  # SIGKILL while the sink is retrying
      assert p.proc.returncode == -9
    finally:
      lock.execute("ROLLBACK")
      lock.close()
  assert row_count(env.db) == 40
  env.commits_not_past_sink()  # nothing of the 35 unwritten was committed
  after_kill = env.committed()
  assert sum(v or 0 for v in after_kill.values()) == 40, after_kill

  restart = env.batch()
  _assert_clean_exit(restart)
  assert_exactly_once(env.db, first + second)
  assert row_count(env.db) == 75
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (3) 130 events: one batch of 100 and the 30 left flushed


def test_130_events_make_a_full_batch_and_a_flushed_rest(env, make_topic):
  env.sensor = make_topic(1, "sensor1")
  env.meter = make_topic(1, "meter1")
  # all 130 in the middle of the last whole 60 s window: one window, never ahead of the
  # clock (see test_events_ahead_of_the_clock_do_not_fail_the_run), never late (300 s)
  window_mid = math.floor(time.time() / 60) * 60 - 30.0
  events = list(EventFactory(4).events(130, meter_ratio=0.0, start=window_mid, spacing_s=0.0))
  produced = env.produce(events)
  assert {(t, p) for t, p, _ in produced} == {(env.sensor, 0)}
  p = env.batch("--num_shards=1", "--batch_size=100")
  _assert_clean_exit(p)
  assert_exactly_once(env.db, produced)
  assert len(query(env.db, "SELECT 1 FROM sensor_readings")) == 130
  assert p.summary_batches() == 2, p.tail()
  assert "batches:        2 (1 full of 100 rows; 1 partial: the last rows" in p.output
  _assert_committed_equals_end(env)


# FnApiRunner (Beam 2.77) keeps a processing-time timer scheduled even after it was
# cleared, and fails a run that ends with one pending; GroupIntoBatches' buffering timer,
# set by events stamped ahead of the wall clock, triggered it. Bounded reads (batch and
# local rounds) therefore run GroupIntoBatches without a buffering timer.
def test_events_ahead_of_the_clock_do_not_fail_the_run(env):
  ahead = time.time() + 120.0  # a sensor whose clock runs two minutes fast
  produced = env.produce(EventFactory(9).events(30, meter_ratio=0.0, start=ahead, spacing_s=0.0))
  p = env.batch()
  assert "time-pending" not in p.output, p.tail()
  _assert_clean_exit(p)
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (4) the sink fails during the final flush


@pytest.mark.timeout(150)
def test_sink_failing_in_the_final_flush_commits_nothing_past_it(env):
  produced = env.produce(_events(60, seed=5))
  store = SqliteStore(str(env.db))  # the file and its tables exist; the test holds the write lock
  store.open()
  store.close()
  lock = sqlite3.connect(env.db, isolation_level=None, timeout=30)
  try:
    lock.execute("BEGIN EXCLUSIVE")
    failed = env.batch("--sink_retry_deadline_secs=3", timeout=90)
    assert failed.proc.returncode not in (0, None), failed.tail()
    assert "FAILED" in failed.output and "database is locked" in failed.output, failed.tail()
  finally:
    lock.execute("ROLLBACK")
    lock.close()
  assert row_count(env.db) == 0
  c = env.commits_not_past_sink()
  assert all(v in (None, 0) for v in c.values()), c  # nothing written -> nothing committed

  rerun = env.batch()
  _assert_clean_exit(rerun)
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (5) SIGKILL at random moments while events stream in


@pytest.mark.timeout(150)
@both_runners
def test_sigkill_at_random_moments_while_producing_loses_nothing(env):
  rng = random.Random()
  # Each run is killed a random time after it has started writing: early in its first
  # round, mid-stream, and later with a backlog behind it.
  extra = [rng.uniform(0.0, 0.5), rng.uniform(0.5, 1.5), rng.uniform(1.5, 3.0)]
  producer = BackgroundProducer(env.bs, env.sensor, env.meter, rate=500, bad_ratio=0.02).start()
  try:
    for cycle, delay in enumerate(extra):
      before = row_count(env.db)
      with env.pipeline() as p:
        support.wait_for(
          lambda before=before: row_count(env.db) > before or not p.alive(),
          timeout=60,
          interval=0.05,
          what=f"cycle {cycle}: the restarted pipeline writing",
        )
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and p.alive():
          time.sleep(0.02)
        assert p.alive(), f"cycle {cycle}: exited early:\n{p.tail()}"
        p.kill()
      # nothing committed past the sink, and the sink never shrinks
      env.commits_not_past_sink()
      assert row_count(env.db) > before
      print(
        f"cycle {cycle}: killed {delay:.2f}s after it wrote; rows {before} -> "
        f"{row_count(env.db)}, produced {producer.count()}, committed {env.committed()}"
      )
  finally:
    produced = producer.stop()
  assert produced and sum(env.ends().values()) == len(produced)

  with env.pipeline() as p:
    support.wait_for(
      lambda: row_count(env.db) >= len(produced) or not p.alive(),
      timeout=60,
      interval=0.5,
      what=f"the sink to catch up with {len(produced)} events",
    )
    assert p.alive(), p.tail()
    p.terminate()
    assert p.wait(60) == 0, p.tail()
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (6) drain while the producer is still writing


@pytest.mark.timeout(150)
@both_runners
def test_drain_while_producing_commits_only_what_is_written(env):
  producer = BackgroundProducer(
    env.bs, env.sensor, env.meter, rate=500, bad_ratio=0.02, seed=17
  ).start()
  try:
    with env.pipeline() as p:
      support.wait_for(
        lambda: row_count(env.db) >= 500 or not p.alive(),
        timeout=60,
        what="the sink to write while the producer runs",
      )
      assert p.alive(), p.tail()
      produced_at_drain = producer.count()
      p.terminate()
      assert p.wait(60) == 0, p.tail()
      assert producer.count() > produced_at_drain  # the producer was still writing
  finally:
    produced = producer.stop()

  c = env.commits_not_past_sink()
  sink = {(t, pt): contiguous_frontier(env.db, t, pt) for (t, pt) in c}
  rows = row_count(env.db)
  # no holes: every partition's rows are exactly [0, frontier)
  assert rows == sum(sink.values()), (rows, sink)
  # everything the drained run read is written (it is the only run), and the drain
  # committed all of it
  assert p.summary_read() == rows, p.tail()
  assert p.summary_written() == rows, p.tail()
  assert rows >= produced_at_drain * 0.5
  assert {k: v for k, v in c.items() if sink[k]} == {k: v for k, v in sink.items() if v}, (c, sink)

  rest = env.batch()
  _assert_clean_exit(rest)
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (7) batch twice


def test_batch_twice_second_run_writes_nothing(env):
  produced = env.produce(_events(80, seed=7))
  first = env.batch()
  _assert_clean_exit(first)
  assert "finished" in first.output
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)
  snapshot = query(
    env.db,
    "SELECT kafka_topic, kafka_partition, kafka_offset, written_at "
    "FROM sensor_readings UNION ALL SELECT kafka_topic, kafka_partition, "
    "kafka_offset, written_at FROM meter_readings ORDER BY 1, 2, 3",
  )
  assert len(snapshot) == 80

  second = env.batch()
  _assert_clean_exit(second)
  assert "rows written:   0" in second.output, second.tail()
  assert (
    query(
      env.db,
      "SELECT kafka_topic, kafka_partition, kafka_offset, written_at "
      "FROM sensor_readings UNION ALL SELECT kafka_topic, kafka_partition, "
      "kafka_offset, written_at FROM meter_readings ORDER BY 1, 2, 3",
    )
    == snapshot
  )
  _assert_committed_equals_end(env)


def test_batch_in_small_rounds_stops_at_the_end_offsets_of_its_start(env):
  """Rounds of at most 28 records (7 per partition) while a producer keeps writing: many rounds,
  each committing; the run ends at the end offsets it saw when it started instead of
  chasing the producer, and what it wrote is exactly the offsets below its commits."""
  initial = env.produce(_events(90, seed=21))
  late = BackgroundProducer(env.bs, env.sensor, env.meter, rate=100.0).start()
  try:
    p = env.batch("--round_max_records=28")  # 7 per partition
  finally:
    later = late.stop()
  _assert_clean_exit(p)
  assert p.output.count("Pipeline finished") == 1
  committed = env.committed()
  assert sum(committed.values()) >= len(initial)  # at least what was there before it started
  assert row_count(env.db) < len(initial) + len(later)  # it stopped; the producer went on
  produced = list(initial) + list(later)
  below = [(t, q, o) for t, q, o in produced if o < (committed[(t, q)] or 0)]
  assert_exactly_once(env.db, below)  # every offset below the commits, once; nothing else
  assert p.summary_read() == len(below)


def test_a_small_first_round_then_the_rest_without_a_gap_or_a_duplicate(env):
  """5,000 events over 4 partitions with the default --round_max_records: the first round
  reads 500 per partition (2,000 records), the next one the rest, so the run commits twice
  (the plan itself: test_runtime_units); the second round starts at the first one's commit:
  every offset stored once, none skipped at the boundary."""
  produced = env.produce(_events(5000, seed=23))
  p = env.batch()
  _assert_clean_exit(p)
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)
  assert p.summary_read() == len(produced)


def test_two_local_workers_share_the_partitions_and_lose_nothing(env):
  """--local_workers=2: a batch run, then a streaming run drained with SIGTERM while a
  producer writes; every offset written once, committed never past the sink, = end."""
  first = env.produce(_events(120, seed=31))
  p = env.batch("--local_workers=2")
  _assert_clean_exit(p)
  assert "All 2 workers finished" in p.output, p.tail()
  assert_exactly_once(env.db, first)
  _assert_committed_equals_end(env)

  producer = BackgroundProducer(env.bs, env.sensor, env.meter, rate=300.0).start()
  try:
    with Pipeline(
      env.bs, env.sensor, env.meter, env.group, env.dir, "--local_workers=2", mode="local"
    ) as s:
      wait_for(lambda: row_count(env.db) > len(first) + 50, timeout=60, what="rows while streaming")
      later = producer.stop()
      wait_for(
        lambda: row_count(env.db) >= len(first) + len(later),
        timeout=60,
        what="the workers to catch up",
      )
      assert_commits_not_past_sink(env.bs, env.group, env.db, env.sensor, env.meter)
      s.terminate()
      assert s.wait(timeout=60) == 0, s.tail()
  finally:
    producer.stop()
  assert "All 2 workers drained" in s.output, s.tail()
  assert_exactly_once(env.db, list(first) + list(later))
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (8) malformed input and late events


def test_malformed_events_are_dead_lettered_and_late_events_kept(env):
  now = time.time()
  f = EventFactory(8)
  bad = [f.bad(now, kind) for kind in BAD_KINDS]
  good = [f.sensor(now), f.meter(now)]
  bad_offsets = env.produce(bad)
  good_offsets = env.produce(good)
  late_sensor = f.sensor(now - 7200)  # event time two hours before its Kafka timestamp
  late_meter = f.meter(now - 7200)
  kafka_ms = int(now * 1000)
  late_offsets = env.produce([late_sensor, late_meter], timestamp_ms=kafka_ms)

  p = env.batch("--allowed_lateness_secs=60", "--window_size_secs=60")
  _assert_clean_exit(p)
  assert_exactly_once(env.db, bad_offsets + good_offsets + late_offsets)

  dead = {
    tuple(r[:3]): r[3:]
    for r in query(
      env.db,
      "SELECT kafka_topic, kafka_partition, kafka_offset, reason, error, stage, raw_value, "
      "raw_encoding, truncated, raw_size, raw_sha256 FROM dead_letters",
    )
  }
  assert len(dead) == len(BAD_KINDS)
  for kind, event, coords in zip(BAD_KINDS, bad, bad_offsets):
    reason, error, stage, raw, encoding, truncated, size, sha = dead[coords]
    assert (reason, stage) == (kind, "parse") and error.startswith(f"{kind}: "), (kind, error)
    raw = decode_raw_value(raw, encoding)
    assert raw == event.value if not truncated else event.value.startswith(raw), kind
    assert (size, sha) == (len(event.value), hashlib.sha256(event.value).hexdigest())
  for kind in BAD_KINDS:
    assert f"{kind}=1" in p.output, p.tail()  # the summary counts every reason

  ((s_late, s_time),) = query(
    env.db,
    "SELECT is_late, event_time FROM sensor_readings "
    "WHERE kafka_topic=? AND kafka_partition=? AND kafka_offset=?",
    late_offsets[0],
  )
  ((m_late,),) = query(
    env.db,
    "SELECT is_late FROM meter_readings WHERE kafka_topic=? AND "
    "kafka_partition=? AND kafka_offset=?",
    late_offsets[1],
  )
  assert (s_late, m_late) == (1, 1)
  expected = json.loads(late_sensor.value)["timestamp"]
  assert dt.datetime.fromisoformat(s_time.replace("Z", "+00:00")) == dt.datetime.fromisoformat(
    expected
  )
  on_time = query(
    env.db,
    "SELECT is_late FROM sensor_readings WHERE kafka_topic=? AND "
    "kafka_partition=? AND kafka_offset=?",
    good_offsets[0],
  )
  assert on_time == [(0,)]
  _assert_committed_equals_end(env)


# ---------------------------------------------------------------------------
# (9) Prism refuses bounded runs


def test_prism_refuses_a_batch_run(env):
  produced = env.produce(_events(10, seed=10))
  p = run_to_end(env.bs, env.sensor, env.meter, env.group, env.dir, runner="PrismRunner")
  assert p.proc.returncode == 2, p.tail()
  assert "runs only unbounded streaming" in p.output, p.tail()
  assert row_count(env.db) == 0 and all(v is None for v in env.committed().values())
  assert produced


def test_prism_commits_a_quiet_stream_without_waiting_for_a_drain(env):
  """Streaming on Prism commits from a processing-time timer: once the rows are written,
  the committed offsets reach the end offsets while the pipeline still runs."""
  produced = env.produce(_events(40, seed=41))
  with Pipeline(
    env.bs,
    env.sensor,
    env.meter,
    env.group,
    env.dir,
    "--commit_interval_secs=1",
    runner="PrismRunner",
  ) as p:
    wait_for(
      lambda: row_count(env.db) >= len(produced) or not p.alive(), timeout=90, what="the rows"
    )
    wait_for(
      lambda: env.committed() == env.ends() or not p.alive(),
      timeout=30,
      what="the commit of a quiet stream",
    )
    assert p.alive(), p.tail()  # committed before any drain
    p.terminate()
    assert p.wait(timeout=60) == 0, p.tail()
  assert_exactly_once(env.db, produced)
  _assert_committed_equals_end(env)
