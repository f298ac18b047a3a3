"""Synthetic smart-grid events for both topics: ``./run_pipeline.sh produce``.

A thousand sensors of the four types at fixed places, five hundred meters with
their customers, realistic values, and a share of malformed events of every kind
the parser rejects. Topics that do not exist are created first, with
``$KAFKA_PARTITIONS`` partitions (default 4: the local broker's auto-creation
count too). The default broker is 127.0.0.1:$KAFKA_PORT (default 9092).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

SENSOR_TYPES = {
  "voltage": (230.0, 6.0),
  "current": (16.0, 5.0),
  "power": (3.5, 1.5),
  "frequency": (50.0, 0.05),
}
BAD_KINDS = (
  "not_json",
  "not_utf8",
  "missing_field",
  "wrong_type",
  "non_finite",
  "bad_timestamp",
  "not_object",
  "oversized",
)


@dataclass(frozen=True)
class Event:
  topic_kind: str  # sensor | meter
  key: bytes
  value: bytes
  bad: str | None = None  # the dead-letter reason it should get, for malformed events


class EventFactory:
  def __init__(self, seed: int = 7, sensors: int = 1000, meters: int = 500):
    self.rng = random.Random(seed)
    rng = self.rng
    self.sensors = [
      (
        f"sensor-{i:04d}",
        list(SENSOR_TYPES)[i % 4],
        round(rng.uniform(47.0, 55.0), 5),
        round(rng.uniform(5.5, 15.0), 5),
      )
      for i in range(sensors)
    ]
    self.meters = [
      (f"meter-{i:05d}", f"customer-{rng.randrange(10**6):06d}") for i in range(meters)
    ]
    self.meter_totals = [rng.uniform(100, 50_000) for _ in range(meters)]

  @staticmethod
  def _ts(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds")

  def sensor(self, now: float) -> Event:
    sid, kind, lat, lon = self.rng.choice(self.sensors)
    mean, sd = SENSOR_TYPES[kind]
    body = {
      "event_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
      "sensor_id": sid,
      "sensor_type": kind,
      "value": round(self.rng.gauss(mean, sd), 4),
      "location": {"lat": lat, "lon": lon},
      "timestamp": self._ts(now),
    }
    if self.rng.random() < 0.3:
      body["metadata"] = {
        "firmware": f"2.{self.rng.randrange(10)}",
        "substation": f"S{self.rng.randrange(40)}",
      }
    return Event("sensor", sid.encode(), json.dumps(body).encode())

  def meter(self, now: float) -> Event:
    i = self.rng.randrange(len(self.meters))
    self.meter_totals[i] += self.rng.uniform(0.0, 2.5)
    mid, cid = self.meters[i]
    body = {
      "event_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
      "meter_id": mid,
      "customer_id": cid,
      "reading": round(self.meter_totals[i], 3),
      "unit": "kWh",
      "timestamp": self._ts(now),
    }
    return Event("meter", mid.encode(), json.dumps(body).encode())

  def bad(self, now: float, kind: str | None = None) -> Event:
    kind = kind or self.rng.choice(BAD_KINDS)
    good = json.loads(self.sensor(now).value)
    if kind == "not_json":
      value = b'{"event_id": "x", "sensor_id": '
    elif kind == "not_utf8":
      value = b'{"event_id": "\xff\xfe"}'
    elif kind == "missing_field":
      del good["sensor_id"]
      value = json.dumps(good).encode()
    elif kind == "wrong_type":
      good["value"] = "high"
      value = json.dumps(good).encode()
    elif kind == "non_finite":
      value = (
        json.dumps(good).replace(f'"value": {json.dumps(good["value"])}', '"value": NaN').encode()
      )
    elif kind == "bad_timestamp":
      good["timestamp"] = "yesterday at noon"
      value = json.dumps(good).encode()
    elif kind == "not_object":
      value = b"[1, 2, 3]"
    else:  # oversized
      good["metadata"] = {"blob": "x" * 70_000}
      value = json.dumps(good).encode()
    return Event("sensor", b"bad", value, bad=kind)

  def events(
    self,
    count: int,
    bad_ratio: float = 0.0,
    meter_ratio: float = 0.25,
    start: float | None = None,
    spacing_s: float = 0.0,
  ) -> Iterator[Event]:
    now = time.time() if start is None else start
    for i in range(count):
      t = now + i * spacing_s if start is not None else time.time()
      r = self.rng.random()
      if r < bad_ratio:
        yield self.bad(t)
      elif r < bad_ratio + meter_ratio:
        yield self.meter(t)
      else:
        yield self.sensor(t)


def ensure_topics(bootstrap: str, topics: list[str], partitions: int | None = None) -> None:
  """Creates the missing topics (partitions: default $KAFKA_PARTITIONS or 4)."""
  from broker.kafka_broker import default_partitions
  from broker.topics import create_topics

  create_topics(bootstrap, topics, partitions if partitions is not None else default_partitions())


def produce(
  bootstrap: str,
  sensor_topic: str,
  meter_topic: str,
  count: int,
  *,
  rate: float = 0.0,
  bad_ratio: float = 0.01,
  seed: int = 7,
  progress: bool = False,
) -> dict:
  """Writes count events; returns counts per topic kind and per bad kind."""
  from kafka import KafkaProducer

  ensure_topics(bootstrap, [sensor_topic, meter_topic])
  producer = KafkaProducer(
    bootstrap_servers=bootstrap,
    acks="all",
    linger_ms=10,
    batch_size=256 * 1024,
    max_request_size=2 * 1024 * 1024,
  )
  counts: dict = {"sensor": 0, "meter": 0, "bad": 0}
  started = time.monotonic()
  try:
    for i, ev in enumerate(EventFactory(seed).events(count, bad_ratio)):
      if rate > 0:
        delay = started + i / rate - time.monotonic()
        if delay > 0:
          time.sleep(delay)
      producer.send(
        sensor_topic if ev.topic_kind == "sensor" else meter_topic, key=ev.key, value=ev.value
      )
      counts["bad" if ev.bad else ev.topic_kind] += 1
      if progress and (i + 1) % 10_000 == 0:
        print(f"  produced {i + 1}/{count}", file=sys.stderr, flush=True)
    producer.flush()
  finally:
    producer.close()
  return counts


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="run_pipeline.sh produce", description=__doc__)
  ap.add_argument("--count", type=int, default=1000, help="events to write (default 1000)")
  ap.add_argument(
    "--rate", type=float, default=0.0, help="events per second (default: as fast as possible)"
  )
  ap.add_argument(
    "--bad-ratio", type=float, default=0.01, help="share of malformed events (default 0.01)"
  )
  ap.add_argument(
    "--bootstrap_servers",
    default=None,
    help="Kafka brokers (default: 127.0.0.1:$KAFKA_PORT, i.e. 127.0.0.1:9092)",
  )
  ap.add_argument("--sensor_topic", default="smartgrid-sensor-data")
  ap.add_argument("--meter_topic", default="smartgrid-meter-readings")
  ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
  a = ap.parse_args(argv)
  if a.count < 0:
    ap.error(f"--count must be >= 0, got {a.count}")
  if a.rate < 0:
    ap.error(f"--rate must be >= 0, got {a.rate}")
  if not 0.0 <= a.bad_ratio <= 1.0 or math.isnan(a.bad_ratio):
    ap.error(f"--bad-ratio must be within [0, 1], got {a.bad_ratio}")
  # Imported here: the pipelines package ships to workers (setup.py) without broker/.
  from broker.kafka_broker import BrokerError, default_bootstrap

  try:
    bootstrap = a.bootstrap_servers or default_bootstrap()
  except BrokerError as e:
    ap.error(str(e))
  seed = a.seed if a.seed is not None else int(time.time())
  t = time.monotonic()
  counts = produce(
    bootstrap,
    a.sensor_topic,
    a.meter_topic,
    a.count,
    rate=a.rate,
    bad_ratio=a.bad_ratio,
    seed=seed,
    progress=True,
  )
  print(
    f"Produced {a.count} events in {time.monotonic() - t:.1f}s: {counts['sensor']} sensor, "
    f"{counts['meter']} meter, {counts['bad']} malformed (to {a.sensor_topic})."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
