"""Local runs: the pipeline on Beam's FnApiRunner (or Prism), with drain, progress and a summary.

This module starts a run and watches it: pid and drain files, the stop signals, the
workers of ``--local_workers`` (runners/workers.py), the pipeline thread that runs the
plan (runners/rounds.py) and the progress line and summary (runners/report.py).

Streaming (``local``) runs in rounds: each round is the same pipeline reading from
the committed offsets to the end offsets it sees when it starts; it writes,
commits and ends, and the next round starts as soon as there is new data. Why:
FnApiRunner hands a stage's output to the next stage only when the stage has
finished (fn_runner.py schedules every output buffer at MAX_TIMESTAMP), so one
endless pipeline there would hold every record in memory and write nothing until
a drain. Rounds keep memory flat and commit continuously; the latency is a
round's length (a few seconds). ``batch`` runs rounds too, towards the end offsets
seen when it started. A round reads at most ``--round_max_records`` (shared out
over the partitions): the whole output of a stage waits in memory until the stage ends.
The first round is smaller (2,000 records: runners/rounds.py), so the first offset is
committed soon after start.

Why FnApiRunner: ``--runner=DirectRunner`` would pick the BundleBasedDirectRunner
for this pipeline (GroupIntoBatches declares a processing-time timer), and that
engine silently drops the reader's checkpointed residuals (measured: see the README, "Local runs").

Stopping: the first SIGINT/SIGTERM (or ``run_pipeline.sh drain local``, which
sends SIGTERM to the pid in ``.run/<mode>-pipeline.pid``) creates the drain file;
readers end their restrictions, the watermark reaches +inf, windows, batches and
the sink flush, the last offsets are committed, and the process exits 0 with a
summary. A second signal aborts at once (exit 130): nothing unwritten was
committed, so the next run replays it.

Kafka: an unreachable broker at start is one line with a hint (exit 2). Topics that
do not exist yet are waited for in streaming (said once) and are "nothing to read"
in batch (exit 0, or 2 with --require_topics). A round that fails because Kafka
stopped answering is retried with exponential backoff and jitter (tenacity) until
it answers again; the progress line says "Kafka unreachable since ..., retrying".
The retried round starts from the committed offsets: nothing unwritten was
committed, and what was written twice is absorbed by the idempotent sink.
Streaming also starts a round at least every --recommit_interval_secs, which
re-commits every offset (CommitOffsets commits each read's start) before the
broker's offsets.retention.minutes could expire it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions
from kafka.errors import KafkaError

from pipelines.options import SmartGridOptions
from runners import prism, workers
from runners.kafka_view import KafkaView, is_first_worker, unreachable_message
from runners.report import ProgressLine, Totals, error_line, summary
from runners.rounds import Launcher, Rounds
from runners.stopping import SUPERVISED_ENV, StopSignals
from transforms.kafka import KafkaUnavailableError
from transforms.kafka.drain import DrainSignal
from transforms.kafka.positions import parse_stop

_LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
RUN_DIR = REPO / ".run"
# The cyclic collector's generation-0 threshold (Python's default: 700). A pipeline
# allocates a few dozen container objects per event, so at 700 the collector ran every
# few events and took ~9% of a worker's CPU (benchmarks/PROFILE.md, section 6). Full
# collections are left to the launcher, between rounds (runners/rounds.py).
GC_THRESHOLDS = (50_000, 50, 1000)
# Beam's state sampler (its msec counters and lull logs) samples from a thread of its own
# that sleeps up to 200 ms between samples, and every bundle's end joins that thread: up to
# 200 ms of idle wall time per bundle, in every stage of every round. Beam takes the period
# as a constructor argument, but its BundleProcessor passes none. 10 ms keeps the samples
# (the thread wakes without the GIL) and cuts the wait: +3-5% events/s in a 1M-event batch
# run, the same CPU (benchmarks/PROFILE.md, section 9).
STATE_SAMPLING_MS = 10


def tune_process() -> None:
  """Moves every object alive now (the imported modules: Beam, kafka-python, the
  transforms) out of the collector's reach, makes collections rarer, and shortens Beam's
  state sampling period (``STATE_SAMPLING_MS``). Called once the imports are done: by the
  entry point, and again in each worker (forked or restarted)."""
  from apache_beam.runners.worker import statesampler

  gc.freeze()
  gc.set_threshold(*GC_THRESHOLDS)
  init = statesampler.StateSampler.__init__
  if init.__defaults__ and len(init.__defaults__) == 1:  # (sampling_period_ms,)
    init.__defaults__ = (STATE_SAMPLING_MS,)


def pid_file(mode: str) -> Path:
  return RUN_DIR / f"{mode}-pipeline.pid"


def default_drain_file(mode: str) -> Path:
  return RUN_DIR / f"{mode}-pipeline.drain"


def run(options: PipelineOptions, mode: str) -> int:
  """A local run of the parsed options: the workers of --local_workers, or this process."""
  o = options.view_as(SmartGridOptions)
  unreachable = unreachable_message(o.bootstrap_servers)
  if unreachable:
    print(f"error: {unreachable}", file=sys.stderr)
    return 2
  RUN_DIR.mkdir(parents=True, exist_ok=True)
  drain_file = Path(o.drain_file) if o.drain_file else default_drain_file(mode)
  drain_file.parent.mkdir(parents=True, exist_ok=True)
  drain_file.unlink(missing_ok=True)
  pidf = pid_file(mode) if not o.drain_file else Path(f"{drain_file}.pid")
  pidf.write_text(str(os.getpid()))
  if o.local_workers > 1 and not prism.is_prism(options):
    try:
      return workers.supervise(options, mode, drain_file, lambda: KafkaView(o), run_worker)
    except KafkaError as e:
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
      return 2
    finally:
      pidf.unlink(missing_ok=True)

  def drain(signal_name: str) -> None:
    print(
      f"\n{signal_name}: draining (stop reading, flush windows, batches and sink, commit). "
      "Signal again to abort.",
      file=sys.stderr,
      flush=True,
    )
    DrainSignal.request(str(drain_file))

  signals = StopSignals(drain)
  try:
    return _run_here(options, drain_file, signals)
  finally:
    pidf.unlink(missing_ok=True)
    drain_file.unlink(missing_ok=True)


def run_worker(
  options: PipelineOptions, mode: str, index: int, count: int, drain_file: Path
) -> int:
  """Worker index of count under the supervisor (runners/workers.py): this process runs
  the pipeline on its share of the partitions, with its own drain file and no progress
  line (the supervisor prints one for all). ``options`` are the supervisor's, parsed once."""
  tune_process()
  o = options.view_as(SmartGridOptions)
  o.local_workers = 1
  o.partition_shard = f"{index}/{count}"
  o.drain_file = str(workers.worker_drain_file(drain_file, index))
  o.progress_secs = 0
  return run(options, mode)


def _prepare(options: PipelineOptions, view: KafkaView, drain_file: Path) -> int | None:
  """Checks the topics before the first round: an exit code when there is nothing to run."""
  o = options.view_as(SmartGridOptions)
  missing, speak = view.missing, is_first_worker(o)
  if not missing:
    return None
  names = ", ".join(missing)
  if parse_stop(o.stop).kind != "never":  # batch
    if o.require_topics:
      print(
        f"error: --require_topics: topic(s) {names} do not exist on {o.bootstrap_servers}",
        file=sys.stderr,
      )
      return 2
    if speak:
      print(
        f"nothing to read: topic(s) {names} do not exist on {o.bootstrap_servers}",
        file=sys.stderr,
        flush=True,
      )
    return None if view.tps else 0
  if speak:
    print(
      f"waiting for topic(s) {names} to be created on {o.bootstrap_servers}"
      + (" (reading the others meanwhile)" if view.tps else ""),
      file=sys.stderr,
      flush=True,
    )
  if prism.is_prism(options):  # one pipeline, its partitions fixed when it is built
    while view.refresh() and not drain_file.exists():
      time.sleep(1.0)
  return None


def _run_here(options: PipelineOptions, drain_file: Path, signals: StopSignals) -> int:
  o = options.view_as(SmartGridOptions)
  # Prism streams for real (runners/prism.py): one unbounded pipeline, no rounds.
  stop = parse_stop(o.stop)
  use_rounds = not prism.is_prism(options) and stop.kind in ("never", "end")
  view = None
  try:
    if prism.is_prism(options):
      options = prism.prism_options(options)  # PrismNotBuilt (a ValueError) names the fix
    view = KafkaView(o)
    early = _prepare(options, view, drain_file)
    if early is not None:
      view.close()
      return early
    plan = Rounds(o, view, batch=stop.kind == "end") if use_rounds else None
  except (KafkaUnavailableError, KafkaError, ValueError) as e:
    if view is not None:
      view.close()
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    return _watch(Launcher(options, view, drain_file, plan, Totals()), o, signals)
  finally:
    view.close()


def _watch(launcher: Launcher, o: SmartGridOptions, signals: StopSignals) -> int:
  """Runs the launcher in the pipeline thread; prints progress lines, then the summary."""
  started = time.monotonic()
  thread = _PipelineThread(launcher)
  plan, totals = launcher.plan, launcher.totals
  line = ProgressLine(launcher.view, totals, None if plan is None else (lambda: plan.count))
  shared = workers.progress_file(launcher.drain_file) if os.environ.get(SUPERVISED_ENV) else None
  while thread.is_alive():
    thread.join(timeout=o.progress_secs or 1.0)
    if thread.is_alive() and o.progress_secs:
      print(line(), file=sys.stderr, flush=True)
    if shared is not None:  # the supervisor's progress line sums the workers' counters
      workers.write_progress(shared, totals.snapshot())
  error = thread.error
  state = "FAILED" if error is not None else ("drained" if signals.draining else "finished")
  print(
    summary(launcher.view, time.monotonic() - started, state, o, totals.snapshot()),
    file=sys.stderr,
    flush=True,
  )
  if error is not None:
    text = error_line(error)
    print(f"error: {text}", file=sys.stderr)
    return 2 if text.startswith("OffsetGapError") else 1  # 2: a restart would repeat it
  return 0


class _PipelineThread(threading.Thread):
  """The launcher's plan in its own thread (the main thread handles signals and prints);
  keeps the error that ended it for the main thread to report."""

  def __init__(self, launcher: Launcher):
    super().__init__(name="pipeline", daemon=True)
    self._launcher = launcher
    self.error: BaseException | None = None
    self.start()

  def run(self) -> None:
    try:
      self._launcher.run()
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
      self.error = e
