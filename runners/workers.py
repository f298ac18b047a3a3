"""``--local_workers=N``: the local pipeline in N processes, each on its share of the partitions.

One FnApiRunner process runs on one core. With N workers, each runs the same
pipeline (``--partition_shard=i/N``: every N-th topic-partition), so each commits
only its own partitions and they share nothing but the sink, whose writes are
idempotent and retried when the store is busy. The guarantees are those of one
worker, per partition.

The supervisor forks the workers before it opens any connection or thread, so
they start with Beam already imported (a second or so saved per worker), each in
its own session (a terminal's Ctrl-C reaches only the supervisor) with a
parent-death signal (they die with it); each then calls ``local.run_worker`` (handed
to ``supervise``) with the supervisor's parsed options and its shard. The supervisor
forwards the first SIGINT/SIGTERM to each as one SIGTERM (each drains), and on a
second signal kills them and exits 130. Workers absorb repeated signals
(``stopping.SUPERVISED_ENV``): a SIGTERM sent to every process at once drains.
It prints a progress line from the group's committed offsets and, at the end, the
committed/end offsets; each worker prints its own summary.

Self-healing: a worker that dies when no drain was asked (a crash, the OOM killer,
a SIGKILL) is started again (a fresh ``python -m runners.worker`` process, which reads the
options from its stdin: nothing on disk or in argv) after a
backoff of 1, 2, 4, ... s; it resumes from its partitions' committed offsets, and
the idempotent sink absorbs what it wrote twice. More than ``MAX_RESTARTS`` restarts
of one worker within ``RESTART_WINDOW_S`` drain the others and end the run with
exit 1, naming that worker's partitions.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import smartgrid
from pipelines.options import SmartGridOptions
from runners.stopping import SUPERVISED_ENV, StopSignals, offsets_table

_LOGGER = logging.getLogger(__name__)
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0

REPO = Path(__file__).resolve().parent.parent

# local.run_worker(options, mode, index, count, drain_file) -> exit code
RunWorker = Callable[[PipelineOptions, str, int, int, Path], int]


def _die_with_parent() -> None:  # runs in the worker between fork and exec
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_drain_file(drain_file: Path, index: int) -> Path:
  return Path(f"{drain_file}.{index}")


def _own_flags(options: PipelineOptions) -> dict:
  """The values of every SmartGridOptions flag that is set (defaults included: some are
  computed at start, e.g. --bootstrap_servers from $KAFKA_PORT)."""
  parser = argparse.ArgumentParser(add_help=False)
  SmartGridOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  o = options.view_as(SmartGridOptions)
  values = {a.dest: getattr(o, a.dest, None) for a in parser._actions}  # pylint: disable=protected-access
  return {k: v for k, v in values.items() if v is not None}


def worker_job(
  options: PipelineOptions, mode: str, index: int, count: int, drain_file: Path
) -> dict:
  """What a restarted worker needs to call run_worker, as JSON-able values: the
  supervisor's options (Beam's ``get_all_options``), its mode and its shard."""
  flags = {**options.get_all_options(drop_default=True), **_own_flags(options)}
  return {
    "options": flags,
    "mode": mode,
    "index": index,
    "count": count,
    "drain_file": str(drain_file),
  }


def options_of(job: dict) -> PipelineOptions:
  return PipelineOptions.from_dictionary(job["options"])


def progress_file(worker_drain_file: Path) -> Path:
  """Where a worker leaves its progress counters for the supervisor's progress line."""
  return Path(f"{worker_drain_file}.progress")


def write_progress(path: Path, snapshot: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps({k: snapshot[k] for k in ("read", "written", "dead_letters")}))
  os.replace(tmp, path)  # the supervisor never reads half a file


def _workers_totals(drain_file: Path, n: int) -> dict:
  """The workers' counters summed: read, written, dead letters (missing files count 0)."""
  totals = {"read": 0, "written": 0, "dead_letters": 0}
  for i in range(n):
    # The worker's file, and those its earlier incarnations left (kept when it restarted).
    for path in _progress_files(Path(f"{drain_file}.{i}")):
      try:
        counters = json.loads(path.read_text())
      except (OSError, ValueError):
        continue
      for key in totals:
        totals[key] += sum(counters.get(key, {}).values())
  return totals


def _remove_progress_files(drain_file: Path, n: int) -> None:
  for i in range(n):
    for path in _progress_files(Path(f"{drain_file}.{i}")):
      path.unlink(missing_ok=True)


def _progress_files(worker_drain_file: Path) -> list:
  current = progress_file(worker_drain_file)
  return [current, *current.parent.glob(current.name + ".before-*")]


class _ProgressLine:
  """The supervisor's progress line: the workers' totals, the CURRENT write rate, lag."""

  def __init__(self, view, drain_file: Path, n: int):
    self._view, self._drain_file, self._n = view, drain_file, n
    self._started = self._last_t = time.monotonic()
    self._last_written = 0

  def __call__(self) -> str:
    now = time.monotonic()
    t = _workers_totals(self._drain_file, self._n)
    rate = (t["written"] - self._last_written) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_written = now, t["written"]
    head = (
      f"[{now - self._started:6.0f}s] read {t['read']} | written {t['written']} "
      f"({rate:,.0f}/s now) | dead letters {t['dead_letters']}"
    )
    try:
      if self._view.refresh():
        return f"{head} | waiting for topic(s) " + ", ".join(self._view.missing)
      end, committed = self._view.offsets()
      return f"{head} | lag {sum(e - (committed.get(tp) or 0) for tp, e in end.items())}"
    except Exception as e:  # noqa: BLE001 - the progress line must never stop the supervisor
      status = getattr(self._view, "status", lambda: None)()
      return f"{head} | " + (status or f"lag unknown ({type(e).__name__})")


def _committed_line(end: dict, committed: dict, started: float, baseline: int) -> str:
  done = sum(c or 0 for c in committed.values())
  elapsed = max(time.monotonic() - started, 1e-9)
  lag = sum(e - (committed.get(tp) or 0) for tp, e in end.items())
  return f"committed {done - baseline} this run ({(done - baseline) / elapsed:,.0f}/s) | lag {lag}"


class _Worker:
  """A forked worker: poll/send_signal/kill/returncode like a Popen."""

  def __init__(self, start: Callable[[], int]):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
      code = 1
      try:
        os.setsid()
        _die_with_parent()
        os.environ[SUPERVISED_ENV] = "1"
        for sig in (signal.SIGINT, signal.SIGTERM):
          signal.signal(sig, signal.SIG_DFL)
        code = start()
      except BaseException:  # noqa: BLE001 - the worker's exit code says it failed
        import traceback  # pylint: disable=import-outside-toplevel

        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    self.pid = pid
    self.returncode = None

  def poll(self):
    if self.returncode is None:
      pid, status = os.waitpid(self.pid, os.WNOHANG)
      if pid:
        self.returncode = os.waitstatus_to_exitcode(status)
    return self.returncode

  def send_signal(self, sig) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


class _Restarted:
  """A worker started again: a fresh interpreter (the supervisor has threads and sockets
  by now, so it does not fork again) running ``runners.worker``, which reads its job
  (``worker_job``) from its stdin. Same interface as _Worker."""

  def __init__(self, job: dict):
    # The repository on the path, the working directory kept (relative paths in options).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, SUPERVISED_ENV: "1", "PYTHONPATH": path}
    # The shard in argv only labels the process (ps, top); the job comes on stdin.
    label = f"--partition_shard={job['index']}/{job['count']}"
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "runners.worker", label],
      env=env,
      stdin=subprocess.PIPE,
      start_new_session=True,
      preexec_fn=_die_with_parent,
    )
    with self._proc.stdin:
      self._proc.stdin.write(json.dumps(job).encode())
    self.pid = self._proc.pid
    self.returncode = None

  def poll(self):
    self.returncode = self._proc.poll()
    return self.returncode

  def send_signal(self, sig) -> None:
    if self.poll() is None:
      self._proc.send_signal(sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


class _Slot:
  """One worker position (its partition shard) and its restart history."""

  def __init__(self, index: int, job: dict, proc):
    self.index = index
    self.job = job
    self.drain_file = worker_drain_file(Path(job["drain_file"]), index)
    self.proc = proc
    self.restarts: list[float] = []  # monotonic times of restarts
    self.restart_at: float | None = None

  def running(self) -> bool:
    return self.restart_at is not None or self.proc.poll() is None


def supervise(
  options: PipelineOptions, mode: str, drain_file: Path, make_view, run_worker: RunWorker
) -> int:
  o = options.view_as(SmartGridOptions)
  _remove_progress_files(drain_file, o.local_workers)  # a previous run's must not count
  n = o.local_workers
  slots = []
  for i in range(n):
    job = worker_job(options, mode, i, n, drain_file)
    start = lambda i=i: run_worker(options, mode, i, n, drain_file)  # noqa: E731
    slots.append(_Slot(i, job, _Worker(start)))
  try:
    view = make_view()
  except BaseException:
    for slot in slots:
      slot.proc.kill()
      while slot.proc.poll() is None:
        time.sleep(0.05)
    raise
  try:
    return _watch(slots, view, o, n, drain_file)
  finally:
    view.close()
    _remove_progress_files(drain_file, n)


def _partitions_of(view, index: int, n: int) -> str:
  pairs = [(tp.topic, tp.partition) for tp in view.tps]
  return (
    ", ".join(f"{t}-{p}" for t, p in smartgrid.shard_partitions(pairs, f"{index}/{n}")) or "none"
  )


def _heal(slot: _Slot, view, n: int, draining: bool) -> str | None:
  """Restarts a worker that died outside a drain; the failure line once past the limit."""
  if slot.restart_at is not None:
    if draining:
      slot.restart_at = None  # nothing to restart for: the run is ending
    elif time.monotonic() >= slot.restart_at:
      slot.restart_at = None
      counters = progress_file(slot.drain_file)
      if counters.exists():  # what the dead worker did still counts in the progress line
        counters.rename(counters.with_name(f"{counters.name}.before-{len(slot.restarts)}"))
      slot.proc = _Restarted(slot.job)
    return None
  code = slot.proc.poll()
  # 0: done (batch) or drained. 2: a decision the user must take (an offset gap, missing
  # required topics): a restart would only repeat it, so the run stops. Anything else (a
  # crash, a signal) is healed.
  if code is None or code == 0 or draining:
    return None
  if code == 2:
    return (
      f"worker {slot.index} (partitions {_partitions_of(view, slot.index, n)}) stopped "
      f"with exit code 2 (its error is above)"
    )
  now = time.monotonic()
  slot.restarts = [t for t in slot.restarts if now - t < RESTART_WINDOW_S] + [now]
  if len(slot.restarts) > MAX_RESTARTS:
    return (
      f"worker {slot.index} (partitions {_partitions_of(view, slot.index, n)}) died "
      f"{len(slot.restarts)} times within {RESTART_WINDOW_S / 60:.0f} min (last exit code "
      f"{code}); giving up"
    )
  delay = 2.0 ** (len(slot.restarts) - 1)
  print(
    f"worker {slot.index} (partitions {_partitions_of(view, slot.index, n)}) exited with "
    f"{code}; restarting it in {delay:.0f}s (restart {len(slot.restarts)} of at most "
    f"{MAX_RESTARTS} in {RESTART_WINDOW_S / 60:.0f} min)",
    file=sys.stderr,
    flush=True,
  )
  slot.restart_at = now + delay
  return None


def _watch(slots: list, view, o: SmartGridOptions, n: int, drain_file: Path) -> int:
  try:
    baseline = sum(c or 0 for c in view.offsets()[1].values())
  except Exception:  # noqa: BLE001 - Kafka may be down right now; the count starts at 0
    baseline = 0

  def drain(signal_name: str) -> None:
    print(
      f"\n{signal_name}: draining {n} workers. Signal again to abort.", file=sys.stderr, flush=True
    )
    for slot in slots:
      slot.proc.send_signal(signal.SIGTERM)

  def kill_all() -> None:
    for slot in slots:
      slot.proc.kill()

  signals = StopSignals(drain, kill_all)
  line = _ProgressLine(view, drain_file, n)
  started = time.monotonic()
  next_line = started + (o.progress_secs or 0)
  failure = None
  while any(slot.running() for slot in slots):
    time.sleep(0.2)
    for slot in slots:
      failure = failure or _heal(slot, view, n, signals.draining or failure is not None)
    if failure and not signals.draining:
      print(f"error: {failure}; draining the other workers", file=sys.stderr, flush=True)
      signals.count = 1
      drain("worker failure")
    if o.progress_secs and time.monotonic() >= next_line:
      next_line += o.progress_secs
      print(line(), file=sys.stderr, flush=True)
  return _report(slots, view, n, started, baseline, signals, failure)


def _report(slots, view, n, started, baseline, signals, failure) -> int:
  codes = [slot.proc.returncode for slot in slots]
  restarts = sum(len(slot.restarts) for slot in slots)
  state = "drained" if signals.draining else "finished"
  if failure or any(codes):
    state = "FAILED"
  lines = [
    f"All {n} workers {state} after {time.monotonic() - started:.1f}s (exit codes {codes}"
    + (f", {restarts} restarts" if restarts else "")
    + ")."
  ]
  try:
    view.refresh()
    end, committed = view.offsets()
    lines.append("  " + _committed_line(end, committed, started, baseline))
    if end:
      lines.extend(offsets_table(end, committed))
  except Exception as e:  # noqa: BLE001 - the summary is printed whatever Kafka says
    lines.append(f"  committed offsets unknown: {type(e).__name__}: {e}")
  if failure:
    lines.append(f"error: {failure}")
  print("\n".join(lines), file=sys.stderr, flush=True)
  if failure or any(codes):
    return 2 if failure and "exit code 2" in failure else 1
  return 0
