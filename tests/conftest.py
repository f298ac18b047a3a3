"""Session fixtures: one real Kafka broker for the whole run, a fresh topic per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from broker.kafka_broker import Broker, free_port
from tests import support


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
  """A running broker: $KAFKA_BOOTSTRAP_SERVERS if set, else one started here and stopped after."""
  given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
  if given:
    yield given
    return
  run_dir = Path(tempfile.mkdtemp(prefix="kafka-test-"))
  broker = Broker(port=free_port(), run_dir=run_dir)
  broker.start()
  try:
    yield broker.bootstrap_servers
  finally:
    broker.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def make_topic(kafka_bootstrap):
  """make_topic(partitions=1, prefix='t') -> a new topic name on the session broker."""
  def _make(partitions: int = 1, prefix: str = "t") -> str:
    return support.create_topic(kafka_bootstrap, support.unique_topic(prefix), partitions)
  return _make
