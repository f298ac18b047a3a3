"""Unit tests of the pipeline's parts, without a broker.

Option validation (every refusal names its option), event parsing (every malformed
kind gets its reason), ParseEvents through a TestPipeline, ack merging, the commit
frontier of ``PartitionProgress`` (holes, out-of-order acks, replays), the sink's
retry loop on a fake clock, and ``WriteBatches`` on a real SQLite file: rows written,
acks only after the write, a write that keeps failing fails the bundle without an ack,
rows the store refuses for good land in ``dead_letters``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.options import OptionError, SmartGridOptions, validate
from runners import main as pipeline_main
from tests.support import FakeClock
from tools.produce import BAD_KINDS, EventFactory
from transforms.acks import Ack, acks_for_rows
from transforms.commit import PartitionProgress
from transforms.events import (
  DEAD_LETTER_REASONS,
  InvalidEvent,
  parse_meter,
  parse_sensor,
  parse_timestamp_us,
)
from transforms.kafka.records import KafkaRecord
from transforms.parse import DEAD_LETTER_TAG, METER, SENSOR, ParseEvents
from transforms.retry import RetriesExhausted, with_retries
from transforms.rows import ROW_TYPES, key_table, offset_of, partition_of
from transforms.sinks.base import WriteBatches
from transforms.sinks.sqlite import SqliteStore
from transforms.timestamps import iso_us

NOW = 1_700_000_000.0  # a fixed instant: 2023-11-14T22:13:20Z


# ---------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
  "args, option",
  [
    (["--bootstrap_servers=nohostport"], "bootstrap_servers"),
    (["--bootstrap_servers=a:1,b"], "bootstrap_servers"),
    (["--sensor_topic=bad topic!"], "sensor_topic"),
    (["--meter_topic="], "meter_topic"),
    (["--sensor_topic=x", "--meter_topic=x"], "meter_topic"),
    (["--group_id="], "group_id"),
    (["--start=yesterday at noon"], "start"),
    (["--stop=whenever"], "stop"),
    (["--window_size_secs=0"], "window_size_secs"),
    (["--allowed_lateness_secs=-1"], "allowed_lateness_secs"),
    (["--batch_size=0"], "batch_size"),
    (["--max_buffering_secs=0"], "max_buffering_secs"),
    (["--num_shards=0"], "num_shards"),
    (["--num_shards=5000"], "num_shards"),
    (["--sink=postgres://db/x"], "sink"),
    (["--sink=sqlite:///"], "sink"),
    (["--sink=sqlite:/x.db"], "sink"),
    (["--sink=bigquery://P/D"], "sink"),
    (["--sink_flush_rows=0"], "sink_flush_rows"),
    (["--sink_retry_deadline_secs=0"], "sink_retry_deadline_secs"),
    (["--commit_interval_secs=0"], "commit_interval_secs"),
    (["--poll_timeout_ms=0"], "poll_timeout_ms"),
    (["--progress_secs=-1"], "progress_secs"),
    (["--kafka_security_protocol=CARRIER_PIGEON"], "kafka_security_protocol"),
  ],
)
def test_bad_option_values_fail_naming_the_option(args, option):
  with pytest.raises(OptionError) as e:
    pipeline_main.parse(["--mode=batch", *args])
  assert str(e.value).startswith(f"--{option}:"), str(e.value)


def test_validate_alone_names_the_option():
  o = SmartGridOptions(["--batch_size=-3"])
  with pytest.raises(OptionError, match=r"^--batch_size: must be >= 1, got -3"):
    validate(o)


def test_defaults_validate_and_batch_mode_stops_at_end():
  mode, options = pipeline_main.parse(["--mode=batch"])
  o = options.view_as(SmartGridOptions)
  assert mode == "batch" and o.stop == "end"
  assert (o.bootstrap_servers, o.sensor_topic, o.meter_topic, o.group_id, o.batch_size, o.sink) == (
    "127.0.0.1:9092",
    "smartgrid-sensor-data",
    "smartgrid-meter-readings",
    "smartgrid-pipeline",
    100,
    "sqlite:///output/smartgrid.db",
  )
  mode, options = pipeline_main.parse(["--mode=local"])
  assert mode == "local" and options.view_as(SmartGridOptions).stop is None


def test_unknown_option_is_named():
  with pytest.raises(OptionError, match="--batchsize"):
    pipeline_main.parse(["--batchsize=100"])


@pytest.mark.parametrize(
  "arg, option", [("--batch_size=abc", "--batch_size"), ("--shard_by=planet", "--shard_by")]
)
def test_mistyped_values_are_refused_by_argparse_naming_the_option(arg, option, capsys):
  with pytest.raises(SystemExit) as e:
    pipeline_main.parse([arg])
  assert e.value.code == 2
  assert option in capsys.readouterr().err


def test_main_exits_2_with_the_option_in_the_message(capsys):
  assert pipeline_main.main(["--mode=batch", "--num_shards=0"]) == 2
  assert "error: --num_shards:" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Events


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_malformed_kind_of_the_factory_gets_its_reason(kind):
  event = EventFactory(3).bad(NOW, kind)
  assert event.bad == kind
  with pytest.raises(InvalidEvent) as e:
    parse_sensor(event.value)
  assert e.value.reason == kind
  assert str(e.value).startswith(f"{kind}: ")


def _sensor(**changes) -> dict:
  body = json.loads(EventFactory(5).sensor(NOW).value)
  for k, v in changes.items():
    if v is _DELETE:
      del body[k]
    else:
      body[k] = v
  return body


_DELETE = object()


@pytest.mark.parametrize(
  "value, reason",
  [
    (None, "not_json"),  # a tombstone
    (b"", "not_json"),
    (b"\xc3\x28", "not_utf8"),
    (b'"just a string"', "not_object"),
    (b"null", "not_object"),
    (json.dumps(_sensor(event_id=_DELETE)).encode(), "missing_field"),
    (json.dumps(_sensor(sensor_id="   ")).encode(), "missing_field"),
    (json.dumps(_sensor(timestamp=_DELETE)).encode(), "missing_field"),
    (json.dumps(_sensor(value=None)).encode(), "missing_field"),
    (json.dumps(_sensor(sensor_id=[17])).encode(), "wrong_type"),  # an integer id is text
    (json.dumps(_sensor(value=True)).encode(), "wrong_type"),
    (json.dumps(_sensor(location=[1, 2])).encode(), "wrong_type"),
    (json.dumps(_sensor(value=math.inf)).encode(), "non_finite"),
    (json.dumps(_sensor(location={"lat": 91.0, "lon": 0.0})).encode(), "out_of_range"),
    (json.dumps(_sensor(location={"lat": 0.0, "lon": -181.0})).encode(), "out_of_range"),
    (json.dumps(_sensor(timestamp="2024-13-45T00:00:00")).encode(), "bad_timestamp"),
    (json.dumps(_sensor(timestamp=True)).encode(), "bad_timestamp"),  # epoch numbers are fine
    (b"{" + b'"a": "' + b"x" * (64 * 1024) + b'"}', "oversized"),
  ],
)
def test_parse_sensor_reasons(value, reason):
  with pytest.raises(InvalidEvent) as e:
    parse_sensor(value)
  assert e.value.reason == reason, str(e.value)


@pytest.mark.parametrize(
  "change, reason",
  [
    ({"customer_id": _DELETE}, "missing_field"),
    ({"reading": "twelve"}, "wrong_type"),  # a numeric string is a number
    ({"reading": math.nan}, "non_finite"),
    ({"timestamp": "noon"}, "bad_timestamp"),
    ({"unit": 3}, "wrong_type"),
  ],
)
def test_parse_meter_reasons(change, reason):
  body = json.loads(EventFactory(5).meter(NOW).value)
  for k, v in change.items():
    if v is _DELETE:
      del body[k]
    else:
      body[k] = v
  with pytest.raises(InvalidEvent) as e:
    parse_meter(json.dumps(body).encode())
  assert e.value.reason == reason


def test_good_events_parse_to_typed_values():
  body = _sensor(metadata={"b": 1, "a": 2}, timestamp="2023-11-14T22:13:20.5")  # naive = UTC
  s = parse_sensor(json.dumps(body).encode())
  assert s.sensor_id == body["sensor_id"] and s.value == body["value"]
  assert s.event_time_us == int(NOW * 1_000_000) + 500_000
  assert json.loads(s.metadata) == {"a": 2, "b": 1}
  meter = json.loads(EventFactory(5).meter(NOW).value)
  del meter["unit"]
  m = parse_meter(json.dumps(meter).encode())
  assert m.unit == "kWh" and m.meter_id == meter["meter_id"]
  assert parse_timestamp_us("2023-11-14T23:13:20+01:00") == int(NOW * 1_000_000)
  assert iso_us(int(NOW * 1_000_000)) == "2023-11-14T22:13:20.000000Z"


def _record(
  topic: str,
  offset: int,
  value,
  ts: float = NOW,
  partition: int = 0,
  covers_from: int | None = None,
) -> KafkaRecord:
  return KafkaRecord(
    topic,
    partition,
    offset,
    offset if covers_from is None else covers_from,
    b"k",
    value,
    int(ts * 1000),
  )


def test_parse_events_transform_routes_every_record_once():
  f = EventFactory(11)
  good_sensor = f.sensor(NOW).value
  good_meter = f.meter(NOW).value
  late = json.loads(f.sensor(NOW - 7200).value)  # two hours before its Kafka timestamp
  records = [
    _record("s", 0, good_sensor),
    _record("m", 0, good_meter, partition=2),
    _record("s", 1, json.dumps(late).encode()),
  ]
  records += [_record("s", 2 + i, f.bad(NOW, kind).value) for i, kind in enumerate(BAD_KINDS)]
  records.append(_record("other", 0, good_sensor))
  with BeamTestPipeline() as p:
    rows, dead = (
      p
      | beam.Create(records)
      | ParseEvents(
        {"s": SENSOR, "m": METER}, window_size_secs=60, allowed_lateness_secs=60, num_shards=2
      )
    )
    assert_that(
      rows
      | "RowKeys"
      >> beam.Map(
        lambda kv: (
          kv[0],
          *partition_of(kv[1])[:1],
          offset_of(kv[1]),
          ROW_TYPES[key_table(kv[0])].as_dict(kv[1])["is_late"],
        )
      ),
      equal_to(
        [
          (("sensor_readings", 0), "s", 0, False),
          (("meter_readings", 0), "m", 0, False),
          (("sensor_readings", 0), "s", 1, True),
        ]
      ),
      label="Rows",
    )
    expected_dead = [("s", 2 + i, kind) for i, kind in enumerate(BAD_KINDS)]
    expected_dead.append(("other", 0, "unknown_topic"))
    assert_that(
      dead | "DeadKeys" >> beam.Map(lambda d: (d.kafka_topic, d.kafka_offset, d.reason)),
      equal_to(expected_dead),
      label="DeadLetters",
    )


def test_parse_events_refuses_bad_arguments_naming_the_option():
  with pytest.raises(ValueError, match="--num_shards"):
    ParseEvents({"s": SENSOR}, num_shards=0)
  with pytest.raises(ValueError, match="--window_size_secs"):
    ParseEvents({"s": SENSOR}, window_size_secs=0)
  with pytest.raises(ValueError, match="--shard_by"):
    ParseEvents({"s": SENSOR}, shard_by="moon")


def test_dead_letter_reasons_cover_the_factory_kinds():
  assert set(BAD_KINDS) <= set(DEAD_LETTER_REASONS)
  assert DEAD_LETTER_TAG == "dead_letters"


# ---------------------------------------------------------------------------
# Acks


def _row(topic, partition, offset, covers_from=None):
  return ("payload", topic, partition, offset, offset if covers_from is None else covers_from)


def test_acks_merge_contiguous_rows_in_any_order():
  rows = [_row("t", 0, o) for o in (4, 2, 3, 0, 1)]
  assert acks_for_rows(rows) == [Ack("t", 0, 0, 5)]


def test_acks_keep_holes_and_separate_partitions_and_topics():
  rows = [_row("t", 0, 0), _row("t", 0, 1), _row("t", 0, 5), _row("t", 1, 7), _row("u", 0, 1)]
  assert sorted(acks_for_rows(rows), key=lambda a: (a.topic, a.partition, a.start)) == [
    Ack("t", 0, 0, 2),
    Ack("t", 0, 5, 6),
    Ack("t", 1, 7, 8),
    Ack("u", 0, 1, 2),
  ]


def test_acks_covers_from_spans_gaps_and_overlaps_merge():
  # offsets 3 and 4 were transaction markers: the record at 5 covers [2, 5]
  rows = [_row("t", 0, 1, 0), _row("t", 0, 5, 2), _row("t", 0, 5, 2), _row("t", 0, 6)]
  assert acks_for_rows(rows) == [Ack("t", 0, 0, 7)]
  assert acks_for_rows([]) == []


# ---------------------------------------------------------------------------
# PartitionProgress


def test_progress_commits_the_resolved_start_before_anything_is_acked():
  # A start at latest/timestamp must hold for the next round: the start itself is committed.
  p = PartitionProgress()
  assert p.to_commit() is None
  p.add_start(10)
  assert (p.base, p.frontier, p.to_commit()) == (10, 10, 10)
  p.committed = 10
  assert p.to_commit() is None


def test_progress_contiguous_acks_move_the_frontier():
  p = PartitionProgress()
  p.add_start(10)
  p.add_ack(10, 13)
  assert p.to_commit() == 13
  p.committed = 13
  assert p.to_commit() is None
  p.add_ack(13, 20)
  assert p.to_commit() == 20


def test_progress_a_hole_holds_the_commit_until_it_is_filled():
  p = PartitionProgress()
  p.add_start(0)
  p.add_ack(5, 10)
  p.add_ack(12, 15)
  assert p.frontier == 0 and p.to_commit() == 0
  p.committed = 0
  assert p.to_commit() is None
  p.add_ack(0, 5)
  assert p.to_commit() == 10 and p.pending == [(12, 15)]
  p.add_ack(10, 12)
  assert p.to_commit() == 15 and p.pending == []


def test_progress_acks_before_the_start_wait_for_it():
  p = PartitionProgress()
  p.add_ack(3, 6)
  p.add_ack(0, 3)
  assert p.to_commit() is None
  p.add_start(0)
  assert p.to_commit() == 6


def test_progress_replays_and_overlaps_never_move_it_back():
  p = PartitionProgress()
  p.add_start(4)
  p.add_ack(0, 8)  # a replay reaching back before the start
  assert p.to_commit() == 8
  p.committed = 8
  p.add_ack(2, 6)  # fully behind the frontier: ignored
  p.add_ack(6, 8)
  assert p.pending == [] and p.to_commit() is None and p.frontier == 8
  p.add_ack(7, 11)  # overlaps the frontier
  assert p.to_commit() == 11
  p.add_start(0)  # a second start never resets the base
  assert p.base == 4 and p.frontier == 11


# ---------------------------------------------------------------------------
# with_retries


def _flaky(failures: int, exc: BaseException):
  calls = {"n": 0}

  def fn():
    calls["n"] += 1
    if calls["n"] <= failures:
      raise exc
    return "ok"

  return fn, calls


def test_with_retries_backs_off_exponentially_with_jitter_until_success():
  c = FakeClock(100.0)
  fn, calls = _flaky(5, sqlite3.OperationalError("database is locked"))
  result = with_retries(
    fn,
    lambda e: isinstance(e, sqlite3.OperationalError),
    deadline_s=60,
    initial_backoff_s=0.1,
    max_backoff_s=0.4,
    sleep=c.sleep,
    clock=c.clock,
  )
  assert result == "ok" and calls["n"] == 6
  backoffs = [0.1, 0.2, 0.4, 0.4, 0.4]
  assert len(c.sleeps) == 5
  for s, b in zip(c.sleeps, backoffs):
    assert b / 2 <= s <= 1.5 * b


def test_with_retries_raises_non_transient_at_once():
  c = FakeClock(100.0)
  fn, calls = _flaky(1, sqlite3.IntegrityError("NOT NULL"))
  with pytest.raises(sqlite3.IntegrityError):
    with_retries(
      fn,
      lambda e: isinstance(e, sqlite3.OperationalError),
      deadline_s=60,
      sleep=c.sleep,
      clock=c.clock,
    )
  assert calls["n"] == 1 and c.sleeps == []


def test_with_retries_gives_up_after_the_deadline():
  c = FakeClock(100.0)
  fn, calls = _flaky(10**6, sqlite3.OperationalError("disk I/O error"))
  with pytest.raises(RetriesExhausted, match="still failing") as e:
    with_retries(
      fn,
      lambda e: isinstance(e, sqlite3.OperationalError),
      deadline_s=10,
      initial_backoff_s=0.1,
      max_backoff_s=2.0,
      what="writing",
      sleep=c.sleep,
      clock=c.clock,
    )
  assert isinstance(e.value.__cause__, sqlite3.OperationalError)
  # the last sleep may overrun the deadline by its jitter: at most half a (capped) backoff
  assert c.now - 100.0 <= 10 + 0.5 * 2.0 + 1e-9
  assert 3 < calls["n"] < 30


# ---------------------------------------------------------------------------
# WriteBatches on a real SQLite file

_SEEN: dict[str, list] = {}  # FnApiRunner runs DoFns in this process


class _CheckAckedRowsAreDurable(beam.DoFn):
  """Downstream of the sink: every ack must name rows already committed in the file."""

  def __init__(self, path: str):
    self._path = path

  def process(self, ack: Ack):
    conn = sqlite3.connect(self._path, timeout=10)
    try:
      found = set()
      for table in ("sensor_readings", "meter_readings", "dead_letters"):
        found |= {
          o
          for (o,) in conn.execute(
            f"SELECT kafka_offset FROM {table} WHERE kafka_topic=? AND kafka_partition=? "
            "AND kafka_offset>=? AND kafka_offset<?",
            (ack.topic, ack.partition, ack.start, ack.end),
          )
        }
    finally:
      conn.close()
    _SEEN.setdefault(self._path, []).append((ack, found))
    yield ack


class AlwaysLockedStore(SqliteStore):
  def write(self, table, rows, written_at):
    raise sqlite3.OperationalError("database is locked")


def _sensor_rows(topic: str, partition: int, offsets, factory: EventFactory | None = None):
  from transforms.events import sensor_row

  f = factory or EventFactory(21 + partition)  # distinct events per partition (event_id is unique)
  out = []
  for o in offsets:
    s = parse_sensor(f.sensor(NOW).value)
    out.append(sensor_row(s, 0, 60_000_000, False, topic, partition, o, o))
  return out


def _table(path, table):
  conn = sqlite3.connect(path)
  try:
    return sorted(conn.execute(f"SELECT kafka_topic, kafka_partition, kafka_offset FROM {table}"))
  finally:
    conn.close()


def test_write_batches_writes_rows_then_acks_them(tmp_path):
  path = str(tmp_path / "sink.db")
  rows0 = _sensor_rows("s", 0, range(0, 7))
  rows1 = _sensor_rows("s", 1, range(3, 6))
  from transforms.events import meter_row

  m = parse_meter(EventFactory(2).meter(NOW).value)
  meter = [meter_row(m, 0, 60_000_000, False, "m", 0, 4, 0)]  # covers 0..4 (a gap before it)
  batches = [
    (("sensor_readings", 0), rows0[:4]),
    (("sensor_readings", 0), rows0[4:]),
    (("sensor_readings", 1), rows1),
    (("meter_readings", 0), meter),
  ]
  with BeamTestPipeline() as p:
    acks = (
      p
      | beam.Create(batches)
      | WriteBatches(SqliteStore(path), flush_rows=3, retry_deadline_s=5, batch_size=4)
      | beam.ParDo(_CheckAckedRowsAreDurable(path))
    )
    # flushed every >= 3 rows: the acks may come in pieces, but they cover exactly these offsets
    assert_that(
      acks | beam.FlatMap(lambda a: [(a.topic, a.partition, o) for o in range(a.start, a.end)]),
      equal_to(
        [("s", 0, o) for o in range(7)]
        + [("s", 1, o) for o in range(3, 6)]
        + [("m", 0, o) for o in range(5)]
      ),
    )
  assert _table(path, "sensor_readings") == [("s", 0, o) for o in range(7)] + [
    ("s", 1, o) for o in range(3, 6)
  ]
  assert _table(path, "meter_readings") == [("m", 0, 4)]
  seen = _SEEN.pop(path)
  assert seen
  for ack, found in seen:
    assert ack.end - 1 in found, (ack, found)  # the row an ack ends at was already in the file
    if ack.topic == "s":
      assert found == set(range(ack.start, ack.end))


def test_write_batches_replay_is_idempotent(tmp_path):
  path = str(tmp_path / "sink.db")
  rows = _sensor_rows("s", 0, range(5))
  for _ in range(2):
    with BeamTestPipeline() as p:
      _ = p | beam.Create([(("sensor_readings", 0), rows)]) | WriteBatches(SqliteStore(path))
  assert _table(path, "sensor_readings") == [("s", 0, o) for o in range(5)]


def test_write_batches_failing_store_fails_the_bundle_and_acks_nothing(tmp_path):
  path = str(tmp_path / "sink.db")
  key = path + "#failing"
  with pytest.raises(Exception) as e:
    with BeamTestPipeline() as p:
      _ = (
        p
        | beam.Create([(("sensor_readings", 0), _sensor_rows("s", 0, range(3)))])
        | WriteBatches(AlwaysLockedStore(path), retry_deadline_s=0.3)
        | beam.Map(lambda ack: _SEEN.setdefault(key, []).append(ack))
      )
  assert "still failing" in str(e.value) and "database is locked" in str(e.value)
  assert _SEEN.pop(key, []) == []
  assert _table(path, "sensor_readings") == []


def test_write_batches_rejected_rows_go_to_dead_letters_and_are_acked(tmp_path):
  path = str(tmp_path / "sink.db")
  rows = _sensor_rows("s", 0, range(4))
  rows[2] = (None,) + rows[2][1:]  # event_id NULL: a NOT NULL violation
  with BeamTestPipeline() as p:
    acks = p | beam.Create([(("sensor_readings", 0), rows)]) | WriteBatches(SqliteStore(path))
    assert_that(acks, equal_to([Ack("s", 0, 0, 4)]))
  assert _table(path, "sensor_readings") == [("s", 0, 0), ("s", 0, 1), ("s", 0, 3)]
  conn = sqlite3.connect(path)
  try:
    dead = conn.execute(
      "SELECT kafka_topic, kafka_partition, kafka_offset, error, stage FROM dead_letters"
    ).fetchall()
  finally:
    conn.close()
  assert len(dead) == 1
  topic, partition, offset, error, stage = dead[0]
  assert (topic, partition, offset, stage) == ("s", 0, 2, "sink")
  assert error.startswith("sink_rejected: sensor_readings: ") and "NOT NULL" in error


def test_write_batches_acks_each_batch_in_its_own_window(tmp_path):
  path = str(tmp_path / "sink.db")
  batches = [
    ((("sensor_readings", 0), _sensor_rows("s", 0, range(0, 3))), 10),  # window [0, 60)
    ((("sensor_readings", 1), _sensor_rows("s", 1, range(0, 2))), 70),
  ]  # window [60, 120)

  def where(ack, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
    yield (
      ack.partition,
      ack.start,
      ack.end,
      window.start.micros,
      timestamp == window.max_timestamp(),
    )

  with BeamTestPipeline() as p:
    acks = (
      p
      | beam.Create(batches)
      | "Stamp" >> beam.Map(lambda b: beam.window.TimestampedValue(b[0], b[1]))
      | beam.WindowInto(beam.window.FixedWindows(60))
      | WriteBatches(SqliteStore(path))
    )
    assert_that(
      acks | beam.ParDo(where), equal_to([(0, 0, 3, 0, True), (1, 0, 2, 60_000_000, True)])
    )


def test_write_batches_refuses_bad_flush_rows():
  with pytest.raises(ValueError, match="flush_rows"):
    WriteBatches(SqliteStore(":memory:"), flush_rows=0)


# ---------------------------------------------------------------------------
# The Beam metrics (transforms/telemetry.py) the launcher's progress line and summary print


@contextlib.contextmanager
def _metrics_container():
  """Beam's own way (metric_test.py) to run DoFn code outside a pipeline with a container."""
  from apache_beam.metrics.execution import MetricsContainer
  from apache_beam.runners.worker import statesampler
  from apache_beam.utils import counters

  sampler = statesampler.StateSampler("", counters.CounterFactory())
  statesampler.set_current_tracker(sampler)
  container = MetricsContainer("step")
  state = sampler.scoped_state("step", "process", metrics_container=container)
  sampler.start()
  try:
    with state:
      yield container
  finally:
    sampler.stop()
    statesampler.set_current_tracker(None)


def _counter(container, kind: str, label: str) -> int:
  from apache_beam.metrics.metricbase import MetricName

  from transforms import telemetry

  return container.get_counter(MetricName(telemetry.NAMESPACE, f"{kind}/{label}")).get_cumulative()


def test_reader_counts_every_record_it_emits_when_a_poll_crosses_the_stop():
  from apache_beam.io.restriction_trackers import OffsetRange
  from kafka import TopicPartition

  from tests.test_kafka_units import FakeConsumer, _reader, _rec, _run
  from transforms import telemetry
  from transforms.kafka.records import PartitionRead

  tp = TopicPartition("t", 0)
  # ten records in the log, one poll returns five, the read stops at 3 (its end at start)
  fn = _reader(FakeConsumer(tp, {o: _rec(o) for o in range(10)}, end=10, batch=5))
  with _metrics_container() as container:
    out, residual, _ = _run(fn, PartitionRead("t", 0, 0, 3), OffsetRange(0, 3))
  assert [tv.value.offset for tv in out] == [0, 1, 2] and residual is None
  assert _counter(container, telemetry.READ, "t") == 3


def test_telemetry_totals_sum_a_real_runners_counters_over_steps_and_labels():
  """The launcher's figures come from a PipelineResult: counted in two steps, read once."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner

  from transforms import telemetry

  def count(kind):
    def fn(x):
      if kind == "read":
        telemetry.count_read(x, 1)
      else:
        telemetry.count_written("sensor_readings", 2, rejected=1, duplicates=1 if x == "a" else 0)
        telemetry.count_dead_letter("not_json")
        telemetry.count_batch(full=x == "a")
      return x

    return fn

  p = beam.Pipeline(runner=FnApiRunner())
  _ = (
    p
    | beam.Create(["a", "b", "a"])
    | "Read" >> beam.Map(count("read"))
    | "Write" >> beam.Map(count("write"))
  )
  result = p.run()
  result.wait_until_finish()
  totals = telemetry.totals(result)
  assert totals == {
    "read": {"a": 2, "b": 1},
    "written": {"sensor_readings": 6},
    "rejected": {"sensor_readings": 3},
    "duplicates": {"sensor_readings": 2},
    "dead_letters": {"not_json": 3},
    "batches": {"all": 3, "full": 2},
  }
  assert telemetry.add(telemetry.add(telemetry.empty(), totals), totals)["read"] == {"a": 4, "b": 2}
