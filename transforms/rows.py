"""Rows in flight: the table names, each table's row layout, and the batch keys.

A row travels from ``ParseEvents`` to the sink as a plain tuple (Beam encodes a tuple
of primitives fast; a NamedTuple would go through its pickle fallback): the stored
columns of its table in order, without ``written_at`` (the sink stamps it), then
``covers_from``. The stored columns always end with the Kafka coordinates, so every
row ends with ``(kafka_topic, kafka_partition, kafka_offset, covers_from)``:
``covers_from`` is the first offset the row's ack accounts for (see
``transforms.kafka.records.KafkaRecord``); it is acked, never stored.

This module is the one place that knows that layout: code reads a row through
``coordinates``, ``covers_from``, ``stored`` and the ``RowType`` of its table, never by
slicing. The sink schema (``transforms.sinks.schema``) adds types to these columns;
it imports them from here, never the reverse.

Rows are batched under tuple keys ``(table, shard)`` (``BatchKey``); the committer keys
by ``(topic, partition)``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

SENSOR_TABLE = "sensor_readings"
METER_TABLE = "meter_readings"
DEAD_LETTERS_TABLE = "dead_letters"

KAFKA_COLUMNS = ("kafka_topic", "kafka_partition", "kafka_offset")
WRITTEN_AT = "written_at"  # stamped by the sink: stored, never in flight

BatchKey = tuple[str, int]  # (table, shard)
KeyedRow = tuple[BatchKey, Any]  # the element type of keyed rows: ((table, shard), row)
PartitionKey = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class RowType:
  """The layout of one table's rows in flight: ``columns`` (the stored ones, without
  ``written_at``, ending with the Kafka coordinates), then ``covers_from``."""

  table: str
  columns: tuple[str, ...]

  def __post_init__(self):
    if self.columns[-len(KAFKA_COLUMNS) :] != KAFKA_COLUMNS:
      raise ValueError(f"{self.table}: the columns must end with {KAFKA_COLUMNS}")

  def index(self, column: str) -> int:
    """The position of ``column`` in a row."""
    return self.columns.index(column)

  def as_dict(self, row: tuple) -> dict:
    """{column: value} of the stored columns (covers_from left out)."""
    return dict(zip(self.columns, row))

  def payload(self, row: tuple) -> dict:
    """{column: value} of the event's own columns: the Kafka coordinates left out."""
    return dict(zip(self.columns[: -len(KAFKA_COLUMNS)], row))


SENSOR_ROW = RowType(
  SENSOR_TABLE,
  (
    "event_id",
    "sensor_id",
    "sensor_type",
    "value",
    "latitude",
    "longitude",
    "event_time",
    "metadata",
    "window_start",
    "window_end",
    "is_late",
    *KAFKA_COLUMNS,
  ),
)
METER_ROW = RowType(
  METER_TABLE,
  (
    "event_id",
    "meter_id",
    "customer_id",
    "reading",
    "unit",
    "event_time",
    "window_start",
    "window_end",
    "is_late",
    *KAFKA_COLUMNS,
  ),
)
# raw_*: see transforms.events.raw_columns; reason: one of transforms.events.DEAD_LETTER_REASONS.
DEAD_LETTER_ROW = RowType(
  DEAD_LETTERS_TABLE,
  (
    "raw_key",
    "raw_value",
    "raw_encoding",
    "raw_size",
    "raw_sha256",
    "truncated",
    "reason",
    "error",
    "stage",
    "failed_at",
    *KAFKA_COLUMNS,
  ),
)

ROW_TYPES = {t.table: t for t in (SENSOR_ROW, METER_ROW, DEAD_LETTER_ROW)}


def coordinates(row: tuple) -> tuple[str, int, int]:
  """(kafka_topic, kafka_partition, kafka_offset) of a row."""
  return row[-4], row[-3], row[-2]


def partition_of(row: tuple) -> PartitionKey:
  """(kafka_topic, kafka_partition) of a row."""
  return row[-4], row[-3]


def offset_of(row: tuple) -> int:
  """The row's kafka_offset."""
  return row[-2]


def covers_from(row: tuple) -> int:
  """The first offset the row's ack accounts for (its own offset unless it spans a gap)."""
  return row[-1]


# (kafka_topic, kafka_partition, covers_from, kafka_offset) of a row, in one C call: the sinks
# read it for every row they ack (``transforms.acks``), where three calls cost twice as much.
ack_span = operator.itemgetter(-4, -3, -1, -2)


def stored(row: tuple) -> tuple:
  """The values a sink stores, in column order (covers_from left out, no written_at)."""
  return row[:-1]


def at_offset(row: tuple, offset: int, covers_from_offset: int | None = None) -> tuple:
  """The same row at another offset of its partition (``covers_from`` defaults to it)."""
  return row[:-2] + (offset, offset if covers_from_offset is None else covers_from_offset)


def batch_key(table: str, shard: int) -> BatchKey:
  return (table, shard)


def key_table(key: BatchKey) -> str:
  """The table of a batch key."""
  return key[0]
