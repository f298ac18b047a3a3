"""How the benchmarks measure a command: wall time, CPU of its whole process tree, peak RSS
of each of its processes, and the time to the first offset committed to a consumer group
(seen from another client, as an operator would see it).

CPU comes from ``wait4`` on the child (the kernel adds every descendant the child reaped);
the per-process peaks come from sampling ``VmHWM`` (a high-water mark, so a sample misses
only growth in the last interval before a process exits) of the child and all its
descendants in /proc, each from its exec on (before it, a child shows its parent's memory).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_LOGGER = logging.getLogger(__name__)
SAMPLE_SECS = 0.2
COMMIT_POLL_SECS = 0.05


@dataclasses.dataclass
class Measured:
  """One command's run: wall seconds, CPU seconds of the tree, peak RSS (MB) per process."""

  wall_s: float
  cpu_s: float
  rss_mb: dict[int, float]
  returncode: int
  stderr: str
  first_commit_s: float | None = None

  @property
  def peak_rss_mb(self) -> float:
    """The largest process's peak RSS."""
    return max(self.rss_mb.values(), default=0.0)


def _children_map() -> dict[int, list[int]]:
  kids: dict[int, list[int]] = {}
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      stat = Path(entry.path, "stat").read_bytes()
    except OSError:
      continue
    ppid = int(stat.rsplit(b")", 1)[1].split()[1])
    kids.setdefault(ppid, []).append(int(entry.name))
  return kids


def _tree(root: int) -> list[int]:
  kids, out, todo = _children_map(), [], [root]
  while todo:
    pid = todo.pop()
    out.append(pid)
    todo.extend(kids.get(pid, ()))
  return out


def _cmdline(pid: int) -> bytes | None:
  try:
    return Path(f"/proc/{pid}/cmdline").read_bytes()
  except OSError:
    return None


def _hwm_mb(pid: int) -> float | None:
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


class _RssSampler(threading.Thread):
  """Keeps the highest VmHWM seen of every process in root's tree until stopped."""

  def __init__(self, root: int):
    super().__init__(daemon=True, name="rss-sampler")
    self.root, self.peaks, self.done = root, {}, threading.Event()

  def run(self) -> None:
    programs: dict[int, bytes] = {}
    while not self.done.is_set():
      for pid in _tree(self.root):
        program, mb = _cmdline(pid), _hwm_mb(pid)
        if mb is None or program is None:
          continue
        # Between fork and exec a child still shows its parent's memory (a benchmark driver
        # or pytest, hundreds of MB): a new program starts its own high-water mark.
        if programs.get(pid) != program:
          programs[pid], self.peaks[pid] = program, mb
        elif mb > self.peaks[pid]:
          self.peaks[pid] = mb
      self.done.wait(SAMPLE_SECS)


class CommitWatch(threading.Thread):
  """Polls a group's committed offsets from a client of its own; ``first`` is the monotonic
  time the group first committed an offset on ``topics`` other than those it had when the
  watch was made."""

  def __init__(self, bootstrap: str, group: str, topics: Sequence[str]):
    super().__init__(daemon=True, name="commit-watch")
    from kafka import KafkaAdminClient  # pylint: disable=import-outside-toplevel

    self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    self.group, self.topics = group, set(topics)
    self.baseline = self._committed()
    self.first: float | None = None
    self.done = threading.Event()

  def _committed(self) -> dict:
    try:
      offsets = self.admin.list_group_offsets(self.group).get(self.group, {})
    except Exception as e:  # noqa: BLE001 - the group may not exist yet
      _LOGGER.debug("committed offsets of %s: %s", self.group, e)
      return {}
    return {
      tp: om.offset for tp, om in offsets.items() if tp.topic in self.topics and om.offset >= 0
    }

  def run(self) -> None:
    try:
      while not self.done.is_set():
        now = self._committed()
        if any(self.baseline.get(tp) != offset for tp, offset in now.items()):
          self.first = time.monotonic()
          return
        self.done.wait(COMMIT_POLL_SECS)
    finally:
      self.admin.close()


def run_measured(
  argv: Sequence[str], env: dict, cwd: Path, *, watch: CommitWatch | None = None, while_running=None
) -> Measured:
  """Runs argv to its end and measures it. ``while_running(proc)`` is called once after the
  start (e.g. to wait for a condition and send a signal); ``watch`` is started with it."""
  t0 = time.monotonic()
  proc = subprocess.Popen(
    list(argv), cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
  )
  if watch is not None:
    watch.start()
  sampler = _RssSampler(proc.pid)
  sampler.start()
  err_lines: list[str] = []
  reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
  reader.start()
  if while_running is not None:
    while_running(proc)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.monotonic() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)
  sampler.done.set()
  sampler.join()
  reader.join(timeout=10)
  if watch is not None:
    watch.done.set()
    watch.join(timeout=5)
  # Not the kernel's ru_maxrss: it keeps the high-water mark a child had before its exec,
  # which is the launching process's size.
  peaks = dict(sampler.peaks)
  first = None if watch is None or watch.first is None else watch.first - t0
  return Measured(
    wall, usage.ru_utime + usage.ru_stime, peaks, proc.returncode, "".join(err_lines), first
  )
