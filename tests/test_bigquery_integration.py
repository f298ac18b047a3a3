"""The BigQuery sink against the local BigQuery emulator (bigquery_emulator/), read back
with the official client; no mocked client anywhere.

The pipeline runs as a subprocess (``python -m runners.main --mode=batch``) on the real
broker with ``--sink=bigquery://test-project/DATASET --bigquery_api_endpoint=...``, each
test on fresh topics and a fresh dataset, and the sink is compared with the topics offset
by offset. Faults come from ``tests.faulty_proxy`` between the sink and the emulator (no
emulator produces 429 or 5xx). The emulator keeps insertIds for 60 s in memory, so every
replay here happens within a few seconds of the write it repeats.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import support
from tests.faulty_proxy import FaultyProxy
from tests.pipeline_support import committed, ends, produce_events, run_to_end
from tools.produce import BAD_KINDS, Event, EventFactory
from transforms.acks import Ack
from transforms.events import decode_raw_value, parse_sensor, parse_timestamp_us, sensor_row
from transforms.retry import RetriesExhausted, with_retries
from transforms.rows import offset_of
from transforms.sinks.base import WriteBatches
from transforms.sinks.bigquery import BigQueryStore
from transforms.sinks.schema import TABLES
from transforms.timestamps import iso_us

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROJECT = "test-project"


def _dataset() -> str:
  return f"it_{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------
# Reading the sink back


def bq_offsets(client, dataset: str) -> dict[str, list[tuple[str, int, int]]]:
  """table -> every (topic, partition, offset) row, duplicates kept."""
  return {
    t: [
      tuple(r.values())
      for r in client.query_and_wait(
        f"SELECT kafka_topic, kafka_partition, kafka_offset FROM `{PROJECT}.{dataset}.{t}`"
      )
    ]
    for t in TABLES
  }


def bq_rows(client, dataset: str, table: str) -> dict[tuple[str, int, int], dict]:
  return {
    (r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]): dict(r.items())
    for r in client.query_and_wait(f"SELECT * FROM `{PROJECT}.{dataset}.{table}`")
  }


def assert_exactly_once(client, dataset: str, produced: Iterable[tuple[str, int, int]]) -> dict:
  """Every produced offset is in exactly one table exactly once, and nothing else is."""
  by_table = bq_offsets(client, dataset)
  everything = Counter(r for rows in by_table.values() for r in rows)
  duplicates = {k: n for k, n in everything.items() if n > 1}
  assert not duplicates, (
    f"{len(duplicates)} offsets written more than once, e.g. {list(duplicates)[:5]}"
  )
  produced = set(produced)
  missing, extra = produced - set(everything), set(everything) - produced
  assert not missing, f"{len(missing)} produced offsets not in BigQuery, e.g. {sorted(missing)[:5]}"
  assert not extra, f"{len(extra)} rows for offsets never produced, e.g. {sorted(extra)[:5]}"
  return by_table


def frontier(by_table: dict, topic: str, partition: int) -> int:
  offsets = {o for rows in by_table.values() for (t, p, o) in rows if (t, p) == (topic, partition)}
  f = 0
  while f in offsets:
    f += 1
  return f


class Env:
  """Fresh topics (2 partitions each), group and dataset on the session broker and emulator."""

  def __init__(self, bootstrap, make_topic, emulator, work_dir):
    self.bs = bootstrap
    self.sensor = make_topic(2, "bqsensor")
    self.meter = make_topic(2, "bqmeter")
    self.group = f"g-{uuid.uuid4().hex[:8]}"
    self.dataset = _dataset()
    self.emulator = emulator
    self.client = emulator.client()
    self.dir = work_dir

  def batch(
    self,
    *extra: str,
    endpoint: str | None = None,
    group: str | None = None,
    timeout: float = 120.0,
    method: str = "storage_write",
  ):
    return run_to_end(
      self.bs,
      self.sensor,
      self.meter,
      group or self.group,
      self.dir,
      "--sink",
      f"bigquery://{PROJECT}/{self.dataset}",
      "--bigquery_api_endpoint",
      endpoint or self.emulator.endpoint,
      "--bigquery_storage_api_endpoint",
      self.emulator.grpc_address,
      "--bigquery_write_method",
      method,
      *extra,
      timeout=timeout,
    )

  def produce(self, events, **kw):
    return produce_events(self.bs, self.sensor, self.meter, list(events), **kw)

  def committed(self, group: str | None = None):
    return committed(self.bs, group or self.group, self.sensor, self.meter)

  def ends(self):
    return ends(self.bs, self.sensor, self.meter)

  def assert_committed_equals_end(self, group: str | None = None):
    c, e = self.committed(group), self.ends()
    assert {k: v for k, v in c.items() if e[k]} == {k: v for k, v in e.items() if v}, (c, e)

  def assert_commits_not_past_sink(self) -> dict:
    by_table = bq_offsets(self.client, self.dataset)
    c = self.committed()
    for (t, p), o in c.items():
      if o is not None:
        assert o <= frontier(by_table, t, p), f"{t}-{p}: committed {o} is past the sink"
    return c


@pytest.fixture
def env(kafka_bootstrap, make_topic, bq_emulator, tmp_path):
  return Env(kafka_bootstrap, make_topic, bq_emulator, tmp_path)


def _clean_exit(p):
  assert p.proc.returncode == 0, f"exit {p.proc.returncode}:\n{p.tail()}"


def _surrogate_sensor(f: EventFactory, metadata: dict, now: float) -> Event:
  """A sensor event our parser accepts (valid JSON, every field) whose metadata holds a lone
  UTF-16 surrogate, kept as a JSON escape in the metadata text; BigQuery's JSON decoder
  refuses the whole request that carries it."""
  body = json.loads(f.sensor(now).value)
  body["metadata"] = metadata
  return Event("sensor", b"surrogate", json.dumps(body).encode())  # ensure_ascii: "\\ud800"


# ---------------------------------------------------------------------------
# Kafka -> pipeline -> BigQuery: one run, then a replay (module fixture, in this order)


@pytest.fixture(scope="module")
def loaded(kafka_bootstrap, bq_emulator, tmp_path_factory):
  """300 good events, every malformed kind and two events BigQuery refuses, in one batch run."""

  def make_topic(partitions, prefix):
    return support.create_topic(kafka_bootstrap, support.unique_topic(prefix), partitions)

  env = Env(kafka_bootstrap, make_topic, bq_emulator, tmp_path_factory.mktemp("bq-e2e"))
  f = EventFactory(31)
  # Event times from the moment the events are written (not from the module's import: the
  # suite may reach this module minutes later, and events older than their window's end plus
  # the allowed lateness when written are rightly flagged is_late).
  now = time.time()
  good = list(f.events(300, meter_ratio=0.3, start=now - 120, spacing_s=0.2))
  bad = [f.bad(now, kind) for kind in BAD_KINDS]
  # refused rows with good neighbours in the same partition and batch (keys decide partitions)
  refused = [
    _surrogate_sensor(f, {"note": "\ud800"}, now),
    _surrogate_sensor(f, {"\udfff": 1}, now),
  ]
  neighbours = [Event("sensor", b"surrogate", f.sensor(now).value) for _ in range(4)]
  mixed = [neighbours[0], refused[0], neighbours[1], neighbours[2], refused[1], neighbours[3]]
  coords = env.produce(good + bad + mixed)
  env.coords = dict(
    good=coords[:300], bad=coords[300 : 300 + len(bad)], mixed=coords[300 + len(bad) :]
  )
  env.events = dict(good=good, bad=bad, mixed=mixed)
  env.produced = coords
  started = time.monotonic()
  env.first = env.batch("--num_shards=2")
  env.first_ended = time.monotonic()
  print(f"first run: {time.monotonic() - started:.1f}s")
  return env


def test_every_event_is_queryable_once_with_its_columns_and_types(loaded):
  env = loaded
  _clean_exit(env.first)
  by_table = assert_exactly_once(env.client, env.dataset, env.produced)
  env.assert_committed_equals_end()

  # the tables the sink created: modes, day partitions, clustering
  for name, table in TABLES.items():
    got = env.client.get_table(f"{PROJECT}.{env.dataset}.{name}")
    assert [(f.name, f.mode) for f in got.schema] == [
      (c.name, "REQUIRED" if c.required else "NULLABLE") for c in table.columns
    ]
    assert got.time_partitioning.type_ == "DAY"
    assert got.time_partitioning.field == table.partition_column
    assert got.clustering_fields == list(table.cluster_columns)

  sensors = bq_rows(env.client, env.dataset, "sensor_readings")
  meters = bq_rows(env.client, env.dataset, "meter_readings")
  n_sensor = sum(1 for e in env.events["good"] if e.topic_kind == "sensor") + 4
  assert (len(sensors), len(meters)) == (n_sensor, 300 + 6 - n_sensor - 2)
  with_metadata = 0
  for event, coords in zip(env.events["good"], env.coords["good"]):
    body = json.loads(event.value)
    want_time = dt.datetime.fromtimestamp(
      parse_timestamp_us(body["timestamp"]) / 1e6, dt.timezone.utc
    )
    if event.topic_kind == "sensor":
      r = sensors[coords]
      assert (r["event_id"], r["sensor_id"], r["sensor_type"]) == (
        body["event_id"],
        body["sensor_id"],
        body["sensor_type"],
      )
      assert isinstance(r["value"], float) and r["value"] == body["value"]
      assert (r["latitude"], r["longitude"]) == (body["location"]["lat"], body["location"]["lon"])
      if "metadata" in body:
        with_metadata += 1
        got = r["metadata"] if isinstance(r["metadata"], dict) else json.loads(r["metadata"])
        assert got == body["metadata"]
      else:
        assert r["metadata"] is None
    else:
      r = meters[coords]
      assert (r["event_id"], r["meter_id"], r["customer_id"], r["unit"]) == (
        body["event_id"],
        body["meter_id"],
        body["customer_id"],
        body.get("unit", "kWh"),
      )
      assert r["reading"] == body["reading"]
    assert r["event_time"] == want_time
    assert isinstance(r["is_late"], bool) and r["is_late"] is False
    assert r["window_start"] <= r["event_time"] < r["window_end"]
    assert r["window_end"] - r["window_start"] == dt.timedelta(seconds=60)
    assert isinstance(r["kafka_partition"], int) and isinstance(r["kafka_offset"], int)
    assert r["written_at"].tzinfo is not None
  assert with_metadata > 0  # the JSON column was exercised

  dead = bq_rows(env.client, env.dataset, "dead_letters")
  for kind, event, coords in zip(BAD_KINDS, env.events["bad"], env.coords["bad"]):
    d = dead[coords]
    assert d["stage"] == "parse" and d["error"].startswith(f"{kind}: "), d
    raw = decode_raw_value(d["raw_value"], d["raw_encoding"])
    assert raw == event.value if not d["truncated"] else event.value.startswith(raw), kind
    assert d["raw_size"] == len(event.value) and d["reason"] == kind
    assert d["raw_sha256"] == hashlib.sha256(event.value).hexdigest()
    assert isinstance(d["failed_at"], dt.datetime)
  assert len(by_table["dead_letters"]) == len(BAD_KINDS) + 2


def test_replay_after_a_restart_does_not_double_rows(loaded):
  env = loaded
  _clean_exit(env.first)
  before = bq_offsets(env.client, env.dataset)
  assert time.monotonic() - env.first_ended < 50, "the emulator keeps insertIds for 60 s only"
  group = f"replay-{uuid.uuid4().hex[:8]}"
  replay = env.batch("--start=earliest", "--num_shards=2", group=group)
  _clean_exit(replay)
  assert replay.summary_read() == len(env.produced), replay.tail()  # everything was sent again
  assert_exactly_once(env.client, env.dataset, env.produced)
  assert {t: sorted(r) for t, r in bq_offsets(env.client, env.dataset).items()} == {
    t: sorted(r) for t, r in before.items()
  }
  env.assert_committed_equals_end(group)


def test_poison_rows_are_dead_lettered_and_their_neighbours_written(loaded):
  """Lone surrogates in metadata (which BigQuery's JSON decoder refuses for the whole request)
  are dead letters at parse time; their neighbours in the same partition and batch are written.
  (Rows the store itself refuses: tests/test_bigquery_storage_write.py and the store tests below.)"""
  env = loaded
  _clean_exit(env.first)
  sensors = bq_rows(env.client, env.dataset, "sensor_readings")
  dead = bq_rows(env.client, env.dataset, "dead_letters")
  mixed = env.coords["mixed"]
  assert len({p for _, p, _ in mixed}) == 1  # one partition, consecutive offsets
  for i in (0, 2, 3, 5):
    assert mixed[i] in sensors and mixed[i] not in dead
    assert sensors[mixed[i]]["event_id"] == json.loads(env.events["mixed"][i].value)["event_id"]
  for i in (1, 4):
    d = dead[mixed[i]]
    assert mixed[i] not in sensors
    assert (d["stage"], d["reason"]) == ("parse", "not_utf8"), d
    assert "surrogate" in d["error"], d["error"]
    assert decode_raw_value(d["raw_value"], d["raw_encoding"]) == env.events["mixed"][i].value


# ---------------------------------------------------------------------------
# BigQueryStore and WriteBatches in this process


def _rows(topic: str, partition: int, offsets, seed: int = 5) -> list[tuple]:
  f = EventFactory(seed)
  return [
    sensor_row(
      parse_sensor(f.sensor(time.time()).value), 0, 60_000_000, False, topic, partition, o, o
    )
    for o in offsets
  ]


def _open_store(emulator, dataset: str, endpoint: str | None = None, **kw) -> BigQueryStore:
  kw.setdefault("write_method", "streaming_inserts")  # these tests fault the HTTP insertAll path
  store = BigQueryStore(PROJECT, dataset, api_endpoint=endpoint or emulator.endpoint, **kw)
  store.open()
  return store


def test_store_rejects_invalid_rows_with_bigquerys_reason_and_writes_the_rest(bq_emulator):
  dataset = _dataset()
  store = _open_store(bq_emulator, dataset)
  try:
    rows = _rows("s", 0, range(8))
    rows[2] = (None,) + rows[2][1:]  # event_id is REQUIRED
    rows[5] = rows[5][:3] + ("not a number",) + rows[5][4:]  # value is FLOAT64
    rejected = store.write("sensor_readings", rows, iso_us(int(time.time() * 1e6)))
    assert [(offset_of(r), e) for r, e in rejected] == [
      (2, "invalid at event_id: Missing required field: event_id."),
      (5, "invalid at value: Cannot convert value to float (bad value): not a number"),
    ]
    # one request refused with 2 invalid and 6 stopped rows, one more for the 6 stopped ones
    assert store.requests_sent == 2
    got = bq_offsets(store._client, dataset)["sensor_readings"]
    assert sorted(got) == [("s", 0, o) for o in (0, 1, 3, 4, 6, 7)]
  finally:
    store.close()


def test_store_chunks_large_writes_and_measures_its_rate(bq_emulator):
  store = _open_store(bq_emulator, _dataset(), max_bytes_per_request=200_000)
  try:
    rows = _rows("s", 0, range(3000), seed=6)
    started = time.perf_counter()
    assert store.write("sensor_readings", rows, iso_us(int(time.time() * 1e6))) == []
    elapsed = time.perf_counter() - started
    print(
      f"BigQueryStore.write: {len(rows)} rows in {elapsed:.2f}s = {len(rows) / elapsed:.0f} "
      f"rows/s, {store.requests_sent} requests"
    )
    assert store.requests_sent >= 6  # 500-row and 200 kB caps both bind
    (n,) = [
      r[0]
      for r in store._client.query_and_wait(
        f"SELECT COUNT(DISTINCT kafka_offset) FROM `{PROJECT}.{store.dataset}.sensor_readings`"
      )
    ]
    assert n == 3000
  finally:
    store.close()


_ACKS: dict[str, list] = {}  # FnApiRunner runs the DoFns in this process


def test_write_batches_dead_letters_what_bigquery_refuses_and_acks_everything(bq_emulator):
  dataset = _dataset()
  rows = _rows("s", 0, range(6))
  rows[3] = (None,) + rows[3][1:]
  with BeamTestPipeline() as p:
    acks = (
      p
      | beam.Create([(("sensor_readings", 0), rows)])
      | WriteBatches(
        BigQueryStore(
          PROJECT,
          dataset,
          api_endpoint=bq_emulator.endpoint,
          storage_api_endpoint=bq_emulator.grpc_address,
        ),
        retry_deadline_s=10,
      )
    )
    assert_that(acks, equal_to([Ack("s", 0, 0, 6)]))
  client = bq_emulator.client()
  assert sorted(bq_offsets(client, dataset)["sensor_readings"]) == [
    ("s", 0, o) for o in (0, 1, 2, 4, 5)
  ]
  (d,) = bq_rows(client, dataset, "dead_letters").values()
  assert (d["kafka_topic"], d["kafka_partition"], d["kafka_offset"], d["stage"]) == (
    "s",
    0,
    3,
    "sink",
  )
  assert d["error"] == (
    "sink_rejected: sensor_readings: invalid at event_id: Missing required field: event_id."
  )


def test_store_retries_503_429_and_lost_responses_without_duplicates(bq_emulator):
  dataset = _dataset()
  with FaultyProxy(bq_emulator.endpoint) as proxy:
    store = _open_store(bq_emulator, dataset, endpoint=proxy.endpoint, client_retry_s=0.5)
    try:
      # refused outright, then executed but answered with an error (a lost response)
      proxy.fail_next(3, 503)
      proxy.fail_next(2, 429, forward=True)
      proxy.fail_next(1, 503, forward=True)
      rows = _rows("s", 1, range(20))
      written_at = iso_us(int(time.time() * 1e6))
      rejected = with_retries(
        lambda: store.write("sensor_readings", rows, written_at),
        store.is_transient,
        deadline_s=30,
        initial_backoff_s=0.05,
      )
      assert rejected == []
      # the first lost response ends it: the retried write finds its rows stored (write-time
      # check), so it sends no insert again and the last two queued failures stay unused
      assert proxy.failed >= 4 and proxy.forwarded_then_failed >= 1, (
        proxy.failed,
        proxy.forwarded_then_failed,
      )
      proxy.heal()
      assert sorted(bq_offsets(store._client, dataset)["sensor_readings"]) == [
        ("s", 1, o) for o in range(20)
      ]

      # a permanent outage: the write fails loudly after the deadline, nothing is written
      proxy.fail_always(503)
      more = _rows("s", 1, range(20, 30), seed=6)  # new events (same seed = same event_ids)
      with pytest.raises(RetriesExhausted, match="still failing"):
        with_retries(
          lambda: store.write("sensor_readings", more, written_at),
          store.is_transient,
          deadline_s=1.5,
          initial_backoff_s=0.05,
        )
      assert len(bq_offsets(store._client, dataset)["sensor_readings"]) == 20
    finally:
      store.close()


def test_unreachable_endpoint_is_transient(bq_emulator):
  with FaultyProxy(bq_emulator.endpoint) as proxy:
    dead_endpoint = proxy.endpoint
  store = BigQueryStore(
    PROJECT,
    _dataset(),
    api_endpoint=dead_endpoint,
    client_retry_s=0.3,
    write_method="streaming_inserts",
    request_timeout_s=2,
  )
  with pytest.raises(Exception) as e:
    store.open()
  assert store.is_transient(e.value), repr(e.value)
  store.close()


# ---------------------------------------------------------------------------
# The pipeline through a faulty proxy


def test_pipeline_through_503s_and_429s_loses_nothing_and_doubles_nothing(env):
  produced = env.produce(
    EventFactory(41).events(400, meter_ratio=0.3, start=time.time() - 60, spacing_s=0.1)
  )
  with FaultyProxy(env.emulator.endpoint) as proxy:
    # more failures in a row than the client's own retry absorbs (WriteBatches retries too),
    # half of them after BigQuery did the insert
    for _ in range(6):
      proxy.fail_next(1, 503)
      proxy.fail_next(1, 429, forward=True)
    run = env.batch(
      "--sink_flush_rows=100",
      "--batch_size=50",
      "--sink_retry_deadline_secs=60",
      endpoint=proxy.endpoint,
      method="streaming_inserts",
    )
    _clean_exit(run)
    assert proxy.failed == 12 and proxy.pending_failures() == 0, (proxy.failed, run.tail())
    assert proxy.forwarded_then_failed == 6
  assert_exactly_once(env.client, env.dataset, produced)
  env.assert_committed_equals_end()


def test_pipeline_in_a_permanent_outage_fails_commits_nothing_unwritten_and_restarts(env):
  first = env.produce(
    EventFactory(43).events(150, meter_ratio=0.3, start=time.time() - 60, spacing_s=0.1)
  )
  _clean_exit(env.batch())
  env.assert_committed_equals_end()
  committed_before = env.committed()

  second = env.produce(
    EventFactory(44).events(400, meter_ratio=0.3, start=time.time() - 30, spacing_s=0.05)
  )
  with FaultyProxy(env.emulator.endpoint) as proxy:
    proxy.fail_after(2, 503)  # two inserts get through, then BigQuery is gone
    failed = env.batch(
      "--sink_flush_rows=50",
      "--batch_size=50",
      "--num_shards=1",
      "--sink_retry_deadline_secs=2",
      "--commit_interval_secs=0.2",
      endpoint=proxy.endpoint,
      timeout=120,
      method="streaming_inserts",
    )
    assert failed.proc.returncode not in (0, None), failed.tail()
    assert "still failing" in failed.output and "503" in failed.output, failed.tail()
    assert proxy.failed > 0
  by_table = bq_offsets(env.client, env.dataset)
  written = sum(len(r) for r in by_table.values())
  assert len(first) < written < len(first) + len(second), written  # part of the second lot
  c = env.assert_commits_not_past_sink()
  for tp, before in committed_before.items():
    assert (c[tp] or 0) >= (before or 0), (tp, before, c[tp])  # never moved back
  print(
    f"outage: {written - len(first)} of {len(second)} new rows written, committed "
    f"{sum(v or 0 for v in c.values())} of {len(first) + len(second)} offsets"
  )

  restart = env.batch()  # straight to the emulator: the outage is over
  _clean_exit(restart)
  assert_exactly_once(env.client, env.dataset, first + second)
  env.assert_committed_equals_end()
