"""The old smart-grid ingestion service's producer, run as that service runs it.

Owns: installing kafka-python 2.0.2 (the version that service pins) into a folder of its
own, ``.cache/kafka-python-2.0.2`` (once, under a lock), and running this file in a
subprocess whose import path holds only the standard library and that folder
(``python -S``), so the project's kafka-python 3.x can never be picked up. As a script it
builds events the way the service's simulator does and sends them with the service's
producer settings; it prints one JSON line per acknowledged send.

The interpreter must import kafka-python 2.0.2: Python 3.12 removed what its vendored
``six`` needs, so on 3.12+ the script aliases the real ``six`` (installed beside it), the
workaround that service's users apply.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path

KAFKA_PYTHON_VERSION = "2.0.2"
SIX_VERSION = "1.16.0"
REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / ".cache" / f"kafka-python-{KAFKA_PYTHON_VERSION}"

# The service's simulator: sensor kinds with their value ranges, fixed places, customers.
SENSOR_TYPES = {
  "temperature": (15.0, 35.0, "°C"),
  "voltage": (220.0, 240.0, "V"),
  "current": (0.0, 32.0, "A"),
  "humidity": (20.0, 80.0, "%"),
}


def ensure_installed() -> Path:
  """pip-installs kafka-python 2.0.2 (and six, for Python 3.12+) into TARGET, once."""
  import fcntl  # POSIX only, like the rest of the test set-up

  stamp = TARGET / ".complete"
  want = f"kafka-python=={KAFKA_PYTHON_VERSION} six=={SIX_VERSION}"
  if stamp.exists() and stamp.read_text().strip() == want:
    return TARGET
  TARGET.parent.mkdir(parents=True, exist_ok=True)
  with open(TARGET.parent / f".kafka-python-{KAFKA_PYTHON_VERSION}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if stamp.exists() and stamp.read_text().strip() == want:
      return TARGET
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--upgrade",
        "--target",
        str(TARGET),
        f"kafka-python=={KAFKA_PYTHON_VERSION}",
        f"six=={SIX_VERSION}",
      ],
      check=False,
      capture_output=True,
      text=True,
    )
    if proc.returncode != 0:
      raise RuntimeError(
        f"pip could not install kafka-python {KAFKA_PYTHON_VERSION} into "
        f"{TARGET}:\n{proc.stdout}{proc.stderr}"
      )
    stamp.write_text(want)
  return TARGET


def run(
  bootstrap: str,
  sensor_topic: str,
  meter_topic: str,
  *,
  sensors: int,
  meters: int,
  twice_every: int,
  seed: int = 1,
  compression: str = "none",
  timeout: float = 180.0,
) -> list[dict]:
  """Sends the events with kafka-python 2.0.2 in a subprocess; one dict per acked send:
  topic, partition, offset, key, event (the value sent). compression: none or gzip (the
  codecs it can use with only the standard library)."""
  target = ensure_installed()
  args = [
    sys.executable,
    "-S",
    str(Path(__file__).resolve()),
    bootstrap,
    sensor_topic,
    meter_topic,
    str(sensors),
    str(meters),
    str(twice_every),
    str(seed),
    compression,
  ]
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  env["PYTHONPATH"] = str(target)
  proc = subprocess.run(
    args, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(target)
  )
  if proc.returncode != 0:
    raise AssertionError(
      f"the old service's producer failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )
  return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# The script side: standard library and kafka-python 2.0.2 only.


# datetime.utcnow(): naive UTC, exactly as the service stamps its events.
def _sensor_event(
  rng: random.Random, sensor_id: str, sensor_type: str, lat: float, lon: float
) -> dict:
  low, high, unit = SENSOR_TYPES[sensor_type]
  return {
    "event_id": f"{sensor_id}_{datetime.utcnow().timestamp()}",  # noqa: DTZ003
    "sensor_id": sensor_id,
    "sensor_type": sensor_type,
    "value": round(rng.uniform(low, high), 2),
    "location": {"lat": lat, "lon": lon},
    "timestamp": datetime.utcnow().isoformat(),  # noqa: DTZ003
    "metadata": {"unit": unit, "firmware_version": "1.2.3", "status": "active"},
  }


def _meter_event(rng: random.Random, meter_id: str, customer_id: str, total: float) -> dict:
  return {
    "event_id": f"{meter_id}_{datetime.utcnow().timestamp()}",  # noqa: DTZ003
    "meter_id": meter_id,
    "customer_id": customer_id,
    "reading": round(total, 3),
    "unit": "kWh",
    "timestamp": datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),  # noqa: DTZ003
  }


def _events(rng: random.Random, sensor_topic: str, meter_topic: str, sensors: int, meters: int):
  """(topic, key, event) in the order the simulator would post them, sensors and meters mixed."""
  places = [
    (
      f"SENSOR_{i:03d}",
      list(SENSOR_TYPES)[i % len(SENSOR_TYPES)],
      round(rng.uniform(40.0, 41.0), 6),
      round(rng.uniform(-74.5, -73.5), 6),
    )
    for i in range(20)
  ]
  customers = [(f"METER_{i:03d}", f"CUST_{i:04d}", rng.uniform(1000, 5000)) for i in range(10)]
  kinds = ["sensor"] * sensors + ["meter"] * meters
  rng.shuffle(kinds)
  for kind in kinds:
    if kind == "sensor":
      sid, stype, lat, lon = rng.choice(places)
      yield sensor_topic, sid, _sensor_event(rng, sid, stype, lat, lon)
    else:
      i = rng.randrange(len(customers))
      mid, cid, total = customers[i]
      customers[i] = (mid, cid, total + rng.uniform(0.1, 2.0))
      yield meter_topic, mid, _meter_event(rng, mid, cid, total)


def _main(argv: list[str]) -> int:
  bootstrap, sensor_topic, meter_topic = argv[:3]
  sensors, meters, twice_every, seed = (int(a) for a in argv[3:7])
  compression = None if argv[7] == "none" else argv[7]
  if sys.version_info >= (3, 12):
    import six  # installed beside kafka-python 2.0.2: its vendored copy fails on 3.12+

    sys.modules["kafka.vendor.six"] = six
    sys.modules["kafka.vendor.six.moves"] = six.moves
  import kafka
  from kafka import KafkaProducer

  assert kafka.__version__ == KAFKA_PYTHON_VERSION, (kafka.__version__, kafka.__file__)
  # The service's settings, verbatim: old protocol versions, no idempotence.
  producer = KafkaProducer(
    bootstrap_servers=[bootstrap],
    value_serializer=lambda v: json.dumps(v).encode("utf-8"),
    key_serializer=lambda k: k.encode("utf-8") if k else None,
    api_version=(0, 10, 1),
    acks="all",
    retries=3,
    max_in_flight_requests_per_connection=1,
    compression_type=compression,
  )
  sent = []
  rng = random.Random(seed)
  for i, (topic, key, event) in enumerate(_events(rng, sensor_topic, meter_topic, sensors, meters)):
    copies = 2 if twice_every and i % twice_every == 0 else 1
    # A retry without idempotence: the same event at a second offset.
    for _ in range(copies):
      sent.append((topic, key, event, producer.send(topic, key=key, value=event)))
  producer.flush(timeout=60)
  for topic, key, event, future in sent:
    meta = future.get(timeout=60)
    print(
      json.dumps(
        {
          "topic": topic,
          "partition": meta.partition,
          "offset": meta.offset,
          "key": key,
          "event": event,
        }
      )
    )
  producer.close(timeout=30)
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
