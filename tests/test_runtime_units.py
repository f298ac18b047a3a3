"""Unit tests of the runtime's pure parts: secrets kept out of the pickled pipeline,
listeners on 127.0.0.1, offset-gap decisions, the supervisor's restart policy and
the launcher's output helpers."""

from __future__ import annotations

import base64
import bz2
import hashlib
import secrets
import zlib

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import smartgrid
from pipelines.options import SmartGridOptions
from transforms.acks import Ack
from transforms.kafka import config as kafka_config
from transforms.kafka.gaps import OFFSET_GAP, OffsetGap, OffsetGapError, check_start, covered_acks
from transforms.rows import coordinates, covers_from


def _decoded_payloads(proto: beam_runner_api_pb2.Pipeline) -> list[bytes]:
  """Every DoFn payload of the pipeline, as stored and decoded (base64, bz2/zlib)."""
  out = []
  for t in proto.components.transforms.values():
    if not t.spec.payload:
      continue
    out.append(t.spec.payload)
    try:
      pardo = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
    except Exception:  # noqa: BLE001 - not a ParDo: its raw bytes are searched above
      continue
    raw = pardo.do_fn.payload
    out.append(raw)
    try:
      packed = base64.b64decode(raw, validate=True)
    except ValueError:
      continue
    for unpack in (bz2.decompress, zlib.decompress):
      try:
        out.append(unpack(packed))
      except (OSError, ValueError, zlib.error):
        pass
  return out


def test_sasl_password_is_read_on_the_worker_and_never_pickled(monkeypatch, tmp_path):
  password = "pw-" + secrets.token_hex(12)
  monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc-user")
  monkeypatch.setenv("KAFKA_SASL_PASSWORD", password)
  # No broker here: building the graph needs none (partitions are listed when it runs).
  options = PipelineOptions(
    [
      "--kafka_security_protocol=SASL_PLAINTEXT",
      "--kafka_sasl_mechanism=PLAIN",
      f"--sink=sqlite:///{tmp_path}/out.db",
      "--stop=end",
    ]
  )
  p = beam.Pipeline(options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions))
  blobs = _decoded_payloads(p.to_runner_api())
  assert any(b"KAFKA_SASL_PASSWORD" in b for b in blobs)  # the reference is there: search works
  digest = hashlib.sha256(password.encode()).digest()
  needles = [
    password.encode(),
    digest,
    digest.hex().encode(),
    base64.b64encode(password.encode()),
    base64.b64encode(digest),
  ]
  for blob in blobs:
    for needle in needles:
      assert needle not in blob, "the SASL password (or its hash) is in the pickled pipeline"
  # ... and the worker resolves it from its own environment when it opens a client.
  config = smartgrid.kafka_client_config(options.view_as(SmartGridOptions))
  resolved = kafka_config.materialize(config)
  assert resolved["sasl_plain_password"] == password
  assert resolved["sasl_plain_username"] == "svc-user"


def test_metadata_requests_never_create_topics():
  config = kafka_config.consumer_config("127.0.0.1:9092", "g", {})
  assert config["allow_auto_create_topics"] is False


def test_prism_worker_pool_listens_on_loopback_only():
  from runners import prism

  host, port = prism.worker_pool().rsplit(":", 1)
  assert host == "127.0.0.1" and int(port) > 0


# ---------------------------------------------------------------------------
# Offset gaps


def test_check_start_inside_the_log_is_kept_for_either_policy():
  for policy in ("fail", "skip"):
    assert check_start("t", 0, 5, 0, 10, policy) == 5
    assert check_start("t", 0, 10, 0, 10, policy) == 10  # at the end: nothing new yet


def test_check_start_outside_the_log():
  with pytest.raises(OffsetGapError, match=r"t-1: offsets \[2, 7\) were deleted"):
    check_start("t", 1, 2, 7, 10, "fail")
  with pytest.raises(OffsetGapError, match=r"offset 15 is past the partition's end offset 10"):
    check_start("t", 1, 15, 0, 10, "fail")
  assert check_start("t", 1, 2, 7, 10, "skip") == 2  # the reader meets the gap and records it
  assert check_start("t", 1, 15, 3, 10, "skip") == 3  # recreated topic: its new log start


def test_an_offset_gap_acks_all_but_its_first_offset_which_its_dead_letter_acks():
  gap = OffsetGap("t", 0, 4, 9, OFFSET_GAP, "why")
  assert covered_acks(gap) == [Ack("t", 0, 5, 9)]
  assert covered_acks(OffsetGap("t", 0, 4, 5, OFFSET_GAP)) == []
  assert covered_acks(OffsetGap("t", 0, 4, 9, "empty")) == [Ack("t", 0, 4, 9)]


def test_an_offset_gap_becomes_one_dead_letter_row_at_its_first_offset():
  gap = OffsetGap("t", 3, 4, 9, OFFSET_GAP, "deleted by retention")
  [(key, row)] = smartgrid._offset_gap_dead_letter(gap, 4)
  assert key == ("dead_letters", 3)  # (table, shard): partition 3 of 4 shards
  assert (*coordinates(row), covers_from(row)) == ("t", 3, 4, 4)
  assert any(isinstance(v, str) and "offset_gap" in v and "[4, 9)" in v for v in row)
  assert smartgrid._offset_gap_dead_letter(OffsetGap("t", 3, 4, 9, "empty"), 4) == []


def _listening_addresses(port: int) -> set[str]:
  """Local addresses with a socket listening on port, from /proc/net/tcp and tcp6."""
  found = set()
  for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(name) as f:
      for row in f.readlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, hex_port = local.rsplit(":", 1)
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
          found.add(address)
  return found


# 127.0.0.1 as IPv4, or IPv4-mapped on a dual-stack socket (::ffff:127.0.0.1); never 0.0.0.0 / ::
_LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def test_the_worker_pool_listens_on_127_0_0_1_only():
  from runners import prism

  port = int(prism.worker_pool().rsplit(":", 1)[1])
  found = _listening_addresses(port)
  assert found and found <= _LOOPBACK, found


def test_prism_job_server_listens_on_127_0_0_1_only():
  from runners import prism

  server = prism.JobServer(prism.binary())
  try:
    found = _listening_addresses(server.port)
    assert found and found <= _LOOPBACK, found
  finally:
    server.stop()


# ---------------------------------------------------------------------------
# The launcher's output


def test_the_summary_explains_partial_batches_in_streaming_and_batch():
  from runners.report import batches_line as _batches_line

  streaming = _batches_line({"all": 259, "full": 3}, 100, streaming=True)
  assert "259 (3 full of 100 rows; 256 partial" in streaming and "buffering timer" in streaming
  assert "expected" in streaming and "0% full" not in streaming
  assert "end of the run" in _batches_line({"all": 4, "full": 2}, 100, streaming=False)
  assert (
    _batches_line({"all": 5, "full": 5}, 100, streaming=True)
    == "  batches:        5 (5 full of 100 rows)"
  )
  assert _batches_line({}, 100, streaming=True) is None


def test_the_progress_line_shows_the_current_rate_not_the_average(monkeypatch):
  from runners import report

  class View:
    missing: list = []
    down_since = None

    def status(self):
      return None

    def offsets(self):
      return {}, {}

  clock = [100.0]
  monkeypatch.setattr(report.time, "monotonic", lambda: clock[0])
  totals = report.Totals()
  line = report.ProgressLine(View(), totals)
  totals.add({"written": {"sensor_readings": 1000}})
  clock[0] += 10
  assert "written 1000 (100/s now)" in line()
  clock[0] += 10  # nothing written in the last interval: the current rate is 0, not 50
  assert "written 1000 (0/s now)" in line()


def test_the_progress_line_says_when_kafka_is_unreachable():
  from runners import report
  from runners.kafka_view import KafkaView

  view = KafkaView.__new__(KafkaView)
  view.down_since, view.missing = 1_700_000_000.0, []
  text = report.ProgressLine(view, report.Totals())()
  assert "Kafka unreachable since" in text and "retrying" in text


def test_kafka_errors_are_told_from_other_failures():
  from kafka.errors import KafkaConnectionError, KafkaTimeoutError

  from runners.kafka_view import is_kafka_error

  assert is_kafka_error(KafkaTimeoutError("Failed to get offsets by timestamps in 30000 ms"))
  assert is_kafka_error(KafkaConnectionError("Connection refused"))
  wrapped = RuntimeError(
    "Error processing bundle ... kafka.errors.KafkaTimeoutError: Failed to get offsets"
  )
  assert is_kafka_error(wrapped)
  assert not is_kafka_error(ValueError("no such table"))
  assert not is_kafka_error(OffsetGapError("t-0: offsets [1, 3) were deleted"))


def test_a_worker_is_restarted_with_backoff_and_the_run_fails_past_the_limit(monkeypatch):
  from runners import workers

  class Dead:
    returncode = 1

    def poll(self):
      return 1

  class View:
    tps = []

  started = []
  monkeypatch.setattr(workers, "_Restarted", lambda job: started.append(job) or Dead())
  clock = [1000.0]
  monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
  slot = workers._Slot(1, {"drain_file": "/tmp/d"}, Dead())
  delays = []
  for _ in range(workers.MAX_RESTARTS):
    assert workers._heal(slot, View(), 2, draining=False) is None
    delays.append(slot.restart_at - clock[0])
    clock[0] = slot.restart_at
    assert workers._heal(slot, View(), 2, draining=False) is None  # the restart itself
  assert delays == [1, 2, 4, 8, 16] and len(started) == workers.MAX_RESTARTS
  failure = workers._heal(slot, View(), 2, draining=False)
  assert failure and "worker 1" in failure and "giving up" in failure
  # Outside the window the count starts again; a drain never restarts; exit 2 is not healed.
  slot.restarts = [clock[0] - workers.RESTART_WINDOW_S - 1]
  assert workers._heal(slot, View(), 2, draining=False) is None and len(slot.restarts) == 1
  slot.restart_at = None
  assert workers._heal(slot, View(), 2, draining=True) is None and slot.restart_at is None
  # Exit 2 (an offset gap, required topics missing) is not healed: the run stops.
  refused = workers._Slot(
    0, {"drain_file": "/tmp/d"}, type("R", (), {"poll": lambda self: 2, "returncode": 2})()
  )
  stop = workers._heal(refused, View(), 2, draining=False)
  assert "worker 0" in stop and "exit code 2" in stop and refused.restart_at is None


def test_explicit_start_offsets_on_the_command_line():
  from transforms.kafka.positions import parse_start

  start = parse_start("smartgrid-sensor-data@0=15,smartgrid-meter-readings@3=0")
  assert start.kind == "offsets"
  assert start.offsets == (("smartgrid-meter-readings", 3, 0), ("smartgrid-sensor-data", 0, 15))
  with pytest.raises(ValueError, match="TOPIC@PARTITION=OFFSET"):
    parse_start("t@x=1")
  assert parse_start("2026-11-30T10:00:00+01:00").kind == "timestamp"


def test_the_supervisors_progress_line_sums_the_workers_and_shows_the_current_rate(
  tmp_path, monkeypatch
):
  from runners import workers

  class View:
    missing: list = []

    def refresh(self):
      return []

    def offsets(self):
      return {"tp": 10}, {"tp": 4}

  drain = tmp_path / "local.drain"
  clock = [50.0]
  monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
  line = workers._ProgressLine(View(), drain, 2)
  for i, (read, written) in enumerate([(300, 280), (200, 120)]):
    workers.write_progress(
      workers.progress_file(tmp_path / f"local.drain.{i}"),
      {
        "read": {"t": read},
        "written": {"sensor_readings": written},
        "dead_letters": {"not_json": i},
        "batches": {},
      },
    )
  clock[0] += 4
  text = line()
  assert "read 500 | written 400 (100/s now) | dead letters 1 | lag 6" in text, text
  clock[0] += 4
  assert "written 400 (0/s now)" in line()


def test_a_rounds_metrics_are_read_after_thousands_of_bundles():
  """FnApiRunner's lazy metric merge recursed once per bundle (RecursionError past ~1,000):
  the launcher's runner merges eagerly, so a busy round's counts reach the summary."""
  from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
  from apache_beam.transforms.core import RestrictionProvider

  from runners.rounds import make_runner
  from transforms import telemetry

  class OneAtATime(RestrictionProvider):
    def initial_restriction(self, element):
      return OffsetRange(0, 1500)

    def create_tracker(self, restriction):
      return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
      return restriction.size()

    def split(self, element, restriction):
      yield restriction

  class ReadOneThenCheckpoint(beam.DoFn):
    def process(self, element, tracker=beam.DoFn.RestrictionParam(OneAtATime())):
      position = tracker.current_restriction().start
      if tracker.try_claim(position):
        telemetry.count_read("t", 1)
        yield position
        tracker.defer_remainder()  # every record in a bundle of its own

  p = beam.Pipeline(runner=make_runner())
  _ = p | beam.Create([0]) | beam.ParDo(ReadOneThenCheckpoint())
  result = p.run()
  result.wait_until_finish()
  assert telemetry.totals(result)["read"] == {"t": 1500}


def test_tune_process_freezes_the_imports_raises_the_thresholds_and_shortens_sampling():
  import gc

  from apache_beam.runners.worker import statesampler
  from apache_beam.utils.counters import CounterFactory

  from runners import local

  before = gc.get_threshold()
  # Another test may have run the entry point in this process (it tunes the collector too).
  gc.unfreeze()
  gc.set_threshold(700, 10, 10)  # Python's defaults
  frozen = gc.get_freeze_count()
  sampling_defaults = statesampler.StateSampler.__init__.__defaults__
  try:
    local.tune_process()
    assert gc.get_threshold() == local.GC_THRESHOLDS
    assert gc.get_threshold()[0] > 700
    # Beam's and the project's modules are loaded here: all of them out of the collector's reach.
    assert gc.get_freeze_count() > frozen
    # Beam's bundle processors make their samplers without a period: they get the short one,
    # and a bundle's end waits for a sampling thread that sleeps at most that long.
    sampler = statesampler.StateSampler("stage", CounterFactory())
    assert sampler.sampling_period_ms == local.STATE_SAMPLING_MS < 200
    sampler.start()
    sampler.stop()
  finally:
    gc.unfreeze()
    gc.set_threshold(*before)
    statesampler.StateSampler.__init__.__defaults__ = sampling_defaults


def test_round_sizes_start_small_grow_and_never_exceed_the_cap():
  from runners.rounds import round_records

  assert [round_records(done, 200_000) for done in range(4)] == [500, 50_000, 200_000, 200_000]
  sizes = [round_records(done, 10**9) for done in range(12)]
  assert sizes[:5] == [500, 50_000, 5_000_000, 500_000_000, 10**9]
  assert all(a <= b <= 10**9 for a, b in zip(sizes, sizes[1:]))
  assert [round_records(done, 28) for done in range(3)] == [28, 28, 28]  # a cap below the start
  assert round_records(10**9, 200_000) == 200_000  # a long streaming run: still the cap
  assert round_records(0, 1) == 1


class _Partitions:
  """The part of KafkaView the round plan reads: its partitions."""

  def __init__(self, n: int):
    self.tps = [("t", p) for p in range(n)]


def test_each_round_shares_its_size_over_the_partitions_and_resumes_from_the_commit():
  from runners.rounds import Rounds, round_records

  o = PipelineOptions(["--round_max_records=100000", "--start=earliest"]).view_as(SmartGridOptions)
  plan = Rounds(o, _Partitions(8), batch=False)
  shares, kinds = [], []
  for _ in range(6):
    stop, start = plan.stop(), plan.start()
    shares.append(stop.max_records)
    kinds.append(start.kind)
    assert stop.max_records * 8 >= round_records(plan.count, 100_000)  # no record left out
    plan.count += 1  # the launcher counts a round once it succeeded
  assert shares == [63, 6_250, 12_500, 12_500, 12_500, 12_500]
  assert kinds == ["earliest"] + ["committed"] * 5


class _Topic:
  """A fake KafkaView over 4 partitions of 1,500 records each, whose committed offsets move
  as the fake rounds read: what the round plan and the batch loop look at."""

  def __init__(self):
    from kafka import TopicPartition

    self.tps = [TopicPartition("t", p) for p in range(4)]
    self.end = dict.fromkeys(self.tps, 1500)
    self.committed = dict.fromkeys(self.tps, 0)

  def offsets(self):
    return dict(self.end), dict(self.committed)


def test_a_batch_run_reads_its_backlog_in_growing_rounds_each_from_the_last_commit(tmp_path):
  from runners.report import Totals
  from runners.rounds import Launcher, Rounds

  o = PipelineOptions(["--start=earliest"]).view_as(SmartGridOptions)
  view = _Topic()
  launcher = Launcher(
    PipelineOptions([]), view, tmp_path / "drain", Rounds(o, view, True), Totals()
  )
  reads = []

  def one_round(start, stop):  # a round: each partition from its commit, at most max_records
    begin = dict(view.committed)
    for tp in view.tps:
      view.committed[tp] = min(view.end[tp], view.committed[tp] + stop.max_records)
    reads.append((start.kind, stop.max_records, begin))
    return {"read": {"t": sum(view.committed.values()) - sum(begin.values())}}

  launcher._run_pipeline = one_round
  launcher.run()
  assert [(kind, cap) for kind, cap, _ in reads] == [
    ("earliest", 125),
    ("committed", 12_500),
  ]  # 500 then 50,000 records over 4 partitions; 1,500 each were there
  assert reads[1][2] == dict.fromkeys(view.tps, 125)  # the second starts at the first's commit
  assert view.committed == view.end
