"""The runtime's promises against the real broker: start positions that hold across
rounds and restarts, offsets that no record covers (transaction markers) committed,
so an idle run stays idle, and offset gaps that stop the run or are recorded.

Every test ends offset by offset: each produced (topic, partition, offset) the run was
meant to read is in the sink exactly once, nothing else is, and the group's committed
offsets equal the end offsets (never ahead of the sink).
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from pipelines.produce import EventFactory
from tests import support
from tests.pipeline_support import (PipelineEnv, assert_exactly_once, prism_binary,
                                    produce_transactions, row_count)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

streaming_runners = pytest.mark.parametrize("runner", [
    "FnApiRunner",
    pytest.param("PrismRunner", marks=pytest.mark.skipif(
        prism_binary() is None,
        reason="Prism is not built: ./run_pipeline.sh prism build (or set PRISM_BIN)")),
])


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


def _drain(p) -> None:
  assert p.alive(), p.tail()
  p.terminate()
  assert p.wait(90) == 0, p.tail()


# ---------------------------------------------------------------------------
# Start positions on topics with history


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
    support.wait_for(lambda: row_count(env.db) >= len(new) or not p.alive(), timeout=60,
                     what="the new events in the sink")
    _wait_committed_at_end(env)
    more = env.produce(_events(20, seed=3))  # a later round, still nothing of the history
    support.wait_for(lambda: row_count(env.db) >= len(new) + len(more) or not p.alive(),
                     timeout=60, what="the later events in the sink")
    _drain(p)
  assert_exactly_once(env.db, new + more)
  env.assert_committed_equals_end()
  last = env.produce(_events(10, seed=4))
  rerun = env.batch()  # restart from the committed offsets: never the history
  assert rerun.proc.returncode == 0, rerun.tail()
  assert_exactly_once(env.db, new + more + last)
  env.assert_committed_equals_end()
  assert not set(history) & {r for r in new + more + last}


@pytest.mark.parametrize("start", ["latest", "timestamp", "earliest", "committed"])
def test_batch_start_positions_read_the_same_records_as_streaming(env, start):
  old_ms = int(time.time() * 1000) - 3_600_000
  history = env.produce(_events(40, seed=5), timestamp_ms=old_ms)
  recent = env.produce(_events(25, seed=6))
  flag = {"latest": "--start=latest", "timestamp": f"--start={_iso(old_ms + 60_000)}",
          "earliest": "--start=earliest", "committed": "--start=committed"}[start]
  first = env.batch(flag)
  assert first.proc.returncode == 0, first.tail()
  expected = {"latest": [], "timestamp": recent}.get(start, history + recent)
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
    support.wait_for(lambda: row_count(env.db) >= len(kept) or not p.alive(), timeout=90,
                     what="the committed transactions in the sink")
    _wait_committed_at_end(env)  # the trailing commit/abort markers are committed too
    rounds = p.output.count("reading offsets")
    # Idle: no new round may start (each logs its partitions' 'reading offsets').
    time.sleep(5)  # an observation window, not a synchronization: nothing may happen
    assert p.output.count("reading offsets") == rounds, p.tail()
    more = produce_transactions(env.bs, env.sensor, env.meter, _events(30, seed=9))
    support.wait_for(lambda: row_count(env.db) >= len(kept) + len(more) or not p.alive(),
                     timeout=60, what="the later transactions")
    _wait_committed_at_end(env)
    _drain(p)
  assert_exactly_once(env.db, kept + more)
  env.assert_committed_equals_end()
