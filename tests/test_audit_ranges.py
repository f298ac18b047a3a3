"""Unit tests of the audit's offset-range arithmetic (tools/ranges.py), against plain sets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tools.ranges import RangeSet, format_ranges, intersect, subtract

offsets = st.lists(st.integers(min_value=0, max_value=300), max_size=200)


def _ranges_of(values) -> list:
  return RangeSet.of(values).ranges()


def test_increasing_offsets_make_one_range_per_run():
  rs = RangeSet.of([0, 1, 2, 5, 6, 9])
  assert rs.ranges() == [(0, 3), (5, 7), (9, 10)]
  assert len(rs) == 6
  assert rs.range_count == 3
  assert (rs.first(), rs.last()) == (0, 9)


def test_out_of_order_adds_merge_touching_and_overlapping_ranges():
  rs = RangeSet([(10, 20), (30, 40), (50, 60)])
  rs.add_range(20, 30)  # touches both neighbours
  assert rs.ranges() == [(10, 40), (50, 60)]
  rs.add_range(0, 5)
  rs.add_range(45, 55)
  assert rs.ranges() == [(0, 5), (10, 40), (45, 60)]
  rs.add(5)
  assert rs.ranges() == [(0, 6), (10, 40), (45, 60)]
  rs.add_range(3, 3)  # empty: no change
  assert rs.ranges() == [(0, 6), (10, 40), (45, 60)]


def test_difference_names_holes_and_tails():
  records = RangeSet([(0, 100)])
  sink = RangeSet([(0, 17), (18, 40), (42, 90)])
  assert records.difference(sink).ranges() == [(17, 18), (40, 42), (90, 100)]
  assert sink.difference(records).ranges() == []


def test_clip_and_head():
  rs = RangeSet([(0, 10), (20, 30)])
  assert rs.clip(5, 25).ranges() == [(5, 10), (20, 25)]
  assert rs.clip(None, 3).ranges() == [(0, 3)]
  assert rs.clip(25, None).ranges() == [(25, 30)]
  assert rs.clip(40, 30).ranges() == []
  assert rs.head(12) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21]
  assert RangeSet().head(3) == []


def test_format_ranges_is_inclusive_and_limited():
  assert format_ranges([(3, 4), (7, 10)]) == "3, 7-9"
  assert (
    format_ranges([(i * 10, i * 10 + 1) for i in range(5)], limit=2) == "0, 10 (+3 more ranges)"
  )
  assert format_ranges([]) == ""


def test_a_million_contiguous_offsets_stay_one_range():
  rs = RangeSet()
  for o in range(1_000_000):
    rs.add(o)
  assert rs.ranges() == [(0, 1_000_000)]
  assert len(rs) == 1_000_000


@settings(max_examples=300, deadline=None)
@given(offsets, offsets)
def test_operations_match_python_sets(a, b):
  ra, rb = RangeSet.of(a), RangeSet.of(b)
  assert list(ra) == sorted(set(a))
  assert len(ra) == len(set(a))
  assert list(ra.difference(rb)) == sorted(set(a) - set(b))
  assert list(ra.intersection(rb)) == sorted(set(a) & set(b))
  assert all((x in ra) == (x in set(a)) for x in range(-2, 305))
  # canonical form: sorted, non-empty, never touching
  rr = ra.ranges()
  assert all(s < e for s, e in rr)
  assert all(rr[i][1] < rr[i + 1][0] for i in range(len(rr) - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=40))
def test_add_range_in_any_order_matches_a_set(spans):
  rs = RangeSet()
  model: set = set()
  for start, length in spans:
    rs.add_range(start, start + length)
    model.update(range(start, start + length))
  assert list(rs) == sorted(model)


@settings(max_examples=200, deadline=None)
@given(offsets, offsets)
def test_pure_subtract_and_intersect(a, b):
  ra, rb = _ranges_of(a), _ranges_of(b)
  assert list(RangeSet(subtract(ra, rb))) == sorted(set(a) - set(b))
  assert list(RangeSet(intersect(ra, rb))) == sorted(set(a) & set(b))
