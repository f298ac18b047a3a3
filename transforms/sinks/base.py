"""WriteBatches: the sink contract shared by every store.

Takes ``(key, [row, ...])`` batches (key ``(table, shard)``, see ``transforms.rows``),
buffers rows per table, writes them idempotently (unique on topic, partition, offset) when the
buffer is full and in ``finish_bundle``, and only then emits ``Ack``s for them, each in
the event-time window of the batch it acknowledges (keyed streams: the global window).
Transient store errors are retried with exponential backoff and jitter up to a
deadline; after that the bundle fails, so nothing unwritten is acked and the
runner (or a restart) replays it. Rows the store rejects for good are written to
``dead_letters`` with the store's error, and acked once that write is durable.

A store with ``keyed_streams`` (BigQuery's Storage Write API) is written instead by a
stateful DoFn keyed by the batch key, in the global window: each batch is written in
``process()`` through ``write_on_streams(table, rows, written_at, streams)``, and the
streams it returns (table -> (stream name, next offset)) go to the key's state, which the
runner commits with the bundle. See ``transforms.sinks.bigquery``.

A ``Store`` is a picklable, unopened connection description with ``open()``,
``close()``, ``is_transient(exc)``, ``write(table, rows, written_at) -> [(row,
error)]`` returning the rows it rejected for good (``write`` must be idempotent),
and ``stored_offsets(topic, partition, from_offset) -> set`` for the start-up
reconciliation (``transforms.reconcile``), ``until_offset`` exclusive.

One row per event_id: a store refuses a row whose event_id it already holds at
other Kafka coordinates (or that an earlier row of the same write carries) with a
``DuplicateEvent`` error. Such a copy is acked (so nothing stalls) and counted
(``duplicate_events`` in the metrics and the summary; ``audit`` finds it by its
event_id), and written nowhere: the old consumer's ``ON CONFLICT (event_id) DO
NOTHING``. It is not a dead letter: nothing is wrong with it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Protocol

import apache_beam as beam
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from transforms import arguments, telemetry
from transforms.acks import Ack, acks_for_rows
from transforms.events import rejected_row_dead_letter
from transforms.retry import with_retries
from transforms.rows import DEAD_LETTERS_TABLE, ROW_TYPES, BatchKey, KeyedRow, key_table
from transforms.timestamps import iso_us

_LOGGER = logging.getLogger(__name__)


class Store(Protocol):
  def open(self) -> None: ...
  def close(self) -> None: ...
  def is_transient(self, exc: BaseException) -> bool: ...
  def write(self, table: str, rows: list, written_at: str) -> list: ...
  def stored_offsets(
    self, topic: str, partition: int, from_offset: int, until_offset: int | None = None
  ) -> set: ...


class DuplicateEvent(str):
  """The error of a row refused because its event_id is stored already (first copy wins)."""


class SinkWriteError(RuntimeError):
  """The store refused even the dead letters: the bundle fails, nothing is acked. (A write
  that keeps failing transiently raises ``transforms.retry.RetriesExhausted``.)"""


def _row_text(table: str, row: tuple) -> str:
  return json.dumps(ROW_TYPES[table].payload(row), ensure_ascii=False, default=str)


def rejected_dead_letter_row(table: str, row: tuple, error: str) -> tuple:
  """A row the store refused for good -> a dead_letters row for the same offset."""
  reason = "duplicate_event" if isinstance(error, DuplicateEvent) else "sink_rejected"
  return rejected_row_dead_letter(
    row,
    _row_text(table, row).encode("utf-8", "surrogatepass"),
    reason,
    f"{reason}: {table}: {error}",
    int(time.time() * 1_000_000),
  )


class _WriteBatchesFn(beam.DoFn):
  def __init__(self, store: Store, flush_rows: int, retry_deadline_s: float, batch_size: int):
    self._store_template = store
    self._batch_size = batch_size
    self._flush_rows = flush_rows
    self._retry_deadline_s = retry_deadline_s
    self._rows_written = Metrics.counter(self.__class__, "rows_written")
    self._rejected = Metrics.counter(self.__class__, "rows_rejected")
    self._duplicates = Metrics.counter(self.__class__, "duplicate_events")
    self._batches = Metrics.counter(self.__class__, "batches")
    self._full_batches = Metrics.counter(self.__class__, "full_batches")
    self._store = None

  def setup(self):
    self._store = self._store_template  # each worker unpickles its own, unopened copy
    with_retries(
      self._store.open,
      self._store.is_transient,
      deadline_s=self._retry_deadline_s,
      what="opening the sink",
    )

  def start_bundle(self):
    self._by_table: dict[str, list] = {}
    self._by_window: dict = {}  # window -> its rows, acked in that window
    self._buffered = 0

  def process(self, batch, window=beam.DoFn.WindowParam):
    key, rows = batch
    table = key_table(key)
    self._by_table.setdefault(table, []).extend(rows)
    self._by_window.setdefault(window, []).extend(rows)
    self._buffered += len(rows)
    self._count_batch(rows)
    if self._buffered >= self._flush_rows:
      yield from self._flush()

  def finish_bundle(self):
    yield from self._flush()

  def _write(self, table: str, rows: list, written_at: str) -> list:
    return with_retries(
      lambda: self._store.write(table, rows, written_at),
      self._store.is_transient,
      deadline_s=self._retry_deadline_s,
      what=f"writing {len(rows)} rows to {table}",
    )

  def _count_rejected(self, table: str, rows: list, rejected: list) -> list:
    """Counts a write's outcome; returns the dead_letters rows for what it refused for good
    (later copies of an event are counted only)."""
    duplicates = 0
    if rejected:
      duplicates = sum(1 for _, error in rejected if isinstance(error, DuplicateEvent))
      if duplicates:
        self._duplicates.inc(duplicates)
        _LOGGER.info(
          "%s: %d later copies of stored events, e.g. %s",
          table,
          duplicates,
          next(e for _, e in rejected if isinstance(e, DuplicateEvent)),
        )
      if len(rejected) > duplicates:
        self._rejected.inc(len(rejected) - duplicates)
        _LOGGER.warning(
          "%s rejected %d rows for good, e.g. %s",
          table,
          len(rejected) - duplicates,
          next(e for _, e in rejected if not isinstance(e, DuplicateEvent)),
        )
    self._rows_written.inc(len(rows) - len(rejected))
    telemetry.count_written(
      table,
      len(rows) - len(rejected),
      len(rejected) - duplicates if rejected else 0,
      duplicates if rejected else 0,
    )
    return [
      rejected_dead_letter_row(table, row, error)
      for row, error in rejected
      if not isinstance(error, DuplicateEvent)
    ]

  def _count_batch(self, rows: list) -> None:
    self._batches.inc()
    full = len(rows) >= self._batch_size
    if full:
      self._full_batches.inc()
    telemetry.count_batch(full)

  def _flush(self) -> Iterable[WindowedValue]:
    if not self._buffered:
      return
    written_at = iso_us(int(time.time() * 1_000_000))
    for table, rows in self._by_table.items():
      dead = self._count_rejected(table, rows, self._write(table, rows, written_at))
      if dead:
        still = self._write(DEAD_LETTERS_TABLE, dead, written_at)
        if still:
          raise SinkWriteError(
            f"the store refused even the dead letters for {table}: {still[0][1]}"
          )
    # Every row is durable now (written, or dead-lettered): ack them.
    by_window = self._by_window
    self._by_table, self._by_window, self._buffered = {}, {}, 0
    for window, rows in by_window.items():
      timestamp = window.max_timestamp()
      for ack in acks_for_rows(rows):
        yield WindowedValue(ack, timestamp, (window,))

  def teardown(self):
    if self._store is not None:
      self._store.close()
      self._store = None


class _JoinKeyBatchesFn(beam.DoFn):
  """Joins the batches of one key within a bundle, up to ``flush_rows`` rows, so the keyed
  writer makes fewer, larger writes (each write costs a look-up query before its append).
  Counts the batches as they came (``batches``, ``full_batches``)."""

  def __init__(self, flush_rows: int, batch_size: int):
    self._flush_rows = flush_rows
    self._batch_size = batch_size
    self._batches = Metrics.counter(self.__class__, "batches")
    self._full_batches = Metrics.counter(self.__class__, "full_batches")

  def start_bundle(self):
    self._by_key: dict[BatchKey, list] = {}
    self._first_at: dict = {}  # key -> earliest timestamp of its buffered batches

  def process(self, batch, timestamp=beam.DoFn.TimestampParam):
    key, rows = batch
    self._batches.inc()
    full = len(rows) >= self._batch_size
    if full:
      self._full_batches.inc()
    telemetry.count_batch(full)
    buffer = self._by_key.setdefault(key, [])
    buffer.extend(rows)
    self._first_at[key] = min(self._first_at.get(key, timestamp), timestamp)
    if len(buffer) >= self._flush_rows:
      del self._by_key[key], self._first_at[key]
      yield key, buffer

  def finish_bundle(self):
    for key, rows in self._by_key.items():
      yield WindowedValue((key, rows), self._first_at[key], (GlobalWindow(),))
    self._by_key, self._first_at = {}, {}


class _WriteOnKeyedStreamsFn(_WriteBatchesFn):
  """Writes each batch in ``process`` on the streams its key holds in state.

  State (per key (table, shard), in the global window): table -> (stream name, next offset),
  for the key's table and for the dead letters of the rows it refuses. It is written only
  after the store confirmed the batch, and the runner commits it with the bundle: a retried
  bundle starts from the offsets of the last committed one (see
  ``BigQueryStore.write_on_streams``). Nothing is buffered across elements, since state
  belongs to one key; acks leave right after their batch's write.
  """

  STREAMS = ReadModifyWriteStateSpec("streams", coders.FastPrimitivesCoder())

  def __init__(self, *args):
    super().__init__(*args)
    self._streams_started = Metrics.counter(self.__class__, "streams_started")

  def process(self, batch, streams_state=beam.DoFn.StateParam(STREAMS)):
    key, rows = batch
    table = key_table(key)
    rows = list(rows)
    streams = dict(streams_state.read() or {})
    before = {t: held[0] for t, held in streams.items()}
    written_at = iso_us(int(time.time() * 1_000_000))
    rejected, streams = self._write_on(table, rows, written_at, streams)
    dead = self._count_rejected(table, rows, rejected)
    if dead:
      still, streams = self._write_on(DEAD_LETTERS_TABLE, dead, written_at, streams)
      if still:
        raise SinkWriteError(f"the store refused even the dead letters for {table}: {still[0][1]}")
    streams_state.write(streams)
    self._streams_started.inc(sum(1 for t, held in streams.items() if before.get(t) != held[0]))
    yield from acks_for_rows(rows)

  def finish_bundle(self):
    return None

  def _write_on(self, table: str, rows: list, written_at: str, streams: dict) -> tuple[list, dict]:
    return with_retries(
      lambda: self._store.write_on_streams(table, rows, written_at, streams),
      self._store.is_transient,
      deadline_s=self._retry_deadline_s,
      what=f"writing {len(rows)} rows to {table}",
    )


class WriteBatches(beam.PTransform):
  """PCollection[((table, shard), [row])] (or a tuple of them) -> PCollection[Ack].

  Where the acks are depends on the store. Most stores (SQLite, streaming inserts) buffer
  rows per bundle and emit each ack in the event-time window of the batch it acknowledges,
  stamped with that window's end (``_WriteBatchesFn._flush``). A store with
  ``keyed_streams`` (BigQuery's Storage Write API) is written by a stateful DoFn keyed by
  the batch key after the batches move to the global window (state is per key and window:
  per-window state would start a stream per key and window), so its acks are in the
  global window. ``CommitOffsets`` moves every ack to the global window either way.
  """

  def __init__(
    self,
    store: Store,
    *,
    flush_rows: int = 1000,
    retry_deadline_s: float = 60.0,
    batch_size: int = 100,
  ):
    super().__init__()
    arguments.at_least("sink_flush_rows", flush_rows, 1)
    arguments.batch_size(batch_size)
    self._keyed = bool(getattr(store, "keyed_streams", False))
    self._flush_rows, self._batch_size = flush_rows, batch_size
    fn_class = _WriteOnKeyedStreamsFn if self._keyed else _WriteBatchesFn
    self._fn = fn_class(store, flush_rows, retry_deadline_s, batch_size)

  def expand(self, batches):
    """``batches``: one PCollection, or a tuple of them. Unkeyed, each is written where it
    is made (a stage of its own per input), so batches that fill while a stage reads are
    written in that stage and never wait, encoded, for the next one; keyed, they are
    flattened into the one stateful writer."""
    inputs = batches if isinstance(batches, tuple) else (batches,)
    if not self._keyed:
      # The output type is declared: Beam's inference of it from the bytecode took ~40 ms a
      # ParDo, paid again for every round the local launcher builds.
      acks = [
        pc
        | ("WriteRows" if i == 0 else f"WriteRows{i}")
        >> beam.ParDo(self._fn).with_output_types(Ack)
        for i, pc in enumerate(inputs)
      ]
      return acks[0] if len(acks) == 1 else acks | "AllAcks" >> beam.Flatten()
    if len(inputs) > 1:
      inputs = (inputs | "AllBatches" >> beam.Flatten(),)
    return (
      inputs[0]
      | "BatchesToGlobalWindow" >> beam.WindowInto(GlobalWindows())
      | "JoinKeyBatches"
      >> beam.ParDo(_JoinKeyBatchesFn(self._flush_rows, self._batch_size)).with_output_types(
        KeyedRow
      )
      | "WriteRowsOnKeyedStreams" >> beam.ParDo(self._fn)
    )
