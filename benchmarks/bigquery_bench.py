"""Rows/s into the local BigQuery emulator: the Storage Write API against insert_rows_json.

    python -m benchmarks.bigquery_bench [--rows 20000] [--write_rows 1000]
        [--endpoint http://127.0.0.1:9050 --grpc 127.0.0.1:9060]

Both methods write the same sensor rows, through ``BigQueryStore.write`` (what the
pipeline's ``WriteBatches`` calls, the write-time check of stored event_ids included), in
writes of ``--write_rows`` rows, each into a fresh dataset of the same emulator, in one
run. Each result is checked: every row stored exactly once. Also printed: the time the
write-time check queries take, and the reconciliation query (``stored_offsets``) with the
bytes BigQuery reports it scanned. Starts its own emulator unless given one.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid

from benchmarks.common import EventFactory, cpu_seconds
from transforms.events import parse_sensor, sensor_row
from transforms.sinks.bigquery import BigQueryStore
from transforms.timestamps import iso_us

PROJECT = "test-project"


def _rows(n: int, topic: str = "bench-sensor", partitions: int = 4) -> list[tuple]:
  f = EventFactory(11)
  now = time.time()
  out = []
  for i in range(n):
    event = parse_sensor(f.sensor(now - 600 + i * 0.01).value)
    out.append(
      sensor_row(
        event, 0, 60_000_000, False, topic, i % partitions, i // partitions, i // partitions
      )
    )
  return out


def _timed_queries(store: BigQueryStore) -> dict:
  spent = {"s": 0.0, "n": 0}
  original = store._query

  def timed(sql, params):
    t0 = time.perf_counter()
    try:
      return original(sql, params)
    finally:
      spent["s"] += time.perf_counter() - t0
      spent["n"] += 1

  store._query = timed
  return spent


def run_one(
  method: str, rows: list, write_rows: int, endpoint: str, grpc: str, check: bool = True
) -> dict:
  dataset = f"bench_{method}_{uuid.uuid4().hex[:6]}"
  store = BigQueryStore(
    PROJECT, dataset, api_endpoint=endpoint, storage_api_endpoint=grpc, write_method=method
  )
  store.open()
  if not check:  # the append alone, for comparison: no event_id check before each write
    store._new_rows = lambda table, rows: (rows, [])
  spent = _timed_queries(store)
  written_at = iso_us(int(time.time() * 1e6))
  cpu0, t0 = cpu_seconds(), time.perf_counter()
  for i in range(0, len(rows), write_rows):
    rejected = store.write("sensor_readings", rows[i : i + write_rows], written_at)
    if rejected:
      raise SystemExit(f"{method}: {len(rejected)} rows refused, e.g. {rejected[0][1]}")
  elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
  ((total, distinct),) = [
    tuple(r.values())
    for r in store._client.query_and_wait(
      f"SELECT COUNT(*), COUNT(DISTINCT FORMAT('%s-%d-%d', kafka_topic, kafka_partition, kafka_offset)) "
      f"FROM `{PROJECT}.{dataset}.sensor_readings`"
    )
  ]
  if (total, distinct) != (len(rows), len(rows)):
    raise SystemExit(f"{method}: {total} rows, {distinct} distinct offsets for {len(rows)} written")
  checks, checks_s = spent["n"], spent["s"]
  t1 = time.perf_counter()
  scanned_before = store.bytes_processed
  found = store.stored_offsets("bench-sensor", 0, 0)
  reconcile_s = time.perf_counter() - t1
  assert len(found) == (len(rows) + 3) // 4
  reconcile_bytes = store.bytes_processed - scanned_before
  store.close()
  return {
    "method": method + ("" if check else " (no check)"),
    "rows": len(rows),
    "seconds": elapsed,
    "rows_per_s": len(rows) / elapsed,
    "cpu_s": cpu,
    "check_queries": checks,
    "check_s": checks_s,
    "reconcile_s": reconcile_s,
    "reconcile_rows": len(found),
    "reconcile_bytes": reconcile_bytes,
    "check_bytes": scanned_before,
  }


@contextlib.contextmanager
def _emulator(endpoint, grpc):
  if endpoint:
    yield endpoint, grpc
    return
  from bigquery_emulator.control import start_emulator

  emu = start_emulator(project=PROJECT)
  try:
    yield emu.endpoint, emu.grpc_address
  finally:
    emu.stop()


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", type=int, default=20_000)
  ap.add_argument("--write_rows", type=int, default=1000, help="rows per write (--sink_flush_rows)")
  ap.add_argument("--endpoint", default=None, help="a running emulator's REST endpoint")
  ap.add_argument("--grpc", default=None, help="its gRPC host:port (with --endpoint)")
  args = ap.parse_args(argv)
  if args.rows < 1 or args.write_rows < 1:
    ap.error("--rows and --write_rows must be >= 1")
  if bool(args.endpoint) != bool(args.grpc):
    ap.error("--endpoint and --grpc go together")
  rows = _rows(args.rows)
  with _emulator(args.endpoint, args.grpc) as (endpoint, grpc):
    results = [
      run_one(m, rows, args.write_rows, endpoint, grpc, check)
      for check in (True, False)
      for m in ("storage_write", "streaming_inserts")
    ]
  print(
    f"\n{args.rows} sensor rows, writes of {args.write_rows}, local-bigquery emulator "
    f"(every row checked: stored exactly once)\n"
  )
  print(
    f"{'method':<32}{'rows/s':>10}{'seconds':>10}{'CPU s':>8}{'check queries':>16}{'their s':>9}"
  )
  for r in results:
    print(
      f"{r['method']:<32}{r['rows_per_s']:>10,.0f}{r['seconds']:>10.1f}{r['cpu_s']:>8.1f}"
      f"{r['check_queries']:>16}{r['check_s']:>9.1f}"
    )
  sw, si = results[:2]
  print(
    f"\nStorage Write API / insert_rows_json: {sw['rows_per_s'] / si['rows_per_s']:.2f}x "
    f"(with the check), {results[2]['rows_per_s'] / results[3]['rows_per_s']:.2f}x (append alone)"
  )
  for r in results[:2]:
    print(
      f"reconciliation query ({r['method']} dataset): {r['reconcile_rows']} offsets of one "
      f"partition in {r['reconcile_s'] * 1000:.0f} ms, {r['reconcile_bytes']} bytes processed "
      f"as reported (write-time checks: {r['check_bytes']} bytes)"
    )


if __name__ == "__main__":
  main()
