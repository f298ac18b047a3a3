"""The embedded default store: one SQLite file in WAL mode.

Idempotent: every table is unique on (kafka_topic, kafka_partition, kafka_offset)
and rows go in with ``INSERT ... ON CONFLICT DO NOTHING``, one transaction per
write, so a replay after a crash adds nothing. The reading tables are also unique
on event_id (one row per event, the first copy wins): a later copy is returned as
rejected with a ``DuplicateEvent`` error, and ``WriteBatches`` dead-letters and acks
it. ``synchronous=FULL``: a transaction is on disk when COMMIT returns, so offsets
committed after it survive a power loss too, not only a process crash. Several
writers (threads, processes) share the file through SQLite's locking; a busy
database is a transient error.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from operator import itemgetter

from transforms.rows import ROW_TYPES, coordinates, offset_of, partition_of, stored
from transforms.sinks.base import DuplicateEvent
from transforms.sinks.schema import TABLES, Table

_LOGGER = logging.getLogger(__name__)


class SinkSchemaError(RuntimeError):
  """An existing database cannot take the constraints the sink needs (not transient)."""


def create_table_sql(table: Table, name: str | None = None) -> list[str]:
  cols = ", ".join(
    f"{c.name} {c.sqlite_type}{' NOT NULL' if c.required else ''}" for c in table.columns
  )
  return [
    f"CREATE TABLE IF NOT EXISTS {name or table.name} ({cols}, "
    f"UNIQUE ({', '.join(table.primary_key)}))"
  ]


# Values for columns that a database made by an earlier version lacks. Its dead letters
# kept raw_key/raw_value as base64 and the reason as the error's first word.
_MIGRATION_FILL = {
  "raw_encoding": "'base64'",
  "truncated": "0",
  "reason": "CASE WHEN instr(error, ':') > 0 THEN substr(error, 1, instr(error, ':') - 1) "
  "ELSE 'unknown' END",
}


def migrate_table(conn: sqlite3.Connection, table: Table, path: str) -> str | None:
  """Brings a table made by an earlier version to the current layout, in one transaction.

  Adds the columns it lacks (filled as ``_MIGRATION_FILL`` says, else NULL) and relaxes
  NOT NULL where the layout now allows NULL (SQLite can only do that by copying the
  table). Returns what it did, or None when the table already has the layout. A column
  the layout does not know, or a new required column without a fill, is refused: no
  data is ever dropped.
  """
  conn.execute("BEGIN IMMEDIATE")
  try:
    have = {r[1]: bool(r[3]) for r in conn.execute(f"PRAGMA table_info({table.name})")}
    want = {c.name: c.required for c in table.columns}
    if have == want:
      conn.execute("ROLLBACK")
      return None
    unknown = sorted(set(have) - set(want))
    unfilled = [
      c.name
      for c in table.columns
      if c.name not in have and c.required and c.name not in _MIGRATION_FILL
    ]
    if unknown or unfilled:
      raise SinkSchemaError(
        f"{path}: table {table.name} has a layout this version cannot migrate (unknown "
        f"columns {unknown}, new required columns {unfilled}); write to a new file"
      )
    select = ", ".join(
      c.name if c.name in have else _MIGRATION_FILL.get(c.name, "NULL") for c in table.columns
    )
    scratch = f"{table.name}__migrating"
    conn.execute(f"DROP TABLE IF EXISTS {scratch}")
    for statement in create_table_sql(table, scratch):
      conn.execute(statement)
    conn.execute(f"INSERT INTO {scratch} ({', '.join(want)}) SELECT {select} FROM {table.name}")
    conn.execute(f"DROP TABLE {table.name}")
    conn.execute(f"ALTER TABLE {scratch} RENAME TO {table.name}")
    conn.execute("COMMIT")
  except BaseException:
    if conn.in_transaction:
      conn.execute("ROLLBACK")
    raise
  added = [n for n in want if n not in have]
  relaxed = [n for n in want if n in have and have[n] and not want[n]]
  return f"added columns {added}, allowed NULL in {relaxed}"


def dedup_index_sql(table: Table) -> str | None:
  if table.dedup_column is None:
    return None
  return (
    f"CREATE UNIQUE INDEX IF NOT EXISTS {table.name}_{table.dedup_column}_unique "
    f"ON {table.name} ({table.dedup_column})"
  )


def insert_sql(table: Table) -> str:
  # No conflict target: a row that breaks either uniqueness (coordinates, event_id) is skipped.
  names = table.names
  return (
    f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
    f"ON CONFLICT DO NOTHING"
  )


def stored_offsets_sql() -> str:
  return " UNION ".join(
    f"SELECT kafka_offset FROM {t} WHERE kafka_topic = ? AND kafka_partition = ? "
    f"AND kafka_offset >= ? AND kafka_offset < ?"
    for t in TABLES
  )


# Per connection, measured by benchmarks/sink_bench.py and the pipeline bench. The event_id
# index takes its keys (UUIDs) at random: a transaction dirties about one of its pages per row,
# and that page goes to the WAL at COMMIT. Larger transactions (--sink_flush_rows' 40,000 rows)
# and rows inserted in event_id order (SqliteStore._insert_order) write each page fewer times
# and find it in the cache (benchmarks/PROFILE.md, sections 9 and 10). With sorted inserts
# SQLite's default 2 MiB page cache is as fast as 8 MiB, 6 MiB less a connection. Checkpointing
# every 10,000 WAL pages (not 1,000) copies a page that many flushes changed once, not once per
# flush. Durability is the same: every COMMIT still syncs the WAL. The WAL file is cut back to
# 64 MiB after a checkpoint. mmap_size measured slower.
_SPEED_PRAGMAS = (
  "PRAGMA cache_size=-2048",  # KiB: 2 MiB
  "PRAGMA wal_autocheckpoint=10000",  # pages
  "PRAGMA journal_size_limit=67108864",  # bytes
  "PRAGMA temp_store=MEMORY",
)


_LOOKUP_CHUNK = 500  # values per IN (...) of a look-up: far below SQLite's bound-variable limit


class SqliteStore:
  """A ``Store`` (see ``transforms.sinks.base``) over one SQLite file."""

  def __init__(self, path: str, busy_timeout_ms: int = 5000):
    self.path = path
    self.busy_timeout_ms = busy_timeout_ms
    self._conn: sqlite3.Connection | None = None
    self._sql = {name: insert_sql(t) for name, t in TABLES.items()}
    self._dedup_key = {
      name: itemgetter(ROW_TYPES[name].index(t.dedup_column))
      for name, t in TABLES.items()
      if t.dedup_column is not None
    }

  def __getstate__(self):
    return {"path": self.path, "busy_timeout_ms": self.busy_timeout_ms}

  def __setstate__(self, state):
    self.__init__(**state)

  def open(self) -> None:
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(
      self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
    for pragma in _SPEED_PRAGMAS:
      conn.execute(pragma)
    with conn:
      for table in TABLES.values():
        for statement in create_table_sql(table):
          conn.execute(statement)
    for table in TABLES.values():
      done = migrate_table(conn, table, self.path)
      if done:
        _LOGGER.warning(
          "%s: migrated table %s to this version's layout: %s", self.path, table.name, done
        )
      self._create_dedup_index(conn, table)
    self._conn = conn

  def _create_dedup_index(self, conn: sqlite3.Connection, table: Table) -> None:
    sql = dedup_index_sql(table)
    if sql is None:
      return
    try:
      conn.execute(sql)
    except sqlite3.IntegrityError as e:
      column = table.dedup_column
      doubled = conn.execute(
        f"SELECT {column}, COUNT(*) FROM {table.name} GROUP BY {column} HAVING COUNT(*) > 1 LIMIT 3"
      ).fetchall()
      total = conn.execute(
        f"SELECT COUNT(*) FROM (SELECT 1 FROM {table.name} GROUP BY {column} HAVING COUNT(*) > 1)"
      ).fetchone()[0]
      conn.close()
      raise SinkSchemaError(
        f"{self.path}: {table.name} holds {total} {column}s more than once (e.g. "
        f"{', '.join(repr(d[0]) for d in doubled)}), so the unique index on {column} (one row "
        f"per event, the first copy wins) cannot be created. Keep the first copy of each, e.g. "
        f"DELETE FROM {table.name} WHERE rowid NOT IN (SELECT MIN(rowid) FROM {table.name} "
        f"GROUP BY {column}), or write to a new file. ({e})"
      ) from e

  def close(self) -> None:
    if self._conn is not None:
      self._conn.close()
      self._conn = None

  def is_transient(self, exc: BaseException) -> bool:
    # Locked/busy database, I/O hiccups: retry. Constraint and type errors are for good.
    return isinstance(exc, sqlite3.OperationalError)

  def write(self, table: str, rows: list, written_at: str) -> list:
    if self._conn is None:
      self.open()
    sql = self._sql[table]
    tail = (written_at,)
    conn = self._conn
    try:
      conn.execute("BEGIN IMMEDIATE")
      before = conn.total_changes
      # One row's parameters at a time: a list of them would hold the write twice in memory.
      conn.executemany(sql, (stored(row) + tail for row in self._insert_order(table, rows)))
      skipped = len(rows) - (conn.total_changes - before)
      duplicates = self._duplicates(table, rows) if skipped else []
      conn.execute("COMMIT")
      return duplicates
    except sqlite3.IntegrityError:
      conn.execute("ROLLBACK")
    except BaseException:
      if conn.in_transaction:
        conn.execute("ROLLBACK")
      raise
    # A row broke a constraint (e.g. NOT NULL): write the others, return the bad ones.
    rejected = []
    conn.execute("BEGIN IMMEDIATE")
    try:
      for row in rows:
        try:
          conn.execute(sql, stored(row) + tail)
        except sqlite3.IntegrityError as e:
          rejected.append((row, str(e)))
      bad = {id(row) for row, _ in rejected}
      rejected += self._duplicates(table, [row for row in rows if id(row) not in bad])
      conn.execute("COMMIT")
    except BaseException:
      if conn.in_transaction:
        conn.execute("ROLLBACK")
      raise
    return rejected

  def _insert_order(self, table: str, rows: list) -> list:
    """rows in event_id order: the unique index's pages are then visited in turn, not at
    random (benchmarks/PROFILE.md, section 10). The sort is stable, so of two copies in one
    write the earlier still goes in first and wins."""
    key = self._dedup_key.get(table)
    if key is None:
      return rows
    try:
      return sorted(rows, key=key)
    except TypeError:  # a row without an event_id: NOT NULL refuses it, row by row
      return rows

  def _duplicates(self, table: str, rows: list) -> list:
    """Rows the insert skipped although their coordinates are not stored: later copies of an
    event_id (a replay of the same coordinates is not a duplicate, it is simply absorbed).
    A few queries per write (``_LOOKUP_CHUNK`` values each), not one or two per row."""
    column = TABLES[table].dedup_column
    if column is None:
      return []
    index = ROW_TYPES[table].index(column)
    stored = self._stored_coordinates(table, rows)
    copies = [row for row in rows if coordinates(row) not in stored]
    if not copies:
      return []
    first = self._first_copies(table, column, {row[index] for row in copies})
    found = []
    for row in copies:
      at = first.get(row[index])
      where = f"{at[0]}-{at[1]}@{at[2]}" if at else "an earlier row"
      found.append((row, DuplicateEvent(f"{column} {row[index]!r} is stored already ({where})")))
    return found

  def _stored_coordinates(self, table: str, rows: list) -> set:
    """The coordinates of ``rows`` that ``table`` holds."""
    offsets: dict[tuple, list] = {}
    for row in rows:
      offsets.setdefault(partition_of(row), []).append(offset_of(row))
    stored = set()
    for (topic, partition), wanted in offsets.items():
      for chunk in _chunks(sorted(set(wanted))):
        stored.update(
          (topic, partition, r[0])
          for r in self._conn.execute(
            f"SELECT kafka_offset FROM {table} WHERE kafka_topic = ? AND kafka_partition = ? "
            f"AND kafka_offset IN ({', '.join('?' * len(chunk))})",
            (topic, partition, *chunk),
          )
        )
    return stored

  def _first_copies(self, table: str, column: str, values: set) -> dict:
    """{value: (kafka_topic, kafka_partition, kafka_offset)} of the stored rows with those
    ``column`` values."""
    first = {}
    for chunk in _chunks(list(values)):
      for value, *at in self._conn.execute(
        f"SELECT {column}, kafka_topic, kafka_partition, kafka_offset FROM {table} "
        f"WHERE {column} IN ({', '.join('?' * len(chunk))})",
        chunk,
      ):
        first[value] = at
    return first

  def stored_offsets(
    self, topic: str, partition: int, from_offset: int, until_offset: int | None = None
  ) -> set:
    """Offsets of ``topic``/``partition`` in [from_offset, until_offset) held in any table."""
    if self._conn is None:
      self.open()
    until = 2**63 - 1 if until_offset is None else until_offset
    params = (topic, partition, from_offset, until) * len(TABLES)
    return {r[0] for r in self._conn.execute(stored_offsets_sql(), params)}


def _chunks(values: list) -> list[list]:
  return [values[i : i + _LOOKUP_CHUNK] for i in range(0, len(values), _LOOKUP_CHUNK)]


def sqlite_path_from_url(url: str) -> str:
  """'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db' -> the file path."""
  prefix = "sqlite:///"
  if not url.startswith(prefix) or len(url) == len(prefix):
    raise ValueError(f"--sink: expected sqlite:///path/to/file.db, got {url!r}")
  return url[len(prefix) :]
