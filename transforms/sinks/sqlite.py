"""The embedded default store: one SQLite file in WAL mode.

Idempotent: every table is unique on (kafka_topic, kafka_partition, kafka_offset)
and rows go in with ``INSERT ... ON CONFLICT DO NOTHING``, one transaction per
write, so a replay after a crash adds nothing. ``synchronous=NORMAL`` in WAL mode
keeps every committed transaction through a process crash (SIGKILL); only a
power loss can take back the last ones. Several writers (threads, processes)
share the file through SQLite's locking; a busy database is a transient error.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Optional

from transforms.sinks.schema import TABLES, Table


def create_table_sql(table: Table) -> list[str]:
  cols = ", ".join(f"{c.name} {c.sqlite_type}{' NOT NULL' if c.required else ''}"
                   for c in table.columns)
  return [f"CREATE TABLE IF NOT EXISTS {table.name} ({cols}, "
          f"UNIQUE (kafka_topic, kafka_partition, kafka_offset))"]


def insert_sql(table: Table) -> str:
  names = table.names
  return (f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
          f"ON CONFLICT (kafka_topic, kafka_partition, kafka_offset) DO NOTHING")


class SqliteStore:
  """A ``Store`` (see ``transforms.sinks.base``) over one SQLite file."""

  def __init__(self, path: str, busy_timeout_ms: int = 5000):
    self.path = path
    self.busy_timeout_ms = busy_timeout_ms
    self._conn: Optional[sqlite3.Connection] = None
    self._sql = {name: insert_sql(t) for name, t in TABLES.items()}

  def __getstate__(self):
    return {"path": self.path, "busy_timeout_ms": self.busy_timeout_ms}

  def __setstate__(self, state):
    self.__init__(**state)

  def open(self) -> None:
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
    with conn:
      for table in TABLES.values():
        for statement in create_table_sql(table):
          conn.execute(statement)
    self._conn = conn

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
    params = [row[:-1] + (written_at,) for row in rows]
    conn = self._conn
    try:
      conn.execute("BEGIN IMMEDIATE")
      conn.executemany(sql, params)
      conn.execute("COMMIT")
      return []
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
      for row, p in zip(rows, params):
        try:
          conn.execute(sql, p)
        except sqlite3.IntegrityError as e:
          rejected.append((row, str(e)))
      conn.execute("COMMIT")
    except BaseException:
      if conn.in_transaction:
        conn.execute("ROLLBACK")
      raise
    return rejected


def sqlite_path_from_url(url: str) -> str:
  """'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db' -> the file path."""
  prefix = "sqlite:///"
  if not url.startswith(prefix) or len(url) == len(prefix):
    raise ValueError(f"--sink: expected sqlite:///path/to/file.db, got {url!r}")
  return url[len(prefix):]
