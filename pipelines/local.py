"""Local runs: the pipeline on Beam's FnApiRunner, with drain, progress and a summary.

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

Why FnApiRunner: ``--runner=DirectRunner`` would pick the BundleBasedDirectRunner
for this pipeline (GroupIntoBatches declares a processing-time timer), and that
engine silently drops the reader's checkpointed residuals (../shared/facts.md).

Stopping: the first SIGINT/SIGTERM (or ``run_pipeline.sh drain local``, which
sends SIGTERM to the pid in ``.run/<mode>-pipeline.pid``) creates the drain file;
readers end their restrictions, the watermark reaches +inf, windows, batches and
the sink flush, the last offsets are committed, and the process exits 0 with a
summary. A second signal aborts at once (exit 130): nothing unwritten was
committed, so the next run replays it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import apache_beam as beam
from kafka.errors import KafkaError
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers

from pipelines import prism, smartgrid, workers
from pipelines.stopping import StopSignals, offsets_table
from pipelines.options import SmartGridOptions
from transforms import progress
from transforms.kafka import KafkaUnavailableError
from transforms.kafka.config import materialize
from transforms.kafka.drain import DrainSignal
from transforms.kafka.positions import StartPosition, StopPosition, parse_start, parse_stop

_LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
RUN_DIR = REPO / ".run"


def pid_file(mode: str) -> Path:
  return RUN_DIR / f"{mode}-pipeline.pid"


def default_drain_file(mode: str) -> Path:
  return RUN_DIR / f"{mode}-pipeline.drain"


class _KafkaView:
  """The launcher's own read-only view of the topics: end and committed offsets."""

  def __init__(self, o: SmartGridOptions):
    from kafka import KafkaConsumer, TopicPartition
    config = smartgrid.kafka_client_config(o)
    config.update(bootstrap_timeout_ms=10000)
    self._consumer = KafkaConsumer(**materialize(config))
    # A worker of --local_workers sees only its own share of the partitions.
    self.tps = [TopicPartition(t, p) for t, p in smartgrid.shard_partitions(
        [(t, p) for t in (o.sensor_topic, o.meter_topic)
         for p in sorted(self._consumer.partitions_for_topic(t) or ())], o.partition_shard)]

  def offsets(self) -> tuple[dict, dict]:
    end = self._consumer.end_offsets(self.tps)
    committed = {tp: self._consumer.committed(tp) for tp in self.tps}
    return end, committed

  def close(self):
    self._consumer.close(autocommit=False)


def _lag_by_topic(end: dict, committed: dict) -> dict:
  lag: dict = {}
  for tp, e in end.items():
    lag[tp.topic] = lag.get(tp.topic, 0) + e - (committed.get(tp) or 0)
  return lag


def progress_line(view: _KafkaView, started: float) -> str:
  s = progress.snapshot()
  read = sum(s["read"].values())
  written = sum(s["written"].values())
  elapsed = max(time.monotonic() - started, 1e-9)
  parts = [f"[{elapsed:6.0f}s] read {read}", f"written {written} ({written / elapsed:,.0f}/s)",
           f"dead letters {sum(s['dead_letters'].values())}"]
  try:
    lag = _lag_by_topic(*view.offsets())
    parts.append("lag " + ", ".join(f"{t}={n}" for t, n in sorted(lag.items())))
  except Exception as e:  # noqa: BLE001 - the progress line must never stop the pipeline
    parts.append(f"lag unknown ({type(e).__name__})")
  return " | ".join(parts)


def summary(view: _KafkaView, elapsed: float, state: str) -> str:
  s = progress.snapshot()
  lines = [f"Pipeline {state} after {elapsed:.1f}s."]
  lines.append("  records read:   " + (", ".join(f"{t}={n}" for t, n in sorted(s["read"].items())) or "0"))
  lines.append("  rows written:   " + (", ".join(f"{t}={n}" for t, n in sorted(s["written"].items())) or "0"))
  if s["dead_letters"]:
    lines.append("  dead letters:   " + ", ".join(f"{r}={n}" for r, n in sorted(s["dead_letters"].items())))
  if s["rejected"]:
    lines.append("  sink rejected:  " + ", ".join(f"{t}={n}" for t, n in sorted(s["rejected"].items())))
  b = s["batches"]
  if b.get("all"):
    lines.append(f"  batches:        {b['all']} ({100.0 * b.get('full', 0) / b['all']:.0f}% full)")
  try:
    lines.extend(offsets_table(*view.offsets()))
  except Exception as e:  # noqa: BLE001 - the summary must be printed whatever Kafka says
    lines.append(f"  committed offsets unknown: {type(e).__name__}: {e}")
  return "\n".join(lines)


def _build(options: PipelineOptions, drain_file: Path, *, start: Optional[StartPosition] = None,
           stop: Optional[StopPosition] = None) -> beam.Pipeline:
  # Prism options (pipelines/prism.py) name their runner; everything else runs on FnApiRunner.
  p = beam.Pipeline(runner=None if prism.is_prism(options) else make_runner(), options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions), drain_file=str(drain_file), start=start,
                  stop=stop)
  return p


class _Rounds:
  """The FnApiRunner plan: one bounded pipeline after another (see the module doc).

  Streaming: each round reads from the committed offsets to the end offsets it sees.
  Batch: each round reads from the committed offsets towards the end offsets seen when
  the run started, and the run ends when it reaches them (or a round finds nothing
  left: offsets that hold no record, such as trailing transaction markers, are never
  committed). Either way a round reads at most ``--round_max_records`` records (an
  equal share per partition), because FnApiRunner keeps a stage's whole output in
  memory until the stage ends: rounds keep memory flat however large the backlog.
  """

  def __init__(self, o: SmartGridOptions, view: "_KafkaView", batch: bool):
    self._o = o
    self._view = view
    partitions = len(view.tps) or 1
    self._cap = max(1, -(-o.round_max_records // partitions))  # ceil: a share per partition
    self.target = None
    if batch:
      end, _ = view.offsets()
      self.target = tuple(sorted((tp.topic, tp.partition, e) for tp, e in end.items()))
    self.count = 0

  def stop(self) -> StopPosition:
    if self.target is None:
      return StopPosition("end", max_records=self._cap)
    return StopPosition("offsets", offsets=self.target, max_records=self._cap)

  def start(self) -> StartPosition:
    # The first round starts where --start says; later ones where the last one committed.
    return parse_start(self._o.start if self.count == 0 else "committed")

  def batch_done(self) -> bool:
    _, committed = self._view.offsets()
    targets = {(t, p): offset for t, p, offset in self.target}
    return all((committed.get(tp) or 0) >= targets.get((tp.topic, tp.partition), 0)
               for tp in committed)


def _wait_for_new_data(view: "_KafkaView", drain_file: Path, poll_ms: int) -> bool:
  """Blocks (about poll_ms at a time) until a partition has uncommitted records or a drain."""
  deadline = time.monotonic() + poll_ms / 1000.0
  while not drain_file.exists():
    end, committed = view.offsets()
    if any(e > (committed.get(tp) or 0) for tp, e in end.items()):
      return True
    if time.monotonic() >= deadline:
      return False
    time.sleep(min(0.2, poll_ms / 1000.0))
  return False


def make_runner() -> FnApiRunner:
  # The embedded SDK worker weighs every cached state value with objsize; for
  # GroupIntoBatches' per-element bag appends that is ~40% of the pipeline's
  # time (facts.md). Its state lives in this process either way: no cache.
  worker_handlers.STATE_CACHE_SIZE_MB = 0
  return FnApiRunner()


def run(options: PipelineOptions, mode: str, argv: Optional[list] = None) -> int:
  o = options.view_as(SmartGridOptions)
  RUN_DIR.mkdir(parents=True, exist_ok=True)
  drain_file = Path(o.drain_file) if o.drain_file else default_drain_file(mode)
  drain_file.parent.mkdir(parents=True, exist_ok=True)
  drain_file.unlink(missing_ok=True)
  pidf = pid_file(mode) if not o.drain_file else Path(f"{drain_file}.pid")
  pidf.write_text(str(os.getpid()))
  progress.reset()
  if o.local_workers > 1 and not prism.is_prism(options):
    try:
      return workers.supervise(argv or [], o, mode, drain_file, lambda: _KafkaView(o))
    except KafkaError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    finally:
      pidf.unlink(missing_ok=True)

  def drain(signal_name: str) -> None:
    print(f"\n{signal_name}: draining (stop reading, flush windows, batches and sink, commit). "
          "Signal again to abort.", file=sys.stderr, flush=True)
    DrainSignal.request(str(drain_file))

  signals = StopSignals(drain)

  # Prism streams for real (pipelines/prism.py): one unbounded pipeline, no rounds.
  on_prism = prism.is_prism(options)
  stop = parse_stop(o.stop)
  use_rounds = not on_prism and (stop.kind == "never" or stop.kind == "end")
  view = None
  try:
    if on_prism:
      options = prism.prism_options(options)  # PrismNotBuilt (a ValueError) names the fix
    view = _KafkaView(o)
    plan = _Rounds(o, view, batch=stop.kind == "end") if use_rounds else None
    first = (_build(options, drain_file, start=plan.start(), stop=plan.stop()) if plan
             else _build(options, drain_file))
  except (KafkaUnavailableError, KafkaError, ValueError) as e:
    pidf.unlink(missing_ok=True)
    if view is not None:
      view.close()
    print(f"error: {e}", file=sys.stderr)
    return 2
  started = time.monotonic()
  outcome: dict = {}

  def target():
    try:
      pipeline = first
      while True:
        read_before = sum(progress.snapshot()["read"].values())
        pipeline.run().wait_until_finish()
        if plan is None or drain_file.exists():
          break
        plan.count += 1
        if plan.target is not None:  # batch
          if plan.batch_done() or sum(progress.snapshot()["read"].values()) == read_before:
            break
        else:  # streaming: the next round starts when there is something to read
          while not _wait_for_new_data(view, drain_file, o.poll_timeout_ms):
            if drain_file.exists():
              break
          if drain_file.exists():
            break
        pipeline = _build(options, drain_file, start=plan.start(), stop=plan.stop())
      outcome["state"] = "DONE"
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
      outcome["error"] = e

  worker = threading.Thread(target=target, name="pipeline", daemon=True)
  worker.start()
  try:
    while worker.is_alive():
      worker.join(timeout=o.progress_secs or 1.0)
      if worker.is_alive() and o.progress_secs:
        print(progress_line(view, started), file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    error = outcome.get("error")
    state = "drained" if signals.draining else "finished"
    if error is not None:
      state = "FAILED"
    print(summary(view, elapsed, state), file=sys.stderr, flush=True)
    if error is not None:
      print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
      return 1
    return 0
  finally:
    view.close()
    pidf.unlink(missing_ok=True)
    drain_file.unlink(missing_ok=True)
