"""One row per event_id, durable SQLite writes and the start-up reconciliation (SkipStored).

SQLite on a real file; the pipeline tests run ``runners.main`` against the real broker.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.pipeline_support import (
  assert_exactly_once,
  committed,
  ends,
  produce_events,
  query,
  run_to_end,
)
from tools.produce import EventFactory
from transforms.acks import Ack
from transforms.events import parse_sensor, sensor_row
from transforms.kafka.records import KafkaRecord, RecordBatch
from transforms.reconcile import SkipStored
from transforms.rows import SENSOR_ROW, at_offset, coordinates, offset_of, stored
from transforms.sinks.base import DuplicateEvent, WriteBatches, rejected_dead_letter_row
from transforms.sinks.sqlite import SinkSchemaError, SqliteStore
from transforms.timestamps import iso_us

NOW = time.time()


def _rows(topic: str, partition: int, offsets, seed: int = 5) -> list[tuple]:
  f = EventFactory(seed)
  return [
    sensor_row(parse_sensor(f.sensor(NOW).value), 0, 60_000_000, False, topic, partition, o, o)
    for o in offsets
  ]


def _copy(row: tuple, offset: int) -> tuple:
  """The same event at another offset (the old producer's retry)."""
  return at_offset(row, offset)


@pytest.fixture
def store(tmp_path):
  s = SqliteStore(str(tmp_path / "sink.db"))
  s.open()
  yield s
  s.close()


def _written_at() -> str:
  return iso_us(int(time.time() * 1e6))


def test_sqlite_is_durable_before_commit(store):
  # FULL: a committed transaction is on disk (WAL synced) before the offsets move
  assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
  assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_first_copy_of_an_event_wins_and_later_copies_are_reported(store):
  rows = _rows("s", 0, range(5))
  assert store.write("sensor_readings", rows, _written_at()) == []
  # a replay of the same coordinates is absorbed silently; copies at new offsets are reported
  again = rows[:2] + [_copy(rows[1], 7), _copy(rows[3], 8)]
  rejected = store.write("sensor_readings", again, _written_at())
  assert [(offset_of(r), type(e)) for r, e in rejected] == [
    (7, DuplicateEvent),
    (8, DuplicateEvent),
  ]
  assert "s-0@1" in rejected[0][1] and "s-0@3" in rejected[1][1]
  # two copies inside one write: the first (in order) is stored
  fresh = _rows("s", 0, range(10, 11), seed=9)
  rejected = store.write("sensor_readings", fresh + [_copy(fresh[0], 12)], _written_at())
  assert [offset_of(r) for r, _ in rejected] == [12]
  stored = store._conn.execute(
    "SELECT kafka_offset FROM sensor_readings ORDER BY kafka_offset"
  ).fetchall()
  assert [o for (o,) in stored] == [0, 1, 2, 3, 4, 10]


def test_sqlite_pragmas_for_speed_keep_every_write_synced(store):
  # a larger page cache, fewer checkpoints; every COMMIT still syncs the WAL
  pragma = store._conn.execute
  assert pragma("PRAGMA cache_size").fetchone()[0] == -2048
  assert pragma("PRAGMA wal_autocheckpoint").fetchone()[0] == 10000
  assert pragma("PRAGMA synchronous").fetchone()[0] == 2


@pytest.mark.parametrize("with_bad_row", [False, True])
def test_a_large_write_reports_exactly_its_later_copies_in_order(store, with_bad_row):
  # more rows than one look-up query takes, over two partitions: replays are absorbed, copies
  # at new offsets (some events copied twice) are reported with the first copy's coordinates,
  # new rows go in; a row that breaks NOT NULL takes the row-by-row path, with the same result
  event_id = SENSOR_ROW.index("event_id")
  first = _rows("s", 0, range(700), seed=21) + _rows("s", 1, range(700), seed=22)
  assert store.write("sensor_readings", first, _written_at()) == []
  copies = [_copy(row, offset_of(row) + 10_000) for row in first[::2]] + [
    _copy(row, offset_of(row) + 20_000) for row in first[350:950]
  ]
  fresh = _rows("s", 1, range(700, 1000), seed=23)
  bad = [at_offset((None, *stored(fresh[0])[1:], 0), 5_000)] if with_bad_row else []
  mixed = [row for trio in zip(first, copies, fresh) for row in trio] + first[300:] + copies[300:]
  rejected = store.write("sensor_readings", mixed + bad, _written_at())
  copied = {coordinates(row) for row in copies}
  assert len(copied) == 1300
  duplicates = [(row, e) for row, e in rejected if isinstance(e, DuplicateEvent)]
  assert [row for row, _ in duplicates] == [row for row in mixed if coordinates(row) in copied]
  origin = {row[event_id]: coordinates(row) for row in first}
  for row, error in duplicates:
    topic, partition, offset = origin[row[event_id]]
    assert error.endswith(f"is stored already ({topic}-{partition}@{offset})"), error
  others = [(row, e) for row, e in rejected if not isinstance(e, DuplicateEvent)]
  assert [row for row, _ in others] == bad
  assert all("NOT NULL" in e for _, e in others)
  offsets = store._conn.execute(
    "SELECT kafka_partition, kafka_offset FROM sensor_readings ORDER BY 1, 2"
  ).fetchall()
  assert offsets == [(0, o) for o in range(700)] + [(1, o) for o in range(1000)]


def test_duplicates_are_acked_and_counted_not_written(tmp_path):
  db = tmp_path / "sink.db"
  rows = _rows("s", 0, range(4))
  copies = [_copy(rows[0], 4), _copy(rows[2], 5)]
  with BeamTestPipeline() as p:
    acks = (
      p
      | beam.Create([(("sensor_readings", 0), rows), (("sensor_readings", 0), copies)])
      | WriteBatches(SqliteStore(str(db)), retry_deadline_s=10)
    )
    assert_that(acks, equal_to([Ack("s", 0, 0, 6)]))  # the copies' offsets are acked too
  result = p.result
  counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
  assert counters.get("duplicate_events") == 2, counters
  assert counters.get("rows_rejected", 0) == 0
  with sqlite3.connect(db) as conn:
    assert [o for (o,) in conn.execute("SELECT kafka_offset FROM sensor_readings ORDER BY 1")] == [
      0,
      1,
      2,
      3,
    ]
    # ON CONFLICT (event_id) DO NOTHING, as the old consumer: a later copy is no dead letter
    assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (0,)


def test_existing_database_with_doubled_event_ids_fails_with_a_clear_message(tmp_path):
  db = tmp_path / "old.db"
  rows = _rows("s", 0, range(3))
  names = (
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
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "written_at",
  )
  with sqlite3.connect(db) as conn:  # a database of the first version: no event_id index
    conn.execute(
      f"CREATE TABLE sensor_readings ({', '.join(names)}, "
      f"UNIQUE (kafka_topic, kafka_partition, kafka_offset))"
    )
    for row in rows + [_copy(rows[1], 3)]:
      conn.execute(
        f"INSERT INTO sensor_readings VALUES ({', '.join('?' * len(names))})",
        stored(row) + ("2026-01-01T00:00:00Z",),
      )
  store = SqliteStore(str(db))
  with pytest.raises(
    SinkSchemaError, match=r"sensor_readings holds 1 event_ids more than once"
  ) as e:
    store.open()
  assert rows[1][0] in str(e.value) and "DELETE FROM sensor_readings" in str(e.value)
  assert not store.is_transient(e.value)
  with sqlite3.connect(db) as conn:  # the suggested fix works, then the store opens
    conn.execute(
      "DELETE FROM sensor_readings WHERE rowid NOT IN (SELECT MIN(rowid) FROM "
      "sensor_readings GROUP BY event_id)"
    )
  store.open()
  assert offset_of(store.write("sensor_readings", [_copy(rows[0], 9)], _written_at())[0][0]) == 9
  store.close()


def test_stored_offsets_look_in_every_table(store):
  store.write("sensor_readings", _rows("s", 0, [3, 5, 9]), _written_at())
  store.write("sensor_readings", _rows("s", 1, [4], seed=6), _written_at())
  store.write(
    "dead_letters",
    [rejected_dead_letter_row("sensor_readings", r, "x") for r in _rows("s", 0, [6], seed=7)],
    _written_at(),
  )
  assert store.stored_offsets("s", 0, 0) == {3, 5, 6, 9}
  assert store.stored_offsets("s", 0, 5) == {5, 6, 9}
  assert store.stored_offsets("s", 0, 4, 9) == {5, 6}
  assert store.stored_offsets("s", 1, 0) == {4}
  assert store.stored_offsets("other", 0, 0) == set()


def _record(topic, partition, offset, covers_from=None):
  return KafkaRecord(
    topic, partition, offset, offset if covers_from is None else covers_from, b"k", b"{}", 0
  )


def test_skip_stored_passes_new_records_and_acks_the_stored_ones(tmp_path):
  db = tmp_path / "sink.db"
  s = SqliteStore(str(db))
  s.open()
  s.write("sensor_readings", _rows("s", 0, [2, 3, 4, 7]), _written_at())
  s.write("sensor_readings", _rows("s", 1, [0], seed=8), _written_at())
  s.write("sensor_readings", _rows("s", 2, [5], seed=10), _written_at())
  s.close()
  # partition 0 from offset 1 (a gap of transaction markers between 4 and 7)
  records = (
    [
      _record("s", 0, 1),
      _record("s", 0, 2),
      _record("s", 0, 3),
      _record("s", 0, 4),
      _record("s", 0, 7, covers_from=5),
      _record("s", 0, 8),
    ]
    + [_record("s", 1, 0), _record("s", 1, 1)]
    + [_record("s", 2, 5, covers_from=3)]
  )  # acked when the bundle ends
  with BeamTestPipeline() as p:
    # a window of 3 offsets: partition 0 is queried at 1 ([1, 4)), 4 ([4, 7)) and 7 ([7, 10))
    kept, acks = (
      p | beam.Create(records, reshuffle=False) | SkipStored(SqliteStore(str(db)), window_offsets=3)
    )
    assert_that(
      kept | beam.Map(lambda r: (r.partition, r.offset)),
      equal_to([(0, 1), (0, 8), (1, 1)]),
      label="kept",
    )
    merged = acks | beam.Map(lambda a: (a.topic, a.partition, a.start, a.end))
    # skipped records are acked over their whole covered range, nothing else is
    assert_that(
      merged | "Offsets" >> beam.FlatMap(lambda a: [(a[1], o) for o in range(a[2], a[3])]),
      equal_to([(0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (1, 0), (2, 3), (2, 4), (2, 5)]),
      label="acked",
    )


def test_skip_stored_splits_poll_batches_as_it_splits_records(tmp_path):
  """The reader's poll batches (ReadFromKafka(batched=True)): the records kept leave as one
  batch per input batch, in order, and the acks cover the same offsets as record by record."""
  db = tmp_path / "sink.db"
  s = SqliteStore(str(db))
  s.open()
  s.write("sensor_readings", _rows("s", 0, [2, 3, 4, 7]), _written_at())
  s.write("sensor_readings", _rows("s", 1, [0, 1], seed=8), _written_at())
  s.close()
  batches = [
    RecordBatch([_record("s", 0, 1), _record("s", 0, 2), _record("s", 0, 3)]),
    RecordBatch([_record("s", 0, 4), _record("s", 0, 7, covers_from=5), _record("s", 0, 8)]),
    RecordBatch([_record("s", 0, 9), _record("s", 0, 10)]),  # none stored: passed on as it is
    RecordBatch([_record("s", 1, 0), _record("s", 1, 1)]),  # all stored: no batch leaves
  ]

  def offsets_acked(acks):
    return acks | beam.FlatMap(lambda a: [(a.partition, o) for o in range(a.start, a.end)])

  with BeamTestPipeline() as p:
    kept, acks = (
      p | beam.Create(batches, reshuffle=False) | SkipStored(SqliteStore(str(db)), window_offsets=3)
    )
    assert_that(
      kept | beam.Map(lambda b: (type(b).__name__, [(r.partition, r.offset) for r in b])),
      equal_to(
        [("RecordBatch", [(0, 1)]), ("RecordBatch", [(0, 8)]), ("RecordBatch", [(0, 9), (0, 10)])]
      ),
      label="kept",
    )
    assert_that(
      offsets_acked(acks),
      equal_to([(0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (1, 0), (1, 1)]),
      label="acked",
    )


def test_skip_stored_refuses_a_bad_deadline(tmp_path):
  with pytest.raises(ValueError, match="sink_retry_deadline_secs"):
    SkipStored(SqliteStore(str(tmp_path / "x.db")), retry_deadline_s=0)
  with pytest.raises(ValueError, match="window_offsets"):
    SkipStored(SqliteStore(str(tmp_path / "x.db")), window_offsets=0)


# ---------------------------------------------------------------------------
# The pipeline (real broker, real SQLite file)


@pytest.mark.integration
def test_replay_with_a_new_group_writes_nothing_twice_and_commits_everything(
  kafka_bootstrap, make_topic, tmp_path
):
  sensor, meter = make_topic(2, "rcsensor"), make_topic(2, "rcmeter")
  f = EventFactory(71)
  events = list(f.events(300, meter_ratio=0.3, start=NOW - 60, spacing_s=0.1))
  produced = produce_events(kafka_bootstrap, sensor, meter, events)
  first = run_to_end(kafka_bootstrap, sensor, meter, "g1", tmp_path, "--num_shards=2")
  assert first.proc.returncode == 0, first.tail()
  db = first.db
  before = query(
    db,
    "SELECT kafka_topic, kafka_partition, kafka_offset, written_at FROM "
    "sensor_readings UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset, "
    "written_at FROM meter_readings",
  )
  # a new group from the earliest offset: every record is read again, none is written again
  replay = run_to_end(
    kafka_bootstrap, sensor, meter, "g2", tmp_path, "--start=earliest", "--num_shards=2"
  )
  assert replay.proc.returncode == 0, replay.tail()
  assert replay.summary_read() == len(produced)
  assert replay.summary_written() == 0, replay.tail()  # skipped before parsing, not absorbed
  after = query(
    db,
    "SELECT kafka_topic, kafka_partition, kafka_offset, written_at FROM "
    "sensor_readings UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset, "
    "written_at FROM meter_readings",
  )
  assert sorted(after) == sorted(before)  # not even rewritten: written_at unchanged
  assert_exactly_once(db, produced)
  c, e = committed(kafka_bootstrap, "g2", sensor, meter), ends(kafka_bootstrap, sensor, meter)
  assert {k: v for k, v in c.items() if e[k]} == {k: v for k, v in e.items() if v}


@pytest.mark.integration
def test_the_old_producers_duplicates_are_stored_once_and_committed(
  kafka_bootstrap, make_topic, tmp_path
):
  sensor, meter = make_topic(2, "dupsensor"), make_topic(2, "dupmeter")
  f = EventFactory(72)
  events = list(f.events(120, meter_ratio=0.3, start=NOW - 60, spacing_s=0.2))
  # a retry without idempotence: the same key and value again, at a new offset
  copies = [events[i] for i in range(0, 120, 10)]
  produced = produce_events(kafka_bootstrap, sensor, meter, events + copies)
  run = run_to_end(kafka_bootstrap, sensor, meter, "g", tmp_path, "--num_shards=2")
  assert run.proc.returncode == 0, run.tail()
  ids = [
    r[0]
    for r in query(
      run.db, "SELECT event_id FROM sensor_readings UNION ALL SELECT event_id FROM meter_readings"
    )
  ]
  assert sorted(ids) == sorted(json.loads(e.value)["event_id"] for e in events)
  assert query(run.db, "SELECT COUNT(*) FROM dead_letters") == [(0,)]
  # every offset is in exactly one table, except the copies (the later offset of each pair),
  # which are in none: acked, committed and counted
  assert_exactly_once(run.db, produced[: len(events)])
  stored = {
    tuple(r)
    for r in query(
      run.db,
      "SELECT kafka_topic, kafka_partition, kafka_offset "
      "FROM sensor_readings UNION ALL SELECT kafka_topic, "
      "kafka_partition, kafka_offset FROM meter_readings",
    )
  }
  assert not stored & set(produced[len(events) :])
  line = re.search(
    r"duplicate events \(later copies of a stored event_id, acked, not written\): (.*)", run.output
  )
  assert line, run.tail()
  assert sum(int(n) for n in re.findall(r"=(\d+)", line.group(1))) == len(copies), line.group(0)
  c, e = committed(kafka_bootstrap, "g", sensor, meter), ends(kafka_bootstrap, sensor, meter)
  assert {k: v for k, v in c.items() if e[k]} == {k: v for k, v in e.items() if v}
