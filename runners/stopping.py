"""The launchers' stop signals: the first SIGINT/SIGTERM drains, a second one aborts.

Aborting is safe at any moment: nothing unwritten was committed, so the next run
replays it and the idempotent sink absorbs what was already written.

A worker of ``--local_workers`` (``SUPERVISED_ENV`` set by the supervisor) never
aborts on a signal: every SIGINT/SIGTERM after the first is absorbed. A signal sent to
every process of the tree at once (``pkill -f``, systemd's ``KillMode=control-group``)
reaches a worker twice, from the sender and forwarded by the supervisor, and must
drain, not abort. Aborting workers is the supervisor's job: on its own second signal
it SIGKILLs them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

SUPERVISED_ENV = "SMARTGRID_SUPERVISED_WORKER"


class StopSignals:
  """Installs the handlers; ``drain(signal_name)`` runs on the first signal,
  ``before_abort()`` on the second, then the process exits 130 at once."""

  def __init__(self, drain: Callable[[str], None], before_abort: Callable[[], None] = lambda: None):
    self.count = 0
    self._drain = drain
    self._before_abort = before_abort
    signal.signal(signal.SIGINT, self._on_signal)
    signal.signal(signal.SIGTERM, self._on_signal)

  @property
  def draining(self) -> bool:
    return self.count > 0

  def _on_signal(self, signum, _frame) -> None:
    self.count += 1
    if self.count == 1:
      self._drain(signal.Signals(signum).name)
      return
    if os.environ.get(SUPERVISED_ENV) == "1":
      return  # a worker: the duplicate of a signal sent to the whole tree; still draining
    print(
      "Second signal: aborting now. Nothing unwritten was committed; the next run replays it.",
      file=sys.stderr,
      flush=True,
    )
    self._before_abort()
    os._exit(130)


def offsets_table(end: dict, committed: dict) -> list[str]:
  """'  committed/end offsets per partition:' and a line per partition, lag marked."""
  lines = ["  committed/end offsets per partition:"]
  for tp in sorted(end, key=lambda t: (t.topic, t.partition)):
    c = committed.get(tp)
    lines.append(
      f"    {tp.topic}-{tp.partition}: {c}/{end[tp]}"
      + ("" if c == end[tp] else f"  (lag {end[tp] - (c or 0)})")
    )
  return lines
