"""BigQuery sink, pure logic (no emulator, no network): request chunking under BigQuery's
limits, per-row and request error classification, schema building, row conversion, pickling."""

from __future__ import annotations

import json
import pickle

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from tools.produce import EventFactory
from transforms.events import meter_row, parse_meter, parse_sensor, sensor_row
from transforms.sinks.bigquery import (
  MAX_BYTES_PER_REQUEST,
  MAX_ROWS_PER_REQUEST,
  BigQueryStore,
  TransientInsertError,
  chunk_indexes,
  classify_insert_errors,
  is_transient_error,
  json_row,
  payload_size,
  row_id,
  table_resource,
  table_schema,
)
from transforms.sinks.schema import DEAD_LETTERS, METER_READINGS, SENSOR_READINGS, TABLES

NOW = 1_700_000_000.0
_FACTORY = EventFactory(3)


def _sensor(offset: int = 7, is_late: bool = False, metadata: bool = True) -> tuple:
  ev = json.loads(_FACTORY.sensor(NOW).value)
  if metadata:
    ev["metadata"] = {"firmware": "1.2", "phase": 3}
  else:
    ev.pop("metadata", None)
  r = parse_sensor(json.dumps(ev).encode())
  return sensor_row(r, 0, 60_000_000, is_late, "sensors", 2, offset, offset - 1)


# ---------------------------------------------------------------------------
# Chunking


def test_chunks_stop_at_the_row_limit():
  chunks = chunk_indexes([10] * 1201, max_rows=500, max_bytes=10**9)
  assert [len(c) for c in chunks] == [500, 500, 201]
  assert [i for c in chunks for i in c] == list(range(1201))


def test_chunks_stop_below_the_byte_limit():
  chunks = chunk_indexes([400] * 10, max_rows=500, max_bytes=1000)
  assert chunks == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  assert all(sum(400 for _ in c) <= 1000 for c in chunks)


def test_a_row_over_the_byte_limit_travels_alone():
  assert chunk_indexes([10, 5000, 10, 10], max_rows=500, max_bytes=1000) == [[0], [1], [2, 3]]


def test_chunks_of_nothing_and_bad_limits():
  assert chunk_indexes([]) == []
  with pytest.raises(ValueError):
    chunk_indexes([1], max_rows=0)


def test_default_limits_are_under_bigquerys():
  assert MAX_ROWS_PER_REQUEST <= 500  # BigQuery's recommended maximum
  assert MAX_BYTES_PER_REQUEST < 10 * 1024 * 1024  # the HTTP request limit


def test_payload_size_counts_the_serialised_row_and_its_id():
  payload = json_row(SENSOR_READINGS, _sensor(), "2024-01-01T00:00:00.000000Z")
  size = payload_size(payload, "sensors-2-7")
  assert size >= len(json.dumps(payload)) + len("sensors-2-7")
  wide = dict(payload, sensor_id="é" * 1000)  # bytes, not characters
  assert payload_size(wide, "x") - payload_size(payload, "x") >= 1000


def test_store_chunks_a_large_write_under_both_limits():
  """write() sends no request above the limits: checked on the chunk plan it builds."""
  rows = [_sensor(o) for o in range(1300)]
  payloads = [json_row(SENSOR_READINGS, r, "2024-01-01T00:00:00Z") for r in rows]
  sizes = [payload_size(p, row_id(r)) for p, r in zip(payloads, rows)]
  max_bytes = 50_000
  chunks = chunk_indexes(sizes, 500, max_bytes)
  assert len(chunks) > 3
  assert all(len(c) <= 500 and sum(sizes[i] for i in c) <= max_bytes for c in chunks)
  assert sorted(i for c in chunks for i in c) == list(range(1300))


# ---------------------------------------------------------------------------
# Per-row errors of insertAll (the shape the emulator and BigQuery return)


def test_invalid_rows_are_rejected_and_stopped_ones_resent():
  errors = [
    {"index": 0, "errors": [{"reason": "stopped", "location": "", "message": ""}]},
    {
      "index": 1,
      "errors": [
        {
          "reason": "invalid",
          "location": "meter_id",
          "message": "Missing required field: meter_id.",
          "debugInfo": "",
        }
      ],
    },
    {"index": 3, "errors": [{"reason": "stopped", "location": "", "message": ""}]},
  ]
  rejected, stopped, transient = classify_insert_errors(errors, 4)
  assert rejected == {1: "invalid at meter_id: Missing required field: meter_id."}
  assert stopped == [0, 3]  # row 2 had no error: it was inserted
  assert transient == {}


def test_transient_row_reasons_are_retried_not_rejected():
  errors = [
    {"index": 0, "errors": [{"reason": "backendError", "message": "try again"}]},
    {"index": 1, "errors": [{"reason": "timeout", "message": "slow"}]},
    {"index": 2, "errors": [{"reason": "stopped"}]},
  ]
  rejected, stopped, transient = classify_insert_errors(errors, 3)
  assert rejected == {}
  assert stopped == [2]
  assert set(transient) == {0, 1} and "backendError" in transient[0]


def test_a_row_with_any_permanent_reason_is_rejected():
  errors = [
    {"index": 0, "errors": [{"reason": "stopped"}, {"reason": "invalid", "message": "bad"}]},
    {"index": 1, "errors": [{"reason": "someNewReason", "message": "?"}]},
    {"index": 2, "errors": []},
  ]
  rejected, stopped, transient = classify_insert_errors(errors, 3)
  assert rejected == {0: "invalid: bad", 1: "someNewReason: ?", 2: "unknown: no detail"}
  assert stopped == [] and transient == {}


def test_an_error_for_a_row_that_was_not_sent_is_refused():
  with pytest.raises(ValueError, match="row 5 of 2"):
    classify_insert_errors([{"index": 5, "errors": [{"reason": "invalid"}]}], 2)


# ---------------------------------------------------------------------------
# Request errors


def _api_error(cls, reason=None):
  errors = [{"reason": reason, "message": "m"}] if reason else []
  return cls("m", errors=errors)


@pytest.mark.parametrize(
  "exc",
  [
    _api_error(gexc.TooManyRequests),
    _api_error(gexc.InternalServerError),
    _api_error(gexc.BadGateway),
    _api_error(gexc.ServiceUnavailable),
    _api_error(gexc.GatewayTimeout),
    _api_error(gexc.NotFound),
    _api_error(gexc.Forbidden, "rateLimitExceeded"),
    _api_error(gexc.Forbidden, "quotaExceeded"),
    _api_error(gexc.BadRequest, "backendError"),
    gexc.RetryError("deadline", cause=_api_error(gexc.ServiceUnavailable)),
    requests.exceptions.ConnectionError("refused"),
    requests.exceptions.ReadTimeout("slow"),
    requests.exceptions.ChunkedEncodingError("cut"),
    ConnectionResetError("reset"),
    TimeoutError("t"),
    TransientInsertError("stopped rows"),
  ],
  ids=lambda e: type(e).__name__,
)
def test_transient_errors(exc):
  assert is_transient_error(exc)
  assert BigQueryStore("p-roject", "d").is_transient(exc)


@pytest.mark.parametrize(
  "exc",
  [
    _api_error(gexc.BadRequest, "invalid"),
    _api_error(gexc.BadRequest),
    _api_error(gexc.Forbidden, "accessDenied"),
    _api_error(gexc.Unauthorized),
    _api_error(gexc.Conflict),
    requests.exceptions.SSLError("cert"),
    gexc.RetryError("deadline", cause=_api_error(gexc.BadRequest, "invalid")),
    ValueError("bug"),
    KeyError("sensor_readings"),
  ],
  ids=lambda e: type(e).__name__,
)
def test_permanent_errors(exc):
  assert not is_transient_error(exc)


# ---------------------------------------------------------------------------
# Schema and rows


def test_schema_fields_follow_the_shared_schema():
  for table in TABLES.values():
    fields = table_schema(table)
    assert [f.name for f in fields] == list(table.names)
    for f, c in zip(fields, table.columns):
      assert f.field_type == c.bq_type
      assert f.mode == ("REQUIRED" if c.required else "NULLABLE")
  sensor = {f.name: f for f in table_schema(SENSOR_READINGS)}
  assert sensor["metadata"].field_type == "JSON" and sensor["metadata"].mode == "NULLABLE"
  assert sensor["is_late"].field_type == "BOOL" and sensor["is_late"].mode == "REQUIRED"
  for name in ("event_time", "window_start", "window_end", "written_at"):
    assert sensor[name].field_type == "TIMESTAMP"
  dead = {f.name: f for f in table_schema(DEAD_LETTERS)}
  assert dead["failed_at"].field_type == "TIMESTAMP"
  assert dead["raw_key"].mode == dead["raw_value"].mode == "NULLABLE"


def test_tables_are_day_partitioned_and_clustered():
  coordinates = ["kafka_topic", "kafka_partition", "kafka_offset"]
  expected = {
    "sensor_readings": ("event_time", coordinates + ["sensor_id"]),
    "meter_readings": ("event_time", coordinates + ["meter_id"]),
    "dead_letters": ("failed_at", coordinates),
  }
  for name, (partition, cluster) in expected.items():
    t = table_resource("proj-1", "ds", TABLES[name])
    assert (t.project, t.dataset_id, t.table_id) == ("proj-1", "ds", name)
    assert t.time_partitioning.type_ == bigquery.TimePartitioningType.DAY
    assert t.time_partitioning.field == partition
    assert t.clustering_fields == cluster
    assert t.table_constraints.primary_key.columns == coordinates


def test_sensor_row_becomes_json_with_a_real_bool_and_iso_timestamps():
  row = _sensor(offset=7, is_late=1)  # the pipeline may carry 0/1
  payload = json_row(SENSOR_READINGS, row, "2024-05-01T10:00:00.123456Z")
  assert payload["is_late"] is True
  assert payload["written_at"] == "2024-05-01T10:00:00.123456Z"
  assert payload["event_time"].endswith("Z") and "T" in payload["event_time"]
  assert json.loads(payload["metadata"]) == {"firmware": "1.2", "phase": 3}
  assert (payload["kafka_topic"], payload["kafka_partition"], payload["kafka_offset"]) == (
    "sensors",
    2,
    7,
  )
  assert "covers_from" not in payload and set(payload) == set(SENSOR_READINGS.names)
  json.dumps(payload, allow_nan=False)  # serialisable as insertAll sends it


def test_null_columns_are_left_out():
  payload = json_row(SENSOR_READINGS, _sensor(metadata=False), "2024-05-01T10:00:00Z")
  assert "metadata" not in payload
  m = parse_meter(EventFactory(4).meter(NOW).value)
  meter = json_row(METER_READINGS, meter_row(m, 0, 1, False, "m", 0, 3, 3), "2024-05-01T10:00:00Z")
  assert meter["is_late"] is False and set(meter) == set(METER_READINGS.names)


def test_row_id_is_topic_partition_offset():
  assert row_id(_sensor(offset=42)) == "sensors-2-42"


# ---------------------------------------------------------------------------
# The store object


def test_store_pickles_without_a_client_and_refuses_bad_limits():
  s = BigQueryStore(
    "my-project",
    "grid",
    api_endpoint="http://127.0.0.1:1",
    client_retry_s=2,
    storage_api_endpoint="127.0.0.1:2",
  )
  s._client = object()  # an opened store: the client must not travel
  copy = pickle.loads(pickle.dumps(s))
  assert copy._client is None and not copy._tables_ready
  assert (copy.project, copy.dataset, copy.api_endpoint, copy.client_retry_s) == (
    "my-project",
    "grid",
    "http://127.0.0.1:1",
    2,
  )
  assert copy.storage_api_endpoint == "127.0.0.1:2" and copy.write_method == "storage_write"
  with pytest.raises(ValueError, match="bigquery_storage_api_endpoint"):
    BigQueryStore("p", "d", api_endpoint="http://127.0.0.1:1")
  with pytest.raises(ValueError, match="bigquery_write_method"):
    BigQueryStore("p", "d", write_method="load_jobs")
  with pytest.raises(ValueError, match="max_rows_per_request"):
    BigQueryStore("p", "d", max_rows_per_request=0)
  with pytest.raises(ValueError, match="max_bytes_per_request"):
    BigQueryStore("p", "d", max_bytes_per_request=11_000_000)


def test_make_store_builds_a_bigquery_store_from_the_options():
  from pipelines.options import OptionError, SmartGridOptions, validate
  from pipelines.smartgrid import make_store

  args = ["--sink=bigquery://my-project/grid_data", "--bigquery_api_endpoint=http://127.0.0.1:9050"]
  with pytest.raises(OptionError, match="--bigquery_storage_api_endpoint"):
    validate(SmartGridOptions(args))
  with pytest.raises(OptionError, match="--bigquery_storage_api_endpoint"):
    validate(SmartGridOptions(args + ["--bigquery_storage_api_endpoint=http://x:1"]))
  legacy = SmartGridOptions(args + ["--bigquery_write_method=streaming_inserts"])
  validate(legacy)
  assert make_store(legacy).write_method == "streaming_inserts"
  o = SmartGridOptions(args + ["--bigquery_storage_api_endpoint=127.0.0.1:9060"])
  validate(o)
  store = make_store(o)
  assert isinstance(store, BigQueryStore)
  assert (
    store.project,
    store.dataset,
    store.api_endpoint,
    store.storage_api_endpoint,
    store.write_method,
  ) == ("my-project", "grid_data", "http://127.0.0.1:9050", "127.0.0.1:9060", "storage_write")


# ---------------------------------------------------------------------------
# StreamWriter's bookkeeping (pure logic: a scripted stand-in for the gRPC call)


class _Scripted:
  """Answers each append call from a script: a list of codes per request (0 ok, 6
  ALREADY_EXISTS, 11 OUT_OF_RANGE), or an exception to raise; records the offsets sent."""

  def __init__(self, script):
    self.script, self.sent = list(script), []

  def create_write_stream(self, parent, write_stream, timeout=None):
    from google.cloud.bigquery_storage_v1 import types

    return types.WriteStream(name=f"{parent}/streams/s1")

  def append_rows(self, requests, **kw):
    from google.cloud.bigquery_storage_v1 import types

    requests = list(requests)
    self.sent.append([r.offset for r in requests])
    step = self.script.pop(0)
    if isinstance(step, BaseException):
      raise step
    out = []
    for code in step:
      r = types.AppendRowsResponse()
      if code:
        r.error.code, r.error.message = code, f"code {code}"
      out.append(r)
    return iter(out)


def _writer(script, **kw):
  from transforms.sinks.bigquery_storage import StreamWriter

  client = _Scripted(script)
  return client, StreamWriter(
    client,
    "projects/p/datasets/d/tables/t",
    TABLES["sensor_readings"],
    max_request_bytes=40,
    sleep=lambda s: None,
    **kw,
  )


def test_stream_writer_resends_unconfirmed_requests_at_their_offsets():
  from google.api_core import exceptions as gexc

  rows = [b"x" * 10] * 6  # 2 rows a request: offsets 0, 2, 4
  client, w = _writer([[0], gexc.ServiceUnavailable("dropped"), [6, 0]])
  w.append(rows)
  # the first call ended after one answer; the rest went again at the same offsets, the one
  # that had landed answered ALREADY_EXISTS
  assert client.sent == [[0, 2, 4], [2, 4], [2, 4]]
  assert w.next_offset == 6 and w.already_existed == 1 and w.calls == 3


def test_stream_writer_out_of_range_first_means_the_stream_is_gone_and_later_means_resend():
  from transforms.sinks.bigquery_storage import StreamGone

  client, w = _writer([[11]])
  with pytest.raises(StreamGone, match="OUT_OF_RANGE"):
    w.append([b"x" * 10])
  client, w = _writer([[0, 11], [0]])  # request 2 lost on the way: resync from offset 2
  w.append([b"x" * 10] * 4)
  assert client.sent == [[0, 2], [2]] and w.next_offset == 4


def test_stream_writer_gives_up_when_unconfirmed_past_its_deadline():
  from google.api_core import exceptions as gexc

  from transforms.sinks.bigquery_storage import StreamUncertain

  now = [0.0]
  client, w = _writer(
    [gexc.ServiceUnavailable("down")] * 100, append_deadline_s=3, clock=lambda: now[0]
  )
  w._sleep = lambda s: now.__setitem__(0, now[0] + s)
  with pytest.raises(StreamUncertain, match="unconfirmed"):
    w.append([b"x" * 10] * 2)
  assert w.next_offset == 0 and len(client.sent) > 3
  assert all(offsets == [0] for offsets in client.sent)  # always the same request again
