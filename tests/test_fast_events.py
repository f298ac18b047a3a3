"""The parser's fast path (transforms/fast_events.py, timestamps.parse_utc_iso) against the
reference: the record -> row step as it was before the fast path existed.

Differential fuzzing: for arbitrary values (mutated events, numbers written as raw JSON
text, 400- and 5,000-digit numbers, NaN nested, deep nesting, duplicate keys, bad zones,
byte flips) ``_ParseEventsFn._to_row`` must give exactly what the reference gives: the
same table, key, row (types and float signs included), timestamp and lateness, or a
failure with the same reason and text. Each property also asserts that the fast path
took a good share of its inputs, so it cannot pass by declining everything.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from unittest import mock

import pytest
from apache_beam.utils.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

import transforms.parse as parse_module
from tests.parse_support import (
  METER_TOPIC,
  SENSOR_TOPIC,
  jbytes,
  make_fn,
  old_service_meter,
  old_service_sensor,
  parse_one,
)
from tests.test_parse_fuzz import _PROFILE, JSON_VALUES, TIMESTAMPS, _byte_mutations, _dumps
from tools.produce import EventFactory
from transforms import timestamps
from transforms.events import (
  describe_exception,
  meter_from_object,
  meter_row,
  sensor_from_object,
  sensor_row,
)
from transforms.fast_events import meter_head, sensor_head
from transforms.kafka.records import KafkaRecord
from transforms.rows import METER_TABLE, SENSOR_TABLE

NOW_S = 1_764_547_200.0  # 2025-12-01T00:00:00Z
FNS = {size: make_fn(window_size_secs=size) for size in (60.0, 1.0, 7.0, 3600.0)}


def _reference_to_row(fn, record: KafkaRecord) -> tuple:
  """``_ParseEventsFn._to_row`` as it was before the fast path (verbatim but for ``fn.``,
  and its timestamp now given as µs)."""
  kind = fn._kinds.get(record.topic)
  if kind == "sensor":
    event = sensor_from_object(fn._decode(record.value))
    entity_id, table, to_row = event.sensor_id, SENSOR_TABLE, sensor_row
  elif kind == "meter":
    event = meter_from_object(fn._decode(record.value))
    entity_id, table, to_row = event.meter_id, METER_TABLE, meter_row
  else:
    raise parse_module.InvalidEvent(
      "unknown_topic", f"no event type is configured for topic {record.topic!r}"
    )
  event_us = event.event_time_us
  window_start = event_us - event_us % fn._size_us
  window_end = window_start + fn._size_us
  arrival_us = record.timestamp_ms * 1000
  is_late = arrival_us > window_end + fn._lateness_us
  row = to_row(
    event,
    window_start,
    window_end,
    is_late,
    record.topic,
    record.partition,
    record.offset,
    record.covers_from,
  )
  key = (table, fn._shard(record, entity_id))
  return table, key, row, Timestamp(micros=arrival_us if is_late else event_us).micros, is_late


def _strict(value):
  """Equal means equal in type and repr too: 0.0 is not -0.0, 1 is not 1.0 nor '1'."""
  if isinstance(value, tuple):
    return tuple(_strict(v) for v in value)
  return (type(value).__name__, repr(value))


def _outcome(call, fn, record: KafkaRecord):
  try:
    return "row", _strict(call(fn, record))
  except Exception as e:  # noqa: BLE001 - every failure is compared by its reason and text
    failure = describe_exception(e)
    return "dead", failure.reason, str(failure)


class _Tally:
  def __init__(self):
    self.fast = self.total = 0


def _check_same(tally: _Tally, topic: str, value: bytes, size: float, delay_ms: int) -> None:
  fn = FNS[size]
  head = sensor_head if topic == SENSOR_TOPIC else meter_head
  arrival_ms = int(NOW_S * 1000) + delay_ms
  record = KafkaRecord(topic, delay_ms % 5, 11, 9, b"k", value, arrival_ms)
  got = _outcome(lambda f, r: f._to_row(r), fn, record)
  assert got == _outcome(_reference_to_row, fn, record), value
  tally.total += 1
  tally.fast += head(value) is not None


# ---------------------------------------------------------------------------
# Strategies: values near the fast path's edge

_FACTORY = EventFactory(seed=3)
GENERATED = [
  json.loads(_FACTORY.sensor(NOW_S + i).value) for i in range(20) if i % 3 == 0 or i < 4
] + [json.loads(_FACTORY.meter(NOW_S + i).value) for i in range(4)]
BASES = [*GENERATED, old_service_sensor(), old_service_meter()]
SENSOR_BASES = [b for b in BASES if "sensor_id" in b]
METER_BASES = [b for b in BASES if "meter_id" in b]

ZONES = ["", "Z", "z", "+00:00", "-00:00", "+00", "+0000", "+01:00", "-05:30", "+24:00", " ", "Z "]


@st.composite
def _iso_texts(draw) -> str:
  """ISO-8601 text of an instant around 1970..2200, in the forms producers write and others."""
  when = draw(st.datetimes(dt.datetime(1969, 12, 31, 20), dt.datetime(2200, 1, 1, 4)))
  sep = draw(st.sampled_from("TTTTtt  _"))
  digits = st.text("0123456789", max_size=11) | st.text(
    st.characters(categories=["Nd"]), max_size=7
  )
  fraction = draw(st.sampled_from(["", "."]) | digits.map(".".__add__))
  if fraction and draw(st.booleans()):
    fraction = "," + fraction[1:]
  zone = draw(st.sampled_from(ZONES[:4] * 3 + ZONES))
  text = f"{when:%Y-%m-%d}{sep}{when:%H:%M:%S}{fraction}{zone}"
  return draw(st.sampled_from([text] * 6 + [text[:16], " " + text, text[:-1]]))


ISO_TEXTS = _iso_texts()
NEAR_TIMESTAMPS = st.from_regex(  # any Unicode digit where \d stands
  r"\A[12]\d{3}-[01]\d-[0-3]\d[Tt ][0-2]\d:[0-6]\d:[0-6]\d([.,]\d{0,11})?(Z|\+00:00|\+01:00|)\Z"
)
NUMBER_TEXT = st.one_of(
  st.from_regex(re.compile(r"\A-?(0|[1-9]\d{0,25})(\.\d{1,25})?([eE][+-]?\d{1,3})?\Z", re.ASCII)),
  st.sampled_from(["1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "-0", "-0.0"]),
  st.sampled_from(["9" * 400, "1" + "0" * 320, "1" * 5000, "0." + "1" * 5000, "1" * 4300]),
  st.floats(allow_nan=False, allow_infinity=False).map(repr),
  st.sampled_from(["90", "-90.0", "90.00000000000001", "-90.00000000000002", "180", "-180.0"]),
  st.sampled_from(["180.00000000000003", "90.5", "-180.5", "1E2", "1e+2", "0.1e1", "-0e0"]),
)
COORDINATES = st.one_of(
  st.floats(-181.0, 181.0),
  st.sampled_from([90.0, -90.0, 180.0, -180.0, 90.00000000000001, -180.00000000000003]),
  st.integers(-200, 200),
  st.none(),
)
LOCATIONS = st.fixed_dictionaries({}, optional={"lat": COORDINATES, "lon": COORDINATES})
IDS = st.one_of(
  st.text(max_size=12),
  st.integers(),
  st.integers(min_value=10**4200, max_value=10**4299),
  st.sampled_from(["", " ", "\t\n", "\u3000", "\udc00", "id\x00", "°C"]),
)
FLAT_METADATA = st.dictionaries(
  st.text(max_size=6),
  st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["\udc00", "\u2028", "\x7f", "\x1f"]),
  ),
  max_size=4,
)
REPLACEMENTS = st.one_of(
  JSON_VALUES, TIMESTAMPS, ISO_TEXTS, NEAR_TIMESTAMPS, IDS, FLAT_METADATA, LOCATIONS
)
_DROP = object()


def _mutated(bases: list) -> st.SearchStrategy:
  """A base event with a few fields replaced (or dropped, or one unknown field added)."""
  fields = sorted({k for b in bases for k in b} | {"location", "metadata", "unit", "extra"})
  changes = st.dictionaries(
    st.sampled_from(fields), st.one_of(REPLACEMENTS, st.just(_DROP)), max_size=3
  )
  return st.tuples(st.sampled_from(bases), changes).map(
    lambda bc: _dumps({k: v for k, v in {**bc[0], **bc[1]}.items() if v is not _DROP})
  )


def _number_spliced(bases: list) -> st.SearchStrategy:
  """A numeric field (value, reading, lat, lon, a metadata entry) as raw JSON number text."""

  def splice(base: dict, field: str, number: str) -> bytes:
    event = json.loads(json.dumps(base))
    if field in ("lat", "lon"):
      event["location"] = {**(event.get("location") or {}), field: "@N@"}
    elif field == "metadata":
      event["metadata"] = {"x": "@N@"}
    elif field in ("timestamp", "event_id"):
      event[field] = "@N@"
    else:
      event["value" if "value" in event else "reading"] = "@N@"
    return json.dumps(event).replace('"@N@"', number).encode()

  fields = st.sampled_from(["value", "lat", "lon", "metadata", "timestamp", "event_id"])
  return st.builds(splice, st.sampled_from(bases), fields, NUMBER_TEXT)


def _textual(bases: list) -> st.SearchStrategy:
  """Same event, other JSON text: spacing, duplicate keys, a nested NaN, deep nesting."""

  def build(base: dict, how: str, depth: int) -> bytes:
    text = json.dumps(base)
    if how == "compact":
      return json.dumps(base, separators=(",", ":")).encode()
    if how == "spaced":
      return (" " + json.dumps(base, indent=2) + "\n").encode()
    if how == "duplicate":
      return text.replace("{", '{"timestamp": "2024-01-15T10:30:00Z", ', 1).encode()
    if how == "nan":
      return text.replace("}", ', "metadata": {"a": [1, {"b": NaN}]}}', 1).encode()
    return text.replace("{", '{"metadata": ' + "[" * depth + "]" * depth + ", ", 1).encode()

  hows = st.sampled_from(["compact", "spaced", "duplicate", "nan", "deep"])
  return st.builds(build, st.sampled_from(bases), hows, st.integers(1, 3000))


def _values(bases: list) -> st.SearchStrategy:
  return st.one_of(
    _mutated(bases),
    _number_spliced(bases),
    _textual(bases),
    st.sampled_from(bases).map(_dumps).flatmap(_byte_mutations),
    st.sampled_from(bases).map(_dumps),
  )


def _run(topic: str, bases: list, examples: int) -> _Tally:
  tally = _Tally()

  @settings(max_examples=examples, **_PROFILE)
  @given(_values(bases), st.sampled_from(sorted(FNS)), st.integers(-120_000, 4_000_000))
  def check(value, size, delay_ms):
    _check_same(tally, topic, value, size, delay_ms)

  check()
  return tally


# ---------------------------------------------------------------------------
# The properties


def test_fast_path_sensor_rows_equal_the_reference():
  tally = _run(SENSOR_TOPIC, SENSOR_BASES, 3000)
  assert tally.total >= 3000 and tally.fast >= tally.total // 5, vars(tally)


def test_fast_path_meter_rows_equal_the_reference():
  tally = _run(METER_TOPIC, METER_BASES, 2000)
  assert tally.total >= 2000 and tally.fast >= tally.total // 5, vars(tally)


@pytest.mark.parametrize(
  ("texts", "examples", "least_taken"),
  [(ISO_TEXTS, 2500, 400), (NEAR_TIMESTAMPS | st.text(max_size=40), 1000, 0)],
  ids=["iso-like", "unicode-digits-and-any-text"],
)
def test_fast_timestamps_equal_the_reference(texts, examples, least_taken):
  taken = []

  @settings(max_examples=examples, **_PROFILE)
  @given(texts)
  def check(text):
    fast = timestamps.parse_utc_iso(text)
    if fast is None:
      return
    taken.append(text)
    assert fast == (timestamps.parse_iso_us(text), timestamps.iso_us(fast[0])), text

  check()
  assert len(taken) >= least_taken, len(taken)


# ---------------------------------------------------------------------------
# Examples: what the fast path takes, what it leaves to the reference


def _event_text(event: dict) -> bytes:
  return json.dumps(event).encode()


def test_the_generator_and_the_old_service_take_the_fast_path():
  factory = EventFactory(seed=5)
  events = [factory.sensor(NOW_S + i) for i in range(30)] + [
    factory.meter(NOW_S) for _ in range(10)
  ]
  values = [(SENSOR_TOPIC if e.topic_kind == "sensor" else METER_TOPIC, e.value) for e in events]
  values += [
    (SENSOR_TOPIC, jbytes(old_service_sensor())),
    (METER_TOPIC, jbytes(old_service_meter())),
  ]
  assert any(b'"metadata"' in v for _, v in values)
  tally = _Tally()
  for topic, value in values:
    _check_same(tally, topic, value, 60.0, 50)
  assert tally.fast == tally.total == len(values)


_SENSOR = old_service_sensor()
DECLINED = [
  ("NaN value", _event_text(_SENSOR).replace(b"231.4", b"NaN"), "non_finite"),
  (
    "NaN nested in metadata",
    _event_text({**_SENSOR, "metadata": {"a": [float("nan")]}}),
    "non_finite",
  ),
  ("Infinity in metadata", _event_text(_SENSOR).replace(b'"2.1"', b"Infinity"), "non_finite"),
  ("400-digit value", _event_text(_SENSOR).replace(b"231.4", b"9" * 400), "out_of_range"),
  ("5,000-digit value", _event_text(_SENSOR).replace(b"231.4", b"9" * 5000), "out_of_range"),
  (
    "5,000-digit id",
    _event_text(_SENSOR).replace(b'"sensor_042_', b"9" * 5000 + b', "x": "', 1),
    "out_of_range",
  ),
  (
    "deep metadata",
    _event_text(_SENSOR).replace(
      b'{"unit"', b'{"deep": ' + b"[" * 1500 + b"]" * 1500 + b', "unit"'
    ),
    "unparseable",
  ),
  (
    "deep ignored field",
    b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b", " + _event_text(_SENSOR)[1:],
    "unparseable",
  ),
  ("bad zone", _event_text({**_SENSOR, "timestamp": "2024-01-15T10:30:00+24:00"}), "bad_timestamp"),
  ("no such day", _event_text({**_SENSOR, "timestamp": "2024-02-30T10:30:00Z"}), "bad_timestamp"),
  ("before 1970", _event_text({**_SENSOR, "timestamp": "1969-12-31T23:59:59Z"}), "out_of_range"),
  ("2200", _event_text({**_SENSOR, "timestamp": "2200-01-01T00:00:00Z"}), "out_of_range"),
  ("not an object", b"[1, 2, 3]", "not_object"),
  ("bool value", _event_text({**_SENSOR, "value": True}), "wrong_type"),
  ("bool id", _event_text({**_SENSOR, "sensor_id": False}), "wrong_type"),
  ("blank type", _event_text({**_SENSOR, "sensor_type": " \t"}), "missing_field"),
  ("lone surrogate", _event_text({**_SENSOR, "sensor_id": "\udc00"}), "not_utf8"),
  ("latitude 91", _event_text({**_SENSOR, "location": {"lat": 91, "lon": 0}}), "out_of_range"),
  ("oversized", _event_text({**_SENSOR, "metadata": {"blob": "x" * 70_000}}), "oversized"),
]


@pytest.mark.parametrize(
  ("value", "reason"), [d[1:] for d in DECLINED], ids=[d[0] for d in DECLINED]
)
def test_what_the_fast_path_declines_keeps_the_reference_reason(value, reason):
  assert sensor_head(value) is None
  dead = parse_one(value).dead_letter
  assert dead.reason == reason, dead.error
  _check_same(_Tally(), SENSOR_TOPIC, value, 60.0, 50)


ACCEPTED_ELSEWHERE = [
  ("numeric string", {"value": "231.5"}),
  ("unknown field", {"firmware_build": 7}),
  ("offset zone", {"timestamp": "2024-01-15T11:30:00+01:00"}),
  ("epoch number", {"timestamp": 1_705_314_600}),
  ("nested metadata", {"metadata": {"a": {"b": [1, 2]}}}),
]


@pytest.mark.parametrize(
  "changes", [c for _, c in ACCEPTED_ELSEWHERE], ids=[n for n, _ in ACCEPTED_ELSEWHERE]
)
def test_valid_events_outside_the_fast_path_still_give_their_row(changes):
  value = _event_text({**_SENSOR, **changes})
  assert sensor_head(value) is None
  assert parse_one(value).row
  _check_same(_Tally(), SENSOR_TOPIC, value, 60.0, 50)


def test_an_exception_on_the_fast_path_is_unparseable_with_its_type():
  def explode(value):
    raise KeyError("surprise")

  with mock.patch.object(parse_module, "sensor_head", explode):
    dead = parse_one(jbytes(_SENSOR)).dead_letter
  assert dead.reason == "unparseable" and dead.error.startswith("unparseable: KeyError: ")


def test_window_bounds_are_cached_per_window_and_bounded():
  fn = make_fn(window_size_secs=1.0)
  start = dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.timezone.utc)
  for i in range(1500):  # 1,500 one-second windows: the cache starts again at 1,024
    when = (start + dt.timedelta(seconds=i)).isoformat()
    row = parse_one(jbytes({**_SENSOR, "timestamp": when}), fn=fn).row
    assert row[8] == timestamps.iso_us(int((start.timestamp() + i) * 1e6))
    assert row[9] == timestamps.iso_us(int((start.timestamp() + i + 1) * 1e6))
  assert 0 < len(fn._windows) <= 1024


_TEXT = _event_text(_SENSOR)
ODD_TEXTS = {
  "escaped key name": _TEXT.replace(b'"sensor_id"', b'"sensor\\u005fid"'),
  "NUL in an id": _TEXT.replace(b'"sensor_042"', b'"sensor\\u0000042"'),
  "emoji via a surrogate pair": _TEXT.replace(b'"voltage"', b'"volt\\ud83d\\ude00"'),
  "duplicate key, last valid": _TEXT.replace(b'"value": 231.4', b'"value": "high", "value": 231.4'),
  "duplicate key, last invalid": _TEXT.replace(b'"value": 231.4', b'"value": 231.4, "value": true'),
  "duplicate metadata key": _TEXT.replace(b'{"unit": "V"', b'{"unit": "V", "unit": "kV"'),
  "empty metadata": _event_text({**_SENSOR, "metadata": {}}),
  "metadata numbers": _TEXT.replace(b'"2.1"', b'1e16, "n": -0, "z": -0.0, "b": true, "x": null'),
  "minus zero value": _TEXT.replace(b"231.4", b"-0"),
  "minus zero float": _TEXT.replace(b"231.4", b"-0.0"),
  "integer value past 2**63": _TEXT.replace(b"231.4", b"123456789012345678901234567"),
  "byte order mark": b"\xef\xbb\xbf" + _TEXT,
  "leading space": b" " + _TEXT,
  "trailing newline": _TEXT + b"\n",
  "trailing garbage": _TEXT + b"x",
  "location with an extra key": _TEXT.replace(b'"lon": 13.405', b'"lon": 13.405, "alt": 3'),
  "empty location": _event_text({**_SENSOR, "location": {}}),
  "null lat": _event_text({**_SENSOR, "location": {"lat": None, "lon": 1}}),
  "invalid UTF-8 in metadata": _TEXT.replace(b'"2.1"', b'"2.\xff"'),
  "lone surrogate in metadata key": _TEXT.replace(b'"firmware"', b'"\\udc00"'),
}


@pytest.mark.parametrize("value", list(ODD_TEXTS.values()), ids=list(ODD_TEXTS))
def test_odd_json_texts_give_what_the_reference_gives(value):
  _check_same(_Tally(), SENSOR_TOPIC, value, 60.0, 50)


def test_the_fast_paths_caches_stay_bounded():
  from transforms import fast_events

  for i in range(5000):  # distinct metadata texts and seconds: each cache starts again when full
    value = _event_text({**_SENSOR, "metadata": {"n": i}, "timestamp": f"2024-01-15T10:30:00.{i}Z"})
    assert sensor_head(value)[1][7] == f'{{"n":{i}}}'
  assert 0 < len(fast_events._METADATA_TEXTS) <= 4096
  assert 0 < len(timestamps._TAILS) <= 20_000 and 0 < len(timestamps._SECONDS) <= 10_000
  big = {"blob": "x" * 2000}
  head = sensor_head(_event_text({**_SENSOR, "metadata": big}))
  assert head[1][7] == json.dumps(big, separators=(",", ":"))
  assert not any(len(raw) > 1024 for raw in fast_events._METADATA_TEXTS)  # not kept
