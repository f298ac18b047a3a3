"""The values the Kafka source emits and works on: frozen, hashable, picklable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


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
