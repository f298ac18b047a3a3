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

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import apache_beam as beam
from kafka.errors import KafkaError
from tenacity import Retrying, retry_if_exception, wait_exponential_jitter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers

from pipelines import smartgrid
from runners import prism, workers
from runners.kafka_view import KafkaView, is_first_worker, is_kafka_error, unreachable_message
from runners.stopping import SUPERVISED_ENV, StopSignals, offsets_table
from pipelines.options import SmartGridOptions
from transforms import progress
from transforms.kafka import KafkaUnavailableError
from transforms.kafka.drain import DrainSignal
from transforms.kafka.positions import StartPosition, StopPosition, parse_start, parse_stop

_LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
RUN_DIR = REPO / ".run"


def pid_file(mode: str) -> Path:
  return RUN_DIR / f"{mode}-pipeline.pid"


def default_drain_file(mode: str) -> Path:
  return RUN_DIR / f"{mode}-pipeline.drain"


def _lag_by_topic(end: dict, committed: dict) -> dict:
  lag: dict = {}
  for tp, e in end.items():
    lag[tp.topic] = lag.get(tp.topic, 0) + e - (committed.get(tp) or 0)
  return lag


class ProgressLine:
  """The launcher's progress line: totals, the CURRENT rate (over the last interval), lag."""

  def __init__(self, view: KafkaView, rounds=None):
    self._view = view
    self._rounds = rounds  # -> rounds done so far (FnApiRunner's plan), or None
    self._started = self._last_t = time.monotonic()
    self._last_written = 0

  def __call__(self) -> str:
    s = progress.snapshot()
    written = sum(s["written"].values())
    now = time.monotonic()
    rate = (written - self._last_written) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_written = now, written
    head = f"[{now - self._started:6.0f}s]"
    if self._rounds is not None:
      head += f" round {self._rounds()}"
    parts = [f"{head} read {sum(s['read'].values())}",
             f"written {written} ({rate:,.0f}/s now)",
             f"dead letters {sum(s['dead_letters'].values())}"]
    status = self._view.status()
    if status:
      return " | ".join(parts + [status])
    if self._view.missing:
      parts.append("waiting for topic(s) " + ", ".join(self._view.missing))
    try:
      lag = _lag_by_topic(*self._view.offsets())
      parts.append("lag " + (", ".join(f"{t}={n}" for t, n in sorted(lag.items())) or "-"))
    except Exception:  # noqa: BLE001 - the progress line must never stop the pipeline
      parts.append(self._view.status() or "lag unknown")
    return " | ".join(parts)


def _batches_line(b: dict, batch_size: int, streaming: bool) -> Optional[str]:
  if not b.get("all"):
    return None
  full, partial = b.get("full", 0), b["all"] - b.get("full", 0)
  line = f"  batches:        {b['all']} ({full} full of {batch_size} rows"
  if partial:
    why = ("the buffering timer (--max_buffering_secs), window ends and round ends flush them: "
           "expected when fewer rows of a key arrive per window" if streaming else
           "the last rows of each key and window at the end of the run")
    line += f"; {partial} partial: {why}"
  return line + ")"


def summary(view: KafkaView, elapsed: float, state: str, o: SmartGridOptions) -> str:
  s = progress.snapshot()
  lines = [f"Pipeline {state} after {elapsed:.1f}s."]
  lines.append("  records read:   " + (", ".join(f"{t}={n}" for t, n in sorted(s["read"].items())) or "0"))
  lines.append("  rows written:   " + (", ".join(f"{t}={n}" for t, n in sorted(s["written"].items())) or "0"))
  if s["dead_letters"]:
    lines.append("  dead letters:   " + ", ".join(f"{r}={n}" for r, n in sorted(s["dead_letters"].items())))
  if s["rejected"]:
    lines.append("  sink rejected:  " + ", ".join(f"{t}={n}" for t, n in sorted(s["rejected"].items())))
  if s["duplicates"]:
    lines.append("  duplicate events (later copies of a stored event_id, acked, not written): "
                 + ", ".join(f"{t}={n}" for t, n in sorted(s["duplicates"].items())))
  batches = _batches_line(s["batches"], o.batch_size, parse_stop(o.stop).kind == "never")
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


def _build(options: PipelineOptions, drain_file: Path, *, start: Optional[StartPosition] = None,
           stop: Optional[StopPosition] = None) -> beam.Pipeline:
  # Prism options (runners/prism.py) name their runner; everything else runs on FnApiRunner.
  p = beam.Pipeline(runner=None if prism.is_prism(options) else make_runner(), options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions), drain_file=str(drain_file), start=start,
                  stop=stop, skip_missing_topics=True)
  return p


class _Rounds:
  """The FnApiRunner plan: one bounded pipeline after another (see the module doc).

  Streaming: each round reads from the committed offsets to the end offsets it sees.
  Batch: each round reads from the committed offsets towards the end offsets seen when
  the run started, and the run ends when it reaches them (or a round finds nothing
  left). Either way a round reads at most ``--round_max_records`` records (an equal
  share per partition), because FnApiRunner keeps a stage's whole output in memory
  until the stage ends: rounds keep memory flat however large the backlog.
  """

  def __init__(self, o: SmartGridOptions, view: KafkaView, batch: bool):
    self._o = o
    self._view = view
    self.target = None
    if batch:
      end, _ = view.offsets()
      self.target = tuple(sorted((tp.topic, tp.partition, e) for tp, e in end.items()))
    self.count = 0  # rounds that succeeded

  def stop(self) -> StopPosition:
    cap = max(1, -(-self._o.round_max_records // (len(self._view.tps) or 1)))  # a share each
    if self.target is None:
      return StopPosition("end", max_records=cap)
    return StopPosition("offsets", offsets=self.target, max_records=cap)

  def start(self) -> StartPosition:
    # The first round starts where --start says; later ones where the last one committed
    # (which includes each partition's resolved start: CommitOffsets commits it).
    return parse_start(self._o.start if self.count == 0 else "committed")

  def batch_done(self) -> bool:
    _, committed = self._view.offsets()
    targets = {(t, p): offset for t, p, offset in self.target}
    return all((committed.get(tp) or 0) >= targets.get((tp.topic, tp.partition), 0)
               for tp in committed)


class _Launcher:
  """Runs the plan in the pipeline thread: rounds (streaming or batch) or one pipeline."""

  IDLE_CHECK_S = 0.5

  def __init__(self, options: PipelineOptions, view: KafkaView, drain_file: Path,
               plan: Optional[_Rounds]):
    self.options = options
    self.o = options.view_as(SmartGridOptions)
    self.view = view
    self.drain_file = drain_file
    self.plan = plan
    self._speak = is_first_worker(self.o)

  def draining(self) -> bool:
    return self.drain_file.exists()

  def run(self) -> None:
    try:
      if self.plan is None:
        self._with_kafka_retries(lambda: _build(self.options, self.drain_file).run().wait_until_finish())
      elif self.plan.target is None:
        self._stream()
      else:
        self._batch()
    except _DrainedInOutage:
      _LOGGER.warning("drained while Kafka was unreachable: nothing unwritten was committed")

  def _with_kafka_retries(self, fn):
    """fn(), retried with backoff while it fails because of Kafka (until a drain)."""
    def before_sleep(state):
      self.view.mark_down()
      _LOGGER.warning("Kafka unreachable (%s); retrying in %.1fs", _short(state.outcome.exception()),
                      state.next_action.sleep)
    retrying = Retrying(retry=retry_if_exception(is_kafka_error), reraise=True,
                        wait=wait_exponential_jitter(initial=1, max=30),
                        stop=lambda _state: self.draining(), before_sleep=before_sleep)
    try:
      return retrying(fn)
    except Exception as e:  # noqa: BLE001 - a drain during an outage ends the run cleanly
      if self.draining() and is_kafka_error(e):
        raise _DrainedInOutage() from e
      raise

  def _round(self) -> None:
    def attempt():
      stop = self.plan.stop()
      _build(self.options, self.drain_file, start=self.plan.start(), stop=stop).run().wait_until_finish()
    self._with_kafka_retries(attempt)
    self.plan.count += 1

  def _batch(self) -> None:
    while not self.draining():
      read_before = sum(progress.snapshot()["read"].values())
      self._round()
      if sum(progress.snapshot()["read"].values()) == read_before:
        return
      if self._with_kafka_retries(self.plan.batch_done):
        return

  def _stream(self) -> None:
    last_round = None
    while not self.draining():
      if not self._topics_ready():
        continue
      if last_round is not None and not self._due(last_round):
        continue
      self._round()
      last_round = time.monotonic()

  def _topics_ready(self) -> bool:
    before = set(self.view.missing)
    try:
      missing = self.view.refresh()
    except KafkaError:
      self._sleep(self._backoff())
      return False
    if self._speak and before - set(missing):
      _LOGGER.info("topic(s) %s now exist: reading them", ", ".join(sorted(before - set(missing))))
    if not self.view.tps:
      self._sleep(self.IDLE_CHECK_S * 2)
      return False
    return True

  def _due(self, last_round: float) -> bool:
    """Whether a round is due: new data, or the re-commit interval is over. Blocks a while."""
    deadline = time.monotonic() + self.o.poll_timeout_ms / 1000.0
    while not self.draining():
      if time.monotonic() - last_round >= self.o.recommit_interval_secs:
        return True
      try:
        end, committed = self.view.offsets()
      except KafkaError:
        self._sleep(self._backoff())
        return False
      if any(e > (committed.get(tp) or 0) for tp, e in end.items()):
        return True
      if time.monotonic() >= deadline:
        return False
      self._sleep(self.IDLE_CHECK_S)
    return False

  def _backoff(self) -> float:
    down = time.time() - (self.view.down_since or time.time())
    return min(30.0, 1.0 + down / 4)

  def _sleep(self, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not self.draining() and time.monotonic() < deadline:
      time.sleep(min(0.2, seconds))


class _DrainedInOutage(Exception):
  """A drain was requested while Kafka did not answer: the run ends with what it committed."""


def _short(e: Optional[BaseException]) -> str:
  text = f"{type(e).__name__}: {e}".splitlines()[0] if e is not None else "?"
  return text[:200]


def make_runner() -> FnApiRunner:
  # The embedded SDK worker weighs every cached state value with objsize; for
  # GroupIntoBatches' per-element bag appends that is ~40% of the pipeline's
  # time (facts.md). Its state lives in this process either way: no cache.
  worker_handlers.STATE_CACHE_SIZE_MB = 0
  return FnApiRunner()


def run(options: PipelineOptions, mode: str, argv: Optional[list] = None) -> int:
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
  progress.reset()
  if o.local_workers > 1 and not prism.is_prism(options):
    try:
      return workers.supervise(argv or [], o, mode, drain_file, lambda: KafkaView(o))
    except KafkaError as e:
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
      return 2
    finally:
      pidf.unlink(missing_ok=True)

  def drain(signal_name: str) -> None:
    print(f"\n{signal_name}: draining (stop reading, flush windows, batches and sink, commit). "
          "Signal again to abort.", file=sys.stderr, flush=True)
    DrainSignal.request(str(drain_file))

  signals = StopSignals(drain)
  try:
    return _run_here(options, drain_file, signals)
  finally:
    pidf.unlink(missing_ok=True)
    drain_file.unlink(missing_ok=True)


def _prepare(options: PipelineOptions, view: KafkaView, drain_file: Path) -> Optional[int]:
  """Checks the topics before the first round: an exit code when there is nothing to run."""
  o = options.view_as(SmartGridOptions)
  missing, speak = view.missing, is_first_worker(o)
  if not missing:
    return None
  names = ", ".join(missing)
  if parse_stop(o.stop).kind != "never":  # batch
    if o.require_topics:
      print(f"error: --require_topics: topic(s) {names} do not exist on {o.bootstrap_servers}",
            file=sys.stderr)
      return 2
    if speak:
      print(f"nothing to read: topic(s) {names} do not exist on {o.bootstrap_servers}",
            file=sys.stderr, flush=True)
    return None if view.tps else 0
  if speak:
    print(f"waiting for topic(s) {names} to be created on {o.bootstrap_servers}"
          + (" (reading the others meanwhile)" if view.tps else ""), file=sys.stderr, flush=True)
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
    plan = _Rounds(o, view, batch=stop.kind == "end") if use_rounds else None
  except (KafkaUnavailableError, KafkaError, ValueError) as e:
    if view is not None:
      view.close()
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    return _watch(_Launcher(options, view, drain_file, plan), o, signals)
  finally:
    view.close()


def _watch(launcher: _Launcher, o: SmartGridOptions, signals: StopSignals) -> int:
  """Runs the launcher in the pipeline thread; prints progress lines, then the summary."""
  started = time.monotonic()
  outcome: dict = {}

  def target():
    try:
      launcher.run()
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
      outcome["error"] = e

  worker = threading.Thread(target=target, name="pipeline", daemon=True)
  worker.start()
  plan = launcher.plan
  line = ProgressLine(launcher.view, None if plan is None else (lambda: plan.count))
  shared = workers.progress_file(launcher.drain_file) if os.environ.get(SUPERVISED_ENV) else None
  while worker.is_alive():
    worker.join(timeout=o.progress_secs or 1.0)
    if worker.is_alive() and o.progress_secs:
      print(line(), file=sys.stderr, flush=True)
    if shared is not None:  # the supervisor's progress line sums the workers' counters
      workers.write_progress(shared, progress.snapshot())
  error = outcome.get("error")
  state = "FAILED" if error is not None else ("drained" if signals.draining else "finished")
  print(summary(launcher.view, time.monotonic() - started, state, o), file=sys.stderr, flush=True)
  if error is not None:
    line = _error_line(error)
    print(f"error: {line}", file=sys.stderr)
    return 2 if line.startswith("OffsetGapError") else 1  # 2: a restart would repeat it
  return 0


def _error_line(error: BaseException) -> str:
  """The error as the user should read it: an offset gap's own message, not the runner's
  wrapping of it (FnApiRunner re-raises a DoFn's error inside a traceback text)."""
  text = f"{type(error).__name__}: {error}"
  for line in text.splitlines():
    if "OffsetGapError: " in line:
      return line[line.index("OffsetGapError: "):]
  return text
