"""Offset ranges: sets of Kafka offsets kept as sorted, disjoint, half-open ranges.

The audit compares millions of offsets per partition; a topic's records, and what a
sink holds, are nearly contiguous, so ranges keep memory proportional to the number
of holes, not of offsets. Every range is ``(start, end)`` with ``start < end`` and
``end`` exclusive; lists of ranges are sorted and never touch or overlap.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

Range = tuple[int, int]


class RangeSet:
  """A set of non-negative integers kept as sorted, disjoint, non-adjacent ranges.

  ``add`` is O(1) when offsets arrive in increasing order (the common case: a topic
  read from its start, a sink read ordered by offset) and O(n) otherwise.
  """

  __slots__ = ("_ends", "_starts")

  def __init__(self, ranges: Iterable[Range] = ()):
    self._starts: list[int] = []
    self._ends: list[int] = []
    for start, end in ranges:
      self.add_range(start, end)

  @classmethod
  def of(cls, offsets: Iterable[int]) -> RangeSet:
    rs = cls()
    for offset in offsets:
      rs.add(offset)
    return rs

  def add(self, offset: int) -> None:
    self.add_range(offset, offset + 1)

  def add_range(self, start: int, end: int) -> None:
    if start >= end:
      return
    starts, ends = self._starts, self._ends
    if not starts or start > ends[-1]:
      starts.append(start)
      ends.append(end)
      return
    if start >= starts[-1]:  # overlaps or touches the last range
      ends[-1] = max(ends[-1], end)
      return
    # General case: merge with every range that overlaps or touches [start, end).
    lo = bisect.bisect_left(ends, start)  # first range whose end >= start
    hi = bisect.bisect_right(starts, end)  # ranges before hi start at or before end
    if lo < hi:
      start = min(start, starts[lo])
      end = max(end, ends[hi - 1])
    starts[lo:hi] = [start]
    ends[lo:hi] = [end]

  def ranges(self) -> list[Range]:
    return list(zip(self._starts, self._ends))

  def __iter__(self) -> Iterator[int]:
    for start, end in zip(self._starts, self._ends):
      yield from range(start, end)

  def __len__(self) -> int:
    return sum(e - s for s, e in zip(self._starts, self._ends))

  def __bool__(self) -> bool:
    return bool(self._starts)

  def __contains__(self, offset: int) -> bool:
    i = bisect.bisect_right(self._starts, offset) - 1
    return i >= 0 and offset < self._ends[i]

  def __eq__(self, other) -> bool:
    return isinstance(other, RangeSet) and self.ranges() == other.ranges()

  def __repr__(self) -> str:
    return f"RangeSet({self.ranges()!r})"

  @property
  def range_count(self) -> int:
    return len(self._starts)

  def first(self) -> int | None:
    return self._starts[0] if self._starts else None

  def last(self) -> int | None:
    return self._ends[-1] - 1 if self._ends else None

  def difference(self, other: RangeSet) -> RangeSet:
    return RangeSet(subtract(self.ranges(), other.ranges()))

  def intersection(self, other: RangeSet) -> RangeSet:
    return RangeSet(intersect(self.ranges(), other.ranges()))

  def clip(self, start: int | None = None, end: int | None = None) -> RangeSet:
    """The offsets within [start, end) (None: unbounded on that side)."""
    lo = 0 if start is None else max(start, 0)
    hi = (self._ends[-1] if self._ends else 0) if end is None else end
    if hi <= lo:
      return RangeSet()
    return RangeSet(intersect(self.ranges(), [(lo, hi)]))

  def head(self, n: int) -> list[int]:
    """The n smallest offsets."""
    out: list[int] = []
    for start, end in zip(self._starts, self._ends):
      out.extend(range(start, min(end, start + n - len(out))))
      if len(out) >= n:
        break
    return out


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
  """The offsets of a that are not in b (both sorted and disjoint)."""
  out: list[Range] = []
  j = 0
  for start, end in a:
    while j < len(b) and b[j][1] <= start:
      j += 1
    k = j
    cur = start
    while k < len(b) and b[k][0] < end:
      if b[k][0] > cur:
        out.append((cur, b[k][0]))
      cur = max(cur, b[k][1])
      k += 1
    if cur < end:
      out.append((cur, end))
  return out


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
  """The offsets in both a and b (both sorted and disjoint)."""
  out: list[Range] = []
  i = j = 0
  while i < len(a) and j < len(b):
    start = max(a[i][0], b[j][0])
    end = min(a[i][1], b[j][1])
    if start < end:
      out.append((start, end))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return out


def format_ranges(ranges: list[Range], limit: int = 8) -> str:
  """'3, 7-9, 12-20 (+4 more ranges)': inclusive ends, as a person reads offsets."""
  parts = [str(s) if e - s == 1 else f"{s}-{e - 1}" for s, e in ranges[:limit]]
  more = len(ranges) - limit
  return ", ".join(parts) + (f" (+{more} more range{'s' * (more > 1)})" if more > 0 else "")
