"""What a local run tells the user: the progress line, the summary and the error line.

The figures come from two places only:
- Beam metrics (``transforms/telemetry.py``), read from each pipeline's result and
  accumulated over the run's rounds by ``Totals``;
- Kafka, through the launcher's ``KafkaView``: end and committed offsets, lag, missing
  topics and outages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pipelines.options import SmartGridOptions
from runners.kafka_view import KafkaView
from runners.stopping import offsets_table
from transforms import telemetry
from transforms.kafka.positions import parse_stop

_LOGGER = logging.getLogger(__name__)


class Totals:
  """The run's Beam metrics: those of the finished pipelines (rounds), plus the running
  one's where its runner answers while it runs (Prism's job service does; FnApiRunner's
  rounds are synchronous and counted when they end)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._done = telemetry.empty()
    self._running: Any = None

  def watch(self, result: Any) -> None:
    """The pipeline now running: its live figures join the snapshot until it is added."""
    with self._lock:
      self._running = result

  def add_result(self, result: Any) -> dict | None:
    """Adds a finished pipeline's figures (once) and stops watching it; returns them
    (None when its runner could not say)."""
    figures = _figures(result)
    with self._lock:
      self._running = None
      if figures is not None:
        telemetry.add(self._done, figures)
    return figures

  def add(self, snapshot: dict) -> None:
    with self._lock:
      telemetry.add(self._done, snapshot)

  def snapshot(self) -> dict:
    with self._lock:
      running = self._running
      out = telemetry.add(telemetry.empty(), self._done)
    if running is not None:
      figures = _figures(running, live=True)
      if figures is not None:
        telemetry.add(out, figures)
    return out


def _figures(result: Any, live: bool = False) -> dict | None:
  """A result's telemetry, or None when its runner cannot say (the summary says less)."""
  if live and hasattr(result, "_metrics"):
    # PortableRunner's result keeps its first metrics answer: ask the job service again.
    result._metrics = None  # pylint: disable=protected-access
  try:
    return telemetry.totals(result)
  except RecursionError:
    # FnApiRunner's metrics merge recurses once per bundle (RecursionError past ~1,000
    # bundles; make_runner merges eagerly).
    _LOGGER.warning(
      "this round's Beam metrics could not be read (too many bundles); "
      "its counts are missing from the summary"
    )
  except Exception as e:  # noqa: BLE001 - figures must never stop the pipeline
    if not live:
      _LOGGER.warning("Beam metrics unavailable: %s: %s", type(e).__name__, e)
  return None


def lag_by_topic(end: dict, committed: dict) -> dict:
  lag: dict = {}
  for tp, e in end.items():
    lag[tp.topic] = lag.get(tp.topic, 0) + e - (committed.get(tp) or 0)
  return lag


class ProgressLine:
  """The launcher's progress line: totals, the CURRENT rate (over the last interval), lag."""

  def __init__(self, view: KafkaView, totals: Totals, rounds: Callable[[], int] | None = None):
    self._view = view
    self._totals = totals
    self._rounds = rounds  # -> rounds done so far (FnApiRunner's plan), or None
    self._started = self._last_t = time.monotonic()
    self._last_written = 0

  def __call__(self) -> str:
    s = self._totals.snapshot()
    written = sum(s["written"].values())
    now = time.monotonic()
    rate = (written - self._last_written) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_written = now, written
    head = f"[{now - self._started:6.0f}s]"
    if self._rounds is not None:
      head += f" round {self._rounds()}"
    parts = [
      f"{head} read {sum(s['read'].values())}",
      f"written {written} ({rate:,.0f}/s now)",
      f"dead letters {sum(s['dead_letters'].values())}",
    ]
    return " | ".join(parts + [self._kafka_part()])

  def _kafka_part(self) -> str:
    status = self._view.status()
    if status:
      return status
    part = ""
    if self._view.missing:
      part = "waiting for topic(s) " + ", ".join(self._view.missing) + " | "
    try:
      lag = lag_by_topic(*self._view.offsets())
      return part + "lag " + (", ".join(f"{t}={n}" for t, n in sorted(lag.items())) or "-")
    except Exception:  # noqa: BLE001 - the progress line must never stop the pipeline
      return part + (self._view.status() or "lag unknown")


def batches_line(b: dict, batch_size: int, streaming: bool) -> str | None:
  if not b.get("all"):
    return None
  full, partial = b.get("full", 0), b["all"] - b.get("full", 0)
  line = f"  batches:        {b['all']} ({full} full of {batch_size} rows"
  if partial:
    why = (
      "the buffering timer (--max_buffering_secs), window ends and round ends flush them: "
      "expected when fewer rows of a key arrive per window"
      if streaming
      else "the last rows of each key and window at the end of the run"
    )
    line += f"; {partial} partial: {why}"
  return line + ")"


def _counts(counts: dict) -> str:
  return ", ".join(f"{label}={n}" for label, n in sorted(counts.items()))


def _count_lines(s: dict) -> list[str]:
  lines = [
    "  records read:   " + (_counts(s["read"]) or "0"),
    "  rows written:   " + (_counts(s["written"]) or "0"),
  ]
  if s["dead_letters"]:
    lines.append("  dead letters:   " + _counts(s["dead_letters"]))
  if s["rejected"]:
    lines.append("  sink rejected:  " + _counts(s["rejected"]))
  if s["duplicates"]:
    lines.append(
      "  duplicate events (later copies of a stored event_id, acked, not written): "
      + _counts(s["duplicates"])
    )
  return lines


def summary(view: KafkaView, elapsed: float, state: str, o: SmartGridOptions, figures: dict) -> str:
  lines = [f"Pipeline {state} after {elapsed:.1f}s.", *_count_lines(figures)]
  batches = batches_line(figures["batches"], o.batch_size, parse_stop(o.stop).kind == "never")
  if batches:
    lines.append(batches)
  if not view.tps:
    lines.append("  no partitions: topic(s) " + ", ".join(view.missing) + " do not exist")
    return "\n".join(lines)
  try:
    lines.extend(offsets_table(*view.offsets()))
  except Exception as e:  # noqa: BLE001 - the summary must be printed whatever Kafka says
    lines.append(f"  committed offsets unknown: {type(e).__name__}: {e}")
  return "\n".join(lines)


def error_line(error: BaseException) -> str:
  """The error as the user should read it: an offset gap's own message, not the runner's
  wrapping of it (FnApiRunner re-raises a DoFn's error inside a traceback text)."""
  text = f"{type(error).__name__}: {error}"
  for line in text.splitlines():
    if "OffsetGapError: " in line:
      return line[line.index("OffsetGapError: ") :]
  return text


def short(e: BaseException | None) -> str:
  text = f"{type(e).__name__}: {e}".splitlines()[0] if e is not None else "?"
  return text[:200]
