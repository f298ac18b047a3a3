"""The production store: BigQuery through google-cloud-bigquery streaming inserts.

A ``Store`` (see ``transforms.sinks.base``). ``open()`` creates the client (anonymous
credentials against an emulator endpoint, Application Default Credentials otherwise) and
the dataset and the three tables of ``transforms.sinks.schema`` when missing: REQUIRED
modes, day partitioning on ``partition_column``, clustering on ``cluster_columns``.

``write()`` sends rows with ``insert_rows_json`` and ``row_ids`` = ``topic-partition-offset``
(BigQuery's best-effort insertId de-duplication absorbs replays), in requests kept under
BigQuery's limits (rows and bytes). What BigQuery answers decides each row's fate:

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

import json
import logging
from typing import Iterable, Optional, Sequence

from transforms.sinks.schema import TABLES, Table

_LOGGER = logging.getLogger(__name__)

# tabledata.insertAll: 10 MB per request (HTTP), 50,000 rows, 500 recommended.
MAX_ROWS_PER_REQUEST = 500
MAX_BYTES_PER_REQUEST = 9_000_000
_ROW_OVERHEAD_BYTES = 40  # {"insertId": "...", "json": ...}, separators

# Per-row reasons BigQuery documents as retryable; 'stopped' is handled on its own.
TRANSIENT_ROW_REASONS = frozenset(
    {"backendError", "internalError", "timeout", "rateLimitExceeded", "quotaExceeded", "badGateway"})
# Reasons of a request-level error (403 included) that only ask to slow down or retry.
TRANSIENT_REQUEST_REASONS = frozenset(
    {"backendError", "internalError", "rateLimitExceeded", "quotaExceeded", "badGateway"})
# Request-level statuses that refuse the content, not the service: bisect to find the row.
_CONTENT_REFUSED_CODES = (400, 413)
_MAX_STOPPED_ROUNDS = 3


class TransientInsertError(RuntimeError):
  """BigQuery accepted the request but asked to retry some rows later."""


# ---------------------------------------------------------------------------
# Pure helpers (unit-tested without BigQuery)


def table_schema(table: Table) -> list:
  """The table's columns as BigQuery ``SchemaField``s (REQUIRED where the schema says so)."""
  from google.cloud import bigquery
  return [bigquery.SchemaField(c.name, c.bq_type, mode="REQUIRED" if c.required else "NULLABLE")
          for c in table.columns]


def table_resource(project: str, dataset: str, table: Table):
  """A ``bigquery.Table`` ready for ``create_table``: schema, day partitions, clustering."""
  from google.cloud import bigquery
  t = bigquery.Table(f"{project}.{dataset}.{table.name}", schema=table_schema(table))
  t.time_partitioning = bigquery.TimePartitioning(
      type_=bigquery.TimePartitioningType.DAY, field=table.partition_column)
  t.clustering_fields = list(table.cluster_columns)
  return t


_BOOL_COLUMNS = {name: frozenset(c.name for c in t.columns if c.bq_type in ("BOOL", "BOOLEAN"))
                 for name, t in TABLES.items()}


def json_row(table: Table, row: tuple, written_at: str) -> dict:
  """A pipeline row tuple -> the insertAll JSON object (None columns left out)."""
  values = table.row_dict(row, written_at)
  for name in _BOOL_COLUMNS[table.name]:
    if values.get(name) is not None:
      values[name] = bool(values[name])
  return {k: v for k, v in values.items() if v is not None}


def row_id(row: tuple) -> str:
  """insertId of a row: ``topic-partition-offset``, unique per Kafka record."""
  topic, partition, offset, _covers_from = row[-4:]
  return f"{topic}-{partition}-{offset}"


def payload_size(payload: dict, insert_id: str) -> int:
  """Bytes one row adds to an insertAll request body (as the client serialises it)."""
  return len(json.dumps(payload).encode("utf-8")) + len(insert_id) + _ROW_OVERHEAD_BYTES


def chunk_indexes(sizes: Sequence[int], max_rows: int = MAX_ROWS_PER_REQUEST,
                  max_bytes: int = MAX_BYTES_PER_REQUEST) -> list[list[int]]:
  """Consecutive index groups with at most max_rows rows and max_bytes bytes each.

  A row larger than max_bytes travels alone (BigQuery then refuses it, and only it).
  """
  if max_rows < 1 or max_bytes < 1:
    raise ValueError(f"max_rows and max_bytes must be >= 1, got {max_rows}, {max_bytes}")
  chunks: list[list[int]] = []
  current: list[int] = []
  current_bytes = 0
  for i, size in enumerate(sizes):
    if current and (len(current) >= max_rows or current_bytes + size > max_bytes):
      chunks.append(current)
      current, current_bytes = [], 0
    current.append(i)
    current_bytes += size
  if current:
    chunks.append(current)
  return chunks


def _describe(error: dict) -> str:
  reason = error.get("reason") or "unknown"
  location = error.get("location")
  message = error.get("message") or ""
  return f"{reason}{f' at {location}' if location else ''}: {message}".rstrip(": ")


def classify_insert_errors(errors: Iterable[dict], n_rows: int
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
    for_good = [e for e in row_errors
                if e.get("reason") != "stopped" and e.get("reason") not in TRANSIENT_ROW_REASONS]
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
  if isinstance(exc, (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway,
                      gexc.ServiceUnavailable, gexc.GatewayTimeout)):
    return True
  if isinstance(exc, gexc.NotFound):
    # A table created moments ago can answer 404 to inserts for a while; open() re-creates
    # it on the next attempt if it really is gone.
    return True
  if isinstance(exc, gexc.GoogleAPICallError):
    return bool(_request_reasons(exc) & TRANSIENT_REQUEST_REASONS)
  return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.ChunkedEncodingError,
                          auth_exceptions.TransportError, ConnectionError, TimeoutError))


def _describe_request_error(exc: BaseException) -> str:
  """A request-level refusal of one row -> 'reason: message' (BigQuery's own words)."""
  details = [e for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)]
  if details:
    return "; ".join(_describe({"reason": "invalid", **d}) for d in details)
  return f"invalid: {getattr(exc, 'message', None) or exc}"


def _content_refused(exc: BaseException) -> bool:
  from google.api_core import exceptions as gexc
  return (isinstance(exc, gexc.GoogleAPICallError) and exc.code in _CONTENT_REFUSED_CODES
          and not is_transient_error(exc))


# ---------------------------------------------------------------------------
# The store


class BigQueryStore:
  """A ``Store`` over one BigQuery dataset (created, with its tables, when missing)."""

  def __init__(self, project: str, dataset: str, *, api_endpoint: Optional[str] = None,
               location: Optional[str] = None, max_rows_per_request: int = MAX_ROWS_PER_REQUEST,
               max_bytes_per_request: int = MAX_BYTES_PER_REQUEST,
               request_timeout_s: float = 30.0, client_retry_s: float = 5.0):
    if not project or not dataset:
      raise ValueError(f"--sink: bigquery://PROJECT/DATASET needs both, got {project!r}/{dataset!r}")
    if not 1 <= max_rows_per_request <= 50_000:
      raise ValueError(f"max_rows_per_request must be in 1..50000, got {max_rows_per_request}")
    if not 1 <= max_bytes_per_request <= 10_000_000:
      raise ValueError(f"max_bytes_per_request must be in 1..10000000, got {max_bytes_per_request}")
    self.project = project
    self.dataset = dataset
    self.api_endpoint = api_endpoint
    self.location = location
    self.max_rows_per_request = max_rows_per_request
    self.max_bytes_per_request = max_bytes_per_request
    self.request_timeout_s = request_timeout_s
    self.client_retry_s = client_retry_s
    self._client = None
    self._tables_ready = False
    self.requests_sent = 0  # insertAll calls of this process (for tests and benchmarks)

  _CONFIG = ("project", "dataset", "api_endpoint", "location", "max_rows_per_request",
             "max_bytes_per_request", "request_timeout_s", "client_retry_s")

  def __getstate__(self):
    return {k: getattr(self, k) for k in self._CONFIG}  # never the client

  def __setstate__(self, state):
    self.__init__(**state)

  def __repr__(self):
    where = f" via {self.api_endpoint}" if self.api_endpoint else ""
    return f"BigQueryStore({self.project}.{self.dataset}{where})"

  def table_id(self, table: str) -> str:
    return f"{self.project}.{self.dataset}.{table}"

  # -- lifecycle

  def _make_client(self):
    from google.cloud import bigquery
    if self.api_endpoint:
      from google.api_core.client_options import ClientOptions
      from google.auth.credentials import AnonymousCredentials
      return bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                             client_options=ClientOptions(api_endpoint=self.api_endpoint),
                             location=self.location)
    return bigquery.Client(project=self.project, location=self.location)

  def _retry(self):
    from google.cloud import bigquery
    return bigquery.DEFAULT_RETRY.with_delay(initial=0.2, maximum=2.0).with_timeout(
        self.client_retry_s)

  def open(self) -> None:
    if self._client is None:
      self._client = self._make_client()
    self._ensure_tables()

  def _ensure_tables(self) -> None:
    from google.cloud import bigquery
    client = self._client
    ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
    if self.location:
      ds.location = self.location
    client.create_dataset(ds, exists_ok=True, retry=self._retry(), timeout=self.request_timeout_s)
    for table in TABLES.values():
      client.create_table(table_resource(self.project, self.dataset, table), exists_ok=True,
                          retry=self._retry(), timeout=self.request_timeout_s)
    self._tables_ready = True
    _LOGGER.info("BigQuery sink ready: %s (tables %s)", self, ", ".join(TABLES))

  def close(self) -> None:
    if self._client is not None:
      self._client.close()
      self._client = None
    self._tables_ready = False

  def is_transient(self, exc: BaseException) -> bool:
    return is_transient_error(exc)

  # -- writing

  def write(self, table: str, rows: list, written_at: str) -> list:
    if self._client is None or not self._tables_ready:
      self.open()
    schema = TABLES[table]
    payloads = [json_row(schema, row, written_at) for row in rows]
    ids = [row_id(row) for row in rows]
    sizes = [payload_size(p, i) for p, i in zip(payloads, ids)]
    rejected: dict[int, str] = {}
    for chunk in chunk_indexes(sizes, self.max_rows_per_request, self.max_bytes_per_request):
      self._insert(table, chunk, payloads, ids, rejected)
    return [(rows[i], rejected[i]) for i in sorted(rejected)]

  def _insert(self, table: str, indexes: list[int], payloads: list, ids: list,
              rejected: dict[int, str]) -> None:
    """Inserts rows[indexes]; records rows refused for good in ``rejected``; raises if transient."""
    todo = indexes
    for _ in range(_MAX_STOPPED_ROUNDS):
      try:
        self.requests_sent += 1
        errors = self._client.insert_rows_json(
            self.table_id(table), [payloads[i] for i in todo], row_ids=[ids[i] for i in todo],
            retry=self._retry(), timeout=self.request_timeout_s)
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
    raise TransientInsertError(f"{len(todo)} rows of {table} still stopped after "
                               f"{_MAX_STOPPED_ROUNDS} requests")
