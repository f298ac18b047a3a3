"""Restrictions of the Kafka source: one ``OffsetRange`` per topic-partition.

An unbounded read is ``[start, UNBOUNDED)``. The stock ``OffsetRestrictionTracker``
reports every range as bounded, so the default ``truncate()`` would keep the
endless range alive through a drain; this module's tracker tells the truth and
the provider truncates every restriction to nothing on drain: a drain ends the
read, and whatever was not read stays uncommitted for the next run.
"""

from __future__ import annotations

import sys
import threading

from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.transforms.core import RestrictionProvider

from transforms.kafka.records import PartitionRead

UNBOUNDED = sys.maxsize


class KafkaOffsetTracker(OffsetRestrictionTracker):
  """Claims offsets of one partition; reports unbounded ranges as unbounded.

  To end a restriction at the current position (drain, stop timestamp, or a
  bounded range whose last offsets hold no returnable record), the reader
  attempts the range's stop: the claim fails and ``check_done`` is satisfied.
  """

  def is_bounded(self) -> bool:
    return self.current_restriction().stop != UNBOUNDED

  def try_split(self, fraction_of_remainder):
    # Splitting [x, UNBOUNDED) by a fraction cuts at about sys.maxsize/2: an offset that
    # will never exist (Prism asks for 0.5 splits of busy bundles; the residual then
    # seeks out of range). Only checkpoints (fraction 0) make sense for an endless range.
    if fraction_of_remainder > 0 and self.current_restriction().stop == UNBOUNDED:
      return None
    return super().try_split(fraction_of_remainder)


class EndOffsets:
  """The latest end offset each reader in this process has seen, per partition.

  Readers record ``highwater`` after polling; ``restriction_size`` reads it to
  report backlog without a broker round trip (it runs in a different stage and
  thread than the reader, and kafka-python consumers are not thread-safe).
  """

  _lock = threading.Lock()
  _seen: dict[tuple[str, int], int] = {}

  @classmethod
  def record(cls, topic: str, partition: int, end_offset: int | None) -> None:
    if end_offset is not None:
      with cls._lock:
        cls._seen[(topic, partition)] = max(end_offset, cls._seen.get((topic, partition), 0))

  @classmethod
  def get(cls, topic: str, partition: int) -> int | None:
    return cls._seen.get((topic, partition))


def backlog(restriction: OffsetRange, end_offset: int | None) -> int:
  """Records left to read in restriction, given the partition's end offset (if known).

  A bounded range's backlog is what is left of it; an unbounded one's is the
  distance to the end offset, 0 when caught up or when the end is unknown.
  """
  if restriction.stop != UNBOUNDED:
    stop = (
      restriction.stop
      if end_offset is None
      else min(restriction.stop, max(end_offset, restriction.start))
    )
    return max(0, stop - restriction.start)
  if end_offset is None:
    return 0
  return max(0, end_offset - restriction.start)


class KafkaRestrictionProvider(RestrictionProvider):
  """Restrictions for ``PartitionRead`` elements; sizes are backlogs in records."""

  def initial_restriction(self, element: PartitionRead) -> OffsetRange:
    return OffsetRange(
      element.start_offset, UNBOUNDED if element.stop_offset is None else element.stop_offset
    )

  def create_tracker(self, restriction: OffsetRange) -> KafkaOffsetTracker:
    return KafkaOffsetTracker(restriction)

  def restriction_size(self, element: PartitionRead, restriction: OffsetRange) -> int:
    # Runners scale on this: never 0 for an unfinished unbounded read, so it is kept scheduled.
    size = backlog(restriction, EndOffsets.get(element.topic, element.partition))
    return max(size, 1) if restriction.stop == UNBOUNDED else size

  def truncate(self, element: PartitionRead, restriction: OffsetRange):
    # Drain: stop reading now. What was not read is not acked, so it is not committed.
    return None
