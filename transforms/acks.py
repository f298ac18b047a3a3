"""Acknowledgements: which offsets a sink has made durable.

A sink acks the rows it wrote as ``Ack(topic, partition, start, end)``: every
offset in ``[start, end)`` is accounted for (written, dead-lettered, or a gap
that the next record's ``covers_from`` spans). ``CommitOffsets`` merges them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from transforms.rows import ack_span


@dataclass(frozen=True)
class Ack:
  topic: str
  partition: int
  start: int  # inclusive
  end: int  # exclusive


def acks_for_rows(rows: Iterable[tuple]) -> list[Ack]:
  """Merges the rows' offsets (``transforms.rows``: from covers_from to the offset) into the
  fewest Acks."""
  spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
  for topic, partition, start, offset in map(ack_span, rows):
    ranges = spans.get((topic, partition))
    if ranges is None:
      spans[(topic, partition)] = [(start, offset + 1)]
    else:
      ranges.append((start, offset + 1))
  acks = []
  for (topic, partition), ranges in spans.items():
    ranges.sort()
    start, end = ranges[0]
    for s, e in ranges[1:]:
      if s <= end:
        if e > end:
          end = e
      else:
        acks.append(Ack(topic, partition, start, end))
        start, end = s, e
    acks.append(Ack(topic, partition, start, end))
  return acks
