"""Confluent-framed Avro values: the wire format and the writer schemas from a registry.

A framed value is byte 0, a 4-byte big-endian schema id, then the Avro body (the
Confluent wire format, which the old ingestion service sends). A JSON value never
starts with byte 0, so JSON and Avro may share a topic. ``AvroDecoder`` fetches the
writer's schema by id with confluent-kafka's ``SchemaRegistryClient`` (its own
bounded retries with backoff on connection errors and 408/429/5xx), parses it once
with fastavro and caches it by id; the decoded record then goes through the same
validation as a JSON event (``transforms.events``).

Failures are dead letters, never exceptions out of a bundle: a body that does not
decode is ``bad_avro``; an id the registry does not know is ``unknown_schema``; a
registry still unreachable after the retries is ``registry_unavailable``, and for
``cooldown_s`` after that, uncached ids fail at once instead of waiting out the
retries again for every record.

Credentials: basic auth from ``SCHEMA_REGISTRY_USERNAME`` / ``SCHEMA_REGISTRY_PASSWORD``,
read by ``open()`` on the worker (the DoFn's ``setup()``); the decoder pickles only its URL
and settings, never a secret.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from transforms.events import InvalidEvent

_LOGGER = logging.getLogger(__name__)

MAGIC_BYTE = 0
HEADER_BYTES = 5
USERNAME_ENV = "SCHEMA_REGISTRY_USERNAME"
PASSWORD_ENV = "SCHEMA_REGISTRY_PASSWORD"
_NOT_FOUND_CODES = (40403, 40401)  # schema not found, subject not found


def is_framed(value: bytes | None) -> bool:
  """True for a value in the Confluent wire format (it starts with the magic byte 0)."""
  return bool(value) and value[0] == MAGIC_BYTE


def frame(schema_id: int, body: bytes) -> bytes:
  """The Confluent wire format of an Avro body (for producers and tests)."""
  return bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big") + body


def registry_client_config(
  url: str, *, timeout_s: float, max_retries: int, retry_wait_ms: int, retry_max_wait_ms: int
) -> dict:
  """The SchemaRegistryClient configuration, credentials from the environment."""
  conf = {
    "url": url,
    "timeout": timeout_s,
    "max.retries": max_retries,
    "retries.wait.ms": retry_wait_ms,
    "retries.max.wait.ms": retry_max_wait_ms,
  }
  username, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
  if username or password:
    conf["basic.auth.user.info"] = f"{username or ''}:{password or ''}"
  return conf


class AvroDecoder:
  """Framed Avro bytes -> the decoded record (a dict); raises InvalidEvent."""

  def __init__(
    self,
    url: str,
    *,
    timeout_s: float = 5.0,
    max_retries: int = 3,
    retry_wait_ms: int = 200,
    retry_max_wait_ms: int = 2000,
    cooldown_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.url = url
    self._settings = dict(
      timeout_s=timeout_s,
      max_retries=max_retries,
      retry_wait_ms=retry_wait_ms,
      retry_max_wait_ms=retry_max_wait_ms,
    )
    self._cooldown_s = cooldown_s
    self._clock = clock
    self._client: SchemaRegistryClient | None = None
    self._schemas: dict[int, Any] = {}
    self._down_until = 0.0
    self._down_error = ""

  def __getstate__(self):
    # Only the URL and settings travel (no client, no credentials, no cache).
    return {"url": self.url, "settings": self._settings, "cooldown_s": self._cooldown_s}

  def __setstate__(self, state):
    self.__init__(state["url"], cooldown_s=state["cooldown_s"], **state["settings"])

  def open(self) -> AvroDecoder:
    if self._client is None:
      self._client = SchemaRegistryClient(registry_client_config(self.url, **self._settings))
    return self

  def remember(self, schema_id: int, schema: Any) -> None:
    """Caches a writer schema (a dict or JSON text) as if fetched: preloading, and tests."""
    self._schemas[schema_id] = fastavro.parse_schema(
      json.loads(schema) if isinstance(schema, str) else schema
    )

  def decode(self, value: bytes) -> Any:
    if len(value) < HEADER_BYTES:
      raise InvalidEvent("bad_avro", f"{len(value)} bytes: too short for the Confluent wire format")
    schema_id = int.from_bytes(value[1:HEADER_BYTES], "big")
    schema = self._schemas.get(schema_id)
    if schema is None:
      schema = self._fetch(schema_id)
    body = io.BytesIO(value)
    body.seek(HEADER_BYTES)
    try:
      record = fastavro.schemaless_reader(body, schema, None)
    except Exception as e:  # noqa: BLE001 - any failure to decode is this record's fault
      raise InvalidEvent(
        "bad_avro", f"schema id {schema_id}: {type(e).__name__}: {e}"[:300]
      ) from None
    if body.tell() != len(value):
      raise InvalidEvent(
        "bad_avro", f"schema id {schema_id}: {len(value) - body.tell()} bytes left after the record"
      )
    return record

  def _fetch(self, schema_id: int) -> Any:
    if self._clock() < self._down_until:
      raise InvalidEvent("registry_unavailable", f"schema id {schema_id}: {self._down_error}")
    if self._client is None:
      self.open()
    try:
      registered = self._client.get_schema(schema_id)
    except SchemaRegistryError as e:
      if e.http_status_code == 404 or e.error_code in _NOT_FOUND_CODES:
        raise InvalidEvent(
          "unknown_schema",
          f"schema id {schema_id} is not in the registry ({e.error_code}: {e.error_message})"[:300],
        ) from None
      self._went_down(f"HTTP {e.http_status_code} ({e.error_code}): {e.error_message}")
    except Exception as e:  # noqa: BLE001 - connection refused, timeout, DNS: after the retries
      self._went_down(f"{type(e).__name__}: {e}")
    if registered.schema_type not in (None, "AVRO"):
      raise InvalidEvent(
        "unknown_schema", f"schema id {schema_id} is a {registered.schema_type} schema, not Avro"
      )
    try:
      schema = fastavro.parse_schema(json.loads(registered.schema_str))
    except Exception as e:  # noqa: BLE001 - the registry holds a schema fastavro refuses
      raise InvalidEvent("bad_avro", f"schema id {schema_id} does not parse: {e}"[:300]) from None
    self._schemas[schema_id] = schema
    return schema

  def _went_down(self, error: str):
    self._down_until = self._clock() + self._cooldown_s
    self._down_error = f"registry {self.url} unreachable: {error}"[:300]
    _LOGGER.warning(
      "%s; records needing a new schema are dead letters for %.0f s",
      self._down_error,
      self._cooldown_s,
    )
    raise InvalidEvent("registry_unavailable", self._down_error)
