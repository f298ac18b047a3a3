"""The production store: BigQuery, through the Storage Write API or streaming inserts.

A ``Store`` (see ``transforms.sinks.base``). ``open()`` creates the clients (anonymous
credentials against an emulator endpoint, Application Default Credentials otherwise) and
the dataset and the three tables of ``transforms.sinks.schema`` when missing: REQUIRED
modes, day partitioning on ``partition_column``, clustering on ``cluster_columns`` (the
Kafka coordinates first), and a PRIMARY KEY on the Kafka coordinates, NOT ENFORCED (for
the optimizer). Creation tolerates a concurrent creator (another worker): a refusal is
retried, and a dataset or table that exists afterwards is fine.

Exactly once at any replay distance comes from three layers:

1. ``stored_offsets`` (the start-up reconciliation, ``transforms.reconcile``): offsets of a
   partition already in any table are skipped before parsing;
2. every ``write()`` first asks which of its rows BigQuery holds (sensor and meter rows by
   event_id, within the day partitions of the rows' event times and the clustered blocks
   of their Kafka partitions, since an event's copies share its key; dead letters by
   Kafka coordinates). A row stored at the same coordinates is a replay (absorbed);
   an event_id stored at other coordinates, or repeated within the write, is a later copy
   (``DuplicateEvent``: first copy wins). This also absorbs a bundle retried by a runner
   after its writes had landed;
3. within a write, ``--bigquery_write_method=storage_write`` (the default) appends to an
   application-created COMMITTED stream at explicit offsets (``bigquery_storage``), so a
   request sent again after a lost response is answered ALREADY_EXISTS and lands once.
   A stream that is gone, or a send left unconfirmed, drops the stream; the write is
   retried (2. again, then a new stream).

Keyed streams (``keyed_streams``, the storage_write path): ``WriteBatches`` moves the
batches to the global window and writes them with a stateful DoFn keyed by the batch key
((table, shard)). Its ``ReadModifyWriteState`` holds, per table the key writes (its own and
``dead_letters`` for what BigQuery refuses), the name and next offset of a COMMITTED stream
the key created; ``write_on_streams`` appends each batch there in ``process()`` and the
state moves only after BigQuery confirmed the append. The runner commits the state with the
bundle's output, so a retried bundle starts from the offsets the last successful bundle left:
its rows that the failed attempt stored are dropped by check 2, and an attempt that passed
check 2 while another attempt of the same bundle appended (a zombie worker) appends at the
offsets that attempt took and is answered ALREADY_EXISTS. Every ALREADY_EXISTS answer is
followed by a look-up of the rows it covered: when one is not stored, the state was behind
the stream with other rows at those offsets (the failed attempt appended a batch the retry
no longer sends), and the stream is dropped and the rows written on a new one. A stream that
is gone (finalized, expired, unknown) or ends before the state's offset (OUT_OF_RANGE) is
replaced the same way; the API tells no row count of a live COMMITTED stream (only
FinalizeWriteStream returns one, and it closes the stream), so resyncing means a new stream,
with check 2 in front of it.

What holds where: within one process (FnApiRunner rounds, each local worker) every append is
confirmed before its rows are acked, and its state lives as long as the round (the streams
a round's keys wrote are left, with their confirmed ends, to the next round's keys in the
same process, so rounds do not each create streams against CreateWriteStream's quota): lost
responses, connection drops and outages are absorbed by 3, restarts by 1 and 2 (a failed
bundle fails the round there; nothing unwritten was committed). Dataflow retries a failed
bundle: the retry resumes the key's stream at the committed offsets, as above. Flink
restarts from its last checkpoint: the state of every key goes back to it, and the batches
since then come again; check 2 drops what was stored and the look-up after ALREADY_EXISTS
moves a key that is behind to a new stream. A savepoint restart or a Dataflow ``--update``
keeps the state, so each key resumes its stream (replaced when it expired, after 3 idle days).
What does not hold: a zombie attempt whose batches differ from the retry's (a runner that
replays a bundle with other batches) and that appends past the retry's end can still double
rows both attempts checked at the same time; the look-up after ALREADY_EXISTS relies on rows
being visible to a query once their append is confirmed (true for committed streams and for
the emulator).

``--bigquery_write_method=streaming_inserts`` sends rows with ``insert_rows_json`` and
``row_ids`` = ``topic-partition-offset`` (a hash of the topic when that would pass 128
characters), in requests kept under BigQuery's limits (rows and bytes). What BigQuery
answers decides each row's fate:

- per-row ``stopped``: the row was fine but its request was refused because of another
  row; it is resent in a follow-up request without the bad rows;
- per-row transient reasons (``backendError``, ``timeout``, ...): the write raises
  ``TransientInsertError``, so ``WriteBatches`` retries it with backoff (rows already
  inserted are absorbed by their insertIds);
- any other per-row reason (``invalid``, ...): rejected for good, returned as
  ``(row, "reason at location: message")`` for the dead-letter table;
- a request refused as a whole (400/413, e.g. a value the JSON decoder rejects): the
  request is split in halves until the offending row is alone, which is then rejected;
- 429, 5xx, rate-limit 403s, connection errors and timeouts: transient (``is_transient``).

The client gets a short retry of its own (``client_retry_s``): ``WriteBatches`` owns the
retry loop and its deadline, and the library's default would retry for ten minutes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from transforms.rows import DEAD_LETTER_ROW, ROW_TYPES, coordinates, partition_of
from transforms.sinks import chunks
from transforms.sinks.base import DuplicateEvent
from transforms.sinks.schema import DEAD_LETTERS, TABLES, Table

_LOGGER = logging.getLogger(__name__)

# tabledata.insertAll: 10 MB per request (HTTP), 50,000 rows, 500 recommended.
MAX_ROWS_PER_REQUEST = 500
MAX_BYTES_PER_REQUEST = 9_000_000
_ROW_OVERHEAD_BYTES = 40  # {"insertId": "...", "json": ...}, separators

# Per-row reasons BigQuery documents as retryable; 'stopped' is handled on its own.
TRANSIENT_ROW_REASONS = frozenset(
  {"backendError", "internalError", "timeout", "rateLimitExceeded", "quotaExceeded", "badGateway"}
)
# Reasons of a request-level error (403 included) that only ask to slow down or retry.
TRANSIENT_REQUEST_REASONS = frozenset(
  {"backendError", "internalError", "rateLimitExceeded", "quotaExceeded", "badGateway"}
)
# Request-level statuses that refuse the content, not the service: bisect to find the row.
_CONTENT_REFUSED_CODES = (400, 413)
_MAX_STOPPED_ROUNDS = 3
MAX_INSERT_ID_CHARS = 128
WRITE_METHODS = ("storage_write", "streaming_inserts")
# The emulator answers one of two concurrent creators 400 "Failed to commit DuckLake transaction".
_CREATE_ATTEMPTS = 8


class TransientInsertError(RuntimeError):
  """BigQuery accepted the request but asked to retry some rows later."""


# ---------------------------------------------------------------------------
# Pure helpers (unit-tested without BigQuery)


def table_schema(table: Table) -> list:
  """The table's columns as BigQuery ``SchemaField``s (REQUIRED where the schema says so)."""
  from google.cloud import bigquery

  return [
    bigquery.SchemaField(c.name, c.bq_type, mode="REQUIRED" if c.required else "NULLABLE")
    for c in table.columns
  ]


def table_resource(project: str, dataset: str, table: Table):
  """A ``bigquery.Table`` ready for ``create_table``: schema, day partitions, clustering."""
  from google.cloud import bigquery

  t = bigquery.Table(f"{project}.{dataset}.{table.name}", schema=table_schema(table))
  t.time_partitioning = bigquery.TimePartitioning(
    type_=bigquery.TimePartitioningType.DAY, field=table.partition_column
  )
  t.clustering_fields = list(table.cluster_columns)
  t.table_constraints = bigquery.table.TableConstraints(
    primary_key=bigquery.table.PrimaryKey(columns=list(table.primary_key)), foreign_keys=[]
  )
  return t


_BOOL_COLUMNS = {
  name: frozenset(c.name for c in t.columns if c.bq_type in ("BOOL", "BOOLEAN"))
  for name, t in TABLES.items()
}


def json_row(table: Table, row: tuple, written_at: str) -> dict:
  """A pipeline row tuple -> the insertAll JSON object (None columns left out)."""
  values = table.row_dict(row, written_at)
  for name in _BOOL_COLUMNS[table.name]:
    if values.get(name) is not None:
      values[name] = bool(values[name])
  return {k: v for k, v in values.items() if v is not None}


def row_id(row: tuple) -> str:
  """insertId of a row: ``topic-partition-offset``, unique per Kafka record.

  A Kafka topic name may have 249 characters, an insertId at most 128: a topic that would
  pass the limit is replaced by the SHA-256 of its name (hex), still unique per record.
  """
  topic, partition, offset = coordinates(row)
  rid = f"{topic}-{partition}-{offset}"
  if len(rid) <= MAX_INSERT_ID_CHARS:
    return rid
  return f"{hashlib.sha256(topic.encode('utf-8')).hexdigest()}-{partition}-{offset}"


def payload_size(payload: dict, insert_id: str) -> int:
  """Bytes one row adds to an insertAll request body (as the client serialises it)."""
  return len(json.dumps(payload).encode("utf-8")) + len(insert_id) + _ROW_OVERHEAD_BYTES


def chunk_indexes(
  sizes: Sequence[int], max_rows: int = MAX_ROWS_PER_REQUEST, max_bytes: int = MAX_BYTES_PER_REQUEST
) -> list[list[int]]:
  """insertAll's request chunks (transforms/sinks/chunks.py, shared with the Storage Write API)."""
  return chunks.chunk_indexes(sizes, max_rows, max_bytes)


def _describe(error: dict) -> str:
  reason = error.get("reason") or "unknown"
  location = error.get("location")
  message = error.get("message") or ""
  return f"{reason}{f' at {location}' if location else ''}: {message}".rstrip(": ")


def classify_insert_errors(
  errors: Iterable[dict], n_rows: int
) -> tuple[dict[int, str], list[int], dict[int, str]]:
  """insertAll's per-row errors -> (rejected {index: reason}, stopped [index], transient {index: reason}).

  Rows without an entry were inserted. A row is rejected when any of its errors has a
  reason that is neither 'stopped' nor transient; transient when its worst reason is a
  transient one; stopped when 'stopped' is all it got.
  """
  rejected: dict[int, str] = {}
  transient: dict[int, str] = {}
  stopped: list[int] = []
  for entry in errors:
    index = entry.get("index")
    if not isinstance(index, int) or not 0 <= index < n_rows:
      raise ValueError(f"insertAll returned an error for row {index!r} of {n_rows}: {entry}")
    row_errors = entry.get("errors") or [{"reason": "unknown", "message": "no detail"}]
    for_good = [
      e
      for e in row_errors
      if e.get("reason") != "stopped" and e.get("reason") not in TRANSIENT_ROW_REASONS
    ]
    retry_later = [e for e in row_errors if e.get("reason") in TRANSIENT_ROW_REASONS]
    if for_good:
      rejected[index] = "; ".join(_describe(e) for e in for_good)
    elif retry_later:
      transient[index] = "; ".join(_describe(e) for e in retry_later)
    else:
      stopped.append(index)
  return rejected, sorted(stopped), transient


def _request_reasons(exc: BaseException) -> set:
  try:
    return {e.get("reason") for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)}
  except (TypeError, AttributeError):
    return set()


def is_transient_error(exc: BaseException) -> bool:
  """True for failures worth retrying: 429, 5xx, rate limits, connection errors, timeouts."""
  import requests.exceptions
  from google.api_core import exceptions as gexc
  from google.auth import exceptions as auth_exceptions

  if isinstance(exc, TransientInsertError):
    return True
  if isinstance(exc, gexc.RetryError):  # the client's own short retry ran out
    cause = exc.cause
    return cause is None or is_transient_error(cause)
  if isinstance(exc, requests.exceptions.SSLError):
    return False  # a certificate problem does not heal by waiting
  if isinstance(
    exc,
    (
      gexc.TooManyRequests,
      gexc.InternalServerError,
      gexc.BadGateway,
      gexc.ServiceUnavailable,
      gexc.GatewayTimeout,
    ),
  ):
    return True
  if isinstance(exc, gexc.NotFound):
    # A table created moments ago can answer 404 to inserts for a while; open() re-creates
    # it on the next attempt if it really is gone.
    return True
  if isinstance(exc, gexc.GoogleAPICallError):
    return bool(_request_reasons(exc) & TRANSIENT_REQUEST_REASONS)
  return isinstance(
    exc,
    (
      requests.exceptions.ConnectionError,
      requests.exceptions.Timeout,
      requests.exceptions.ChunkedEncodingError,
      auth_exceptions.TransportError,
      ConnectionError,
      TimeoutError,
    ),
  )


def _describe_request_error(exc: BaseException) -> str:
  """A request-level refusal of one row -> 'reason: message' (BigQuery's own words)."""
  details = [e for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)]
  if details:
    return "; ".join(_describe({"reason": "invalid", **d}) for d in details)
  return f"invalid: {getattr(exc, 'message', None) or exc}"


def _content_refused(exc: BaseException) -> bool:
  from google.api_core import exceptions as gexc

  return (
    isinstance(exc, gexc.GoogleAPICallError)
    and exc.code in _CONTENT_REFUSED_CODES
    and not is_transient_error(exc)
  )


# ---------------------------------------------------------------------------
# The store


class BigQueryStore:
  """A ``Store`` over one BigQuery dataset (created, with its tables, when missing)."""

  def __init__(
    self,
    project: str,
    dataset: str,
    *,
    api_endpoint: str | None = None,
    location: str | None = None,
    max_rows_per_request: int = MAX_ROWS_PER_REQUEST,
    max_bytes_per_request: int = MAX_BYTES_PER_REQUEST,
    request_timeout_s: float = 30.0,
    client_retry_s: float = 5.0,
    write_method: str = "storage_write",
    storage_api_endpoint: str | None = None,
    append_deadline_s: float = 30.0,
  ):
    if not project or not dataset:
      raise ValueError(
        f"--sink: bigquery://PROJECT/DATASET needs both, got {project!r}/{dataset!r}"
      )
    if not 1 <= max_rows_per_request <= 50_000:
      raise ValueError(f"max_rows_per_request must be in 1..50000, got {max_rows_per_request}")
    if not 1 <= max_bytes_per_request <= 10_000_000:
      raise ValueError(f"max_bytes_per_request must be in 1..10000000, got {max_bytes_per_request}")
    if write_method not in WRITE_METHODS:
      raise ValueError(
        f"--bigquery_write_method: expected one of {WRITE_METHODS}, got {write_method!r}"
      )
    if write_method == "storage_write" and api_endpoint and not storage_api_endpoint:
      raise ValueError(
        "--bigquery_storage_api_endpoint: needed with --bigquery_api_endpoint when "
        "--bigquery_write_method=storage_write (the emulator's gRPC host:port)"
      )
    self.project = project
    self.dataset = dataset
    self.api_endpoint = api_endpoint
    self.location = location
    self.max_rows_per_request = max_rows_per_request
    self.max_bytes_per_request = max_bytes_per_request
    self.request_timeout_s = request_timeout_s
    self.client_retry_s = client_retry_s
    self.write_method = write_method
    self.storage_api_endpoint = storage_api_endpoint
    self.append_deadline_s = append_deadline_s
    self._client = None
    self._write_client = None
    self._writers: dict = {}  # table -> StreamWriter (``write``; keyed state has its own)
    self._dropped_streams: set = set()  # streams found gone or out of sync: never resumed
    self._keyed_ends: dict = {}  # stream name -> (table, confirmed end) of keyed writes
    self.streams_created = 0  # CreateWriteStream calls (tests: a retry reuses its stream)
    self.already_exists_answers = 0  # writes where some request was answered ALREADY_EXISTS
    self._tables_ready = False
    self.requests_sent = 0  # insertAll calls of this process (for tests and benchmarks)
    self.queries_run = 0  # reconciliation and duplicate checks (for tests and benchmarks)
    self.bytes_processed = 0  # what those queries scanned, as BigQuery reports it

  _CONFIG = (
    "project",
    "dataset",
    "api_endpoint",
    "location",
    "max_rows_per_request",
    "max_bytes_per_request",
    "request_timeout_s",
    "client_retry_s",
    "write_method",
    "storage_api_endpoint",
    "append_deadline_s",
  )

  def __getstate__(self):
    return {k: getattr(self, k) for k in self._CONFIG}  # never the client

  def __setstate__(self, state):
    self.__init__(**state)

  def __repr__(self):
    where = f" via {self.api_endpoint}" if self.api_endpoint else ""
    return f"BigQueryStore({self.project}.{self.dataset}{where}, {self.write_method})"

  def table_id(self, table: str) -> str:
    return f"{self.project}.{self.dataset}.{table}"

  # -- lifecycle

  def _make_client(self):
    from google.cloud import bigquery

    if self.api_endpoint:
      from google.api_core.client_options import ClientOptions
      from google.auth.credentials import AnonymousCredentials

      return bigquery.Client(
        project=self.project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=self.api_endpoint),
        location=self.location,
      )
    return bigquery.Client(project=self.project, location=self.location)

  def _make_write_client(self):
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient

    if self.storage_api_endpoint:
      import grpc
      from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
        BigQueryWriteGrpcTransport,
      )

      # Reconnect soon after an outage (gRPC's default backoff grows to two minutes).
      channel = grpc.insecure_channel(
        self.storage_api_endpoint,
        options=[
          ("grpc.initial_reconnect_backoff_ms", 200),
          ("grpc.max_reconnect_backoff_ms", 5000),
          ("grpc.max_send_message_length", 20 * 1024 * 1024),
        ],
      )
      return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=channel))
    return BigQueryWriteClient()

  def _retry(self):
    from google.cloud import bigquery

    return bigquery.DEFAULT_RETRY.with_delay(initial=0.2, maximum=2.0).with_timeout(
      self.client_retry_s
    )

  def open(self) -> None:
    if self._client is None:
      self._client = self._make_client()
    if self.write_method == "storage_write" and self._write_client is None:
      self._write_client = self._make_write_client()
    self._ensure_tables()

  def _create(self, what: str, create: Callable[[], object], exists: Callable[[], object]):
    """create(); when refused (a concurrent creator, a conflict), retried until it exists.
    Returns the created (or existing) resource."""
    import tenacity
    from google.api_core import exceptions as gexc

    def attempt():
      try:
        return create()
      except gexc.GoogleAPICallError as e:
        try:
          return exists()  # another creator won: fine
        except gexc.NotFound:
          _LOGGER.info("creating %s was refused (%s); retrying", what, e)
          raise e from None

    return tenacity.retry(
      retry=tenacity.retry_if_exception(
        lambda e: (
          isinstance(e, gexc.GoogleAPICallError)
          and not isinstance(e, (gexc.Forbidden, gexc.Unauthorized))
        )
      ),
      stop=tenacity.stop_after_attempt(_CREATE_ATTEMPTS),
      wait=tenacity.wait_random_exponential(multiplier=0.2, max=3.0),
      reraise=True,
    )(attempt)()

  def _ensure_tables(self) -> None:
    from google.cloud import bigquery

    client = self._client
    ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
    if self.location:
      ds.location = self.location
    opts = dict(retry=self._retry(), timeout=self.request_timeout_s)
    self._create(
      f"dataset {ds.dataset_id}",
      lambda: client.create_dataset(ds, exists_ok=True, **opts),
      lambda: client.get_dataset(ds.reference, **opts),
    )
    for table in TABLES.values():
      resource = table_resource(self.project, self.dataset, table)
      existing = self._create(
        f"table {table.name}",
        lambda r=resource: client.create_table(r, exists_ok=True, **opts),
        lambda r=resource: client.get_table(r.reference, **opts),
      )
      self._bring_up_to_date(existing, table, opts)
    self._tables_ready = True
    _LOGGER.info("BigQuery sink ready: %s (tables %s)", self, ", ".join(TABLES))

  def _bring_up_to_date(self, existing, table: Table, opts: dict) -> None:
    """A table made by an earlier version gets the columns it lacks (NULLABLE: BigQuery adds
    no REQUIRED column to a table with rows) and NULLABLE where the layout now allows NULL.
    Both are the schema changes BigQuery allows in place; nothing is dropped."""
    if existing is None or not getattr(existing, "schema", None):
      return
    from google.cloud import bigquery

    have = {f.name: f for f in existing.schema}
    wanted = {c.name: c for c in table.columns}
    schema = [
      bigquery.SchemaField(f.name, f.field_type, mode="NULLABLE")
      if f.name in wanted and f.mode == "REQUIRED" and not wanted[f.name].required
      else f
      for f in existing.schema
    ]
    schema += [
      bigquery.SchemaField(c.name, c.bq_type, mode="NULLABLE")
      for c in table.columns
      if c.name not in have
    ]
    if [(f.name, f.mode) for f in schema] == [(f.name, f.mode) for f in existing.schema]:
      return
    existing.schema = schema
    self._client.update_table(existing, ["schema"], **opts)
    _LOGGER.warning(
      "BigQuery table %s brought up to this version's layout: %s",
      table.name,
      [(f.name, f.mode) for f in schema if have.get(f.name) != f],
    )

  def close(self) -> None:
    for writer in self._writers.values():
      writer.finalize()
    self._writers = {}
    for name, (table, end) in self._keyed_ends.items():
      if name not in self._dropped_streams:
        _leave_idle_stream((self.project, self.dataset, table), name, end)
    self._keyed_ends = {}
    if self._client is not None:
      self._client.close()
      self._client = None
    self._write_client = None
    self._tables_ready = False

  def is_transient(self, exc: BaseException) -> bool:
    from transforms.sinks.bigquery_storage import StreamGone, StreamUncertain, is_connection_error

    if isinstance(exc, (StreamGone, StreamUncertain)):
      return True
    if self.write_method == "storage_write" and is_connection_error(exc):
      return True
    return is_transient_error(exc)

  # -- what is stored

  def _query(self, sql: str, params: list) -> list:
    from google.cloud import bigquery

    job = self._client.query(
      sql,
      job_config=bigquery.QueryJobConfig(query_parameters=params),
      retry=self._retry(),
      timeout=self.request_timeout_s,
    )
    rows = list(job.result(timeout=self.request_timeout_s))
    self.queries_run += 1
    self.bytes_processed += job.total_bytes_processed or 0
    return rows

  def stored_offsets(
    self, topic: str, partition: int, from_offset: int, until_offset: int | None = None
  ) -> set:
    """Offsets of ``topic``/``partition`` in [from_offset, until_offset) held in any table
    (a range on the leading clustering columns: only the blocks that hold it are read)."""
    from google.cloud import bigquery

    if self._client is None or not self._tables_ready:
      self.open()
    until = 2**63 - 1 if until_offset is None else until_offset
    sql = " UNION DISTINCT ".join(
      f"SELECT kafka_offset FROM `{self.table_id(t)}` WHERE kafka_topic = @topic "
      f"AND kafka_partition = @partition AND kafka_offset >= @from_offset "
      f"AND kafka_offset < @until_offset"
      for t in TABLES
    )
    params = [
      bigquery.ScalarQueryParameter("topic", "STRING", topic),
      bigquery.ScalarQueryParameter("partition", "INT64", partition),
      bigquery.ScalarQueryParameter("from_offset", "INT64", from_offset),
      bigquery.ScalarQueryParameter("until_offset", "INT64", until),
    ]
    return {r[0] for r in self._query(sql, params)}

  def _stored_by_event(self, table: Table, rows: list) -> dict:
    """(topic, partition, event_id) -> offset of the rows' event_ids already stored.

    Copies of an event carry its key, so they land on its Kafka partition, and its event
    time: the query reads only the day partitions of the rows' event times and, within
    them, the clustered blocks of the rows' Kafka partitions (not the whole day's table).
    """
    from google.cloud import bigquery

    from transforms.sinks.bigquery_storage import timestamp_micros

    column = table.dedup_column
    index = ROW_TYPES[table.name].index(column)
    time_index = ROW_TYPES[table.name].index(table.partition_column)
    micros = [timestamp_micros(row[time_index]) for row in rows]
    day = 86_400_000_000
    lo, hi = min(micros) // day * day, (max(micros) // day + 1) * day
    ids: dict = {}
    for row in rows:
      if isinstance(row[index], str):
        ids.setdefault(partition_of(row), set()).add(row[index])
    if not ids:
      return {}
    clauses = []
    params = [
      bigquery.ScalarQueryParameter("lo", "INT64", lo),
      bigquery.ScalarQueryParameter("hi", "INT64", hi),
    ]
    for i, ((topic, partition), event_ids) in enumerate(sorted(ids.items())):
      clauses.append(
        f"(kafka_topic = @t{i} AND kafka_partition = @p{i} AND {column} IN UNNEST(@ids{i}))"
      )
      params += [
        bigquery.ScalarQueryParameter(f"t{i}", "STRING", topic),
        bigquery.ScalarQueryParameter(f"p{i}", "INT64", partition),
        bigquery.ArrayQueryParameter(f"ids{i}", "STRING", sorted(event_ids)),
      ]
    sql = (
      f"SELECT kafka_topic, kafka_partition, {column}, kafka_offset "
      f"FROM `{self.table_id(table.name)}` "
      f"WHERE {table.partition_column} >= TIMESTAMP_MICROS(@lo) "
      f"AND {table.partition_column} < TIMESTAMP_MICROS(@hi) AND ({' OR '.join(clauses)})"
    )
    return {(r[0], r[1], r[2]): r[3] for r in self._query(sql, params)}

  def _stored_coordinates(self, table: Table, rows: list) -> set:
    """(topic, partition, offset) of the rows already in ``table`` (by clustered ranges)."""
    from google.cloud import bigquery

    spans: dict = {}
    for row in rows:
      topic, partition, offset = coordinates(row)
      lo, hi = spans.get((topic, partition), (offset, offset))
      spans[(topic, partition)] = (min(lo, offset), max(hi, offset))
    clauses, params = [], []
    for i, ((topic, partition), (lo, hi)) in enumerate(spans.items()):
      clauses.append(
        f"(kafka_topic = @t{i} AND kafka_partition = @p{i} "
        f"AND kafka_offset BETWEEN @lo{i} AND @hi{i})"
      )
      params += [
        bigquery.ScalarQueryParameter(f"t{i}", "STRING", topic),
        bigquery.ScalarQueryParameter(f"p{i}", "INT64", partition),
        bigquery.ScalarQueryParameter(f"lo{i}", "INT64", lo),
        bigquery.ScalarQueryParameter(f"hi{i}", "INT64", hi),
      ]
    sql = (
      f"SELECT kafka_topic, kafka_partition, kafka_offset FROM `{self.table_id(table.name)}` "
      f"WHERE {' OR '.join(clauses)}"
    )
    return {tuple(r.values()) for r in self._query(sql, params)}

  def _new_rows(self, table: Table, rows: list) -> tuple[list, list]:
    """Rows -> (rows to write, [(row, DuplicateEvent)]); replays of stored rows are dropped."""
    if table.dedup_column is None:
      stored = self._stored_coordinates(table, rows)
      return [row for row in rows if coordinates(row) not in stored], []
    stored = self._stored_by_event(table, rows)
    index = ROW_TYPES[table.name].index(table.dedup_column)
    fresh, duplicates, seen = [], [], {}
    for row in rows:
      event_id, where = row[index], coordinates(row)
      offset = stored.get((where[0], where[1], event_id))
      first = (where[0], where[1], offset) if offset is not None else seen.get(event_id)
      if event_id is None or first is None:  # no event_id: the store itself refuses the row
        seen[event_id] = where
        fresh.append(row)
      elif first != where:
        duplicates.append(
          (
            row,
            DuplicateEvent(
              f"{table.dedup_column} {event_id!r} is stored already ({first[0]}-{first[1]}@{first[2]})"
            ),
          )
        )
    return fresh, duplicates

  # -- writing

  def write(self, table: str, rows: list, written_at: str) -> list:
    if self._client is None or not self._tables_ready:
      self.open()
    schema = TABLES[table]
    if not rows:
      return []
    if table == DEAD_LETTERS.name:
      rows = [_fit_dead_letter(row) for row in rows]
    fresh, duplicates = self._new_rows(schema, rows)
    if not fresh:
      return duplicates
    if self.write_method == "storage_write":
      return duplicates + self._append(schema, fresh, written_at)
    return duplicates + self._insert_all(schema, fresh, written_at)

  @property
  def keyed_streams(self) -> bool:
    """True when ``WriteBatches`` should keep stream names and offsets in keyed state and
    write through ``write_on_streams`` (the Storage Write API path)."""
    return self.write_method == "storage_write"

  def _writer(self, table: Table, writers: dict | None = None):
    from transforms.sinks.bigquery_storage import StreamWriter

    writers = self._writers if writers is None else writers
    writer = writers.get(table.name)
    if writer is None:
      writer = StreamWriter(
        self._write_client,
        self._write_client.table_path(self.project, self.dataset, table.name),
        table,
        append_deadline_s=self.append_deadline_s,
        call_timeout_s=self.request_timeout_s,
      )
      self.streams_created += 1
      writers[table.name] = writer
    return writer

  def write_on_streams(
    self, table: str, rows: list, written_at: str, streams: dict
  ) -> tuple[list, dict]:
    """``write`` on the stream a key holds in its state: ``streams`` maps table -> (stream
    name, next offset) as the runner last committed it. Returns (the rows refused for good,
    the streams to commit with the bundle). Idempotent like ``write``: a retried bundle comes
    back with the old offsets, its rows already stored are dropped by the check, and an
    attempt running at the same time (a zombie that passed the check too) appends at the
    same offsets and is answered ALREADY_EXISTS. Rows answered ALREADY_EXISTS are looked up:
    if any is not stored, the state was behind the stream with other rows there (e.g. the
    first attempt appended a batch the retry no longer sends), so the stream is dropped and
    ``StreamGone`` raised; the retry checks again and appends to a new stream."""
    from transforms.sinks.bigquery_storage import StreamGone, StreamUncertain, StreamWriter

    if self._client is None or not self._tables_ready:
      self.open()
    schema = TABLES[table]
    if not rows:
      return [], streams
    if table == DEAD_LETTERS.name:
      rows = [_fit_dead_letter(row) for row in rows]
    fresh, duplicates = self._new_rows(schema, rows)
    if not fresh:
      return duplicates, streams
    writers: dict = {}
    held = streams.get(table)
    if held is None or held[0] in self._dropped_streams:
      held = _take_idle_stream((self.project, self.dataset, table))
    if held is not None:
      writers[table] = StreamWriter(
        self._write_client,
        "",
        schema,
        append_deadline_s=self.append_deadline_s,
        call_timeout_s=self.request_timeout_s,
        stream_name=held[0],
        next_offset=held[1],
      )
    try:
      existed = [0]
      refused = self._append(schema, fresh, written_at, writers, existed)
    except (StreamGone, StreamUncertain):
      if held is not None:
        self._dropped_streams.add(held[0])  # the retry must not resume it from the old state
      raise
    if existed[0]:
      self._check_already_existing(schema, [r for r, _ in refused], fresh, writers, held)
    after = dict(streams)
    writer = writers.get(table)
    if writer is None:  # a refused request left the stream's end unknown: the next batch starts one
      after.pop(table, None)
    else:
      after[table] = (writer.name, writer.next_offset)
      self._keyed_ends[writer.name] = (table, writer.next_offset)
    return duplicates + refused, after

  def _check_already_existing(
    self, schema: Table, refused: list, fresh: list, writers: dict, held: tuple | None
  ) -> None:
    """After ALREADY_EXISTS answers: every row sent must be stored, else the stream's rows
    at those offsets are other rows (the state was behind the stream): drop it, raise."""
    from transforms.sinks.bigquery_storage import StreamGone

    self.already_exists_answers += 1
    refused_at = {coordinates(r) for r in refused}
    sent = [r for r in fresh if coordinates(r) not in refused_at]
    stored = self._stored_coordinates(schema, sent) if sent else set()
    missing = [r for r in sent if coordinates(r) not in stored]
    if not missing:
      return
    for name in {w.name for w in writers.values()} | ({held[0]} if held else set()):
      self._dropped_streams.add(name)
    raise StreamGone(
      f"{schema.name}: {len(missing)} rows answered ALREADY_EXISTS are not stored "
      f"(the state was behind the stream), e.g. {coordinates(missing[0])}; a new stream "
      f"takes them"
    )

  def _append(
    self,
    table: Table,
    rows: list,
    written_at: str,
    writers: dict | None = None,
    existed: list | None = None,
  ) -> list:
    """Appends rows through the Storage Write API; returns [(row, reason)] refused for good.
    ``writers``: table -> StreamWriter to use (default: this store's own); ``existed[0]`` is
    increased by the requests answered ALREADY_EXISTS."""
    from transforms.sinks.bigquery_storage import (
      RequestRefused,
      StreamGone,
      StreamUncertain,
      encode_rows,
    )

    writers = self._writers if writers is None else writers
    encoded, refused = encode_rows(table, rows, written_at)
    pending = [i for i, e in enumerate(encoded) if e is not None]
    singles: list[int] = []  # rows of a request refused without naming its bad rows
    while pending or singles:
      batch, one_by_one = (singles, True) if singles else (pending, False)
      writer = self._writer(table, writers)
      before = writer.already_existed
      try:
        try:
          writer.append([encoded[i] for i in batch], singles=one_by_one)
        finally:
          if existed is not None:
            existed[0] += writer.already_existed - before
        if one_by_one:
          singles = []
        else:
          pending = []
        continue
      except (StreamGone, StreamUncertain):
        # Whatever landed is found by the next attempt's check; it appends to a new stream.
        writers.pop(table.name, None)
        raise
      except RequestRefused as e:
        writers.pop(table.name, None)  # see RequestRefused: its good rows may have landed
        for i, reason in e.bad.items():
          refused[batch[i]] = reason
        if not e.bad and len(e.head) == 1:
          refused[batch[e.head[0]]] = e.reason or "invalid"
        elif not e.bad:
          singles = [batch[i] for i in e.head]
        head = {batch[i] for i in e.head}
        rest = [batch[i] for i in e.unconfirmed if batch[i] not in refused]
        landed = self._landed(table, [rows[i] for i in rest if i in head])
        rest = [i for i in rest if coordinates(rows[i]) not in landed]
        if one_by_one:
          singles = [i for i in rest if i not in refused]
        else:
          pending = [i for i in rest if i not in set(singles)]
          singles = [i for i in singles if i in set(rest)]
    return [(rows[i], refused[i]) for i in sorted(refused)]

  def _landed(self, table: Table, rows: list) -> set:
    """Coordinates of ``rows`` that BigQuery holds (after a refused request; see RequestRefused)."""
    return self._stored_coordinates(table, rows) if rows else set()

  def _insert_all(self, schema: Table, rows: list, written_at: str) -> list:
    payloads = [json_row(schema, row, written_at) for row in rows]
    ids = [row_id(row) for row in rows]
    sizes = [payload_size(p, i) for p, i in zip(payloads, ids)]
    rejected: dict[int, str] = {}
    for chunk in chunk_indexes(sizes, self.max_rows_per_request, self.max_bytes_per_request):
      self._insert(schema.name, chunk, payloads, ids, rejected)
    return [(rows[i], rejected[i]) for i in sorted(rejected)]

  def _insert(
    self, table: str, indexes: list[int], payloads: list, ids: list, rejected: dict[int, str]
  ) -> None:
    """Inserts rows[indexes]; records rows refused for good in ``rejected``; raises if transient."""
    todo = indexes
    for _ in range(_MAX_STOPPED_ROUNDS):
      try:
        self.requests_sent += 1
        errors = self._client.insert_rows_json(
          self.table_id(table),
          [payloads[i] for i in todo],
          row_ids=[ids[i] for i in todo],
          retry=self._retry(),
          timeout=self.request_timeout_s,
        )
      except Exception as e:  # noqa: BLE001 - classified here, everything else re-raised
        from google.api_core import exceptions as gexc

        if isinstance(e, gexc.NotFound):
          self._tables_ready = False  # re-created by the next attempt's open()
          raise
        if not _content_refused(e):
          raise
        if len(todo) == 1:
          rejected[todo[0]] = _describe_request_error(e)
          return
        # The request as a whole was refused: find the offending rows by halves.
        _LOGGER.debug("%s refused a request of %d rows (%s); splitting it", table, len(todo), e)
        half = len(todo) // 2
        self._insert(table, todo[:half], payloads, ids, rejected)
        self._insert(table, todo[half:], payloads, ids, rejected)
        return
      bad, stopped, transient = classify_insert_errors(errors, len(todo))
      for local, reason in bad.items():
        rejected[todo[local]] = reason
      if transient:
        first = next(iter(transient.values()))
        raise TransientInsertError(f"{len(transient)} rows of {table} to retry, e.g. {first}")
      if not stopped:
        return
      todo = [todo[j] for j in stopped]
    raise TransientInsertError(
      f"{len(todo)} rows of {table} still stopped after {_MAX_STOPPED_ROUNDS} requests"
    )


# Keyed streams a closed store left behind (e.g. at the end of a FnApiRunner round), with
# the end its last confirmed append reached, per (project, dataset, table): a later key
# without a stream in its state resumes one instead of creating one (CreateWriteStream is
# capped at about 10,000 an hour per project and region, and local rounds are short). An
# end that is no longer right is harmless: the append is answered ALREADY_EXISTS (then the
# look-up) or OUT_OF_RANGE, and the key moves to a new stream.
_IDLE_STREAMS: dict = {}
_IDLE_LOCK = threading.Lock()


def _take_idle_stream(where: tuple) -> tuple | None:
  with _IDLE_LOCK:
    idle = _IDLE_STREAMS.get(where)
    return idle.pop() if idle else None


def _leave_idle_stream(where: tuple, name: str, end: int) -> None:
  with _IDLE_LOCK:
    _IDLE_STREAMS.setdefault(where, []).append((name, end))


# A dead letter's text columns are cut so that one row always fits one request.
_MAX_DEAD_LETTER_TEXT = 1_000_000


def _fit_dead_letter(row: tuple) -> tuple:
  """A dead_letters row with its raw text cut to ``_MAX_DEAD_LETTER_TEXT`` (marked truncated
  where the table has that column), so it can never exceed the request limit and loop."""
  names = DEAD_LETTER_ROW.columns
  values = list(row)
  cut = False
  for name in ("raw_value", "raw_key", "error"):
    if name in names:
      i = names.index(name)
      if isinstance(values[i], str) and len(values[i]) > _MAX_DEAD_LETTER_TEXT:
        values[i] = values[i][:_MAX_DEAD_LETTER_TEXT]
        cut = True
  if cut and "truncated" in names:
    values[names.index("truncated")] = True
  return tuple(values)
