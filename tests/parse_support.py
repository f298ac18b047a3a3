"""Helpers for the parsing tests: the real ``_ParseEventsFn`` driven by hand, events shaped as
the old smart-grid service shapes them, and Confluent-framed Avro bodies."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fastavro
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from tests.avro_schemas import METER_READING, SENSOR_DATA
from transforms.avro import AvroDecoder, frame
from transforms.events import DeadLetter
from transforms.kafka.records import KafkaRecord
from transforms.parse import DEAD_LETTER_TAG, METER, SENSOR, _ParseEventsFn

SENSOR_TOPIC, METER_TOPIC = "sensor-t", "meter-t"
NOW_MS = 1_705_314_600_000  # 2024-01-15T10:30:00Z
SENSOR_SCHEMA_ID, METER_SCHEMA_ID = 1, 2
CLOSED_REGISTRY = "http://127.0.0.1:9/apis/ccompat/v7"  # the discard port: nothing listens


@dataclass
class Outcome:
  """What one record gave: exactly one of row (key, row tuple) or dead (DeadLetter)."""

  record: KafkaRecord
  rows: list = field(default_factory=list)
  dead: list = field(default_factory=list)
  other: list = field(default_factory=list)

  @property
  def row(self) -> tuple:
    assert len(self.rows) == 1 and not self.dead, self
    return self.rows[0][1]

  @property
  def dead_letter(self) -> DeadLetter:
    assert len(self.dead) == 1 and not self.rows, self
    return self.dead[0]


def make_fn(
  registry_url: str | None = None, *, seeded: bool = False, window_size_secs: float = 60.0
) -> _ParseEventsFn:
  """A set-up ParseEvents DoFn (no in-bundle batching). ``seeded``: its Avro decoder knows the
  old service's schemas under ids 1 (sensor) and 2 (meter) and fails fast on any other id."""
  fn = _ParseEventsFn(
    {SENSOR_TOPIC: SENSOR, METER_TOPIC: METER},
    window_size_secs,
    300.0,
    4,
    "partition",
    None,
    registry_url,
  )
  fn.setup()
  if seeded:
    fn._avro = AvroDecoder(registry_url, max_retries=0, timeout_s=1.0, cooldown_s=3600.0).open()
    fn._avro.remember(SENSOR_SCHEMA_ID, SENSOR_DATA)
    fn._avro.remember(METER_SCHEMA_ID, METER_READING)
  return fn


def run_fn(fn: _ParseEventsFn, records: Iterable[KafkaRecord]) -> list[Outcome]:
  """Feeds records one by one through process(); every output is attributed to its record."""
  outcomes = []
  fn.start_bundle()
  for record in records:
    outcome = Outcome(record)
    for out in fn.process(record):
      if isinstance(out, TaggedOutput) and out.tag == DEAD_LETTER_TAG:
        outcome.dead.append(out.value.value)
      elif isinstance(out, WindowedValue):
        outcome.rows.append(out.value)
      else:
        outcome.other.append(out)
    outcomes.append(outcome)
  leftovers = list(fn.finish_bundle() or ())
  assert not leftovers, leftovers  # no batching configured: nothing may wait for the bundle end
  return outcomes


def parse_one(
  value: bytes | None,
  topic: str = SENSOR_TOPIC,
  *,
  key: bytes | None = b"k",
  fn: _ParseEventsFn | None = None,
  timestamp_ms: int = NOW_MS,
) -> Outcome:
  (outcome,) = run_fn(fn or make_fn(), [KafkaRecord(topic, 0, 7, 7, key, value, timestamp_ms)])
  return outcome


def old_service_sensor(sensor_id: str = "sensor_042", when: dt.datetime | None = None) -> dict:
  """A sensor event as the old ingestion service builds it (naive utcnow() timestamps)."""
  when = when or dt.datetime(2024, 1, 15, 10, 30, 0, 123456)  # stands for datetime.utcnow()
  return {
    "event_id": f"{sensor_id}_{when.replace(tzinfo=dt.timezone.utc).timestamp()}",
    "sensor_id": sensor_id,
    "sensor_type": "voltage",
    "value": 231.4,
    "location": {"lat": 52.52, "lon": 13.405},
    "timestamp": when.isoformat(),
    "metadata": {"unit": "V", "firmware": "2.1"},
  }


def old_service_meter(meter_id: str = "meter_7") -> dict:
  """The service's documented meter example."""
  return {
    "event_id": f"{meter_id}_1705314600.0",
    "meter_id": meter_id,
    "customer_id": "cust_001",
    "reading": 1234.56,
    "unit": "kWh",
    "timestamp": "2024-01-15T10:30:00Z",
  }


def avro_body(schema: dict, record: dict) -> bytes:
  out = io.BytesIO()
  fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
  return out.getvalue()


def avro_sensor(record: dict | None = None, schema_id: int = SENSOR_SCHEMA_ID) -> bytes:
  return frame(schema_id, avro_body(SENSOR_DATA, record or old_service_sensor()))


def avro_meter(record: dict | None = None, schema_id: int = METER_SCHEMA_ID) -> bytes:
  return frame(schema_id, avro_body(METER_READING, record or old_service_meter()))


def jbytes(obj: Any) -> bytes:
  return json.dumps(obj).encode()
