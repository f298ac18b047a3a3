"""Avro with a schema registry, end to end: a real Apicurio Registry, a real Kafka broker and the
pipeline's batch mode as a subprocess.

The topics hold what the old ingestion service sends once its Avro path works (Confluent-framed
Avro written by confluent-kafka's own AvroSerializer under subjects ``<topic>-value``), mixed
with its JSON fallback events, events framed with schema ids the registry does not know, a
corrupt Avro body, a framed event of the other topic's schema and a JSON poison record. Every
offset must give exactly its expected row or dead letter, and the group's committed offsets must
reach the end offsets. The same topics are then read without a registry (framed values are
``avro_needs_registry`` dead letters) and with an unreachable one (``registry_unavailable``):
runs that end normally, never a crash.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from kafka import KafkaProducer

from tests.avro_schemas import METER_READING, SENSOR_DATA
from tests.parse_support import old_service_meter, old_service_sensor
from tests.pipeline_support import assert_exactly_once, committed, ends, query, run_to_end
from tests.registry_fixtures import schema_registry  # noqa: F401 - the session fixture
from transforms.avro import frame
from transforms.events import decode_raw_value

SECRET = "registry-pw-" + uuid.uuid4().hex


@dataclass
class Sent:
  topic: str
  partition: int
  offset: int
  value: bytes
  table: str  # sensor_readings / meter_readings / dead_letters
  expect: str  # the event_id of the row, or the dead letter's reason
  framed: bool

  @property
  def coords(self):
    return (self.topic, self.partition, self.offset)


def _serializer(client: SchemaRegistryClient, schema: dict) -> AvroSerializer:
  return AvroSerializer(client, json.dumps(schema), conf={"auto.register.schemas": True})


def _events(registry_url: str, sensor_topic: str, meter_topic: str) -> list[tuple]:
  """(topic, key, value, table, expected event_id or reason, framed) in production order."""
  client = SchemaRegistryClient({"url": registry_url})
  s_ctx = SerializationContext(sensor_topic, MessageField.VALUE)
  m_ctx = SerializationContext(meter_topic, MessageField.VALUE)
  to_sensor = _serializer(client, SENSOR_DATA)
  to_meter = _serializer(client, METER_READING)
  out = []
  for i in range(6):
    s = old_service_sensor(f"sensor_{i}")
    s["event_id"] = f"avro-s-{i}"
    s["metadata"] = {"unit": "°C", "firmware": f"2.{i}"}
    out.append(
      (sensor_topic, s["sensor_id"], to_sensor(s, s_ctx), "sensor_readings", s["event_id"], True)
    )
    m = old_service_meter(f"meter_{i}")
    m["event_id"] = f"avro-m-{i}"
    out.append(
      (meter_topic, m["meter_id"], to_meter(m, m_ctx), "meter_readings", m["event_id"], True)
    )
    js = old_service_sensor(f"sensor_{i}")
    js["event_id"] = f"json-s-{i}"
    out.append(
      (
        sensor_topic,
        js["sensor_id"],
        json.dumps(js).encode(),
        "sensor_readings",
        js["event_id"],
        False,
      )
    )
    jm = old_service_meter(f"meter_{i}")
    jm["event_id"] = f"json-m-{i}"
    out.append(
      (
        meter_topic,
        jm["meter_id"],
        json.dumps(jm).encode(),
        "meter_readings",
        jm["event_id"],
        False,
      )
    )
  good = to_sensor(old_service_sensor("sensor_x"), s_ctx)
  sensor_id = int.from_bytes(good[1:5], "big")
  meter_id = int.from_bytes(to_meter(old_service_meter(), m_ctx)[1:5], "big")
  unknown = max(sensor_id, meter_id) + 1000
  out += [
    (sensor_topic, "u1", frame(unknown, good[5:]), "dead_letters", "unknown_schema", True),
    (meter_topic, "u2", frame(unknown + 1, b"\x02\x04"), "dead_letters", "unknown_schema", True),
    (sensor_topic, "bad", good[:12], "dead_letters", "bad_avro", True),
    # a meter record framed on the sensor topic: decodes, then has no sensor fields
    (
      sensor_topic,
      "m-on-s",
      frame(meter_id, to_meter(old_service_meter(), m_ctx)[5:]),
      "dead_letters",
      "missing_field",
      True,
    ),
    (
      sensor_topic,
      "nan",
      json.dumps({**old_service_sensor(), "metadata": {"x": math.nan}}).encode(),
      "dead_letters",
      "non_finite",
      False,
    ),
  ]
  return out


def _produce(bootstrap: str, events: list[tuple]) -> list[Sent]:
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
  try:
    futures = [(e, producer.send(e[0], key=e[1].encode(), value=e[2])) for e in events]
    producer.flush()
    return [
      Sent(e[0], m.partition, m.offset, e[2], e[3], e[4], e[5])
      for e, m in ((e, f.get(timeout=30)) for e, f in futures)
    ]
  finally:
    producer.close()


@pytest.fixture(scope="module")
def avro_topics(kafka_bootstrap, schema_registry):  # noqa: F811 - the imported fixture
  from tests import support

  sensor = support.create_topic(kafka_bootstrap, support.unique_topic("avro-sensor"), 2)
  meter = support.create_topic(kafka_bootstrap, support.unique_topic("avro-meter"), 2)
  sent = _produce(kafka_bootstrap, _events(schema_registry.url, sensor, meter))
  return kafka_bootstrap, sensor, meter, sent


def _run(avro_topics, tmp_path, *extra):
  bootstrap, sensor, meter, sent = avro_topics
  group = f"g-{uuid.uuid4().hex[:8]}"
  p = run_to_end(bootstrap, sensor, meter, group, tmp_path, *extra, timeout=180)
  assert p.proc.returncode == 0, p.tail()
  db = tmp_path / "out.db"
  assert_exactly_once(db, [s.coords for s in sent])
  assert committed(bootstrap, group, sensor, meter) == ends(bootstrap, sensor, meter)
  return p, db


def _stored(db) -> dict:
  """(topic, partition, offset) -> (table, event_id or reason, dead-letter columns)."""
  out = {}
  for table in ("sensor_readings", "meter_readings"):
    for t, pt, o, event_id in query(
      db, f"SELECT kafka_topic, kafka_partition, kafka_offset, event_id FROM {table}"
    ):
      out[(t, pt, o)] = (table, event_id, None)
  for t, pt, o, reason, raw, encoding, size in query(
    db,
    "SELECT kafka_topic, kafka_partition, kafka_offset, reason, raw_value, raw_encoding, "
    "raw_size FROM dead_letters",
  ):
    out[(t, pt, o)] = ("dead_letters", reason, (raw, encoding, size))
  return out


def test_avro_json_and_unknown_schema_ids_on_one_topic_give_the_expected_row_or_dead_letter(
  avro_topics,
  schema_registry,  # noqa: F811 - the fixture imported above
  tmp_path,
  monkeypatch,
):
  # Apicurio runs without auth and ignores them; they must reach the client, never the log.
  monkeypatch.setenv("SCHEMA_REGISTRY_USERNAME", "pipeline")
  monkeypatch.setenv("SCHEMA_REGISTRY_PASSWORD", SECRET)
  p, db = _run(avro_topics, tmp_path, f"--schema_registry_url={schema_registry.url}")
  sent = avro_topics[3]
  stored = _stored(db)
  for s in sent:
    table, got, raw = stored[s.coords]
    assert (table, got) == (s.table, s.expect), s
    if raw is not None:
      value, encoding, size = raw
      assert decode_raw_value(value, encoding) == s.value and size == len(s.value)
      assert encoding == ("base64" if s.framed else "utf8")
  assert sum(s.framed and s.table != "dead_letters" for s in sent) == 12
  # Avro and JSON copies of the same reading give the same columns
  ((avro_meta,),) = query(db, "SELECT metadata FROM sensor_readings WHERE event_id='avro-s-0'")
  assert json.loads(avro_meta) == {"unit": "°C", "firmware": "2.0"} and "°C" in avro_meta
  avro_row = query(
    db,
    "SELECT sensor_id, value, latitude, longitude, event_time FROM "
    "sensor_readings WHERE event_id='avro-s-3'",
  )
  json_row = query(
    db,
    "SELECT sensor_id, value, latitude, longitude, event_time FROM "
    "sensor_readings WHERE event_id='json-s-3'",
  )
  assert avro_row == json_row and avro_row[0][4] == "2024-01-15T10:30:00.123456Z"
  assert "unknown_schema=2" in p.output and "bad_avro=1" in p.output, p.tail()
  assert SECRET not in p.output


def test_without_a_registry_framed_values_are_dead_letters_saying_so(avro_topics, tmp_path):
  p, db = _run(avro_topics, tmp_path)
  stored = _stored(db)
  for s in avro_topics[3]:
    table, got, _ = stored[s.coords]
    if s.framed:
      assert (table, got) == ("dead_letters", "avro_needs_registry"), s
    else:
      assert (table, got) == (s.table, s.expect), s
  ((error,),) = query(
    db, "SELECT error FROM dead_letters WHERE reason='avro_needs_registry' LIMIT 1"
  )
  assert "--schema_registry_url" in error


def test_an_unreachable_registry_gives_dead_letters_not_a_crash(avro_topics, tmp_path):
  from broker.kafka_broker import free_port

  closed = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"  # nothing listens there
  p, db = _run(avro_topics, tmp_path, f"--schema_registry_url={closed}")
  stored = _stored(db)
  for s in avro_topics[3]:
    table, got, _ = stored[s.coords]
    if s.framed:  # every framed value here has a whole header, so the schema is needed first
      assert (table, got) == ("dead_letters", "registry_unavailable"), s
    else:
      assert (table, got) == (s.table, s.expect), s


# ---------------------------------------------------------------------------
# The registry the scripts start


def _listening_addresses(port: int) -> set[str]:
  """Local addresses of the sockets listening on port (from /proc/net/tcp and tcp6)."""
  found = set()
  for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(path) as f:
      for line in f.readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
          found.add(address)
  return found


def test_the_registry_listens_on_127_0_0_1_only(schema_registry):  # noqa: F811
  if not hasattr(schema_registry, "management_port"):
    pytest.fail("SCHEMA_REGISTRY_URL points at a registry these tests did not start")
  loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1
  for port in (schema_registry.port, schema_registry.management_port):
    addresses = _listening_addresses(port)
    assert addresses and addresses <= loopback, (port, addresses)


def test_start_on_a_taken_port_fails_naming_it(tmp_path):
  import socket

  from schema_registry.control import RegistryError, start_registry

  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(RegistryError) as e:
      start_registry(port, state_dir=tmp_path)
  assert f"port {port}" in str(e.value) and "SCHEMA_REGISTRY_PORT" in str(e.value)
