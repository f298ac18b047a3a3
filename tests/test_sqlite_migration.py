"""A database written by the first version of the pipeline opens in this one: its tables are
migrated in place (new dead-letter columns, nullable coordinates), no row is lost, and the
store then takes rows of the new layout."""

from __future__ import annotations

import base64
import sqlite3

import pytest

from transforms.events import decode_raw_value
from transforms.sinks.schema import DEAD_LETTERS, SENSOR_READINGS
from transforms.sinks.sqlite import SinkSchemaError, SqliteStore
from transforms.timestamps import iso_us

# The first version's layout (stage 1), as its SqliteStore created it.
_OLD_TABLES = [
  "CREATE TABLE sensor_readings (event_id TEXT NOT NULL, sensor_id TEXT NOT NULL, "
  "sensor_type TEXT NOT NULL, value REAL NOT NULL, latitude REAL NOT NULL, longitude REAL NOT NULL, "
  "event_time TEXT NOT NULL, metadata TEXT, window_start TEXT NOT NULL, window_end TEXT NOT NULL, "
  "is_late INTEGER NOT NULL, kafka_topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, "
  "kafka_offset INTEGER NOT NULL, written_at TEXT NOT NULL, "
  "UNIQUE (kafka_topic, kafka_partition, kafka_offset))",
  "CREATE TABLE dead_letters (raw_key TEXT, raw_value TEXT, error TEXT NOT NULL, "
  "stage TEXT NOT NULL, failed_at TEXT NOT NULL, kafka_topic TEXT NOT NULL, "
  "kafka_partition INTEGER NOT NULL, kafka_offset INTEGER NOT NULL, written_at TEXT NOT NULL, "
  "UNIQUE (kafka_topic, kafka_partition, kafka_offset))",
]
NOW = iso_us(1_705_314_600_000_000)


def _old_database(path) -> None:
  conn = sqlite3.connect(path)
  with conn:
    for sql in _OLD_TABLES:
      conn.execute(sql)
    conn.execute(
      "INSERT INTO sensor_readings VALUES ('e1', 's1', 'voltage', 230.0, 52.5, 13.4, ?, "
      "NULL, ?, ?, 0, 'sensors', 0, 7, ?)",
      (NOW, NOW, NOW, NOW),
    )
    conn.execute(
      "INSERT INTO dead_letters VALUES (NULL, ?, 'not_json: Expecting value', 'parse', ?, "
      "'sensors', 0, 8, ?)",
      (base64.b64encode(b"{oops").decode(), NOW, NOW),
    )
  conn.close()


def test_a_first_version_database_is_migrated_in_place_and_keeps_every_row(tmp_path):
  db = tmp_path / "old.db"
  _old_database(db)
  store = SqliteStore(str(db))
  store.open()
  try:
    conn = store._conn
    columns = {r[1]: bool(r[3]) for r in conn.execute("PRAGMA table_info(dead_letters)")}
    assert list(columns) == list(DEAD_LETTERS.names)
    (reason, encoding, truncated, raw) = conn.execute(
      "SELECT reason, raw_encoding, truncated, raw_value FROM dead_letters"
    ).fetchone()
    assert (reason, encoding, truncated) == ("not_json", "base64", 0)
    assert decode_raw_value(raw, encoding) == b"{oops"
    assert conn.execute("SELECT event_id, latitude FROM sensor_readings").fetchall() == [
      ("e1", 52.5)
    ]
    # A sensor without a location (NULL coordinates) goes in now; the old row still absorbs its replay.
    row = ("e2", "s2", "power", 3.5, None, None, NOW, None, NOW, NOW, False, "sensors", 0, 9, 9)
    replay = (
      "e1",
      "s1",
      "voltage",
      230.0,
      52.5,
      13.4,
      NOW,
      None,
      NOW,
      NOW,
      False,
      "sensors",
      0,
      7,
      7,
    )
    assert store.write(SENSOR_READINGS.name, [row, replay], NOW) == []
    assert conn.execute(
      "SELECT kafka_offset, latitude FROM sensor_readings ORDER BY 1"
    ).fetchall() == [(7, 52.5), (9, None)]
    assert store.stored_offsets("sensors", 0, 0) == {7, 8, 9}
  finally:
    store.close()
  # A second open finds the current layout and changes nothing.
  again = SqliteStore(str(db))
  again.open()
  try:
    assert again._conn.execute("SELECT COUNT(*) FROM sensor_readings").fetchone() == (2,)
    assert again._conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (1,)
  finally:
    again.close()


def test_a_table_with_columns_this_version_does_not_know_is_refused_not_dropped(tmp_path):
  db = tmp_path / "odd.db"
  _old_database(db)
  conn = sqlite3.connect(db)
  with conn:
    conn.execute("ALTER TABLE dead_letters ADD COLUMN operator_note TEXT")
  conn.close()
  with pytest.raises(SinkSchemaError, match=r"dead_letters.*operator_note.*new file"):
    SqliteStore(str(db)).open()
  conn = sqlite3.connect(db)
  assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (1,)
  conn.close()
