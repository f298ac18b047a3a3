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


@pytest.fixture(scope="session")
def bq_emulator():
  """A running BigQuery emulator (bigquery_emulator/): ``.endpoint``, ``.project``, ``.client()``.

  $BIGQUERY_EMULATOR_ENDPOINT (with $BIGQUERY_EMULATOR_PROJECT, default test-project) reuses
  one already running; else one is started here on free ports and stopped after the session.
  """
  from bigquery_emulator.control import make_client, start_emulator

  given = os.environ.get("BIGQUERY_EMULATOR_ENDPOINT")
  if given:
    class _Given:
      endpoint = given
      project = os.environ.get("BIGQUERY_EMULATOR_PROJECT", "test-project")

      def client(self):
        return make_client(self.endpoint, self.project)
    yield _Given()
    return
  emulator = start_emulator(project="test-project")
  try:
    yield emulator
  finally:
    emulator.stop()
