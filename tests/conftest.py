"""Session fixtures: a real Kafka broker per broker version, a fresh topic per test.

Broker versions: every test that uses ``kafka_bootstrap`` runs against a broker the session
starts (``broker.kafka_broker``). The reader and pipeline integration tests (the modules in
ALL_VERSIONS_MODULES, or a test marked ``all_kafka_versions``) run once per version of
$KAFKA_TEST_VERSIONS (default ``3.9.1,4.1.1``: ids ``kafka3.9.1`` / ``kafka4.1.1``); the other
tests run on the first of them. ``@pytest.mark.kafka_versions("3")`` restricts a test to the
listed versions or major lines (e.g. a client that only talks to 3.x brokers). One broker runs
at a time: pytest groups the tests by version, and the previous version's broker is stopped
when the next one starts.

$KAFKA_BOOTSTRAP_SERVERS set: every test uses that broker once instead (its version is
unknown to the suite; $KAFKA_VERSION may name it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from broker.kafka_broker import (
  DEFAULT_VERSION,
  TESTED_VERSIONS,
  Broker,
  free_port,
  versions_under_test,
)
from tests import support

# Must run on every broker version: they hold the reader's and the pipeline's guarantees.
ALL_VERSIONS_MODULES = frozenset(
  {"test_kafka_reader_integration", "test_pipeline_integration", "test_codecs_integration"}
)


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "all_kafka_versions: run on every broker version of $KAFKA_TEST_VERSIONS"
  )
  config.addinivalue_line(
    "markers",
    "kafka_versions(*versions): run only on these broker versions or major lines "
    "(e.g. '3' or '3.9.1')",
  )


def _versions_for(metafunc) -> list[str]:
  wanted = versions_under_test()
  marker = metafunc.definition.get_closest_marker("kafka_versions")
  if marker is not None:

    def fits(version: str) -> bool:
      return any(version == m or version.startswith(f"{m}.") for m in marker.args)

    chosen = [v for v in wanted if fits(v)]
    # Not among the chosen test versions: the tested release of that line, fetched on demand.
    return chosen or [v for v in (DEFAULT_VERSION, *TESTED_VERSIONS) if fits(v)][:1]
  every = (
    metafunc.definition.get_closest_marker("all_kafka_versions") is not None
    or metafunc.module.__name__.rsplit(".", 1)[-1] in ALL_VERSIONS_MODULES
  )
  return wanted if every else wanted[:1]


def pytest_generate_tests(metafunc):
  if "kafka_version" not in metafunc.fixturenames or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
    return
  versions = _versions_for(metafunc)
  assert versions, f"{metafunc.definition.nodeid}: no Kafka version fits its kafka_versions marker"
  metafunc.parametrize(
    "kafka_version", versions, indirect=True, scope="session", ids=[f"kafka{v}" for v in versions]
  )


@pytest.fixture(scope="session")
def kafka_version(request) -> str | None:
  """The version of the broker under test (None: a given $KAFKA_BOOTSTRAP_SERVERS of unknown version)."""
  return getattr(request, "param", None) or os.environ.get("KAFKA_VERSION") or None


@pytest.fixture(scope="session")
def kafka_broker(kafka_version) -> Broker | None:
  """The Broker the session started for kafka_version (None with $KAFKA_BOOTSTRAP_SERVERS)."""
  if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
    yield None
    return
  run_dir = Path(tempfile.mkdtemp(prefix=f"kafka-test-{kafka_version}-"))
  broker = Broker(port=free_port(), run_dir=run_dir, version=kafka_version)
  broker.start()
  try:
    yield broker
  finally:
    broker.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
  """A running broker: $KAFKA_BOOTSTRAP_SERVERS if set, else the session's broker of kafka_version."""
  return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or kafka_broker.bootstrap_servers


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


@pytest.fixture(autouse=True)
def _no_idle_kafka_consumers():
  """Kafka consumers a test's pipeline left idle in the pool (transforms.kafka.client) are
  closed after it: the next test starts without them, whatever broker it talks to."""
  yield
  from transforms.kafka.client import close_idle_consumers

  close_idle_consumers()
