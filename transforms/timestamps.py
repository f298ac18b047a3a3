"""Event timestamps: the one parser of the pipeline, the same on Python 3.10 to 3.13.

Owns the accepted forms, the epoch-number rule and the range of event times, and
the stored time format (``iso_us``). Pure
standard library with no project import, so a test can run this very file under
every Python interpreter it finds (``python timestamps.py`` reads JSON values on
stdin and prints one result per line) and compare them.

It does not use ``datetime.fromisoformat``, whose accepted forms differ between
versions (3.10 refuses a trailing ``Z``, 3.11 takes far more of ISO-8601); the
calendar arithmetic is integer arithmetic, so no input can overflow it.

Accepted (anything else raises ``TimestampError('bad_timestamp', ...)``):

==========================================  ==========================================
form                                        instant
==========================================  ==========================================
``2024-01-15T10:30:00Z`` (also ``z``)       UTC
``2024-01-15T10:30:00+01:00``, ``+0100``,   the offset (up to 23:59 either way)
``+01``, ``-05:30``
``2024-01-15T10:30:00`` (no zone)           UTC: the old service writes
                                            ``datetime.utcnow().isoformat()``
``2024-01-15 10:30:00``                     a space (or ``t``) instead of ``T``
``...:00.5``, ``...:00.123456789``          0 to 9 fractional digits (``.`` or ``,``),
                                            truncated to microseconds
``2024-01-15T10:30`` and ``2024-01-15``     missing seconds / time are zero
JSON number ``1705314600`` (or ``.5``)      epoch seconds when ``abs(n) < 1e11``
JSON number ``1705314600000``               epoch milliseconds when ``abs(n) >= 1e11``
``datetime`` (from an Avro logical type)    naive means UTC
==========================================  ==========================================

Epoch rule (``EPOCH_MS_FROM``): 1e11 seconds is the year 5138 and 1e11 milliseconds
is 1973-03-03, so a magnitude under 1e11 is read as seconds and anything larger as
milliseconds. Only milliseconds before 1973-03-03 are misread: those after
1970-03-26 become seconds past 2200 and are refused as out of range; those before it
(under 7.26e9) would be taken as seconds.
Numeric *strings* are not epochs (``bad_timestamp``): a digit string is ambiguous
(``"20240115"`` is a basic-format date, or 234 days of seconds), and neither the old
service nor its documentation sends one.

Range: event times must lie in [1970-01-01, 2200-01-01) UTC, else
``TimestampError('out_of_range', ...)``; window arithmetic and formatting of any
accepted instant therefore stay far from ``datetime``'s year 9999 limit.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from typing import Any

EPOCH_MS_FROM = 100_000_000_000  # |n| >= 1e11: milliseconds; below: seconds
MIN_US = 0  # 1970-01-01T00:00:00Z
MAX_US = 7_258_118_400_000_000  # 2200-01-01T00:00:00Z, exclusive

_ISO = re.compile(
  r"(\d{4})-(\d{2})-(\d{2})"
  r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
  r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?)?",
  re.ASCII,
)
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_EPOCH_DT = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_EPOCH_LIMIT = 10**15  # past 2200 in any unit: refused before any arithmetic


class TimestampError(ValueError):
  """A timestamp that gives no usable instant; ``reason`` is bad_timestamp or out_of_range."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def _days_from_civil(y: int, m: int, d: int) -> int:
  """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
  y -= m <= 2
  era = y // 400
  yoe = y - era * 400
  doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
  doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146_097 + doe - 719_468


def _is_leap(y: int) -> bool:
  return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _show(value: Any) -> str:
  """A short repr that cannot fail (repr of an int over 4,300 digits raises on 3.11+)."""
  if isinstance(value, int) and value.bit_length() > 200:
    return f"<a {value.bit_length()}-bit integer>"
  return f"{value!r:.60}"


def _out_of_range(value: Any) -> TimestampError:
  return TimestampError(
    "out_of_range", f"'timestamp' {_show(value)} is outside 1970-01-01 .. 2200-01-01 UTC"
  )


def _in_range(us: int, shown: Any) -> int:
  if not MIN_US <= us < MAX_US:
    raise _out_of_range(shown)
  return us


_DATE_DAYS: dict = {}  # 'YYYY-MM-DD' -> days since 1970-01-01 (or None: no such date)


def _date_days(date: str) -> int | None:
  days = _DATE_DAYS.get(date, -1)
  if days != -1:
    return days
  year, month, day = int(date[:4]), int(date[5:7]), int(date[8:10])
  if not 1 <= month <= 12 or not 1 <= day <= (
    29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month]
  ):
    days = None
  else:
    days = _days_from_civil(year, month, day)
  if len(_DATE_DAYS) > 100_000:
    _DATE_DAYS.clear()
  _DATE_DAYS[date] = days
  return days


def parse_iso_us(text: str) -> int:
  """ISO-8601 text -> epoch microseconds (see the module's table)."""
  text = text.strip() if len(text) <= 64 else ""
  m = _ISO.fullmatch(text)
  if m is None:
    raise TimestampError("bad_timestamp", f"'timestamp' {_show(text)} is not ISO-8601")
  _, _, _, hour, minute, second, fraction, _, sign, off_h, off_m = m.groups()
  days = _date_days(text[:10])  # the pattern starts with exactly 'YYYY-MM-DD'
  seconds = 0
  if hour is not None:
    h, mi, sec = int(hour), int(minute), int(second or 0)
    if h > 23 or mi > 59 or sec > 59:
      days = None
    seconds = h * 3600 + mi * 60 + sec
  if days is None:
    raise TimestampError("bad_timestamp", f"'timestamp' {_show(text)} is not a valid date and time")
  if sign is not None:
    oh, om = int(off_h), int(off_m or 0)
    if oh > 23 or om > 59:
      raise TimestampError("bad_timestamp", f"'timestamp' {_show(text)} has a bad UTC offset")
    seconds -= (oh * 3600 + om * 60) * (-1 if sign == "-" else 1)
  micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
  return _in_range((days * 86_400 + seconds) * 1_000_000 + micros, text)


# The common forms' fast path: the first 19 characters 'YYYY-MM-DDTHH:MM:SS' (also 't' or ' ')
# checked once per second of event time, a tail of up to milliseconds once per distinct tail
# (bounded caches); a tail of more digits is read each time.
_SECOND = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:[0-5]\d", re.ASCII)
_UTC_TAIL = re.compile(r"(?:[.,](\d{1,9}))?(?:[Zz]|\+00:00)?", re.ASCII)
_SECONDS: dict = {}  # first 19 characters -> (µs, stored form's 'YYYY-MM-DDTHH:MM:SS.') or None
_TAILS: dict = {}  # the rest, up to milliseconds -> (µs, stored form's 'ffffffZ')


def _second(head: str) -> tuple[int, str] | None:
  found = None
  if _SECOND.fullmatch(head):
    try:
      found = (parse_iso_us(head), f"{head[:10]}T{head[11:]}.")
    except TimestampError:
      pass
  if len(_SECONDS) >= 10_000:
    _SECONDS.clear()
  _SECONDS[head] = found
  return found


def parse_utc_iso(text: str) -> tuple[int, str] | None:
  """The common UTC forms -> (epoch µs, ``iso_us`` of it), or None for any other text.

  Takes 'YYYY-MM-DD[Tt ]HH:MM:SS' with an optional 1-9 digit fraction and an optional
  ``Z``, ``z`` or ``+00:00``: what producers write (``isoformat()`` of an aware or naive
  UTC datetime, ``strftime('%Y-%m-%dT%H:%M:%SZ')``). Where it answers, it answers as
  ``parse_iso_us`` and ``iso_us`` do; None means only "not a common form": ``parse_iso_us``
  decides (other zones, spaces around, short forms, and every refusal with its reason).
  """
  head = _SECONDS.get(text[:19]) or _second(text[:19])
  if head is None:
    return None
  rest = text[19:]
  tail = _TAILS.get(rest)
  if tail is None:
    digits = rest[1:]
    if len(rest) == 7 and rest[0] == "." and digits.isascii() and digits.isdigit():
      return head[0] + int(digits), head[1] + digits + "Z"  # naive isoformat(): microseconds
    match = _UTC_TAIL.fullmatch(text, 19)
    if match is None:
      return None
    digits = match.group(1) or ""
    fraction = digits[:6].ljust(6, "0")  # truncated to microseconds, as parse_iso_us does
    tail = (int(fraction), fraction + "Z")
    if len(digits) <= 3:  # at most millisecond tails are cached: a few thousand at most
      if len(_TAILS) >= 20_000:
        _TAILS.clear()
      _TAILS[rest] = tail
  return head[0] + tail[0], head[1] + tail[1]


def parse_epoch_us(number: Any) -> int:
  """An epoch number (int or float, not bool) -> epoch microseconds, by the 1e11 rule."""
  if isinstance(number, int) and not -_EPOCH_LIMIT < number < _EPOCH_LIMIT:
    raise _out_of_range(number)
  try:
    if isinstance(number, (int, decimal.Decimal)):
      exact = decimal.Decimal(number)
    else:  # the float's shortest repr: 1700000000.123456 stays exactly that
      exact = decimal.Decimal(repr(float(number)))
  except (ValueError, decimal.InvalidOperation, OverflowError):
    raise TimestampError("bad_timestamp", f"'timestamp' {_show(number)} is not a number") from None
  if not exact.is_finite():
    raise TimestampError("bad_timestamp", f"'timestamp' {_show(number)} is not finite")
  # Compare before any arithmetic: a huge exponent would overflow the decimal context.
  if exact.copy_abs() >= _EPOCH_LIMIT:
    raise _out_of_range(number)
  scale = 1_000 if exact.copy_abs() >= EPOCH_MS_FROM else 1_000_000
  return _in_range(int(exact * scale), number)  # int() truncates toward zero, like the fraction


def parse_datetime_us(value: dt.datetime) -> int:
  """A datetime (naive means UTC) -> epoch microseconds, range-checked."""
  offset = value.utcoffset() if value.tzinfo is not None else None
  naive = value.replace(tzinfo=None)
  days = naive.toordinal() - 719_163  # date(1970, 1, 1).toordinal()
  seconds = days * 86_400 + naive.hour * 3600 + naive.minute * 60 + naive.second
  if offset is not None:
    seconds -= offset.days * 86_400 + offset.seconds
  return _in_range(seconds * 1_000_000 + naive.microsecond, value.isoformat())


def parse_timestamp_us(value: Any) -> int:
  """Any accepted timestamp value -> epoch microseconds; raises ``TimestampError``."""
  if isinstance(value, str):
    return parse_iso_us(value)
  if isinstance(value, bool):
    raise TimestampError(
      "bad_timestamp", f"'timestamp' must be ISO-8601 text or a number, got {value!r}"
    )
  if isinstance(value, (int, float, decimal.Decimal)):
    return parse_epoch_us(value)
  if isinstance(value, dt.datetime):
    return parse_datetime_us(value)
  raise TimestampError(
    "bad_timestamp", f"'timestamp' must be ISO-8601 text or a number, got {type(value).__name__}"
  )


_MINUTE_PREFIXES: dict[int, str] = {}


def iso_us(us: int) -> str:
  """Epoch microseconds -> 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (UTC), the stored time format.

  Three calls per row: the 'YYYY-MM-DDTHH:MM:' prefix is cached per minute (strftime
  costs about 6 µs; this about 0.5 µs).
  """
  seconds, micros = divmod(us, 1_000_000)
  minute, second = divmod(seconds, 60)
  prefix = _MINUTE_PREFIXES.get(minute)
  if prefix is None:
    if len(_MINUTE_PREFIXES) > 100_000:
      _MINUTE_PREFIXES.clear()
    prefix = (_EPOCH_DT + dt.timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")
    _MINUTE_PREFIXES[minute] = prefix
  return f"{prefix}{second:02d}.{micros:06d}Z"


def _main() -> None:
  """stdin: a JSON list of values; stdout: one JSON [reason_or_null, micros_or_null] per value."""
  import json
  import sys

  for value in json.load(sys.stdin):
    try:
      print(json.dumps([None, parse_timestamp_us(value)]))
    except TimestampError as e:
      print(json.dumps([e.reason, None]))


if __name__ == "__main__":
  _main()
