"""The baselines the pipeline is measured against, each run as a process of its own so its
CPU and peak RSS are its own (``benchmarks.pipeline_bench`` starts them):

    python -m benchmarks.baselines raw|loop|strict_loop|reader BOOTSTRAP N DB TOPIC [TOPIC ...]

  raw:    kafka-python poll(500) + json.loads (``benchmarks.common.raw_consume``);
  loop:   the hand-written kafka-python -> SQLite loop, batches of 100 (executemany + one
          commit, unique (topic, partition, offset)): the system being replaced, minus its loss;
  strict_loop: the same loop with the guarantees the pipeline's sink keeps: synchronous=FULL
          (a commit is on disk when it returns) and one row per event_id (a unique index),
          committing as rarely as the sink does (STRICT_COMMIT_ROWS), rows in event_id order
          as the sink inserts them; not a goal of issue 13: the floor of any program that
          keeps those two guarantees;
  reader: ReadFromKafka(stop='end', batched=True) | json.loads | count on FnApiRunner
          (reader_bench).

Each reads every record of the topics from the beginning and exits 1 unless it saw N.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from operator import itemgetter

from benchmarks.common import from_beginning, raw_consume

_LOGGER = logging.getLogger(__name__)
LOOP_BATCH = 100
STRICT_COMMIT_ROWS = 40_000  # --sink_flush_rows' default (a test checks they agree)


def sqlite_loop(bootstrap: str, topics: list[str], n: int, db: str, strict: bool = False) -> int:
  """The hand-written loop: poll, json.loads, 100 rows per executemany + commit; ``strict``:
  with the sink's durability (synchronous=FULL) and one row per event_id, and one commit per
  ``STRICT_COMMIT_ROWS`` rows inserted in event_id order, as the sink writes them."""
  conn = sqlite3.connect(db, isolation_level=None)
  conn.execute("PRAGMA journal_mode=WAL")
  conn.execute(f"PRAGMA synchronous={'FULL' if strict else 'NORMAL'}")
  conn.execute(
    "CREATE TABLE IF NOT EXISTS events (topic TEXT, partition INTEGER, offset INTEGER, "
    "event_id TEXT, entity TEXT, value REAL, ts TEXT, UNIQUE (topic, partition, offset))"
  )
  if strict:
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (event_id)")
  c = from_beginning(bootstrap, topics)
  batch, seen = [], 0
  sql = "INSERT INTO events VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
  flush_at = STRICT_COMMIT_ROWS if strict else LOOP_BATCH

  def flush():
    # strict: in event_id order, as the sink inserts (a stable sort: the first copy wins)
    conn.execute("BEGIN")
    conn.executemany(sql, sorted(batch, key=itemgetter(3)) if strict else batch)
    conn.execute("COMMIT")
    batch.clear()

  while seen < n:
    for records in c.poll(timeout_ms=500).values():
      for r in records:
        e = json.loads(r.value)
        batch.append(
          (
            r.topic,
            r.partition,
            r.offset,
            e["event_id"],
            e.get("sensor_id") or e.get("meter_id"),
            e.get("value", e.get("reading")),
            e["timestamp"],
          )
        )
        if len(batch) == flush_at:
          flush()
      seen += len(records)
  if batch:
    flush()
  c.close(autocommit=False)
  conn.close()
  return seen


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) < 5 or argv[0] not in ("raw", "loop", "strict_loop", "reader"):
    print(__doc__, file=sys.stderr)
    return 2
  kind, bootstrap, n, db, topics = argv[0], argv[1], int(argv[2]), argv[3], argv[4:]
  logging.basicConfig(level=logging.WARNING)
  if kind == "raw":
    seen = raw_consume(bootstrap, topics, n)
  elif kind in ("loop", "strict_loop"):
    seen = sqlite_loop(bootstrap, topics, n, db, strict=kind == "strict_loop")
  else:
    from benchmarks.reader_bench import bench_reader  # pylint: disable=import-outside-toplevel

    seen = bench_reader(bootstrap, topics)
  if seen != n:
    print(f"{kind}: read {seen} records, expected {n}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
