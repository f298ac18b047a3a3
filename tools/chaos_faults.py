"""The chaos run's moving parts: the local pipeline as a process tree, and the faults.

``PipelineProcess`` starts ``python -m runners.main --mode=local`` in its own session
and finds its whole tree through ``/proc/<pid>/task/*/children`` (the workers start
sessions of their own, so a process group would not reach them); every signal goes to
PIDs it found there, never to a name. ``SinkLock`` makes the SQLite sink fail for a
while by holding an exclusive transaction from another connection. ``CommitView``
reads the group's committed offsets, and survives a broker that is away.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

_LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
  """True while pid runs (a zombie counts as gone)."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
  except OSError:
    return False


def children(pid: int) -> list[int]:
  out: list[int] = []
  for task in Path(f"/proc/{pid}/task").glob("*"):
    try:
      out.extend(int(c) for c in (task / "children").read_text().split())
    except OSError:
      continue
  return out


def descendants(pid: int) -> list[int]:
  found, todo = [], [pid]
  while todo:
    for child in children(todo.pop()):
      if child not in found:
        found.append(child)
        todo.append(child)
  return found


class PipelineProcess:
  """One run of the local pipeline (a supervisor and its workers); restartable."""

  def __init__(self, args: list[str], log_path: Path):
    self._args = args
    self._log_path = log_path
    self.proc: subprocess.Popen | None = None
    self.starts = 0

  def start(self) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(self._log_path, "ab") as log:
      log.write(
        f"\n===== chaos: pipeline start #{self.starts + 1} at {time.strftime('%X')}\n".encode()
      )
      log.flush()
      self.proc = subprocess.Popen(
        [sys.executable, "-m", "runners.main", "--mode=local", *self._args],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
      )
    self.starts += 1

  @property
  def pid(self) -> int | None:
    return self.proc.pid if self.proc else None

  def running(self) -> bool:
    return self.proc is not None and self.proc.poll() is None

  def returncode(self) -> int | None:
    return None if self.proc is None else self.proc.poll()

  def workers(self) -> list[int]:
    return children(self.pid) if self.running() else []

  def tree(self) -> list[int]:
    """The supervisor and every descendant, supervisor first."""
    return [self.pid, *descendants(self.pid)] if self.running() else []

  def signal_tree(self, sig: int) -> list[int]:
    """Sends sig to every process of the tree at once; returns the PIDs signalled."""
    pids = self.tree()
    for pid in pids:
      try:
        os.kill(pid, sig)
      except ProcessLookupError:
        pass
    return pids

  def wait(self, timeout: float, also: tuple = ()) -> int | None:
    """Waits for the supervisor (and the PIDs in ``also``) to exit; its code, None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None and not any(_alive(p) for p in also):
        return self.proc.returncode
      time.sleep(0.1)
    return None

  def kill(self) -> None:
    """SIGKILL the whole tree and wait until every process of it is gone."""
    if self.proc is None:
      return
    pids = self.signal_tree(signal.SIGKILL) if self.running() else []
    self.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
      time.sleep(0.05)

  def drain(self, timeout: float) -> int | None:
    """SIGTERM to the supervisor only (it forwards it); the exit code, None if it hung."""
    if not self.running():
      return self.returncode()
    pids = self.tree()
    os.kill(self.pid, signal.SIGTERM)
    return self.wait(timeout, also=tuple(pids[1:]))


class SinkLock:
  """Holds ``BEGIN EXCLUSIVE`` on the SQLite sink for ``seconds`` from another connection."""

  def __init__(self, path: Path, seconds: float):
    self.path = path
    self.seconds = seconds
    self.acquired = threading.Event()
    self.released = threading.Event()
    self.error: BaseException | None = None
    self._cancel = threading.Event()
    self._thread = threading.Thread(target=self._hold, name="chaos-sink-lock", daemon=True)

  def start(self) -> SinkLock:
    self._thread.start()
    return self

  def _hold(self) -> None:
    try:
      conn = sqlite3.connect(str(self.path), timeout=120, isolation_level=None)
      try:
        conn.execute("BEGIN EXCLUSIVE")
        self.acquired.set()
        self._cancel.wait(self.seconds)
        conn.execute("ROLLBACK")
      finally:
        conn.close()
    except BaseException as e:  # noqa: BLE001 - reported by the caller
      self.error = e
    finally:
      self.released.set()

  def release(self) -> None:
    self._cancel.set()
    self._thread.join(30)


class CommitView:
  """The group's committed offsets; None for any partition while the broker is away."""

  def __init__(self, bootstrap: str, group: str):
    self._bootstrap = bootstrap
    self._group = group
    self._consumer: KafkaConsumer | None = None

  def committed(self, keys: list[tuple[str, int]]) -> dict | None:
    try:
      if self._consumer is None:
        self._consumer = KafkaConsumer(
          bootstrap_servers=self._bootstrap,
          group_id=self._group,
          enable_auto_commit=False,
          request_timeout_ms=5000,
          bootstrap_timeout_ms=5000,
        )
      return {k: self._consumer.committed(TopicPartition(*k), timeout_ms=5000) for k in keys}
    except Exception as e:  # noqa: BLE001 - the broker may be down: ask again later
      _LOGGER.debug("committed offsets unavailable: %r", e)
      self.close()
      return None

  def close(self) -> None:
    if self._consumer is not None:
      try:
        self._consumer.close(autocommit=False)
      except Exception as e:  # noqa: BLE001 - closing a consumer of a dead broker
        _LOGGER.debug("close: %r", e)
      self._consumer = None
