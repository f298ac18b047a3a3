"""The compiled record decoder against kafka-python's own, on a real broker: the same topics
read by a stock kafka-python consumer and by the project's (``open_consumer``), in both
isolation levels, must give equal ``ConsumerRecord`` lists, field for field.

The topics hold what a fetch can carry: every codec from two producers (kafka-python and
librdkafka), committed and aborted transactions with their control batches, and a topic whose
broker stamps the time (LogAppendTime), where a record's timestamp is its batch's.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tests import support
from tests.test_codecs_integration import CODECS, PRODUCERS, messages
from transforms.kafka.client import open_consumer
from transforms.kafka.config import consumer_config
from transforms.kafka.decode import native_partition_records

pytestmark = [pytest.mark.integration, pytest.mark.all_kafka_versions, pytest.mark.timeout(240)]


def read_everything(consumer, topic: str) -> list:
  """Every record of topic from its start to its end offsets (for read_committed: the last
  stable offset), in the order poll returns them per partition."""
  parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
  consumer.assign(parts)
  consumer.seek_to_beginning(*parts)
  end = consumer.end_offsets(parts)
  out: dict[int, list] = {tp.partition: [] for tp in parts}
  deadline = time.monotonic() + 120
  while any(consumer.position(tp) < end[tp] for tp in parts):
    assert time.monotonic() < deadline, f"{topic}: not read to its end in 120 s"
    for tp, records in consumer.poll(timeout_ms=200).items():
      out[tp.partition].extend(records)
  return [r for p in sorted(out) for r in out[p]]


def both_ways(bootstrap: str, topic: str, isolation: str) -> tuple[list, list]:
  config = consumer_config(bootstrap, None, {"isolation_level": isolation})
  mine = open_consumer(config)
  stock = KafkaConsumer(
    bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation
  )
  try:
    assert mine._fetcher.PartitionRecords is native_partition_records()  # else stock vs stock
    assert stock._fetcher.PartitionRecords is not native_partition_records()
    return read_everything(stock, topic), read_everything(mine, topic)
  finally:
    mine.close(autocommit=False)
    stock.close(autocommit=False)


def produce_transactions(bootstrap: str, topic: str, partitions: int) -> tuple[int, int]:
  """Transactions of 5 records in every partition, every third one aborted.
  Returns (committed, aborted) record counts."""
  producer = support.transactional_producer(bootstrap, compression_type="lz4")
  counts = [0, 0]
  try:
    for n in range(9):
      producer.begin_transaction()
      for p in range(partitions):
        for i in range(5):
          producer.send(topic, key=b"k%d" % i, value=b"txn-%d-%d" % (n, i), partition=p)
      producer.flush()
      abort = n % 3 == 2
      (producer.abort_transaction if abort else producer.commit_transaction)()
      counts[abort] += 5 * partitions
  finally:
    producer.close()
  return counts[0], counts[1]


def test_codecs_clients_and_transactions_decode_alike(kafka_bootstrap, make_topic):
  topic = make_topic(2, "native")
  written = 0
  for codec in CODECS:
    for client, produce in PRODUCERS.items():
      written += len(produce(kafka_bootstrap, topic, codec, messages(40, tag=f"{client}-{codec}")))
  committed, aborted = produce_transactions(kafka_bootstrap, topic, 2)

  for isolation, expected in (
    ("read_committed", written + committed),
    ("read_uncommitted", written + committed + aborted),
  ):
    stock, native = both_ways(kafka_bootstrap, topic, isolation)
    assert len(stock) == expected, (isolation, len(stock), expected)
    assert native == stock, isolation
  assert any(r.headers for r in native) and any(r.key is None for r in native)


def test_log_append_time_is_the_batch_time(kafka_bootstrap):
  topic = support.create_topic(
    kafka_bootstrap,
    support.unique_topic("native-lat"),
    configs={"message.timestamp.type": "LogAppendTime"},
  )
  producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20)
  for i in range(50):
    producer.send(topic, value=b"%d" % i, timestamp_ms=1_000 + i)  # the broker replaces these
  producer.close()

  stock, native = both_ways(kafka_bootstrap, topic, "read_committed")
  assert len(stock) == 50
  assert native == stock
  assert {r.timestamp_type for r in native} == {1}
  assert min(r.timestamp for r in native) > 1_600_000_000_000
