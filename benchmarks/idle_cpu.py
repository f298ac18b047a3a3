"""Idle CPU of the local streaming pipeline, on a plain and on a transactional topic.

    python -m benchmarks.idle_cpu [--seconds 30] [--workers 2] [--bootstrap HOST:PORT]

For each kind of topic: write a few hundred events (the transactional producer commits
most transactions and aborts some, so the log ends with a commit or abort marker),
start the pipeline (``--mode=local``), wait until the group's committed offsets equal the
end offsets (caught up), then measure the CPU time of the whole process tree (the
launcher or supervisor and its workers) over ``--seconds`` of idleness and print it as
% of one core. Goal: at most 5%. Before the reader acked offsets that no record covers,
a trailing transaction marker was never committed and every idle check started a new
empty round: about a core per worker.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import PIPELINE_MAIN, EventFactory, bench_broker
from tests import support

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    out.append(p)
    try:
      with open(f"/proc/{p}/task/{p}/children") as f:
        todo.extend(int(c) for c in f.read().split())
    except FileNotFoundError:
      pass
  return out


def tree_cpu_seconds(pid: int) -> float:
  """utime + stime of pid and every live descendant (seconds)."""
  total = 0
  for p in _tree(pid):
    try:
      with open(f"/proc/{p}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    except (FileNotFoundError, IndexError):
      pass
  return total / TICK


def _produce(bootstrap: str, topics: tuple[str, str], n: int, transactional: bool) -> None:
  kwargs = (
    dict(transactional_id=f"tx-{uuid.uuid4().hex}", enable_idempotence=True)
    if transactional
    else {}
  )
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **kwargs)
  if transactional:
    producer.init_transactions()
  events = list(EventFactory(3).events(n))
  try:
    for i in range(0, n, 20):
      if transactional:
        producer.begin_transaction()
      for ev in events[i : i + 20]:
        producer.send(
          topics[0] if ev.topic_kind == "sensor" else topics[1], key=ev.key, value=ev.value
        )
      producer.flush()
      if transactional:
        # Every third transaction aborted; the last one committed: the log ends with markers.
        aborted = (i // 20) % 3 == 1 and i + 20 < n
        (producer.abort_transaction if aborted else producer.commit_transaction)()
  finally:
    producer.close()


def _caught_up(bootstrap: str, group: str, topics: tuple[str, str]) -> bool:
  c = KafkaConsumer(
    bootstrap_servers=bootstrap,
    group_id=group,
    enable_auto_commit=False,
    isolation_level="read_committed",
  )
  try:
    tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
    end = c.end_offsets(tps)
    return all((c.committed(tp) or 0) == e for tp, e in end.items())
  finally:
    c.close()


def measure(bootstrap: str, work: Path, kind: str, seconds: float, workers: int) -> float:
  topics = (support.unique_topic("idle-sensor"), support.unique_topic("idle-meter"))
  for t in topics:
    support.create_topic(bootstrap, t, 2)
  _produce(bootstrap, topics, 300, transactional=kind == "transactional")
  group = f"idle-{uuid.uuid4().hex[:8]}"
  log = open(work / f"{kind}.log", "w")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      PIPELINE_MAIN,
      "--mode=local",
      f"--bootstrap_servers={bootstrap}",
      f"--sensor_topic={topics[0]}",
      f"--meter_topic={topics[1]}",
      f"--group_id={group}",
      f"--sink=sqlite:///{work / (kind + '.db')}",
      f"--drain_file={work / (kind + '.drain')}",
      f"--local_workers={workers}",
      "--progress_secs=5",
    ],
    cwd=str(REPO),
    env={**os.environ, "PYTHONPATH": str(REPO)},
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  try:
    support.wait_for(
      lambda: _caught_up(bootstrap, group, topics) or proc.poll() is not None,
      timeout=120,
      interval=0.5,
      what=f"the {kind} run to catch up",
    )
    if proc.poll() is not None:
      raise RuntimeError(f"the pipeline exited with {proc.returncode}: see {work / kind}.log")
    time.sleep(2)  # let the last round's end settle before the measured window
    before, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
    time.sleep(seconds)
    used, elapsed = tree_cpu_seconds(proc.pid) - before, time.monotonic() - t0
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
  return 100.0 * used / elapsed


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=30.0)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--bootstrap", default=None, help="an existing broker (default: start one)")
  args = parser.parse_args(argv)
  with bench_broker(args.bootstrap, "idle-cpu") as (bootstrap, work):
    results = {
      kind: measure(bootstrap, work, kind, args.seconds, args.workers)
      for kind in ("plain", "transactional")
    }
  print(
    f"idle CPU of the local pipeline ({args.workers} workers, {args.seconds:.0f} s idle, "
    f"whole process tree, % of one core):"
  )
  for kind, pct in results.items():
    print(f"  {kind:14s} {pct:5.1f}%  {'ok' if pct <= 5.0 else 'ABOVE the 5% goal'}")
  return 0 if all(p <= 5.0 for p in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
