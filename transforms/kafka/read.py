"""ReadFromKafka: a splittable DoFn over kafka-python, one restriction per topic-partition.

    records = p | ReadFromKafka("127.0.0.1:9092", ["sensors"], group_id="g", stop="end")

Pipeline shape: ``Create([topics]) | ResolvePartitions | ReadPartitions``.
Building the graph needs no broker: ``ResolvePartitions`` lists the partitions,
keeps this process's shard of them and resolves start and stop offsets when the
pipeline runs (an unknown topic fails the run there, naming it). Partitions added
to a topic after that are not read until the next run.
``ResolvePartitions`` and ``ReadPartitions`` are public so that a pipeline can also
hand the resolved starts to ``CommitOffsets``.

The reader commits nothing. Its output records carry ``covers_from`` (see
``KafkaRecord``), their Kafka timestamp as element timestamp, and a watermark
(see ``watermark.py``). Offsets it moves past without a record to cover them leave
on a second output, ``gaps`` (``gaps.py``): trailing transaction markers (acked as
they are), offsets deleted before they were read (``on_offset_gap``: fail, or
record them), and an idle partition's heartbeat. Its consumer has no reset policy
(``auto_offset_reset='none'``): a position that no longer exists is an error to
decide on, never a silent jump to the log start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.utils.windowed_value import create as create_windowed_value

from transforms import telemetry
from transforms.kafka import config as kafka_config
from transforms.kafka.client import (
  ClientConfig,
  KafkaUnavailableError,
  check_client_config,
  lease_consumer,
  release_consumer,
)
from transforms.kafka.client import new_consumer as _new_consumer
from transforms.kafka.drain import DrainSignal
from transforms.kafka.gaps import (
  EMPTY,
  GAP_POLICIES,
  OFFSET_GAP,
  OffsetGap,
  OffsetGapError,
  gap_message,
)
from transforms.kafka.positions import StartPosition, StopPosition, parse_start, parse_stop, resolve
from transforms.kafka.records import KafkaRecord, PartitionRead, RecordBatch
from transforms.kafka.tracking import UNBOUNDED, EndOffsets, KafkaRestrictionProvider
from transforms.kafka.watermark import DEFAULT_IDLE_LAG_MS, KafkaWatermarkEstimatorProvider

_LOGGER = logging.getLogger(__name__)


SHORT_POLL_MS = 50
GAPS_TAG = "gaps"
IDLE_HEARTBEAT_S = 60.0
RESOLVE_RETRY_S = 120.0


class UnknownTopicError(KafkaUnavailableError):
  """A topic the read names does not exist (never retried: waiting would not create it)."""


def list_partitions(
  consumer, servers: Sequence[str], topics: Sequence[str], skip_missing: bool = False
) -> list[tuple[str, int]]:
  """[(topic, partition)] of the given topics through an open consumer; a clear error
  for a missing topic (``skip_missing``: only those of the topics that exist)."""
  existing = consumer.topics()
  missing = [t for t in topics if t not in existing]
  if skip_missing:
    topics = [t for t in topics if t in existing]
  elif missing:
    raise UnknownTopicError(f"topic(s) not found on {','.join(servers)}: {', '.join(missing)}")
  return [(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]


def discover_partitions(
  config: Mapping[str, Any], topics: Sequence[str], skip_missing: bool = False
) -> list[tuple[str, int]]:
  """[(topic, partition)] of the given topics (opens and closes a consumer)."""
  consumer = _new_consumer(config)
  try:
    return list_partitions(consumer, config["bootstrap_servers"], topics, skip_missing)
  finally:
    consumer.close()


def shard_of(
  partitions: Sequence[tuple[str, int]], shard: tuple[int, int] | None
) -> list[tuple[str, int]]:
  """Shard (i, n) of the partitions: every n-th of the sorted pairs from the i-th on."""
  return list(partitions) if shard is None else sorted(partitions)[shard[0] :: shard[1]]


def _is_outage(e: BaseException) -> bool:
  from kafka.errors import KafkaError

  return isinstance(e, (KafkaError, KafkaUnavailableError)) and not isinstance(e, UnknownTopicError)


class _ResolvePartitionsFn(beam.DoFn):
  """topics -> a ``PartitionRead`` per partition of this shard, offsets resolved.

  Lists the partitions when the pipeline runs (not when it is built), so a graph
  builds without a broker and each run reads the partitions that exist then.
  """

  def __init__(
    self,
    config,
    start: StartPosition,
    stop: StopPosition,
    on_offset_gap: str,
    shard: tuple[int, int] | None,
    skip_missing: bool,
    retry_s: float,
    drain_file: str | None = None,
  ):
    self._drain_file = drain_file
    self._config = config
    self._start = start
    self._stop = stop
    self._on_offset_gap = on_offset_gap
    self._shard = shard
    self._skip_missing = skip_missing
    self._retry_s = retry_s

  def _attempt(self, topics: Sequence[str]) -> list[PartitionRead]:
    # Leased, and given back at once: the committer, with the same config, takes it next.
    consumer, ok = lease_consumer(self._config), False
    try:
      partitions = list_partitions(
        consumer, self._config["bootstrap_servers"], topics, self._skip_missing
      )
      reads = resolve(
        consumer, shard_of(partitions, self._shard), self._start, self._stop, self._on_offset_gap
      )
      ok = True
      return reads
    finally:
      release_consumer(self._config, consumer, reusable=ok)

  def process(self, topics: Sequence[str]) -> Iterable[PartitionRead]:
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

    # A broker that does not answer ("Failed to get offsets by timestamps") is waited for a
    # while; past that, or at a drain, the bundle fails (the local launcher retries the
    # round or, drained, ends the run; remote runners retry the bundle). An offset gap or a
    # missing topic is a decision, not an outage: never retried.
    drain = DrainSignal(self._drain_file)
    reads = Retrying(
      retry=retry_if_exception(_is_outage),
      wait=wait_exponential_jitter(initial=1, max=15),
      stop=stop_after_delay(self._retry_s) | (lambda _state: drain.requested()),
      sleep=lambda seconds: drain.wait(seconds),
      reraise=True,
    )(self._attempt, topics)
    for read in reads:
      # DEBUG: the local launcher resolves every partition again at each round.
      _LOGGER.debug(
        "Kafka %s-%d: reading offsets [%d, %s)",
        read.topic,
        read.partition,
        read.start_offset,
        "end" if read.stop_offset is None else read.stop_offset,
      )
      yield read


class ResolvePartitions(beam.PTransform):
  """topics -> ``PartitionRead`` per partition, with concrete start/stop offsets.

  The partitions are listed from the broker when the pipeline runs; ``shard`` (i, n)
  keeps every n-th of the sorted (topic, partition) pairs from the i-th on;
  ``skip_missing`` reads only the topics that exist then (else a missing topic fails
  the run, naming it). Brokers that do not answer are retried for ``retry_s``.
  """

  def __init__(
    self,
    topics: Sequence[str],
    config: Mapping[str, Any],
    start: StartPosition,
    stop: StopPosition,
    on_offset_gap: str = "fail",
    *,
    shard: tuple[int, int] | None = None,
    skip_missing: bool = False,
    retry_s: float = RESOLVE_RETRY_S,
    drain_file: str | None = None,
  ):
    super().__init__()
    self._topics = tuple(topics)
    self._fn = _ResolvePartitionsFn(
      dict(config), start, stop, on_offset_gap, shard, skip_missing, retry_s, drain_file
    )

  def expand(self, pbegin):
    return (
      pbegin
      | "ListTopics" >> beam.Create([self._topics])
      | "ResolveOffsets" >> beam.ParDo(self._fn)
    )


_AGAIN = object()  # a step's answer: poll again
_DONE = object()  # a step's answer: the call is over (restriction ended or checkpointed)


@dataclass
class _Cursor:
  """Where one call of the reader is in its restriction."""

  tp: Any  # kafka.TopicPartition
  stop: int  # exclusive; lowered by a drain
  stop_ts: int | None
  covers_from: int  # the next offset to account for
  windows: tuple
  deadline: float  # monotonic time by which the call checkpoints
  emitted: int = 0


def _finish(tracker) -> None:
  """Ends the restriction at the current position (see KafkaOffsetTracker.finish)."""
  tracker.try_claim(tracker.current_restriction().stop)


def _kept(records, stop: int, stop_ts: int | None) -> int:
  """How many of a poll's records (offsets increasing) come before the first one at or
  past the stop offset or the stop timestamp."""
  if records[-1].offset < stop and stop_ts is None:
    return len(records)  # the usual case: no per-record check
  for i, rec in enumerate(records):
    if rec.offset >= stop or (stop_ts is not None and rec.timestamp >= stop_ts):
      return i
  return len(records)


class _ReadPartitionFn(beam.DoFn):
  """Reads one partition's restriction; checkpoints when idle or after a budget of work."""

  def __init__(
    self,
    config: Mapping[str, Any],
    poll_timeout_ms: int,
    max_records_per_call: int,
    max_seconds_per_call: float,
    drain_file: str | None,
    on_offset_gap: str = "fail",
    batched: bool = False,
  ):
    self._batched = batched
    # No reset policy: a position that no longer exists raises OffsetOutOfRangeError
    # instead of jumping silently to the log start (offsets deleted under the reader).
    # No group: the reader positions itself (assign + seek) and never commits, and with a
    # group kafka-python's poll looks up and keeps up the group coordinator (a round trip
    # at each round's first poll, measured ~80 ms of the first commit's 2 s).
    self._config = {**config, "auto_offset_reset": "none", "group_id": None}
    self._on_offset_gap = on_offset_gap
    self._poll_timeout_ms = poll_timeout_ms
    self._max_records = max_records_per_call
    self._max_seconds = max_seconds_per_call
    self._drain_file = drain_file
    self._records = Metrics.counter(self.__class__, "records_read")
    self._gaps = Metrics.counter(self.__class__, "offset_gaps")
    self._consumer = None
    self._assigned = None  # the TopicPartition the consumer is assigned to
    self._next_offset = None  # where the consumer will read next, if known
    self._last_block = 0.0  # when an unbounded read last blocked in poll
    self._drain_stops: dict = {}  # (topic, partition) -> end offset seen when the drain was noticed
    self._heartbeats: dict = {}  # (topic, partition) -> when its last idle heartbeat left

  def setup(self):
    self._drain = DrainSignal(self._drain_file)

  def teardown(self):
    if self._consumer is not None:
      release_consumer(self._config, self._consumer)
      self._consumer = None
      self._assigned = None

  def _position(self, tp, offset: int):
    """The shared consumer, assigned to tp and positioned at offset."""
    if self._consumer is None:
      self._consumer = lease_consumer(self._config)
    if self._assigned != tp:
      self._load_metadata(tp.topic)
      self._consumer.assign([tp])
      self._assigned = tp
      self._next_offset = None
    if self._next_offset != offset:
      self._consumer.seek(tp, offset)
      self._next_offset = offset
    return self._consumer

  def _load_metadata(self, topic: str) -> None:
    """Loads the topic's metadata (one request, once per topic and consumer): a first
    poll without the partition's leader has nothing to fetch and sleeps retry_backoff_ms
    (100 ms) inside kafka-python. Only a speed-up: in an outage (KafkaConnectionError at
    once) the polls wait it out as they would have."""
    from kafka.errors import KafkaError

    try:
      self._consumer.partitions_for_topic(topic)
    except KafkaError as e:
      _LOGGER.debug("Kafka %s: metadata not loaded before the first poll: %s", topic, e)

  def process(
    self,
    element: PartitionRead,
    window=beam.DoFn.WindowParam,
    tracker=beam.DoFn.RestrictionParam(KafkaRestrictionProvider()),
    watermark=beam.DoFn.WatermarkEstimatorParam(
      KafkaWatermarkEstimatorProvider(DEFAULT_IDLE_LAG_MS)
    ),
  ):
    return self._read(element, tracker, watermark, window)

  def _cover_empty(self, tp, covers_from: int, position: int, tracker):
    """Emits an EMPTY gap for [covers_from, position) and claims it.

    Returns the new covers_from, or None when the runner split the range below it.
    """
    if position <= covers_from:
      return covers_from
    if not tracker.try_claim(position - 1):
      return None
    yield TaggedOutput(
      GAPS_TAG,
      WindowedValue(
        OffsetGap(tp.topic, tp.partition, covers_from, position, EMPTY),
        Timestamp.now(),
        (GlobalWindow(),),
      ),
    )
    return position

  def _nothing_polled(self, tp, covers_from: int, stop: int, stop_ts, tracker, watermark):
    """A poll returned nothing: cover what was skipped, then finish or checkpoint."""
    consumer = self._consumer
    position = consumer.position(tp)
    self._next_offset = position
    # Offsets moved past without a record (transaction markers, aborted or compacted
    # records): acked as they are, so an idle partition's commit reaches its end.
    covers_from = yield from self._cover_empty(tp, covers_from, min(position, stop), tracker)
    if covers_from is None:
      return
    if position >= stop:
      # What is left of a bounded range holds no returnable record (markers, aborts).
      _finish(tracker)
      return
    highwater = consumer.highwater(tp)
    EndOffsets.record(tp.topic, tp.partition, highwater)
    now_ms = int(time.time() * 1000)
    if highwater is not None and position >= highwater:
      watermark.observe_idle(now_ms)
      yield from self._heartbeat(tp, covers_from)
      if stop_ts is not None and now_ms >= stop_ts + DEFAULT_IDLE_LAG_MS:
        _finish(tracker)
        return
    tracker.defer_remainder()

  def _heartbeat(self, tp, position: int):
    """About once every IDLE_HEARTBEAT_S of an idle partition: an empty range at its position."""
    now = time.monotonic()
    last = self._heartbeats.setdefault((tp.topic, tp.partition), now)
    if now - last >= IDLE_HEARTBEAT_S:
      self._heartbeats[(tp.topic, tp.partition)] = now
      yield TaggedOutput(
        GAPS_TAG,
        WindowedValue(
          OffsetGap(tp.topic, tp.partition, position, position, EMPTY),
          Timestamp.now(),
          (GlobalWindow(),),
        ),
      )

  def _skip_gap(self, tp, covers_from: int, stop: int, tracker):
    """The reader's position no longer exists: fail, or record the gap and go on.

    Returns the offset the read goes on from (the log start), or None when the
    runner split the range below it. A position past the end (the topic was
    recreated under the reader) always fails: a restart with ``skip`` reads the new
    log from its start (``gaps.check_start``).
    """
    consumer = self._consumer
    log_start = consumer.beginning_offsets([tp])[tp]
    log_end = consumer.end_offsets([tp])[tp]
    self._next_offset = None
    if log_start <= covers_from <= log_end:  # a stale answer: the position exists
      self._position(tp, covers_from)
      return covers_from
    message = gap_message(tp.topic, tp.partition, covers_from, log_start, log_end)
    if self._on_offset_gap != "skip" or covers_from > log_end:
      raise OffsetGapError(message)
    resume = min(log_start, stop)
    if not tracker.try_claim(resume - 1):
      return None
    _LOGGER.warning(
      "%s (--on_offset_gap=skip: recorded as a dead letter at offset %d)", message, covers_from
    )
    self._gaps.inc()
    yield TaggedOutput(
      GAPS_TAG,
      WindowedValue(
        OffsetGap(tp.topic, tp.partition, covers_from, resume, OFFSET_GAP, message),
        Timestamp.now(),
        (GlobalWindow(),),
      ),
    )
    self._position(tp, resume)
    return resume

  def _count(self, topic: str, n: int) -> None:
    """Counts n records read from topic (once per poll batch)."""
    self._records.inc(n)
    telemetry.count_read(topic, n)

  def _poll_wait_ms(self, *, bounded: bool, first: bool) -> int:
    """How long a poll may block.

    A bounded read knows records are there: the full timeout. An unbounded read
    blocks only on its first poll and only if no other restriction of this worker
    blocked within the last timeout: restrictions run one after another, so an
    idle worker waits about one timeout per round (little CPU) instead of one per
    partition, and a busy one hardly waits at all.
    """
    if bounded:
      return self._poll_timeout_ms
    now = time.monotonic()
    if first and now - self._last_block >= self._poll_timeout_ms / 1000.0:
      self._last_block = now
      return self._poll_timeout_ms
    return min(SHORT_POLL_MS, self._poll_timeout_ms)

  def _read(self, element: PartitionRead, tracker, watermark, window=None):
    """One call on a restriction: poll, emit, and end it, or checkpoint its remainder."""
    from kafka import TopicPartition

    restriction = tracker.current_restriction()
    c = _Cursor(
      TopicPartition(element.topic, element.partition),
      restriction.stop,
      element.stop_timestamp_ms,
      restriction.start,
      (GlobalWindow() if window is None else window,),
      time.monotonic() + self._max_seconds,
    )
    if c.covers_from >= c.stop:
      _finish(tracker)
      return
    self._position(c.tp, c.covers_from)
    while True:
      if self._drain_reached(c):
        _finish(tracker)
        return
      records = yield from self._poll(c, tracker)
      if records is _AGAIN:
        continue
      if records is _DONE:
        return
      if not records:
        yield from self._nothing_polled(c.tp, c.covers_from, c.stop, c.stop_ts, tracker, watermark)
        return
      if not (yield from self._emit(records, c, tracker, watermark)):
        return
      if self._end_of_batch(c, tracker):
        return

  def _drain_reached(self, c: _Cursor) -> bool:
    """Whether a local drain ends the read here (it lowers ``c.stop`` when noticed).

    A drain reads what was written before it (up to the end offsets seen when it is
    noticed: the last stable offset under read_committed), then ends.
    """
    if not self._drain.requested():
      return False
    key = (c.tp.topic, c.tp.partition)
    if key not in self._drain_stops:
      self._drain_stops[key] = self._consumer.end_offsets([c.tp])[c.tp]
    c.stop = min(c.stop, self._drain_stops[key])
    return c.covers_from >= c.stop

  def _poll(self, c: _Cursor, tracker):
    """One poll: its records of c.tp, ``_AGAIN`` after a recorded offset gap, or ``_DONE``."""
    from kafka.errors import OffsetOutOfRangeError

    wait_ms = self._poll_wait_ms(bounded=c.stop != UNBOUNDED, first=c.emitted == 0)
    try:
      return self._consumer.poll(timeout_ms=wait_ms).get(c.tp)
    except OffsetOutOfRangeError:
      c.covers_from = yield from self._skip_gap(c.tp, c.covers_from, c.stop, tracker)
      if c.covers_from is None:
        return _DONE
      if c.covers_from >= c.stop:
        _finish(tracker)
        return _DONE
      return _AGAIN

  def _emit(self, records, c: _Cursor, tracker, watermark):
    """Claims and emits a poll's records; returns False when the restriction ended in it
    (its stop offset or timestamp reached, or the runner split it below a record).

    One claim per poll: the offset of the last record this read keeps. An
    ``OffsetRestrictionTracker`` claim of an offset covers the offsets before it (a
    split is cut after the last claimed offset), so every record emitted here is in
    this call's restriction, and a split while the records leave cuts after them.
    """
    kept = _kept(records, c.stop, c.stop_ts)
    if kept and not tracker.try_claim(records[kept - 1].offset):
      # The runner split the range between this call's last claim and that offset: the
      # records below the split are still this restriction's and no one else reads them
      # (the residual starts at the split); the failed claim ended the restriction.
      kept = _kept(records, tracker.current_restriction().stop, None)
      self._next_offset = None  # the records buffered past the split are not ours
      yield from self._emit_records(records, kept, c, watermark)
      return False
    yield from self._emit_records(records, kept, c, watermark)
    if kept < len(records):  # a record at the stop offset or timestamp ends the read
      self._next_offset = None
      _finish(tracker)
      return False
    self._next_offset = c.covers_from
    c.emitted += kept
    return True

  def _emit_records(self, records, n: int, c: _Cursor, watermark):
    """Emits the first n records (claimed), advances ``c.covers_from``, observes the
    watermark and counts them: once per poll, not per record. Batched, the n records leave
    as one list, stamped with the earliest of their timestamps."""
    if not n:
      return
    topic, partition = c.tp.topic, c.tp.partition
    covers_from = c.covers_from
    # tuple.__new__ skips the NamedTuple's Python-level __new__.
    new_record = tuple.__new__
    batch = RecordBatch()
    for rec in records if n == len(records) else records[:n]:
      offset, headers = rec.offset, rec.headers
      batch.append(
        new_record(
          KafkaRecord,
          (
            topic,
            partition,
            offset,
            covers_from,
            rec.key,
            rec.value,
            rec.timestamp,
            tuple(headers) if headers else (),
          ),
        )
      )
      covers_from = offset + 1
    c.covers_from = covers_from
    yield from self._outputs(batch, c.windows)
    watermark.observe_record(max(r.timestamp_ms for r in batch))
    self._count(topic, n)

  def _outputs(self, batch: list, windows) -> Iterable[WindowedValue]:
    # In the input's window: a TimestampedValue would make the runner re-run the window
    # assignment per element. windowed_value.create is Beam's own fast path (exact micros).
    if self._batched:
      yield create_windowed_value(batch, min(r.timestamp_ms for r in batch) * 1000, windows)
      return
    for record in batch:
      yield create_windowed_value(record, record.timestamp_ms * 1000, windows)

  def _end_of_batch(self, c: _Cursor, tracker) -> bool:
    """After a poll's records: ends the restriction or checkpoints it (True), or reads on."""
    highwater = self._consumer.highwater(c.tp)
    EndOffsets.record(c.tp.topic, c.tp.partition, highwater)
    if c.covers_from >= c.stop:
      _finish(tracker)
      return True
    # Caught up: checkpoint rather than wait in poll for a trickle of new records, which
    # would hold this worker (and the partitions queued behind it) for max_seconds_per_call.
    caught_up = highwater is not None and c.covers_from >= highwater
    if caught_up or c.emitted >= self._max_records or time.monotonic() >= c.deadline:
      tracker.defer_remainder()
      return True
    return False


class _ReadUnboundedPartitionFn(_ReadPartitionFn):
  """The same reader; its output PCollection is unbounded (streaming on Dataflow)."""

  @beam.DoFn.unbounded_per_element()
  def process(
    self,
    element: PartitionRead,
    window=beam.DoFn.WindowParam,
    tracker=beam.DoFn.RestrictionParam(KafkaRestrictionProvider()),
    watermark=beam.DoFn.WatermarkEstimatorParam(
      KafkaWatermarkEstimatorProvider(DEFAULT_IDLE_LAG_MS)
    ),
  ):
    return self._read(element, tracker, watermark, window)


class ReadPartitions(beam.PTransform):
  """PCollection[PartitionRead] -> PCollection[KafkaRecord] (and the ``OffsetGap``s);
  ``batched=True``: PCollection[list[KafkaRecord]], one list per poll of a partition.

  ``bounded=True`` when every read has a stop offset (``stop='end'``): the output is
  then a bounded PCollection (batch); otherwise it is unbounded (streaming).
  ``with_gaps=True`` returns ``(records, gaps)``: the offsets no record covers
  (``gaps.py``), which a pipeline that commits must ack too.
  """

  def __init__(
    self,
    config: Mapping[str, Any],
    *,
    poll_timeout_ms: int = 1000,
    max_records_per_call: int = 20_000,
    max_seconds_per_call: float = 5.0,
    drain_file: str | None = None,
    bounded: bool = False,
    on_offset_gap: str = "fail",
    with_gaps: bool = False,
    batched: bool = False,
  ):
    super().__init__()
    if poll_timeout_ms <= 0 or max_records_per_call <= 0 or max_seconds_per_call <= 0:
      raise ValueError("poll_timeout_ms, max_records_per_call and max_seconds_per_call must be > 0")
    if on_offset_gap not in GAP_POLICIES:
      raise ValueError(f"on_offset_gap must be one of {GAP_POLICIES}, got {on_offset_gap!r}")
    fn_class = _ReadPartitionFn if bounded else _ReadUnboundedPartitionFn
    self._fn = fn_class(
      config,
      poll_timeout_ms,
      max_records_per_call,
      max_seconds_per_call,
      drain_file,
      on_offset_gap,
      batched,
    )
    self._with_gaps, self._batched = with_gaps, batched

  def expand(self, reads):
    out = reads | "ReadRecords" >> beam.ParDo(self._fn).with_outputs(GAPS_TAG, main="records")
    if self._batched:
      out.records.element_type = RecordBatch  # its coder estimates sizes without encoding
    return (out.records, out[GAPS_TAG]) if self._with_gaps else out.records


class ReadFromKafka(beam.PTransform):
  """Reads Kafka topics into a PCollection of ``KafkaRecord``.

  Args:
    bootstrap_servers: 'host:port[,host:port...]'.
    topics: a topic name or a list of them.
    group_id: the consumer group whose committed offsets ``start='committed'`` reads
      (the reader itself never commits; see ``CommitOffsets``). Without a group,
      'committed' means 'earliest'.
    start: 'committed' | 'earliest' | 'latest' | timestamp | {(topic, partition): offset}.
    stop: None (unbounded) | 'end' (end offsets when the read starts) | timestamp.
    consumer_config: extra kafka-python KafkaConsumer settings (security and the rest).
    poll_timeout_ms: how long an idle read blocks in poll before it checkpoints.
    max_records_per_call, max_seconds_per_call: the work one call does before it
      checkpoints, so downstream stages and other partitions get their turn.
    drain_file: local drain signal (see ``drain.py``).
    shard: (i, n) reads only every n-th of the sorted (topic, partition) pairs from the
      i-th on: one of n processes that share the topics.
    skip_missing_topics: read only the topics that exist when the pipeline runs
      (default: a missing topic fails the run, naming it).
    with_partition_reads: the output is then (records, the resolved ``PartitionRead``
      of every partition, the ``OffsetGap``s), for ``CommitOffsets``: its starting
      points, and the offsets no record covers.
    on_offset_gap: 'fail' (default) or 'skip': what a start or position that no longer
      exists (retention, a recreated topic) does (``gaps.py``).
    batched: emit each poll's records of a partition as one element, a ``list`` of
      ``KafkaRecord`` in offset order stamped with the earliest of their timestamps,
      instead of one element per record. Every downstream step then runs once per poll
      instead of once per record (``SkipStored`` and ``ParseEvents`` take either shape).
  """

  def __init__(
    self,
    bootstrap_servers: str,
    topics: str | Sequence[str],
    *,
    group_id: str | None = None,
    start: Any = "committed",
    stop: Any = None,
    consumer_config: Mapping[str, Any] | None = None,
    poll_timeout_ms: int = 1000,
    max_records_per_call: int = 20_000,
    max_seconds_per_call: float = 5.0,
    drain_file: str | None = None,
    shard: tuple[int, int] | None = None,
    with_partition_reads: bool = False,
    on_offset_gap: str = "fail",
    skip_missing_topics: bool = False,
    resolve_retry_s: float = RESOLVE_RETRY_S,
    batched: bool = False,
  ):
    super().__init__()
    self._resolve_retry_s = resolve_retry_s
    self._skip_missing = skip_missing_topics
    if shard is not None and not 0 <= shard[0] < shard[1]:
      raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    self.shard = shard
    self._with_reads = with_partition_reads
    self.topics = [topics] if isinstance(topics, str) else list(topics)
    if not self.topics or not all(isinstance(t, str) and t for t in self.topics):
      raise ValueError(f"topics must be one or more topic names, got {topics!r}")
    self.config = kafka_config.consumer_config(bootstrap_servers, group_id, consumer_config)
    self.start = parse_start(start)
    if self.start.kind == "committed" and group_id is None:
      _LOGGER.info(
        "ReadFromKafka: no group_id, so start='committed' reads from the earliest offsets"
      )
      self.start = StartPosition("earliest")
    self.stop = parse_stop(stop)
    self._drain_file = drain_file
    self._read = ReadPartitions(
      self.config,
      poll_timeout_ms=poll_timeout_ms,
      max_records_per_call=max_records_per_call,
      max_seconds_per_call=max_seconds_per_call,
      drain_file=drain_file,
      bounded=self.stop.is_bounded,
      on_offset_gap=on_offset_gap,
      with_gaps=with_partition_reads,
      batched=batched,
    )
    self._on_offset_gap = on_offset_gap

  @classmethod
  def from_client_config(
    cls, client_config: ClientConfig, topics: str | Sequence[str], **kwargs
  ) -> ReadFromKafka:
    """The read for a finished client config: ``consumer_config``'s shape, the one
    ``CommitOffsets`` and the launcher's Kafka view take too, so a pipeline builds its
    Kafka settings once. ``kwargs``: the constructor's other keywords."""
    check_client_config(client_config)
    overrides = {
      k: v for k, v in client_config.items() if k not in ("bootstrap_servers", "group_id")
    }
    return cls(
      ",".join(client_config["bootstrap_servers"]),
      topics,
      group_id=client_config.get("group_id"),
      consumer_config=overrides,
      **kwargs,
    )

  def partitions(self) -> list[tuple[str, int]]:
    """The partitions this read would get now (asks the broker; the pipeline itself
    lists them when it runs)."""
    return shard_of(discover_partitions(self.config, self.topics, self._skip_missing), self.shard)

  def expand(self, pbegin):
    reads = pbegin | "ResolvePartitions" >> ResolvePartitions(
      self.topics,
      self.config,
      self.start,
      self.stop,
      self._on_offset_gap,
      shard=self.shard,
      skip_missing=self._skip_missing,
      retry_s=self._resolve_retry_s,
      drain_file=self._drain_file,
    )
    if self._with_reads:
      records, gaps = reads | "ReadPartitions" >> self._read
      return records, reads, gaps
    return reads | "ReadPartitions" >> self._read

  def display_data(self):
    return {
      "topics": ",".join(self.topics),
      "start": self.start.kind,
      "stop": self.stop.kind,
      "consumer_config": str(kafka_config.redact(self.config)),
    }
