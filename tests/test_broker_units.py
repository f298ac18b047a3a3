"""Pure logic of the broker module and the topics command: settings from the environment,
version rules, the server.properties each version gets, topic-name checks."""

from __future__ import annotations

import pytest

from broker import kafka_broker as kb
from broker.topics import TopicError, check_topic_names


@pytest.mark.parametrize("text", ["3.7.2", "3.9.1", "4.0.0", "4.1.1", " 4.1.1 "])
def test_supported_versions(text):
  assert kb.parse_version(text) == text.strip()


@pytest.mark.parametrize(
  "text, needle",
  [
    ("3.6.2", "is not supported"),
    ("2.8.1", "is not supported"),
    ("5.0.0", "is not supported"),
    ("4.1", "is not a Kafka version"),
    ("latest", "is not a Kafka version"),
    ("", "is not a Kafka version"),
    ("4.1.1-rc1", "is not a Kafka version"),
  ],
)
def test_unsupported_versions_are_refused_naming_the_setting(text, needle):
  with pytest.raises(kb.BrokerError, match=needle) as e:
    kb.parse_version(text)
  assert str(e.value).startswith("KAFKA_VERSION=")


def test_defaults_and_environment(monkeypatch):
  for var in ("KAFKA_VERSION", "KAFKA_PARTITIONS", "KAFKA_PORT", "KAFKA_TEST_VERSIONS"):
    monkeypatch.delenv(var, raising=False)
  assert (kb.default_version(), kb.default_partitions(), kb.default_port()) == ("3.9.1", 4, 9092)
  assert kb.default_bootstrap() == "127.0.0.1:9092"
  assert kb.versions_under_test() == ["3.9.1", "4.1.1"]
  monkeypatch.setenv("KAFKA_VERSION", "4.1.1")
  monkeypatch.setenv("KAFKA_PARTITIONS", "6")
  monkeypatch.setenv("KAFKA_PORT", "19092")
  monkeypatch.setenv("KAFKA_TEST_VERSIONS", "4.1.1, 3.9.1,4.1.1")
  assert (kb.default_version(), kb.default_partitions(), kb.default_bootstrap()) == (
    "4.1.1",
    6,
    "127.0.0.1:19092",
  )
  assert kb.versions_under_test() == ["4.1.1", "3.9.1"]  # order kept, repeats dropped
  broker = kb.Broker(port=1234, run_dir="/nonexistent")
  assert (broker.version, broker.partitions) == ("4.1.1", 6)


@pytest.mark.parametrize(
  "var, value, needle",
  [
    ("KAFKA_PARTITIONS", "0", "KAFKA_PARTITIONS='0'"),
    ("KAFKA_PARTITIONS", "-3", "KAFKA_PARTITIONS='-3'"),
    ("KAFKA_PARTITIONS", "many", "KAFKA_PARTITIONS='many'"),
    ("KAFKA_PORT", "0", "KAFKA_PORT='0'"),
    ("KAFKA_PORT", "65536", "KAFKA_PORT='65536'"),
    ("KAFKA_PORT", "ninety", "KAFKA_PORT='ninety'"),
    ("KAFKA_TEST_VERSIONS", "3.9.1,nope", "KAFKA_TEST_VERSIONS='nope'"),
    ("KAFKA_TEST_VERSIONS", ",", "KAFKA_TEST_VERSIONS is empty"),
  ],
)
def test_bad_settings_name_the_variable(monkeypatch, var, value, needle):
  monkeypatch.setenv(var, value)
  with pytest.raises(kb.BrokerError, match=needle):
    {
      "KAFKA_PARTITIONS": kb.default_partitions,
      "KAFKA_PORT": kb.default_port,
      "KAFKA_TEST_VERSIONS": kb.versions_under_test,
    }[var]()


def _props(tmp_path, version: str, partitions: int) -> dict[str, str]:
  broker = kb.Broker(port=29092, run_dir=tmp_path, version=version, partitions=partitions)
  broker._write_config(29093)
  lines = broker.config_file.read_text().splitlines()
  return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize("version", kb.TESTED_VERSIONS)
def test_config_creates_topics_on_first_use_and_binds_loopback_only(tmp_path, version):
  props = _props(tmp_path, version, 7)
  assert props["auto.create.topics.enable"] == "true" and props["num.partitions"] == "7"
  assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
  assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
  # Share groups exist from Kafka 4.0 only: 3.x is not given their settings.
  assert ("share.coordinator.state.topic.replication.factor" in props) == version.startswith("4.")


@pytest.mark.parametrize(
  "version, flag, config",
  [
    ("3.9.1", "-Dlog4j.configuration=", "log4j.properties"),
    ("4.1.1", "-Dlog4j2.configurationFile=", "log4j2.properties"),
  ],
)
def test_each_major_version_gets_its_logging_backend_and_its_own_jars(
  tmp_path, version, flag, config
):
  cmd = kb.Broker(port=29092, run_dir=tmp_path, version=version)._java_cmd("kafka.Kafka", "x")
  log_flags = [a for a in cmd if a.startswith(("-Dlog4j.", "-Dlog4j2."))]
  assert len(log_flags) == 1 and log_flags[0].startswith(flag) and log_flags[0].endswith(config)
  assert cmd[cmd.index("-cp") + 1] == f"{kb.KAFKA_CACHE / version / 'libs'}/*"


def test_a_run_folder_without_a_recorded_version_was_made_by_4_1_1(tmp_path):
  broker = kb.Broker(port=29092, run_dir=tmp_path, version="3.9.1")
  assert broker.formatted_version() is None
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "meta.properties").write_text("x")
  broker._write_config(29093)
  assert broker.formatted_version() == "4.1.1"
  with pytest.raises(kb.BrokerError, match="formatted by Kafka 4.1.1, not 3.9.1"):
    broker.start()
  broker.version_file.write_text("3.9.1\n")
  assert broker.formatted_version() == "3.9.1"


def test_topic_names():
  assert check_topic_names(["a", "b.c_d-1", "a"]) == ["a", "b.c_d-1"]
  for bad in (["bad name"], ["x" * 250], [""], [".."], ["ok", "é"]):
    with pytest.raises(TopicError, match="invalid topic name"):
      check_topic_names(bad)


def test_without_kafka_version_an_existing_broker_keeps_its_version(tmp_path, monkeypatch):
  monkeypatch.delenv("KAFKA_VERSION", raising=False)
  assert kb.Broker(port=29092, run_dir=tmp_path).version == "3.9.1"  # nothing formatted yet
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "meta.properties").write_text("x")
  kb.Broker(port=29092, run_dir=tmp_path, version="4.1.1")._write_config(29093)
  (tmp_path / "kafka.version").write_text("4.1.1\n")
  assert kb.Broker(port=29092, run_dir=tmp_path).version == "4.1.1"
  monkeypatch.setenv("KAFKA_VERSION", "3.9.1")  # asked for: then refused at start, see above
  assert kb.Broker(port=29092, run_dir=tmp_path).version == "3.9.1"
