"""ReadFromKafka against the raw kafka-python consumer loop, same topic, same run.

    python -m benchmarks.reader_bench [--events 200000] [--bootstrap host:port] [--profile out.prof]

Produces N JSON events of about 250 bytes to a fresh 4-partition topic (on --bootstrap,
or on a broker started here on a free port), then measures
  (a) raw: one KafkaConsumer, assign all partitions, seek to beginning, poll(500) + json.loads;
  (b) reader: ReadFromKafka(stop='end', batched=True) | json.loads per record, counted per
      poll | sum, on FnApiRunner (one element per poll, as the pipeline reads);
and prints events/s, CPU seconds (getrusage, this process: the runner is in-process),
peak RSS so far (ru_maxrss) and the ratio reader/raw. Beam is imported between the two
and that import is printed on its own line: it is not in the reader's figures, as
``import kafka`` is not in raw's. Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from benchmarks.common import bench_broker, cpu_seconds, raw_consume

PARTITIONS = 4


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def make_event(i: int, rng: random.Random) -> bytes:
  event = {
    "event_id": uuid.UUID(int=rng.getrandbits(128)).hex,
    "sensor_id": f"sensor-{i % 1000:04d}",
    "ts": 1_700_000_000_000 + i,
    "kind": "reading",
    "value": round(rng.uniform(-40, 60), 3),
    "unit": "celsius",
    "battery": round(rng.uniform(0, 1), 3),
    "seq": i,
    "site": f"site-{i % 37:02d}",
    "firmware": "2.14.7-rc3",
    "note": "x" * 10,
  }
  return json.dumps(event).encode()


def produce(bootstrap: str, topic: str, n: int) -> float:
  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  try:
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
  finally:
    admin.close()
  rng = random.Random(7)
  producer = KafkaProducer(
    bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024, compression_type=None
  )
  sizes = 0
  try:
    for i in range(n):
      value = make_event(i, rng)
      sizes += len(value)
      producer.send(topic, key=f"sensor-{i % 1000:04d}".encode(), value=value)
    producer.flush()
  finally:
    producer.close()
  return sizes / n


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
  c = KafkaConsumer(bootstrap_servers=bootstrap)
  try:
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return {tp.partition: o for tp, o in c.end_offsets(tps).items()}
  finally:
    c.close()


def import_beam() -> float:
  """Imports what the reader run needs; returns the seconds it took. Not part of the
  reader's figures, as raw's ``import kafka`` is not part of raw's."""
  t0 = time.perf_counter()
  import apache_beam  # noqa: F401
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: F401

  from transforms.kafka import ReadFromKafka  # noqa: F401

  return time.perf_counter() - t0


def bench_reader(bootstrap: str, topic: str | list[str]) -> int:
  import apache_beam as beam
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner

  from transforms.kafka import ReadFromKafka
  from transforms.kafka.client import close_idle_consumers

  out = Path(tempfile.mkdtemp(prefix="reader-bench-"))
  try:
    with beam.Pipeline(runner=FnApiRunner()) as p:
      _ = (
        p
        # As the pipeline reads: one element per poll (batched=True), every value decoded,
        # counted per poll: no per-record element downstream of the reader either.
        | "ReadBenchTopic" >> ReadFromKafka(bootstrap, topic, stop="end", batched=True)
        | "ParseJson" >> beam.Map(lambda batch: len([json.loads(r.value) for r in batch]))
        | "Count" >> beam.CombineGlobally(sum)
        | "WriteCount" >> beam.Map(lambda c: (out / "count").write_text(str(c)))
      )
    return int((out / "count").read_text())
  finally:
    shutil.rmtree(out, ignore_errors=True)
    # The reader's consumer waits idle in the process's pool (transforms.kafka.client): closed
    # now, before the bench stops its broker under it.
    close_idle_consumers()


def measure(name: str, fn, n: int) -> dict:
  c0, t0 = cpu_seconds(), time.perf_counter()
  count = fn()
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  if count != n:
    raise SystemExit(f"{name}: read {count} events, expected {n}")
  row = {
    "name": name,
    "events": count,
    "wall_s": wall,
    "events_per_s": count / wall,
    "cpu_s": cpu,
    "cpu_us_per_event": cpu / count * 1e6,
    "peak_rss_mb": peak_rss_mb(),
  }
  print(
    f"{name:>7}: {count} events in {wall:6.2f}s = {row['events_per_s']:9,.0f} events/s, "
    f"CPU {cpu:6.2f}s ({row['cpu_us_per_event']:.1f} µs/event), peak RSS {row['peak_rss_mb']:.0f} MB",
    flush=True,
  )
  return row


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--events", type=int, default=200_000)
  ap.add_argument("--bootstrap", help="a running broker; default: start one on a free port")
  ap.add_argument("--profile", help="cProfile the reader run into this file and print the top")
  ap.add_argument("--skip-raw", action="store_true")
  args = ap.parse_args(argv)

  import logging

  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("kafka").setLevel(logging.ERROR)

  with bench_broker(args.bootstrap, "reader-bench") as (bootstrap, _):
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    size = produce(bootstrap, topic, args.events)
    ends = end_offsets(bootstrap, topic)
    assert sum(ends.values()) == args.events, ends
    print(
      f"produced {args.events} events of {size:.0f} bytes to {topic} ({PARTITIONS} partitions: "
      f"{sorted(ends.values())}) in {time.perf_counter() - t0:.1f}s on {bootstrap}",
      flush=True,
    )

    raw = (
      None
      if args.skip_raw
      else measure("raw", lambda: raw_consume(bootstrap, [topic], args.events), args.events)
    )
    c0 = cpu_seconds()
    import_s = import_beam()
    print(
      f"import apache_beam and the reader: {import_s:.2f}s, CPU {cpu_seconds() - c0:.2f}s "
      f"(a once-per-process cost, left out of the reader's figures)",
      flush=True,
    )
    if args.profile:
      prof = cProfile.Profile()
      reader = measure("reader", lambda: prof.runcall(bench_reader, bootstrap, topic), args.events)
      prof.dump_stats(args.profile)
      stats = pstats.Stats(args.profile)
      stats.sort_stats("tottime").print_stats(25)
      stats.sort_stats("cumulative").print_stats(40)
    else:
      reader = measure("reader", lambda: bench_reader(bootstrap, topic), args.events)
    if raw:
      with_import = args.events / (reader["wall_s"] + import_s) / raw["events_per_s"]
      print(
        f"ratio reader/raw: {reader['events_per_s'] / raw['events_per_s']:.2f} "
        f"({with_import:.2f} counting Beam's import; "
        f"CPU per event {reader['cpu_us_per_event'] / raw['cpu_us_per_event']:.2f}x)"
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
