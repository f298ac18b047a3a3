"""What the benchmarks share: a broker and a scratch folder, the raw-consumer baseline
(one loop for every benchmark, so their ratios compare), the smart-grid test topics, CPU
readings and the sink's row count."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from broker.kafka_broker import Broker, free_port
from tools.produce import EventFactory, ensure_topics

# The product's modules the benchmarks run are named in this file only (they move in the
# restructuring): the generator above and the entry point, python -m PIPELINE_MAIN --mode=...
PIPELINE_MAIN = "runners.main"

SINK_TABLES = ("sensor_readings", "meter_readings", "dead_letters")


@contextlib.contextmanager
def bench_broker(bootstrap: str | None, prefix: str) -> Iterator[tuple[str, Path]]:
  """(bootstrap servers, scratch folder): the given broker, or one started here on a free
  port; the broker this started and the folder are gone afterwards."""
  work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
  broker = None
  try:
    if bootstrap is None:
      broker = Broker(port=free_port(), run_dir=work / "kafka")
      broker.start()
      bootstrap = broker.bootstrap_servers
    yield bootstrap, work
  finally:
    if broker is not None:
      broker.stop()
    shutil.rmtree(work, ignore_errors=True)


def sink_rows(db: Path) -> int:
  """Rows in all three tables of a SQLite sink, read-only (also while a run writes it);
  0 before it has its tables."""
  if not Path(db).exists():
    return 0
  try:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
      return sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in SINK_TABLES)
    finally:
      conn.close()
  except sqlite3.OperationalError:  # tables not created yet
    return 0


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
  r = resource.getrusage(who)
  return r.ru_utime + r.ru_stime


def from_beginning(bootstrap: str, topics: list[str]) -> KafkaConsumer:
  """A consumer assigned to every partition of topics, at their beginning, committing nothing."""
  c = KafkaConsumer(
    bootstrap_servers=bootstrap,
    enable_auto_commit=False,
    isolation_level="read_committed",
    max_poll_records=2000,
  )
  c.assign([TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t))])
  c.seek_to_beginning()
  return c


def raw_consume(bootstrap: str, topics: list[str], n: int) -> int:
  """The baseline: kafka-python poll(500) + json.loads until n records are read."""
  c = from_beginning(bootstrap, topics)
  try:
    seen = 0
    while seen < n:
      for records in c.poll(timeout_ms=500).values():
        for r in records:
          json.loads(r.value)
        seen += len(records)
    return seen
  finally:
    c.close(autocommit=False)


def produce_smartgrid(
  bootstrap: str, n: int, seed: int = 11, topics: tuple[str, str] | None = None
) -> tuple[str, str]:
  """n realistic events (tools.produce, no malformed ones) to the (sensor, meter) topics,
  by default fresh ones of 4 partitions each; returns their names."""
  tag = uuid.uuid4().hex[:6]
  sensor, meter = topics or (f"bench-sensor-{tag}", f"bench-meter-{tag}")
  print(f"Producing {n} events to {sensor} / {meter} ...", flush=True)
  ensure_topics(bootstrap, [sensor, meter])
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
  for ev in EventFactory(seed).events(n, bad_ratio=0.0):
    producer.send(sensor if ev.topic_kind == "sensor" else meter, key=ev.key, value=ev.value)
  producer.flush()
  producer.close()
  return sensor, meter
