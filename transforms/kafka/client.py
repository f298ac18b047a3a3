"""Opening Kafka clients: the one client config shape, and ``new_consumer``.

Every part that talks to Kafka (the reader's partition discovery and reads, the offset
committer, the launcher's Kafka view) takes the same config: the kafka-python
``KafkaConsumer`` keyword arguments that ``transforms.kafka.config.consumer_config``
builds from the servers, the group and the extra settings (``ClientConfig``). It is
picklable and safe to keep in a DoFn: secrets in it are ``FromEnv`` references, which
``new_consumer`` resolves in the process that opens the client, at that moment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transforms.kafka.config import materialize

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


def new_consumer(config: ClientConfig):
  """A KafkaConsumer for config, its ``FromEnv`` secrets read now from this process's
  environment; ``KafkaUnavailableError`` when no broker answers in time."""
  from kafka import KafkaConsumer
  from kafka.errors import KafkaError

  try:
    return KafkaConsumer(**materialize(config))
  except KafkaError as e:
    raise KafkaUnavailableError(
      f"cannot reach Kafka at {','.join(config['bootstrap_servers'])} within "
      f"{config.get('bootstrap_timeout_ms', 30000) / 1000:.0f}s: {type(e).__name__}: {e}"
    ) from None
