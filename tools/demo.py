"""``./run_pipeline.sh demo``: the main job on embedded defaults.

Starts the local broker (127.0.0.1:$KAFKA_PORT, default 9092; Kafka
$KAFKA_VERSION, default 3.9.1), writes about
20,000 events to both topics, runs the streaming pipeline into
``output/smartgrid.db``, drains it once it has caught up, and shows its summary
and two queries over the result.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from broker.kafka_broker import Broker, BrokerError, default_port
from tools import produce

REPO = Path(__file__).resolve().parent.parent
DB = REPO / "output" / "smartgrid.db"
GROUP = "smartgrid-pipeline"

QUERIES = [
  (
    "Average sensor value per type and window (latest 8)",
    """SELECT window_start, sensor_type, COUNT(*) AS n, ROUND(AVG(value), 2) AS avg_value
        FROM sensor_readings GROUP BY window_start, sensor_type
        ORDER BY window_start DESC, sensor_type LIMIT 8""",
  ),
  (
    "Dead letters per reason",
    """SELECT reason, raw_encoding, COUNT(*) AS n
        FROM dead_letters GROUP BY reason, raw_encoding ORDER BY n DESC""",
  ),
]


def _caught_up(bootstrap: str, topics: list[str]) -> bool:
  from kafka import KafkaConsumer, TopicPartition

  c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False)
  try:
    tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
    end = c.end_offsets(tps)
    return all((c.committed(tp) or 0) >= end[tp] for tp in tps)
  finally:
    c.close(autocommit=False)


def _print_table(cursor) -> None:
  cols = [d[0] for d in cursor.description]
  rows = cursor.fetchall()
  widths = [
    max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c)
    for i, c in enumerate(cols)
  ]
  print("  " + "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
  for r in rows:
    print("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def _move_old_db(broker: Broker) -> None:
  """A new broker's topics start again at offset 0: rows of an older broker's topics in the
  same file would take the new events for replays (unique topic, partition, offset)."""
  if (broker.run_dir / "data" / "meta.properties").exists() or not DB.exists():
    return
  backup = DB.with_name(f"smartgrid-{time.strftime('%Y%m%d-%H%M%S')}.db")
  for suffix in ("", "-wal", "-shm"):
    old_file = Path(str(DB) + suffix)
    if old_file.exists():
      old_file.rename(Path(str(backup) + suffix))
  print(f"   (a new broker: the previous {DB.name} was moved to {backup.name})")


def _start_broker() -> Broker | None:
  try:
    broker = Broker(port=default_port())
  except BrokerError as e:  # a bad KAFKA_PORT, KAFKA_VERSION or KAFKA_PARTITIONS
    print(f"error: {e}", file=sys.stderr)
    return None
  _move_old_db(broker)
  try:
    print("1. Starting the local Kafka broker ...", flush=True)
    print("   " + ("started" if broker.start() else "already running") + f": {broker.status()}")
  except BrokerError as e:
    print(f"error: {e}", file=sys.stderr)
    return None
  return broker


def _wait_and_drain(
  proc: subprocess.Popen, bootstrap: str, topics: list[str], timeout: float
) -> int:
  """Waits until the group has committed every end offset, then drains the pipeline."""
  try:
    deadline = time.monotonic() + timeout
    time.sleep(3)
    while not _caught_up(bootstrap, topics):
      if proc.poll() is not None:
        print(f"error: the pipeline exited early with {proc.returncode}", file=sys.stderr)
        return 1
      if time.monotonic() > deadline:
        print("error: the pipeline did not catch up in time", file=sys.stderr)
        return 1
      time.sleep(1)
    print("   caught up: committed offsets = end offsets. Draining (SIGTERM) ...", flush=True)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    print(f"   the pipeline exited {rc} {time.monotonic() - t:.1f}s after the drain signal")
    return rc
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _show_queries() -> None:
  print(f"4. Two queries over {DB.relative_to(REPO)} (sqlite3 {DB.relative_to(REPO)}):")
  conn = sqlite3.connect(DB)
  for title, sql in QUERIES:
    print(f"\n-- {title}\n{' '.join(sql.split())};")
    _print_table(conn.execute(sql))
  conn.close()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="run_pipeline.sh demo", description=__doc__)
  ap.add_argument("--count", type=int, default=20_000, help="events to produce (default 20000)")
  ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the pipeline")
  a = ap.parse_args(argv)
  broker = _start_broker()
  if broker is None:
    return 1
  bootstrap = broker.bootstrap_servers
  sensor, meter = "smartgrid-sensor-data", "smartgrid-meter-readings"

  print(f"2. Producing {a.count} events (1% malformed) ...", flush=True)
  counts = produce.produce(bootstrap, sensor, meter, a.count, bad_ratio=0.01, seed=int(time.time()))
  print(f"   {counts['sensor']} sensor, {counts['meter']} meter, {counts['bad']} malformed")

  print(
    f"3. Running the streaming pipeline into {DB.relative_to(REPO)}; it is drained once "
    "it has caught up ...",
    flush=True,
  )
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "runners.main",
      "--mode=local",
      f"--bootstrap_servers={bootstrap}",
      f"--group_id={GROUP}",
      f"--sink=sqlite:///{DB}",
    ],
    cwd=REPO,
    env=env,
  )
  rc = _wait_and_drain(proc, bootstrap, [sensor, meter], a.timeout)
  if rc != 0:
    return rc
  _show_queries()
  print(f"\nThe broker keeps running ({bootstrap}); stop it with ./run_pipeline.sh broker stop.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
