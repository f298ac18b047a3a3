"""Acknowledgements: which offsets a sink has made durable.

A sink acks the rows it wrote as ``Ack(topic, partition, start, end)``: every
offset in ``[start, end)`` is accounted for (written, dead-lettered, or a gap
that the next record's ``covers_from`` spans). ``CommitOffsets`` merges them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from transforms.rows import ack_spans


@dataclass(frozen=True)
class Ack:
  topic: str
  partition: int
  start: int  # inclusive
  end: int  # exclusive


def acks_for_rows(rows: Iterable[tuple]) -> list[Ack]:
  """Merges the rows' offsets (``transforms.rows``: from covers_from to the offset) into the
  fewest Acks."""
  acks: list[Ack] = []
  topic = partition = start = end = None
  for t, p, s, e in sorted(ack_spans(rows)):
    if t == topic and p == partition and s <= end:
      end = max(end, e)
      continue
    if topic is not None:
      acks.append(Ack(topic, partition, start, end))
    topic, partition, start, end = t, p, s, e
  if topic is not None:
    acks.append(Ack(topic, partition, start, end))
  return acks
