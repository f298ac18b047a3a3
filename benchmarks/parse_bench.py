"""CPU per record of ParseEvents' record -> row step (``_ParseEventsFn._to_row``), in memory.

    python -m benchmarks.parse_bench [--events 100000] [--repeat 5]

Builds realistic events with the project's generator (``tools.produce.EventFactory``, as
the pipeline benchmark produces them: 75% sensor, 25% meter, 30% of sensors with metadata)
as ``KafkaRecord``s, then times the set-up DoFn's ``_to_row`` over all of them, each
failure through ``_dead_letter`` as ``process`` does it. Lines: valid events; a 2%-malformed
mix (every malformed kind of the generator); the old service's naive timestamps
(``datetime.utcnow().isoformat()``). Prints µs per record (wall, best and median of the
repeats) and the process CPU per record. No broker, no runner. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time

from tools.produce import EventFactory
from transforms.kafka.records import KafkaRecord
from transforms.parse import METER, SENSOR, _ParseEventsFn

SENSOR_TOPIC, METER_TOPIC = "bench-sensor", "bench-meter"
START_S = 1_764_547_200.0  # 2025-12-01T00:00:00Z: fixed, so every run parses the same events
SPACING_S = 0.0005  # 2,000 events a second: about 120,000 per minute window


def make_records(n: int, bad_ratio: float, naive: bool = False) -> list[KafkaRecord]:
  """n records in two topics' order of arrival, each arriving 50 ms after its event time."""
  records = []
  factory = EventFactory(seed=11)
  for i, ev in enumerate(
    factory.events(n, bad_ratio=bad_ratio, start=START_S, spacing_s=SPACING_S)
  ):
    value = ev.value
    if naive and ev.bad is None:
      body = json.loads(value)
      stamp = dt.datetime.fromisoformat(body["timestamp"]).replace(tzinfo=None)
      body["timestamp"] = stamp.isoformat()
      value = json.dumps(body).encode()
    topic = SENSOR_TOPIC if ev.topic_kind == "sensor" else METER_TOPIC
    arrival_ms = int((START_S + i * SPACING_S) * 1000) + 50
    records.append(KafkaRecord(topic, i % 4, i, i, ev.key, value, arrival_ms, ()))
  return records


def make_fn() -> _ParseEventsFn:
  fn = _ParseEventsFn({SENSOR_TOPIC: SENSOR, METER_TOPIC: METER}, 60.0, 300.0, 4, "partition")
  fn.setup()
  fn.start_bundle()
  return fn


def run_once(fn: _ParseEventsFn, records: list[KafkaRecord]) -> tuple[float, float, int]:
  """(wall seconds, CPU seconds, dead letters) of one pass over records."""
  to_row, dead_letter = fn._to_row, fn._dead_letter
  dead = 0
  cpu, wall = time.process_time(), time.perf_counter()
  for record in records:
    try:
      to_row(record)
    except Exception as e:  # noqa: BLE001 - as process(): every failure is a dead letter
      dead_letter(record, e)
      dead += 1
  return time.perf_counter() - wall, time.process_time() - cpu, dead


def measure(label: str, records: list[KafkaRecord], repeat: int) -> None:
  fn = make_fn()
  run_once(fn, records[:2000])  # warm the caches, as a running worker has them
  runs = [run_once(fn, records) for _ in range(repeat)]
  n = len(records)
  walls = [w / n * 1e6 for w, _, _ in runs]
  cpus = [c / n * 1e6 for _, c, _ in runs]
  print(
    f"{label:<34} {n:>7} records, {runs[0][2]:>5} dead letters: "
    f"best {min(walls):5.2f} µs, median {statistics.median(walls):5.2f} µs wall; "
    f"CPU median {statistics.median(cpus):5.2f} µs per record",
    flush=True,
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--events", type=int, default=100_000)
  parser.add_argument("--repeat", type=int, default=5)
  args = parser.parse_args(argv)
  measure("valid (75% sensor, 25% meter)", make_records(args.events, 0.0), args.repeat)
  measure("2% malformed mix", make_records(args.events, 0.02), args.repeat)
  measure("valid, naive timestamps (old svc)", make_records(args.events, 0.0, True), args.repeat)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
