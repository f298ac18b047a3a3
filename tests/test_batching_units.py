"""In-bundle batching, the event-time WindowFn and BatchRows, without a broker."""

from __future__ import annotations

import pickle

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import FixedWindows, GlobalWindow, IntervalWindow, WindowFn
from apache_beam.utils.timestamp import Timestamp

from transforms.batching import BatchRows, BundleBatcher
from transforms.windows import FixedEventWindows

MIN = 60_000_000  # one minute in µs
T0 = 1_795_780_000 * 1_000_000 - (1_795_780_000 * 1_000_000) % MIN  # a window start


@pytest.mark.parametrize("micros", [0, 1, MIN - 1, MIN, T0 + 59_999_999, -1, -MIN - 5])
def test_fixed_event_windows_assign_like_fixed_windows(micros):
  ctx = WindowFn.AssignContext(Timestamp(micros=micros))
  assert FixedEventWindows(60).assign(ctx) == FixedWindows(60).assign(ctx)


def test_fixed_event_windows_reuse_windows_and_pickle_without_their_cache():
  w = FixedEventWindows(60)
  a = w.window_for(T0 + 5)
  assert w.window_for(T0 + 59_000_000) is a  # one object per window
  clone = pickle.loads(pickle.dumps(w))
  assert clone == w and hash(clone) == hash(w) and clone._windows == {}
  assert clone.window_for(T0 + 5) == a
  assert FixedEventWindows(30) != w
  assert w.get_window_coder().encode(a)  # the standard IntervalWindow coder


def _batcher(size=100):
  return BundleBatcher(size, FixedEventWindows(60))


def test_bundle_batcher_emits_full_batches_in_their_window_and_keeps_the_rest():
  b = _batcher()
  out = [b.add(("sensor_readings", 0), ("row", i), T0 + i) for i in range(250)]
  full = [wv for wv in out if wv is not None]
  assert [out.index(wv) for wv in full] == [99, 199]  # the 100th and the 200th row fill
  for n, wv in enumerate(full):
    key, rows = wv.value
    assert key == ("sensor_readings", 0)
    assert rows == [("row", i) for i in range(100 * n, 100 * (n + 1))]
    assert wv.windows == (IntervalWindow(Timestamp(micros=T0), Timestamp(micros=T0 + MIN)),)
    assert wv.timestamp == wv.windows[0].max_timestamp()
  left = list(b.drain())
  assert [wv.value for wv in left] == [
    (("sensor_readings", 0), ("row", i)) for i in range(200, 250)
  ]
  assert all(wv.windows == (GlobalWindow(),) for wv in left)
  assert [wv.timestamp.micros for wv in left] == [T0 + i for i in range(200, 250)]
  assert list(b.drain()) == []  # drained means empty


def test_bundle_batcher_never_mixes_keys_or_windows():
  b = _batcher(size=3)
  events = [("a", T0), ("b", T0), ("a", T0 + MIN), ("a", T0 + 1), ("b", T0 + 2), ("a", T0 + 2)]
  full = [wv for k, t in events if (wv := b.add(k, (k, t), t)) is not None]
  assert [wv.value for wv in full] == [("a", [("a", T0), ("a", T0 + 1), ("a", T0 + 2)])]
  left = sorted(wv.value for wv in b.drain())
  assert left == [("a", ("a", T0 + MIN)), ("b", ("b", T0)), ("b", ("b", T0 + 2))]


def test_batch_rows_completes_leftovers_with_group_into_batches():
  windows = FixedEventWindows(60)
  b = _batcher(size=4)
  rows = [(("sensor_readings", i % 2), i) for i in range(21)]  # (table, shard) keys
  full = [wv for k, i in rows if (wv := b.add(k, i, T0 + i)) is not None]
  left = list(b.drain())

  def check(batches):
    got = sorted(i for _, batch in batches for i in batch)
    assert got == list(range(21)), got  # every row once
    assert all(len(batch) <= 4 for _, batch in batches)
    assert all({i % 2 for i in batch} == {k[1]} for k, batch in batches)  # no mixing

  with beam.Pipeline(runner=FnApiRunner()) as p:
    left_pc = (
      p
      | "Left" >> beam.Create([(wv.value, wv.timestamp) for wv in left])
      | "Stamp" >> beam.Map(lambda kv: beam.window.TimestampedValue(kv[0], kv[1]))
    )
    # Create cannot carry WindowedValues: re-stamp the full batches inside their windows.
    full_pc = (
      p
      | "FullBatches" >> beam.Create([(wv.value, wv.timestamp) for wv in full])
      | "StampFull" >> beam.Map(lambda kv: beam.window.TimestampedValue(kv[0], kv[1]))
    )
    out = (full_pc, left_pc) | BatchRows(4, windows) | "BothOutputs" >> beam.Flatten()
    everything = (
      out | "GlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows()) | beam.combiners.ToList()
    )
    assert_that(everything, lambda lists: check(lists[0]))
