"""The audit's read-only view of a sink (SQLite or BigQuery): which Kafka coordinates it holds.

Owns the queries, nothing else: every row's (topic, partition, offset) from the three
tables in one ordered stream (so doubled coordinates are adjacent and memory stays
flat), the recorded offset gaps, and event_id look-ups. It needs only the coordinate
columns, ``event_id`` and, when present, the dead letters' ``reason``; other columns
may change without touching it. A table that does not exist is empty.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)

READINGS = ("sensor_readings", "meter_readings")
DEAD_LETTERS = "dead_letters"
GAP_REASON = "offset_gap"
# Dead letters whose reason starts with this are later copies of a stored event_id.
DUPLICATE_REASON_PREFIX = "duplicate"
# Row kinds of the coordinate stream (the fourth value of each row).
KIND_DUPLICATE_DEAD_LETTER = "dead_letters:duplicate"


class SinkError(RuntimeError):
  """The sink cannot be read; the message names it and why."""


@dataclass(frozen=True)
class Coordinate:
  topic: str
  partition: int
  offset: int


@dataclass(frozen=True)
class RecordedGap:
  topic: str
  partition: int
  offset: int
  error: str


def _coordinates_sql(present: dict, topic_filter: str, ref) -> str | None:
  """UNION ALL of every table's coordinates and kind, ordered; None when no table exists."""
  parts = []
  for table in READINGS:
    if table in present:
      parts.append(
        f"SELECT kafka_topic, kafka_partition, kafka_offset, '{table}' AS kind "
        f"FROM {ref(table)} WHERE kafka_topic IN {topic_filter}"
      )
  columns = present.get(DEAD_LETTERS)
  if columns is not None:
    if "reason" in columns:
      kind = (
        f"CASE WHEN reason LIKE '{DUPLICATE_REASON_PREFIX}%' "
        f"THEN '{KIND_DUPLICATE_DEAD_LETTER}' ELSE '{DEAD_LETTERS}' END"
      )
      where = f" AND (reason IS NULL OR reason <> '{GAP_REASON}')"
    else:
      kind, where = f"'{DEAD_LETTERS}'", ""
    parts.append(
      f"SELECT kafka_topic, kafka_partition, kafka_offset, {kind} AS kind "
      f"FROM {ref(DEAD_LETTERS)} WHERE kafka_topic IN {topic_filter}{where}"
    )
  if not parts:
    return None
  return " UNION ALL ".join(parts) + " ORDER BY 1, 2, 3"


class SqliteSink:
  """A SQLite file opened read-only (the pipeline may still be writing it)."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise SinkError(f"--sink: no SQLite file at {path!r}")
    self.path = path
    self.name = f"sqlite:///{path}"
    self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    self._columns = {}
    for table in (*READINGS, DEAD_LETTERS):
      cols = [r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")]
      if cols:
        self._columns[table] = set(cols)

  def close(self) -> None:
    self._conn.close()

  def coordinates(self, topics: list[str]) -> Iterator[tuple[str, int, int, str]]:
    marks = "(" + ", ".join("?" * len(topics)) + ")"
    sql = _coordinates_sql(self._columns, marks, lambda t: t)
    if sql is None:
      return iter(())
    params = list(topics) * sql.count(marks)
    cursor = self._conn.execute(sql, params)
    cursor.arraysize = 10_000
    return (tuple(r) for r in cursor)

  def recorded_gaps(self, topics: list[str]) -> list[RecordedGap]:
    if "reason" not in self._columns.get(DEAD_LETTERS, ()):
      return []
    marks = ", ".join("?" * len(topics))
    rows = self._conn.execute(
      f"SELECT kafka_topic, kafka_partition, kafka_offset, error FROM {DEAD_LETTERS} "
      f"WHERE reason = ? AND kafka_topic IN ({marks}) ORDER BY 1, 2, 3",
      [GAP_REASON, *topics],
    )
    return [RecordedGap(*r) for r in rows]

  def other_topics(self, topics: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    marks = ", ".join("?" * len(topics))
    for table in self._columns:
      for topic, n in self._conn.execute(
        f"SELECT kafka_topic, COUNT(*) FROM {table} WHERE kafka_topic NOT IN ({marks}) "
        f"GROUP BY kafka_topic",
        topics,
      ):
        out[topic] = out.get(topic, 0) + n
    return out

  def where_event_ids(self, event_ids: Iterable[str]) -> dict[str, list[Coordinate]]:
    """event_id -> the coordinates of the reading rows that hold it."""
    ids = list(dict.fromkeys(event_ids))
    out: dict[str, list[Coordinate]] = {}
    for table in READINGS:
      if "event_id" not in self._columns.get(table, ()):
        continue
      for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        for eid, t, p, o in self._conn.execute(
          f"SELECT event_id, kafka_topic, kafka_partition, kafka_offset FROM {table} "
          f"WHERE event_id IN ({', '.join('?' * len(chunk))})",
          chunk,
        ):
          out.setdefault(eid, []).append(Coordinate(t, p, o))
    return out

  def repeated_event_ids(self) -> int:
    """How many event_ids more than one reading row holds (0 when the sink keeps one)."""
    selects = [
      f"SELECT event_id FROM {t}" for t in READINGS if "event_id" in self._columns.get(t, ())
    ]
    if not selects:
      return 0
    return self._conn.execute(
      f"SELECT COUNT(*) FROM (SELECT event_id FROM ({' UNION ALL '.join(selects)}) "
      f"GROUP BY event_id HAVING COUNT(*) > 1)"
    ).fetchone()[0]


class BigQuerySink:
  """A BigQuery dataset read through google-cloud-bigquery queries."""

  def __init__(self, project: str, dataset: str, api_endpoint: str | None = None):
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    self.name = f"bigquery://{project}/{dataset}"
    self._bq = bigquery
    if api_endpoint:
      from google.api_core.client_options import ClientOptions
      from google.auth.credentials import AnonymousCredentials

      self._client = bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=api_endpoint),
      )
    else:
      self._client = bigquery.Client(project=project)
    self._dataset = f"{project}.{dataset}"
    self._columns = {}
    for table in (*READINGS, DEAD_LETTERS):
      try:
        schema = self._client.get_table(f"{project}.{dataset}.{table}").schema
      except gexc.NotFound:
        continue
      self._columns[table] = {f.name for f in schema}
    if not self._columns:
      _LOGGER.warning("%s has none of the tables %s", self.name, (*READINGS, DEAD_LETTERS))

  def _ref(self, table: str) -> str:
    return f"`{self._dataset}.{table}`"

  def _query(self, sql: str, **params) -> Iterator:
    bq = self._bq
    qp = []
    for name, value in params.items():
      if isinstance(value, (list, tuple)):
        qp.append(bq.ArrayQueryParameter(name, "STRING", list(value)))
      else:
        qp.append(bq.ScalarQueryParameter(name, "STRING", value))
    job = self._client.query(sql, job_config=bq.QueryJobConfig(query_parameters=qp))
    return iter(job.result(page_size=50_000))

  def close(self) -> None:
    self._client.close()

  def coordinates(self, topics: list[str]) -> Iterator[tuple[str, int, int, str]]:
    sql = _coordinates_sql(self._columns, "UNNEST(@topics)", self._ref)
    if sql is None:
      return iter(())
    return (tuple(r.values()) for r in self._query(sql, topics=topics))

  def recorded_gaps(self, topics: list[str]) -> list[RecordedGap]:
    if "reason" not in self._columns.get(DEAD_LETTERS, ()):
      return []
    rows = self._query(
      f"SELECT kafka_topic, kafka_partition, kafka_offset, error FROM {self._ref(DEAD_LETTERS)} "
      f"WHERE reason = @reason AND kafka_topic IN UNNEST(@topics) ORDER BY 1, 2, 3",
      reason=GAP_REASON,
      topics=topics,
    )
    return [RecordedGap(*r.values()) for r in rows]

  def other_topics(self, topics: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for table in self._columns:
      for r in self._query(
        f"SELECT kafka_topic, COUNT(*) AS n FROM {self._ref(table)} "
        f"WHERE kafka_topic NOT IN UNNEST(@topics) GROUP BY kafka_topic",
        topics=topics,
      ):
        out[r[0]] = out.get(r[0], 0) + r[1]
    return out

  def where_event_ids(self, event_ids: Iterable[str]) -> dict[str, list[Coordinate]]:
    ids = list(dict.fromkeys(event_ids))
    out: dict[str, list[Coordinate]] = {}
    for table in READINGS:
      if "event_id" not in self._columns.get(table, ()):
        continue
      for i in range(0, len(ids), 10_000):
        for r in self._query(
          f"SELECT event_id, kafka_topic, kafka_partition, kafka_offset FROM {self._ref(table)} "
          f"WHERE event_id IN UNNEST(@ids)",
          ids=ids[i : i + 10_000],
        ):
          out.setdefault(r[0], []).append(Coordinate(r[1], r[2], r[3]))
    return out

  def repeated_event_ids(self) -> int:
    selects = [
      f"SELECT event_id FROM {self._ref(t)}"
      for t in READINGS
      if "event_id" in self._columns.get(t, ())
    ]
    if not selects:
      return 0
    rows = list(
      self._query(
        f"SELECT COUNT(*) AS n FROM (SELECT event_id FROM ({' UNION ALL '.join(selects)}) "
        f"GROUP BY event_id HAVING COUNT(*) > 1)"
      )
    )
    return rows[0][0] if rows else 0


def open_sink(url: str, api_endpoint: str | None = None):
  """--sink URL -> SqliteSink | BigQuerySink (validated by SmartGridOptions already)."""
  if url.startswith("sqlite:///"):
    return SqliteSink(url[len("sqlite:///") :])
  if url.startswith("bigquery://"):
    project, dataset = url[len("bigquery://") :].split("/", 1)
    return BigQuerySink(project, dataset, api_endpoint)
  raise SinkError(f"--sink: unknown sink {url!r}")
