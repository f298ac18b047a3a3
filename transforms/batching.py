"""Batching: GroupIntoBatches with bundle-local pre-batching in front of it.

``GroupIntoBatches`` keeps every element in keyed state and sets a window timer per
element: on FnApiRunner that is about 100 µs an element, most of this pipeline's
time. But most batches can be completed without state: a bundle of a busy
partition holds hundreds of rows of the same key and window. So the DoFn that
makes the rows collects them per (key, window) inside the bundle
(``BundleBatcher``) and emits every batch of ``batch_size`` that fills there
directly; only the rows left over when the bundle ends (fewer than
``batch_size`` per key and window) go through ``GroupIntoBatches(batch_size,
max_buffering_secs)`` (``BatchRows``), which completes them across bundles and
flushes them at window end, after the buffering time, and on drain.

Guarantees are those of ``GroupIntoBatches``: a batch never mixes keys or windows
and holds at most ``batch_size`` rows; every row leaves in exactly one batch
(the leftovers are outputs of the bundle that read them, so a failed bundle is
retried whole); nothing waits in memory past its bundle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.typehints.native_type_compatibility import convert_to_beam_type
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.rows import BatchKey, KeyedRow
from transforms.windows import FixedEventWindows

_GLOBAL = (GlobalWindow(),)


class BundleBatcher:
  """Collects rows per (key, window) within one bundle; hands out every batch that fills.

  Used inside the DoFn that makes the rows (``ParseEvents``), so the rows that leave
  in a full batch cost no further per-element step at all.
  """

  def __init__(self, batch_size: int, windows: FixedEventWindows):
    self.batch_size = batch_size
    self._windows = windows
    self._buffers: dict = {}  # (key, window start µs) -> [(row, timestamp µs)]

  def add(self, key: BatchKey, row: Any, micros: int) -> WindowedValue | None:
    """Buffers a row stamped ``micros`` (epoch µs); returns the (key, [rows]) batch it
    completed, in its window, if any. A row that leaves in a full batch never needs a
    ``Timestamp`` object (about 0.7 µs each): only the leftovers get one, in ``drain``."""
    start = micros - micros % self._windows.size_us
    buffer = self._buffers.get((key, start))
    if buffer is None:
      buffer = self._buffers[(key, start)] = []
    buffer.append((row, micros))
    if len(buffer) < self.batch_size:
      return None
    del self._buffers[(key, start)]
    window = self._windows.window_for(micros)
    return WindowedValue((key, [r for r, _ in buffer]), window.max_timestamp(), (window,))

  def drain(self) -> Iterable[WindowedValue]:
    """The rows of batches that did not fill, one (key, row) each, in the global window."""
    buffers, self._buffers = self._buffers, {}
    for (key, _), buffer in buffers.items():
      for row, micros in buffer:
        yield WindowedValue((key, row), Timestamp(micros=micros), _GLOBAL)


class BatchRows(beam.PTransform):
  """(full batches, rows) -> (full batches, the rows' batches): PCollections of
  (key, [row, ...]) in fixed event-time windows.

  ``full``: batches a ``BundleBatcher`` completed; ``rows``: every other (key, row),
  globally windowed with event-time timestamps. Both get the windows; the rows go
  through ``GroupIntoBatches(batch_size, max_buffering_secs)``. The two stay apart, so a
  sink can write the full batches in the stage that made them (``WriteBatches`` takes both).
  """

  def __init__(
    self,
    batch_size: int,
    windows: FixedEventWindows,
    *,
    allowed_lateness_secs: float = 0.0,
    max_buffering_secs: float | None = None,
    clock: Callable[[], float] = time.time,
  ):
    super().__init__()
    self._clock = clock  # GroupIntoBatches' processing time (a fake one in TestStream tests)
    self._batch_size = batch_size
    self._windows = windows
    self._lateness = Duration.of(allowed_lateness_secs)
    self._max_buffering_secs = max_buffering_secs

  def expand(self, inputs):
    full, rows = inputs
    windowed_full = full | "WindowFullBatches" >> beam.WindowInto(
      self._windows, allowed_lateness=self._lateness
    )
    windowed_rows = rows | "WindowRows" >> beam.WindowInto(
      self._windows, allowed_lateness=self._lateness
    )
    windowed_rows.element_type = convert_to_beam_type(KeyedRow)
    completed = windowed_rows | "GroupIntoBatches" >> beam.GroupIntoBatches(
      self._batch_size, self._max_buffering_secs, self._clock
    )
    return windowed_full, completed
