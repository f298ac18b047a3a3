"""FnApiRunner against Prism on the same topics, in the same run. Not a test.

    python -m benchmarks.prism_bench [--events 200000] [--bootstrap host:port]

Produces N events (benchmarks.common.produce_smartgrid: sensor and meter topics, 4
partitions each), then runs the whole pipeline from the beginning of the topics, each
run with its own consumer group and SQLite file:
  fnapi-batch    --mode=batch (FnApiRunner, bounded)
  prism-stop-end --mode=local --runner=PrismRunner --stop=end (bounded on Prism; refused
                 without PRISM_ALLOW_BOUNDED=1, because Prism drops rows buffered in
                 GroupIntoBatches when a bounded input ends: see the rows column)
  fnapi-stream   --mode=local (FnApiRunner, rounds) until committed = end, then SIGTERM
  prism-stream   --mode=local --runner=PrismRunner until committed = end, then SIGTERM
For each: events/s (N / time to exit, or for the streaming runs to every event in the
sink or committed),
CPU seconds of the launcher and everything it started (Prism included), peak RSS of
the launcher and of Prism (sampled from /proc every 0.1 s), rows in the sink, and the
drain latency (SIGTERM -> exit) of the streaming runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from benchmarks.common import PIPELINE_MAIN, bench_broker, cpu_seconds, produce_smartgrid, sink_rows

REPO = Path(__file__).resolve().parent.parent


def _rss_mb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return 0.0


def _children(pid: int) -> list[int]:
  out = []
  try:
    for task in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{task}/children") as f:
        out += [int(c) for c in f.read().split()]
  except OSError:
    pass
  return out


def _caught_up(c: KafkaConsumer, tps: list, end: dict, db: Path, n: int) -> bool:
  # Every event in the sink, or every offset committed. (Committed offsets alone are not
  # enough: CommitOffsets has no processing-time timer, so a stream that goes quiet keeps
  # its last acks uncommitted until the next ack or the drain; on Prism, which streams
  # for real, that tail waits for the SIGTERM.)
  return sink_rows(db) >= n or all((c.committed(tp) or 0) >= end[tp] for tp in tps)


def run(
  name: str,
  args: list[str],
  env_extra: dict,
  streaming: bool,
  bootstrap: str,
  topics: list[str],
  group: str,
  db: Path,
) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
  cpu_before = cpu_seconds(resource.RUSAGE_CHILDREN)
  t0 = time.monotonic()
  log = open(db.with_suffix(".log"), "w")
  proc = subprocess.Popen(
    [sys.executable, "-m", PIPELINE_MAIN, *args, "--progress_secs=0"],
    cwd=REPO,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  peak = {"launcher": 0.0, "prism": 0.0}
  consumer = tps = end = None
  if streaming:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t))]
    end = consumer.end_offsets(tps)
  caught_up_at = drain_s = None
  next_check = 0.0
  while proc.poll() is None:
    peak["launcher"] = max(peak["launcher"], _rss_mb(proc.pid))
    for c in _children(proc.pid):
      peak["prism"] = max(peak["prism"], _rss_mb(c))
    now = time.monotonic()
    if streaming and caught_up_at is None and now >= next_check:
      next_check = now + 0.2
      if _caught_up(consumer, tps, end, db, sum(end.values())):
        caught_up_at = now
        proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
  exited = time.monotonic()
  log.close()
  if consumer is not None:
    consumer.close(autocommit=False)
  output = db.with_suffix(".log").read_text(errors="replace")
  if proc.returncode != 0:
    raise RuntimeError(f"{name} exited {proc.returncode}:\n{output[-3000:]}")
  if caught_up_at is not None:
    drain_s = exited - caught_up_at
  rows = sink_rows(db)
  return {
    "wall": (caught_up_at or exited) - t0,
    "total": exited - t0,
    "cpu": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before,
    "rss_launcher": peak["launcher"],
    "rss_prism": peak["prism"],
    "rows": rows,
    "drain_s": drain_s,
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog="benchmarks.prism_bench",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--events", type=int, default=200_000)
  ap.add_argument("--bootstrap", default=None, help="an existing broker (default: start one)")
  ap.add_argument("--only", default=None, help="comma-separated run names (default: all)")
  a = ap.parse_args(argv)
  with bench_broker(a.bootstrap, "prism-bench") as (bootstrap, work):
    n = a.events
    sensor, meter = produce_smartgrid(bootstrap, n)
    common = [
      f"--bootstrap_servers={bootstrap}",
      f"--sensor_topic={sensor}",
      f"--meter_topic={meter}",
      "--start=earliest",
    ]
    runs = [
      ("fnapi-batch", ["--mode=batch"], {}, False),
      (
        "prism-stop-end",
        ["--mode=local", "--runner=PrismRunner", "--stop=end"],
        {"PRISM_ALLOW_BOUNDED": "1"},
        False,
      ),
      ("fnapi-stream", ["--mode=local"], {}, True),
      ("prism-stream", ["--mode=local", "--runner=PrismRunner"], {}, True),
    ]
    only = set(a.only.split(",")) if a.only else None
    for name, args, env_extra, streaming in runs:
      if only and name not in only:
        continue
      group = f"bench-{name}-{sensor}"
      db = work / f"{name}.db"
      extra = [f"--group_id={group}", f"--sink=sqlite:///{db}", f"--drain_file={work / name}.drain"]
      r = run(
        name, [*args, *common, *extra], env_extra, streaming, bootstrap, [sensor, meter], group, db
      )
      drain = f"  drain {r['drain_s']:.2f}s" if r["drain_s"] is not None else ""
      print(
        f"  {name:15s} {n / r['wall']:>8,.0f} events/s  ({r['wall']:.1f}s)  cpu {r['cpu']:.1f}s  "
        f"peak RSS launcher {r['rss_launcher']:.0f} MB, prism {r['rss_prism']:.0f} MB  "
        f"rows {r['rows']}/{n}{drain}",
        flush=True,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
