"""The pipeline's telemetry: Beam metrics in namespace ``smartgrid``, one counter per label.

Owns the names. The reader, the parser and the sinks count here (records read per topic,
rows written / rejected / duplicate per table, dead letters per reason, batches), and the
launchers read the same counters back from a ``PipelineResult`` with ``totals``. Because
the figures travel as Beam metrics, every runner shows them (FnApiRunner, Prism, Flink,
Dataflow), and nothing is shared between a transform and the launcher but the result.

A counter's name is ``<kind>/<label>`` (``records_read/smartgrid-sensor-data``): Kafka topic
names, table names and dead-letter reasons never contain a ``/``.
"""

from __future__ import annotations

import logging
from typing import Any

from apache_beam.metrics.metric import Metrics, MetricsFilter

_LOGGER = logging.getLogger(__name__)

NAMESPACE = "smartgrid"
READ = "records_read"  # per topic
WRITTEN = "rows_written"  # per table
REJECTED = "rows_rejected"  # per table: refused by the store for good (dead-lettered)
DUPLICATES = "duplicate_events"  # per table: later copies of a stored event_id (acked, not written)
DEAD_LETTERS = "dead_letters"  # per reason
BATCHES = "batches"  # 'all' and 'full'

# The snapshot's keys, by counter kind (the launcher's progress line and summary read them).
_KEYS = {
  READ: "read",
  WRITTEN: "written",
  REJECTED: "rejected",
  DUPLICATES: "duplicates",
  DEAD_LETTERS: "dead_letters",
  BATCHES: "batches",
}

# Counters are cheap handles (they find the running bundle's container on inc): one per name.
_counters: dict = {}


def _counter(kind: str, label: str):
  name = f"{kind}/{label}"
  counter = _counters.get(name)
  if counter is None:
    counter = _counters[name] = Metrics.counter(NAMESPACE, name)
  return counter


def count_read(topic: str, n: int) -> None:
  _counter(READ, topic).inc(n)


def count_written(table: str, written: int, rejected: int = 0, duplicates: int = 0) -> None:
  _counter(WRITTEN, table).inc(written)
  if rejected:
    _counter(REJECTED, table).inc(rejected)
  if duplicates:
    _counter(DUPLICATES, table).inc(duplicates)


def count_dead_letter(reason: str) -> None:
  _counter(DEAD_LETTERS, reason).inc()


def count_batch(full: bool) -> None:
  _counter(BATCHES, "all").inc()
  if full:
    _counter(BATCHES, "full").inc()


def empty() -> dict:
  """A snapshot with nothing counted: {key: {label: count}} for every kind."""
  return {key: {} for key in _KEYS.values()}


def totals(result: Any) -> dict:
  """The counters of a PipelineResult as a snapshot (``empty()``'s shape), summed over steps.

  A counter's committed value where the runner reports one, else its attempted value
  (Prism reports attempted values only)."""
  snapshot = empty()
  query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
  for item in query["counters"]:
    kind, _, label = item.key.metric.name.partition("/")
    key = _KEYS.get(kind)
    if key is None or not label:
      continue
    value = item.committed if item.committed else item.attempted
    snapshot[key][label] = snapshot[key].get(label, 0) + int(value or 0)
  return snapshot


def add(into: dict, snapshot: dict) -> dict:
  """Adds snapshot's counts to into (in place); returns into."""
  for key, counts in snapshot.items():
    target = into.setdefault(key, {})
    for label, n in counts.items():
      target[label] = target.get(label, 0) + n
  return into
