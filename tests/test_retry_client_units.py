"""Unit tests of the neutral helpers: ``transforms.retry`` (one tenacity-based policy),
``transforms.kafka.client`` (the one client config shape, ``new_consumer``),
``transforms.arguments`` (one rule per option) and the committer's tuple keys."""

from __future__ import annotations

import logging

import kafka
import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from pipelines.options import OptionError, SmartGridOptions, validate
from tests.support import FakeClock
from transforms import arguments
from transforms.acks import Ack
from transforms.commit import CommitOffsets, Committed, PartitionProgress, _CommitOffsetsFn, _keyed
from transforms.kafka.client import KafkaUnavailableError, check_client_config, new_consumer
from transforms.kafka.config import FromEnv, consumer_config
from transforms.kafka.records import PartitionRead
from transforms.retry import RetriesExhausted, wait_jittered_exponential, with_retries
from transforms.sinks.base import WriteBatches


def _failing(errors: list):
  calls = []

  def fn():
    calls.append(1)
    if errors:
      raise errors.pop(0)
    return len(calls)

  return fn, calls


# ---------------------------------------------------------------------------
# transforms.retry


def test_retries_only_what_is_transient_and_returns_the_result():
  c = FakeClock()
  fn, calls = _failing([TimeoutError("a"), TimeoutError("b")])
  assert (
    with_retries(
      fn, lambda e: isinstance(e, TimeoutError), deadline_s=60, sleep=c.sleep, clock=c.clock
    )
    == 3
  )
  assert len(calls) == 3 and len(c.sleeps) == 2


def test_a_permanent_error_is_raised_unchanged_without_a_sleep():
  c = FakeClock()
  fn, calls = _failing([KeyError("k")])
  with pytest.raises(KeyError):
    with_retries(
      fn, lambda e: isinstance(e, TimeoutError), deadline_s=60, sleep=c.sleep, clock=c.clock
    )
  assert len(calls) == 1 and c.sleeps == []


def test_base_exceptions_are_never_retried_even_if_the_predicate_says_so():
  c = FakeClock()
  fn, calls = _failing([KeyboardInterrupt()])
  with pytest.raises(KeyboardInterrupt):
    with_retries(fn, lambda e: True, deadline_s=60, sleep=c.sleep, clock=c.clock)
  assert len(calls) == 1


def test_giving_up_names_the_call_the_attempts_and_keeps_the_cause(caplog):
  c = FakeClock()
  fn, calls = _failing([TimeoutError(f"t{i}") for i in range(1000)])
  with caplog.at_level(logging.WARNING, logger="transforms.retry"):
    with pytest.raises(RetriesExhausted) as e:
      with_retries(
        fn,
        lambda e: isinstance(e, TimeoutError),
        deadline_s=5,
        what="committing t-0@7",
        initial_backoff_s=0.5,
        max_backoff_s=1.0,
        sleep=c.sleep,
        clock=c.clock,
      )
  message = str(e.value)
  assert message.startswith(f"committing t-0@7 still failing after {len(calls)} attempts over 5s")
  assert isinstance(e.value.__cause__, TimeoutError)
  assert message.endswith(f": TimeoutError: t{len(calls) - 1}")  # the last error
  assert c.now <= 5.0  # no sleep was started that would end past the deadline
  retried = [r for r in caplog.records if "retrying" in r.getMessage()]
  assert len(retried) == len(c.sleeps) == len(calls) - 1 and len(calls) >= 4


def test_backoff_doubles_to_its_cap_and_every_sleep_is_jittered_around_it():
  wait = wait_jittered_exponential(0.1, 0.4)
  assert [wait.backoff(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
  assert wait.backoff(10_000) == 0.4  # no overflow on a very long outage
  c = FakeClock()
  fn, _ = _failing([TimeoutError()] * 40)
  with_retries(
    fn,
    lambda e: True,
    deadline_s=3600,
    initial_backoff_s=0.1,
    max_backoff_s=0.4,
    sleep=c.sleep,
    clock=c.clock,
  )
  caps = [wait.backoff(n) for n in range(1, 41)]
  assert all(b / 2 <= s <= 1.5 * b for s, b in zip(c.sleeps, caps))
  assert len(set(c.sleeps)) > 30  # jittered, not one fixed delay


# ---------------------------------------------------------------------------
# transforms.kafka.client


class _FakeConsumer:
  opened: list = []

  def __init__(self, **kwargs):
    _FakeConsumer.opened.append(kwargs)

  def topics(self):
    return set()


def test_one_config_shape_is_checked_before_a_client_opens():
  config = consumer_config("a:1,b:2", "g", {"sasl_plain_password": FromEnv("PW")})
  check_client_config(config, needs_group=True)
  with pytest.raises(ValueError, match="bootstrap_servers as a list"):
    check_client_config({"bootstrap_servers": "a:1", "enable_auto_commit": False})
  with pytest.raises(ValueError, match="auto-commit off"):
    check_client_config({"bootstrap_servers": ["a:1"]})
  with pytest.raises(ValueError, match="--group_id"):
    check_client_config(consumer_config("a:1", None, {}), needs_group=True)


def test_new_consumer_reads_secrets_from_the_environment_only_when_it_opens(monkeypatch):
  config = consumer_config("a:1", "g", {"sasl_plain_password": FromEnv("CONCEPTS_TEST_PW")})
  monkeypatch.setattr(kafka, "KafkaConsumer", _FakeConsumer)
  _FakeConsumer.opened = []
  monkeypatch.setenv("CONCEPTS_TEST_PW", "first")
  new_consumer(config)
  monkeypatch.setenv("CONCEPTS_TEST_PW", "rotated")
  new_consumer(config)
  assert [o["sasl_plain_password"] for o in _FakeConsumer.opened] == ["first", "rotated"]
  assert config["sasl_plain_password"] == FromEnv("CONCEPTS_TEST_PW")  # never resolved in place
  assert _FakeConsumer.opened[0]["enable_auto_commit"] is False


def test_the_launchers_and_the_audits_kafka_views_read_secrets_when_they_open(monkeypatch):
  """Both views open their client as the pipeline does (``open_consumer``): a SASL password
  reaches kafka-python as its value, never as the ``FromEnv`` reference."""
  from runners.kafka_view import KafkaView
  from tools.audit_kafka import KafkaView as AuditView

  monkeypatch.setattr(kafka, "KafkaConsumer", _FakeConsumer)
  _FakeConsumer.opened = []
  monkeypatch.setenv("KAFKA_SASL_USERNAME", "user")
  monkeypatch.setenv("KAFKA_SASL_PASSWORD", "secret")
  o = SmartGridOptions(
    [
      "--bootstrap_servers=a:1",
      "--kafka_security_protocol=SASL_PLAINTEXT",
      "--kafka_sasl_mechanism=PLAIN",
    ]
  )
  KafkaView(o)
  AuditView(consumer_config("a:1", "g", {"sasl_plain_password": FromEnv("KAFKA_SASL_PASSWORD")}))
  assert [c["sasl_plain_password"] for c in _FakeConsumer.opened] == ["secret", "secret"]
  assert _FakeConsumer.opened[0]["sasl_plain_username"] == "user"


def test_an_unreachable_broker_is_a_clear_error_naming_the_servers(monkeypatch):
  def refuse(**kwargs):
    raise KafkaConnectionError("no broker answered")

  monkeypatch.setattr(kafka, "KafkaConsumer", refuse)
  config = consumer_config("h1:1,h2:2", "g", {"bootstrap_timeout_ms": 3000})
  with pytest.raises(KafkaUnavailableError, match=r"cannot reach Kafka at h1:1,h2:2 within 3s"):
    new_consumer(config)


def test_the_reader_and_the_committer_open_clients_the_same_way():
  from transforms.kafka import read

  assert read._new_consumer is new_consumer
  assert read.KafkaUnavailableError is KafkaUnavailableError


# ---------------------------------------------------------------------------
# The committer: tuple keys, the shared config and retry


class _RecordingConsumer:
  def __init__(self, failures: int = 0):
    self.failures = failures
    self.commits: list = []

  def commit(self, offsets):
    if self.failures:
      self.failures -= 1
      raise KafkaTimeoutError("slow broker")
    self.commits.append(offsets)


def test_acks_and_reads_are_keyed_by_topic_partition_tuples():
  assert _keyed(Ack("t", 3, 0, 5)) == (("t", 3), Ack("t", 3, 0, 5))
  assert _keyed(PartitionRead("t", 1, 7, None))[0] == ("t", 1)


def test_a_commit_retries_a_slow_broker_and_commits_the_exact_offset():
  from kafka import TopicPartition

  fn = _CommitOffsetsFn(consumer_config("a:1", "g", {}), 5.0, 60.0, False)
  fn._consumer = consumer = _RecordingConsumer(failures=2)
  p = PartitionProgress()
  assert fn._commit(("t", 3), p, 42) == Committed("t", 3, 42)
  assert p.committed == 42
  [offsets] = consumer.commits
  assert list(offsets) == [TopicPartition("t", 3)] and offsets[TopicPartition("t", 3)].offset == 42


def test_commit_offsets_refuses_a_config_of_another_shape_or_without_group():
  with pytest.raises(ValueError, match="--group_id"):
    CommitOffsets(consumer_config("a:1", None, {}))
  with pytest.raises(ValueError, match="bootstrap_servers as a list"):
    CommitOffsets({"bootstrap_servers": "a:1", "group_id": "g", "enable_auto_commit": False})
  with pytest.raises(ValueError, match=r"^--commit_interval_secs: must be > 0, got 0"):
    CommitOffsets(consumer_config("a:1", "g", {}), interval_s=0)


# ---------------------------------------------------------------------------
# transforms.arguments: one rule, the same message from the options and the transforms


@pytest.mark.parametrize(
  "option, value, check",
  [
    ("batch_size", 0, lambda v: WriteBatches(None, batch_size=v)),
    ("sink_flush_rows", 0, lambda v: WriteBatches(None, flush_rows=v)),
  ],
)
def test_options_and_public_transforms_report_a_bad_value_alike(option, value, check):
  with pytest.raises(OptionError) as from_options:
    validate(SmartGridOptions([f"--{option}={value}"]))
  with pytest.raises(ValueError) as from_transform:
    check(value)
  assert str(from_options.value) == str(from_transform.value)
  assert str(from_options.value).startswith(f"--{option}: must be >= 1, got {value}")


def test_argument_rules():
  arguments.at_least("n", 1, 1)
  arguments.above("x", 0.1, 0)
  arguments.within("k", 64, 1, 64)
  arguments.above_and_at_most("w", 10, 0, 10)
  arguments.one_of("s", "id", ("partition", "id"))
  for call, message in (
    (lambda: arguments.at_least("n", 0, 1), "--n: must be >= 1, got 0"),
    (lambda: arguments.above("x", 0, 0), "--x: must be > 0, got 0"),
    (lambda: arguments.above("x", float("nan"), 0), "--x: must be > 0, got nan"),
    (lambda: arguments.within("k", 65, 1, 64), "--k: must be in 1..64, got 65"),
    (lambda: arguments.above_and_at_most("w", 11, 0, 10), "--w: must be in (0, 10], got 11"),
    (
      lambda: arguments.one_of("s", "moon", ("partition", "id")),
      "--s: must be one of ('partition', 'id'), got 'moon'",
    ),
  ):
    with pytest.raises(ValueError) as e:
      call()
    assert str(e.value) == message


def test_validate_reports_the_window_limit_the_parser_enforces():
  from transforms.parse import MAX_WINDOW_SECS

  validate(SmartGridOptions([f"--window_size_secs={MAX_WINDOW_SECS}"]))
  with pytest.raises(OptionError, match=r"^--window_size_secs: must be in \(0, "):
    validate(SmartGridOptions([f"--window_size_secs={MAX_WINDOW_SECS + 1}"]))
