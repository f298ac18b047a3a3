"""Test helpers that talk to the real broker with an independent kafka-python client."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic


def unique_topic(prefix: str = "t") -> str:
  return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(
  bootstrap: str, name: str, partitions: int = 1, configs: dict[str, str] | None = None
) -> str:
  """Creates a topic (with these topic-level ``configs``) and waits for its metadata."""
  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  try:
    admin.create_topics(
      [NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})]
    )
  finally:
    admin.close()
  wait_for(lambda: len(partitions_of(bootstrap, name)) == partitions, what=f"topic {name} metadata")
  return name


def partitions_of(bootstrap: str, topic: str) -> set[int]:
  c = KafkaConsumer(bootstrap_servers=bootstrap)
  try:
    return c.partitions_for_topic(topic) or set()
  finally:
    c.close()


def produce(
  bootstrap: str,
  topic: str,
  events: Iterable[tuple[bytes | str | None, Any]],
  *,
  partition: int | None = None,
  headers: list | None = None,
  timestamp_ms: int | None = None,
) -> list[tuple[int, int]]:
  """Writes keyed events (dict values become JSON) and returns their (partition, offset)."""
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
  try:
    futures = []
    for key, value in events:
      if isinstance(key, str):
        key = key.encode()
      if isinstance(value, (dict, list)):
        value = json.dumps(value).encode()
      elif isinstance(value, str):
        value = value.encode()
      futures.append(
        producer.send(
          topic,
          key=key,
          value=value,
          partition=partition,
          headers=headers,
          timestamp_ms=timestamp_ms,
        )
      )
    producer.flush()
    return [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
  finally:
    producer.close()


def transactional_producer(bootstrap: str, **config) -> KafkaProducer:
  """An idempotent kafka-python producer with a fresh transactional id, initialised."""
  producer = KafkaProducer(
    bootstrap_servers=bootstrap,
    transactional_id=f"tx-{uuid.uuid4().hex}",
    enable_idempotence=True,
    acks="all",
    **config,
  )
  producer.init_transactions()
  return producer


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
  c = KafkaConsumer(bootstrap_servers=bootstrap)
  try:
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
    return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
  finally:
    c.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
  c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
  try:
    return {
      p: c.committed(TopicPartition(topic, p)) for p in sorted(c.partitions_for_topic(topic) or ())
    }
  finally:
    c.close()


def wait_for(
  condition: Callable[[], Any],
  *,
  timeout: float = 60.0,
  interval: float = 0.1,
  what: str = "condition",
) -> Any:
  """Polls condition() until it is truthy; fails the test with `what` after timeout."""
  deadline = time.monotonic() + timeout
  while True:
    value = condition()
    if value:
      return value
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
    time.sleep(interval)


class FakeClock:
  """A clock and a sleep for retry tests: sleeping moves the clock, and is recorded."""

  def __init__(self, now: float = 0.0):
    self.now = now
    self.sleeps: list[float] = []

  def clock(self) -> float:
    return self.now

  def sleep(self, s: float) -> None:
    self.sleeps.append(s)
    self.now += s
