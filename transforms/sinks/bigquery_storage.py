"""BigQuery Storage Write API: application-created COMMITTED streams with explicit offsets.

What this module owns:

- ``row_message``: a proto2 message class per table, built at runtime from
  ``transforms.sinks.schema`` (every field optional, so 0, "" and 0.0 arrive as values,
  not NULL; TIMESTAMP as int64 epoch microseconds; JSON as string);
- ``encode_rows``: pipeline row tuples -> serialized rows (rows that cannot be encoded
  are refused with the reason, for the dead-letter table);
- ``StreamWriter``: one COMMITTED stream of one table and the offset of its next row,
  created here or resumed from a name and offset kept in a key's state (``WriteBatches``).

Exactly once inside a stream: every request carries the offset its first row must get.
A request sent again after a lost response or a dropped connection lands on the same
offset, and BigQuery answers ``ALREADY_EXISTS``, which counts as success. ``OUT_OF_RANGE``
means an earlier request failed: everything from the first unconfirmed request is sent
again, at the same offsets. Python's ``AppendRowsStream`` does not reconnect, so each
send is one bidirectional call carrying all outstanding requests (pipelined); a dropped
call is simply made again with the requests still unconfirmed. A request BigQuery
refuses as a whole appends nothing: rows it names are refused for good; without a row
index the request is split in halves until the bad row is alone. Requests stay under
``MAX_REQUEST_BYTES`` (the API's limit is 10 MB).

A stream that is gone (expired after 3 days idle, finalized, unknown after a service
restart) raises ``StreamGone``; a send that stays unconfirmed past ``append_deadline_s``
raises ``StreamUncertain``. The store then drops the writer and retries the whole write
on a new stream, after checking which rows BigQuery already holds (see ``bigquery.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence

from transforms.retry import RetriesExhausted, with_retries
from transforms.rows import stored
from transforms.sinks.schema import Table

_LOGGER = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 9_000_000  # AppendRows: 10 MB per request; room for the schema and framing
_ROW_FRAMING_BYTES = 8
_ALREADY_EXISTS, _OUT_OF_RANGE, _INVALID_ARGUMENT = 6, 11, 3
_STREAM_GONE_CODES = frozenset({5, 9})  # NOT_FOUND, FAILED_PRECONDITION (finalized, expired)
_STREAM_WORDS = ("stream", "Stream")


class StreamGone(RuntimeError):
  """The write stream no longer takes appends (expired, finalized, unknown): use a new one."""


class StreamUncertain(RuntimeError):
  """Appends stayed unconfirmed past the deadline; whether they landed is unknown."""


class RowsRefused(Exception):
  """Internal: a request was refused as a whole (nothing of it appended).

  ``bad`` maps the request's row indexes BigQuery named -> reason; empty when it named
  none (then ``reason`` is why the request was refused).
  """

  def __init__(self, bad: dict, reason: str = ""):
    super().__init__(bad or reason)
    self.bad = bad
    self.reason = reason


class RequestRefused(Exception):
  """BigQuery refused one request of an append as a whole.

  ``head``: the indexes of its rows; ``bad``: {index: reason} of those it named (may be
  empty, then ``reason`` says why); ``unconfirmed``: every row not confirmed (``head``
  and the requests after it). BigQuery appends nothing of a refused request; the local
  emulator keeps its good rows (without moving the stream's offset), so the store
  checks what landed before it sends them again, on a new stream.
  """

  def __init__(self, head: list, bad: dict, reason: str, unconfirmed: list):
    super().__init__(f"{len(head)} rows refused: {bad or reason}")
    self.head, self.bad, self.reason, self.unconfirmed = head, bad, reason, unconfirmed


# ---------------------------------------------------------------------------
# Rows as protobuf


_message_cache: dict = {}


def _proto_type(bq_type: str) -> int:
  from google.protobuf import descriptor_pb2

  F = descriptor_pb2.FieldDescriptorProto
  types = {
    "STRING": F.TYPE_STRING,
    "JSON": F.TYPE_STRING,
    "INT64": F.TYPE_INT64,
    "INTEGER": F.TYPE_INT64,
    "TIMESTAMP": F.TYPE_INT64,
    "FLOAT64": F.TYPE_DOUBLE,
    "FLOAT": F.TYPE_DOUBLE,
    "BOOL": F.TYPE_BOOL,
    "BOOLEAN": F.TYPE_BOOL,
    "BYTES": F.TYPE_BYTES,
  }
  try:
    return types[bq_type.upper()]
  except KeyError:
    raise ValueError(f"no Storage Write API encoding for BigQuery type {bq_type}") from None


def row_message(table: Table):
  """(message class, DescriptorProto) of ``table``'s rows, built once per process."""
  key = (table.name, tuple((c.name, c.bq_type) for c in table.columns))
  cached = _message_cache.get(key)
  if cached is not None:
    return cached
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  F = descriptor_pb2.FieldDescriptorProto
  file_proto = descriptor_pb2.FileDescriptorProto(
    name=f"smartgrid_{table.name}_{len(_message_cache)}.proto", package="smartgrid", syntax="proto2"
  )
  message = file_proto.message_type.add(name=f"{table.name}_row")
  for number, column in enumerate(table.columns, 1):
    message.field.add(
      name=column.name, number=number, type=_proto_type(column.bq_type), label=F.LABEL_OPTIONAL
    )
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file_proto)
  cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"smartgrid.{table.name}_row"))
  descriptor = descriptor_pb2.DescriptorProto()
  cls.DESCRIPTOR.CopyToProto(descriptor)
  _message_cache[key] = (cls, descriptor)
  return cls, descriptor


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def timestamp_micros(value) -> int:
  """An ISO-8601 text (the stored format, 'YYYY-MM-DDTHH:MM:SS.ffffffZ') -> epoch microseconds."""
  if isinstance(value, (int, float)):
    return int(value)
  text = value.strip().replace(" ", "T", 1)
  if text.endswith(("Z", "z")):
    text = text[:-1] + "+00:00"
  parsed = dt.datetime.fromisoformat(text)
  if parsed.tzinfo is None:
    parsed = parsed.replace(tzinfo=dt.timezone.utc)
  delta = parsed - _EPOCH
  return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _converters(table: Table) -> list:
  out = []
  for column in table.columns:
    kind = column.bq_type.upper()
    if kind == "TIMESTAMP":
      out.append(timestamp_micros)
    elif kind in ("BOOL", "BOOLEAN"):
      out.append(bool)
    elif kind in ("INT64", "INTEGER"):
      out.append(int)
    elif kind in ("FLOAT64", "FLOAT"):
      out.append(float)
    else:
      out.append(None)
  return out


def _no_constant(name: str):
  raise ValueError(f"{name} is not JSON")


def _json_text(value: str) -> str:
  """Refuses what BigQuery's JSON parser refuses: a lone surrogate escape, NaN, Infinity."""
  parsed = json.loads(value, parse_constant=_no_constant)
  json.dumps(parsed, ensure_ascii=False, allow_nan=False).encode("utf-8")
  return value


def _check_row(table: Table, values: tuple) -> str | None:
  for column, value in zip(table.columns, values):
    if value is None:
      if column.required:
        return f"invalid at {column.name}: Missing required field: {column.name}."
    elif column.bq_type.upper() == "JSON":
      try:
        _json_text(value)
      except (ValueError, TypeError, UnicodeError) as e:
        return (
          f"invalid at {column.name}: not a JSON value BigQuery accepts: {type(e).__name__}: {e}"
        )
  return None


def encode_rows(
  table: Table, rows: Sequence[tuple], written_at: str
) -> tuple[list[bytes | None], dict[int, str]]:
  """Rows -> (serialized rows, None where refused; {index: reason} of the refused ones).

  Rows BigQuery would refuse (a REQUIRED column without a value, JSON it cannot parse,
  a value of the wrong type) are refused here, so a request is seldom refused as a whole.
  """
  cls, _ = row_message(table)
  names = table.names
  convert = _converters(table)
  encoded: list[bytes | None] = []
  refused: dict[int, str] = {}
  for i, row in enumerate(rows):
    values = stored(row) + (written_at,)
    problem = _check_row(table, values)
    if problem is not None:
      encoded.append(None)
      refused[i] = problem
      continue
    try:
      fields = {}
      for name, f, value in zip(names, convert, values):
        if value is not None:
          fields[name] = f(value) if f is not None else value
      encoded.append(cls(**fields).SerializeToString())
    except (ValueError, TypeError, OverflowError, UnicodeError) as e:
      encoded.append(None)
      refused[i] = (
        f"invalid: cannot encode the row for the Storage Write API: {type(e).__name__}: {e}"
      )
  return encoded, refused


def request_chunks(sizes: Sequence[int], max_bytes: int = MAX_REQUEST_BYTES) -> list[list[int]]:
  """Consecutive index groups of at most ``max_bytes`` serialized bytes (a larger row alone)."""
  from transforms.sinks.chunks import chunk_indexes  # the same grouping as insertAll's, no row cap

  return chunk_indexes(
    [size + _ROW_FRAMING_BYTES for size in sizes], max_rows=max(1, len(sizes)), max_bytes=max_bytes
  )


# ---------------------------------------------------------------------------
# One stream


def is_connection_error(exc: BaseException) -> bool:
  """The call broke off (or never started): its requests may or may not have landed."""
  import grpc
  from google.api_core import exceptions as gexc

  if isinstance(
    exc,
    (
      gexc.ServiceUnavailable,
      gexc.DeadlineExceeded,
      gexc.Cancelled,
      gexc.InternalServerError,
      gexc.TooManyRequests,
      gexc.Aborted,
      gexc.Unknown,
      gexc.RetryError,
      ConnectionError,
      TimeoutError,
    ),
  ):
    return True
  return isinstance(exc, grpc.RpcError)


def _resendable(exc: BaseException) -> bool:
  """A failed append call whose requests go again at the same offsets (see ``StreamWriter``)."""
  return not isinstance(exc, (StreamGone, RowsRefused)) and is_connection_error(exc)


class StreamWriter:
  """Appends rows to one COMMITTED stream of one table at explicit offsets.

  ``next_offset`` is the offset of the next row; it only moves when BigQuery confirms
  a request (success or ALREADY_EXISTS).
  """

  def __init__(
    self,
    client,
    table_path: str,
    table: Table,
    *,
    append_deadline_s: float = 30.0,
    call_timeout_s: float = 20.0,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    stream_name: str | None = None,
    next_offset: int = 0,
  ):
    from google.cloud.bigquery_storage_v1 import types

    self._client = client
    self._types = types
    self.table = table
    self._descriptor = row_message(table)[1]
    self._append_deadline_s = append_deadline_s
    self._call_timeout_s = call_timeout_s
    self._max_request_bytes = max_request_bytes
    self._sleep = sleep
    self._clock = clock
    self.calls = 0  # AppendRows calls made (tests, benchmarks)
    self.already_existed = 0  # requests BigQuery had already applied (lost responses)
    if stream_name is not None:
      # Resumed from keyed state: a stream this key made earlier, at the offset confirmed then.
      self.name, self.next_offset = stream_name, next_offset
      return
    stream = client.create_write_stream(
      parent=table_path,
      write_stream=types.WriteStream(type_=types.WriteStream.Type.COMMITTED),
      timeout=call_timeout_s,
    )
    self.name = stream.name
    self.next_offset = 0
    _LOGGER.info("%s: write stream %s", table.name, self.name)

  def _request(self, offset: int, rows: list):
    t = self._types
    return t.AppendRowsRequest(
      write_stream=self.name,
      offset=offset,
      proto_rows=t.AppendRowsRequest.ProtoData(
        rows=t.ProtoRows(serialized_rows=rows),
        writer_schema=t.ProtoSchema(proto_descriptor=self._descriptor),
      ),
    )

  def append(self, rows: Sequence[bytes], *, singles: bool = False) -> None:
    """Appends ``rows`` in order, each request confirmed before this returns.

    ``singles``: one row per request (to find the row of a request refused without
    row indexes). Raises ``RequestRefused`` when BigQuery refuses a request: the rows
    of earlier requests are confirmed, the others (``unconfirmed``) are not.
    """
    if singles:
      queue = [[i] for i in range(len(rows))]
    else:
      queue = request_chunks([len(r) for r in rows], self._max_request_bytes)
    give_up_at = self._clock() + self._append_deadline_s
    while queue:  # _send returns early when a call ends before every answer: go on at once
      try:
        with_retries(
          lambda: self._send(queue, rows),
          _resendable,
          deadline_s=give_up_at - self._clock(),
          what=f"appending to {self.name}",
          sleep=self._sleep,
          clock=self._clock,
        )
      except RowsRefused as e:
        head = queue[0]
        raise RequestRefused(
          head=head,
          bad={head[i]: reason for i, reason in e.bad.items() if 0 <= i < len(head)},
          reason=e.reason,
          unconfirmed=[i for chunk in queue for i in chunk],
        ) from None
      except RetriesExhausted as e:
        raise StreamUncertain(
          f"{self.table.name}: {sum(map(len, queue))} rows unconfirmed on "
          f"{self.name} after {self._append_deadline_s:.0f}s: {e.__cause__}"
        ) from e.__cause__

  def _send(self, queue: list, rows: Sequence[bytes]) -> None:
    """One call carrying every queued request; pops each chunk BigQuery confirms."""
    requests = []
    offset = self.next_offset
    for chunk in queue:
      requests.append(self._request(offset, [rows[i] for i in chunk]))
      offset += len(chunk)
    self.calls += 1
    from google.api_core import exceptions as gexc

    try:
      responses = self._client.append_rows(
        iter(requests),
        retry=None,
        timeout=self._call_timeout_s,
        metadata=(("x-goog-request-params", f"write_stream={self.name}"),),
      )
      first = True
      for response in responses:
        self._confirm(queue, response, first)
        first = False
        if not queue:
          return
    except gexc.InvalidArgument as e:
      # The call was refused as a whole: a stream problem, or the content of the first
      # unconfirmed request (e.g. a JSON value BigQuery cannot parse).
      message = str(e)
      if any(w in message for w in _STREAM_WORDS):
        raise StreamGone(f"{self.name}: {message}") from e
      raise RowsRefused({}, f"invalid: {getattr(e, 'message', message)}") from e
    except (gexc.NotFound, gexc.FailedPrecondition) as e:
      raise StreamGone(f"{self.name}: {e}") from e
    if queue:
      raise ConnectionError(f"the call ended with {len(queue)} requests unanswered")

  def _confirm(self, queue: list, response, first: bool) -> None:
    code = response.error.code if "error" in response else 0
    if code == 0 or code == _ALREADY_EXISTS:
      if code == _ALREADY_EXISTS:
        self.already_existed += 1
      self.next_offset += len(queue.pop(0))
      return
    if response.row_errors:
      raise RowsRefused({e.index: f"invalid: {e.message}" for e in response.row_errors})
    if code == _OUT_OF_RANGE:
      if first:
        # Nothing before it failed in this call: the stream ends before the offset we hold.
        raise StreamGone(
          f"{self.name}: OUT_OF_RANGE at the confirmed end {self.next_offset}: "
          f"{response.error.message}"
        )
      # An earlier request of this call failed: send again from the first unconfirmed one.
      raise ConnectionError(f"OUT_OF_RANGE at {self.next_offset}: {response.error.message}")
    if code in _STREAM_GONE_CODES or (
      code == _INVALID_ARGUMENT and any(w in response.error.message for w in _STREAM_WORDS)
    ):
      raise StreamGone(f"{self.name}: code {code}: {response.error.message}")
    if code == _INVALID_ARGUMENT:
      raise RowsRefused({}, f"invalid: {response.error.message}")
    raise ConnectionError(f"append answered code {code}: {response.error.message}")

  def finalize(self) -> None:
    try:
      self._client.finalize_write_stream(name=self.name, timeout=self._call_timeout_s)
    except Exception as e:  # noqa: BLE001 - best effort: an unfinalized stream expires by itself
      _LOGGER.debug("finalizing %s: %s", self.name, e)
