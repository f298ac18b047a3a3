"""Opening Kafka clients: the one client config shape, ``new_consumer``, and a pool of idle
consumers (``lease_consumer`` / ``release_consumer``).

Every part that talks to Kafka (the reader's partition discovery and reads, the offset
committer, the launcher's Kafka view) takes the same config: the kafka-python
``KafkaConsumer`` keyword arguments that ``transforms.kafka.config.consumer_config``
builds from the servers, the group and the extra settings (``ClientConfig``). It is
picklable and safe to keep in a DoFn: secrets in it are ``FromEnv`` references, which
``new_consumer`` resolves in the process that opens the client, at that moment.

The pool keeps a few idle consumers per config in this process, so that the next user of
an equal config (the local launcher's next round, or the committer after offsets were
resolved) gets a connected client instead of bootstrapping a new one (a connection, an API
version exchange and a metadata round trip each), three times a round before the pool.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from transforms.kafka.config import materialize

_LOGGER = logging.getLogger(__name__)

ClientConfig = Mapping[str, Any]  # consumer_config(...)'s output; secrets as FromEnv references


class KafkaUnavailableError(RuntimeError):
  """The brokers could not be reached, or a topic does not exist."""


def check_client_config(config: ClientConfig, *, needs_group: bool = False) -> None:
  """Refuses a config that is not ``consumer_config``'s shape (a list of servers, auto-commit
  off), or has no group where one is needed (``needs_group``)."""
  servers = config.get("bootstrap_servers")
  if not isinstance(servers, list) or not servers:
    raise ValueError(
      "a Kafka client config needs bootstrap_servers as a list: build it with "
      "transforms.kafka.config.consumer_config"
    )
  if config.get("enable_auto_commit", True):
    raise ValueError(
      "a Kafka client config must turn auto-commit off (enable_auto_commit=False): "
      "build it with transforms.kafka.config.consumer_config"
    )
  if needs_group and not config.get("group_id"):
    raise ValueError("committing offsets needs a consumer group: set --group_id")


def open_consumer(config: ClientConfig):
  """A KafkaConsumer for config, its ``FromEnv`` secrets read now from this process's
  environment, its first topic metadata asked for at once (``without_bootstrap_backoff``).
  Its record batches are decoded in C (``transforms.kafka.decode.use_native_decoder``).
  The one place the project opens a kafka-python consumer; kafka-python's errors pass."""
  from kafka import KafkaConsumer

  from transforms.kafka.decode import use_native_decoder

  return use_native_decoder(without_bootstrap_backoff(KafkaConsumer(**materialize(config))))


def new_consumer(config: ClientConfig):
  """``open_consumer``, with ``KafkaUnavailableError`` when no broker answers in time."""
  from kafka.errors import KafkaError

  try:
    return open_consumer(config)
  except KafkaError as e:
    raise KafkaUnavailableError(
      f"cannot reach Kafka at {','.join(config['bootstrap_servers'])} within "
      f"{config.get('bootstrap_timeout_ms', 30000) / 1000:.0f}s: {type(e).__name__}: {e}"
    ) from None


def without_bootstrap_backoff(consumer):
  """consumer, its first request for topic metadata sent at once (returns it).

  kafka-python 3.0 counts its bootstrap's metadata request (for no topic) as a refresh, so
  the first request for the topics waits a whole retry backoff after it: 100 ms per new
  client, a fixed value (its ClusterMetadata is not given the consumer's
  ``retry_backoff_ms``), several times in a row at start-up. That is the start-up delay
  KAFKA-4024 removed from the Java client; this forgets the bootstrap's refresh time the
  same way. A failed refresh still backs off (its time is set again), and so do retries.
  A kafka-python without these attributes is left as it is.
  """
  cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
  if cluster is not None and hasattr(cluster, "_last_refresh_ms"):
    cluster._last_refresh_ms = 0
  return consumer


MAX_IDLE_PER_CONFIG = 2
_POOL_LOCK = threading.Lock()
_IDLE: dict[str, list] = {}  # config key -> idle consumers, opened by this process
_POOL_PID = [os.getpid()]


def _pool_key(config: ClientConfig) -> str:
  # FromEnv references compare by their repr (the variable's name), never by the secret.
  return repr(sorted((k, repr(v)) for k, v in config.items()))


def _idle_list(key: str) -> list:
  if _POOL_PID[0] != os.getpid():  # a forked child: its parent's sockets are not its own
    _IDLE.clear()
    _POOL_PID[0] = os.getpid()
  return _IDLE.setdefault(key, [])


def lease_consumer(config: ClientConfig):
  """A consumer for config, used by one caller at a time until ``release_consumer``: an idle
  one this process opened before for an equal config, or a new one (``new_consumer``)."""
  with _POOL_LOCK:
    idle = _idle_list(_pool_key(config))
    if idle:
      return idle.pop()
  return new_consumer(config)


def release_consumer(config: ClientConfig, consumer, *, reusable: bool = True) -> None:
  """Gives a leased consumer back: kept idle for the next lease (its assignment dropped), or
  closed when it is not ``reusable`` (it failed) or enough idle ones are kept."""
  if reusable:
    try:
      consumer.unsubscribe()  # drops the assignment and what was fetched for it
    except Exception as e:  # noqa: BLE001 - a client that cannot even do this is closed
      _LOGGER.debug("Kafka consumer not kept for reuse: %s", e)
      reusable = False
  with _POOL_LOCK:
    idle = _idle_list(_pool_key(config))
    if reusable and len(idle) < MAX_IDLE_PER_CONFIG:
      idle.append(consumer)
      return
  consumer.close(autocommit=False)


@atexit.register
def close_idle_consumers() -> None:
  """Closes every idle consumer of this process (at exit; tests call it to start clean)."""
  with _POOL_LOCK:
    consumers = [c for idle in _IDLE.values() for c in idle] if _POOL_PID[0] == os.getpid() else []
    _IDLE.clear()
  for consumer in consumers:
    try:
      consumer.close(autocommit=False)
    except Exception as e:  # noqa: BLE001 - closing at exit: nothing left to do about it
      _LOGGER.debug("closing an idle Kafka consumer: %s", e)
