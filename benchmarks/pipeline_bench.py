"""The pipeline end to end against hand-written loops: same topics, same run.

    ./run_pipeline.sh bench pipeline [--events 200000] [--bootstrap host:port]
    (or: python -m benchmarks.pipeline_bench ...)

Produces N realistic events (tools.produce.EventFactory; sensor and meter
topics, 4 partitions each), then measures, each from the beginning of the topics:
  (a) raw:      kafka-python, assign all partitions, poll(500) + json.loads;
  (b) loop:     kafka-python -> SQLite in batches of 100 (executemany + one commit,
                unique (topic, partition, offset)): the system being replaced, minus its loss;
  (c) pipeline: ``--mode=batch`` in a subprocess (FnApiRunner, GroupIntoBatches(100), SQLite
                sink, commit after the sink), with 1 and with 2 ``--local_workers``, and the
                share of full batches;
  (d) drain:    ``--mode=local`` on a further 20,000 events: time from SIGTERM to exit once
                caught up.
Prints events/s, CPU seconds, peak RSS and the ratios. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from benchmarks.common import (bench_broker, cpu_seconds, from_beginning, produce_smartgrid,
                               raw_consume, sink_rows)

REPO = Path(__file__).resolve().parent.parent


def bench_loop(bootstrap: str, topics: list[str], n: int, db: str) -> int:
  conn = sqlite3.connect(db, isolation_level=None)
  conn.execute("PRAGMA journal_mode=WAL")
  conn.execute("PRAGMA synchronous=NORMAL")
  conn.execute("CREATE TABLE IF NOT EXISTS events (topic TEXT, partition INTEGER, offset INTEGER, "
               "event_id TEXT, entity TEXT, value REAL, ts TEXT, UNIQUE (topic, partition, offset))")
  c = from_beginning(bootstrap, topics)
  batch, seen = [], 0
  sql = "INSERT INTO events VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"

  def flush():
    conn.execute("BEGIN")
    conn.executemany(sql, batch)
    conn.execute("COMMIT")
    batch.clear()

  while seen < n:
    for records in c.poll(timeout_ms=500).values():
      for r in records:
        e = json.loads(r.value)
        batch.append((r.topic, r.partition, r.offset, e["event_id"], e.get("sensor_id") or e.get("meter_id"),
                      e.get("value", e.get("reading")), e["timestamp"]))
        if len(batch) == 100:
          flush()
      seen += len(records)
  if batch:
    flush()
  c.close()
  conn.close()
  return seen


def run_pipeline(args: list[str], drain_after_catch_up: bool = False) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  cpu_before = cpu_seconds(resource.RUSAGE_CHILDREN)
  t0 = time.monotonic()
  proc = subprocess.Popen([sys.executable, "-m", "runners.main", *args, "--progress_secs=0"],
                          cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  drain_latency = None
  if drain_after_catch_up:
    bootstrap = next(a.split("=", 1)[1] for a in args if a.startswith("--bootstrap_servers="))
    group = next(a.split("=", 1)[1] for a in args if a.startswith("--group_id="))
    topics = [a.split("=", 1)[1] for a in args if a.startswith(("--sensor_topic=", "--meter_topic="))]
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t))]
    end = c.end_offsets(tps)
    while any((c.committed(tp) or 0) < end[tp] for tp in tps):
      time.sleep(0.2)
    c.close(autocommit=False)
    t1 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    drain_latency = time.monotonic() - t1
  else:
    _, err = proc.communicate()
  wall = time.monotonic() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise RuntimeError(f"pipeline exited {proc.returncode}:\n{err[-3000:]}")
  # The summary's line: "batches: N (F full of B rows[; P partial: ...])".
  found = re.findall(r"batches:\s+(\d+) \((\d+) full of", err)
  total = sum(int(b) for b, _ in found)
  full = sum(int(f) for _, f in found)
  return {"wall": wall, "cpu": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before,
          "rss_mb": after.ru_maxrss / 1024.0,
          "batches": f"batches {total} ({100 * full / total:.0f}% full)" if total else "batches ?",
          "drain_s": drain_latency}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="benchmarks.pipeline_bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--events", type=int, default=200_000)
  ap.add_argument("--bootstrap", default=None, help="an existing broker (default: start one)")
  a = ap.parse_args(argv)
  with bench_broker(a.bootstrap, "pipeline-bench") as (bootstrap, work):
    n = a.events
    sensor, meter = produce_smartgrid(bootstrap, n)
    results = {}
    for name, fn in (("raw consumer + json.loads", lambda: raw_consume(bootstrap, [sensor, meter], n)),
                     ("kafka-python -> SQLite, batches of 100",
                      lambda: bench_loop(bootstrap, [sensor, meter], n, str(work / "loop.db")))):
      cpu, t = cpu_seconds(), time.monotonic()
      seen = fn()
      wall = time.monotonic() - t
      results[name] = {"wall": wall, "cpu": cpu_seconds() - cpu,
                       "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
      print(f"  {name:42s} {seen / wall:>9,.0f} events/s  cpu {results[name]['cpu']:.1f}s  "
            f"peak RSS {results[name]['rss_mb']:.0f} MB (this process)", flush=True)
    common = [f"--bootstrap_servers={bootstrap}", f"--sensor_topic={sensor}", f"--meter_topic={meter}"]
    raw = n / results["raw consumer + json.loads"]["wall"]
    loop = n / results["kafka-python -> SQLite, batches of 100"]["wall"]
    for workers in (1, 2):
      db = work / f"pipeline-{workers}.db"
      r = run_pipeline(["--mode=batch", *common, f"--group_id=bench-{workers}", "--start=earliest",
                        f"--sink=sqlite:///{db}", f"--local_workers={workers}"])
      rows = sink_rows(db)
      pipe = n / r["wall"]
      label = f"pipeline --mode=batch, {workers} worker{'s' if workers > 1 else ''}"
      print(f"  {label:42s} {pipe:>9,.0f} events/s  cpu {r['cpu']:.1f}s  "
            f"peak RSS {r['rss_mb']:.0f} MB/process  rows {rows}  {r['batches']}", flush=True)
      print(f"    ratios: pipeline/raw {pipe / raw:.2f}, pipeline/loop {pipe / loop:.2f}", flush=True)

    produce_smartgrid(bootstrap, 20_000, seed=12, topics=(sensor, meter))
    d = run_pipeline(["--mode=local", *common, "--group_id=bench-1",
                      f"--sink=sqlite:///{work / 'pipeline-1.db'}",
                      f"--drain_file={work / 'drain'}"], drain_after_catch_up=True)
    print(f"  drain latency (SIGTERM -> exit, caught up): {d['drain_s']:.2f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
