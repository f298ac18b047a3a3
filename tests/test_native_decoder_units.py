"""The compiled record decoder (transforms.kafka.decode) against kafka-python's own, on the
same bytes: record batches built by kafka-python's builders (every codec, formats v1 and
v2, keys, values and headers drawn by hypothesis), decoded by the stock and the native
``PartitionRecords``, field for field. No broker: these are the bytes a fetch returns.
"""

from __future__ import annotations

import struct

import kafka
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.structs import TopicPartition

from transforms.kafka import decode

TP = TopicPartition("readings", 3)
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
NATIVE = decode.native_partition_records()


def test_the_pinned_libraries_get_the_native_decoder():
  # Without this the speed-up is lost silently, and every test below compares stock to stock.
  assert NATIVE is not None
  assert issubclass(NATIVE, Fetcher.PartitionRecords)
  assert kafka.__version__.startswith(decode.KAFKA_PYTHON_SERIES)


def test_another_kafka_python_series_keeps_its_own_decoder(monkeypatch):
  monkeypatch.setattr(kafka, "__version__", "3.1.0")
  assert decode.native_partition_records.__wrapped__() is None


Record = tuple  # (timestamp, key, value, headers)


def v2_batch(base: int, records: list[Record], codec: int, step: int = 1) -> bytes:
  """step > 1: offsets with gaps inside the batch, as compaction leaves them."""
  builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 30)
  for i, (ts, key, value, headers) in enumerate(records):
    builder.append(i * step, ts, key, value, headers)
  return _rebased(builder.build(), base)


def v1_batch(base: int, records: list[Record], codec: int) -> bytes:
  builder = LegacyRecordBatchBuilder(1, codec, 1 << 30)
  for i, (ts, key, value, _) in enumerate(records):
    builder.append(i, ts, key, value)
  data = builder.build()
  if codec:  # one wrapper message: it carries the last inner record's offset
    return _rebased(data, base + len(records) - 1)
  pos = 0
  while pos < len(data):  # a message set: every message carries its own offset
    struct.pack_into(">q", data, pos, base)
    base += 1
    pos += 12 + struct.unpack_from(">i", data, pos + 8)[0]
  return bytes(data)


def _rebased(data: bytearray, base: int) -> bytes:
  # A producer's batch starts at offset 0; the broker writes the base offset, which no
  # checksum covers.
  struct.pack_into(">q", data, 0, base)
  return bytes(data)


def decode_with(cls, data: bytes, fetch_offset: int = 0, **kwargs) -> list:
  part = cls(fetch_offset, TP, MemoryRecords(data), **kwargs)
  out = []
  while part:
    taken = part.take(7)  # in steps, as a poll with max_poll_records does
    if not taken:
      break
    out.extend(taken)
  return out


def both(data: bytes, fetch_offset: int = 0, **kwargs) -> tuple[list, list]:
  return (
    decode_with(Fetcher.PartitionRecords, data, fetch_offset, **kwargs),
    decode_with(NATIVE, data, fetch_offset, **kwargs),
  )


headers_st = st.lists(
  st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=16))), max_size=3
)
record_st = st.tuples(
  st.integers(min_value=0, max_value=2**41),
  st.one_of(st.none(), st.binary(max_size=40)),
  st.one_of(st.none(), st.binary(max_size=300)),
  headers_st,
)
batch_st = st.tuples(
  st.sampled_from([2, 2, 2, 1]),
  st.sampled_from(list(CODECS.values())),
  st.lists(record_st, min_size=1, max_size=12),
  st.sampled_from([1, 1, 3]),  # offsets step (v2): 3 leaves gaps, as compaction does
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(batch_st, min_size=1, max_size=5), skip=st.integers(0, 6))
def test_fuzz_native_decoder_equals_kafka_pythons(batches, skip):
  data, base, offsets = b"", 100, []
  for magic, codec, records, step in batches:
    if magic == 1:
      records = [(ts, k, v, []) for ts, k, v, _ in records]  # v1 has no headers
      codec, step = codec % CODECS["zstd"], 1  # nor zstd; and no gaps here
      data += v1_batch(base, records, codec)
    else:
      data += v2_batch(base, records, codec, step)
    offsets += [base + i * step for i in range(len(records))]
    base = offsets[-1] + 1
  stock, native = both(data, fetch_offset=100 + skip)  # starting inside the first batch
  assert native == stock
  assert [r.offset for r in native] == [o for o in offsets if o >= 100 + skip]


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_codec_and_a_large_batch(codec):
  records = [
    (
      1_700_000_000_000 + i,
      None if i % 9 == 0 else b"k%d" % i,
      b"v" * (i % 500),
      [("h", b"%d" % i)],
    )
    for i in range(2000)
  ]
  stock, native = both(
    v2_batch(5, records[:1500], CODECS[codec]) + v2_batch(1505, records[1500:], 0)
  )
  assert len(native) == 2000
  assert native == stock


def test_the_fetch_position_follows_every_record_taken():
  data = v2_batch(0, [(1, b"a", b"1", []), (2, b"b", b"2", [])], 0) + v2_batch(
    2, [(3, None, b"3", [])], 2
  )
  part = NATIVE(0, TP, MemoryRecords(data))
  assert [r.offset for r in part.take(1)] == [0]
  assert part.next_fetch_offset == 1
  assert [r.offset for r in part.take(5)] == [1, 2]
  assert part.next_fetch_offset == 3
  assert not part  # drained: the fetcher moves on


def test_a_damaged_batch_fails_its_checksum():
  data = bytearray(v2_batch(0, [(1, b"key", b"value" * 20, [])], 0))
  data[-10] ^= 0xFF
  with pytest.raises(CorruptRecordError, match="crc"):
    decode_with(NATIVE, bytes(data))


def test_records_that_cannot_be_decoded_raise_kafka_pythons_error():
  # With check_crcs off, damage reaches the decoder itself: kafka-python's error, which names
  # the partition and the batch, never a bare struct/index error from the compiled module.
  data = bytearray(v2_batch(40, [(1, b"key", b"value", [])], 0))
  data[61] = 0x7F  # the first record's length varint: far beyond the batch
  with pytest.raises(CorruptRecordError, match=r"partition=3\).* offset 40 cannot be decoded"):
    decode_with(NATIVE, bytes(data), fetch_offset=40, check_crcs=False)


def test_a_consumer_gets_the_decoder_only_for_its_own_fetcher():
  class Consumer:
    def __init__(self):
      self._fetcher = Fetcher.__new__(Fetcher)

  one, other = Consumer(), Consumer()
  assert decode.use_native_decoder(one) is one
  assert one._fetcher.PartitionRecords is NATIVE
  assert other._fetcher.PartitionRecords is Fetcher.PartitionRecords


class _Tagged:
  """A kafka-python 3.0 deserializer: deserialize(topic, headers, data)."""

  def __init__(self, tag: bytes):
    self.tag = tag

  def deserialize(self, topic, headers, data):
    return None if data is None else (topic, len(headers or ()), self.tag + data)


def test_deserializers_see_what_kafka_pythons_decoder_gives_them():
  records = [
    (1, None if i % 4 == 0 else b"k%d" % i, b"v%d" % i, [("h", b"x")] * (i % 3)) for i in range(40)
  ]
  data = v2_batch(0, records, CODECS["lz4"]) + v1_batch(40, records, CODECS["gzip"])
  kwargs = {"key_deserializer": _Tagged(b"key:"), "value_deserializer": _Tagged(b"value:")}
  stock, native = both(data, **kwargs)
  assert len(native) == 80
  assert native == stock
  assert native[1].value == ("readings", 1, b"value:v1") and native[1].key[2] == b"key:k1"
