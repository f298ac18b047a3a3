"""The SQLite sink alone: CPU per row of ``_WriteBatchesFn`` over a ``SqliteStore``.

    python -m benchmarks.sink_bench [--rows 200000] [--repeat 3] [--flush-rows N] [--prefill N]
                                    [--dir DIR]

Builds N realistic rows once (``tools.produce.EventFactory`` events, 75% sensor and 25% meter,
parsed and turned into rows by ``transforms.events``; 4 partitions per topic, 60 s windows,
batches of 100 per (table, shard) and window as ``ParseEvents`` makes them), then per repeat,
on a fresh SQLite file in a temp folder on disk (``synchronous=FULL`` syncs for real), holding
``--prefill`` rows of other events first (a file that has grown: the default is empty):
  first:  every batch through setup / start_bundle / process / finish_bundle (one bundle,
          flushed every ``--flush-rows`` rows, the option's default), inside a Beam metrics
          container, as the runner calls it;
  replay: the same batches again into the same file (every row conflicts on its coordinates);
  copies: the same events at new offsets (every row a later copy of a stored event_id).
Prints CPU µs per row (``time.process_time``) and wall time for each, and checks what went
in (row counts, acks covering every offset). Not a test.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from apache_beam.metrics.execution import MetricsContainer
from apache_beam.runners.worker import statesampler
from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.counters import CounterFactory

from tools.produce import EventFactory
from transforms.events import meter_row, parse_meter, parse_sensor, sensor_row
from transforms.rows import METER_TABLE, ROW_TYPES, SENSOR_TABLE, at_offset, offset_of, partition_of
from transforms.sinks.base import _WriteBatchesFn
from transforms.sinks.sqlite import SqliteStore

TOPICS = {SENSOR_TABLE: "smartgrid-sensor-data", METER_TABLE: "smartgrid-meter-data"}
PARTITIONS = 4
BATCH = 100
WINDOW_US = 60_000_000
FLUSH_ROWS = 40_000  # --sink_flush_rows' default (a test checks they agree)
START = 1_780_000_000.0  # a fixed time: the same rows every run


def build_batches(n: int, seed: int = 11) -> list[tuple]:
  """N rows as ((table, shard), [row x <= 100], window), in the order ParseEvents emits them."""
  offsets = {}
  open_batches: dict = {}
  batches = []
  for i, event in enumerate(EventFactory(seed).events(n, start=START, spacing_s=0.001)):
    if event.topic_kind == "sensor":
      table, reading, to_row = SENSOR_TABLE, parse_sensor(event.value), sensor_row
    else:
      table, reading, to_row = METER_TABLE, parse_meter(event.value), meter_row
    partition = i % PARTITIONS
    offset = offsets.get((table, partition), 0)
    offsets[(table, partition)] = offset + 1
    start = reading.event_time_us - reading.event_time_us % WINDOW_US
    row = to_row(reading, start, start + WINDOW_US, False, TOPICS[table], partition, offset, offset)
    window = IntervalWindow(start / 1e6, (start + WINDOW_US) / 1e6)
    key = ((table, partition), window)
    rows = open_batches.setdefault(key, [])
    rows.append(row)
    if len(rows) == BATCH:
      batches.append((key[0], open_batches.pop(key), window))
  batches.extend((k, rows, w) for (k, w), rows in open_batches.items())
  return batches


def run_fn(db: Path, batches: list, flush_rows: int) -> tuple[float, float, list]:
  """(CPU s, wall s, acks) of one bundle of ``batches`` through a fresh ``_WriteBatchesFn``."""
  fn = _WriteBatchesFn(SqliteStore(str(db)), flush_rows, 60.0, BATCH)
  sampler = statesampler.StateSampler("sink_bench", CounterFactory())
  statesampler.set_current_tracker(sampler)
  state = sampler.scoped_state("WriteRows", "process", metrics_container=MetricsContainer("w"))
  acks = []
  sampler.start()
  try:
    with state:
      cpu, wall = time.process_time(), time.perf_counter()
      fn.setup()
      fn.start_bundle()
      for key, rows, window in batches:
        acks.extend(fn.process((key, rows), window=window))
      acks.extend(fn.finish_bundle())
      fn.teardown()
      cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  finally:
    sampler.stop()
    statesampler.set_current_tracker(None)
  return cpu, wall, [a.value for a in acks]


def check(db: Path, batches: list, acks: list, stored: int) -> None:
  """Every offset acked exactly once; ``stored`` rows in the reading tables (of every topic),
  no dead letters."""
  want = {}
  for _, rows, _ in batches:
    for row in rows:
      want.setdefault(partition_of(row), set()).add(offset_of(row))
  got = {}
  for a in acks:
    offsets = got.setdefault((a.topic, a.partition), [])
    offsets.extend(range(a.start, a.end))
  for partition, offsets in got.items():
    if len(offsets) != len(set(offsets)) or set(offsets) != want.get(partition):
      raise AssertionError(f"acks of {partition} do not cover its offsets once")
  if set(got) != set(want):
    raise AssertionError("acks miss partitions")
  conn = sqlite3.connect(db)
  try:
    count = sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TOPICS)
    dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
  finally:
    conn.close()
  if count != stored or dead:
    raise AssertionError(f"stored {count} rows and {dead} dead letters, expected {stored} and 0")


def copies_of(batches: list, shift: int) -> list:
  """The same events at offsets ``shift`` further: each a later copy of a stored event_id."""
  return [
    (k, [at_offset(row, offset_of(row) + shift) for row in rows], w) for k, rows, w in batches
  ]


def prefill(db: Path, batches: list, count: int, seed: int = 3) -> int:
  """Stores ``count`` rows of other events (new event_ids, topics '<topic>-old<pass>') in
  ``db``, untimed, so that the timed writes meet indexes of that size."""
  rng = random.Random(seed)
  by_table: dict = {}
  for (table, _), rows, _ in batches:
    by_table.setdefault(table, []).extend(rows)
  store = SqliteStore(str(db))
  store.open()
  try:
    written, passes = 0, 0
    while written < count:
      for table, rows in by_table.items():
        row_type = ROW_TYPES[table]
        event_id, topic = row_type.index("event_id"), row_type.index("kafka_topic")
        share = min(
          len(rows), max(1, (count - written) * len(rows) // sum(map(len, by_table.values())))
        )
        for start in range(0, share, 5000):
          old = []
          for row in rows[start : min(start + 5000, share)]:
            values = list(row)
            values[event_id] = str(uuid.UUID(int=rng.getrandbits(128)))
            values[topic] = f"{values[topic]}-old{passes}"
            old.append(tuple(values))
          store.write(table, old, "2026-01-01T00:00:00.000000Z")
          written += len(old)
      passes += 1
  finally:
    store.close()
  return written


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=200_000)
  ap.add_argument("--repeat", type=int, default=3)
  ap.add_argument("--flush-rows", type=int, default=FLUSH_ROWS)
  ap.add_argument("--prefill", type=int, default=0, help="rows of other events stored first")
  ap.add_argument("--dir", default=None, help="folder for the temp files (default: system temp)")
  args = ap.parse_args(argv)
  t = time.perf_counter()
  batches = build_batches(args.rows)
  n = sum(len(rows) for _, rows, _ in batches)
  print(f"built {n} rows in {len(batches)} batches in {time.perf_counter() - t:.1f} s", flush=True)
  for i in range(args.repeat):
    work = Path(tempfile.mkdtemp(prefix="sink-bench-", dir=args.dir))
    db = work / "sink.db"
    try:
      old = prefill(db, batches, args.prefill) if args.prefill else 0
      for what, these in (
        ("first", batches),
        ("replay", batches),
        ("copies", copies_of(batches, 10_000_000)),
      ):
        cpu, wall, acks = run_fn(db, these, args.flush_rows)
        check(db, these, acks, n + old)
        print(
          f"run {i + 1} {what:<6}: {cpu / n * 1e6:6.2f} µs CPU/row  "
          f"wall {wall:6.2f} s ({n / wall:,.0f} rows/s)",
          flush=True,
        )
    finally:
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
