"""Consumer configuration for the source: safe defaults, validation, redaction.

The reader never commits: auto-commit is forced off and cannot be turned on.
Secrets (SASL/SSL passwords, tokens) are never in the config that is pickled into
the pipeline: it holds ``FromEnv("NAME")`` references, which ``materialize()``
resolves from the environment of the process that opens the client (the worker, at
``setup()`` or first use). Copies for logs go through ``redact()``.

Metadata requests never create topics (``allow_auto_create_topics=False``): a broker
with ``auto.create.topics.enable=true`` would otherwise create a topic the pipeline
merely looked for, with the broker's default partition count.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

SECRET_MARKERS = ("password", "secret", "token", "sasl_oauth", "ssl_key", "credential")

DEFAULT_CONSUMER_CONFIG: dict[str, Any] = {
  "enable_auto_commit": False,
  "auto_offset_reset": "earliest",
  # Only committed transactional records; end offsets are then the last stable offset.
  "isolation_level": "read_committed",
  "max_poll_records": 2000,
  # One partition is read at a time: a larger fetch means fewer idle round trips.
  "max_partition_fetch_bytes": 8 * 1024 * 1024,
  "fetch_max_wait_ms": 100,
  "metrics_enabled": False,
  # A broker that cannot be reached fails the first call in bounded time.
  "bootstrap_timeout_ms": 30000,
  "request_timeout_ms": 30000,
  "allow_auto_create_topics": False,
}


class FromEnv(NamedTuple):
  """A setting read from the environment when a client is opened (never pickled as a value)."""

  name: str


def materialize(config: Mapping[str, Any]) -> dict[str, Any]:
  """config with every ``FromEnv`` replaced by the variable's value (None when unset)."""
  return {k: (os.environ.get(v.name) if isinstance(v, FromEnv) else v) for k, v in config.items()}


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of config that is safe to log."""
  return {
    k: ("***" if any(m in k.lower() for m in SECRET_MARKERS) else v) for k, v in config.items()
  }


def consumer_config(
  bootstrap_servers: str, group_id: str | None, overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
  """The kafka-python KafkaConsumer kwargs for the source (and the offset committer)."""
  overrides = dict(overrides or {})
  for forbidden in ("bootstrap_servers", "group_id"):
    if forbidden in overrides:
      raise ValueError(
        f"consumer_config must not set '{forbidden}': pass it as the argument of the same name"
      )
  if overrides.get("enable_auto_commit"):
    raise ValueError(
      "consumer_config: auto-commit must stay off (enable_auto_commit): offsets are "
      "committed by CommitOffsets only after the sink has the rows"
    )
  if not bootstrap_servers or not isinstance(bootstrap_servers, str):
    raise ValueError(
      f"bootstrap_servers must be 'host:port[,host:port...]', got {bootstrap_servers!r}"
    )
  config = {
    **DEFAULT_CONSUMER_CONFIG,
    **overrides,
    "bootstrap_servers": bootstrap_servers.split(","),
    "group_id": group_id,
  }
  config["enable_auto_commit"] = False
  return config
