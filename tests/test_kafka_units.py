"""Unit tests of transforms/kafka without a broker.

Positions parsing and resolution (with a fake consumer), configuration validation and
redaction, the offset tracker (claims, splits, boundedness, finishing a restriction by
claiming its stop), the watermark estimator's invariants, backlog arithmetic, the drain
signal, and the reader's ``process()`` driven by a fake consumer and a real tracker.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import namedtuple

import apache_beam as beam
import pytest
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.transforms.display import DisplayData
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from kafka import TopicPartition

from broker.kafka_broker import free_port
from transforms.kafka import KafkaRecord, KafkaUnavailableError, PartitionRead, ReadFromKafka
from transforms.kafka import client as kafka_client
from transforms.kafka import config as kafka_config
from transforms.kafka import read as kafka_read
from transforms.kafka.drain import DrainSignal
from transforms.kafka.gaps import EMPTY, OFFSET_GAP, OffsetGap, OffsetGapError
from transforms.kafka.positions import (
  StartPosition,
  StopPosition,
  parse_start,
  parse_stop,
  resolve,
  to_epoch_ms,
)
from transforms.kafka.tracking import (
  UNBOUNDED,
  EndOffsets,
  KafkaOffsetTracker,
  KafkaRestrictionProvider,
  backlog,
)
from transforms.kafka.watermark import KafkaWatermarkEstimator, KafkaWatermarkEstimatorProvider

SECRET = "hunter2-DO-NOT-LOG"
BOOT = "127.0.0.1:1"


def ts_ms(micros_timestamp: Timestamp) -> int:
  return micros_timestamp.micros // 1000


# --------------------------------------------------------------------------
# positions: parsing


@pytest.mark.parametrize(
  "text,kind", [("committed", "committed"), (" Earliest ", "earliest"), ("LATEST", "latest")]
)
def test_parse_start_keywords(text, kind):
  assert parse_start(text) == StartPosition(kind)


def test_parse_start_explicit_offsets_sorted():
  start = parse_start({("b", 1): 7, ("a", "2"): "3"})
  assert start == StartPosition("offsets", offsets=(("a", 2, 3), ("b", 1, 7)))


@pytest.mark.parametrize(
  "bad,needle",
  [
    ({("a", 0): -1}, "negative offset"),
    ({"abc": 1}, "expected {(topic, partition): offset}"),
    ({("a", "x"): 1}, "expected {(topic, partition): offset}"),
    ("yesterday", "start"),
    (True, "not a timestamp"),
    (object(), "unsupported value"),
  ],
)
def test_parse_start_refuses_bad_values_naming_the_option(bad, needle):
  with pytest.raises(ValueError) as err:
    parse_start(bad)
  assert needle in str(err.value)


def test_timestamps_all_forms_agree():
  expected = 1_700_000_000_000
  forms = [
    expected,
    float(expected),
    str(expected),
    dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.timezone.utc),
    dt.datetime(2023, 11, 14, 22, 13, 20),  # naive means UTC
    "2023-11-14T22:13:20Z",
    "2023-11-14T22:13:20+00:00",
    "2023-11-15T00:13:20+02:00",
  ]
  for form in forms:
    assert to_epoch_ms(form, "start") == expected, form
  assert parse_start("2023-11-14T22:13:20Z") == StartPosition("timestamp", timestamp_ms=expected)
  assert parse_stop(expected) == StopPosition("timestamp", timestamp_ms=expected)


@pytest.mark.parametrize(
  "stop,kind",
  [
    (None, "never"),
    ("", "never"),
    ("never", "never"),
    ("None", "never"),
    ("end", "end"),
    (" END ", "end"),
  ],
)
def test_parse_stop_keywords(stop, kind):
  assert parse_stop(stop).kind == kind


def test_parse_stop_refuses_garbage_naming_the_option():
  with pytest.raises(ValueError, match=r"stop \(end\|never\|timestamp\)"):
    parse_stop("tomorrow")


# --------------------------------------------------------------------------
# positions: resolution against a fake consumer

Found = namedtuple("Found", "offset timestamp")


class FakeOffsetsConsumer:
  """beginning/end/committed/offsets_for_times as a kafka-python consumer answers them."""

  def __init__(self, beginning, end, committed=None, times=None, group_id="g"):
    self.config = {"group_id": group_id}
    self._beginning, self._end = beginning, end
    self._committed = committed or {}
    self._times = times or {}  # partition -> [(timestamp_ms, offset)] ascending

  def beginning_offsets(self, tps):
    return {tp: self._beginning[tp.partition] for tp in tps}

  def end_offsets(self, tps):
    return {tp: self._end[tp.partition] for tp in tps}

  def committed(self, tp):
    if self.config["group_id"] is None:
      raise AssertionError("kafka-python raises IllegalStateError: Requires group_id")
    return self._committed.get(tp.partition)

  def offsets_for_times(self, query):
    out = {}
    for tp, ts in query.items():
      hits = [Found(o, t) for t, o in self._times.get(tp.partition, []) if t >= ts]
      out[tp] = hits[0] if hits else None
    return out


PARTS = [("t", 0), ("t", 1), ("t", 2)]


def _starts(reads):
  return {r.partition: r.start_offset for r in reads}


def test_resolve_earliest_latest_and_stop_end():
  c = FakeOffsetsConsumer(beginning={0: 0, 1: 5, 2: 0}, end={0: 10, 1: 9, 2: 0})
  earliest = resolve(c, PARTS, StartPosition("earliest"), StopPosition("end"))
  assert earliest == [
    PartitionRead("t", 0, 0, 10),
    PartitionRead("t", 1, 5, 9),
    PartitionRead("t", 2, 0, 0),
  ]
  latest = resolve(c, PARTS, StartPosition("latest"), StopPosition("never"))
  assert latest == [PartitionRead("t", 0, 10), PartitionRead("t", 1, 9), PartitionRead("t", 2, 0)]
  assert all(not r.is_bounded for r in latest) and all(r.is_bounded for r in earliest)
  assert resolve(c, [], StartPosition("earliest"), StopPosition("end")) == []


def test_resolve_explicit_stop_offsets_and_a_per_partition_cap():
  c = FakeOffsetsConsumer(
    beginning={0: 0, 1: 0, 2: 0}, end={0: 100, 1: 50, 2: 3}, committed={0: 20, 1: 45}
  )
  # a batch round: towards the end offsets seen when the run started, at most 10 a partition
  stop = StopPosition("offsets", offsets=(("t", 0, 60), ("t", 1, 48)), max_records=10)
  assert stop.is_bounded
  reads = resolve(c, PARTS, StartPosition("committed"), stop)
  assert [(r.start_offset, r.stop_offset) for r in reads] == [(20, 30), (45, 48), (0, 3)]
  # a streaming round: to the end offsets now, capped
  capped = resolve(c, PARTS, StartPosition("committed"), StopPosition("end", max_records=10))
  assert [(r.start_offset, r.stop_offset) for r in capped] == [(20, 30), (45, 50), (0, 3)]
  assert not StopPosition("never").is_bounded and not StopPosition("timestamp", 5).is_bounded


def test_resolve_committed_falls_back_to_beginning():
  c2 = FakeOffsetsConsumer(beginning={0: 2, 1: 0, 2: 0}, end={0: 10, 1: 10, 2: 10})
  assert _starts(resolve(c2, PARTS, StartPosition("committed"), StopPosition("end"))) == {
    0: 2,
    1: 0,
    2: 0,
  }


@pytest.mark.parametrize(
  "committed, expected",
  [
    ({0: 1}, "t-0: offsets [1, 3) were deleted"),  # below the log start (retention)
    ({2: 99}, "t-2: offset 99 is past the partition's end offset 10"),  # topic recreated
  ],
)
def test_resolve_committed_outside_the_log_fails_naming_partition_offsets_and_choices(
  committed, expected
):
  c = FakeOffsetsConsumer(
    beginning={0: 3, 1: 0, 2: 0}, end={0: 10, 1: 10, 2: 10}, committed=committed
  )
  with pytest.raises(OffsetGapError) as e:
    resolve(c, PARTS, StartPosition("committed"), StopPosition("end"))
  assert expected in str(e.value) and "--on_offset_gap=skip" in str(e.value)


def test_resolve_committed_outside_the_log_with_skip():
  c = FakeOffsetsConsumer(
    beginning={0: 3, 1: 0, 2: 0}, end={0: 10, 1: 10, 2: 10}, committed={0: 1, 1: 4, 2: 99}
  )
  reads = resolve(c, PARTS, StartPosition("committed"), StopPosition("end"), on_offset_gap="skip")
  # 0: kept below the log start, so the reader meets the gap and records it;
  # 2: past the end of a recreated topic -> its new log start, no new record skipped.
  assert _starts(reads) == {0: 1, 1: 4, 2: 0}


def test_resolve_explicit_offsets_others_from_committed():
  c = FakeOffsetsConsumer(beginning={0: 0, 1: 0, 2: 0}, end={0: 10, 1: 10, 2: 10}, committed={2: 6})
  start = parse_start({("t", 0): 7})
  assert _starts(resolve(c, PARTS, start, StopPosition("end"))) == {0: 7, 1: 0, 2: 6}


def test_resolve_explicit_offsets_without_a_group_start_the_others_at_the_beginning():
  c = FakeOffsetsConsumer(beginning={0: 0, 1: 2, 2: 0}, end={0: 10, 1: 10, 2: 10}, group_id=None)
  start = parse_start({("t", 0): 7})
  assert _starts(resolve(c, PARTS, start, StopPosition("end"))) == {0: 7, 1: 2, 2: 0}


def test_resolve_timestamps_for_start_and_stop():
  times = {0: [(100, 0), (200, 1), (300, 2)], 1: [(100, 0)], 2: []}
  c = FakeOffsetsConsumer(beginning={0: 0, 1: 0, 2: 0}, end={0: 3, 1: 1, 2: 0}, times=times)
  reads = resolve(
    c,
    PARTS,
    StartPosition("timestamp", timestamp_ms=150),
    StopPosition("timestamp", timestamp_ms=250),
  )
  by_p = {r.partition: r for r in reads}
  assert by_p[0] == PartitionRead("t", 0, 1, 2)  # read offset 1 only
  # No record at or after the start time: start at the end. No record at or after the
  # stop time yet: the read stays open and stops on the first record stamped >= 250.
  assert by_p[1] == PartitionRead("t", 1, 1, None, 250)
  assert by_p[2] == PartitionRead("t", 2, 0, None, 250)


# --------------------------------------------------------------------------
# config: defaults, validation, redaction


def test_consumer_config_safe_defaults_and_overrides():
  cfg = kafka_config.consumer_config("a:1,b:2", "g", {"max_poll_records": 5, "client_id": "x"})
  assert cfg["bootstrap_servers"] == ["a:1", "b:2"] and cfg["group_id"] == "g"
  assert cfg["enable_auto_commit"] is False
  assert cfg["isolation_level"] == "read_committed"
  assert cfg["auto_offset_reset"] == "earliest"
  assert cfg["max_poll_records"] == 5 and cfg["client_id"] == "x"
  assert (
    kafka_config.consumer_config("a:1", None, {"enable_auto_commit": False})["enable_auto_commit"]
    is False
  )


@pytest.mark.parametrize(
  "overrides,needle",
  [
    ({"bootstrap_servers": "x:1"}, "'bootstrap_servers'"),
    ({"group_id": "g"}, "'group_id'"),
    ({"enable_auto_commit": True}, "enable_auto_commit"),
  ],
)
def test_consumer_config_refusals_name_the_option(overrides, needle):
  with pytest.raises(ValueError) as err:
    kafka_config.consumer_config("a:1", None, overrides)
  assert needle in str(err.value)


@pytest.mark.parametrize("bad", ["", None, ["a:1"]])
def test_consumer_config_refuses_bad_bootstrap(bad):
  with pytest.raises(ValueError, match="bootstrap_servers"):
    kafka_config.consumer_config(bad, None, None)


def test_redact_masks_every_secret_key_and_keeps_the_rest():
  cfg = {
    "sasl_plain_password": SECRET,
    "ssl_password": SECRET,
    "sasl_oauth_token_provider": SECRET,
    "ssl_keyfile": "/k.pem",
    "sasl_plain_username": "alice",
    "security_protocol": "SASL_SSL",
  }
  red = kafka_config.redact(cfg)
  assert SECRET not in str(red)
  assert red["sasl_plain_password"] == red["ssl_password"] == "***"
  assert red["sasl_plain_username"] == "alice" and red["security_protocol"] == "SASL_SSL"
  assert cfg["sasl_plain_password"] == SECRET  # a copy: the input is untouched


def test_secrets_never_in_display_data_repr_or_construction_errors():
  secret_cfg = {
    "sasl_plain_password": SECRET,
    "security_protocol": "SASL_PLAINTEXT",
    "sasl_mechanism": "PLAIN",
    "sasl_plain_username": "alice",
  }
  t = ReadFromKafka(BOOT, "topic", consumer_config=secret_cfg)
  shown = DisplayData.create_from(t)
  text = " ".join(f"{i.key}={i.value}" for i in shown.items) + repr(t) + str(t.display_data())
  assert SECRET not in text
  assert "***" in text and "alice" in text
  for bad in ({**secret_cfg, "enable_auto_commit": True}, {**secret_cfg, "group_id": "g"}):
    with pytest.raises(ValueError) as err:
      ReadFromKafka(BOOT, "topic", consumer_config=bad)
    assert SECRET not in str(err.value)


def test_secret_not_in_unreachable_broker_error():
  """Needs no broker: the address is a port nobody listens on."""
  port = free_port()
  t = ReadFromKafka(
    f"127.0.0.1:{port}",
    "topic",
    consumer_config={"sasl_plain_password": SECRET, "bootstrap_timeout_ms": 1000},
  )
  begun = time.monotonic()
  with pytest.raises(KafkaUnavailableError) as err:
    t.partitions()
  assert time.monotonic() - begun < 10
  assert f"127.0.0.1:{port}" in str(err.value)
  assert SECRET not in str(err.value) and SECRET not in repr(err.value)


def test_read_from_kafka_validates_arguments_at_construction():
  with pytest.raises(ValueError, match="topics"):
    ReadFromKafka(BOOT, [])
  with pytest.raises(ValueError, match="topics"):
    ReadFromKafka(BOOT, ["ok", ""])
  with pytest.raises(ValueError, match="start"):
    ReadFromKafka(BOOT, "t", start="soon")
  with pytest.raises(ValueError, match="stop"):
    ReadFromKafka(BOOT, "t", stop="later")
  with pytest.raises(ValueError, match="poll_timeout_ms"):
    ReadFromKafka(BOOT, "t", poll_timeout_ms=0)
  # Construction needs no broker; 'committed' without a group means 'earliest'.
  assert ReadFromKafka(BOOT, "t").start == StartPosition("earliest")
  assert ReadFromKafka(BOOT, "t", group_id="g").start == StartPosition("committed")
  # stop='end' is batch: the bounded DoFn; anything else is the unbounded one.
  assert type(ReadFromKafka(BOOT, "t", stop="end")._read._fn) is kafka_read._ReadPartitionFn
  assert type(ReadFromKafka(BOOT, "t")._read._fn) is kafka_read._ReadUnboundedPartitionFn


# --------------------------------------------------------------------------
# tracker and restriction provider


def test_tracker_claims_and_boundedness():
  t = KafkaOffsetTracker(OffsetRange(5, 8))
  assert t.is_bounded()
  assert t.try_claim(5) and t.try_claim(7)
  assert not t.try_claim(8)
  t.check_done()
  with pytest.raises(ValueError, match="strictly increase"):
    t.try_claim(8)
  assert not KafkaOffsetTracker(OffsetRange(5, UNBOUNDED)).is_bounded()
  with pytest.raises(ValueError, match="smaller than the start"):
    KafkaOffsetTracker(OffsetRange(5, 8)).try_claim(4)


@pytest.mark.parametrize(
  "restriction", [OffsetRange(0, 10), OffsetRange(3, UNBOUNDED), OffsetRange(4, 4)]
)
@pytest.mark.parametrize("claimed", [[], [0], [3, 4, 6]])
def test_finish_by_claiming_stop_satisfies_check_done(restriction, claimed):
  """The reader ends a restriction early (drain, trailing markers) by claiming its stop."""
  t = KafkaOffsetTracker(restriction)
  for o in claimed:
    if restriction.start <= o < restriction.stop:
      t.try_claim(o)
  if restriction.start != restriction.stop and not claimed:
    with pytest.raises(ValueError, match="not done"):
      t.check_done()
  assert t.try_claim(t.current_restriction().stop) is False
  t.check_done()


def test_unclaimed_tail_without_finishing_fails_check_done():
  t = KafkaOffsetTracker(OffsetRange(0, 10))
  t.try_claim(7)  # offsets 8 and 9 were commit markers: no record to claim
  with pytest.raises(ValueError, match="not done"):
    t.check_done()
  kafka_read._finish(t)
  t.check_done()


def test_checkpoint_of_unbounded_range():
  t = KafkaOffsetTracker(OffsetRange(10, UNBOUNDED))
  assert t.try_claim(10) and t.try_claim(11)
  primary, residual = t.try_split(0)
  assert primary == OffsetRange(10, 12) and residual == OffsetRange(12, UNBOUNDED)
  assert t.is_bounded()  # the primary is now bounded: [10, 12)
  t.check_done()
  assert not KafkaOffsetTracker(residual).is_bounded()
  assert t.try_split(0) is None  # one checkpoint per call


def test_checkpoint_before_any_claim_and_split_in_half():
  t = KafkaOffsetTracker(OffsetRange(10, UNBOUNDED))
  primary, residual = t.try_split(0)
  assert primary == OffsetRange(10, 10) and residual == OffsetRange(10, UNBOUNDED)
  t.check_done()
  b = KafkaOffsetTracker(OffsetRange(0, 100))
  b.try_claim(9)
  primary, residual = b.try_split(0.5)
  assert primary == OffsetRange(0, 54) and residual == OffsetRange(54, 100)
  assert not b.try_claim(54)  # the residual's offsets are not ours any more


def test_restriction_provider():
  provider = KafkaRestrictionProvider()
  bounded, unbounded = PartitionRead("u1", 0, 4, 9), PartitionRead("u1", 1, 4)
  assert provider.initial_restriction(bounded) == OffsetRange(4, 9)
  assert provider.initial_restriction(unbounded) == OffsetRange(4, UNBOUNDED)
  assert isinstance(provider.create_tracker(OffsetRange(4, 9)), KafkaOffsetTracker)
  # Drain: every restriction, bounded or not, is truncated to nothing.
  assert provider.truncate(bounded, OffsetRange(4, 9)) is None
  assert provider.truncate(unbounded, OffsetRange(4, UNBOUNDED)) is None
  # Sizes: backlog in records; an unfinished unbounded read never reports 0.
  topic = f"provider-{time.monotonic_ns()}"
  assert provider.restriction_size(PartitionRead(topic, 0, 4, 9), OffsetRange(4, 9)) == 5
  assert provider.restriction_size(PartitionRead(topic, 0, 4), OffsetRange(4, UNBOUNDED)) == 1
  EndOffsets.record(topic, 0, 104)
  assert provider.restriction_size(PartitionRead(topic, 0, 4), OffsetRange(4, UNBOUNDED)) == 100
  assert provider.restriction_size(PartitionRead(topic, 0, 4, 9), OffsetRange(4, 9)) == 5
  assert provider.restriction_size(PartitionRead(topic, 0, 200), OffsetRange(200, 300)) == 0


# --------------------------------------------------------------------------
# backlog arithmetic and the end offsets registry


@pytest.mark.parametrize(
  "restriction,end,expected",
  [
    (OffsetRange(0, 10), None, 10),  # bounded, end unknown: all of it
    (OffsetRange(0, 10), 4, 4),  # the log ends inside the range
    (OffsetRange(0, 10), 50, 10),  # the range ends first
    (OffsetRange(6, 10), 4, 0),  # end behind the start (stale end offset)
    (OffsetRange(7, 7), 50, 0),  # empty
    (OffsetRange(5, UNBOUNDED), None, 0),  # unbounded, end unknown
    (OffsetRange(5, UNBOUNDED), 5, 0),  # caught up
    (OffsetRange(5, UNBOUNDED), 3, 0),  # stale end offset: never negative
    (OffsetRange(5, UNBOUNDED), 1_005, 1_000),
  ],
)
def test_backlog(restriction, end, expected):
  assert backlog(restriction, end) == expected


def test_end_offsets_only_move_forward():
  topic = f"eo-{time.monotonic_ns()}"
  assert EndOffsets.get(topic, 0) is None
  EndOffsets.record(topic, 0, None)
  assert EndOffsets.get(topic, 0) is None
  EndOffsets.record(topic, 0, 50)
  EndOffsets.record(topic, 0, 40)  # an older answer arriving late
  EndOffsets.record(topic, 1, 7)
  assert EndOffsets.get(topic, 0) == 50 and EndOffsets.get(topic, 1) == 7


# --------------------------------------------------------------------------
# watermark estimator


def test_watermark_starts_at_min_and_follows_the_newest_emitted_record():
  w = KafkaWatermarkEstimatorProvider(1000).create_watermark_estimator(
    KafkaWatermarkEstimatorProvider().initial_estimator_state(None, None)
  )
  assert w.current_watermark() == MIN_TIMESTAMP
  w.observe_record(5_000)
  assert ts_ms(w.current_watermark()) == 5_000
  w.observe_record(3_000)  # out of order: never moves back
  assert ts_ms(w.current_watermark()) == 5_000
  w.observe_timestamp(Timestamp(10**6))  # the runner's per-output call is ignored
  assert ts_ms(w.current_watermark()) == 5_000


def test_watermark_idle_advance_is_now_minus_lag_and_monotonic():
  w = KafkaWatermarkEstimator(None, idle_lag_ms=2_000)
  w.observe_idle(10_000)
  assert ts_ms(w.current_watermark()) == 8_000
  w.observe_record(9_000)
  assert ts_ms(w.current_watermark()) == 9_000
  w.observe_idle(10_500)  # now - lag = 8_500 is behind: no regression
  assert ts_ms(w.current_watermark()) == 9_000
  w.observe_idle(20_000)
  assert ts_ms(w.current_watermark()) == 18_000


def test_watermark_state_round_trips_through_checkpoints():
  provider = KafkaWatermarkEstimatorProvider(2_000)
  w = provider.create_watermark_estimator(None)
  w.observe_record(42_000)
  resumed = provider.create_watermark_estimator(w.get_estimator_state())
  assert resumed.current_watermark() == w.current_watermark()
  resumed.observe_record(1_000)
  assert ts_ms(resumed.current_watermark()) == 42_000


# --------------------------------------------------------------------------
# drain signal


def test_drain_signal(tmp_path):
  assert DrainSignal(None).requested() is False
  path = str(tmp_path / "drain")
  eager = DrainSignal(path, check_interval_s=0)
  lazy = DrainSignal(path, check_interval_s=3600)
  assert not eager.requested() and not lazy.requested()
  DrainSignal.request(path)
  assert eager.requested()
  assert not lazy.requested()  # looked less than an interval ago: still cached
  assert DrainSignal(path, check_interval_s=3600).requested()  # a fresh reader sees it at once
  (tmp_path / "drain").unlink()
  assert eager.requested()  # latched: a drain is never taken back


# --------------------------------------------------------------------------
# the reader's process() with a fake consumer and a real tracker

Rec = namedtuple("Rec", "offset timestamp key value headers")


def test_batched_process_emits_each_poll_as_one_batch_with_the_same_cuts():
  """batched=True: one RecordBatch per poll, stamped with its earliest record's time; the
  same records, covers_from and cuts (markers, the stop offset, a split between the poll and
  its claim) as record by record."""
  from transforms.kafka.records import RecordBatch

  tp = TopicPartition("t", 0)
  recs = {o: _rec(o, ts=1000 - o) for o in (0, 1, 2, 5, 6, 7, 8, 9)}  # times going down
  fn = _reader(FakeConsumer(tp, recs, end=10, batch=3), batched=True)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0, 7), OffsetRange(0, 7))
  assert residual is None and all(type(wv.value) is RecordBatch for wv in out)
  assert [[(r.offset, r.covers_from) for r in wv.value] for wv in out] == [
    [(0, 0), (1, 1), (2, 2)],
    [(5, 3), (6, 6)],
  ]
  assert [wv.timestamp.micros for wv in out] == [998_000, 994_000]  # the earliest of each poll

  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(10)}, end=10, batch=10)
  out, _ = _read_split_after_the_poll(consumer, _reader(consumer, batched=True))
  assert [[r.offset for r in wv.value] for wv in out] == [[0, 1, 2, 3]]


def _read_split_after_the_poll(consumer, fn) -> tuple[list, OffsetRange]:
  """Reads [0, 10) with the runner splitting it in half between the poll and its claim;
  returns (the outputs, the residual the split took away)."""
  safe = ThreadsafeRestrictionTracker(KafkaOffsetTracker(OffsetRange(0, 10)))
  split = []
  poll = consumer.poll

  def poll_then_split(timeout_ms):
    records = poll(timeout_ms)
    split.append(safe.try_split(0.5))  # the runner takes [4, 10) away before the claim
    return records

  consumer.poll = poll_then_split
  out, _, _ = _run(fn, PartitionRead("t", 0, 0, 10), safe)
  ((_, residual),) = split
  return out, residual


class FakeConsumer:
  """A one-partition log: offsets -> records; offsets missing from it are markers/aborts."""

  def __init__(self, tp, records: dict[int, Rec], end: int, batch: int = 3):
    self.tp, self.records, self.end, self.batch = tp, records, end, batch
    self.pos = None
    self.polls = self.seeks = 0

  def assign(self, tps):
    assert tps == [self.tp]

  def partitions_for_topic(self, topic):
    assert topic == self.tp.topic
    return {self.tp.partition}

  def seek(self, tp, offset):
    self.seeks += 1
    self.pos = offset

  beginning = 0

  def beginning_offsets(self, tps):
    return {tp: self.beginning for tp in tps}

  def poll(self, timeout_ms):
    self.polls += 1
    if self.pos < self.beginning or self.pos > self.end:
      from kafka.errors import OffsetOutOfRangeError

      raise OffsetOutOfRangeError({self.tp: self.pos})
    out = []
    while self.pos < self.end and len(out) < self.batch:
      if self.pos in self.records:
        out.append(self.records[self.pos])
      self.pos += 1
    return {self.tp: out} if out else {}

  def position(self, tp):
    return self.pos

  def highwater(self, tp):
    return self.end

  def end_offsets(self, tps):
    return {tp: self.end for tp in tps}

  def close(self):
    pass


def _reader(
  consumer, drain_path=None, bounded=True, max_records=1_000, on_offset_gap="fail", batched=False
):
  cls = kafka_read._ReadPartitionFn if bounded else kafka_read._ReadUnboundedPartitionFn
  fn = cls({"bootstrap_servers": [BOOT]}, 10, max_records, 60.0, drain_path, on_offset_gap, batched)
  fn.setup()
  fn._consumer = consumer
  return fn


def _run(fn, read: PartitionRead, restriction, watermark=None):
  """Runs fn over read as the runner would; ``restriction``: an OffsetRange, or a tracker the
  test made itself (to split it or record its claims). -> (outputs, residual, watermark)."""
  safe = (
    restriction
    if isinstance(restriction, ThreadsafeRestrictionTracker)
    else ThreadsafeRestrictionTracker(KafkaOffsetTracker(restriction))
  )
  watermark = watermark or KafkaWatermarkEstimator(None)
  out = list(
    fn.process(
      read, window=GlobalWindow(), tracker=RestrictionTrackerView(safe), watermark=watermark
    )
  )
  safe.check_done()
  _run.gaps = [o.value.value for o in out if isinstance(o, TaggedOutput)]
  assert all(o.tag == kafka_read.GAPS_TAG for o in out if isinstance(o, TaggedOutput))
  out = [o for o in out if not isinstance(o, TaggedOutput)]
  residual = safe.deferred_status()
  return out, (residual[0] if residual else None), watermark


def _rec(o, ts=None):
  return Rec(
    o,
    1_000 + o if ts is None else ts,
    f"k{o}".encode(),
    f"v{o}".encode(),
    [("h", b"x")] if o % 2 else [],
  )


def test_process_bounded_read_with_trailing_markers_finishes_and_tiles():
  tp = TopicPartition("t", 0)
  # Offsets 3, 4 aborted, 5 a marker; 8, 9 trailing commit markers: the stop is 10.
  recs = {o: _rec(o) for o in (0, 1, 2, 6, 7)}
  fn = _reader(FakeConsumer(tp, recs, end=10))
  out, residual, w = _run(fn, PartitionRead("t", 0, 0, 10), OffsetRange(0, 10))
  assert residual is None
  records = [tv.value for tv in out]
  assert all(isinstance(tv, WindowedValue) and tv.windows == (GlobalWindow(),) for tv in out)
  assert [r.offset for r in records] == [0, 1, 2, 6, 7]
  assert [(r.covers_from, r.offset) for r in records] == [(0, 0), (1, 1), (2, 2), (3, 6), (7, 7)]
  assert records[1] == KafkaRecord("t", 0, 1, 1, b"k1", b"v1", 1_001, (("h", b"x"),))
  assert records[0].headers == ()
  assert [tv.timestamp for tv in out] == [
    Timestamp(micros=(1_000 + r.offset) * 1000) for r in records
  ]
  assert ts_ms(w.current_watermark()) == 1_007
  # The trailing markers are covered by no record: they leave as an empty range to ack.
  assert _run.gaps == [OffsetGap("t", 0, 8, 10, EMPTY)]


def test_process_bounded_read_whose_range_holds_no_record():
  tp = TopicPartition("t", 0)
  fn = _reader(FakeConsumer(tp, {}, end=4))
  out, residual, _ = _run(fn, PartitionRead("t", 0, 2, 4), OffsetRange(2, 4))
  assert out == [] and residual is None and _run.gaps == [OffsetGap("t", 0, 2, 4, EMPTY)]
  fn = _reader(FakeConsumer(tp, {}, end=4))
  out, residual, _ = _run(fn, PartitionRead("t", 0, 4, 4), OffsetRange(4, 4))
  assert out == [] and residual is None and fn._consumer.polls == 0 and _run.gaps == []


def test_process_unbounded_idle_after_a_trailing_marker_acks_it_once():
  # A transactional producer's last commit marker at offset 3: the next idle check must
  # see the partition as done, so the marker range is emitted and claimed, exactly once.
  tp = TopicPartition("t", 0)
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(3)}, end=4)
  fn = _reader(consumer, bounded=False)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), OffsetRange(0, UNBOUNDED))
  assert [tv.value.offset for tv in out] == [0, 1, 2]
  assert _run.gaps == [OffsetGap("t", 0, 3, 4, EMPTY)] and residual == OffsetRange(4, UNBOUNDED)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), residual)
  assert out == [] and _run.gaps == [] and residual == OffsetRange(4, UNBOUNDED)


def test_process_offsets_deleted_under_the_reader_fail_by_default_naming_the_choices():
  tp = TopicPartition("t", 0)
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(5, 8)}, end=8)
  consumer.beginning = 5  # offsets 0..4 deleted by retention before they were read
  fn = _reader(consumer)
  with pytest.raises(
    OffsetGapError, match=r"t-0: offsets \[0, 5\) were deleted.*--on_offset_gap=skip"
  ):
    _run(fn, PartitionRead("t", 0, 0, 8), OffsetRange(0, 8))


def test_process_offsets_deleted_under_the_reader_with_skip_record_the_gap_and_tile():
  tp = TopicPartition("t", 0)
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(5, 8)}, end=8)
  consumer.beginning = 5
  fn = _reader(consumer, on_offset_gap="skip")
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0, 8), OffsetRange(0, 8))
  assert residual is None
  assert [(tv.value.covers_from, tv.value.offset) for tv in out] == [(5, 5), (6, 6), (7, 7)]
  [gap] = _run.gaps
  assert (gap.topic, gap.partition, gap.start, gap.end, gap.kind) == ("t", 0, 0, 5, OFFSET_GAP)
  assert "[0, 5)" in gap.detail


def test_process_unbounded_checkpoints_when_caught_up_and_resumes_without_seeking():
  tp = TopicPartition("t", 0)
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(5)}, end=5)
  fn = _reader(consumer, bounded=False)
  out, residual, w = _run(fn, PartitionRead("t", 0, 0), OffsetRange(0, UNBOUNDED))
  assert [tv.value.offset for tv in out] == [0, 1, 2, 3, 4]
  # Caught up with the end: it checkpoints at once instead of waiting in poll for more.
  assert residual == OffsetRange(5, UNBOUNDED) and consumer.polls == 2
  assert ts_ms(w.current_watermark()) == 1_004
  # Nothing new: one poll finds nothing, the watermark moves to about now - idle lag.
  now_ms = int(time.time() * 1000)
  out_idle, residual, w = _run(fn, PartitionRead("t", 0, 0), residual, watermark=w)
  assert out_idle == [] and residual == OffsetRange(5, UNBOUNDED) and consumer.polls == 3
  assert ts_ms(w.current_watermark()) >= now_ms - 2_000
  consumer.records.update({o: _rec(o) for o in (5, 6)})
  consumer.end = 7
  out2, residual2, _ = _run(fn, PartitionRead("t", 0, 0), residual, watermark=w)
  assert [(tv.value.covers_from, tv.value.offset) for tv in out2] == [(5, 5), (6, 6)]
  assert residual2 == OffsetRange(7, UNBOUNDED)
  assert consumer.seeks == 1  # the consumer's position was reused


def test_process_checkpoints_after_its_record_budget():
  tp = TopicPartition("t", 0)
  fn = _reader(FakeConsumer(tp, {o: _rec(o) for o in range(20)}, end=20), max_records=6)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0, 20), OffsetRange(0, 20))
  assert [tv.value.offset for tv in out] == list(range(6))
  assert residual == OffsetRange(6, 20)


def test_process_watermark_waits_for_backlog():
  """Records still to be read keep the watermark at the newest emitted record."""
  tp = TopicPartition("t", 0)
  fn = _reader(
    FakeConsumer(tp, {o: _rec(o, ts=10_000 + o) for o in range(20)}, end=20),
    bounded=False,
    max_records=3,
  )
  out, residual, w = _run(fn, PartitionRead("t", 0, 0), OffsetRange(0, UNBOUNDED))
  assert len(out) == 3 and residual == OffsetRange(3, UNBOUNDED)
  assert ts_ms(w.current_watermark()) == 10_002


def test_process_drain_finishes_an_unbounded_restriction(tmp_path):
  tp = TopicPartition("t", 0)
  drain = str(tmp_path / "drain")
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(3)}, end=3)
  fn = _reader(consumer, drain_path=drain, bounded=False)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), OffsetRange(0, UNBOUNDED))
  assert len(out) == 3 and residual == OffsetRange(3, UNBOUNDED)
  DrainSignal.request(drain)
  fn._drain = DrainSignal(drain)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), residual)
  assert out == [] and residual is None  # done: check_done passed, nothing deferred


def test_process_drain_reads_what_was_written_before_it_then_ends(tmp_path):
  """Records written before the drain (offsets 2..7) are read; later ones (8, 9) are not."""
  tp = TopicPartition("t", 0)
  drain = str(tmp_path / "drain")
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(8)}, end=8, batch=2)
  fn = _reader(consumer, drain_path=drain, bounded=False, max_records=2)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), OffsetRange(0, UNBOUNDED))
  assert [tv.value.offset for tv in out] == [0, 1] and residual == OffsetRange(2, UNBOUNDED)
  DrainSignal.request(drain)
  fn._drain = DrainSignal(drain)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), residual)  # notices: end is 8
  assert [tv.value.offset for tv in out] == [2, 3] and residual == OffsetRange(4, UNBOUNDED)
  consumer.records.update({8: _rec(8), 9: _rec(9)})
  consumer.end = 10
  drained = []
  while residual is not None:
    out, residual, _ = _run(fn, PartitionRead("t", 0, 0), residual)
    drained += [tv.value.offset for tv in out]
  assert drained == [4, 5, 6, 7]


def test_process_stop_timestamp_ends_before_the_first_late_record():
  tp = TopicPartition("t", 0)
  recs = {o: _rec(o, ts=100 * o) for o in range(10)}
  fn = _reader(FakeConsumer(tp, recs, end=10), bounded=False)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0, None, 450), OffsetRange(0, UNBOUNDED))
  assert [tv.value.offset for tv in out] == [0, 1, 2, 3, 4]
  assert residual is None


def test_process_stops_when_the_runner_split_the_range():
  """A split between the poll and its claim: the batch's claim fails, the records below
  the split are emitted (the primary's, read by no one else), none at or past it."""
  tp = TopicPartition("t", 0)
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(10)}, end=10, batch=10)
  fn = _reader(consumer)
  out, residual = _read_split_after_the_poll(consumer, fn)
  assert residual == OffsetRange(4, 10)
  offsets = [tv.value.offset for tv in out]
  assert offsets == list(range(residual.start))
  assert [tv.value.covers_from for tv in out] == [0, 1, 2, 3]
  assert fn._next_offset is None  # its buffered records beyond the split are not reused


def test_process_a_split_while_a_batch_leaves_cuts_after_the_batch():
  """The batch's last offset is claimed before its records leave: a split requested
  while they leave cuts after them; the next batch stops at the split."""
  tp = TopicPartition("t", 0)
  consumer = FakeConsumer(tp, {o: _rec(o) for o in range(20)}, end=20, batch=10)
  fn = _reader(consumer)
  safe = ThreadsafeRestrictionTracker(KafkaOffsetTracker(OffsetRange(0, 20)))
  gen = fn.process(
    PartitionRead("t", 0, 0, 20),
    tracker=RestrictionTrackerView(safe),
    watermark=KafkaWatermarkEstimator(None),
  )
  first = [next(gen), next(gen)]
  primary, residual = safe.try_split(0.5)
  assert primary == OffsetRange(0, 14) and residual == OffsetRange(14, 20)
  rest = list(gen)
  safe.check_done()
  offsets = [tv.value.offset for tv in first + rest]
  assert offsets == list(range(14))
  assert [tv.value.covers_from for tv in first + rest] == list(range(14))
  assert fn._next_offset is None


def test_process_claims_once_per_poll_batch_the_last_offset_it_keeps():
  """Offsets 3, 4 are markers; the stop (7) cuts the second batch (5, 6, 7): claims 2, then
  6 (its last kept record), then the stop that ends the range."""
  tp = TopicPartition("t", 0)
  recs = {o: _rec(o) for o in (0, 1, 2, 5, 6, 7, 8, 9)}
  fn = _reader(FakeConsumer(tp, recs, end=10, batch=3))
  claims = []

  class Recording(KafkaOffsetTracker):
    def try_claim(self, position):
      claims.append(position)
      return super().try_claim(position)

  safe = ThreadsafeRestrictionTracker(Recording(OffsetRange(0, 7)))
  out, _, _ = _run(fn, PartitionRead("t", 0, 0, 7), safe)
  assert [tv.value.offset for tv in out] == [0, 1, 2, 5, 6]
  assert [tv.value.covers_from for tv in out] == [0, 1, 2, 3, 6]
  assert claims == [2, 6, 7]


def test_process_reads_on_when_the_metadata_preload_meets_an_outage():
  """Loading the topic's metadata before the first poll is only a speed-up: a broker
  that refuses it then does not fail the read (the polls wait outages out)."""
  from kafka.errors import KafkaConnectionError

  tp = TopicPartition("t", 0)

  class Refusing(FakeConsumer):
    def partitions_for_topic(self, topic):
      raise KafkaConnectionError("111 ECONNREFUSED")

  fn = _reader(Refusing(tp, {o: _rec(o) for o in range(5)}, end=5))
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0, 5), OffsetRange(0, 5))
  assert [tv.value.offset for tv in out] == [0, 1, 2, 3, 4] and residual is None


def test_unbounded_range_refuses_fractional_splits_but_checkpoints():
  from apache_beam.io.restriction_trackers import OffsetRange

  from transforms.kafka.tracking import UNBOUNDED, KafkaOffsetTracker

  t = KafkaOffsetTracker(OffsetRange(462, UNBOUNDED))
  assert t.try_claim(462)
  assert t.try_split(0.5) is None  # Prism's busy-bundle split would land near sys.maxsize/2
  primary, residual = t.try_split(0)
  assert (primary.start, primary.stop) == (462, 463)
  assert (residual.start, residual.stop) == (463, UNBOUNDED)
  bounded = KafkaOffsetTracker(OffsetRange(0, 100))
  assert bounded.try_claim(0)
  assert bounded.try_split(0.5) is not None


def test_process_an_idle_partition_sends_a_heartbeat_that_acks_nothing(monkeypatch):
  from transforms.commit import PartitionProgress
  from transforms.kafka.gaps import covered_acks

  monkeypatch.setattr(kafka_read, "IDLE_HEARTBEAT_S", 0.0)
  tp = TopicPartition("t", 0)
  fn = _reader(FakeConsumer(tp, {o: _rec(o) for o in range(5)}, end=5), bounded=False)
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), OffsetRange(0, UNBOUNDED))
  assert len(out) == 5 and _run.gaps == []  # busy: no heartbeat
  out, residual, _ = _run(fn, PartitionRead("t", 0, 0), residual)
  assert out == [] and _run.gaps == [OffsetGap("t", 0, 5, 5, EMPTY)]
  [ack] = covered_acks(_run.gaps[0])
  p = PartitionProgress()
  p.add_start(0)
  p.add_ack(0, 5)
  p.committed = 5
  p.add_ack(ack.start, ack.end)
  assert p.frontier == 5 and p.to_commit() is None and p.pending == []


# --------------------------------------------------------------------------
# ResolvePartitions' DoFn: lists, shards and resolves when the pipeline runs


class FakeListingConsumer(FakeOffsetsConsumer):
  """Topic 't' with partitions 0..2; no other topic exists."""

  def topics(self):
    return {"t"}

  def partitions_for_topic(self, topic):
    return {0, 1, 2} if topic == "t" else None

  def unsubscribe(self):
    pass

  def close(self, autocommit=True):
    pass


def _resolve_fn(monkeypatch, consumers, *, shard=None, skip_missing=False, drain_file=None):
  """The DoFn with new consumers answering from ``consumers`` (a consumer or an exception
  each call); returns (fn, calls)."""
  calls = []

  def new_consumer(config):
    calls.append(config["bootstrap_servers"])
    answer = consumers[min(len(calls), len(consumers)) - 1]
    if isinstance(answer, BaseException):
      raise answer
    return answer

  kafka_client.close_idle_consumers()  # no consumer left idle by another test
  monkeypatch.setattr(kafka_client, "new_consumer", new_consumer)
  fn = kafka_read._ResolvePartitionsFn(
    {"bootstrap_servers": [BOOT]},
    StartPosition("earliest"),
    StopPosition("end"),
    "fail",
    shard,
    skip_missing,
    120.0,
    drain_file,
  )
  return fn, calls


def _listing():
  return FakeListingConsumer(beginning={0: 0, 1: 5, 2: 0}, end={0: 10, 1: 9, 2: 3})


def test_resolve_partitions_fn_lists_shards_and_resolves(monkeypatch):
  fn, calls = _resolve_fn(monkeypatch, [_listing()])
  assert list(fn.process(("t",))) == [
    PartitionRead("t", 0, 0, 10),
    PartitionRead("t", 1, 5, 9),
    PartitionRead("t", 2, 0, 3),
  ]
  fn, calls = _resolve_fn(monkeypatch, [_listing()], shard=(1, 2))
  assert list(fn.process(("t",))) == [PartitionRead("t", 1, 5, 9)]
  assert calls == [[BOOT]]  # one consumer lists and resolves


def test_resolve_partitions_fn_missing_topic_fails_at_once_naming_it(monkeypatch):
  fn, calls = _resolve_fn(monkeypatch, [_listing()])
  with pytest.raises(kafka_read.UnknownTopicError, match="topic\\(s\\) not found on .*: u$") as err:
    list(fn.process(("t", "u")))
  assert isinstance(err.value, KafkaUnavailableError)
  assert len(calls) == 1  # a missing topic is a decision, not an outage: never retried
  fn, calls = _resolve_fn(monkeypatch, [_listing()], skip_missing=True)
  assert [r.partition for r in fn.process(("u", "t"))] == [0, 1, 2]


def test_resolve_partitions_fn_waits_out_an_unreachable_broker(monkeypatch):
  down = KafkaUnavailableError(f"cannot reach Kafka at {BOOT}")
  fn, calls = _resolve_fn(monkeypatch, [down, _listing()])
  assert [r.partition for r in fn.process(("t",))] == [0, 1, 2]
  assert len(calls) == 2


@pytest.mark.timeout(30)
def test_resolve_partitions_fn_stops_waiting_for_kafka_at_a_drain(monkeypatch, tmp_path):
  """A drain during an outage fails the bundle at once (the launcher then ends the run),
  rather than after the 120 s of retries: one attempt, then the outage's error."""
  drain = tmp_path / "drain"
  drain.write_text("1")
  down = KafkaUnavailableError(f"cannot reach Kafka at {BOOT}")
  fn, calls = _resolve_fn(monkeypatch, [down, _listing()], drain_file=str(drain))
  with pytest.raises(KafkaUnavailableError, match="cannot reach Kafka"):
    list(fn.process(("t",)))
  assert len(calls) == 1


def test_drain_signal_wait_ends_at_a_drain_or_after_the_time(tmp_path):
  path = tmp_path / "drain"
  signal = DrainSignal(str(path), check_interval_s=0.01)
  assert signal.wait(0.05) is False  # no drain: the whole time, then False
  DrainSignal.request(str(path))
  assert signal.wait(3600) is True  # a drain: at once


def test_read_from_kafka_applies_with_no_broker():
  p = beam.Pipeline()
  records, reads, gaps = p | ReadFromKafka(
    BOOT, ["a", "b"], shard=(0, 2), stop="end", with_partition_reads=True
  )
  assert reads.producer.full_label.endswith("ResolvePartitions/ResolveOffsets")
  assert records.producer is gaps.producer  # the reader's two outputs
  assert "ReadPartitions/ReadRecords" in records.producer.full_label


def test_record_batch_coder_round_trips_and_estimates_without_encoding(monkeypatch):
  """RecordBatch: encoded as plain tuples (not pickle), decoded back to KafkaRecords; the
  runner's size sampling gets an estimate from the byte fields, with no encoding at all."""
  from apache_beam import coders

  from transforms.kafka.records import RecordBatch, RecordBatchCoder

  batch = RecordBatch(
    [
      KafkaRecord("t", 0, 5, 3, b"k", b'{"a": 1}', 1_700_000_000_000, (("h", b"v"),)),
      KafkaRecord("t", 0, 6, 6, None, None, 1_700_000_000_001),
    ]
  )
  coder = coders.registry.get_coder(RecordBatch)
  assert isinstance(coder, RecordBatchCoder) and coder.is_deterministic()
  decoded = coder.decode(coder.encode(batch))
  assert type(decoded) is RecordBatch and decoded == batch
  assert all(type(r) is KafkaRecord for r in decoded)
  impl = coder.get_impl()
  monkeypatch.setattr(RecordBatchCoder, "encode", lambda self, b: pytest.fail("encoded"))
  size, observables = impl.get_estimated_size_and_observables(batch)
  assert size >= len(b'{"a": 1}') + len(b"k") and not observables


def test_consumer_pool_hands_an_idle_consumer_to_the_next_lease_of_an_equal_config(monkeypatch):
  """The pool behind the reader, the resolver and the committer: a released consumer goes to
  the next lease of an equal config (not of another), at most MAX_IDLE_PER_CONFIG are kept,
  a failed one is closed, and a forked child never gets its parent's."""
  made, closed = [], []

  class Client:
    def __init__(self, config):
      self.config, self.assigned = config, True
      made.append(self)

    def unsubscribe(self):
      self.assigned = False

    def close(self, autocommit=True):
      assert autocommit is False  # the pool never commits for anyone
      closed.append(self)

  kafka_client.close_idle_consumers()
  monkeypatch.setattr(kafka_client, "new_consumer", Client)
  a, b = {"bootstrap_servers": ["h:1"], "group_id": "g"}, {"bootstrap_servers": ["h:1"]}
  first = kafka_client.lease_consumer(a)
  kafka_client.release_consumer(a, first)
  assert not first.assigned and closed == []
  assert kafka_client.lease_consumer(dict(a)) is first  # an equal config: the same client
  other = kafka_client.lease_consumer(b)
  assert other is not first and len(made) == 2  # another config: a new client
  third, fourth = kafka_client.lease_consumer(a), kafka_client.lease_consumer(a)
  for c in (first, third, fourth):
    kafka_client.release_consumer(a, c)
  assert closed == [fourth]  # two kept idle, the third closed
  kafka_client.release_consumer(b, other, reusable=False)
  assert closed == [fourth, other]
  monkeypatch.setattr(kafka_client.os, "getpid", lambda: -1)  # as in a forked child
  assert kafka_client.lease_consumer(a) not in (first, third)
  monkeypatch.undo()
  kafka_client.close_idle_consumers()
