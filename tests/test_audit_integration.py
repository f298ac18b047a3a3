"""``audit`` against the real broker and a real SQLite file (and the BigQuery emulator).

The sink is filled through the project's own stores with rows at chosen Kafka coordinates
(built column by column from ``transforms.sinks.schema``, so they follow the tables whatever
columns they gain; the audit needs only the coordinates and event_id), offsets are committed
by an independent client, and each test checks the audit's findings offset by offset.
"""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from tests import pipeline_support
from tools import audit
from transforms.sinks.schema import TABLES
from transforms.sinks.sqlite import SqliteStore

pytestmark = pytest.mark.integration

WRITTEN_AT = "2026-11-30T12:00:00+00:00"
_BY_TYPE = {
  "TIMESTAMP": WRITTEN_AT,
  "INT64": 0,
  "INTEGER": 0,
  "BOOL": 0,
  "BOOLEAN": 0,
  "FLOAT64": 1.0,
  "FLOAT": 1.0,
  "STRING": "x",
}
_BY_NAME = {
  "reason": "not_json",
  "raw_encoding": "utf8",
  "error": "test row",
  "stage": "parse",
  "sensor_type": "voltage",
  "unit": "kWh",
  "truncated": 0,
}


def make_row(
  table: str, topic: str, partition: int, offset: int, event_id: str | None = None, **values
) -> tuple:
  """A pipeline row tuple for ``table`` at (topic, partition, offset), covers_from = offset."""
  out = []
  for c in TABLES[table].columns:
    name = c.name
    if name == "written_at":
      continue
    if name in values:
      out.append(values[name])
    elif name == "kafka_topic":
      out.append(topic)
    elif name == "kafka_partition":
      out.append(partition)
    elif name == "kafka_offset":
      out.append(offset)
    elif name == "event_id":
      out.append(event_id or f"ev-{topic}-{partition}-{offset}")
    elif name in _BY_NAME:
      out.append(_BY_NAME[name])
    elif not c.required:
      out.append(None)
    else:
      out.append(_BY_TYPE.get(c.bq_type, "x"))
  return (*out, offset)


def write_rows(store, table: str, rows: list) -> None:
  store.open()
  rejected = store.write(table, rows, WRITTEN_AT)
  assert not rejected, f"the store refused test rows: {rejected[:2]}"


def commit(bootstrap: str, group: str, offsets: dict) -> None:
  """{(topic, partition): offset} committed to the group without joining it."""
  c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
  try:
    c.commit(
      offsets={TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
    )
  finally:
    c.close(autocommit=False)


def produce_json(
  bootstrap: str, topic: str, bodies: list[dict], partition: int | None = None, **producer_config
) -> list[tuple[int, int]]:
  """Sends JSON bodies (keyed by their event_id); returns (partition, offset) of each."""
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer_config)
  try:
    futures = [
      producer.send(
        topic,
        key=str(b.get("event_id")).encode(),
        value=json.dumps(b).encode(),
        partition=partition,
      )
      for b in bodies
    ]
    producer.flush()
    return [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
  finally:
    producer.close()


def sensor_body(i: int, event_id: str | None = None) -> dict:
  return {
    "event_id": event_id or str(uuid.uuid4()),
    "sensor_id": f"sensor-{i % 7}",
    "sensor_type": "voltage",
    "value": 230.0 + i,
    "location": {"lat": 50.0, "lon": 8.0},
    "timestamp": "2026-11-30T12:00:00+00:00",
  }


def meter_body(i: int) -> dict:
  return {
    "event_id": str(uuid.uuid4()),
    "meter_id": f"meter-{i % 5}",
    "customer_id": "c-1",
    "reading": 10.0 + i,
    "unit": "kWh",
    "timestamp": "2026-11-30T12:00:00+00:00",
  }


class Env:
  """Two fresh topics (2 partitions each), a group, a SQLite file; runs the audit in-process."""

  def __init__(self, bootstrap: str, make_topic, tmp_path):
    self.bootstrap = bootstrap
    self.sensor = make_topic(2, "audit-s")
    self.meter = make_topic(2, "audit-m")
    self.group = f"audit-{uuid.uuid4().hex[:8]}"
    self.db = tmp_path / "sink.db"
    self.store = SqliteStore(str(self.db))
    self.store.open()

  def args(self, *extra: str) -> list[str]:
    return [
      "--bootstrap_servers",
      self.bootstrap,
      "--sensor_topic",
      self.sensor,
      "--meter_topic",
      self.meter,
      "--group_id",
      self.group,
      "--sink",
      f"sqlite:///{self.db}",
      *extra,
    ]

  def audit(self, capsys, *extra: str) -> tuple[int, dict, str]:
    """(exit code, --json report, text report) of the command line, run in this process."""
    capsys.readouterr()
    code = audit.main(self.args("--json", *extra))
    out = capsys.readouterr().out
    code_text = audit.main(self.args(*extra))
    text = capsys.readouterr().out
    assert code == code_text, (code, code_text, text)
    return code, json.loads(out), text

  def produce_all(self, n_sensor: int = 30, n_meter: int = 12) -> dict:
    """Produces events and writes every one of them to the sink; returns {(topic, p): [offsets]}."""
    coords: dict = {}
    for topic, table, bodies in (
      (self.sensor, "sensor_readings", [sensor_body(i) for i in range(n_sensor)]),
      (self.meter, "meter_readings", [meter_body(i) for i in range(n_meter)]),
    ):
      placed = produce_json(self.bootstrap, topic, bodies)
      rows = [make_row(table, topic, p, o, b["event_id"]) for (p, o), b in zip(placed, bodies)]
      write_rows(self.store, table, rows)
      for p, o in placed:
        coords.setdefault((topic, p), []).append(o)
    return coords

  def commit_ends(self, coords: dict) -> None:
    commit(self.bootstrap, self.group, {k: max(v) + 1 for k, v in coords.items()})

  def delete(self, table: str, topic: str, partition: int, offset: int) -> None:
    conn = sqlite3.connect(self.db)
    with conn:
      n = conn.execute(
        f"DELETE FROM {table} WHERE kafka_topic = ? AND kafka_partition = ? AND kafka_offset = ?",
        (topic, partition, offset),
      ).rowcount
    conn.close()
    assert n == 1


def _part(report: dict, topic: str, partition: int) -> dict:
  [p] = [p for p in report["partitions"] if (p["topic"], p["partition"]) == (topic, partition)]
  return p


@pytest.fixture
def env(kafka_bootstrap, make_topic, tmp_path):
  e = Env(kafka_bootstrap, make_topic, tmp_path)
  yield e
  e.store.close()


def test_a_clean_sink_passes_offset_by_offset(env, capsys):
  coords = env.produce_all()
  env.commit_ends(coords)
  code, report, text = env.audit(capsys)
  assert code == 0, text
  assert report["ok"] is True
  totals = report["totals"]
  assert totals["records"] == 42 and totals["in_sink"] == 42
  assert (totals["missing"], totals["doubled"], totals["pending"], totals["not_records"]) == (
    0,
    0,
    0,
    0,
  )
  assert len(report["partitions"]) == 4
  for (topic, p), offsets in coords.items():
    part = _part(report, topic, p)
    assert part["records"] == len(offsets) == part["end"] == part["committed"]
  assert text.startswith("Audit of sqlite:///") and "OK: 42 records, 42 in the sink" in text


def test_a_deleted_row_is_missing_with_its_offset_and_the_commit_is_ahead(env, capsys):
  coords = env.produce_all()
  env.commit_ends(coords)
  topic, p = env.sensor, min(p for (t, p) in coords if t == env.sensor)
  victim = sorted(coords[(topic, p)])[3]
  env.delete("sensor_readings", topic, p, victim)
  code, report, text = env.audit(capsys)
  assert code == 1
  part = _part(report, topic, p)
  assert part["missing"] == 1 and part["first_missing"] == [victim]
  assert part["missing_ranges"] == [[victim, victim + 1]]
  assert part["committed_ahead"] is True and part["ok"] is False
  assert report["totals"]["missing"] == 1 and report["totals"]["in_sink"] == 41
  assert f"first missing: {victim})" in text
  assert f"committed offset {part['committed']} is ahead of the sink" in text
  assert all(
    q["ok"]
    for q in report["partitions"]
    if q is not part and (q["topic"], q["partition"]) != (topic, p)
  )


def test_records_past_the_committed_offset_are_pending_unless_strict(env, capsys):
  coords = env.produce_all()
  # the meter partition with the most records (keys spread at random: the first may hold 2)
  topic = env.meter
  p = max((q for (t, q) in coords if t == topic), key=lambda q: len(coords[(topic, q)]))
  offsets = sorted(coords[(topic, p)])
  assert len(offsets) >= 3
  for o in offsets[-2:]:
    env.delete("meter_readings", topic, p, o)
  committed = {k: max(v) + 1 for k, v in coords.items()}
  committed[(topic, p)] = offsets[-2]  # the group has not got to the last two
  commit(env.bootstrap, env.group, committed)
  code, report, text = env.audit(capsys)
  assert code == 0, text
  part = _part(report, topic, p)
  assert (part["missing"], part["pending"], part["committed_ahead"]) == (0, 2, False)
  assert part["pending_ranges"] == [[offsets[-2], offsets[-1] + 1]]
  assert "pending, not missing" in text
  code, report, text = env.audit(capsys, "--strict")
  assert code == 1
  part = _part(report, topic, p)
  assert (part["missing"], part["pending"], part["first_missing"]) == (2, 0, offsets[-2:])
  # the same two rows, committed past: missing and committed ahead without --strict too
  committed[(topic, p)] = offsets[-1] + 1
  commit(env.bootstrap, env.group, committed)
  code, report, _ = env.audit(capsys)
  part = _part(report, topic, p)
  assert code == 1 and part["missing"] == 2 and part["committed_ahead"] is True


def test_the_same_coordinates_in_two_tables_are_doubled(env, capsys):
  coords = env.produce_all()
  env.commit_ends(coords)
  topic, p = env.sensor, max(p for (t, p) in coords if t == env.sensor)
  offset = sorted(coords[(topic, p)])[1]
  write_rows(env.store, "dead_letters", [make_row("dead_letters", topic, p, offset)])
  code, report, text = env.audit(capsys)
  assert code == 1
  part = _part(report, topic, p)
  assert (part["doubled"], part["doubled_rows"], part["missing"]) == (1, 1, 0)
  assert part["doubled_examples"] == [[offset, ["dead_letters", "sensor_readings"]]]
  assert f"{offset} in dead_letters and sensor_readings" in text
  assert report["totals"]["in_sink"] == 42  # distinct coordinates


def test_a_committed_offset_past_the_end_is_ahead(env, capsys):
  coords = env.produce_all(n_sensor=4, n_meter=4)
  committed = {k: max(v) + 1 for k, v in coords.items()}
  key = next(iter(committed))
  committed[key] += 50  # e.g. the topic was recreated and its offsets started again
  commit(env.bootstrap, env.group, committed)
  code, report, text = env.audit(capsys)
  assert code == 1
  part = _part(report, *key)
  assert part["committed_ahead"] is True and part["missing"] == 0
  assert f"past the end offset {part['end']}" in text


def test_aborted_transactions_are_not_expected_but_not_records_in_the_sink_are(env, capsys):
  topic = env.sensor
  tx = KafkaProducer(bootstrap_servers=env.bootstrap, transactional_id=f"audit-{env.group}")
  placed: list = []
  aborted: list = []
  try:
    tx.init_transactions()
    for i, keep in enumerate((True, False, True, False, True)):
      tx.begin_transaction()
      futures = [
        tx.send(topic, value=json.dumps(sensor_body(i * 10 + j)).encode(), partition=0)
        for j in range(3)
      ]
      tx.flush()
      metas = [f.get(timeout=30) for f in futures]
      if keep:
        tx.commit_transaction()
        placed += [(m.partition, m.offset) for m in metas]
      else:
        tx.abort_transaction()
        aborted += [m.offset for m in metas]
  finally:
    tx.close()
  write_rows(
    env.store, "sensor_readings", [make_row("sensor_readings", topic, p, o) for p, o in placed]
  )
  end = max(o for _, o in placed) + 2  # past the last commit marker
  commit(env.bootstrap, env.group, {(topic, 0): end})
  code, report, text = env.audit(capsys)
  assert code == 0, text
  part = _part(report, topic, 0)
  assert part["records"] == 9 and part["end"] == end == 9 + 6 + 5  # records, aborted, markers
  assert (part["missing"], part["not_records"]) == (0, 0)
  # A row for an aborted record is a row for something Kafka never delivered.
  write_rows(env.store, "dead_letters", [make_row("dead_letters", topic, 0, aborted[0])])
  code, report, text = env.audit(capsys)
  part = _part(report, topic, 0)
  assert (
    code == 1
    and part["not_records"] == 1
    and part["not_record_ranges"] == [[aborted[0], aborted[0] + 1]]
  )
  assert "hold no committed record" in text


def test_a_later_copy_of_a_stored_event_id_is_a_duplicate_event_not_missing(env, capsys):
  topic = env.sensor
  first = sensor_body(1)
  placed = produce_json(env.bootstrap, topic, [first, sensor_body(2), dict(first)], partition=1)
  # the sink keeps the first copy only (one row per event_id)
  write_rows(
    env.store,
    "sensor_readings",
    [
      make_row("sensor_readings", topic, 1, o, b["event_id"])
      for (_, o), b in zip(placed[:2], [first, {"event_id": None}])
    ],
  )
  commit(env.bootstrap, env.group, {(topic, 1): placed[-1][1] + 1})
  code, report, text = env.audit(capsys)
  assert code == 0, text
  part = _part(report, topic, 1)
  assert (part["records"], part["missing"], part["duplicate_events"]) == (3, 0, 1)
  assert part["duplicate_examples"] == [
    [placed[2][1], first["event_id"], f"{topic}-1@{placed[0][1]}"]
  ]
  assert f"duplicate event at {placed[2][1]}" in text


def test_a_bad_option_is_named(env, capsys):
  assert audit.main(env.args("--sink", "postgres://x")) == 2
  assert "--sink" in capsys.readouterr().err
  assert audit.main(env.args("--sink", f"sqlite:///{env.db}.absent")) == 2
  assert "no SQLite file" in capsys.readouterr().err


def test_the_pipeline_s_own_output_passes_the_audit(env, capsys, tmp_path):
  """A batch run of the real pipeline over valid and malformed events, then the audit."""
  from tools.produce import EventFactory

  events = list(EventFactory(seed=5).events(300, bad_ratio=0.1))
  produced = pipeline_support.produce_events(env.bootstrap, env.sensor, env.meter, events)
  env.store.close()
  env.db.unlink()
  run = pipeline_support.run_to_end(
    env.bootstrap, env.sensor, env.meter, env.group, tmp_path, timeout=240
  )
  assert run.proc.returncode == 0, run.tail()
  env.db = run.db
  code, report, text = env.audit(capsys, "--strict")
  assert code == 0, text
  assert report["totals"]["records"] == len(produced) == report["totals"]["in_sink"]
  rows = sum(len(v) for v in pipeline_support.sink_offsets(run.db).values())
  assert rows == len(produced)
  # and one row deleted afterwards is caught
  t, p, o = produced[len(produced) // 2]
  conn = sqlite3.connect(run.db)
  with conn:
    n = sum(
      conn.execute(
        f"DELETE FROM {tb} WHERE kafka_topic=? AND kafka_partition=? AND kafka_offset=?", (t, p, o)
      ).rowcount
      for tb in TABLES
    )
  conn.close()
  assert n == 1
  code, report, _ = env.audit(capsys)
  assert code == 1 and _part(report, t, p)["first_missing"] == [o]


def test_audit_reads_bigquery_doubled_and_missing_rows(env, capsys, bq_emulator):
  from transforms.sinks.bigquery import BigQueryStore, json_row

  dataset = f"audit_{uuid.uuid4().hex[:8]}"
  store = BigQueryStore(
    bq_emulator.project,
    dataset,
    api_endpoint=bq_emulator.endpoint,
    write_method="streaming_inserts",
  )
  topic = env.sensor
  bodies = [sensor_body(i) for i in range(12)]
  bodies[11] = dict(bodies[0])  # a later copy of the first event: not stored, not missing
  placed = produce_json(env.bootstrap, topic, bodies, partition=0)
  offsets = [o for _, o in placed]
  rows = [make_row("sensor_readings", topic, 0, o, b["event_id"]) for o, b in zip(offsets, bodies)]
  write_rows(store, "sensor_readings", rows[:5] + rows[6:11])  # offset 5 never written
  write_rows(store, "dead_letters", [make_row("dead_letters", topic, 0, offsets[7])])  # doubled
  # and a second copy of offset 9 in the same table, past insertId de-duplication
  client = bq_emulator.client()
  errors = client.insert_rows_json(
    f"{bq_emulator.project}.{dataset}.sensor_readings",
    [json_row(TABLES["sensor_readings"], rows[9], WRITTEN_AT)],
    row_ids=["another-insert-id"],
  )
  assert not errors
  commit(env.bootstrap, env.group, {(topic, 0): offsets[-1] + 1})
  sink = [
    "--sink",
    f"bigquery://{bq_emulator.project}/{dataset}",
    "--bigquery_api_endpoint",
    bq_emulator.endpoint,
  ]
  capsys.readouterr()
  code = audit.main([*env.args("--json"), *sink])
  report = json.loads(capsys.readouterr().out)
  assert code == 1
  part = _part(report, topic, 0)
  assert (part["records"], part["in_sink"], part["missing"]) == (12, 10, 1)
  assert part["duplicate_events"] == 1
  assert part["duplicate_examples"] == [
    [offsets[11], bodies[0]["event_id"], f"{topic}-0@{offsets[0]}"]
  ]
  assert part["first_missing"] == [offsets[5]] and part["committed_ahead"] is True
  assert part["doubled"] == 2 and part["doubled_rows"] == 2
  assert sorted(e[0] for e in part["doubled_examples"]) == [offsets[7], offsets[9]]
  assert [offsets[9], ["sensor_readings", "sensor_readings"]] in part["doubled_examples"]
  assert report["sink"] == f"bigquery://{bq_emulator.project}/{dataset}"
  store.close()


def test_run_pipeline_sh_audit_runs_the_tool(env):
  import subprocess
  from pathlib import Path

  repo = Path(__file__).resolve().parent.parent
  coords = env.produce_all(n_sensor=3, n_meter=2)
  env.commit_ends(coords)
  proc = subprocess.run(
    [str(repo / "run_pipeline.sh"), "audit", *env.args("--strict")],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "OK: 5 records, 5 in the sink" in proc.stdout
  proc = subprocess.run(
    [str(repo / "run_pipeline.sh"), "audit", *env.args("--group_id=")],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 2 and "--group_id" in proc.stderr, proc.stderr


def test_recorded_gaps_are_listed_and_duplicate_dead_letters_counted(env, capsys, tmp_path):
  """Dead letters with a reason: 'offset_gap' marks a skipped range (listed, not a record), a
  'duplicate_event' one stands for a later copy of a stored event (present and counted).
  The tables are made here with only the columns the audit reads."""
  topic = env.sensor
  placed = produce_json(env.bootstrap, topic, [sensor_body(i) for i in range(6)], partition=0)
  offsets = [o for _, o in placed]
  env.db = tmp_path / "minimal.db"
  conn = sqlite3.connect(env.db)
  with conn:
    for table in ("sensor_readings", "meter_readings"):
      conn.execute(
        f"CREATE TABLE {table} (event_id TEXT, kafka_topic TEXT, kafka_partition INTEGER, "
        "kafka_offset INTEGER)"
      )
    conn.execute(
      "CREATE TABLE dead_letters (reason TEXT, error TEXT, kafka_topic TEXT, "
      "kafka_partition INTEGER, kafka_offset INTEGER)"
    )
    conn.executemany(
      "INSERT INTO sensor_readings VALUES (?, ?, 0, ?)", [(f"e{o}", topic, o) for o in offsets[:5]]
    )
    conn.execute(
      "INSERT INTO dead_letters VALUES ('duplicate_event', 'e0 stored at 0', ?, 0, ?)",
      (topic, offsets[5]),
    )
    # a gap recorded at an offset where the topic holds a record: a marker, not that record
    conn.execute(
      "INSERT INTO dead_letters VALUES ('offset_gap', 'skipped offsets 900-999', ?, 0, ?)",
      (topic, offsets[2]),
    )
  conn.close()
  commit(env.bootstrap, env.group, {(topic, 0): offsets[-1] + 1})
  code, report, text = env.audit(capsys)
  assert code == 0, text
  part = _part(report, topic, 0)
  assert part["recorded_gaps"] == [{"offset": offsets[2], "error": "skipped offsets 900-999"}]
  assert (part["records"], part["in_sink"], part["duplicate_events"], part["doubled"]) == (
    6,
    6,
    1,
    0,
  )
  assert report["totals"]["recorded_gaps"] == 1
  assert f"recorded gap at {offsets[2]}: skipped offsets 900-999" in text
  # without its reading row, the record under the gap marker is missing
  conn = sqlite3.connect(env.db)
  with conn:
    conn.execute("DELETE FROM sensor_readings WHERE kafka_offset = ?", (offsets[2],))
  conn.close()
  code, report, _ = env.audit(capsys)
  assert code == 1 and _part(report, topic, 0)["first_missing"] == [offsets[2]]
