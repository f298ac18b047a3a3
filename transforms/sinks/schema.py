"""The three tables every sink writes, with the same names and columns everywhere.

A row travels through the pipeline as a tuple of ``columns`` in order without
``written_at`` (the sink stamps it), ending with (kafka_topic, kafka_partition,
kafka_offset, covers_from); ``covers_from`` is not stored, the sink acks it.
Every table is unique on (kafka_topic, kafka_partition, kafka_offset) (its
``primary_key``, declared NOT ENFORCED in BigQuery), and the reading tables also on
``event_id`` (their ``dedup_column``: the first copy of an event wins). Tables are
clustered on the Kafka coordinates first, so the start-up reconciliation's query
(which offsets of a partition are stored) reads few blocks, then on the entity id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
  dedup_column: Optional[str] = None  # unique besides the primary key; the first copy wins
  primary_key: tuple = ("kafka_topic", "kafka_partition", "kafka_offset")

  @property
  def names(self) -> tuple:
    return tuple(c.name for c in self.columns)

  def row_dict(self, row: tuple, written_at: Optional[str] = None) -> dict:
    """A row tuple (with its trailing covers_from) -> {column: value}."""
    values = dict(zip(self.names[:-1], row[:-1]))
    values["written_at"] = written_at
    return values


_KAFKA = (Column("kafka_topic", "TEXT", "STRING"), Column("kafka_partition", "INTEGER", "INT64"),
          Column("kafka_offset", "INTEGER", "INT64"))
_WRITTEN_AT = Column("written_at", "TEXT", "TIMESTAMP")

SENSOR_READINGS = Table("sensor_readings", (
    Column("event_id", "TEXT", "STRING"), Column("sensor_id", "TEXT", "STRING"),
    Column("sensor_type", "TEXT", "STRING"), Column("value", "REAL", "FLOAT64"),
    # null when the event has no location (the old consumer stored those too)
    Column("latitude", "REAL", "FLOAT64", required=False),
    Column("longitude", "REAL", "FLOAT64", required=False),
    Column("event_time", "TEXT", "TIMESTAMP"), Column("metadata", "TEXT", "JSON", required=False),
    Column("window_start", "TEXT", "TIMESTAMP"), Column("window_end", "TEXT", "TIMESTAMP"),
    Column("is_late", "INTEGER", "BOOL"), *_KAFKA, _WRITTEN_AT),
    partition_column="event_time",
    cluster_columns=("kafka_topic", "kafka_partition", "kafka_offset", "sensor_id"),
    dedup_column="event_id")

METER_READINGS = Table("meter_readings", (
    Column("event_id", "TEXT", "STRING"), Column("meter_id", "TEXT", "STRING"),
    Column("customer_id", "TEXT", "STRING"), Column("reading", "REAL", "FLOAT64"),
    Column("unit", "TEXT", "STRING"), Column("event_time", "TEXT", "TIMESTAMP"),
    Column("window_start", "TEXT", "TIMESTAMP"), Column("window_end", "TEXT", "TIMESTAMP"),
    Column("is_late", "INTEGER", "BOOL"), *_KAFKA, _WRITTEN_AT),
    partition_column="event_time",
    cluster_columns=("kafka_topic", "kafka_partition", "kafka_offset", "meter_id"),
    dedup_column="event_id")

# raw_key/raw_value: text when both are valid UTF-8 without NUL bytes, else base64
# (raw_encoding says which), cut to transforms.events.RAW_TEXT_LIMIT (truncated=1);
# raw_size and raw_sha256 are the original value's. reason is one of
# transforms.events.DEAD_LETTER_REASONS.
DEAD_LETTERS = Table("dead_letters", (
    Column("raw_key", "TEXT", "STRING", required=False),
    Column("raw_value", "TEXT", "STRING", required=False),
    Column("raw_encoding", "TEXT", "STRING"),
    Column("raw_size", "INTEGER", "INT64", required=False),
    Column("raw_sha256", "TEXT", "STRING", required=False),
    Column("truncated", "INTEGER", "BOOL"),
    Column("reason", "TEXT", "STRING"), Column("error", "TEXT", "STRING"),
    Column("stage", "TEXT", "STRING"), Column("failed_at", "TEXT", "TIMESTAMP"),
    *_KAFKA, _WRITTEN_AT),
    partition_column="failed_at",
    cluster_columns=("kafka_topic", "kafka_partition", "kafka_offset"))

TABLES = {t.name: t for t in (SENSOR_READINGS, METER_READINGS, DEAD_LETTERS)}
