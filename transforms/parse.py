"""ParseEvents: Kafka records -> keyed, event-time-stamped table rows, and dead letters.

One DoFn does parsing, validation, event-time stamping and the batching key, so a
record costs one step before the window. Every record leaves it exactly once:
as a sensor or meter row, or as a dead-letter row (reason, raw bytes, Kafka
coordinates). Late events are kept: an event whose window (plus the allowed
lateness) had closed when it reached Kafka is flagged ``is_late`` and stamped
with its arrival time, so no runner drops it as late data; its row still
carries its event time and event-time window.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Iterable, Mapping, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from transforms import progress
from transforms.events import (InvalidEvent, DeadLetter, dead_letter_row, meter_row, parse_meter,
                               parse_sensor, sensor_row)
from transforms.kafka.records import KafkaRecord
from transforms.sinks.schema import DEAD_LETTERS, METER_READINGS, SENSOR_READINGS

SENSOR, METER = "sensor", "meter"
SHARD_BY = ("partition", "id")
DEAD_LETTER_TAG = "dead_letters"


class _ParseEventsFn(beam.DoFn):
  def __init__(self, topic_kinds: Mapping[str, str], window_size_secs: float,
               allowed_lateness_secs: float, num_shards: int, shard_by: str):
    self._kinds = dict(topic_kinds)
    self._size_us = int(window_size_secs * 1_000_000)
    self._lateness_us = int(allowed_lateness_secs * 1_000_000)
    self._num_shards = num_shards
    self._by_id = shard_by == "id"
    self._counters = {name: Metrics.counter(self.__class__, name)
                      for name in ("sensor_readings", "meter_readings", "late_events", "dead_letters")}

  def _shard(self, record: KafkaRecord, entity_id: str) -> int:
    if self._by_id:
      return zlib.crc32(entity_id.encode()) % self._num_shards
    return record.partition % self._num_shards

  def process(self, record: KafkaRecord) -> Iterable[Any]:
    kind = self._kinds.get(record.topic)
    try:
      if kind == SENSOR:
        event = parse_sensor(record.value)
        entity_id, table, to_row = event.sensor_id, SENSOR_READINGS.name, sensor_row
      elif kind == METER:
        event = parse_meter(record.value)
        entity_id, table, to_row = event.meter_id, METER_READINGS.name, meter_row
      else:
        raise InvalidEvent("unknown_topic", f"no event type is configured for topic {record.topic!r}")
    except InvalidEvent as e:
      self._counters["dead_letters"].inc()
      progress.add_dead_letter(e.reason)
      yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, TimestampedValue(
          DeadLetter(record.topic, record.partition, record.offset, record.covers_from,
                     record.key, record.value, str(e), "parse", int(time.time() * 1_000_000)),
          Timestamp(micros=record.timestamp_ms * 1000)))
      return

    event_us = event.event_time_us
    window_start = event_us - event_us % self._size_us
    window_end = window_start + self._size_us
    arrival_us = record.timestamp_ms * 1000
    is_late = arrival_us > window_end + self._lateness_us
    self._counters[table].inc()
    if is_late:
      self._counters["late_events"].inc()
    row = to_row(event, window_start, window_end, is_late, record.topic, record.partition,
                 record.offset, record.covers_from)
    yield TimestampedValue((f"{table}|{self._shard(record, entity_id)}", row),
                           Timestamp(micros=arrival_us if is_late else event_us))


class ParseEvents(beam.PTransform):
  """PCollection[KafkaRecord] -> (rows keyed 'table|shard', dead letters).

  Returns a pair: the main output of ``(key, row)`` and the ``DeadLetter`` output.
  """

  def __init__(self, topic_kinds: Mapping[str, str], *, window_size_secs: float = 60.0,
               allowed_lateness_secs: float = 0.0, num_shards: int = 4,
               shard_by: str = "partition"):
    super().__init__()
    bad = {t: k for t, k in topic_kinds.items() if k not in (SENSOR, METER)}
    if bad:
      raise ValueError(f"topic kinds must be '{SENSOR}' or '{METER}', got {bad}")
    if window_size_secs <= 0:
      raise ValueError(f"--window_size_secs must be > 0, got {window_size_secs}")
    if allowed_lateness_secs < 0:
      raise ValueError(f"--allowed_lateness_secs must be >= 0, got {allowed_lateness_secs}")
    if num_shards < 1:
      raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
    if shard_by not in SHARD_BY:
      raise ValueError(f"--shard_by must be one of {SHARD_BY}, got {shard_by!r}")
    self._fn = _ParseEventsFn(topic_kinds, window_size_secs, allowed_lateness_secs, num_shards,
                              shard_by)

  def expand(self, records):
    results = records | "Parse" >> beam.ParDo(self._fn).with_outputs(
        DEAD_LETTER_TAG, main="rows")
    rows = results.rows
    rows.element_type = Tuple[str, Any]
    return rows, results[DEAD_LETTER_TAG]


def key_dead_letters(dead_letter: DeadLetter, num_shards: int) -> Tuple[str, tuple]:
  """A dead letter -> ('dead_letters|shard', row), batched like any other row."""
  return (f"{DEAD_LETTERS.name}|{dead_letter.kafka_partition % num_shards}",
          dead_letter_row(dead_letter))
