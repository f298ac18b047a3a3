"""The Storage Write API path of the BigQuery store, against the local emulator through the
official clients (google-cloud-bigquery, google-cloud-bigquery-storage over gRPC).

Faults: a TCP proxy that cuts the gRPC connection (``tests.faulty_proxy.TcpProxy``), a write
client whose append is applied but whose answer is lost, and a stream finalized behind the
writer's back. Every test reads BigQuery back and checks each offset is there exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from tests.faulty_proxy import TcpProxy
from tools.produce import EventFactory
from transforms.events import parse_sensor, sensor_row
from transforms.retry import with_retries
from transforms.rows import at_offset, offset_of
from transforms.sinks.base import DuplicateEvent, rejected_dead_letter_row
from transforms.sinks.bigquery import MAX_INSERT_ID_CHARS, BigQueryStore, row_id
from transforms.sinks.bigquery_storage import (
  MAX_REQUEST_BYTES,
  encode_rows,
  request_chunks,
  row_message,
  timestamp_micros,
)
from transforms.sinks.schema import DEAD_LETTERS, SENSOR_READINGS, TABLES
from transforms.timestamps import iso_us

PROJECT = "test-project"
NOW = time.time()
LONG_TOPIC = ("t" * 240) + "-sensor00"  # 249 characters, Kafka's longest topic name


def _dataset() -> str:
  return f"sw_{uuid.uuid4().hex[:10]}"


def _rows(topic: str, partition: int, offsets, seed: int = 5) -> list[tuple]:
  f = EventFactory(seed)
  return [
    sensor_row(parse_sensor(f.sensor(NOW).value), 0, 60_000_000, False, topic, partition, o, o)
    for o in offsets
  ]


def _written_at() -> str:
  return iso_us(int(time.time() * 1e6))


def _store(emulator, dataset: str, **kw) -> BigQueryStore:
  kw.setdefault("storage_api_endpoint", emulator.grpc_address)
  store = BigQueryStore(PROJECT, dataset, api_endpoint=emulator.endpoint, **kw)
  store.open()
  return store


def _offsets(client, dataset: str, table: str = "sensor_readings") -> Counter:
  return Counter(
    tuple(r.values())
    for r in client.query_and_wait(
      f"SELECT kafka_topic, kafka_partition, kafka_offset FROM `{PROJECT}.{dataset}.{table}`"
    )
  )


def _assert_once(client, dataset: str, expected, table: str = "sensor_readings") -> None:
  got = _offsets(client, dataset, table)
  doubled = {k: n for k, n in got.items() if n > 1}
  assert not doubled, f"{len(doubled)} offsets stored more than once, e.g. {list(doubled)[:3]}"
  assert set(got) == set(expected), (
    sorted(set(expected) - set(got))[:5],
    sorted(set(got) - set(expected))[:5],
  )


# ---------------------------------------------------------------------------
# Pure helpers


def test_rows_encode_as_proto2_with_zeros_kept_and_timestamps_in_micros():
  cls, descriptor = row_message(SENSOR_READINGS)
  assert [f.name for f in descriptor.field] == list(SENSOR_READINGS.names)
  assert all(f.label == f.LABEL_OPTIONAL for f in descriptor.field)
  row = _rows("s", 0, [0])[0]
  row = row[:3] + (0.0,) + row[4:10] + (0,) + row[11:]  # value 0.0, is_late false
  (data,), refused = encode_rows(SENSOR_READINGS, [row], "2026-11-30T10:00:00.000001Z")
  assert refused == {}
  msg = cls.FromString(data)
  assert msg.HasField("value") and msg.value == 0.0  # proto2: a zero is a value, not NULL
  assert msg.HasField("is_late") and msg.is_late is False
  assert msg.written_at == timestamp_micros("2026-11-30T10:00:00.000001Z") == 1796032800000001
  assert msg.event_time == timestamp_micros(row[6])
  assert not msg.HasField("metadata") or row[7] is not None


def test_rows_bigquery_would_refuse_are_refused_before_the_append():
  rows = _rows("s", 0, range(5))
  rows[0] = (None,) + rows[0][1:]
  rows[2] = rows[2][:7] + ('{"note": "\\ud800"}',) + rows[2][8:]
  rows[3] = rows[3][:7] + ('{"x": NaN}',) + rows[3][8:]
  rows[4] = rows[4][:7] + ('{"x": 1e400}',) + rows[4][8:]
  encoded, refused = encode_rows(SENSOR_READINGS, rows, _written_at())
  assert encoded[1] is not None and [encoded[i] for i in (0, 2, 3, 4)] == [None] * 4
  assert refused[0] == "invalid at event_id: Missing required field: event_id."
  for i in (2, 3, 4):
    assert refused[i].startswith("invalid at metadata: not a JSON value"), refused[i]


def test_requests_stay_under_the_request_limit():
  sizes = [4_000_000, 4_000_000, 4_000_000, 100, 12_000_000, 5]
  chunks = request_chunks(sizes)
  assert [i for c in chunks for i in c] == list(range(len(sizes)))
  for c in chunks:
    assert len(c) == 1 or sum(sizes[i] + 8 for i in c) <= MAX_REQUEST_BYTES
  assert [4] in chunks  # a row alone past the limit travels alone (and is refused alone)


def test_insert_ids_stay_within_128_characters_for_a_249_character_topic():
  assert len(LONG_TOPIC) == 249
  ids = {row_id((LONG_TOPIC, p, o, o)) for p in range(3) for o in (0, 1, 10**15)}
  assert len(ids) == 9 and all(len(i) <= MAX_INSERT_ID_CHARS for i in ids)
  assert row_id(("short", 1, 2, 2)) == "short-1-2"


# ---------------------------------------------------------------------------
# Against the emulator


def test_storage_write_stores_each_row_once_with_its_values(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    rows = _rows("s", 0, range(250))
    assert store.write("sensor_readings", rows, _written_at()) == []
    assert store.write("sensor_readings", rows[:50], _written_at()) == []  # a replay: absorbed
    writer = store._writers["sensor_readings"]
    assert writer.next_offset == 250 and writer.calls == 1  # 250 rows, one call
    client = bq_emulator.client()
    _assert_once(client, dataset, [("s", 0, o) for o in range(250)])
    got = {
      r["kafka_offset"]: dict(r.items())
      for r in client.query_and_wait(f"SELECT * FROM `{PROJECT}.{dataset}.sensor_readings`")
    }
    for row in rows[:20]:
      g = got[offset_of(row)]
      assert (g["event_id"], g["sensor_id"], g["value"], g["is_late"]) == (
        row[0],
        row[1],
        row[3],
        False,
      )
      assert int(g["event_time"].timestamp() * 1e6) == timestamp_micros(row[6])
  finally:
    store.close()


def test_one_row_per_event_id_in_bigquery(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    rows = _rows("s", 0, range(5))
    store.write("sensor_readings", rows, _written_at())
    copies = [at_offset(rows[1], 7), at_offset(rows[3], 8)]
    fresh = _rows("s", 0, [9], seed=9)
    inner = at_offset(fresh[0], 10)  # two copies inside one write: the first wins
    rejected = store.write("sensor_readings", copies + fresh + [inner], _written_at())
    assert [(offset_of(r), type(e)) for r, e in rejected] == [
      (7, DuplicateEvent),
      (8, DuplicateEvent),
      (10, DuplicateEvent),
    ]
    assert "s-0@1" in rejected[0][1]
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in (0, 1, 2, 3, 4, 9)])
  finally:
    store.close()


class _LosingWriteClient:
  """The real write client, but the first ``lose`` append calls lose their answer after
  BigQuery applied them (what a dropped connection after the server's commit looks like)."""

  def __init__(self, real, lose: int):
    self._real, self.lose, self.lost = real, lose, 0

  def __getattr__(self, name):
    return getattr(self._real, name)

  def append_rows(self, requests, **kw):
    responses = list(self._real.append_rows(requests, **kw))
    if self.lost < self.lose:
      self.lost += 1
      from google.api_core import exceptions as gexc

      raise gexc.ServiceUnavailable("injected: the answer was lost after the append was applied")
    return iter(responses)


def test_a_lost_append_response_is_resent_at_its_offset_and_lands_once(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    store._write_client = _LosingWriteClient(store._write_client, lose=3)
    rows = _rows("s", 2, range(300))
    assert store.write("sensor_readings", rows, _written_at()) == []
    writer = store._writers["sensor_readings"]
    assert store._write_client.lost == 3
    # the same request at the same offset four times: applied once, then ALREADY_EXISTS (the
    # answers of the 2nd and 3rd were lost too; the 4th arrived)
    assert writer.already_existed == 1
    assert writer.calls == 4 and writer.next_offset == 300
    _assert_once(bq_emulator.client(), dataset, [("s", 2, o) for o in range(300)])
  finally:
    store.close()


def test_a_finalized_stream_is_replaced_and_nothing_doubles(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    store.write("sensor_readings", _rows("s", 0, range(10)), _written_at())
    first = store._writers["sensor_readings"].name
    store._write_client.finalize_write_stream(name=first)  # e.g. expired after 3 idle days
    more = _rows("s", 0, range(10, 30), seed=6)
    rejected = with_retries(
      lambda: store.write("sensor_readings", more, _written_at()),
      store.is_transient,
      deadline_s=30,
      initial_backoff_s=0.05,
    )
    assert rejected == []
    assert store._writers["sensor_readings"].name != first
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(30)])
  finally:
    store.close()


def test_a_grpc_outage_in_the_middle_of_a_write_is_waited_out(bq_emulator):
  host, port = bq_emulator.grpc_address.split(":")
  dataset = _dataset()
  with TcpProxy(host, int(port)) as proxy:
    store = _store(
      bq_emulator,
      dataset,
      storage_api_endpoint=proxy.address,
      append_deadline_s=5,
      request_timeout_s=5,
    )
    try:
      store.write("sensor_readings", _rows("s", 0, range(100)), _written_at())
      proxy.outage()
      more = _rows("s", 0, range(100, 400), seed=6)
      result = {}

      def write():
        result["rejected"] = with_retries(
          lambda: store.write("sensor_readings", more, _written_at()),
          store.is_transient,
          deadline_s=120,
          initial_backoff_s=0.2,
        )

      t = threading.Thread(target=write)
      t.start()
      deadline = time.monotonic() + 60
      while proxy.refused < 3 and time.monotonic() < deadline:  # the writer keeps trying
        time.sleep(0.1)
      assert proxy.refused >= 3
      proxy.heal()
      t.join(timeout=150)
      assert result.get("rejected") == []
      _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(400)])
    finally:
      store.close()


def test_a_dead_letter_larger_than_a_request_is_truncated_not_looped(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    huge = rejected_dead_letter_row("sensor_readings", _rows("s", 0, [0])[0], "x")
    names = DEAD_LETTERS.names
    i = names.index("raw_value")
    huge = huge[:i] + ("y" * 12_000_000,) + huge[i + 1 :]  # past the 10 MB request limit
    small = rejected_dead_letter_row("sensor_readings", _rows("s", 0, [1])[0], "x")
    assert store.write("dead_letters", [huge, small], _written_at()) == []
    assert store._writers["dead_letters"].calls == 1
    client = bq_emulator.client()
    _assert_once(client, dataset, [("s", 0, 0), ("s", 0, 1)], table="dead_letters")
    (length,) = next(
      iter(
        client.query_and_wait(
          f"SELECT LENGTH(raw_value) FROM `{PROJECT}.{dataset}.dead_letters` WHERE kafka_offset = 0"
        )
      )
    )
    assert 0 < length <= 1_000_000
  finally:
    store.close()


@pytest.mark.parametrize("method", ["storage_write", "streaming_inserts"])
def test_a_249_character_topic_is_written_once(bq_emulator, method):
  dataset = _dataset()
  store = _store(bq_emulator, dataset, write_method=method)
  try:
    rows = _rows(LONG_TOPIC, 3, range(40))
    assert store.write("sensor_readings", rows, _written_at()) == []
    assert store.write("sensor_readings", rows, _written_at()) == []
    _assert_once(bq_emulator.client(), dataset, [(LONG_TOPIC, 3, o) for o in range(40)])
    assert store.stored_offsets(LONG_TOPIC, 3, 35) == set(range(35, 40))
  finally:
    store.close()


def test_two_workers_creating_the_dataset_at_once_both_succeed(bq_emulator):
  dataset = _dataset()
  errors, stores = [], []
  start = threading.Barrier(4)

  def open_one():
    s = BigQueryStore(
      PROJECT,
      dataset,
      api_endpoint=bq_emulator.endpoint,
      storage_api_endpoint=bq_emulator.grpc_address,
    )
    stores.append(s)
    start.wait()
    try:
      s.open()
    except Exception as e:  # noqa: BLE001 - collected for the assertion
      errors.append(e)

  threads = [threading.Thread(target=open_one) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  try:
    assert errors == []
    client = bq_emulator.client()
    for name in TABLES:
      t = client.get_table(f"{PROJECT}.{dataset}.{name}")
      assert t.table_constraints.primary_key.columns == [
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
      ]
      assert t.clustering_fields[:3] == ["kafka_topic", "kafka_partition", "kafka_offset"]
  finally:
    for s in stores:
      s.close()


def test_reconciliation_query_finds_offsets_in_every_table_and_reports_its_cost(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    store.write("sensor_readings", _rows("s", 0, range(0, 2000, 2)), _written_at())
    store.write(
      "dead_letters",
      [rejected_dead_letter_row("sensor_readings", r, "x") for r in _rows("s", 0, [1, 3], seed=7)],
      _written_at(),
    )
    store.write("sensor_readings", _rows("s", 1, range(50), seed=8), _written_at())
    queries, scanned = store.queries_run, store.bytes_processed
    found = store.stored_offsets("s", 0, 1000)
    assert found == set(range(1000, 2000, 2))
    assert store.stored_offsets("s", 0, 0) == set(range(0, 2000, 2)) | {1, 3}
    assert store.stored_offsets("s", 0, 2, 10) == {2, 3, 4, 6, 8}
    assert store.queries_run == queries + 3
    print(
      f"reconciliation query: {store.bytes_processed - scanned} bytes processed "
      f"(as the emulator reports it) for 3 queries over 2,052 rows"
    )
  finally:
    store.close()


class _DroppingWriteClient:
  """The real write client, but the first call loses its second request on the way (the
  server sees requests 0, 2, 3...: it answers OUT_OF_RANGE from request 2 on)."""

  def __init__(self, real):
    self._real, self.dropped = real, 0

  def __getattr__(self, name):
    return getattr(self._real, name)

  def append_rows(self, requests, **kw):
    requests = list(requests)
    if not self.dropped and len(requests) > 2:
      self.dropped += 1
      requests = requests[:1] + requests[2:]
    return self._real.append_rows(iter(requests), **kw)


def test_out_of_range_resends_from_the_last_confirmed_offset(bq_emulator):
  from transforms.sinks.bigquery_storage import StreamWriter

  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    client = _DroppingWriteClient(store._write_client)
    writer = StreamWriter(
      client,
      client.table_path(PROJECT, dataset, "sensor_readings"),
      SENSOR_READINGS,
      max_request_bytes=3000,
    )
    rows = _rows("s", 0, range(60))
    encoded, refused = encode_rows(SENSOR_READINGS, rows, _written_at())
    assert not refused
    writer.append(encoded)
    assert client.dropped == 1 and writer.calls == 2 and writer.next_offset == 60
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(60)])
  finally:
    store.close()


class _CorruptingWriteClient:
  """The real write client, but in the first call row 3 of the first request is replaced
  by a row missing its REQUIRED fields, so BigQuery refuses that request naming the row."""

  def __init__(self, real):
    self._real, self.calls = real, 0

  def __getattr__(self, name):
    return getattr(self._real, name)

  def append_rows(self, requests, **kw):
    from google.cloud.bigquery_storage_v1 import types

    requests = list(requests)
    if self.calls == 0:
      first = requests[0]
      rows = list(first.proto_rows.rows.serialized_rows)
      rows[3] = b"\x0a\x00"  # field 1 (event_id) = "", every other REQUIRED field missing
      requests[0] = types.AppendRowsRequest(
        write_stream=first.write_stream,
        offset=first.offset,
        proto_rows=types.AppendRowsRequest.ProtoData(
          rows=types.ProtoRows(serialized_rows=rows), writer_schema=first.proto_rows.writer_schema
        ),
      )
    self.calls += 1
    return self._real.append_rows(iter(requests), **kw)


def test_a_request_refused_for_one_row_lands_its_neighbours_once(bq_emulator):
  dataset = _dataset()
  store = _store(bq_emulator, dataset)
  try:
    store._write_client = _CorruptingWriteClient(store._write_client)
    rows = _rows("s", 0, range(10))
    rejected = store.write("sensor_readings", rows, _written_at())
    assert [(offset_of(r), e.startswith("invalid")) for r, e in rejected] == [(3, True)], rejected
    # the emulator keeps the good rows of a refused request (BigQuery would not): the store
    # checks what landed and sends the rest on a new stream, so nothing is doubled
    assert store._write_client.calls == 2
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(10) if o != 3])
  finally:
    store.close()


def test_tables_of_the_first_version_get_the_new_columns_and_nullable_coordinates(bq_emulator):
  """A dataset written by the first version (dead_letters without raw_encoding, reason...,
  REQUIRED coordinates) is brought up to date at open, and then takes new rows."""
  from google.cloud import bigquery

  from transforms.sinks.bigquery import BigQueryStore
  from transforms.sinks.schema import DEAD_LETTERS, SENSOR_READINGS

  client = bq_emulator.client()
  dataset = f"old_{uuid.uuid4().hex[:8]}"
  client.create_dataset(dataset)
  old_dead = [
    bigquery.SchemaField(n, t, mode=m)
    for n, t, m in (
      ("raw_key", "STRING", "NULLABLE"),
      ("raw_value", "STRING", "NULLABLE"),
      ("error", "STRING", "REQUIRED"),
      ("stage", "STRING", "REQUIRED"),
      ("failed_at", "TIMESTAMP", "REQUIRED"),
      ("kafka_topic", "STRING", "REQUIRED"),
      ("kafka_partition", "INT64", "REQUIRED"),
      ("kafka_offset", "INT64", "REQUIRED"),
      ("written_at", "TIMESTAMP", "REQUIRED"),
    )
  ]
  old_sensor = [
    bigquery.SchemaField(
      c.name,
      c.bq_type,
      mode="REQUIRED" if c.required or c.name in ("latitude", "longitude") else "NULLABLE",
    )
    for c in SENSOR_READINGS.columns
  ]
  client.create_table(
    bigquery.Table(f"{bq_emulator.project}.{dataset}.dead_letters", schema=old_dead)
  )
  client.create_table(
    bigquery.Table(f"{bq_emulator.project}.{dataset}.sensor_readings", schema=old_sensor)
  )
  store = BigQueryStore(
    bq_emulator.project,
    dataset,
    api_endpoint=bq_emulator.endpoint,
    write_method="streaming_inserts",
  )
  store.open()
  try:
    dead = client.get_table(f"{bq_emulator.project}.{dataset}.dead_letters")
    assert {f.name for f in dead.schema} == set(DEAD_LETTERS.names)
    sensor = {
      f.name: f.mode
      for f in client.get_table(f"{bq_emulator.project}.{dataset}.sensor_readings").schema
    }
    assert (sensor["latitude"], sensor["longitude"], sensor["event_id"]) == (
      "NULLABLE",
      "NULLABLE",
      "REQUIRED",
    )
    row = (
      "e9",
      "s9",
      "power",
      3.5,
      None,
      None,
      "2024-01-15T10:30:00.000000Z",
      None,
      "2024-01-15T10:30:00.000000Z",
      "2024-01-15T10:31:00.000000Z",
      False,
      "t",
      0,
      3,
      3,
    )
    assert store.write(SENSOR_READINGS.name, [row], "2024-01-15T10:30:00.000000Z") == []
    got = list(
      client.query(
        f"SELECT event_id, latitude FROM `{bq_emulator.project}.{dataset}.sensor_readings`"
      ).result()
    )
    assert [(r["event_id"], r["latitude"]) for r in got] == [("e9", None)]
  finally:
    store.close()
