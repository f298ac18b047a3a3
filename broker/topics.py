"""Explicit topic management: ``./run_pipeline.sh topics create|describe``.

Owns: creating the smart-grid topics (or any named ones) with a chosen partition
count, and describing them (partitions, leaders, log start and end offsets), with
kafka-python's admin client. The local broker also creates topics on first use
(``auto.create.topics.enable=true``, ``num.partitions=$KAFKA_PARTITIONS``); creating
them explicitly stays valid and is the way to get another partition count, or
topics on a broker that does not auto-create.

Command line::

    python -m broker.topics create [--partitions N] [--bootstrap_servers B] [topic ...]
    python -m broker.topics describe [--bootstrap_servers B] [topic ...]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from broker.kafka_broker import BrokerError, default_bootstrap, default_partitions

_LOGGER = logging.getLogger(__name__)

SMARTGRID_TOPICS = ("smartgrid-sensor-data", "smartgrid-meter-readings")
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
METADATA_DEADLINE_S = 30.0
BOOTSTRAP_TIMEOUT_MS = 10_000


class TopicError(RuntimeError):
  """A topic could not be created or described; the message says why."""


@dataclass
class PartitionInfo:
  partition: int
  leader: int
  log_start: int
  log_end: int


@dataclass
class TopicInfo:
  name: str
  exists: bool
  partitions: list[PartitionInfo] = field(default_factory=list)


def check_topic_names(topics: Iterable[str]) -> list[str]:
  """The names in order, without repeats; TopicError naming any that Kafka would refuse."""
  names = list(dict.fromkeys(topics))
  bad = [t for t in names if not _LEGAL_TOPIC.fullmatch(t) or t in (".", "..")]
  if bad:
    raise TopicError(
      f"invalid topic name(s) {', '.join(map(repr, bad))}: Kafka allows 1 to 249 "
      "characters of a-z, A-Z, 0-9, '.', '_' and '-'"
    )
  return names


def _admin(bootstrap: str):
  from kafka import KafkaAdminClient
  from kafka.errors import KafkaError

  try:
    return KafkaAdminClient(
      bootstrap_servers=bootstrap,
      request_timeout_ms=15000,
      bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
    )
  except KafkaError as e:
    raise TopicError(
      f"cannot reach Kafka at {bootstrap}: {e} "
      "(start the local broker with ./run_pipeline.sh broker start, or set "
      "KAFKA_PORT / --bootstrap_servers)"
    ) from None


def _partition_counts(bootstrap: str, topics: Sequence[str]) -> dict[str, int]:
  """topic -> partitions the cluster metadata lists (0 when it does not list the topic)."""
  from kafka import KafkaConsumer

  # A consumer's metadata request names no topic here, so it never auto-creates one.
  consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
  try:
    existing = consumer.topics()
    return {t: len(consumer.partitions_for_topic(t) or ()) if t in existing else 0 for t in topics}
  finally:
    consumer.close()


def create_topics(
  bootstrap: str, topics: Sequence[str], partitions: int, replication_factor: int = 1
) -> dict[str, tuple[bool, int]]:
  """Creates the topics that do not exist yet; waits until the metadata lists every one.

  Returns topic -> (created now, its partition count). An existing topic is left as it is,
  whatever its partition count."""
  from kafka.admin import NewTopic
  from kafka.errors import TopicAlreadyExistsError

  names = check_topic_names(topics)
  if partitions < 1:
    raise TopicError(f"--partitions must be >= 1, got {partitions}")
  if replication_factor < 1:
    raise TopicError(f"--replication_factor must be >= 1, got {replication_factor}")
  admin = _admin(bootstrap)
  try:
    existing = set(admin.list_topics())
    missing = [t for t in names if t not in existing]
    if missing:
      try:
        admin.create_topics(
          [
            NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
            for t in missing
          ]
        )
      except TopicAlreadyExistsError:
        # Another client (or auto-creation) won the race: the topic is there, which is the point.
        _LOGGER.info("some of %s were created meanwhile by another client", missing)
  finally:
    admin.close()
  counts = _wait_listed(bootstrap, names)
  return {t: (t in missing, counts[t]) for t in names}


def _wait_listed(bootstrap: str, topics: Sequence[str]) -> dict[str, int]:
  deadline = time.monotonic() + METADATA_DEADLINE_S
  while True:
    counts = _partition_counts(bootstrap, topics)
    if all(counts.values()):
      return counts
    if time.monotonic() > deadline:
      absent = [t for t, n in counts.items() if not n]
      raise TopicError(
        f"topic(s) {', '.join(absent)} not in the metadata of {bootstrap} "
        f"{METADATA_DEADLINE_S:.0f}s after creation"
      )
    time.sleep(0.2)


def describe_topics(bootstrap: str, topics: Sequence[str]) -> list[TopicInfo]:
  """Partitions, leaders and log start/end offsets of each topic (exists=False if missing)."""
  from kafka import KafkaConsumer, TopicPartition

  names = check_topic_names(topics)
  _admin(bootstrap).close()  # a clear error when the broker cannot be reached
  consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
  try:
    existing = consumer.topics()
    out = []
    for name in names:
      if name not in existing:
        out.append(TopicInfo(name, False))
        continue
      tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
      starts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
      cluster = consumer._client.cluster
      out.append(
        TopicInfo(
          name,
          True,
          [
            PartitionInfo(tp.partition, cluster.leader_for_partition(tp), starts[tp], ends[tp])
            for tp in tps
          ],
        )
      )
    return out
  finally:
    consumer.close()


def _print_description(infos: Sequence[TopicInfo]) -> None:
  for info in infos:
    if not info.exists:
      print(f"{info.name}: not found")
      continue
    total = sum(p.log_end - p.log_start for p in info.partitions)
    print(f"{info.name}: {len(info.partitions)} partition(s), {total} record(s) in the log")
    for p in info.partitions:
      print(f"  partition {p.partition}: leader {p.leader}, offsets [{p.log_start}, {p.log_end})")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    prog="run_pipeline.sh topics",
    description="Create or describe Kafka topics (default: the two smart-grid topics).",
  )
  ap.add_argument("action", choices=["create", "describe"])
  ap.add_argument("topics", nargs="*", help=f"topic names (default: {' '.join(SMARTGRID_TOPICS)})")
  ap.add_argument(
    "--partitions",
    type=int,
    default=None,
    help="create: partitions of each new topic (default: $KAFKA_PARTITIONS or 4)",
  )
  ap.add_argument(
    "--replication_factor",
    type=int,
    default=1,
    help="create: replicas of each new topic (default 1, the local broker)",
  )
  ap.add_argument(
    "--bootstrap_servers",
    default=None,
    help="Kafka brokers (default: 127.0.0.1:$KAFKA_PORT, i.e. 127.0.0.1:9092)",
  )
  a = ap.parse_intermixed_args(argv)  # topics may follow --partitions N
  logging.basicConfig(level=logging.WARNING)
  # kafka-python logs every refused connection; the one-line error below says it all.
  logging.getLogger("kafka").setLevel(logging.CRITICAL)
  try:
    bootstrap = a.bootstrap_servers or default_bootstrap()
    topics = a.topics or list(SMARTGRID_TOPICS)
    if a.action == "create":
      partitions = a.partitions if a.partitions is not None else default_partitions()
      for name, (created, n) in create_topics(
        bootstrap, topics, partitions, a.replication_factor
      ).items():
        print(
          f"{name}: created with {n} partition(s)"
          if created
          else f"{name}: already exists with {n} partition(s) (left as it is)"
        )
      return 0
    infos = describe_topics(bootstrap, topics)
    _print_description(infos)
    return 0 if all(i.exists for i in infos) else 1
  except (TopicError, BrokerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
