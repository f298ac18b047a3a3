"""Unit tests of parsing, without a broker: the timestamp table (also under every Python
interpreter found), the acceptance rules (one case per rule), the poison payloads that used to
fail a bundle, the dead-letter row format (stored in a real SQLite file), Avro framing without
and with a (pre-seeded) decoder, and the registry option and its secrets."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.internal import pickler

from pipelines.options import OptionError
from runners import main as pipeline_main
from tests.parse_support import (
  CLOSED_REGISTRY,
  METER_TOPIC,
  SENSOR_TOPIC,
  avro_meter,
  avro_sensor,
  jbytes,
  make_fn,
  old_service_meter,
  old_service_sensor,
  parse_one,
)
from transforms import timestamps
from transforms.avro import frame, registry_client_config
from transforms.events import (
  DEAD_LETTER_REASONS,
  ERROR_TEXT_LIMIT,
  RAW_TEXT_LIMIT,
  DeadLetter,
  InvalidEvent,
  dead_letter_row,
  decode_raw_value,
  meter_from_object,
  parse_meter,
  parse_sensor,
  raw_columns,
  sensor_from_object,
)
from transforms.parse import MAX_WINDOW_SECS, SENSOR, ParseEvents, check_registry_url
from transforms.rows import METER_ROW, SENSOR_ROW, coordinates, covers_from
from transforms.sinks.base import rejected_dead_letter_row
from transforms.sinks.schema import DEAD_LETTERS
from transforms.sinks.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
T0 = 1_705_314_600_000_000  # 2024-01-15T10:30:00Z in epoch microseconds
DAY = 86_400_000_000

# ---------------------------------------------------------------------------
# Timestamps: (value, expected micros) and (value, reason)

GOOD_TIMESTAMPS = [
  ("2024-01-15T10:30:00Z", T0),
  ("2024-01-15T10:30:00z", T0),
  ("2024-01-15T10:30:00+00:00", T0),
  ("2024-01-15T10:30:00-00:00", T0),
  ("2024-01-15T11:30:00+01:00", T0),
  ("2024-01-15T11:30:00+0100", T0),
  ("2024-01-15T11:30:00+01", T0),
  ("2024-01-15T05:00:00-05:30", T0),
  ("2024-01-16T00:29:00+13:59", T0),
  ("2024-01-15T10:30:00", T0),  # naive: UTC, as the old service's utcnow().isoformat()
  ("2024-01-15 10:30:00", T0),
  ("2024-01-15t10:30:00Z", T0),
  ("  2024-01-15T10:30:00Z\n", T0),
  ("2024-01-15T10:30", T0),
  ("2024-01-15", T0 - (10 * 3600 + 1800) * 1_000_000),
  ("2024-01-15T10:30:00.5Z", T0 + 500_000),
  ("2024-01-15T10:30:00,5Z", T0 + 500_000),
  ("2024-01-15T10:30:00.123", T0 + 123_000),
  ("2024-01-15T10:30:00.123456", T0 + 123_456),  # utcnow().isoformat()
  ("2024-01-15T10:30:00.1234567Z", T0 + 123_456),  # 7 to 9 digits: truncated to µs
  ("2024-01-15T10:30:00.999999999+00:00", T0 + 999_999),
  ("2024-02-29T10:30:00Z", T0 + 45 * DAY),  # a leap day
  ("1970-01-01T00:00:00Z", 0),
  ("2199-12-31T23:59:59.999999Z", timestamps.MAX_US - 1),
  (1705314600, T0),  # epoch seconds
  (1705314600.5, T0 + 500_000),
  (1705314600.123456, T0 + 123_456),
  (1705314600000, T0),  # epoch milliseconds (>= 1e11)
  (1705314600123, T0 + 123_000),
  (1705314600123.5, T0 + 123_500),
  (100_000_000_000, 100_000_000_000_000),  # 1e11: milliseconds, 1973-03-03
  (0, 0),
]

BAD_TIMESTAMPS = [
  ("yesterday at noon", "bad_timestamp"),
  ("", "bad_timestamp"),
  ("2024-13-01T00:00:00Z", "bad_timestamp"),
  ("2024-01-32T00:00:00Z", "bad_timestamp"),
  ("2023-02-29T00:00:00Z", "bad_timestamp"),
  ("2024-01-15T24:00:00Z", "bad_timestamp"),
  ("2024-01-15T10:60:00Z", "bad_timestamp"),
  ("2024-01-15T10:30:60Z", "bad_timestamp"),  # no leap seconds
  ("2024-01-15T10:30:00+24:00", "bad_timestamp"),
  ("2024-01-15T10:30:00+01:60", "bad_timestamp"),
  ("2024-01-15T10:30:00 Z", "bad_timestamp"),
  ("2024-01-15T10:30:00.1234567890Z", "bad_timestamp"),  # 10 fraction digits
  ("2024-01-15T10:30:00ZZ", "bad_timestamp"),
  ("20240115T103000Z", "bad_timestamp"),  # ISO basic format is not taken
  ("1705314600", "bad_timestamp"),  # a numeric string is not an epoch (ambiguous)
  ("\u0662\u0660\u0662\u0664-01-15T10:30:00Z", "bad_timestamp"),  # non-ASCII digits
  ("2024-01-15T10:30:00Z" + " " * 100, "bad_timestamp"),  # over 64 characters
  (True, "bad_timestamp"),
  ([2024, 1, 15], "bad_timestamp"),
  ({"$date": 1}, "bad_timestamp"),
  (math.nan, "bad_timestamp"),
  (math.inf, "bad_timestamp"),
  ("0001-01-01T00:00:00+14:00", "out_of_range"),
  ("9999-12-31T23:00:00-14:00", "out_of_range"),
  ("9999-12-31T23:59:30Z", "out_of_range"),  # its window would end in the year 10000
  ("1969-12-31T23:59:59.999999Z", "out_of_range"),
  ("2200-01-01T00:00:00Z", "out_of_range"),
  ("0000-01-01T00:00:00Z", "out_of_range"),
  (-1, "out_of_range"),
  (99_999_999_999, "out_of_range"),  # just under 1e11, so seconds: the year 5138
  (7_258_118_400_000, "out_of_range"),  # milliseconds: 2200-01-01
  (10**400, "out_of_range"),
  (-(10**400), "out_of_range"),
  (1e308, "out_of_range"),
]


@pytest.mark.parametrize("value, micros", GOOD_TIMESTAMPS, ids=repr)
def test_timestamp_forms_give_the_same_instant(value, micros):
  assert timestamps.parse_timestamp_us(value) == micros


@pytest.mark.parametrize("value, reason", BAD_TIMESTAMPS, ids=lambda v: repr(v)[:40])
def test_unusable_timestamps_have_their_reason(value, reason):
  with pytest.raises(timestamps.TimestampError) as e:
    timestamps.parse_timestamp_us(value)
  assert e.value.reason == reason, str(e.value)


def test_datetime_values_from_avro_logical_types():
  import datetime as dt

  utc = dt.timezone.utc
  assert timestamps.parse_timestamp_us(dt.datetime(2024, 1, 15, 10, 30, tzinfo=utc)) == T0
  assert timestamps.parse_timestamp_us(dt.datetime(2024, 1, 15, 10, 30)) == T0  # naive: UTC
  plus2 = dt.timezone(dt.timedelta(hours=2))
  assert timestamps.parse_timestamp_us(dt.datetime(2024, 1, 15, 12, 30, tzinfo=plus2)) == T0
  with pytest.raises(timestamps.TimestampError, match="outside"):
    timestamps.parse_timestamp_us(dt.datetime(9999, 12, 31, 23, 59, tzinfo=utc))


def _interpreters() -> list[str]:
  """The running interpreter and every CPython 3.10-3.13 under ~/.pyenv/versions."""
  found = {os.path.realpath(sys.executable): sys.executable}
  root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
  for version in ("3.10", "3.11", "3.12", "3.13"):
    for path in sorted(glob.glob(f"{root}/versions/{version}*/bin/python{version}")):
      found.setdefault(os.path.realpath(path), path)
  return list(found.values())


def test_timestamp_parser_gives_the_same_results_on_every_python_found():
  values = [
    v
    for v, _ in GOOD_TIMESTAMPS + BAD_TIMESTAMPS
    if not isinstance(v, bool)
    and (not isinstance(v, int) or abs(v) < 10**30)
    and not isinstance(v, dict)
  ]
  here = []
  for v in values:
    try:
      here.append([None, timestamps.parse_timestamp_us(v)])
    except timestamps.TimestampError as e:
      here.append([e.reason, None])
  source = Path(timestamps.__file__)
  interpreters = _interpreters()
  versions = set()
  for python in interpreters:
    # The module file alone, with -I (isolated: no site-packages, no PYTHONPATH): pure stdlib.
    proc = subprocess.run(
      [python, "-I", str(source)],
      input=json.dumps(values),
      text=True,
      capture_output=True,
      timeout=60,
    )
    assert proc.returncode == 0, (python, proc.stderr)
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert got == here, python
    versions.add(
      subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
      ).stdout.strip()
    )
  assert len(here) == len(values) > 60
  print(f"timestamp parser identical on {sorted(versions)}")


def test_events_module_imports_without_beam():
  code = (
    "import sys; sys.modules['apache_beam'] = None; import transforms.events as e; "
    "print(e.parse_sensor.__name__)"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=str(REPO),
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    timeout=60,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == "parse_sensor", proc.stderr


# ---------------------------------------------------------------------------
# Acceptance rules, one case per rule of the table in transforms/events.py


def _with(base: dict, **changes) -> dict:
  body = json.loads(json.dumps(base))
  for k, v in changes.items():
    if v is _DROP:
      body.pop(k, None)
    else:
      body[k] = v
  return body


_DROP = object()
SENSOR_EVENT = old_service_sensor()
METER_EVENT = old_service_meter()

SENSOR_ACCEPTED = [
  ("old service event as is", {}, {"sensor_id": "sensor_042", "latitude": 52.52}),
  ("integer event_id -> text", {"event_id": 987654321}, {"event_id": "987654321"}),
  ("integer sensor_id -> text", {"sensor_id": 42}, {"sensor_id": "42"}),
  ("numeric string value", {"value": " 231.5 "}, {"value": 231.5}),
  ("integer value", {"value": 230}, {"value": 230.0}),
  ("exponent value", {"value": "2.3e2"}, {"value": 230.0}),
  ("null location -> nulls", {"location": None}, {"latitude": None, "longitude": None}),
  ("absent location -> nulls", {"location": _DROP}, {"latitude": None, "longitude": None}),
  (
    "null lat only",
    {"location": {"lat": None, "lon": 13.4}},
    {"latitude": None, "longitude": 13.4},
  ),
  (
    "numeric string coordinates",
    {"location": {"lat": "52.5", "lon": "-13.25"}},
    {"latitude": 52.5, "longitude": -13.25},
  ),
  (
    "coordinates at the bounds",
    {"location": {"lat": -90, "lon": 180}},
    {"latitude": -90.0, "longitude": 180.0},
  ),
  ("non-object metadata: text", {"metadata": "fw 2.1"}, {"metadata": '"fw 2.1"'}),
  ("non-object metadata: list", {"metadata": [1, "a"]}, {"metadata": '[1,"a"]'}),
  ("non-object metadata: number", {"metadata": 3}, {"metadata": "3"}),
  (
    "metadata as UTF-8 JSON",
    {"metadata": {"unit": "°C", "b": 1, "a": None}},
    {"metadata": '{"a":null,"b":1,"unit":"°C"}'},
  ),
  ("absent metadata -> NULL", {"metadata": _DROP}, {"metadata": None}),
  ("null metadata -> NULL", {"metadata": None}, {"metadata": None}),
  ("extra fields ignored", {"firmware": {"x": [1]}}, {"sensor_type": "voltage"}),
  ("NaN in an ignored field does no harm", {"calibration": math.nan}, {"value": 231.4}),
  ("epoch seconds timestamp", {"timestamp": 1705314600}, {"event_time_us": T0}),
  ("epoch milliseconds timestamp", {"timestamp": 1705314600000}, {"event_time_us": T0}),
  ("Z timestamp", {"timestamp": "2024-01-15T10:30:00Z"}, {"event_time_us": T0}),
  (
    "a 400-digit integer in metadata is kept",
    {"metadata": {"n": 10**400}},
    {"metadata": '{"n":1' + "0" * 400 + "}"},
  ),
]

SENSOR_REFUSED = [
  ("missing event_id", {"event_id": _DROP}, "missing_field"),
  ("null event_id", {"event_id": None}, "missing_field"),
  ("blank sensor_id", {"sensor_id": "  "}, "missing_field"),
  ("float id", {"sensor_id": 4.5}, "wrong_type"),
  ("bool id", {"event_id": True}, "wrong_type"),
  ("object id", {"event_id": {"a": 1}}, "wrong_type"),
  ("integer sensor_type", {"sensor_type": 3}, "wrong_type"),
  ("missing value", {"value": _DROP}, "missing_field"),
  ("non-numeric value", {"value": "high"}, "wrong_type"),
  ("numeric string with junk", {"value": "12abc"}, "wrong_type"),
  ("'NaN' string value", {"value": "NaN"}, "wrong_type"),
  ("'1_000' string value", {"value": "1_000"}, "wrong_type"),
  ("bool value", {"value": False}, "wrong_type"),
  ("list value", {"value": [1]}, "wrong_type"),
  ("1e400 string value", {"value": "1e400"}, "non_finite"),
  ("400-digit value", {"value": 10**400}, "out_of_range"),
  ("location is a list", {"location": [52.5, 13.4]}, "wrong_type"),
  ("location is text", {"location": "Berlin"}, "wrong_type"),
  ("latitude out of range", {"location": {"lat": 91, "lon": 0}}, "out_of_range"),
  ("longitude out of range as text", {"location": {"lat": 0, "lon": "-180.5"}}, "out_of_range"),
  ("non-numeric latitude", {"location": {"lat": "north", "lon": 0}}, "wrong_type"),
  ("missing timestamp", {"timestamp": _DROP}, "missing_field"),
  ("null timestamp", {"timestamp": None}, "missing_field"),
  ("unreadable timestamp", {"timestamp": "noon"}, "bad_timestamp"),
  ("timestamp before 1970", {"timestamp": "1960-01-01T00:00:00Z"}, "out_of_range"),
  ("lone surrogate in an id", {"sensor_id": "\udc00"}, "not_utf8"),
  ("lone surrogate in metadata", {"metadata": {"k": "\ud800"}}, "not_utf8"),
]


@pytest.mark.parametrize(
  "rule, changes, expected", SENSOR_ACCEPTED, ids=[c[0] for c in SENSOR_ACCEPTED]
)
def test_sensor_acceptance_rules(rule, changes, expected):
  reading = parse_sensor(jbytes(_with(SENSOR_EVENT, **changes)))
  assert {k: getattr(reading, k) for k in expected} == expected
  assert (
    sensor_from_object(_with(SENSOR_EVENT, **changes)) == reading
  )  # the Avro entry point agrees


@pytest.mark.parametrize(
  "rule, changes, reason", SENSOR_REFUSED, ids=[c[0] for c in SENSOR_REFUSED]
)
def test_sensor_dead_letter_rules(rule, changes, reason):
  with pytest.raises(InvalidEvent) as e:
    parse_sensor(json.dumps(_with(SENSOR_EVENT, **changes)).encode("utf-8", "surrogatepass"))
  assert e.value.reason == reason, str(e.value)
  assert str(e.value).startswith(f"{reason}: ")


METER_ACCEPTED = [
  ("documented example", {}, {"meter_id": "meter_7", "event_time_us": T0, "unit": "kWh"}),
  ("numeric customer_id -> text", {"customer_id": 1001}, {"customer_id": "1001"}),
  ("integer meter_id -> text", {"meter_id": 7}, {"meter_id": "7"}),
  ("absent unit -> kWh", {"unit": _DROP}, {"unit": "kWh"}),
  ("null unit -> kWh", {"unit": None}, {"unit": "kWh"}),
  ("other unit kept", {"unit": "MWh"}, {"unit": "MWh"}),
  ("numeric string reading", {"reading": "1234.5"}, {"reading": 1234.5}),
  ("naive timestamp is UTC", {"timestamp": "2024-01-15T10:30:00"}, {"event_time_us": T0}),
]

METER_REFUSED = [
  ("missing customer_id", {"customer_id": _DROP}, "missing_field"),
  ("missing reading", {"reading": None}, "missing_field"),
  ("non-numeric reading", {"reading": "twelve"}, "wrong_type"),
  ("NaN reading", {"reading": math.nan}, "non_finite"),
  ("Infinity reading", {"reading": -math.inf}, "non_finite"),
  ("non-string unit", {"unit": 3}, "wrong_type"),
  ("no usable timestamp", {"timestamp": "2024-01-15T25:00:00Z"}, "bad_timestamp"),
]


@pytest.mark.parametrize(
  "rule, changes, expected", METER_ACCEPTED, ids=[c[0] for c in METER_ACCEPTED]
)
def test_meter_acceptance_rules(rule, changes, expected):
  reading = parse_meter(jbytes(_with(METER_EVENT, **changes)))
  assert {k: getattr(reading, k) for k in expected} == expected
  assert meter_from_object(_with(METER_EVENT, **changes)) == reading


@pytest.mark.parametrize("rule, changes, reason", METER_REFUSED, ids=[c[0] for c in METER_REFUSED])
def test_meter_dead_letter_rules(rule, changes, reason):
  with pytest.raises(InvalidEvent) as e:
    parse_meter(jbytes(_with(METER_EVENT, **changes)))
  assert e.value.reason == reason, str(e.value)


def test_old_service_events_become_rows_with_its_instants():
  import datetime as dt

  when = dt.datetime(2024, 1, 15, 10, 30, 0, 123456)
  row = parse_one(jbytes(old_service_sensor("s-1", when))).row
  got = SENSOR_ROW.as_dict(row)
  assert got["event_id"] == "s-1_1705314600.123456"
  assert got["event_time"] == "2024-01-15T10:30:00.123456Z"
  assert got["window_start"] == "2024-01-15T10:30:00.000000Z"
  assert got["window_end"] == "2024-01-15T10:31:00.000000Z"
  assert json.loads(got["metadata"]) == {"unit": "V", "firmware": "2.1"}
  meter = METER_ROW.as_dict(parse_one(jbytes(old_service_meter()), METER_TOPIC).row)
  assert (meter["event_time"], meter["unit"], meter["reading"]) == (
    "2024-01-15T10:30:00.000000Z",
    "kWh",
    1234.56,
  )


# ---------------------------------------------------------------------------
# Poison payloads: each used to fail its bundle (issue 9); now exactly one dead letter each


def _nan_metadata() -> bytes:
  return json.dumps(_with(SENSOR_EVENT, metadata={"x": math.nan})).encode()  # json.dumps writes NaN


POISON = [
  ("NaN nested in metadata", _nan_metadata(), "non_finite"),
  ("Infinity as value", jbytes(SENSOR_EVENT).replace(b"231.4", b"Infinity"), "non_finite"),
  (
    "-Infinity deep in metadata",
    jbytes(_with(SENSOR_EVENT, metadata={"a": [{"b": 0}]})).replace(b'"b": 0', b'"b": -Infinity'),
    "non_finite",
  ),
  (
    "1e400 in metadata (a float overflow)",
    jbytes(_with(SENSOR_EVENT, metadata={"a": 1})).replace(b'"a": 1', b'"a": 1e400'),
    "non_finite",
  ),
  ("400-digit value", jbytes(SENSOR_EVENT).replace(b"231.4", b"9" * 400), "out_of_range"),
  (
    "5000-digit value (over Python's int limit)",
    jbytes(SENSOR_EVENT).replace(b"231.4", b"9" * 5000),
    "out_of_range",
  ),
  ("nesting 30,000 levels", b"[" * 30_000 + b"]" * 30_000, "unparseable"),
  (
    "nesting 5,000 levels in metadata",
    jbytes(_with(SENSOR_EVENT, metadata=0)).replace(
      b'"metadata": 0', b'"metadata": ' + b"[" * 5000 + b"]" * 5000
    ),
    "unparseable",
  ),
  (
    "timestamp 0001-01-01T00:00:00+14:00",
    jbytes(_with(SENSOR_EVENT, timestamp="0001-01-01T00:00:00+14:00")),
    "out_of_range",
  ),
  (
    "timestamp 9999-12-31T23:00:00-14:00",
    jbytes(_with(SENSOR_EVENT, timestamp="9999-12-31T23:00:00-14:00")),
    "out_of_range",
  ),
  (
    "timestamp 9999-12-31T23:59:30Z",
    jbytes(_with(SENSOR_EVENT, timestamp="9999-12-31T23:59:30Z")),
    "out_of_range",
  ),
  ("a tombstone", None, "not_json"),
  ("a UTF-8 BOM", b"\xef\xbb\xbf" + jbytes(SENSOR_EVENT), "not_json"),
  ("UTF-16", jbytes(SENSOR_EVENT).decode().encode("utf-16"), "not_utf8"),
  ("a bare string", b'"x"', "not_object"),
]


@pytest.mark.parametrize("name, value, reason", POISON, ids=[p[0] for p in POISON])
def test_poison_payloads_give_one_dead_letter_each(name, value, reason):
  dead = parse_one(value).dead_letter
  assert (dead.reason, dead.stage, dead.kafka_offset) == (reason, "parse", 7), dead.error
  assert dead.error.startswith(f"{reason}: ")
  assert dead.raw_value == value
  if reason == "unparseable":
    assert "RecursionError" in dead.error
  row = dead_letter_row(dead)
  assert row[6] == reason and len(row) == len(DEAD_LETTERS.columns)


def test_any_other_exception_is_unparseable_with_its_type(monkeypatch):
  import transforms.parse as parse_module

  def explode(obj):
    raise KeyError("surprise")

  monkeypatch.setattr(parse_module, "sensor_from_object", explode)
  monkeypatch.setattr(parse_module, "sensor_head", lambda value: None)  # fast path declines
  dead = parse_one(jbytes(SENSOR_EVENT)).dead_letter
  assert dead.reason == "unparseable" and dead.error.startswith("unparseable: KeyError: ")


def test_window_sizes_that_could_overflow_are_refused_at_construction():
  with pytest.raises(ValueError, match="--window_size_secs"):
    ParseEvents({"s": SENSOR}, window_size_secs=MAX_WINDOW_SECS + 1)
  # the largest allowed window on the latest accepted instant still formats
  fn = make_fn(window_size_secs=MAX_WINDOW_SECS)
  row = parse_one(jbytes(_with(SENSOR_EVENT, timestamp="2199-12-31T23:59:59Z")), fn=fn).row
  window_end = SENSOR_ROW.as_dict(row)["window_end"]
  assert window_end.startswith("2200-") or window_end.startswith("2199-")


# ---------------------------------------------------------------------------
# Dead-letter rows (the agreed format), written to a real SQLite file


def _dead(value, key=b"sensor-1", reason="not_json", offset=42) -> DeadLetter:
  return DeadLetter("t", 3, offset, 40, key, value, reason, f"{reason}: detail", "parse", T0)


def _store_and_read(tmp_path, rows: list) -> list[dict]:
  store = SqliteStore(str(tmp_path / "dl.db"))
  store.open()
  try:
    assert store.write(DEAD_LETTERS.name, rows, "2024-01-15T10:30:01.000000Z") == []
    cursor = store._conn.execute(
      f"SELECT {', '.join(DEAD_LETTERS.names)} FROM dead_letters ORDER BY kafka_offset"
    )
    return [dict(zip(DEAD_LETTERS.names, r)) for r in cursor]
  finally:
    store.close()


def test_dead_letter_row_keeps_utf8_text_readable(tmp_path):
  value = '{"sensor_id": "°C", "value": oops}'.encode()
  (stored,) = _store_and_read(tmp_path, [dead_letter_row(_dead(value))])
  assert stored == {
    "raw_key": "sensor-1",
    "raw_value": value.decode(),
    "raw_encoding": "utf8",
    "raw_size": len(value),
    "raw_sha256": hashlib.sha256(value).hexdigest(),
    "truncated": 0,
    "reason": "not_json",
    "error": "not_json: detail",
    "stage": "parse",
    "failed_at": "2024-01-15T10:30:00.000000Z",
    "kafka_topic": "t",
    "kafka_partition": 3,
    "kafka_offset": 42,
    "written_at": "2024-01-15T10:30:01.000000Z",
  }


def test_dead_letter_row_base64_for_binary_and_a_binary_key_switches_both(tmp_path):
  binary = b"\x00\x00\x00\x00\x07\xff\xfe"
  rows = [
    dead_letter_row(_dead(binary)),
    dead_letter_row(DeadLetter("t", 3, 43, 43, b"\xff", b"{}", "not_object", "e", "parse", T0)),
    dead_letter_row(_dead(None, key=None, offset=44)),
  ]
  first, second, tombstone = _store_and_read(tmp_path, rows)
  assert first["raw_encoding"] == "base64" and base64.b64decode(first["raw_value"]) == binary
  assert base64.b64decode(first["raw_key"]) == b"sensor-1"
  assert decode_raw_value(first["raw_value"], first["raw_encoding"]) == binary
  assert second["raw_encoding"] == "base64" and base64.b64decode(second["raw_key"]) == b"\xff"
  assert base64.b64decode(second["raw_value"]) == b"{}"
  assert (
    tombstone["raw_key"],
    tombstone["raw_value"],
    tombstone["raw_size"],
    tombstone["raw_sha256"],
    tombstone["raw_encoding"],
    tombstone["truncated"],
  ) == (None, None, None, None, "utf8", 0)


def test_large_values_are_truncated_with_size_and_hash_of_the_original(tmp_path):
  text = ("a" + "é" * 600_000).encode()  # 1.2 MB; the cut falls inside a 2-byte character
  binary = bytes(range(256)) * 4096  # 1 MiB, not UTF-8
  key = b"k" * 100_000
  rows = [
    dead_letter_row(_dead(text)),
    dead_letter_row(
      DeadLetter("t", 3, 43, 43, key, binary, "oversized", "oversized: big", "parse", T0)
    ),
  ]
  utf8, b64 = _store_and_read(tmp_path, rows)
  assert utf8["truncated"] == 1 and utf8["raw_encoding"] == "utf8"
  assert len(utf8["raw_value"].encode()) <= RAW_TEXT_LIMIT
  assert (
    text.startswith(utf8["raw_value"].encode())
    and len(utf8["raw_value"].encode()) > RAW_TEXT_LIMIT - 2
  )
  assert (utf8["raw_size"], utf8["raw_sha256"]) == (len(text), hashlib.sha256(text).hexdigest())
  assert b64["truncated"] == 1 and b64["raw_encoding"] == "base64"
  assert len(b64["raw_value"]) <= RAW_TEXT_LIMIT and len(b64["raw_key"]) <= RAW_TEXT_LIMIT
  assert binary.startswith(base64.b64decode(b64["raw_value"]))
  assert key.startswith(base64.b64decode(b64["raw_key"]))
  assert (b64["raw_size"], b64["raw_sha256"]) == (len(binary), hashlib.sha256(binary).hexdigest())


def test_exactly_the_limit_is_not_truncated():
  at_limit = b"x" * RAW_TEXT_LIMIT
  assert raw_columns(None, at_limit)[1:] == (
    at_limit.decode(),
    "utf8",
    RAW_TEXT_LIMIT,
    hashlib.sha256(at_limit).hexdigest(),
    0,
  )
  assert raw_columns(None, at_limit + b"y")[5] == 1


def test_long_errors_are_cut_and_the_row_matches_the_schema():
  dead = DeadLetter(
    "t", 0, 1, 1, None, b"x", "unparseable", "unparseable: " + "e" * 10_000, "parse", T0
  )
  row = dead_letter_row(dead)
  as_dict = DEAD_LETTERS.row_dict(row)
  assert len(as_dict["error"]) == ERROR_TEXT_LIMIT
  assert list(as_dict) == list(DEAD_LETTERS.names)
  assert (*coordinates(row), covers_from(row)) == ("t", 0, 1, 1)


def test_sink_rejected_rows_use_the_same_format(tmp_path):
  sensor_row = (
    "e",
    "s",
    "voltage",
    1.0,
    None,
    None,
    "2024-01-15T10:30:00.000000Z",
    "°C",
    "w0",
    "w1",
    False,
    "topic",
    1,
    99,
    95,
  )
  row = rejected_dead_letter_row("sensor_readings", sensor_row, "invalid at value: bad " * 300)
  (stored,) = _store_and_read(tmp_path, [row])
  assert (stored["reason"], stored["stage"], stored["raw_encoding"], stored["truncated"]) == (
    "sink_rejected",
    "sink",
    "utf8",
    0,
  )
  assert stored["error"].startswith("sink_rejected: sensor_readings: invalid at value")
  assert len(stored["error"]) == ERROR_TEXT_LIMIT
  assert json.loads(stored["raw_value"]) == {
    "event_id": "e",
    "sensor_id": "s",
    "sensor_type": "voltage",
    "value": 1.0,
    "latitude": None,
    "longitude": None,
    "event_time": "2024-01-15T10:30:00.000000Z",
    "metadata": "°C",
    "window_start": "w0",
    "window_end": "w1",
    "is_late": False,
  }
  assert (stored["kafka_topic"], stored["kafka_partition"], stored["kafka_offset"]) == (
    "topic",
    1,
    99,
  )
  assert covers_from(row) == 95  # covers_from still travels for the ack


def test_reasons_are_a_closed_list():
  with pytest.raises(AssertionError):
    InvalidEvent("something_new", "x")
  assert len(set(DEAD_LETTER_REASONS)) == len(DEAD_LETTER_REASONS)


# ---------------------------------------------------------------------------
# Avro framing


def test_framed_avro_without_a_registry_says_a_registry_is_needed():
  for value in (avro_sensor(), b"\x00", b"\x00\x00\x00\x00\x01"):
    dead = parse_one(value).dead_letter
    assert dead.reason == "avro_needs_registry", dead.error
    assert "--schema_registry_url" in dead.error


def test_seeded_decoder_decodes_the_old_service_schemas_to_the_same_rows_as_json():
  fn = make_fn(CLOSED_REGISTRY, seeded=True)
  from_avro = parse_one(avro_sensor(), fn=fn).row
  from_json = parse_one(jbytes(old_service_sensor()), fn=fn).row
  assert from_avro == from_json
  assert (
    parse_one(avro_meter(), METER_TOPIC, fn=fn).row
    == parse_one(jbytes(old_service_meter()), METER_TOPIC, fn=fn).row
  )


@pytest.mark.parametrize(
  "value, reason",
  [
    (b"\x00\x00\x00", "bad_avro"),  # shorter than the header
    (avro_sensor()[:20], "bad_avro"),  # a cut body
    (avro_sensor() + b"\x00", "bad_avro"),  # trailing bytes
    (frame(1, b"\xff" * 40), "bad_avro"),  # garbage body
    (avro_sensor(schema_id=77), "registry_unavailable"),  # uncached id, registry unreachable
    (avro_sensor(_with(old_service_sensor(), timestamp="9999-12-31T23:59:30Z")), "out_of_range"),
    (avro_sensor(_with(old_service_sensor(), event_id="  ")), "missing_field"),
    (avro_meter(_with(old_service_meter(), reading=math.nan)), "non_finite"),
  ],
)
def test_avro_failures_are_dead_letters(value, reason):
  topic = METER_TOPIC if value[1:5] == (2).to_bytes(4, "big") else SENSOR_TOPIC
  dead = parse_one(value, topic, fn=make_fn(CLOSED_REGISTRY, seeded=True)).dead_letter
  assert dead.reason == reason, dead.error
  assert dead.raw_value == value


def test_avro_dead_letters_are_stored_as_base64(tmp_path):
  value = avro_sensor(schema_id=77)
  dead = parse_one(value, fn=make_fn(CLOSED_REGISTRY, seeded=True)).dead_letter
  (stored,) = _store_and_read(tmp_path, [dead_letter_row(dead)])
  assert stored["raw_encoding"] == "base64"
  assert decode_raw_value(stored["raw_value"], "base64") == value


# ---------------------------------------------------------------------------
# --schema_registry_url and its credentials


@pytest.mark.parametrize("url", ["localhost:8081", "ftp://h/x", "http://", "http://h:notaport/x"])
def test_bad_registry_urls_are_refused_naming_the_option(url):
  with pytest.raises(OptionError) as e:
    pipeline_main.parse(["--mode=batch", f"--schema_registry_url={url}"])
  assert str(e.value).startswith("--schema_registry_url:"), str(e.value)


def test_credentials_in_the_registry_url_are_refused_without_echoing_them():
  with pytest.raises(OptionError) as e:
    pipeline_main.parse(["--mode=batch", "--schema_registry_url=http://bob:hunter2@h:8081"])
  assert "hunter2" not in str(e.value) and "SCHEMA_REGISTRY_PASSWORD" in str(e.value)
  check_registry_url("https://registry.example.com:8081/apis/ccompat/v7")
  check_registry_url(None)


def test_registry_credentials_come_from_the_environment_and_are_never_pickled(monkeypatch):
  secret = "pa55-" + "q7Zr" * 4
  monkeypatch.setenv("SCHEMA_REGISTRY_USERNAME", "svc-pipeline")
  monkeypatch.setenv("SCHEMA_REGISTRY_PASSWORD", secret)
  conf = registry_client_config(
    "http://h:1", timeout_s=1, max_retries=0, retry_wait_ms=1, retry_max_wait_ms=1
  )
  assert conf["basic.auth.user.info"] == f"svc-pipeline:{secret}"
  transform = ParseEvents({SENSOR_TOPIC: SENSOR}, schema_registry_url=CLOSED_REGISTRY)
  fn = make_fn(CLOSED_REGISTRY)  # set up: its decoder holds a client with the credentials
  assert fn._avro._client is not None
  forbidden = [
    secret.encode(),
    hashlib.sha256(secret.encode()).hexdigest().encode(),
    base64.b64encode(f"svc-pipeline:{secret}".encode()),
  ]
  for blob in (pickler.dumps(transform), pickler.dumps(fn), pickle.dumps(fn._avro)):
    for needle in forbidden:
      assert needle not in blob
  copy = pickle.loads(pickle.dumps(fn._avro))
  assert copy.url == CLOSED_REGISTRY and copy._client is None and copy._schemas == {}


@pytest.mark.parametrize(
  "key, value, encoding",
  [
    (b"k", b'{"a": "\xc3\xa9"}', "utf8"),
    (b"k", b'{"a": 1}\x00', "base64"),  # valid UTF-8, but a NUL marks binary data
    (b"k\x00", b"{}", "base64"),
    (None, b"\xff", "base64"),
    (None, None, "utf8"),
  ],
)
def test_raw_encoding_rule(key, value, encoding):
  columns = raw_columns(key, value)
  assert columns[2] == encoding
  assert decode_raw_value(columns[1], encoding) == value
  assert decode_raw_value(columns[0], encoding) == key


def test_every_dead_letter_reason_has_its_own_counter():
  import apache_beam as beam
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

  from transforms.kafka.records import KafkaRecord

  values = [b"{", jbytes(_with(SENSOR_EVENT, value="high")), b"[", jbytes(SENSOR_EVENT)]
  records = [
    KafkaRecord(SENSOR_TOPIC, 0, i, i, None, v, 1_705_314_600_000) for i, v in enumerate(values)
  ]
  p = BeamTestPipeline()
  _ = p | beam.Create(records) | ParseEvents({SENSOR_TOPIC: SENSOR})
  result = p.run()
  result.wait_until_finish()
  from transforms import telemetry

  counters = {
    r.key.metric.name: r.committed
    for r in result.metrics().query(MetricsFilter())["counters"]
    if r.committed and r.key.metric.namespace != telemetry.NAMESPACE
  }
  assert counters == {
    "dead_letters": 3,
    "dead_letters_not_json": 2,
    "dead_letters_wrong_type": 1,
    "sensor_readings": 1,
  }
  # The launcher's summary reads the same counts from the telemetry namespace.
  assert telemetry.totals(result)["dead_letters"] == {"not_json": 2, "wrong_type": 1}
