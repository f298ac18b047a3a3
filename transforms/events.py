"""Smart-grid events: typed values, the acceptance rules, table rows and dead-letter rows.

Pure functions, no Beam (importable on its own): ``sensor_from_object`` /
``meter_from_object`` validate a decoded event (from JSON or Avro, the same rules)
into a ``SensorReading`` / ``MeterReading`` or raise ``InvalidEvent`` carrying a
reason from ``DEAD_LETTER_REASONS``; ``load_json_object`` decodes a JSON value.
Rows are plain tuples in the layout of ``transforms.rows`` (cheap to
encode between Beam stages), followed by the record's ``covers_from`` offset,
which the sink acknowledges. ``dead_letter_row`` builds the agreed dead-letter row.

Acceptance rules (what the old Flask/kafka-python/Postgres consumer stored, this
pipeline stores; a dead letter is only for what nothing can store):

======================  ==========================================  ===============================
field                   accepted, and stored as                     dead letter (reason)
======================  ==========================================  ===============================
(the value)             a JSON object (UTF-8), or Confluent-framed  not_utf8, not_json, not_object,
                        Avro decoded with the registry's schema     oversized (> 64 KiB),
                                                                    avro_needs_registry, bad_avro,
                                                                    unknown_schema,
                                                                    registry_unavailable
event_id, sensor_id,    a non-blank string, as is; an integer,      absent/null/blank:
meter_id, customer_id   as its decimal text (``42`` -> ``"42"``)    missing_field; other types:
                                                                    wrong_type
sensor_type             a non-blank string                          missing_field, wrong_type
value, reading          a number, or a numeric string (``"12.5"``)  absent/null: missing_field;
                        parsed to a float                           ``"high"``, bool, object:
                                                                    wrong_type; NaN, ±Infinity,
                                                                    1e400: non_finite; a number
                                                                    too big for a float:
                                                                    out_of_range
location                an object; absent or null: null latitude    any other type: wrong_type
                        and longitude
location.lat / .lon     a number or numeric string, as a float;     outside ±90 / ±180:
                        absent or null: null column                 out_of_range; else as value
metadata                absent or null: NULL; anything else as      NaN/Infinity anywhere (also
                        UTF-8 JSON text, keys sorted, non-ASCII     nested): non_finite; a lone
                        kept (``"°C"``), non-objects too            surrogate: not_utf8
                        (``"fw 2.1"`` -> ``"\\"fw 2.1\\""``)
unit                    a non-blank string; absent or null: "kWh"   wrong_type, missing_field
timestamp               see ``transforms.timestamps``: ISO-8601     absent/null: missing_field;
                        (any zone form, naive = UTC, 0-9 fraction   unreadable: bad_timestamp;
                        digits) or epoch seconds/milliseconds       outside 1970..2200:
                        as a JSON number                            out_of_range
other fields            ignored                                     -
anything else that      -                                           unparseable (the exception
raises (e.g. nesting                                                type in ``error``)
past ~1,000 levels)
======================  ==========================================  ===============================

NaN, Infinity and -Infinity (``json.loads`` accepts them, and Python's ``json.dumps``
writes them) are refused wherever they would be stored, metadata included, as no
sink can store them; in an ignored field they do no harm, as for the old consumer. A
JSON number over 4,300 digits (Python's limit) is refused as ``out_of_range``.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from transforms.rows import coordinates, covers_from
from transforms.timestamps import TimestampError, iso_us
from transforms.timestamps import parse_timestamp_us as _parse_timestamp_us

MAX_EVENT_BYTES = 64 * 1024
# Longest raw_key / raw_value text stored in a dead letter (UTF-8 bytes, or base64 text),
# and of its error text: a dead letter stays far under every sink's row limit.
RAW_TEXT_LIMIT = 64 * 1024
ERROR_TEXT_LIMIT = 2000

# The closed list of dead_letters.reason. The parse stage writes all but the last two; the
# sinks write sink_rejected, and duplicate_event is reserved for a sink that keeps a later
# copy of an event_id as a dead letter (the shared design counts and acks it instead).
DEAD_LETTER_REASONS = (
  "oversized",
  "not_utf8",
  "not_json",
  "not_object",
  "missing_field",
  "wrong_type",
  "non_finite",
  "out_of_range",
  "bad_timestamp",
  "unknown_topic",
  "unparseable",
  "avro_needs_registry",
  "bad_avro",
  "unknown_schema",
  "registry_unavailable",
  "sink_rejected",
  "duplicate_event",
)

_NUMERIC_TEXT = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)


class InvalidEvent(ValueError):
  """An event no table can hold; ``reason`` is one of ``DEAD_LETTER_REASONS``."""

  def __init__(self, reason: str, detail: str):
    assert reason in DEAD_LETTER_REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


# One encoder: json.dumps with non-default arguments builds a new one per call (~3 µs).
METADATA_JSON = json.JSONEncoder(
  separators=(",", ":"), allow_nan=False, sort_keys=True, ensure_ascii=False
)


class SensorReading(NamedTuple):  # immutable; a NamedTuple is ~1.5 µs cheaper to make per event
  event_id: str
  sensor_id: str
  sensor_type: str
  value: float
  latitude: float | None
  longitude: float | None
  event_time_us: int
  metadata: str | None  # UTF-8 JSON text


class MeterReading(NamedTuple):
  event_id: str
  meter_id: str
  customer_id: str
  reading: float
  unit: str
  event_time_us: int


@dataclass(frozen=True)
class DeadLetter:
  kafka_topic: str
  kafka_partition: int
  kafka_offset: int
  covers_from: int
  raw_key: bytes | None
  raw_value: bytes | None
  reason: str  # one of DEAD_LETTER_REASONS
  error: str  # "reason: detail"
  stage: str
  failed_at_us: int


def describe_exception(exc: BaseException) -> InvalidEvent:
  """Any exception raised while parsing a record -> the InvalidEvent it stands for."""
  if isinstance(exc, InvalidEvent):
    return exc
  if isinstance(exc, TimestampError):
    return InvalidEvent(exc.reason, str(exc))
  try:
    detail = str(exc)[:300]
  except Exception:  # noqa: BLE001 - a broken __str__ must not escape either
    detail = "(no message)"
  return InvalidEvent("unparseable", f"{type(exc).__name__}: {detail}")


# ---------------------------------------------------------------------------
# Decoding a JSON value


def load_json_object(value: bytes | None) -> dict:
  """A record's value -> the JSON object it holds; raises InvalidEvent."""
  if value is None:
    raise InvalidEvent("not_json", "the record has no value (tombstone)")
  if len(value) > MAX_EVENT_BYTES:
    raise InvalidEvent("oversized", f"{len(value)} bytes > {MAX_EVENT_BYTES}")
  try:
    text = value.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InvalidEvent("not_utf8", str(e)) from None
  try:
    obj = json.loads(text)
  except RecursionError:
    raise InvalidEvent("unparseable", "RecursionError: JSON nested too deeply") from None
  except ValueError as e:  # JSONDecodeError, or an integer over 4,300 digits
    if "digits" in str(e) and "limit" in str(e):
      raise InvalidEvent("out_of_range", f"an integer is too long: {str(e)[:120]}") from None
    raise InvalidEvent("not_json", str(e)[:200]) from None
  if not isinstance(obj, dict):
    raise InvalidEvent("not_object", f"expected a JSON object, got {type(obj).__name__}")
  return obj


# ---------------------------------------------------------------------------
# Field rules (the table in the module docstring)


def _text(
  obj: Mapping[str, Any], name: str, default: str | None = None, integers: bool = False
) -> str:
  value = obj.get(name)
  if value is None:
    if default is not None:
      return default
    raise InvalidEvent("missing_field", f"'{name}' is required")
  if integers and isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise InvalidEvent("wrong_type", f"'{name}' must be a string, got {type(value).__name__}")
  if not value.strip():
    raise InvalidEvent("missing_field", f"'{name}' is empty")
  if not value.isascii():
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\\udc00" escape
      raise InvalidEvent("not_utf8", f"'{name}' holds a lone UTF-16 surrogate") from None
  return value


def _float(value: Any, name: str) -> float:
  if isinstance(value, float):
    number = value
  elif isinstance(value, bool):
    raise InvalidEvent("wrong_type", f"'{name}' must be a number, got bool")
  elif isinstance(value, (int, decimal.Decimal)):
    try:
      number = float(value)
    except OverflowError:
      raise InvalidEvent("out_of_range", f"'{name}' is too large for a float") from None
  elif isinstance(value, str) and len(value) <= 400 and _NUMERIC_TEXT.fullmatch(value):
    number = float(value)
  else:
    raise InvalidEvent(
      "wrong_type",
      f"'{name}' must be a number, got {type(value).__name__}"
      + (f" {value!r:.40}" if isinstance(value, str) else ""),
    )
  if not math.isfinite(number):
    raise InvalidEvent("non_finite", f"'{name}' is {number}")
  return number


def _number(obj: Mapping[str, Any], name: str) -> float:
  value = obj.get(name)
  if value is None:
    raise InvalidEvent("missing_field", f"'{name}' is required")
  return _float(value, name)


def _coordinate(location: Mapping[str, Any], name: str, bound: float) -> float | None:
  value = location.get(name)
  if value is None:
    return None
  number = _float(value, f"location.{name}")
  if not -bound <= number <= bound:
    raise InvalidEvent("out_of_range", f"'location.{name}'={number} is outside [-{bound}, {bound}]")
  return number


def _metadata(obj: Mapping[str, Any]) -> str | None:
  metadata = obj.get("metadata")
  if metadata is None:
    return None
  try:
    text = METADATA_JSON.encode(metadata)
  except ValueError:  # a float that overflowed to inf, e.g. 1e400
    raise InvalidEvent("non_finite", "'metadata' holds a non-finite number") from None
  except TypeError as e:  # e.g. bytes from an Avro record
    raise InvalidEvent(
      "wrong_type", f"'metadata' holds a value JSON cannot represent: {e}"
    ) from None
  if not text.isascii():
    try:
      text.encode("utf-8")
    except UnicodeEncodeError:
      raise InvalidEvent("not_utf8", "'metadata' holds a lone UTF-16 surrogate") from None
  return text


def parse_timestamp_us(value: Any) -> int:
  """A timestamp value -> epoch microseconds (``transforms.timestamps``); raises InvalidEvent."""
  if value is None:
    raise InvalidEvent("missing_field", "'timestamp' is required")
  try:
    return _parse_timestamp_us(value)
  except TimestampError as e:
    raise InvalidEvent(e.reason, str(e)) from None


def sensor_from_object(obj: Mapping[str, Any]) -> SensorReading:
  location = obj.get("location")
  if location is None:
    location = {}
  elif not isinstance(location, Mapping):
    raise InvalidEvent("wrong_type", f"'location' must be an object, got {type(location).__name__}")
  return SensorReading(
    event_id=_text(obj, "event_id", integers=True),
    sensor_id=_text(obj, "sensor_id", integers=True),
    sensor_type=_text(obj, "sensor_type"),
    value=_number(obj, "value"),
    latitude=_coordinate(location, "lat", 90.0),
    longitude=_coordinate(location, "lon", 180.0),
    event_time_us=parse_timestamp_us(obj.get("timestamp")),
    metadata=_metadata(obj),
  )


def meter_from_object(obj: Mapping[str, Any]) -> MeterReading:
  return MeterReading(
    event_id=_text(obj, "event_id", integers=True),
    meter_id=_text(obj, "meter_id", integers=True),
    customer_id=_text(obj, "customer_id", integers=True),
    reading=_number(obj, "reading"),
    unit=_text(obj, "unit", default="kWh"),
    event_time_us=parse_timestamp_us(obj.get("timestamp")),
  )


def parse_sensor(value: bytes | None) -> SensorReading:
  """A JSON value -> SensorReading; raises InvalidEvent (and only that)."""
  try:
    return sensor_from_object(load_json_object(value))
  except Exception as e:  # noqa: BLE001 - every failure has a reason
    raise describe_exception(e) from None


def parse_meter(value: bytes | None) -> MeterReading:
  """A JSON value -> MeterReading; raises InvalidEvent (and only that)."""
  try:
    return meter_from_object(load_json_object(value))
  except Exception as e:  # noqa: BLE001 - every failure has a reason
    raise describe_exception(e) from None


# ---------------------------------------------------------------------------
# Rows: the layout of transforms.rows (SENSOR_ROW, METER_ROW), without written_at (the
# sink stamps it), ending with (kafka_topic, kafka_partition, kafka_offset, covers_from).


def sensor_columns(r: SensorReading) -> tuple:
  """A sensor reading's row columns up to the window: event_id ... metadata."""
  return (
    r.event_id,
    r.sensor_id,
    r.sensor_type,
    r.value,
    r.latitude,
    r.longitude,
    iso_us(r.event_time_us),
    r.metadata,
  )


def meter_columns(r: MeterReading) -> tuple:
  """A meter reading's row columns up to the window: event_id ... event_time."""
  return (r.event_id, r.meter_id, r.customer_id, r.reading, r.unit, iso_us(r.event_time_us))


def _row(
  columns: tuple,
  window_start_us: int,
  window_end_us: int,
  is_late: bool,
  topic: str,
  partition: int,
  offset: int,
  covers_from: int,
) -> tuple:
  return (
    *columns,
    iso_us(window_start_us),
    iso_us(window_end_us),
    is_late,
    topic,
    partition,
    offset,
    covers_from,
  )


def sensor_row(r: SensorReading, *window_and_coordinates) -> tuple:
  """(reading, window start µs, window end µs, is_late, topic, partition, offset,
  covers_from) -> its sensor_readings row."""
  return _row(sensor_columns(r), *window_and_coordinates)


def meter_row(r: MeterReading, *window_and_coordinates) -> tuple:
  """As ``sensor_row``, for a meter reading."""
  return _row(meter_columns(r), *window_and_coordinates)


def _is_text(raw: bytes | None) -> bool:
  """Valid UTF-8 without a NUL byte: a NUL marks binary data (Confluent-framed Avro starts with
  one) and many tools cut text there, so such values are stored as base64."""
  if raw is None:
    return True
  if b"\x00" in raw:
    return False
  try:
    raw.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


def _raw_text(raw: bytes | None, encoding: str) -> tuple:
  """Raw bytes -> (text of at most RAW_TEXT_LIMIT, truncated?) in the given encoding."""
  if raw is None:
    return None, False
  if encoding == "utf8":
    cut = raw[:RAW_TEXT_LIMIT]
    # Cutting may split the last character; 'ignore' drops only that partial tail.
    return cut.decode("utf-8", "ignore"), len(raw) > RAW_TEXT_LIMIT
  cut = raw[: RAW_TEXT_LIMIT // 4 * 3]  # base64 makes 4 characters of every 3 bytes
  return binascii.b2a_base64(cut, newline=False).decode("ascii"), len(raw) > len(cut)


def raw_columns(raw_key: bytes | None, raw_value: bytes | None) -> tuple:
  """(raw_key, raw_value, raw_encoding, raw_size, raw_sha256, truncated) of a dead letter.

  One ``raw_encoding`` holds for both key and value: ``utf8`` when both are valid
  UTF-8 without NUL bytes (or absent), else ``base64`` for both. Size and hash are the
  original value's.
  """
  encoding = "utf8" if _is_text(raw_value) and _is_text(raw_key) else "base64"
  key_text, key_cut = _raw_text(raw_key, encoding)
  value_text, value_cut = _raw_text(raw_value, encoding)
  size = None if raw_value is None else len(raw_value)
  digest = None if raw_value is None else hashlib.sha256(raw_value).hexdigest()
  return key_text, value_text, encoding, size, digest, int(key_cut or value_cut)


def dead_letter_row(d: DeadLetter) -> tuple:
  """The dead_letters row (``transforms.rows.DEAD_LETTER_ROW``) of a DeadLetter."""
  return (
    *raw_columns(d.raw_key, d.raw_value),
    d.reason,
    d.error[:ERROR_TEXT_LIMIT],
    d.stage,
    iso_us(d.failed_at_us),
    d.kafka_topic,
    d.kafka_partition,
    d.kafka_offset,
    d.covers_from,
  )


def rejected_row_dead_letter(
  row: tuple, raw: bytes, reason: str, error: str, failed_at_us: int
) -> tuple:
  """A row a store refused for good (or a later copy of a stored event) -> the
  dead_letters row for the same offset.

  ``raw`` stands for the Kafka value, which is not at hand in the sink: the refused
  row as UTF-8 JSON text. It is cut and hashed like any raw value.
  """
  return (
    *raw_columns(None, raw),
    reason,
    error[:ERROR_TEXT_LIMIT],
    "sink",
    iso_us(failed_at_us),
    *coordinates(row),
    covers_from(row),
  )


def decode_raw_value(text: str | None, encoding: str) -> bytes | None:
  """The inverse of the raw_value column (for audits and tests): stored text -> bytes."""
  if text is None:
    return None
  return text.encode("utf-8") if encoding == "utf8" else base64.b64decode(text)
