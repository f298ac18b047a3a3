"""The three tables every sink writes, with the same names and columns everywhere.

The columns and their order come from the row types of ``transforms.rows`` (the
layout of rows in flight); this module adds the column types, ``written_at`` (the
sink stamps it) and the table layout.
Every table is unique on (kafka_topic, kafka_partition, kafka_offset) (its
``primary_key``, declared NOT ENFORCED in BigQuery), and the reading tables also on
``event_id`` (their ``dedup_column``: the first copy of an event wins). Tables are
clustered on the Kafka coordinates first, so the start-up reconciliation's query
(which offsets of a partition are stored) reads few blocks, then on the entity id.
"""

from __future__ import annotations

from dataclasses import dataclass

from transforms.rows import DEAD_LETTER_ROW, METER_ROW, ROW_TYPES, SENSOR_ROW, WRITTEN_AT, RowType


@dataclass(frozen=True)
class Column:
  name: str
  sqlite_type: str
  bq_type: str
  required: bool = True


@dataclass(frozen=True)
class Table:
  name: str
  columns: tuple  # of Column, in row order, written_at last
  partition_column: str  # BigQuery day partitioning
  cluster_columns: tuple  # BigQuery clustering (at most 4 columns)
  dedup_column: str | None = None  # unique besides the primary key; the first copy wins
  primary_key: tuple = ("kafka_topic", "kafka_partition", "kafka_offset")

  @property
  def names(self) -> tuple:
    return tuple(c.name for c in self.columns)

  def row_dict(self, row: tuple, written_at: str | None = None) -> dict:
    """A row tuple (with its trailing covers_from) -> {column: value}."""
    values = ROW_TYPES[self.name].as_dict(row)
    values[WRITTEN_AT] = written_at
    return values


_KAFKA = {
  "kafka_topic": ("TEXT", "STRING"),
  "kafka_partition": ("INTEGER", "INT64"),
  "kafka_offset": ("INTEGER", "INT64"),
}


def _table(row_type: RowType, types: dict, **layout) -> Table:
  """The table of a row type: its columns in row order with their types
  (name -> (sqlite type, BigQuery type[, required])), then ``written_at``."""
  types = {**types, **_KAFKA, WRITTEN_AT: ("TEXT", "TIMESTAMP")}
  names = (*row_type.columns, WRITTEN_AT)
  if set(types) != set(names):
    raise ValueError(
      f"{row_type.table}: types for {sorted(set(types) ^ set(names))} do not match "
      "the row type's columns"
    )
  return Table(row_type.table, tuple(Column(n, *types[n]) for n in names), **layout)


# The event-time window every reading row carries (transforms.parse sets them).
_WINDOW_TYPES = {
  "window_start": ("TEXT", "TIMESTAMP"),
  "window_end": ("TEXT", "TIMESTAMP"),
  "is_late": ("INTEGER", "BOOL"),
}

SENSOR_READINGS = _table(
  SENSOR_ROW,
  {
    "event_id": ("TEXT", "STRING"),
    "sensor_id": ("TEXT", "STRING"),
    "sensor_type": ("TEXT", "STRING"),
    "value": ("REAL", "FLOAT64"),
    # null when the event has no location (the old consumer stored those too)
    "latitude": ("REAL", "FLOAT64", False),
    "longitude": ("REAL", "FLOAT64", False),
    "event_time": ("TEXT", "TIMESTAMP"),
    "metadata": ("TEXT", "JSON", False),
    **_WINDOW_TYPES,
  },
  partition_column="event_time",
  cluster_columns=("kafka_topic", "kafka_partition", "kafka_offset", "sensor_id"),
  dedup_column="event_id",
)

METER_READINGS = _table(
  METER_ROW,
  {
    "event_id": ("TEXT", "STRING"),
    "meter_id": ("TEXT", "STRING"),
    "customer_id": ("TEXT", "STRING"),
    "reading": ("REAL", "FLOAT64"),
    "unit": ("TEXT", "STRING"),
    "event_time": ("TEXT", "TIMESTAMP"),
    **_WINDOW_TYPES,
  },
  partition_column="event_time",
  cluster_columns=("kafka_topic", "kafka_partition", "kafka_offset", "meter_id"),
  dedup_column="event_id",
)

# raw_key/raw_value: text when both are valid UTF-8 without NUL bytes, else base64
# (raw_encoding says which), cut to transforms.events.RAW_TEXT_LIMIT (truncated=1);
# raw_size and raw_sha256 are the original value's. reason is one of
# transforms.events.DEAD_LETTER_REASONS.
DEAD_LETTERS = _table(
  DEAD_LETTER_ROW,
  {
    "raw_key": ("TEXT", "STRING", False),
    "raw_value": ("TEXT", "STRING", False),
    "raw_encoding": ("TEXT", "STRING"),
    "raw_size": ("INTEGER", "INT64", False),
    "raw_sha256": ("TEXT", "STRING", False),
    "truncated": ("INTEGER", "BOOL"),
    "reason": ("TEXT", "STRING"),
    "error": ("TEXT", "STRING"),
    "stage": ("TEXT", "STRING"),
    "failed_at": ("TEXT", "TIMESTAMP"),
  },
  partition_column="failed_at",
  cluster_columns=("kafka_topic", "kafka_partition", "kafka_offset"),
)

TABLES = {t.name: t for t in (SENSOR_READINGS, METER_READINGS, DEAD_LETTERS)}
