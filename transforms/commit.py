"""CommitOffsets: commit to the consumer group only what the sink has made durable.

Per topic-partition (the key), it keeps the resolved start offset of the read
(the base, from ``PartitionRead``) and the acked ranges, merges them, and commits
the base at once (so a start at ``latest`` or a timestamp holds for the next round
and restart, and an unchanged offset is refreshed before the broker expires it),
then the first offset not yet covered by a contiguous run from the base. A range that
arrives ahead of a hole waits for the hole to be acked. Commits happen at most
every ``interval_s`` per partition, when acks arrive, and once more when the
input ends: at the end of a bounded run or a drain, when the watermark reaches
the end of the global window. With ``flush_timer`` (unbounded reads on runners
that stream: Prism, Flink, Dataflow) a processing-time timer also commits the
last acks of a stream that went quiet. Bounded reads go without it: the local
FnApiRunner fails a pipeline that ends with one pending, and their end commits
anyway.

It emits ``Committed`` records. A commit that keeps failing fails the bundle:
offsets are never committed ahead of the sink, and a failed commit only means a
replay that the idempotent sink absorbs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import Timestamp

from transforms import arguments
from transforms.kafka.client import (
  ClientConfig,
  check_client_config,
  lease_consumer,
  release_consumer,
)
from transforms.kafka.records import PartitionRead
from transforms.retry import with_retries
from transforms.rows import PartitionKey

_LOGGER = logging.getLogger(__name__)

CommitFn = Callable[[str, int, int], None]  # (topic, partition, next offset) -> None


@dataclass(frozen=True)
class Committed:
  topic: str
  partition: int
  offset: int  # the next offset the group will read


@dataclass
class PartitionProgress:
  """Merge state of one partition. ``frontier``: every offset below it is durable."""

  base: int | None = None
  frontier: int | None = None
  committed: int | None = None
  pending: list = field(default_factory=list)  # sorted, disjoint [start, end) above frontier

  def add_start(self, start: int) -> None:
    if self.base is None:
      self.base = self.frontier = start
      self._advance()

  def add_ack(self, start: int, end: int) -> None:
    if self.frontier is not None and end <= self.frontier:
      return  # a replay of what is already covered
    self.pending.append((start, end))
    self.pending.sort()
    merged = []
    for s, e in self.pending:
      if merged and s <= merged[-1][1]:
        merged[-1] = (merged[-1][0], max(merged[-1][1], e))
      else:
        merged.append((s, e))
    self.pending = merged
    self._advance()

  def _advance(self) -> None:
    if self.frontier is None:
      return
    while self.pending and self.pending[0][0] <= self.frontier:
      self.frontier = max(self.frontier, self.pending.pop(0)[1])

  def to_commit(self) -> int | None:
    """The offset to commit now: the resolved start first, then the frontier when it moves.

    The start is committed even before anything is acked: a read that started at
    ``latest``, a timestamp or explicit offsets and found nothing must leave that
    position in the group, or the next round or restart (which starts from the
    committed offsets) would fall back to the log start and replay history. It is
    never ahead of the sink: nothing below it belongs to this read.
    """
    if self.frontier is None:
      return None
    if self.committed is None or self.frontier > self.committed:
      return self.frontier
    return None


PROGRESS = ReadModifyWriteStateSpec("progress", PickleCoder())
FINAL = TimerSpec("final", TimeDomain.WATERMARK)
FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)


class _CommitOffsetsFn(beam.DoFn):
  def __init__(
    self,
    consumer_config: ClientConfig,
    interval_s: float,
    retry_deadline_s: float,
    flush_timer: bool,
    recommit_s: float = 3600.0,
    commit_fn: CommitFn | None = None,
  ):
    self._commit_fn = commit_fn
    self._flush_timer = flush_timer
    self._recommit_s = recommit_s
    self._config = dict(consumer_config)
    self._interval_s = interval_s
    self._retry_deadline_s = retry_deadline_s
    self._commits = Metrics.counter(self.__class__, "commits")
    self._consumer = None
    self._last_commit: dict = {}

  def _get_consumer(self):
    if self._consumer is None:
      self._consumer = lease_consumer(self._config)
    return self._consumer

  def teardown(self):
    if self._consumer is not None:
      release_consumer(self._config, self._consumer)
      self._consumer = None

  def process(
    self,
    element,
    state=beam.DoFn.StateParam(PROGRESS),
    final=beam.DoFn.TimerParam(FINAL),
    flush=beam.DoFn.TimerParam(FLUSH),
  ):
    key, value = element
    p = state.read() or PartitionProgress()
    if p.base is None and p.committed is None and not p.pending:
      final.set(GlobalWindow().max_timestamp())
    if isinstance(value, PartitionRead):
      p.add_start(value.start_offset)
    else:
      p.add_ack(value.start, value.end)
    now = time.monotonic()
    offset = p.to_commit()
    if offset is not None:
      if now - self._last_commit.get(key, 0.0) >= self._interval_s:
        yield self._commit(key, p, offset)
        self._last_commit[key] = now
      elif self._flush_timer:
        # A stream that goes quiet: commit what is durable once the interval is over.
        flush.set(Timestamp.of(time.time() + self._interval_s))
    elif p.committed is not None and now - self._last_commit.get(key, now) >= self._recommit_s:
      # Unchanged for an interval (the reader's idle heartbeats get here): commit it again,
      # or the broker's offsets.retention.minutes expires it. No timer: a pending one
      # would keep a drained pipeline from finishing.
      yield self._commit(key, p, p.committed)
      self._last_commit[key] = now
    state.write(p)

  @on_timer(FLUSH)
  def on_flush(self, key=beam.DoFn.KeyParam, state=beam.DoFn.StateParam(PROGRESS)):
    yield from self._commit_pending(key, state)

  @on_timer(FINAL)
  def on_final(self, key=beam.DoFn.KeyParam, state=beam.DoFn.StateParam(PROGRESS)):
    yield from self._commit_pending(key, state)

  def _commit_pending(self, key, state):
    p = state.read()
    if p is None:
      return
    offset = p.to_commit()
    if offset is not None:
      yield self._commit(key, p, offset)
      self._last_commit[key] = time.monotonic()
      state.write(p)

  def _commit(self, key: PartitionKey, p: PartitionProgress, offset: int) -> Committed:
    from kafka import TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    topic, partition = key
    if self._commit_fn is not None:
      self._commit_fn(topic, partition, offset)
    else:
      tp = TopicPartition(topic, partition)
      consumer = self._get_consumer()
      with_retries(
        lambda: consumer.commit(offsets={tp: OffsetAndMetadata(offset, "", -1)}),
        lambda e: isinstance(e, KafkaError),
        deadline_s=self._retry_deadline_s,
        what=f"committing {topic}-{partition}@{offset}",
      )
    p.committed = offset
    self._commits.inc()
    _LOGGER.debug("committed %s-%s at %d", topic, partition, offset)
    return Committed(topic, partition, offset)


def _keyed(value) -> tuple[PartitionKey, Any]:
  return ((value.topic, value.partition), value)


class CommitOffsets(beam.PTransform):
  """(PCollection[PartitionRead], PCollection[Ack][, PCollection[Ack]]) -> PCollection[Committed].

  The optional third input: offsets acked without the sink (the reader's empty ranges).
  ``commit_fn(topic, partition, offset)``: a picklable callable that commits instead of
  the group's Kafka consumer (tests that check the commit order without a broker).
  """

  def __init__(
    self,
    consumer_config: ClientConfig,
    *,
    interval_s: float = 5.0,
    retry_deadline_s: float = 60.0,
    flush_timer: bool = False,
    recommit_s: float = 3600.0,
    commit_fn: CommitFn | None = None,
  ):
    super().__init__()
    check_client_config(consumer_config, needs_group=True)
    arguments.above("commit_interval_secs", interval_s, 0)
    self._fn = _CommitOffsetsFn(
      consumer_config, interval_s, retry_deadline_s, flush_timer, recommit_s, commit_fn
    )

  def expand(self, inputs):
    starts, acks, *covered = inputs
    acks = acks | "AcksToGlobalWindow" >> beam.WindowInto(GlobalWindows())
    covered = [
      c | f"CoveredToGlobalWindow{i}" >> beam.WindowInto(GlobalWindows())
      for i, c in enumerate(covered)
    ]
    return (
      (starts, acks, *covered)
      | "StartsAndAcks" >> beam.Flatten()
      | "KeyByPartition" >> beam.Map(_keyed).with_output_types(tuple[PartitionKey, Any])
      | "Commit" >> beam.ParDo(self._fn)
    )
