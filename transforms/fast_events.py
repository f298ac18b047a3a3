"""The fast path of ``transforms.events`` for the common valid JSON event.

One msgspec decoder per event type turns the JSON bytes straight into typed fields,
checking types and bounds in C, and ``timestamps.parse_utc_iso`` reads the common
timestamp forms. The path is deliberately narrow: it takes only an event every one of
whose fields has the plain expected type (strings, integer ids, JSON numbers, a flat
metadata object of scalars, a common UTC timestamp) and no field it does not know.
For any other value it answers None, and the caller runs the reference rules of
``transforms.events`` on the same bytes: so every refusal, and every reason, is
theirs by construction; where it answers, it answers as they would (the differential
fuzz test in tests/test_fast_events.py holds it to that).

Why the narrowness keeps it exact: msgspec refuses NaN/Infinity, lone surrogates,
invalid UTF-8, control characters and numbers beyond a float, as the reference
refuses them (with a reason, which the reference then finds); unknown fields are
refused because msgspec would skip over them without the checks ``json.loads``
applies to them (nesting depth, integers over 4,300 digits, UTF-8). For the same reason
the metadata, kept as its JSON text (``msgspec.Raw``), is decoded in full as a flat
object of scalars before its stored text is made (once per distinct text: a cache).
The structs hold no containers, so they skip the garbage collector (``gc=False``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from transforms.events import MAX_EVENT_BYTES, METADATA_JSON
from transforms.timestamps import parse_utc_iso

_Id = str | int
_NULL = msgspec.Raw(b"null")
_Scalar = str | int | float | bool | None


class _Location(msgspec.Struct, forbid_unknown_fields=True, gc=False):
  lat: Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)] | None = None
  lon: Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)] | None = None


class _Sensor(msgspec.Struct, forbid_unknown_fields=True, gc=False):
  event_id: _Id
  sensor_id: _Id
  sensor_type: str
  value: float
  timestamp: str
  location: _Location | None = None
  metadata: msgspec.Raw = _NULL  # its JSON text, checked once per distinct text (_metadata)


class _Meter(msgspec.Struct, forbid_unknown_fields=True, gc=False):
  event_id: _Id
  meter_id: _Id
  customer_id: _Id
  reading: float
  timestamp: str
  unit: str | None = None


_SENSOR = msgspec.json.Decoder(_Sensor)
_FLAT_METADATA = msgspec.json.Decoder(dict[str, _Scalar])
_METADATA_TEXTS: dict[bytes, str] = {}  # metadata JSON as sent -> as stored; few distinct ones
_CACHED_METADATA_BYTES = 1024  # larger ones are not kept: the cache stays under about 10 MB
_METER = msgspec.json.Decoder(_Meter)
_OPEN_BRACE = 0x7B  # a JSON object's first byte; anything else (whitespace, Avro) goes the long way


def _metadata(raw: bytes) -> str | None:
  """Metadata JSON as sent -> as stored (``_metadata`` of transforms.events), or None: not for
  this path. A flat object of scalars only: whatever is nested, non-finite or a lone
  surrogate the reference judges. Cached: devices send the same few metadata objects."""
  try:
    text = METADATA_JSON.encode(_FLAT_METADATA.decode(raw))  # a 4,300+ digit int raises
  except Exception:  # noqa: BLE001 - anything unusual is the reference's to judge
    return None
  if len(raw) <= _CACHED_METADATA_BYTES:
    if len(_METADATA_TEXTS) >= 4096:
      _METADATA_TEXTS.clear()
    _METADATA_TEXTS[raw] = text
  return text


def _id(value: str | int) -> str | None:
  """An id as the reference stores it (integers as decimal text), or None: not for this path."""
  if type(value) is str:
    return None if value.isspace() or not value else value
  return str(value) if value.bit_length() < 14_000 else None  # str() of 4,300+ digits raises


def _decoded(decoder, value: bytes | None):
  """The typed struct of a plain JSON object, or None (anything unusual is the reference's)."""
  if not value or value[0] != _OPEN_BRACE or len(value) > MAX_EVENT_BYTES:
    return None
  try:
    return decoder.decode(value)
  except Exception:  # noqa: BLE001 - anything unusual is the reference's to judge
    return None


def sensor_head(value: bytes | None) -> tuple[int, tuple] | None:
  """A sensor event -> (event µs, its row's columns up to the window start), or None.

  The columns: event_id, sensor_id, sensor_type, value, latitude, longitude, event_time,
  metadata (``transforms.rows.SENSOR_ROW``'s order).
  """
  e = _decoded(_SENSOR, value)
  if e is None:
    return None
  metadata = None
  if e.metadata is not _NULL:
    raw = bytes(e.metadata)
    if raw != b"null":
      metadata = _METADATA_TEXTS.get(raw) or _metadata(raw)
      if metadata is None:
        return None
  event_id, sensor_id, sensor_type = _id(e.event_id), _id(e.sensor_id), e.sensor_type
  when = parse_utc_iso(e.timestamp)
  if event_id is None or sensor_id is None or when is None:
    return None
  if not sensor_type or sensor_type.isspace():
    return None
  location = e.location
  lat, lon = (None, None) if location is None else (location.lat, location.lon)
  return when[0], (event_id, sensor_id, sensor_type, e.value, lat, lon, when[1], metadata)


def meter_head(value: bytes | None) -> tuple[int, tuple] | None:
  """A meter event -> (event µs, its row's columns up to the window start), or None.

  The columns: event_id, meter_id, customer_id, reading, unit, event_time
  (``transforms.rows.METER_ROW``'s order).
  """
  e = _decoded(_METER, value)
  if e is None:
    return None
  event_id, meter_id, customer_id = _id(e.event_id), _id(e.meter_id), _id(e.customer_id)
  when = parse_utc_iso(e.timestamp)
  unit = e.unit
  if unit is None:
    unit = "kWh"
  elif not unit or unit.isspace():
    return None
  if event_id is None or meter_id is None or customer_id is None or when is None:
    return None
  return when[0], (event_id, meter_id, customer_id, e.reading, unit, when[1])
