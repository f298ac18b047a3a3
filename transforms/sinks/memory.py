"""MemoryStore: the ``Store`` contract (``transforms.sinks.base``) in this process's memory.

For tests and experiments on runners whose SDK workers run in this process
(FnApiRunner, the DirectRunner, Prism with a loopback worker): every copy a runner
unpickles shares the tables of the store's ``name`` through a process-global
registry. It follows the rules of the real stores: unique on (kafka_topic,
kafka_partition, kafka_offset), so a replay adds nothing, and one row per event_id
(a later copy is refused with ``DuplicateEvent``).

Each store also keeps a journal, in order, of what became durable: one
``("write", table, topic, partition, offset)`` per stored row, and, through
``commit_fn()`` (a ``CommitOffsets`` committer), one ``("commit", topic,
partition, offset)`` per commit. A test can then check that no offset was
committed before the sink held it.
"""

from __future__ import annotations

import logging
import threading
import uuid

from transforms.rows import coordinates as row_coordinates
from transforms.rows import stored as stored_part
from transforms.sinks.base import DuplicateEvent
from transforms.sinks.schema import TABLES

_LOGGER = logging.getLogger(__name__)

_LOCK = threading.RLock()
_TABLES: dict = {}  # store name -> {table: {(topic, partition, offset): row}}
_JOURNALS: dict = {}  # store name -> [journal entries]
_FAILURES: dict = {}  # store name -> [writes still to fail]


class TransientStoreError(RuntimeError):
  """A fault a test injects (``fail_next``): the store answers it as transient."""


class MemoryStore:
  """A ``Store`` whose tables live in this process, shared by name."""

  def __init__(self, name: str | None = None):
    self.name = name or uuid.uuid4().hex
    with _LOCK:
      _TABLES.setdefault(self.name, {t: {} for t in TABLES})
      _JOURNALS.setdefault(self.name, [])
      self._failures = _FAILURES.setdefault(self.name, [0])

  def __getstate__(self):
    return {"name": self.name}

  def __setstate__(self, state):
    self.__init__(state["name"])

  def open(self) -> None:
    pass

  def close(self) -> None:
    pass

  def is_transient(self, exc: BaseException) -> bool:
    return isinstance(exc, TransientStoreError)

  def fail_next(self, count: int) -> None:
    """The next ``count`` writes fail with a transient error (nothing is stored)."""
    with _LOCK:
      self._failures[0] = count

  def write(self, table: str, rows: list, written_at: str) -> list:
    """Stores rows not held yet, in one step; returns [(row, DuplicateEvent)] refused."""
    with _LOCK:
      if self._failures[0] > 0:
        self._failures[0] -= 1
        raise TransientStoreError(f"injected fault writing {len(rows)} rows to {table}")
      held = _TABLES[self.name][table]
      dedup = TABLES[table].dedup_column
      index = TABLES[table].names.index(dedup) if dedup else None
      events = {r[index]: c for c, r in held.items()} if dedup else {}
      rejected = []
      for row in rows:
        coordinates = row_coordinates(row)
        if coordinates in held:
          continue  # a replay: already stored
        if index is not None and row[index] in events:
          rejected.append(
            (
              row,
              DuplicateEvent(f"{dedup} {row[index]!r} is stored already (at {events[row[index]]})"),
            )
          )
          continue
        held[coordinates] = (*stored_part(row), written_at)
        if index is not None:
          events[row[index]] = coordinates
        _JOURNALS[self.name].append(("write", table, *coordinates))
      return rejected

  def stored_offsets(
    self, topic: str, partition: int, from_offset: int, until_offset: int | None = None
  ) -> set:
    until = 2**63 - 1 if until_offset is None else until_offset
    with _LOCK:
      return {
        o
        for held in _TABLES[self.name].values()
        for (t, p, o) in held
        if t == topic and p == partition and from_offset <= o < until
      }

  def rows(self, table: str) -> dict:
    """{(topic, partition, offset): stored row (columns in order, written_at last)}."""
    with _LOCK:
      return dict(_TABLES[self.name][table])

  def journal(self) -> list:
    with _LOCK:
      return list(_JOURNALS[self.name])

  def commit_fn(self) -> JournalCommit:
    """A picklable ``CommitOffsets`` committer that records commits in this journal."""
    return JournalCommit(self.name)

  def forget(self) -> None:
    """Drops this store's tables and journal from the process."""
    with _LOCK:
      for registry in (_TABLES, _JOURNALS, _FAILURES):
        registry.pop(self.name, None)


class JournalCommit:
  """commit_fn(topic, partition, offset): appends ("commit", ...) to a store's journal."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, topic: str, partition: int, offset: int) -> None:
    with _LOCK:
      _JOURNALS.setdefault(self.name, []).append(("commit", topic, partition, offset))
