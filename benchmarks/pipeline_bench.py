"""The pipeline end to end against hand-written loops: same topics, one run, every figure of
issue 13 with its goal.

    ./run_pipeline.sh bench pipeline [--events 1000000] [--bootstrap host:port] [--no-reader]
    (or: python -m benchmarks.pipeline_bench ...)

Produces N realistic events (sensor and meter topics, 4 partitions each) in two steps, and
measures each of the following as a process of its own, from the beginning of the topics:
  (0) pipeline ``--mode=batch``, 1 worker, over the first N/4 events (memory at a smaller size);
  (a) raw:      kafka-python, assign all partitions, poll(500) + json.loads;
  (b) loop:     kafka-python -> SQLite in batches of 100 (benchmarks.baselines); and the same
                loop with the sink's guarantees (synchronous=FULL, one row per event_id) and
                its transaction size: not a goal, what those two cost on their own;
  (c) reader:   ReadFromKafka(batched=True) | json.loads | count on FnApiRunner (unless
                --no-reader);
  (d) pipeline ``--mode=batch`` (FnApiRunner, GroupIntoBatches(100), SQLite sink, commit after
      the sink) with 1 and with 2 ``--local_workers``; time to the first committed offset;
  (e) pipeline ``--mode=local`` on a further 20,000 events: time to its first committed offset,
      and from SIGTERM to exit once caught up (drain).
For each: events/s, CPU µs per event of the whole process tree, peak RSS of each process.
Then the ratios of issue 13 with PASS/FAIL, and one line ``BENCH_JSON {...}`` to parse.
Not a test: the machine's other load shows in the figures; run it twice to see the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from benchmarks.baselines import STRICT_COMMIT_ROWS
from benchmarks.common import PIPELINE_MAIN, bench_broker, produce_smartgrid, sink_rows
from benchmarks.measure import CommitWatch, Measured, run_measured

REPO = Path(__file__).resolve().parent.parent
DRAIN_EVENTS = 20_000
# Issue 13's goals: (label, figure key, comparison, bound).
GOALS = (
  ("1 worker / loop (events/s)", "w1_over_loop", ">=", 0.6),
  ("CPU per event, 1 worker / loop", "cpu_w1_over_loop", "<=", 1.5),
  ("2 workers / loop (events/s)", "w2_over_loop", ">=", 1.1),
  ("peak RSS per process, MB (any run, any size)", "peak_rss_mb", "<=", 250.0),
  ("memory flat: peak RSS at N / at N/4", "rss_growth", "<=", 1.15),
  ("first committed offset, batch, s", "first_commit_batch_s", "<=", 2.0),
  ("first committed offset, local, s", "first_commit_local_s", "<=", 2.0),
  ("reader / raw (events/s)", "reader_over_raw", ">=", 0.6),
)


def _env() -> dict:
  return {**os.environ, "PYTHONPATH": str(REPO)}


def _check(m: Measured, what: str) -> Measured:
  if m.returncode != 0:
    raise RuntimeError(f"{what} exited {m.returncode}:\n{m.stderr[-3000:]}")
  return m


def _row(name: str, m: Measured, n: int, extra: str = "") -> dict:
  row = {
    "name": name,
    "events": n,
    "wall_s": round(m.wall_s, 3),
    "events_per_s": round(n / m.wall_s),
    "cpu_s": round(m.cpu_s, 3),
    "cpu_us_per_event": round(m.cpu_s / n * 1e6, 2),
    "peak_rss_mb": round(m.peak_rss_mb, 1),
    "processes": len(m.rss_mb),
    "rss_mb_per_process": sorted((round(v, 1) for v in m.rss_mb.values()), reverse=True),
    "first_commit_s": None if m.first_commit_s is None else round(m.first_commit_s, 2),
  }
  per = "/".join(f"{v:.0f}" for v in row["rss_mb_per_process"][:4])
  fc = "" if row["first_commit_s"] is None else f"  first commit {row['first_commit_s']:.2f}s"
  print(
    f"  {name:40s} {row['events_per_s']:>9,} ev/s  {row['cpu_us_per_event']:6.1f} µs CPU/ev  "
    f"peak RSS {row['peak_rss_mb']:4.0f} MB ({len(m.rss_mb)} proc: {per}){fc}{extra}",
    flush=True,
  )
  return row


def baseline(kind: str, bootstrap: str, topics: list[str], n: int, work: Path) -> Measured:
  argv = [
    sys.executable,
    "-m",
    "benchmarks.baselines",
    kind,
    bootstrap,
    str(n),
    str(work / f"{kind}.db"),
    *topics,
  ]
  return _check(run_measured(argv, _env(), REPO), kind)


def _batches(stderr: str) -> str:
  # The summary's line: "batches: N (F full of B rows[; P partial: ...])".
  found = re.findall(r"batches:\s+(\d+) \((\d+) full of", stderr)
  total, full = sum(int(b) for b, _ in found), sum(int(f) for _, f in found)
  return f"  batches {total} ({100 * full / total:.0f}% full)" if total else ""


def pipeline(
  mode: str,
  common: list[str],
  group: str,
  db: Path,
  workers: int,
  extra: tuple = (),
  while_running=None,
) -> Measured:
  argv = [
    sys.executable,
    "-m",
    PIPELINE_MAIN,
    f"--mode={mode}",
    *common,
    f"--group_id={group}",
    f"--sink=sqlite:///{db}",
    f"--local_workers={workers}",
    "--progress_secs=0",
    *extra,
  ]
  bootstrap = common[0].split("=", 1)[1]
  topics = [a.split("=", 1)[1] for a in common[1:]]
  watch = CommitWatch(bootstrap, group, topics)
  return _check(
    run_measured(argv, _env(), REPO, watch=watch, while_running=while_running),
    f"pipeline {mode} ({workers} workers)",
  )


def _drain_when_caught_up(bootstrap: str, group: str, topics: list[str]):
  """A while_running callback: waits until the group committed the end of every partition,
  then sends SIGTERM; the time from the signal to the exit is the drain latency."""
  state: dict = {}

  def run(proc) -> None:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
      tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t))]
      end = c.end_offsets(tps)
      deadline = time.monotonic() + 600
      while any((c.committed(tp) or 0) < end[tp] for tp in tps):
        if proc.poll() is not None:
          return
        if time.monotonic() > deadline:  # never caught up: stop it, no drain figure
          proc.send_signal(signal.SIGTERM)
          return
        time.sleep(0.2)
    finally:
      c.close(autocommit=False)
    state["signalled"] = time.monotonic()
    proc.send_signal(signal.SIGTERM)

  return run, state


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or not b else a / b


def _worst(values) -> float | None:
  values = list(values)
  return None if None in values else max(values)


def figures(rows: dict, n: int) -> dict:
  """The issue's figures from the measured rows."""
  eps = {k: r["events_per_s"] for k, r in rows.items()}
  cpu = {k: r["cpu_us_per_event"] for k, r in rows.items()}
  pipes = [r for k, r in rows.items() if k.startswith(("batch", "local"))]
  return {
    "w1_over_loop": _ratio(eps["batch_w1"], eps["loop"]),
    "cpu_w1_over_loop": _ratio(cpu["batch_w1"], cpu["loop"]),
    "w2_over_loop": _ratio(eps["batch_w2"], eps["loop"]),
    "cpu_w2_over_loop": _ratio(cpu["batch_w2"], cpu["loop"]),
    "cpu_w1_over_strict_loop": _ratio(cpu["batch_w1"], cpu["strict_loop"]),
    "w1_over_strict_loop": _ratio(eps["batch_w1"], eps["strict_loop"]),
    "strict_loop_over_loop": _ratio(eps["strict_loop"], eps["loop"]),
    "cpu_strict_loop_over_loop": _ratio(cpu["strict_loop"], cpu["loop"]),
    "peak_rss_mb": max(r["peak_rss_mb"] for r in pipes),
    "rss_at_quarter_mb": rows["batch_w1_quarter"]["peak_rss_mb"],
    "rss_at_n_mb": rows["batch_w1"]["peak_rss_mb"],
    "rss_growth": _ratio(rows["batch_w1"]["peak_rss_mb"], rows["batch_w1_quarter"]["peak_rss_mb"]),
    "first_commit_batch_s": _worst(rows[k]["first_commit_s"] for k in ("batch_w1", "batch_w2")),
    "first_commit_local_s": rows["local"]["first_commit_s"],
    "reader_over_raw": _ratio(eps.get("reader"), eps["raw"]),
    "events": n,
  }


def report(figs: dict) -> dict:
  print("\nGoals (issue 13):", flush=True)
  verdicts = {}
  for label, key, op, bound in GOALS:
    value = figs.get(key)
    if value is None:
      verdicts[key] = "n/a"
      print(f"  {label:46s} {'n/a':>8}   goal {op} {bound}", flush=True)
      continue
    ok = value >= bound if op == ">=" else value <= bound
    verdicts[key] = "PASS" if ok else "FAIL"
    print(f"  {label:46s} {value:8.2f}   goal {op} {bound:<6} {verdicts[key]}", flush=True)
  print(
    f"  (peak RSS of 1 worker: {figs['rss_at_quarter_mb']:.0f} MB at N/4, "
    f"{figs['rss_at_n_mb']:.0f} MB at N; CPU per event, 2 workers / loop: "
    f"{figs['cpu_w2_over_loop']:.2f})",
    flush=True,
  )
  print(
    f"  (against the loop with the sink's guarantees: 1 worker {figs['w1_over_strict_loop']:.2f} "
    f"of its events/s, {figs['cpu_w1_over_strict_loop']:.2f}x its CPU per event)",
    flush=True,
  )
  print(
    f"  (that loop alone, without Beam, against the loop: {figs['strict_loop_over_loop']:.2f} of "
    f"its events/s, {figs['cpu_strict_loop_over_loop']:.2f}x its CPU per event: the floor of "
    "the sink's guarantees, synchronous=FULL and one row per event_id)",
    flush=True,
  )
  return verdicts


def run_all(bootstrap: str, work: Path, n: int, with_reader: bool) -> dict:
  rows: dict = {}
  quarter = max(1, n // 4)
  sensor, meter = produce_smartgrid(bootstrap, quarter)
  topics = [sensor, meter]
  common = [
    f"--bootstrap_servers={bootstrap}",
    f"--sensor_topic={sensor}",
    f"--meter_topic={meter}",
  ]
  m = pipeline("batch", common, "bench-quarter", work / "quarter.db", 1, ("--start=earliest",))
  rows["batch_w1_quarter"] = _row(f"pipeline batch, 1 worker, N/4={quarter}", m, quarter)
  produce_smartgrid(bootstrap, n - quarter, seed=13, topics=(sensor, meter))
  print(f"Measuring over {n} events:", flush=True)
  rows["raw"] = _row(
    "raw kafka-python + json.loads", baseline("raw", bootstrap, topics, n, work), n
  )
  rows["loop"] = _row(
    "kafka-python -> SQLite loop, batches of 100", baseline("loop", bootstrap, topics, n, work), n
  )
  rows["strict_loop"] = _row(
    f"same loop, synchronous=FULL + unique event_id, commit / {STRICT_COMMIT_ROWS:,} rows",
    baseline("strict_loop", bootstrap, topics, n, work),
    n,
  )
  if with_reader:
    rows["reader"] = _row(
      "ReadFromKafka(batched) | json.loads", baseline("reader", bootstrap, topics, n, work), n
    )
  for workers in (1, 2):
    db = work / f"pipeline-{workers}.db"
    m = pipeline("batch", common, f"bench-{workers}", db, workers, ("--start=earliest",))
    rows[f"batch_w{workers}"] = _row(
      f"pipeline batch, {workers} worker{'s' * (workers > 1)}",
      m,
      n,
      f"  rows {sink_rows(db)}{_batches(m.stderr)}",
    )
  produce_smartgrid(bootstrap, DRAIN_EVENTS, seed=12, topics=(sensor, meter))
  drain, state = _drain_when_caught_up(bootstrap, "bench-1", topics)
  m = pipeline(
    "local",
    common,
    "bench-1",
    work / "pipeline-1.db",
    1,
    (f"--drain_file={work / 'drain'}",),
    while_running=drain,
  )
  drain_s = (time.monotonic() - state["signalled"]) if "signalled" in state else None
  rows["local"] = _row(
    f"pipeline local, 1 worker, {DRAIN_EVENTS} new",
    m,
    DRAIN_EVENTS,
    f"  drain {drain_s:.2f}s" if drain_s is not None else "  (not drained)",
  )
  rows["local"]["drain_s"] = drain_s
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog="benchmarks.pipeline_bench",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--events", type=int, default=200_000)
  ap.add_argument("--bootstrap", default=None, help="an existing broker (default: start one)")
  ap.add_argument("--no-reader", action="store_true", help="skip the ReadFromKafka-alone run")
  a = ap.parse_args(argv)
  if a.events < 4:
    ap.error(f"--events must be at least 4, got {a.events}")
  with bench_broker(a.bootstrap, "pipeline-bench") as (bootstrap, work):
    rows = run_all(bootstrap, work, a.events, not a.no_reader)
  figs = figures(rows, a.events)
  verdicts = report(figs)
  print(
    "BENCH_JSON " + json.dumps({"rows": rows, "figures": figs, "verdicts": verdicts}), flush=True
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
