"""The old ingestion service's own producer against the local broker, then one batch run.

That service pins kafka-python 2.0.2 with ``api_version=(0, 10, 1)``, ``acks='all'``,
``retries=3`` and one request in flight, creates no topic (the broker does, on first use),
keys events by sensor or meter id, and retries without idempotence, so an event can sit at
two offsets. Kafka 4.x refuses those protocol versions: this runs on the 3.9.x broker only.
The client runs in a subprocess that sees only kafka-python 2.0.2 (tests/old_service.py).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest
from kafka import KafkaConsumer, TopicPartition

from tests import old_service, support
from tests.pipeline_support import committed, ends, query, run_to_end
from tests.test_codecs_integration import CODECS, batch_codecs, read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420), pytest.mark.kafka_versions("3")]

SENSORS, METERS, TWICE_EVERY = 240, 90, 7


def _read_back(bootstrap: str, topics: list[str], count: int) -> dict[tuple[str, int, int], tuple]:
  """(topic, partition, offset) -> (key, value) of every record, read with kafka-python 3."""
  consumer = KafkaConsumer(
    bootstrap_servers=bootstrap,
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    consumer_timeout_ms=10_000,
  )
  try:
    consumer.assign(
      [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
    )
    seen = {}
    for rec in consumer:
      key = (rec.topic, rec.partition, rec.offset)
      assert key not in seen, f"{key} delivered twice"
      seen[key] = (rec.key, rec.value)
      if len(seen) == count:
        break
    return seen
  finally:
    consumer.close()


@pytest.fixture(scope="module")
def old_client_run(kafka_bootstrap, kafka_broker):
  """The old producer's sends to two topics that do not exist before it writes."""
  sensor, meter = support.unique_topic("old-sensor"), support.unique_topic("old-meter")
  assert not support.partitions_of(kafka_bootstrap, sensor)
  assert not support.partitions_of(kafka_bootstrap, meter)
  sent = old_service.run(
    kafka_bootstrap, sensor, meter, sensors=SENSORS, meters=METERS, twice_every=TWICE_EVERY
  )
  return kafka_bootstrap, kafka_broker, sensor, meter, sent


def test_old_client_produces_to_auto_created_topics(old_client_run):
  bootstrap, broker, sensor, meter, sent = old_client_run
  copies = (SENSORS + METERS) + len(range(0, SENSORS + METERS, TWICE_EVERY))
  assert len(sent) == copies
  coords = [(s["topic"], s["partition"], s["offset"]) for s in sent]
  assert len(set(coords)) == len(coords), "two sends acknowledged at one offset"
  # The broker created both topics on first use, with its num.partitions.
  if broker is not None:
    assert len(support.partitions_of(bootstrap, sensor)) == broker.partitions
    assert len(support.partitions_of(bootstrap, meter)) == broker.partitions
  # The acknowledged offsets tile each partition from 0: nothing else was written.
  end = ends(bootstrap, sensor, meter)
  by_partition = Counter((t, p) for t, p, _ in coords)
  assert {tp: n for tp, n in by_partition.items()} == {tp: n for tp, n in end.items() if n}
  # Each record holds what was sent there, keyed by its sensor or meter id, and every
  # copy of a key went to one partition.
  stored = _read_back(bootstrap, [sensor, meter], len(sent))
  assert sorted(stored) == sorted(coords)
  partitions_of_key: dict[str, set] = {}
  for s in sent:
    key, value = stored[(s["topic"], s["partition"], s["offset"])]
    assert key == s["key"].encode() and json.loads(value) == s["event"]
    partitions_of_key.setdefault(s["key"], set()).add((s["topic"], s["partition"]))
  assert all(len(v) == 1 for v in partitions_of_key.values())
  # Some events really sit at two offsets (the case the pipeline has to absorb).
  twice = [eid for eid, n in Counter(s["event"]["event_id"] for s in sent).items() if n == 2]
  assert len(twice) >= len(range(0, SENSORS + METERS, TWICE_EVERY))


def test_one_batch_run_stores_every_event_id_once_and_commits_to_the_end(old_client_run, tmp_path):
  """Needs event_id de-duplication (one row per event_id) and naive/'Z' timestamps accepted."""
  bootstrap, _, sensor, meter, sent = old_client_run
  group = f"old-{uuid.uuid4().hex[:8]}"
  p = run_to_end(bootstrap, sensor, meter, group, tmp_path, timeout=300)
  assert p.proc.returncode == 0, p.tail()

  dead = query(p.db, "SELECT kafka_topic, kafka_partition, kafka_offset, * FROM dead_letters")
  assert dead == [], f"{len(dead)} dead letters, e.g. {dead[:3]}"
  for table, topic in (("sensor_readings", sensor), ("meter_readings", meter)):
    want = {s["event"]["event_id"] for s in sent if s["topic"] == topic}
    rows = Counter(r[0] for r in query(p.db, f"SELECT event_id FROM {table}"))
    doubled = {e: n for e, n in rows.items() if n > 1}
    assert not doubled, (
      f"{table}: {len(doubled)} event_ids stored more than once, e.g. {list(doubled)[:3]}"
    )
    assert set(rows) == want, (
      f"{table}: missing {sorted(want - set(rows))[:3]}, unexpected {sorted(set(rows) - want)[:3]}"
    )
  # Every copy, stored or not, is committed: the group is at the end of every partition
  # (a partition that never got a record may have no committed offset at all).
  got, end = committed(bootstrap, group, sensor, meter), ends(bootstrap, sensor, meter)
  assert set(got) == set(end)
  assert {tp: o for tp, o in got.items() if end[tp]} == {tp: o for tp, o in end.items() if o}
  assert all(got[tp] in (None, 0) for tp, o in end.items() if not o)


def test_old_client_gzip_message_sets_are_read_back_exactly(kafka_bootstrap, kafka_broker):
  """Its compressed sends are old-format (magic 1) gzip message sets; the broker stores them
  as record batches. ReadFromKafka reads every offset once, with its content."""
  sensor, meter = support.unique_topic("old-gzip-s"), support.unique_topic("old-gzip-m")
  sent = old_service.run(
    kafka_bootstrap, sensor, meter, sensors=150, meters=50, twice_every=0, compression="gzip"
  )
  assert len(sent) == 200
  if kafka_broker is not None:
    for topic in (sensor, meter):
      assert set(batch_codecs(kafka_broker, topic)) == {CODECS["gzip"]}
  for topic in (sensor, meter):
    want = {(s["partition"], s["offset"]): s for s in sent if s["topic"] == topic}
    records = read_all(kafka_bootstrap, topic)
    got = Counter((r.partition, r.offset) for r in records)
    assert set(got) == set(want) and set(got.values()) == {1}, (topic, len(got), len(want))
    for r in records:
      s = want[(r.partition, r.offset)]
      assert r.key == s["key"].encode() and json.loads(r.value) == s["event"]
