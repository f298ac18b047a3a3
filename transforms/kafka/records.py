"""The values the Kafka source emits and works on: frozen, hashable, picklable; and the
batch of one poll's records, with its coder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from apache_beam import coders
from apache_beam.coders import coder_impl


class KafkaRecord(NamedTuple):
  """One Kafka record, with the offset range it accounts for. Immutable.

  ``covers_from`` is the offset right after the previous record that the same
  restriction emitted (the restriction's start for its first record). So the
  ranges ``[covers_from, offset]`` of all records tile every offset of a
  partition, the gaps left by transaction markers, aborted records and
  compaction included: acknowledging a record acknowledges its whole range.

  A NamedTuple rather than a frozen dataclass: one is made per record, and a
  frozen dataclass's ``__init__`` (an ``object.__setattr__`` per field) costs
  about 2 µs more, 5% of the reader's time. The reader builds it with
  ``tuple.__new__(KafkaRecord, fields)`` (all eight fields, in order): 0.1 µs
  instead of the generated ``__new__``'s 0.25 µs.
  """

  topic: str
  partition: int
  offset: int
  covers_from: int
  key: bytes | None
  value: bytes | None
  timestamp_ms: int
  headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class PartitionRead:
  """A unit of work for the source: read ``topic``/``partition`` from ``start_offset``.

  ``stop_offset`` is exclusive; None means unbounded (streaming). ``stop_timestamp_ms``
  ends an unbounded read at the first record stamped at or after it.
  """

  topic: str
  partition: int
  start_offset: int
  stop_offset: int | None = None
  stop_timestamp_ms: int | None = None

  @property
  def is_bounded(self) -> bool:
    return self.stop_offset is not None


class RecordBatch(list):
  """The records of one poll of one partition, in offset order: the element of
  ``ReadFromKafka(batched=True)``. A list of ``KafkaRecord``, with a coder of its own."""


class RecordBatchCoder(coders.Coder):
  """Encodes a ``RecordBatch`` as a list of plain tuples (Beam's fast primitives coder,
  where a ``KafkaRecord``, a NamedTuple, would go through pickle), and estimates its size
  from its first record without encoding it: the runner samples element sizes for its
  metrics, and encoding a poll's thousand records for each sample cost more than the read."""

  _TUPLES = coders.FastPrimitivesCoder()
  _PER_RECORD = 64  # topic, partition, offsets, timestamp: a rough, constant share

  def encode(self, batch: RecordBatch) -> bytes:
    return self._TUPLES.encode([tuple(r) for r in batch])

  def decode(self, encoded: bytes) -> RecordBatch:
    new = tuple.__new__
    return RecordBatch(new(KafkaRecord, t) for t in self._TUPLES.decode(encoded))

  def _create_impl(self):
    return coder_impl.CallbackCoderImpl(self.encode, self.decode, self.estimate_size)

  def estimate_size(self, batch: RecordBatch) -> int:
    # From the first record alone: the runner samples sizes for its metrics only, and going
    # over every record of each sampled poll cost ~0.15 µs per record read.
    if not batch:
      return 0
    first = batch[0]
    return len(batch) * (len(first.value or b"") + len(first.key or b"") + self._PER_RECORD)

  def is_deterministic(self) -> bool:
    return True

  def to_type_hint(self):
    return RecordBatch


coders.registry.register_coder(RecordBatch, RecordBatchCoder)
