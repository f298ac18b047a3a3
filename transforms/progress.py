"""Process-local progress counters for the local launcher's progress line and summary.

The local runner executes every DoFn inside the launcher's process, so plain
counters under a lock are exact and cheap; on remote runners they stay unused
(Beam metrics, which every step also updates, are what those runners show).
"""

from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
read = Counter()  # topic -> records read
written = Counter()  # table -> rows written
rejected = Counter()  # table -> rows the store refused (re-routed to dead_letters)
duplicates = Counter()  # table -> later copies of a stored event_id (acked, not written)
batches = Counter()  # 'all' / 'full'
dead_letters = Counter()  # reason -> dead letters
committed: dict = {}  # (topic, partition) -> committed offset


def add_read(topic: str, n: int) -> None:
  with _lock:
    read[topic] += n


def add_written(table: str, n: int, n_rejected: int = 0, n_duplicates: int = 0) -> None:
  with _lock:
    written[table] += n
    if n_rejected:
      rejected[table] += n_rejected
    if n_duplicates:
      duplicates[table] += n_duplicates


def add_dead_letter(reason: str) -> None:
  with _lock:
    dead_letters[reason] += 1


def add_batch(full: bool) -> None:
  with _lock:
    batches["all"] += 1
    if full:
      batches["full"] += 1


def set_committed(topic: str, partition: int, offset: int) -> None:
  with _lock:
    committed[(topic, partition)] = offset


def snapshot() -> dict:
  with _lock:
    return {"read": dict(read), "written": dict(written), "rejected": dict(rejected),
            "duplicates": dict(duplicates),
            "batches": dict(batches), "dead_letters": dict(dead_letters),
            "committed": dict(committed)}


def reset() -> None:
  with _lock:
    for c in (read, written, rejected, duplicates, batches, dead_letters):
      c.clear()
    committed.clear()
