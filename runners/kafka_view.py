"""The launchers' own view of Kafka: reachability, topics, end and committed offsets, outages.

Owns what the local launcher and the worker supervisor tell the user about Kafka:
- at start, one line with a hint when no broker answers (``unreachable_message``),
  checked with a plain TCP connect so the supervisor can check before it forks;
- topics that do not exist yet (said once, by the first worker only);
- outages while running: ``KafkaView.status()`` gives "Kafka unreachable since ...,
  retrying" for the progress line, and ``is_kafka_error`` tells a round that failed
  because of Kafka (retried with backoff) from one that failed for another reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time

from pipelines import smartgrid
from pipelines.options import SmartGridOptions
from transforms.kafka.client import open_consumer

_LOGGER = logging.getLogger(__name__)

# Names in an exception chain or a runner's wrapped traceback that mean "Kafka did not answer".
_KAFKA_OUTAGE_MARKERS = (
  "KafkaTimeoutError",
  "NoBrokersAvailable",
  "KafkaConnectionError",
  "KafkaUnavailableError",
  "NodeNotReadyError",
  "RequestTimedOutError",
  "NotLeaderForPartitionError",
  "LeaderNotAvailableError",
  "CoordinatorNotAvailableError",
  "NotCoordinatorError",
  "UnknownTopicOrPartitionError",
  "cannot reach Kafka",
  "Failed to get offsets",
  "BrokerNotAvailableError",
  "MetadataEmptyBrokerList",
  "NetworkExceptionError",
)


def is_kafka_error(exc: BaseException) -> bool:
  """Whether exc (or what it wraps, or its message: runners wrap DoFn errors) is Kafka's."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = f"{type(exc).__name__}: {exc}"
    if "OffsetGapError" in text:  # offsets that no longer exist: a decision, not an outage
      return False
    if any(m in text for m in _KAFKA_OUTAGE_MARKERS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def unreachable_message(bootstrap_servers: str) -> str | None:
  """None when some bootstrap server accepts a TCP connection, else one line with a hint."""
  for server in bootstrap_servers.split(","):
    host, _, port = server.rpartition(":")
    try:
      socket.create_connection((host, int(port)), timeout=3).close()
      return None
    except (OSError, ValueError):
      continue
  return (
    f"cannot reach Kafka at {bootstrap_servers}. Start the local broker with "
    f"./run_pipeline.sh broker start (its port is $KAFKA_PORT, 9092 when unset), or "
    f"point --bootstrap_servers at your brokers."
  )


def is_first_worker(o: SmartGridOptions) -> bool:
  """One process of --local_workers speaks for all of them (topics, 'nothing to read')."""
  return not o.partition_shard or o.partition_shard.startswith("0/")


class KafkaView:
  """A read-only consumer of the run's topics (this worker's share of the partitions).

  Thread-safe (the progress line and the rounds share it); every failed call marks
  Kafka as down until a call succeeds again.
  """

  def __init__(self, o: SmartGridOptions, request_timeout_ms: int = 10000):
    config = smartgrid.kafka_client_config(o)
    config.update(bootstrap_timeout_ms=10000, request_timeout_ms=request_timeout_ms)
    self._consumer = open_consumer(config)
    self._topics = (o.sensor_topic, o.meter_topic)
    self._shard = o.partition_shard
    self._lock = threading.Lock()
    self.down_since: float | None = None
    self.tps: list = []
    self.missing: list[str] = list(self._topics)
    self.refresh()

  def _call(self, fn):
    from kafka.errors import KafkaError

    with self._lock:
      try:
        result = fn()
      except KafkaError:
        if self.down_since is None:
          self.down_since = time.time()
          _LOGGER.warning("Kafka unreachable: retrying with backoff until it answers again")
        raise
      if self.down_since is not None:
        _LOGGER.warning("Kafka reachable again after %.0fs", time.time() - self.down_since)
        self.down_since = None
      return result

  def refresh(self) -> list[str]:
    """Lists the partitions of the topics that exist now; returns the missing topics."""
    from kafka import TopicPartition

    def listing():
      existing = self._consumer.topics()
      pairs = [
        (t, p)
        for t in self._topics
        if t in existing
        for p in sorted(self._consumer.partitions_for_topic(t) or ())
      ]
      return [t for t in self._topics if t not in existing], pairs

    self.missing, pairs = self._call(listing)
    self.tps = [TopicPartition(t, p) for t, p in smartgrid.shard_partitions(pairs, self._shard)]
    return self.missing

  def offsets(self) -> tuple[dict, dict]:
    tps = list(self.tps)

    def read():
      end = self._consumer.end_offsets(tps) if tps else {}
      return end, {tp: self._consumer.committed(tp) for tp in tps}

    return self._call(read)

  def status(self) -> str | None:
    if self.down_since is None:
      return None
    since = dt.datetime.fromtimestamp(self.down_since).strftime("%H:%M:%S")
    return f"Kafka unreachable since {since} ({time.time() - self.down_since:.0f}s), retrying"

  def mark_down(self) -> None:
    with self._lock:
      if self.down_since is None:
        self.down_since = time.time()

  def close(self) -> None:
    self._consumer.close(autocommit=False)
