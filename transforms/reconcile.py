"""SkipStored: the start-up reconciliation between the Kafka read and parsing.

Before a run (or a round) hands a partition's records on, it asks the sink which
offsets of that partition at or above the first one it sees are stored already, in
any table (``Store.stored_offsets``). Those records are not written again: they are
acked (so ``CommitOffsets`` moves over them) and dropped. A replay a minute or a
month later, with any consumer group, then writes nothing twice, whatever the
sink's own de-duplication window (BigQuery has none past its insertId minute).

The query runs lazily, per partition per DoFn instance, over a window of
``window_offsets`` offsets from the first record it sees; it runs again when a record
falls outside that window (the read moved past it, or a retried bundle starts below
it), so memory and each query stay bounded however far a replay goes. Offsets written
after a query are not in its set: those are new records, or the retry of a bundle whose
writes the store absorbs itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from transforms import arguments
from transforms.acks import Ack
from transforms.kafka.records import KafkaRecord, RecordBatch
from transforms.retry import with_retries
from transforms.sinks.base import Store

_LOGGER = logging.getLogger(__name__)

ACKS_TAG = "acks"


class _SkipStoredFn(beam.DoFn):
  def __init__(self, store: Store, retry_deadline_s: float, window_offsets: int):
    self._store_template = store
    self._retry_deadline_s = retry_deadline_s
    self._window = window_offsets
    self._skipped = Metrics.counter(self.__class__, "records_already_stored")
    self._queries = Metrics.counter(self.__class__, "reconciliation_queries")
    self._store = None
    self._known: dict = {}  # (topic, partition) -> (from, until, frozenset of stored offsets)

  def setup(self):
    self._store = self._store_template
    with_retries(
      self._store.open,
      self._store.is_transient,
      deadline_s=self._retry_deadline_s,
      what="opening the sink for reconciliation",
    )

  def start_bundle(self):
    self._open_acks: dict = {}  # (topic, partition) -> [start, end) of skipped records, unsent
    self._last_seen: dict = {}  # (topic, partition) -> timestamp of its last skipped record

  def _stored(self, topic: str, partition: int, offset: int) -> frozenset:
    known = self._known.get((topic, partition))
    if known is not None and known[0] <= offset < known[1]:
      return known[2]
    until = offset + self._window
    stored = frozenset(
      with_retries(
        lambda: self._store.stored_offsets(topic, partition, offset, until),
        self._store.is_transient,
        deadline_s=self._retry_deadline_s,
        what=f"reconciling {topic}-{partition}",
      )
    )
    self._queries.inc()
    if stored:
      _LOGGER.info(
        "%s-%d: %d offsets in [%d, %d) are stored already; they are skipped and acked",
        topic,
        partition,
        len(stored),
        offset,
        until,
      )
    self._known[(topic, partition)] = (offset, until, stored)
    return stored

  def process(self, element, timestamp=beam.DoFn.TimestampParam) -> Iterable:
    """A record, or a poll's batch of one partition's records (a list, passed on as one)."""
    batched = isinstance(element, list)
    records = element if batched else (element,)
    if self._none_stored(records):
      yield from self._close_span(records[0])
      yield element
      return
    kept = []
    for record in records:
      if record.offset not in self._stored(record.topic, record.partition, record.offset):
        yield from self._close_span(record)
        kept.append(record)
      else:
        yield from self._skip(record, timestamp)
    if kept:
      yield RecordBatch(kept) if batched else kept[0]

  def _none_stored(self, records) -> bool:
    """True when no record of the batch (one partition, offsets ascending) is stored."""
    first, last = records[0], records[-1]
    if (first.topic, first.partition) != (last.topic, last.partition):
      return False
    if self._stored(first.topic, first.partition, first.offset):
      return False
    return last.offset < self._known[(first.topic, first.partition)][1]

  def _close_span(self, record: KafkaRecord) -> Iterable:
    """A record goes on: the span of skipped records before it is acked."""
    ack = self._open_acks.pop((record.topic, record.partition), None)
    if ack is not None:
      yield beam.pvalue.TaggedOutput(ACKS_TAG, Ack(record.topic, record.partition, *ack))

  def _skip(self, record: KafkaRecord, timestamp) -> Iterable:
    key = (record.topic, record.partition)
    self._skipped.inc()
    self._last_seen[key] = timestamp
    span = self._open_acks.get(key)
    if span is not None and span[1] == record.covers_from:
      self._open_acks[key] = (span[0], record.offset + 1)
    else:
      if span is not None:
        yield beam.pvalue.TaggedOutput(ACKS_TAG, Ack(record.topic, record.partition, *span))
      self._open_acks[key] = (record.covers_from, record.offset + 1)

  def finish_bundle(self) -> Iterable[WindowedValue]:
    # Stamped like the last record they cover (the reader's watermark holds it back).
    for (topic, partition), span in self._open_acks.items():
      yield beam.pvalue.TaggedOutput(
        ACKS_TAG,
        WindowedValue(
          Ack(topic, partition, *span), self._last_seen[(topic, partition)], (GlobalWindow(),)
        ),
      )
    self._open_acks = {}

  def teardown(self):
    if self._store is not None:
      self._store.close()
      self._store = None


class SkipStored(beam.PTransform):
  """PCollection[KafkaRecord] -> (records not stored yet, Acks of the ones that are).

  Takes the reader's poll batches (``ReadFromKafka(batched=True)``) too: a batch leaves
  as a batch of the records not stored yet (as it came when none is, the common case).

  Returns a tuple ``(records, acks)``; flatten ``acks`` into ``CommitOffsets``' acks.
  """

  def __init__(
    self,
    store: Store,
    *,
    retry_deadline_s: float = 60.0,
    window_offsets: int = 100_000,
    label: str | None = None,
  ):
    super().__init__(label)
    arguments.above("sink_retry_deadline_secs", retry_deadline_s, 0)
    if window_offsets < 1:
      raise ValueError(f"window_offsets must be >= 1, got {window_offsets}")
    self._fn = _SkipStoredFn(store, retry_deadline_s, window_offsets)

  def expand(self, records):
    out = records | "SkipStoredRecords" >> beam.ParDo(self._fn).with_outputs(
      ACKS_TAG, main="records"
    )
    out.records.element_type = records.element_type  # a RecordBatch stays one
    return out.records, out[ACKS_TAG]
