"""The local plan and its loop: bounded rounds on FnApiRunner, or one pipeline (Prism).

Streaming (``local``) runs in rounds: each round is the same pipeline reading from the
committed offsets to the end offsets it sees when it starts; it writes, commits and ends,
and the next round starts as soon as there is new data (or the re-commit interval is
over). ``batch`` runs rounds towards the end offsets seen when it started. Why rounds:
FnApiRunner hands a stage's output to the next stage only when the stage has finished,
so one endless pipeline there would hold every record in memory and write nothing until
a drain (see runners/local.py).

A round that fails because Kafka stopped answering is retried with exponential backoff
and jitter (tenacity) until it answers again; it starts from the committed offsets, and
what it wrote twice is absorbed by the idempotent sink. Each finished pipeline's Beam
metrics are added to the run's ``Totals`` (runners/report.py).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics.monitoring_infos import consolidate
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner, fn_runner, worker_handlers
from kafka.errors import KafkaError
from tenacity import Retrying, retry_if_exception, wait_exponential_jitter

from pipelines import smartgrid
from pipelines.options import SmartGridOptions
from runners import prism
from runners.kafka_view import KafkaView, is_first_worker, is_kafka_error
from runners.report import Totals, short
from transforms.kafka.client import close_idle_consumers
from transforms.kafka.drain import DrainSignal
from transforms.kafka.positions import StartPosition, StopPosition, parse_start

_LOGGER = logging.getLogger(__name__)


def make_runner() -> FnApiRunner:
  # The embedded SDK worker weighs every cached state value with objsize; for
  # GroupIntoBatches' per-element bag appends that is ~40% of the pipeline's
  # time (measured, README "Batching"). Its state lives in this process either way: no cache.
  worker_handlers.STATE_CACHE_SIZE_MB = 0
  # FnApiRunner merges each bundle's metrics into the stage's with a lazy generator over
  # the previous merge: after ~1,000 bundles (the reader checkpoints often) reading the
  # result's metrics raises RecursionError, and the launcher reads them every round.
  # Merging eagerly does the same work, one level deep.
  fn_runner.consolidate_monitoring_infos = _consolidate_now
  return FnApiRunner()


def _consolidate_now(infos):
  return list(consolidate(infos))


def build(
  options: PipelineOptions,
  drain_file: Path,
  *,
  start: StartPosition | None = None,
  stop: StopPosition | None = None,
) -> beam.Pipeline:
  # Prism options (runners/prism.py) name their runner; everything else runs on FnApiRunner.
  p = beam.Pipeline(runner=None if prism.is_prism(options) else make_runner(), options=options)
  smartgrid.build(
    p,
    options.view_as(SmartGridOptions),
    drain_file=str(drain_file),
    start=start,
    stop=stop,
    skip_missing_topics=True,
  )
  return p


# The first round's size in records, and the factor each later round grows by, up to
# --round_max_records: 500, then 50,000, then the cap (1,000,000 by default). Why small
# first: nothing is committed before a round ends, and a big round takes seconds; one of
# 500 ends a fraction of a second after its first poll, so the first offset is committed
# 1.5-1.8 s after start (2,000 first: 1.9-2.3 s; 200,000 first: 8-9 s). Why then so steep:
# each round costs CPU (building and starting the pipeline: ~0.5 s before the Kafka clients
# were pooled), measured over 200,000 events (1 worker, CPU µs per event): one round
# 48.2-48.5; doubling from 2,000 (7 rounds) 61.4-65.7; x10 (3 rounds) 51.1-51.7; x100
# (2 rounds) 47.8-50.5. Memory does not grow with a round (the batches are
# written in the stage that reads them: pipelines/smartgrid.py): 400,000 events in rounds of
# 100,000 peaked at 230 MB, in one round of 400,000 at 217 MB.
FIRST_ROUND_RECORDS = 500
ROUND_GROWTH = 100


def round_records(done: int, cap: int) -> int:
  """The records the round after ``done`` successful ones may read in all: 500, then
  50,000, 5,000,000 ... and never more than ``cap`` (--round_max_records)."""
  # min(done, 8): past any cap already; no huge integers in long streaming runs.
  return max(1, min(cap, FIRST_ROUND_RECORDS * ROUND_GROWTH ** min(done, 8)))


class Rounds:
  """The FnApiRunner plan: one bounded pipeline after another.

  Streaming: each round reads from the committed offsets to the end offsets it sees.
  Batch: each round reads from the committed offsets towards the end offsets seen when
  the run started, and the run ends when it reaches them (or a round finds nothing
  left). Either way a round reads at most ``round_records`` (500 records at first,
  then 100 times more, up to ``--round_max_records``; an equal share per partition), because
  a round commits only when it ends: FnApiRunner runs one stage after the other, and the
  commit is the last stage. Memory stays flat within a round: only the leftovers of
  GroupIntoBatches and the acks wait between stages.
  """

  def __init__(self, o: SmartGridOptions, view: KafkaView, batch: bool):
    self._o = o
    self._view = view
    self.target = None
    if batch:
      end, _ = view.offsets()
      self.target = tuple(sorted((tp.topic, tp.partition, e) for tp, e in end.items()))
    self.count = 0  # rounds that succeeded

  def stop(self) -> StopPosition:
    records = round_records(self.count, self._o.round_max_records)
    cap = max(1, -(-records // (len(self._view.tps) or 1)))  # a share each
    if self.target is None:
      return StopPosition("end", max_records=cap)
    return StopPosition("offsets", offsets=self.target, max_records=cap)

  def start(self) -> StartPosition:
    # The first round starts where --start says; later ones where the last one committed
    # (which includes each partition's resolved start: CommitOffsets commits it).
    return parse_start(self._o.start if self.count == 0 else "committed")

  def batch_done(self) -> bool:
    _, committed = self._view.offsets()
    targets = {(t, p): offset for t, p, offset in self.target}
    return all(
      (committed.get(tp) or 0) >= targets.get((tp.topic, tp.partition), 0) for tp in committed
    )


class DrainedInOutage(Exception):
  """A drain was requested while Kafka did not answer: the run ends with what it committed."""


class Launcher:
  """Runs the plan in the pipeline thread: rounds (streaming or batch) or one pipeline."""

  IDLE_CHECK_S = 0.5

  def __init__(
    self,
    options: PipelineOptions,
    view: KafkaView,
    drain_file: Path,
    plan: Rounds | None,
    totals: Totals,
  ):
    self.options = options
    self.o = options.view_as(SmartGridOptions)
    self.view = view
    self.drain_file = drain_file
    self.plan = plan
    self.totals = totals
    self._speak = is_first_worker(self.o)

  def draining(self) -> bool:
    return self.drain_file.exists()

  def run(self) -> None:
    try:
      if self.plan is None:
        self._with_kafka_retries(self._run_pipeline)
      elif self.plan.target is None:
        self._stream()
      else:
        self._batch()
    except DrainedInOutage:
      _LOGGER.warning("drained while Kafka was unreachable: nothing unwritten was committed")

  def _run_pipeline(
    self, start: StartPosition | None = None, stop: StopPosition | None = None
  ) -> dict | None:
    """One pipeline to its end; its Beam metrics join the run's totals (and are returned)."""
    result = build(self.options, self.drain_file, start=start, stop=stop).run()
    self.totals.watch(result)
    try:
      result.wait_until_finish()
    finally:
      figures = self.totals.add_result(result)
      del result
      # The round's pipeline, runner and bundles are garbage now, much of it in cycles;
      # with the thresholds of local.tune_process a full collection would hardly ever come on
      # its own, so it comes here, once per round: memory stays flat over rounds.
      gc.collect()
    return figures

  def _with_kafka_retries(self, fn: Callable):
    """fn(), retried with backoff while it fails because of Kafka (until a drain)."""

    def before_sleep(state):
      self.view.mark_down()
      # The failed round's clients may be waiting out a long reconnect backoff: the next
      # round opens new ones rather than take them from the pool.
      close_idle_consumers()
      _LOGGER.warning(
        "Kafka unreachable (%s); retrying in %.1fs",
        short(state.outcome.exception()),
        state.next_action.sleep,
      )

    retrying = Retrying(
      retry=retry_if_exception(is_kafka_error),
      reraise=True,
      wait=wait_exponential_jitter(initial=1, max=30),
      stop=lambda _state: self.draining(),
      # A drain during an outage ends the wait at once, not after the backoff.
      sleep=lambda seconds: DrainSignal(str(self.drain_file)).wait(seconds),
      before_sleep=before_sleep,
    )
    try:
      return retrying(fn)
    except Exception as e:  # noqa: BLE001 - a drain during an outage ends the run cleanly
      if self.draining() and is_kafka_error(e):
        raise DrainedInOutage() from e
      raise

  def _round(self) -> dict | None:
    figures = self._with_kafka_retries(
      lambda: self._run_pipeline(self.plan.start(), self.plan.stop())
    )
    self.plan.count += 1
    return figures

  def _batch(self) -> None:
    while not self.draining():
      figures = self._round()
      # A round that read nothing ends the run; one whose figures are unknown does not.
      if figures is not None and not sum(figures["read"].values()):
        return
      if self._with_kafka_retries(self.plan.batch_done):
        return

  def _stream(self) -> None:
    last_round = None
    while not self.draining():
      if not self._topics_ready():
        continue
      if last_round is not None and not self._due(last_round):
        continue
      self._round()
      last_round = time.monotonic()

  def _topics_ready(self) -> bool:
    before = set(self.view.missing)
    try:
      missing = self.view.refresh()
    except KafkaError:
      self._sleep(self._backoff())
      return False
    if self._speak and before - set(missing):
      _LOGGER.info("topic(s) %s now exist: reading them", ", ".join(sorted(before - set(missing))))
    if not self.view.tps:
      self._sleep(self.IDLE_CHECK_S * 2)
      return False
    return True

  def _due(self, last_round: float) -> bool:
    """Whether a round is due: new data, or the re-commit interval is over. Blocks a while."""
    deadline = time.monotonic() + self.o.poll_timeout_ms / 1000.0
    while not self.draining():
      if time.monotonic() - last_round >= self.o.recommit_interval_secs:
        return True
      try:
        end, committed = self.view.offsets()
      except KafkaError:
        self._sleep(self._backoff())
        return False
      if any(e > (committed.get(tp) or 0) for tp, e in end.items()):
        return True
      if time.monotonic() >= deadline:
        return False
      self._sleep(self.IDLE_CHECK_S)
    return False

  def _backoff(self) -> float:
    down = time.time() - (self.view.down_since or time.time())
    return min(30.0, 1.0 + down / 4)

  def _sleep(self, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not self.draining() and time.monotonic() < deadline:
      time.sleep(min(0.2, seconds))
