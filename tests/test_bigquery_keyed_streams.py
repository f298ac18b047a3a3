"""WriteBatches with keyed state on the Storage Write API path, against the local emulator.

The stateful DoFn keeps, per batch key ((table, shard)), the name and next offset of the
key's COMMITTED streams. These tests drive it as a runner would: ``process()`` with a
state the runner committed (a plain holder standing in for the runner's state; BigQuery is
the real emulator through the official clients). A retried bundle is the DoFn run again
from the state committed before it. Every test reads BigQuery back and checks each offset
is stored exactly once, and counts the ALREADY_EXISTS answers and the streams created.
"""

from __future__ import annotations

import copy
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.test_bigquery_storage_write import _assert_once
from tools.produce import EventFactory
from transforms.acks import Ack
from transforms.events import parse_sensor, sensor_row
from transforms.sinks.base import WriteBatches, _WriteBatchesFn, _WriteOnKeyedStreamsFn
from transforms.sinks.bigquery import BigQueryStore
from transforms.sinks.sqlite import SqliteStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROJECT = "test-project"
NOW = time.time()
KEY = ("sensor_readings", 0)


def _dataset() -> str:
  return f"ks_{uuid.uuid4().hex[:10]}"


def _rows(topic: str, partition: int, offsets, seed: int = 5) -> list[tuple]:
  f = EventFactory(seed)
  return [
    sensor_row(parse_sensor(f.sensor(NOW).value), 0, 60_000_000, False, topic, partition, o, o)
    for o in offsets
  ]


class _State:
  """What the runner hands ``process()`` for one key: the value it last committed."""

  def __init__(self, value=None):
    self.value = value

  def read(self):
    return self.value

  def write(self, value):
    self.value = value

  def clear(self):
    self.value = None

  def committed_copy(self) -> _State:
    return _State(copy.deepcopy(self.value))


class _CountingWriteClient:
  """The real write client; counts CreateWriteStream calls and ALREADY_EXISTS answers.
  ``lose``: that many append calls lose their answer after BigQuery applied them."""

  def __init__(self, real, lose: int = 0):
    self._real, self.lose = real, lose
    self.created = self.already_exists = self.lost = 0

  def __getattr__(self, name):
    return getattr(self._real, name)

  def create_write_stream(self, *args, **kw):
    self.created += 1
    return self._real.create_write_stream(*args, **kw)

  def append_rows(self, requests, **kw):
    responses = list(self._real.append_rows(requests, **kw))
    self.already_exists += sum(1 for r in responses if "error" in r and r.error.code == 6)
    if self.lost < self.lose:
      self.lost += 1
      from google.api_core import exceptions as gexc

      raise gexc.ServiceUnavailable("injected: the answer was lost after the append was applied")
    return iter(responses)


def _worker(emulator, dataset: str, lose: int = 0):
  """One worker's DoFn (set up: its store open) and its counting write client."""
  store = BigQueryStore(
    PROJECT, dataset, api_endpoint=emulator.endpoint, storage_api_endpoint=emulator.grpc_address
  )
  fn = _WriteOnKeyedStreamsFn(store, 1000, 30.0, 100)
  fn.setup()
  client = _CountingWriteClient(store._write_client, lose)
  store._write_client = client
  return fn, store, client


def _process(fn, rows: list, state: _State, key: str = KEY) -> list:
  return list(fn.process((key, rows), streams_state=state))


def test_only_the_storage_write_path_is_stateful(tmp_path):
  def fn_of(store):
    return type(WriteBatches(store)._fn)

  assert (
    fn_of(BigQueryStore(PROJECT, "d", storage_api_endpoint="127.0.0.1:1")) is _WriteOnKeyedStreamsFn
  )
  assert fn_of(BigQueryStore(PROJECT, "d", write_method="streaming_inserts")) is _WriteBatchesFn
  assert fn_of(SqliteStore(str(tmp_path / "x.db"))) is _WriteBatchesFn
  assert _WriteOnKeyedStreamsFn.STREAMS.name == "streams"


def test_the_state_carries_the_stream_and_its_offset_from_batch_to_batch(bq_emulator):
  dataset = _dataset()
  fn, _, client = _worker(bq_emulator, dataset)
  try:
    state = _State()
    assert _process(fn, _rows("s", 0, range(100)), state) == [Ack("s", 0, 0, 100)]
    name, offset = state.value["sensor_readings"]
    assert offset == 100
    assert _process(fn, _rows("s", 0, range(100, 130), seed=6), state) == [Ack("s", 0, 100, 130)]
    assert state.value == {"sensor_readings": (name, 130)}
    assert (client.created, client.already_exists) == (1, 0)
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(130)])
  finally:
    fn.teardown()


def test_a_retried_bundle_on_the_same_state_lands_once_through_already_exists(bq_emulator):
  """Two attempts of one bundle (a retry and the zombie it replaced) run the same batch from
  the same committed state, and both pass the check for stored rows before either appends:
  the second append hits the offsets the first took and is answered ALREADY_EXISTS."""
  dataset = _dataset()
  fn_x, _, client_x = _worker(bq_emulator, dataset)
  fn_y, store_y, client_y = _worker(bq_emulator, dataset)
  try:
    committed = _State()
    _process(fn_x, _rows("s", 0, range(100)), committed)  # the bundle before, committed
    name, _ = committed.value["sensor_readings"]
    batch = _rows("s", 0, range(100, 250), seed=6)
    x_state, y_state = committed.committed_copy(), committed.committed_copy()
    checked = store_y._new_rows

    def check_then_let_the_other_attempt_write(table, rows):
      fresh, duplicates = checked(table, rows)
      assert len(fresh) == 150  # nothing of the batch stored yet
      assert _process(fn_x, batch, x_state) == [Ack("s", 0, 100, 250)]
      return fresh, duplicates

    store_y._new_rows = check_then_let_the_other_attempt_write

    assert _process(fn_y, batch, y_state) == [Ack("s", 0, 100, 250)]
    assert client_y.already_exists == 1  # its one request, at offset 100: already there
    assert client_x.already_exists == 0
    assert x_state.value == y_state.value == {"sensor_readings": (name, 250)}
    assert client_x.created + client_y.created == 1  # both wrote on the key's one stream
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(250)])
  finally:
    fn_x.teardown()
    fn_y.teardown()


def test_a_retry_whose_first_attempt_landed_then_a_new_batch_loses_nothing(bq_emulator):
  """The first attempt appended two batches, then its bundle failed (state not committed).
  The retry finds both stored (nothing appended, the state stays behind the stream); its
  next batch is appended at the old offset and answered ALREADY_EXISTS although it is not
  stored: the look-up after that answer catches it, and a new stream takes the batch."""
  dataset = _dataset()
  fn_x, _, _ = _worker(bq_emulator, dataset)
  fn_y, _, client_y = _worker(bq_emulator, dataset)
  try:
    committed = _State()
    _process(fn_x, _rows("s", 0, range(100)), committed)
    name, _ = committed.value["sensor_readings"]
    first, second = _rows("s", 0, range(100, 200), seed=6), _rows("s", 0, range(200, 300), seed=7)
    failed = committed.committed_copy()
    _process(fn_x, first, failed)
    _process(fn_x, second, failed)  # ... and then the bundle fails: ``failed`` is dropped

    retry = committed.committed_copy()
    assert _process(fn_y, first, retry) == [Ack("s", 0, 100, 200)]
    assert _process(fn_y, second, retry) == [Ack("s", 0, 200, 300)]
    assert retry.value == committed.value and client_y.already_exists == 0  # absorbed by the check
    assert _process(fn_y, _rows("s", 0, range(300, 400), seed=8), retry) == [Ack("s", 0, 300, 400)]
    assert client_y.already_exists == 1 and client_y.created == 1
    new_name, offset = retry.value["sensor_readings"]
    assert new_name != name and offset == 100
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(400)])
  finally:
    fn_x.teardown()
    fn_y.teardown()


@pytest.mark.parametrize("how", ["finalized", "unknown", "state_ahead"])
def test_a_stream_in_state_that_is_gone_or_behind_is_replaced_without_doubles(bq_emulator, how):
  """finalized: e.g. expired after 3 idle days; unknown: a service that lost it; state_ahead:
  the state's offset is past the stream's end (OUT_OF_RANGE)."""
  dataset = _dataset()
  fn, _, client = _worker(bq_emulator, dataset)
  try:
    state = _State()
    _process(fn, _rows("s", 0, range(50)), state)
    name, offset = state.value["sensor_readings"]
    if how == "finalized":
      client.finalize_write_stream(name=name)
    elif how == "unknown":
      state.value = {"sensor_readings": (name.rsplit("/", 1)[0] + "/no-such-stream", offset)}
    else:
      state.value = {"sensor_readings": (name, offset + 400)}
    fresh = _rows("s", 0, range(50, 120), seed=6)
    assert _process(fn, fresh, state) == [Ack("s", 0, 50, 120)]
    new_name, new_offset = state.value["sensor_readings"]
    assert new_name != name and new_offset == 70 and client.created == 2
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(120)])
  finally:
    fn.teardown()


def test_a_lost_answer_is_resent_at_the_same_offsets_on_the_same_stream(bq_emulator):
  dataset = _dataset()
  fn, _, client = _worker(bq_emulator, dataset, lose=2)
  try:
    state = _State()
    _process(fn, _rows("s", 0, range(10)), state)  # loses the answer twice, resent twice
    name, _ = state.value["sensor_readings"]
    assert _process(fn, _rows("s", 0, range(10, 130), seed=6), state) == [Ack("s", 0, 10, 130)]
    assert client.lost == 2 and client.already_exists == 2 and client.created == 1
    assert state.value == {"sensor_readings": (name, 130)}
    _assert_once(bq_emulator.client(), dataset, [("s", 0, o) for o in range(130)])
  finally:
    fn.teardown()


def test_refused_rows_go_to_dead_letters_on_a_stream_the_key_keeps_too(bq_emulator):
  dataset = _dataset()
  fn, _, client = _worker(bq_emulator, dataset)
  try:
    state = _State()
    rows = _rows("s", 0, range(6))
    rows[2] = (None,) + rows[2][1:]  # no event_id: BigQuery refuses it (REQUIRED)
    assert _process(fn, rows, state) == [Ack("s", 0, 0, 6)]
    more = _rows("s", 0, range(6, 9), seed=6)
    more[0] = (None,) + more[0][1:]
    assert _process(fn, more, state) == [Ack("s", 0, 6, 9)]
    assert state.value["sensor_readings"][1] == 7 and state.value["dead_letters"][1] == 2
    assert client.created == 2  # one stream per table of the key, kept across batches
    bq = bq_emulator.client()
    _assert_once(bq, dataset, [("s", 0, o) for o in (0, 1, 3, 4, 5, 7, 8)])
    _assert_once(bq, dataset, [("s", 0, 2), ("s", 0, 6)], table="dead_letters")
  finally:
    fn.teardown()


def _pipeline(runner: str) -> beam.Pipeline:
  if runner == "FnApiRunner":
    return BeamTestPipeline()
  from runners.prism import job_server

  return beam.Pipeline(
    options=PipelineOptions(
      runner="PrismRunner", job_endpoint=job_server().endpoint, environment_type="LOOPBACK"
    )
  )


@pytest.mark.parametrize(
  "runner",
  [
    "FnApiRunner",
    "PrismRunner",  # built by ./run_pipeline.sh test: a missing binary fails the case
  ],
)
def test_a_pipeline_writes_every_batch_once_on_one_stream_per_key(bq_emulator, runner):
  """Batches of three keys (one batch delivered twice, as a replay) through WriteBatches on
  a real runner; each key starts one stream and keeps appending to it; the acks cover every
  offset."""
  dataset = _dataset()
  batches = []
  for shard in range(3):
    for b in range(4):
      offsets = range(shard * 1000 + b * 50, shard * 1000 + (b + 1) * 50)
      batches.append((("sensor_readings", shard), _rows("s", shard, offsets, seed=shard * 10 + b)))
  batches.append(batches[1])  # a replay of shard 0's second batch
  expected = [("s", shard, shard * 1000 + o) for shard in range(3) for o in range(200)]
  store = BigQueryStore(
    PROJECT,
    dataset,
    api_endpoint=bq_emulator.endpoint,
    storage_api_endpoint=bq_emulator.grpc_address,
  )
  p = _pipeline(runner)
  # flush_rows=60: two batches of a key are joined into one write of 100 rows, so each key
  # writes at least twice, the second time on the stream its state kept
  acks = p | beam.Create(batches) | WriteBatches(store, retry_deadline_s=30, flush_rows=60)
  assert_that(
    acks
    | beam.FlatMap(lambda a: [(a.topic, a.partition, o) for o in range(a.start, a.end)])
    | beam.Distinct(),
    equal_to(expected),
  )
  result = p.run()
  result.wait_until_finish()
  counters = {
    (c.key.metric.namespace.rsplit(".", 1)[-1], c.key.metric.name): c.committed
    for c in result.metrics().query()["counters"]
  }
  assert counters[("_WriteOnKeyedStreamsFn", "streams_started")] == 3, counters
  assert counters[("_WriteOnKeyedStreamsFn", "rows_written")] == 650
  assert counters[("_JoinKeyBatchesFn", "batches")] == 13
  _assert_once(bq_emulator.client(), dataset, expected)


def test_a_later_round_in_the_same_process_resumes_the_streams_the_last_one_left(bq_emulator):
  """FnApiRunner rounds are pipelines of their own (new state): the streams a finished
  round's keys wrote are resumed by the next round's keys instead of new ones."""
  from transforms.sinks import bigquery as bq

  dataset = _dataset()
  where = (PROJECT, dataset, "sensor_readings")
  ends = []
  for round_ in range(2):
    batches = [
      (
        ("sensor_readings", shard),
        _rows("s", shard, range(round_ * 100, (round_ + 1) * 100), seed=round_ * 10 + shard),
      )
      for shard in range(3)
    ]
    store = BigQueryStore(
      PROJECT,
      dataset,
      api_endpoint=bq_emulator.endpoint,
      storage_api_endpoint=bq_emulator.grpc_address,
    )
    with BeamTestPipeline() as p:
      _ = p | beam.Create(batches) | WriteBatches(store, retry_deadline_s=30)
    ends.append(sorted(bq._IDLE_STREAMS.get(where, [])))
  assert [end for _, end in ends[0]] == [100] * 3
  assert {name for name, _ in ends[1]} == {name for name, _ in ends[0]}
  assert [end for _, end in ends[1]] == [200] * 3
  _assert_once(
    bq_emulator.client(), dataset, [("s", shard, o) for shard in range(3) for o in range(200)]
  )
