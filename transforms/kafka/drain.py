"""A local drain request that every reader in every worker process can see.

Runners with a drain of their own (Dataflow, Flink) call ``truncate()``; the local
FnApiRunner has none, so a local drain is a file: the launcher creates it on the
first SIGTERM/Ctrl-C (or ``run_pipeline.sh drain local``), readers see it within
``check_interval_s``, read on up to the end offsets they see at that moment (so
everything written before the drain is read), end their restrictions there, and the
pipeline then finishes like a bounded one (watermark to +inf: windows, batches
and sinks flush, the last offsets are committed).
"""

from __future__ import annotations

import os
import time


class DrainSignal:
  def __init__(self, path: str | None, check_interval_s: float = 0.2):
    self._path = path
    self._interval = check_interval_s
    self._next_check = 0.0
    self._requested = False

  def requested(self) -> bool:
    if self._path is None or self._requested:
      return self._requested
    now = time.monotonic()
    if now >= self._next_check:
      self._next_check = now + self._interval
      self._requested = os.path.exists(self._path)
    return self._requested

  def wait(self, seconds: float) -> bool:
    """Sleeps up to seconds, less when a drain is requested meanwhile; whether one was."""
    deadline = time.monotonic() + seconds
    while not self.requested():
      left = deadline - time.monotonic()
      if left <= 0:
        return False
      time.sleep(min(left, self._interval))
    return True

  @staticmethod
  def request(path: str) -> None:
    with open(path, "w") as f:
      f.write(str(os.getpid()))
