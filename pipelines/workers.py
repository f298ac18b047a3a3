"""``--local_workers=N``: the local pipeline in N processes, each on its share of the partitions.

One FnApiRunner process runs on one core. With N workers, each runs the same
pipeline (``--partition_shard=i/N``: every N-th topic-partition), so each commits
only its own partitions and they share nothing but the sink, whose writes are
idempotent and retried when the store is busy. The guarantees are those of one
worker, per partition.

The supervisor forks the workers before it opens any connection or thread, so
they start with Beam already imported (a second or so saved per worker), each in
its own session (a terminal's Ctrl-C reaches only the supervisor) with a
parent-death signal (they die with it); each then runs ``pipelines.main`` on its
own arguments. The supervisor
forwards the first SIGINT/SIGTERM to each as one SIGTERM (each drains), and on a
second signal kills them and exits 130. It prints a progress line from the
group's committed offsets and, at the end, the committed/end offsets; each
worker prints its own summary.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from pipelines.options import SmartGridOptions
from pipelines.stopping import StopSignals, offsets_table

REPO = Path(__file__).resolve().parent.parent
_OWN_FLAGS = ("--local_workers", "--partition_shard", "--drain_file", "--progress_secs", "--mode")


def _die_with_parent() -> None:  # runs in the worker between fork and exec
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_argv(argv: list[str], mode: str, index: int, count: int, drain_file: Path) -> list[str]:
  """The supervisor's arguments for worker index/count (its own flags replaced)."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg.split("=", 1)[0]
    if name in _OWN_FLAGS:
      skip = "=" not in arg
      continue
    out.append(arg)
  return [sys.executable, "-m", "pipelines.main", f"--mode={mode}", *out, "--local_workers=1",
          f"--partition_shard={index}/{count}", f"--drain_file={drain_file}.{index}",
          "--progress_secs=0"]


def _committed_line(end: dict, committed: dict, started: float, baseline: int) -> str:
  done = sum(c or 0 for c in committed.values())
  elapsed = max(time.monotonic() - started, 1e-9)
  lag = sum(e - (committed.get(tp) or 0) for tp, e in end.items())
  return f"committed {done - baseline} this run ({(done - baseline) / elapsed:,.0f}/s) | lag {lag}"


class _Worker:
  """A forked worker: poll/send_signal/kill/returncode like a Popen."""

  def __init__(self, argv: list[str]):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
      code = 1
      try:
        os.setsid()
        _die_with_parent()
        for sig in (signal.SIGINT, signal.SIGTERM):
          signal.signal(sig, signal.SIG_DFL)
        from pipelines import main  # pylint: disable=import-outside-toplevel
        code = main.main(argv)
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


def supervise(argv: list[str], o: SmartGridOptions, mode: str, drain_file: Path,
              make_view) -> int:
  n = o.local_workers
  workers = [_Worker(worker_argv(argv, mode, i, n, drain_file)[3:]) for i in range(n)]
  try:
    view = make_view()
  except BaseException:
    for w in workers:
      w.kill()
      while w.poll() is None:
        time.sleep(0.05)
    raise
  try:
    return _watch(workers, view, o, n)
  finally:
    view.close()


def _watch(workers: list, view, o: SmartGridOptions, n: int) -> int:
  baseline = sum(c or 0 for c in view.offsets()[1].values())

  def drain(signal_name: str) -> None:
    print(f"\n{signal_name}: draining {n} workers. Signal again to abort.", file=sys.stderr,
          flush=True)
    for w in workers:
      w.send_signal(signal.SIGTERM)

  def kill_all() -> None:
    for w in workers:
      w.kill()

  signals = StopSignals(drain, kill_all)
  started = time.monotonic()
  next_line = started + (o.progress_secs or 0)
  while any(w.poll() is None for w in workers):
    time.sleep(0.2)
    if o.progress_secs and time.monotonic() >= next_line:
      next_line += o.progress_secs
      elapsed = time.monotonic() - started
      print(f"[{elapsed:6.0f}s] " + _committed_line(*view.offsets(), started, baseline),
            file=sys.stderr, flush=True)
  codes = [w.returncode for w in workers]
  state = "drained" if signals.draining else "finished"
  if any(codes):
    state = "FAILED"
  end, committed = view.offsets()
  lines = [f"All {n} workers {state} after {time.monotonic() - started:.1f}s (exit codes {codes}).",
           "  " + _committed_line(end, committed, started, baseline), *offsets_table(end, committed)]
  print("\n".join(lines), file=sys.stderr, flush=True)
  return 0 if not any(codes) else 1
