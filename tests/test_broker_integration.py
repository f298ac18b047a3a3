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

from broker.kafka_broker import RUN_ROOT, Broker, _pid_alive, free_port, port_in_use
from tests import support

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _cli(*args: str, port: int) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "broker.kafka_broker", *args, "--port", str(port)],
                        cwd=REPO, capture_output=True, text=True, timeout=180,
                        env={**os.environ, "PYTHONPATH": str(REPO)})


def test_keyed_round_trip_across_partitions(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=3)
  events = [(f"sensor-{i % 7}", {"n": i}) for i in range(300)]
  coords = support.produce(kafka_bootstrap, topic, events)
  assert len(set(coords)) == 300
  assert {p for p, _ in coords} == {0, 1, 2}

  consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False,
                           auto_offset_reset="earliest", consumer_timeout_ms=5000)
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
