"""ParseEvents: Kafka records -> keyed, event-time-stamped table rows, and dead letters.

One DoFn does decoding (JSON, or Confluent-framed Avro with ``schema_registry_url``),
validation, event-time stamping, the batching key and (with ``batch_size``) the
filling of batches within the bundle, so a record costs one step before the window.
The common valid JSON event takes a fast path (``transforms.fast_events``: about 2 µs
instead of 11); whatever that path does not take gets the reference rules of
``transforms.events``, so every outcome and reason is theirs.
Every record leaves it exactly once: as a sensor or meter row, or as a dead letter
(reason, raw bytes, Kafka coordinates). Parsing is total: whatever a record holds,
any exception while decoding, validating or building its row becomes a dead letter
(``unparseable`` with the exception type when nothing more specific applies), so no
record can fail a bundle and stall its partition. Late events are kept: an event whose window (plus the allowed
lateness) had closed when it reached Kafka is flagged ``is_late`` and stamped
with its arrival time, so no runner drops it as late data; its row still
carries its event time and event-time window.
"""

from __future__ import annotations

import time
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.typehints.native_type_compatibility import convert_to_beam_type
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms import arguments, telemetry
from transforms.batching import BundleBatcher
from transforms.events import (
  DEAD_LETTER_REASONS,
  MAX_EVENT_BYTES,
  DeadLetter,
  InvalidEvent,
  dead_letter_row,
  describe_exception,
  load_json_object,
  meter_columns,
  meter_from_object,
  sensor_columns,
  sensor_from_object,
)
from transforms.fast_events import meter_head, sensor_head
from transforms.kafka.records import KafkaRecord
from transforms.rows import DEAD_LETTERS_TABLE, METER_TABLE, SENSOR_TABLE, BatchKey, KeyedRow
from transforms.timestamps import iso_us
from transforms.windows import FixedEventWindows

SENSOR, METER = "sensor", "meter"
_GLOBAL = (GlobalWindow(),)
SHARD_BY = ("partition", "id")
DEAD_LETTER_TAG = "dead_letters"
FULL_BATCHES_TAG = "full_batches"
# Longest window: any accepted event time (before 2200) plus one window stays far from
# datetime's year 9999, so no window arithmetic or formatting can overflow.
MAX_WINDOW_SECS = 366 * 86_400


class _ParseEventsFn(beam.DoFn):
  def __init__(
    self,
    topic_kinds: Mapping[str, str],
    window_size_secs: float,
    allowed_lateness_secs: float,
    num_shards: int,
    shard_by: str,
    batch_size: int | None = None,
    schema_registry_url: str | None = None,
  ):
    self._batch_size = batch_size
    self._registry_url = schema_registry_url
    self._window_size_secs = window_size_secs
    self._kinds = dict(topic_kinds)
    self._size_us = int(window_size_secs * 1_000_000)
    self._lateness_us = int(allowed_lateness_secs * 1_000_000)
    self._num_shards = num_shards
    self._by_id = shard_by == "id"
    # One counter per dead-letter reason too ('dead_letters_<reason>'): every path is counted.
    self._counters = {
      name: Metrics.counter(self.__class__, name)
      for name in (
        "sensor_readings",
        "meter_readings",
        "late_events",
        "dead_letters",
        *(f"dead_letters_{reason}" for reason in DEAD_LETTER_REASONS),
      )
    }

  def setup(self):
    self._avro = None
    if self._registry_url:
      from transforms.avro import AvroDecoder  # credentials are read here, on the worker

      self._avro = AvroDecoder(self._registry_url).open()
    self._windows: dict[int, tuple[str, str, int]] = {}
    self._batcher = (
      None
      if self._batch_size is None
      else BundleBatcher(self._batch_size, FixedEventWindows(self._window_size_secs))
    )

  def start_bundle(self):
    self._counts = dict.fromkeys(self._counters, 0)  # Beam counters are bumped per bundle

  def _shard(self, record: KafkaRecord, entity_id: str) -> int:
    if self._by_id:
      return zlib.crc32(entity_id.encode()) % self._num_shards
    return record.partition % self._num_shards

  def _decode(self, value: bytes | None) -> Any:
    if value and value[0] == 0:  # the Confluent wire format's magic byte; JSON never starts so
      if self._avro is None:
        raise InvalidEvent(
          "avro_needs_registry",
          "a Confluent-framed Avro value (magic byte 0, "
          f"schema id {int.from_bytes(value[1:5], 'big')}): run with "
          "--schema_registry_url to decode it",
        )
      if len(value) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversized", f"{len(value)} bytes > {MAX_EVENT_BYTES}")
      record = self._avro.decode(value)
      if not isinstance(record, Mapping):
        raise InvalidEvent(
          "not_object", f"the Avro value is a {type(record).__name__}, not a record"
        )
      return record
    return load_json_object(value)

  def _to_row(self, record: KafkaRecord) -> tuple[str, BatchKey, tuple, int, bool]:
    """A record -> (table, key, row, timestamp µs, is_late); raises for anything that is no row.

    The timestamp is epoch µs, not a ``Timestamp``: a row that leaves in a full batch
    never needs one (``BundleBatcher.add``).
    The fast path (``transforms.fast_events``) takes the common valid JSON event; it
    answers None for anything else, which then gets the reference rules (and their reason).
    """
    topic, value = record.topic, record.value
    kind = self._kinds.get(topic)
    if kind == SENSOR:
      table, event = SENSOR_TABLE, sensor_head(value) or self._sensor_head(value)
    elif kind == METER:
      table, event = METER_TABLE, meter_head(value) or self._meter_head(value)
    else:
      raise InvalidEvent("unknown_topic", f"no event type is configured for topic {topic!r}")
    event_us, head = event
    window_start = event_us - event_us % self._size_us
    window = self._windows.get(window_start) or self._window(window_start)
    arrival_us = record.timestamp_ms * 1000
    is_late = arrival_us > window[2]
    row = (
      *head,
      window[0],
      window[1],
      is_late,
      topic,
      record.partition,
      record.offset,
      record.covers_from,
    )
    key = (table, self._shard(record, head[1]))  # head[1]: the sensor_id / meter_id
    return table, key, row, arrival_us if is_late else event_us, is_late

  def _sensor_head(self, value: bytes | None) -> tuple[int, tuple]:
    """The reference rules (any value, Avro too): (event µs, row columns) or raises."""
    r = sensor_from_object(self._decode(value))
    return r.event_time_us, sensor_columns(r)

  def _meter_head(self, value: bytes | None) -> tuple[int, tuple]:
    r = meter_from_object(self._decode(value))
    return r.event_time_us, meter_columns(r)

  def _window(self, start_us: int) -> tuple[str, str, int]:
    """(window_start, window_end as stored, the last arrival µs that is not late) of a window,
    computed once per window: every row of the window carries the same three."""
    if len(self._windows) >= 1024:
      self._windows.clear()
    end_us = start_us + self._size_us
    window = self._windows[start_us] = (
      iso_us(start_us),
      iso_us(end_us),
      end_us + self._lateness_us,
    )
    return window

  def _dead_letter(self, record: KafkaRecord, exc: BaseException) -> WindowedValue:
    e = describe_exception(exc)
    self._counts["dead_letters"] += 1
    self._counts[f"dead_letters_{e.reason}"] += 1
    telemetry.count_dead_letter(e.reason)
    return beam.pvalue.TaggedOutput(
      DEAD_LETTER_TAG,
      WindowedValue(
        DeadLetter(
          record.topic,
          record.partition,
          record.offset,
          record.covers_from,
          record.key,
          record.value,
          e.reason,
          str(e),
          "parse",
          int(time.time() * 1_000_000),
        ),
        Timestamp(micros=record.timestamp_ms * 1000 if isinstance(record.timestamp_ms, int) else 0),
        _GLOBAL,
      ),
    )

  def process(self, element) -> Iterable[Any]:
    """A record, or a poll's batch of records (a list): each record leaves on its own, as a
    row (in a full batch, or alone) or a dead letter."""
    for record in element if isinstance(element, list) else (element,):
      try:
        table, key, row, micros, is_late = self._to_row(record)
      except Exception as e:  # noqa: BLE001 - parsing is total: every failure is a dead letter
        yield self._dead_letter(record, e)
        continue
      self._counts[table] += 1
      if is_late:
        self._counts["late_events"] += 1
      # A WindowedValue, not a TimestampedValue: the runner would re-assign the (global)
      # window per element; the event-time window comes next, in one step for all outputs.
      if self._batcher is None:
        yield WindowedValue((key, row), Timestamp(micros=micros), _GLOBAL)
      else:
        batch = self._batcher.add(key, row, micros)
        if batch is not None:
          yield beam.pvalue.TaggedOutput(FULL_BATCHES_TAG, batch)

  def finish_bundle(self):
    for name, n in self._counts.items():
      if n:
        self._counters[name].inc(n)
    self._counts = dict.fromkeys(self._counters, 0)
    if self._batcher is not None:
      yield from self._batcher.drain()


class ParseEvents(beam.PTransform):
  """PCollection[KafkaRecord] -> (rows keyed (table, shard), dead letters[, full batches]).

  Takes the reader's poll batches (lists of ``KafkaRecord``) too, record by record.

  Returns the main output of ``(key, row)`` and the ``DeadLetter`` output. With
  ``batch_size``, rows are first collected per key and event-time window within the
  bundle (``transforms.batching.BundleBatcher``): every batch that fills leaves as a
  third output of ``(key, [rows])`` in its window, and only the rest leave as rows.
  """

  def __init__(
    self,
    topic_kinds: Mapping[str, str],
    *,
    window_size_secs: float = 60.0,
    allowed_lateness_secs: float = 0.0,
    num_shards: int = 4,
    shard_by: str = "partition",
    batch_size: int | None = None,
    schema_registry_url: str | None = None,
  ):
    super().__init__()
    bad = {t: k for t, k in topic_kinds.items() if k not in (SENSOR, METER)}
    if bad:
      raise ValueError(f"topic kinds must be '{SENSOR}' or '{METER}', got {bad}")
    arguments.above_and_at_most("window_size_secs", window_size_secs, 0, MAX_WINDOW_SECS)
    arguments.at_least("allowed_lateness_secs", allowed_lateness_secs, 0)
    arguments.at_least("num_shards", num_shards, 1)
    arguments.one_of("shard_by", shard_by, SHARD_BY)
    check_registry_url(schema_registry_url)
    self._batching = batch_size is not None
    self._fn = _ParseEventsFn(
      topic_kinds,
      window_size_secs,
      allowed_lateness_secs,
      num_shards,
      shard_by,
      batch_size,
      schema_registry_url,
    )

  def expand(self, records):
    if not isinstance(records.windowing.windowfn, GlobalWindows):
      raise ValueError("ParseEvents expects records in the global window (straight from Kafka)")
    results = records | "Parse" >> beam.ParDo(self._fn).with_outputs(
      DEAD_LETTER_TAG, FULL_BATCHES_TAG, main="rows"
    )
    rows = results.rows
    rows.element_type = convert_to_beam_type(KeyedRow)
    if self._batching:
      return rows, results[DEAD_LETTER_TAG], results[FULL_BATCHES_TAG]
    return rows, results[DEAD_LETTER_TAG]


def check_registry_url(url: str | None) -> None:
  """Refuses a --schema_registry_url that is not http(s) or carries credentials."""
  if url is None:
    return
  if "@" in url:
    raise ValueError(
      "--schema_registry_url: must not hold credentials (they would be logged and "
      "pickled); set SCHEMA_REGISTRY_USERNAME / SCHEMA_REGISTRY_PASSWORD instead"
    )
  try:
    parts = urllib.parse.urlsplit(url)
    ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
  except ValueError:  # e.g. a port that is not a number
    ok = False
  if not ok:
    raise ValueError(f"--schema_registry_url: expected http(s)://host[:port][/path], got {url!r}")


def key_dead_letters(dead_letter: DeadLetter, num_shards: int) -> tuple[BatchKey, tuple]:
  """A dead letter -> (('dead_letters', shard), row), batched like any other row."""
  return (
    (DEAD_LETTERS_TABLE, dead_letter.kafka_partition % num_shards),
    dead_letter_row(dead_letter),
  )
