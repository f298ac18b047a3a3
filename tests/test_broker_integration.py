"""The local broker that everything else stands on: lifecycle, errors and a real round trip."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from broker.kafka_broker import (
  RUN_ROOT,
  TESTED_VERSIONS,
  Broker,
  BrokerError,
  _pid_alive,
  free_port,
  port_in_use,
)
from tests import support

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _module(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    check=False,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=180,
    env={**os.environ, "PYTHONPATH": str(REPO), **env},
  )


def _cli(*args: str, port: int, **env: str) -> subprocess.CompletedProcess:
  return _module("broker.kafka_broker", *args, "--port", str(port), **env)


def test_keyed_round_trip_across_partitions(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=3)
  events = [(f"sensor-{i % 7}", {"n": i}) for i in range(300)]
  coords = support.produce(kafka_bootstrap, topic, events)
  assert len(set(coords)) == 300
  assert {p for p, _ in coords} == {0, 1, 2}

  consumer = KafkaConsumer(
    bootstrap_servers=kafka_bootstrap,
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    consumer_timeout_ms=5000,
  )
  consumer.assign([TopicPartition(topic, p) for p in range(3)])
  consumer.seek_to_beginning()
  seen = {}
  for rec in consumer:
    seen[(rec.partition, rec.offset)] = (rec.key.decode(), rec.value)
    if len(seen) == 300:
      break
  consumer.close()
  assert sorted(seen) == sorted(coords)
  # Same key, same partition; every value arrives once.
  by_key = {}
  for (p, _), (key, _) in seen.items():
    by_key.setdefault(key, set()).add(p)
  assert all(len(ps) == 1 for ps in by_key.values())
  assert sorted(json.loads(v)["n"] for _, v in seen.values()) == list(range(300))


def test_start_stop_leaves_no_process_and_no_port(tmp_path):
  broker = Broker(port=free_port(), run_dir=tmp_path / "b")
  assert broker.start()
  pid = broker.pid()
  assert pid and _pid_alive(pid)
  assert port_in_use(broker.port)
  assert broker.stop()
  assert not _pid_alive(pid)
  assert not port_in_use(broker.port)
  assert broker.pid() is None


def test_cli_is_idempotent_and_reports_status():
  port = free_port()
  try:
    r = _cli("status", port=port)
    assert r.returncode == 0 and r.stdout.startswith("stopped"), r
    r = _cli("start", port=port)
    assert r.returncode == 0 and "started" in r.stdout, r.stderr
    r = _cli("start", port=port)
    assert r.returncode == 0 and "already running" in r.stdout, r.stderr
    r = _cli("status", port=port)
    assert r.returncode == 0 and r.stdout.startswith("running") and f"127.0.0.1:{port}" in r.stdout
    pid = int(r.stdout.split("pid ")[1].split(",")[0])
    assert _pid_alive(pid)
    r = _cli("stop", port=port)
    assert r.returncode == 0 and "stopped" in r.stdout
    assert not _pid_alive(pid)
    r = _cli("stop", port=port)
    assert r.returncode == 0 and "was not running" in r.stdout
    r = _cli("status", port=port)
    assert r.stdout.startswith("stopped")
  finally:
    _cli("stop", port=port)
    shutil.rmtree(RUN_ROOT / f"kafka-{port}", ignore_errors=True)


def test_start_on_a_taken_port_fails_clearly():
  with socket.socket() as squatter:
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    r = _cli("start", port=port)
  shutil.rmtree(RUN_ROOT / f"kafka-{port}", ignore_errors=True)
  assert r.returncode == 1
  assert f"port {port} on 127.0.0.1 is already in use" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("version", TESTED_VERSIONS)
def test_each_version_logs_to_its_file_and_creates_topics_on_first_use(tmp_path, version):
  broker = Broker(port=free_port(), run_dir=tmp_path / "b", version=version, partitions=3)
  other = next(v for v in TESTED_VERSIONS if v != version)
  try:
    assert broker.start()
    assert f"Kafka {version}" in broker.status()
    # The old service's way: no topic created first; the first send creates it.
    coords = support.produce(
      broker.bootstrap_servers, "never-created", [(f"k{i}", {"n": i}) for i in range(60)]
    )
    assert len(set(coords)) == 60
    assert support.partitions_of(broker.bootstrap_servers, "never-created") == {0, 1, 2}
    assert sum(support.end_offsets(broker.bootstrap_servers, "never-created").values()) == 60
    log = broker.log_file.read_text()
    assert "Kafka Server started" in log and version in log, log[-2000:]
  finally:
    broker.stop()
  assert (broker.run_dir / "kafka.version").read_text().strip() == version
  # The data of one version is never opened by another: a clear refusal, no process.
  with pytest.raises(
    BrokerError, match=rf"formatted by Kafka {version}, not {other}.*KAFKA_VERSION={version}"
  ):
    Broker(port=broker.port, run_dir=broker.run_dir, version=other).start()
  assert broker.pid() is None
  # Restarting with the same version keeps the topic and its records.
  try:
    assert broker.start()
    assert sum(support.end_offsets(broker.bootstrap_servers, "never-created").values()) == 60
  finally:
    broker.stop()


@pytest.mark.parametrize(
  "env, needle",
  [
    ({"KAFKA_VERSION": "2.8.1"}, "KAFKA_VERSION=2.8.1 is not supported"),
    ({"KAFKA_VERSION": "latest"}, "KAFKA_VERSION='latest' is not a Kafka version"),
    ({"KAFKA_PARTITIONS": "0"}, "KAFKA_PARTITIONS='0' must be a whole number"),
    ({"KAFKA_PARTITIONS": "four"}, "KAFKA_PARTITIONS='four' must be a whole number"),
  ],
)
def test_bad_broker_settings_fail_at_start_naming_them(env, needle):
  port = free_port()
  r = _cli("start", port=port, **env)
  shutil.rmtree(RUN_ROOT / f"kafka-{port}", ignore_errors=True)
  assert r.returncode == 1 and needle in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert not port_in_use(port)


def test_bad_kafka_port_fails_every_command_naming_it():
  for module, args in (
    ("broker.kafka_broker", ["status"]),
    ("broker.topics", ["describe"]),
    ("tools.produce", ["--count", "1"]),
  ):
    r = _module(module, *args, KAFKA_PORT="90000")
    assert r.returncode != 0 and "KAFKA_PORT='90000' must be a port number" in r.stderr, (module, r)


def test_topics_command_creates_and_describes(kafka_bootstrap):
  a, b = support.unique_topic("topics-a"), support.unique_topic("topics-b")
  port = kafka_bootstrap.rsplit(":", 1)[1]
  # The default bootstrap is 127.0.0.1:$KAFKA_PORT; topics may follow the options.
  r = _module("broker.topics", "create", "--partitions", "3", a, b, KAFKA_PORT=port)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
    f"{a}: created with 3 partition(s)",
    f"{b}: created with 3 partition(s)",
  ]
  assert support.partitions_of(kafka_bootstrap, a) == {0, 1, 2}
  r = _module("broker.topics", "create", "--bootstrap_servers", kafka_bootstrap, a)
  assert (
    r.returncode == 0
    and r.stdout.strip() == f"{a}: already exists with 3 partition(s) (left as it is)"
  )
  support.produce(kafka_bootstrap, a, [(None, {"n": i}) for i in range(7)], partition=1)
  r = _module("broker.topics", "describe", a, KAFKA_PORT=port)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
    f"{a}: 3 partition(s), 7 record(s) in the log",
    "  partition 0: leader 1, offsets [0, 0)",
    "  partition 1: leader 1, offsets [0, 7)",
    "  partition 2: leader 1, offsets [0, 0)",
  ]
  missing = support.unique_topic("missing")
  r = _module("broker.topics", "describe", a, missing, KAFKA_PORT=port)
  assert r.returncode == 1 and f"{missing}: not found" in r.stdout
  # Describing never creates (auto-creation is on): the topic is still absent.
  assert not support.partitions_of(kafka_bootstrap, missing)
  for bad, needle in (
    (["create", "bad name!"], "invalid topic name(s) 'bad name!'"),
    (["create", "--partitions", "0", "x"], "--partitions must be >= 1"),
  ):
    r = _module("broker.topics", *bad, KAFKA_PORT=port)
    assert r.returncode == 1 and needle in r.stderr, r.stderr


def test_produce_defaults_to_kafka_port_and_creates_topics_with_kafka_partitions(kafka_bootstrap):
  sensor, meter = support.unique_topic("prod-sensor"), support.unique_topic("prod-meter")
  port = kafka_bootstrap.rsplit(":", 1)[1]
  r = _module(
    "tools.produce",
    "--count",
    "200",
    "--sensor_topic",
    sensor,
    "--meter_topic",
    meter,
    KAFKA_PORT=port,
    KAFKA_PARTITIONS="5",
  )
  assert r.returncode == 0, r.stderr
  assert support.partitions_of(kafka_bootstrap, sensor) == set(range(5))
  assert support.partitions_of(kafka_bootstrap, meter) == set(range(5))
  total = sum(support.end_offsets(kafka_bootstrap, sensor).values()) + sum(
    support.end_offsets(kafka_bootstrap, meter).values()
  )
  assert total == 200
