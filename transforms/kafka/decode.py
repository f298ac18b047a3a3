"""Kafka record batches decoded in C inside kafka-python's fetcher.

kafka-python decodes the v2 record format in pure Python: varints, a record object, then a
``ConsumerRecord`` per record. That is ≈ 3.5 µs of the raw consumer's ≈ 9.8 µs a record
(benchmarks/PROFILE.md, section 10). aiokafka, the asyncio client that forked from kafka-python,
ships the same record format compiled (Cython, ``aiokafka.record._crecords``).
``use_native_decoder(consumer)`` has the consumer's fetcher decode each v2 data batch with it
(and decompress it: gzip by the standard library, snappy, lz4 and zstd by cramjam). Everything
else stays kafka-python's: fetching, positions, the batch CRC check, ``read_committed``
filtering (aborted transactions, control batches), the older v0/v1 formats, and the records it
returns (``ConsumerRecord``, equal field for field: ``tests/test_native_decoder_units.py``
decodes batches both ways, ``tests/test_native_decoder_integration.py`` reads topics both ways).

It replaces one method of kafka-python's ``Fetcher.PartitionRecords``, in a subclass given to
that consumer's fetcher only, and only for the kafka-python series it was written against
(``KAFKA_PYTHON_SERIES``). Any other kafka-python, or no compiled aiokafka, keeps the stock
decoder: slower, never different.
"""

from __future__ import annotations

import functools
import logging

import kafka
from kafka.consumer.fetcher import ConsumerRecord, Fetcher, IsolationLevel
from kafka.errors import CorruptRecordError

try:
  from aiokafka.errors import KafkaError as NativeError
  from aiokafka.record._crecords import DefaultRecordBatch as NativeBatch
except ImportError:  # no aiokafka, or one built without its extensions
  NativeBatch = NativeError = None

_LOGGER = logging.getLogger(__name__)

# The kafka-python versions whose PartitionRecords (its _unpack_records protocol) this mirrors.
KAFKA_PYTHON_SERIES = "3.0."


def use_native_decoder(consumer):
  """consumer, its v2 record batches decoded in C when ``native_partition_records`` is
  available (returns it; else it is left as it is)."""
  native = native_partition_records()
  fetcher = getattr(consumer, "_fetcher", None)
  if native is not None and fetcher is not None:
    fetcher.PartitionRecords = native  # Fetcher builds them as self.PartitionRecords(...)
  return consumer


@functools.cache
def native_partition_records():
  """``NativePartitionRecords``, or None when it does not apply: another kafka-python series,
  or no compiled aiokafka record decoder."""
  if not kafka.__version__.startswith(KAFKA_PYTHON_SERIES):
    _LOGGER.info("kafka-python %s: records decoded by kafka-python itself", kafka.__version__)
    return None
  if NativeBatch is None:
    _LOGGER.info("no compiled aiokafka record decoder: records decoded by kafka-python")
    return None
  return NativePartitionRecords


class NativePartitionRecords(Fetcher.PartitionRecords):
  """``_unpack_records``, as kafka-python 3.0 does it, with the records of a v2 data batch
  decoded by ``NativeBatch``."""

  def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
    last = batch = records.next_batch()
    while batch is not None:
      last = batch
      if self.check_crcs and not batch.validate_crc():
        raise CorruptRecordError(
          f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check"
        )
      if batch.magic < 2:
        yield from self._unpack_legacy(tp, batch, key_deserializer, value_deserializer)
      else:
        self.leader_epoch = batch.leader_epoch
        if self._skips(batch):
          self.next_fetch_offset = batch.next_offset
        else:
          yield from self._unpack_native(tp, batch, key_deserializer, value_deserializer)
      batch = records.next_batch()
    # v2 keeps a batch's last offset even when compaction removed its last record: going
    # on from there never fetches the same batch again.
    if last is not None and last.magic == 2:
      self.next_fetch_offset = last.next_offset
    self.drain()

  def _skips(self, batch) -> bool:
    """Whether a v2 batch is left out: a control batch, or an aborted transaction's
    (``read_committed``). Keeps the aborted producers as kafka-python does."""
    if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
      self._consume_aborted_transactions_up_to(batch.last_offset)
      if self._contains_abort_marker(batch):
        self.aborted_producer_ids.discard(batch.producer_id)
      elif self._is_batch_aborted(batch):
        return True
    return batch.is_control_batch

  def _unpack_native(self, tp, batch, key_deserializer, value_deserializer):
    topic, partition, epoch = tp.topic, tp.partition, self.leader_epoch
    deserialize = key_deserializer is not None or value_deserializer is not None
    new_record = tuple.__new__  # skips the NamedTuple's Python-level __new__
    self.bytes_read += len(batch._buffer)
    try:
      for r in NativeBatch(batch._buffer):
        key, value, headers, offset = r.key, r.value, r.headers, r.offset
        self.records_read += 1
        self.next_fetch_offset = offset + 1
        fields = (
          topic,
          partition,
          epoch,
          offset,
          r.timestamp,
          r.timestamp_type,
          key,
          value,
          headers,
          None,  # v2 records carry no checksum of their own
          -1 if key is None else len(key),
          -1 if value is None else len(value),
          _header_size(headers) if headers else -1,
        )
        if deserialize:
          fields = self._deserialized(topic, fields, key_deserializer, value_deserializer)
        yield new_record(ConsumerRecord, fields)
    except NativeError as e:
      raise CorruptRecordError(
        f"Record batch for partition {tp} at offset {batch.base_offset} cannot be decoded: "
        f"{type(e).__name__}: {e}"
      ) from e

  def _deserialized(self, topic, fields, key_deserializer, value_deserializer) -> tuple:
    key, value, headers = fields[6:9]
    key = self._deserialize(key_deserializer, topic, headers, key)
    value = self._deserialize(value_deserializer, topic, headers, value)
    return (*fields[:6], key, value, *fields[8:])

  def _unpack_legacy(self, tp, batch, key_deserializer, value_deserializer):
    # Formats v0/v1 (brokers before 0.11, or topics still holding such records).
    topic, partition = tp.topic, tp.partition
    for r in batch:
      if self.check_crcs and not r.validate_crc():
        raise CorruptRecordError(f"Record for partition {tp} at offset {r.offset} failed crc check")
      self.records_read += 1
      self.bytes_read += r.size_in_bytes
      self.next_fetch_offset = r.offset + 1
      yield ConsumerRecord(
        topic,
        partition,
        self.leader_epoch,
        r.offset,
        r.timestamp,
        r.timestamp_type,
        self._deserialize(key_deserializer, topic, r.headers, r.key),
        self._deserialize(value_deserializer, topic, r.headers, r.value),
        r.headers,
        r.checksum,
        -1 if r.key is None else len(r.key),
        -1 if r.value is None else len(r.value),
        _header_size(r.headers) if r.headers else -1,
      )


def _header_size(headers) -> int:
  return sum(len(k.encode("utf-8")) + (0 if v is None else len(v)) for k, v in headers)
