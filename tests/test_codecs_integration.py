"""Every Kafka codec (none, gzip, snappy, lz4, zstd) written by two different clients and
read back by the project's ReadFromKafka, offset by offset, on every broker version.

kafka-python and confluent-kafka (librdkafka) build record batches differently (batch
sizes, how many records share one compressed wrapper, headers, when librdkafka gives up on
compression). Each test checks on the broker's own log segments that the batches really are
compressed with the codec under test, so it cannot pass on uncompressed data.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections import Counter
from collections.abc import Callable

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from confluent_kafka import Producer as ConfluentProducer
from kafka import KafkaProducer

from broker.kafka_broker import Broker
from tests import support
from transforms.kafka import KafkaRecord, ReadFromKafka

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Codec name -> the compression bits (attributes & 0x07) of a record batch.
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
PARTITIONS = 2

# name -> collected records. FnApiRunner runs the SDK worker in this process and the DoFn
# below is unpickled from this module, so it appends to these very lists.
_SINKS: dict[str, list] = {}


class _Collect(beam.DoFn):
  def __init__(self, name: str):
    self._name = name

  def process(self, element):
    _SINKS[self._name].append(element)


def read_all(bootstrap: str, topic: str) -> list[KafkaRecord]:
  """A bounded ReadFromKafka of the whole topic on FnApiRunner."""
  name = uuid.uuid4().hex
  _SINKS[name] = []
  p = beam.Pipeline(runner=FnApiRunner())
  _ = p | ReadFromKafka(bootstrap, topic, start="earliest", stop="end") | beam.ParDo(_Collect(name))
  p.run().wait_until_finish()
  return _SINKS.pop(name)


# ---------------------------------------------------------------------------
# What is written


Message = tuple[int, bytes | None, bytes, list[tuple[str, bytes]]]  # partition, key, value, headers


def messages(count: int = 300, tag: str = "") -> list[Message]:
  """Keyed JSON events, compressible like real ones, with a few edge cases among them:
  no key, an empty value, headers, and one value far larger than a producer batch."""
  out = []
  for i in range(count):
    key = None if i % 50 == 7 else f"meter-{i % 11}".encode()
    body = {
      "event_id": f"{tag}{i}",
      "meter_id": f"meter-{i % 11}",
      "customer_id": "customer-000042",
      "reading": 1000 + i * 0.25,
      "unit": "kWh",
      "timestamp": "2026-11-30T12:00:00Z",
    }
    value = json.dumps(body).encode()
    if i == 100:
      value = b""
    if i == 200:
      value = json.dumps({**body, "metadata": {"blob": "abc" * 70_000}}).encode()
    headers = [("source", b"codec-test"), ("n", str(i).encode())] if i % 3 == 0 else []
    out.append((i % PARTITIONS, key, value, headers))
  return out


def produce_kafka_python(
  bootstrap: str, topic: str, codec: str, msgs: list[Message]
) -> dict[tuple[int, int], Message]:
  producer = KafkaProducer(
    bootstrap_servers=bootstrap,
    acks="all",
    linger_ms=50,
    batch_size=64 * 1024,
    max_request_size=2 * 1024 * 1024,
    compression_type=None if codec == "none" else codec,
  )
  try:
    futures = [
      (m, producer.send(topic, key=m[1], value=m[2], partition=m[0], headers=m[3])) for m in msgs
    ]
    producer.flush()
    return {(f.get(timeout=30).partition, f.get(timeout=30).offset): m for m, f in futures}
  finally:
    producer.close()


def produce_confluent(
  bootstrap: str, topic: str, codec: str, msgs: list[Message]
) -> dict[tuple[int, int], Message]:
  producer = ConfluentProducer(
    {
      "bootstrap.servers": bootstrap,
      "compression.type": codec,
      "acks": "all",
      "enable.idempotence": True,
      "linger.ms": 50,
      "message.max.bytes": 2 * 1024 * 1024,
    }
  )
  acked: dict[tuple[int, int], Message] = {}
  errors = []

  def on_delivery(m):
    def callback(err, msg):
      if err is not None:
        errors.append(err)
      else:
        acked[(msg.partition(), msg.offset())] = m

    return callback

  for m in msgs:
    producer.produce(
      topic, key=m[1], value=m[2], partition=m[0], headers=m[3] or None, on_delivery=on_delivery(m)
    )
    producer.poll(0)
  assert producer.flush(30) == 0, "confluent-kafka left messages unsent"
  assert not errors, errors[:3]
  return acked


PRODUCERS: dict[str, Callable] = {
  "kafka-python": produce_kafka_python,
  "confluent-kafka": produce_confluent,
}


# ---------------------------------------------------------------------------
# What the broker stored


def batch_codecs(broker: Broker, topic: str) -> Counter:
  """codec bits -> number of batches in the topic's log segments (v2 batches and legacy
  message sets: both keep the magic byte at 16, the attributes right after the CRC)."""
  found: Counter = Counter()
  segments = sorted((broker.run_dir / "data").glob(f"{topic}-*/*.log"))
  assert segments, f"no log segment of {topic} under {broker.run_dir}"
  for segment in segments:
    data = segment.read_bytes()
    pos = 0
    while pos + 22 <= len(data):
      _, length = struct.unpack_from(">qi", data, pos)
      if length <= 0:
        break
      magic = data[pos + 16]
      attributes = struct.unpack_from(">h", data, pos + 21)[0] if magic == 2 else data[pos + 17]
      found[attributes & 0x07] += 1
      pos += 12 + length
  return found


# ---------------------------------------------------------------------------
# Checks


def assert_read_exactly(
  records: list[KafkaRecord], written: dict[tuple[int, int], Message], end: dict[int, int]
) -> None:
  """Every written offset exactly once with its key, value and headers, nothing else, and
  [covers_from, offset] tiling each partition from 0 to its end."""
  assert written, "nothing was written: the test would pass vacuously"
  got = Counter((r.partition, r.offset) for r in records)
  doubled = [c for c, n in got.items() if n > 1]
  assert not doubled, f"read twice: {sorted(doubled)[:10]}"
  missing, extra = set(written) - set(got), set(got) - set(written)
  assert not missing and not extra, (
    f"missing {sorted(missing)[:10]} ({len(missing)}), "
    f"unexpected {sorted(extra)[:10]} ({len(extra)})"
  )
  for r in records:
    _, key, value, headers = written[(r.partition, r.offset)]
    assert (r.key, r.value or b"") == (key, value), f"p{r.partition}@{r.offset}: content differs"
    assert [(k, bytes(v)) for k, v in r.headers] == headers, f"p{r.partition}@{r.offset}: headers"
  for p in range(PARTITIONS):
    mine = sorted((r for r in records if r.partition == p), key=lambda r: r.offset)
    expected_from = 0
    for r in mine:
      assert r.covers_from == expected_from, (p, r.offset, r.covers_from, expected_from)
      expected_from = r.offset + 1
    assert expected_from == end[p], f"p{p}: read up to {expected_from}, the log ends at {end[p]}"


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("client", list(PRODUCERS))
def test_codec_is_read_back_exactly(kafka_bootstrap, kafka_broker, make_topic, client, codec):
  topic = make_topic(PARTITIONS, f"codec-{codec}")
  written = PRODUCERS[client](kafka_bootstrap, topic, codec, messages(tag=f"{client}-{codec}-"))
  if kafka_broker is not None:  # a broker of our own: its log segments are readable here
    codecs = batch_codecs(kafka_broker, topic)
    assert set(codecs) == {CODECS[codec]}, f"batches by codec bits: {dict(codecs)}"
    # Several records share a batch, so a codec really decodes more than one record.
    assert sum(codecs.values()) < len(written) / 2, dict(codecs)

  records = read_all(kafka_bootstrap, topic)
  assert_read_exactly(records, written, support.end_offsets(kafka_bootstrap, topic))


def test_every_codec_and_both_clients_interleaved_on_one_topic(
  kafka_bootstrap, kafka_broker, make_topic
):
  """Batches of every codec from both clients follow each other in the same partitions."""
  topic = make_topic(PARTITIONS, "codec-mix")
  written: dict[tuple[int, int], Message] = {}
  for round_ in range(2):
    for codec in CODECS:
      for client, produce in PRODUCERS.items():
        written.update(
          produce(kafka_bootstrap, topic, codec, messages(60, tag=f"{round_}-{client}-{codec}-"))
        )
  if kafka_broker is not None:
    assert set(batch_codecs(kafka_broker, topic)) == set(CODECS.values())

  records = read_all(kafka_bootstrap, topic)
  assert len(written) == 2 * len(CODECS) * len(PRODUCERS) * 60
  assert_read_exactly(records, written, support.end_offsets(kafka_bootstrap, topic))
