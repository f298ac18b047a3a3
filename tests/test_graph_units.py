"""The pipeline graph without Kafka: ``smartgrid.process`` fed by a ``TestStream``.

In the style of Beam's own ``transforms/util_test.py`` (GroupIntoBatches with a
TestStream and a fake clock): Python runs a TestStream only on the DirectRunner's
streaming engine, which moves the watermark and processing time exactly as the
stream says. The reader is not in these graphs (the DirectRunner loses SDF
residuals, see README "Runners"); the store is the in-memory ``MemoryStore``, whose journal
records every stored row and every commit in order, so the tests check offset by
offset what was written, when, and what was committed after it.

Also: ``smartgrid.build`` constructs the whole graph with no broker reachable, for
both sinks, and its steps follow the README's diagram.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_stream
from apache_beam.transforms.window import IntervalWindow, TimestampedValue

from pipelines import smartgrid
from pipelines.options import SmartGridOptions
from runners import prism
from transforms.kafka.gaps import OffsetGap
from transforms.kafka.records import KafkaRecord, PartitionRead, RecordBatch
from transforms.sinks.memory import MemoryStore
from transforms.sinks.schema import DEAD_LETTERS, SENSOR_READINGS

SENSOR, METER = "sensor-topic", "meter-topic"
WINDOW_S, LATENESS_S, BATCH, BUFFERING_S = 60, 300, 5, 10
LATE_COLUMN = SENSOR_READINGS.names.index("is_late")
WINDOW_COLUMNS = (
  SENSOR_READINGS.names.index("window_start"),
  SENSOR_READINGS.names.index("window_end"),
)

# name -> [(value, window)] collected by _Collect: the DirectRunner runs DoFns in this process.
_COLLECTED: dict[str, list] = {}


class _Collect(beam.DoFn):
  def __init__(self, name: str):
    self._name = name

  def process(self, element, window=beam.DoFn.WindowParam):
    _COLLECTED[self._name].append((element, window))


class FakeClock:
  """GroupIntoBatches' processing time: the DirectRunner's test clock starts at 0 too."""

  def __init__(self, now: float = 0.0):
    self._now = now

  def __call__(self) -> float:
    return self._now


def _options(*extra: str, runner: str = "DirectRunner") -> PipelineOptions:
  """The DirectRunner (streaming) or Prism (runners/prism.py: its binary, a worker pool
  in this process, so the MemoryStore is shared)."""
  options = PipelineOptions(
    [
      "--runner=DirectRunner",
      "--streaming",
      "--bootstrap_servers=127.0.0.1:1",
      f"--sensor_topic={SENSOR}",
      f"--meter_topic={METER}",
      f"--batch_size={BATCH}",
      f"--window_size_secs={WINDOW_S}",
      f"--allowed_lateness_secs={LATENESS_S}",
      f"--max_buffering_secs={BUFFERING_S}",
      "--num_shards=1",
      # Every ack is committed at once, so the journal shows each commit the acks allow.
      "--commit_interval_secs=0.000001",
      *extra,
    ]
  )
  return prism.prism_options(options) if runner == "PrismRunner" else options


def _record(
  offset: int,
  event_s: float,
  arrival_s: float | None = None,
  partition: int = 0,
  topic: str = SENSOR,
) -> TimestampedValue:
  """A sensor event as the reader emits it: stamped with its Kafka (arrival) time."""
  arrival_s = event_s if arrival_s is None else arrival_s
  event = {
    "event_id": f"{topic}-{partition}-{offset}",
    "sensor_id": f"s{offset % 3}",
    "sensor_type": "voltage",
    "value": 230.0 + offset,
    "timestamp": event_s,
  }
  if topic == METER:
    event = {
      "event_id": event["event_id"],
      "meter_id": "m1",
      "customer_id": "c1",
      "reading": float(offset),
      "timestamp": event_s,
    }
  record = KafkaRecord(
    topic, partition, offset, offset, None, json.dumps(event).encode(), int(arrival_s * 1000)
  )
  return TimestampedValue(record, arrival_s)


def _run(
  stream: test_stream.TestStream,
  starts: dict,
  options: PipelineOptions,
  store: MemoryStore,
  collect_acks: bool = False,
) -> list:
  """Runs process() on the stream; returns the acks [(Ack, window)] if asked."""
  name = uuid.uuid4().hex
  _COLLECTED[name] = []
  with beam.Pipeline(options=options) as p:
    records = p | "Records" >> stream
    reads = p | "Reads" >> beam.Create(
      [PartitionRead(t, q, start) for (t, q), start in sorted(starts.items())]
    )
    gaps = p | "Gaps" >> beam.Create([]).with_output_types(OffsetGap)
    out = smartgrid.process(
      records,
      reads,
      gaps,
      options.view_as(SmartGridOptions),
      store=store,
      bounded=False,
      commit_fn=store.commit_fn(),
      clock=FakeClock(),
    )
    if collect_acks:
      _ = out.acks | "CollectAcks" >> beam.ParDo(_Collect(name))
  return _COLLECTED.pop(name)


# Prism too (a really streaming runner), where it keeps the TestStream's semantics. Not
# for the buffering flush: there Prism's TestStream processing time did not fire
# GroupIntoBatches' buffering timer before the later elements arrived (measured).
RUNNERS = pytest.mark.parametrize("runner", ["DirectRunner", "PrismRunner"])


@pytest.fixture
def store():
  s = MemoryStore()
  yield s
  s.forget()


def _window(event_s: float) -> IntervalWindow:
  start = event_s - event_s % WINDOW_S
  return IntervalWindow(start, start + WINDOW_S)


def _iso(seconds: float) -> str:
  return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _journal_checks(store: MemoryStore, expected: dict) -> None:
  """Offset by offset: every expected offset written once; no commit ahead of the sink;
  commits never go back; each partition's last commit is its end.

  ``expected``: (topic, partition) -> (start, end) of the offsets the run reads.
  """
  written: dict = {tp: set() for tp in expected}
  committed: dict = {}
  for entry in store.journal():
    kind, *rest = entry
    if kind == "write":
      _table, topic, partition, offset = rest
      assert offset not in written[(topic, partition)], f"written twice: {entry}"
      written[(topic, partition)].add(offset)
      continue
    topic, partition, offset = rest
    start, _ = expected[(topic, partition)]
    missing = set(range(start, offset)) - written[(topic, partition)]
    assert not missing, f"{entry} committed before the sink held offsets {sorted(missing)}"
    assert offset >= committed.get((topic, partition), start), f"commit went back: {entry}"
    committed[(topic, partition)] = offset
  for tp, (start, end) in expected.items():
    assert written[tp] == set(range(start, end)), (
      f"{tp}: gaps {set(range(start, end)) - written[tp]}"
    )
    assert committed.get(tp) == end, f"{tp}: last commit {committed.get(tp)}, expected {end}"


# --------------------------------------------------------------------------
# windows


@RUNNERS
def test_events_land_in_their_fixed_event_time_window(store, runner):
  # Three windows, interleaved in arrival order; arrival close to the event time.
  events = [1000, 1130, 1015, 1060, 1001, 1179, 1119, 1061, 1002, 1019]
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(990)
    .add_elements([_record(i, t, 1000 + i) for i, t in enumerate(events)])
    .advance_watermark_to_infinity()
  )
  acks = _run(
    stream, {(SENSOR, 0): 0}, _options("--reconcile=off", runner=runner), store, collect_acks=True
  )

  rows = store.rows(SENSOR_READINGS.name)
  assert sorted(o for _, _, o in rows) == list(range(len(events)))
  for i, t in enumerate(events):
    window = _window(t)
    row = rows[(SENSOR, 0, i)]
    assert (row[WINDOW_COLUMNS[0]], row[WINDOW_COLUMNS[1]]) == (
      _iso(window.start.micros / 1e6),
      _iso(window.end.micros / 1e6),
    )
    assert row[LATE_COLUMN] is False
  # Acks leave in the window of their batch: every offset acked exactly once, in its window.
  acked = {}
  for ack, window in acks:
    for offset in range(ack.start, ack.end):
      assert offset not in acked, f"offset {offset} acked twice"
      acked[offset] = window
  assert acked == {i: _window(t) for i, t in enumerate(events)}
  _journal_checks(store, {(SENSOR, 0): (0, len(events))})


# --------------------------------------------------------------------------
# late events


@RUNNERS
def test_late_events_are_kept_and_flagged_within_and_beyond_allowed_lateness(store, runner):
  window_end = 1020  # of the window [960, 1020) the events belong to
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(990)
    .add_elements([_record(0, 1000)])
    # The watermark passes the window's end; still within the allowed lateness.
    .advance_watermark_to(window_end + LATENESS_S - 100)
    .add_elements([_record(1, 1005, window_end + LATENESS_S - 100)])
    # Beyond the allowed lateness: kept, flagged, in the window of its arrival.
    .advance_watermark_to(window_end + LATENESS_S + 60)
    .add_elements([_record(2, 1010, window_end + LATENESS_S + 60)])
    .advance_watermark_to_infinity()
  )
  acks = _run(
    stream, {(SENSOR, 0): 0}, _options("--reconcile=off", runner=runner), store, collect_acks=True
  )

  rows = store.rows(SENSOR_READINGS.name)
  assert [rows[(SENSOR, 0, i)][LATE_COLUMN] for i in range(3)] == [False, False, True]
  for i in range(3):  # the stored window is the event's, late or not
    assert rows[(SENSOR, 0, i)][WINDOW_COLUMNS[0]] == _iso(960)
  windows = {o: w for ack, w in acks for o in range(ack.start, ack.end)}
  assert windows == {0: _window(1000), 1: _window(1000), 2: _window(window_end + LATENESS_S + 60)}
  _journal_checks(store, {(SENSOR, 0): (0, 3)})


# --------------------------------------------------------------------------
# the buffering flush and drain


def test_partial_batch_is_flushed_by_the_buffering_timer_in_processing_time(store):
  """7 rows of one key and window: a full batch of 5 leaves at once; the other 2 wait in
  GroupIntoBatches until processing time passes max_buffering_secs, with the watermark
  still inside the window. Only that flush lets offset 7 be committed before offsets 7..9
  arrive; without it the next commit would be 10."""
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(1000)
    .add_elements([_record(i, 1000 + i) for i in range(7)])
    .advance_processing_time(BUFFERING_S / 2)
    .add_elements([_record(7, 1007)])  # a bundle boundary; no flush yet
    .advance_processing_time(BUFFERING_S)
    .add_elements([_record(i, 1000 + i) for i in range(8, 10)])
    .advance_watermark_to_infinity()
  )
  _run(stream, {(SENSOR, 0): 0}, _options(), store)

  commits = [e[3] for e in store.journal() if e[0] == "commit"]
  assert 8 in commits, f"no commit after the buffering flush: {commits}"
  journal = store.journal()
  flushed_at = journal.index(("commit", SENSOR, 0, 8))
  later = {e[4] for e in journal[flushed_at:] if e[0] == "write"}
  assert later == {8, 9}  # the rows that came after the flush were written after it
  _journal_checks(store, {(SENSOR, 0): (0, 10)})


@RUNNERS
def test_watermark_to_infinity_flushes_every_partial_batch(store, runner):
  """Many keys (tables, partitions), windows and partial batches, no processing time
  passing: the end of the stream (drain) flushes them all; nothing is lost."""
  counts = {(SENSOR, 0): 13, (SENSOR, 1): 7, (METER, 0): 3, (METER, 2): 11}
  elements = []
  for (topic, partition), n in counts.items():
    elements += [
      _record(o, 1000 + 37 * o + partition, partition=partition, topic=topic) for o in range(n)
    ]
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(990)
    .add_elements(elements[::2])
    .add_elements(elements[1::2])
    .advance_watermark_to_infinity()
  )
  _run(stream, {tp: 0 for tp in counts}, _options("--num_shards=2", runner=runner), store)
  _journal_checks(store, {tp: (0, n) for tp, n in counts.items()})


# --------------------------------------------------------------------------
# the commit order


@RUNNERS
def test_offsets_are_committed_only_after_the_sink_holds_every_offset_below(store, runner):
  """Offsets 0..3 (a partial batch) belong to a later window than 4..9, so 4..9 are
  written first (a full batch at once, the rest when their window closes): the commit
  must wait at the start until 0..3 are stored too. A resolved start of 20 on another
  partition is committed at once, then follows its acks."""
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(990)
    .add_elements(
      [_record(o, 1200 + o) for o in range(4)]
      + [_record(o, 1000 + o) for o in range(4, 10)]
      + [_record(o, 1000 + o, partition=1) for o in range(20, 23)]
    )
    .advance_watermark_to(1100)  # the first window [960, 1020) closes
    .advance_watermark_to(1300)  # the second [1200, 1260) closes
    .advance_watermark_to_infinity()
  )
  _run(stream, {(SENSOR, 0): 0, (SENSOR, 1): 20}, _options(runner=runner), store)

  journal = store.journal()
  writes = [e[4] for e in journal if e[0] == "write" and e[3] == 0]
  assert writes.index(9) < writes.index(0), "the earlier window was not written first"
  first_late_write = journal.index(("write", SENSOR_READINGS.name, SENSOR, 0, 0))
  early_commits = {e[3] for e in journal[:first_late_write] if e[:3] == ("commit", SENSOR, 0)}
  assert early_commits <= {0}, f"committed ahead of offsets 0..3: {early_commits}"
  assert ("commit", SENSOR, 1, 20) in journal
  _journal_checks(store, {(SENSOR, 0): (0, 10), (SENSOR, 1): (20, 23)})


def test_transient_sink_failures_are_retried_and_nothing_is_committed_before(store):
  store.fail_next(3)
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(990)
    .add_elements([_record(o, 1000 + o) for o in range(12)])
    .advance_watermark_to_infinity()
  )
  _run(stream, {(SENSOR, 0): 0}, _options("--sink_retry_deadline_secs=60"), store)
  _journal_checks(store, {(SENSOR, 0): (0, 12)})


def test_a_replay_writes_nothing_twice_and_commits_to_the_end(store):
  def stream():
    return (
      test_stream.TestStream()
      .advance_watermark_to(990)
      .add_elements([_record(o, 1000 + o) for o in range(8)])
      .advance_watermark_to_infinity()
    )

  _run(stream(), {(SENSOR, 0): 0}, _options(), store)
  before = store.rows(SENSOR_READINGS.name)
  _run(stream(), {(SENSOR, 0): 0}, _options(), store)  # SkipStored: acked, not written
  assert store.rows(SENSOR_READINGS.name) == before
  journal = store.journal()
  assert len([e for e in journal if e[0] == "write"]) == 8
  assert [e for e in journal if e[0] == "commit"][-1] == ("commit", SENSOR, 0, 8)


# --------------------------------------------------------------------------
# the whole graph, built with no broker


def _top_level_steps(p: beam.Pipeline) -> list[str]:
  names = []

  class Visitor(beam.pipeline.PipelineVisitor):
    def enter_composite_transform(self, node):
      self.visit_transform(node)

    def visit_transform(self, node):
      if node.full_label and "/" not in node.full_label:
        names.append(node.full_label)

  p.visit(Visitor())
  return names


def _all_steps(p: beam.Pipeline) -> list[str]:
  names = []

  class Visitor(beam.pipeline.PipelineVisitor):
    def enter_composite_transform(self, node):
      names.append(node.full_label)

    def visit_transform(self, node):
      names.append(node.full_label)

  p.visit(Visitor())
  return names


@pytest.mark.parametrize("sink", ["sqlite:///{tmp}/smartgrid.db", "bigquery://a-project/a_dataset"])
@pytest.mark.parametrize("stop", [None, "end"])
def test_build_constructs_the_whole_graph_with_no_broker(tmp_path, sink, stop):
  args = ["--bootstrap_servers=127.0.0.1:1", f"--sink={sink.format(tmp=tmp_path)}"]
  options = PipelineOptions(args + ([f"--stop={stop}"] if stop else []))
  p = beam.Pipeline(options=options)
  out = smartgrid.build(p, options.view_as(SmartGridOptions))  # 127.0.0.1:1: nobody listens
  assert {
    out.records.producer.full_label.split("/")[0],
    out.committed.producer.full_label.split("/")[0],
  } == {"ReadFromKafka", "CommitOffsets"}
  steps = _all_steps(p)
  assert "ReadFromKafka/ResolvePartitions/ResolveOffsets" in steps
  keyed = any(s.startswith("WriteBatches/WriteRowsOnKeyedStreams") for s in steps)
  assert keyed == sink.startswith("bigquery")  # Storage Write: keyed streams
  assert not (tmp_path / "smartgrid.db").exists()  # building opens no sink either


def test_graph_steps_follow_the_readme_diagram():
  options = PipelineOptions(["--bootstrap_servers=127.0.0.1:1"])
  p = beam.Pipeline(options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions), store=MemoryStore())
  top = _top_level_steps(p)
  # Kafka -> ReadFromKafka -> SkipStored -> ParseEvents -> windows -> GroupIntoBatches
  #   -> WriteBatches -> Acks -> CommitOffsets
  diagram = [
    "ReadFromKafka",
    "SkipStored",
    "ParseEvents",
    "BatchRows",
    "WriteBatches",
    "CommitOffsets",
  ]
  assert [s for s in top if s in diagram] == diagram
  steps = _all_steps(p)
  order = [
    steps.index(s)
    for s in ("BatchRows/WindowRows", "BatchRows/GroupIntoBatches", "WriteBatches", "CommitOffsets")
  ]
  assert order == sorted(order), "windows come before GroupIntoBatches, the sink before commits"
  assert top.index("OffsetGapDeadLetters") < top.index("BatchRows")  # skipped offsets are rows too
  assert top.index("CoveredOffsets") < top.index("CommitOffsets")


def test_reconcile_off_leaves_skip_stored_out():
  options = PipelineOptions(["--bootstrap_servers=127.0.0.1:1", "--reconcile=off"])
  p = beam.Pipeline(options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions), store=MemoryStore())
  assert "SkipStored" not in _top_level_steps(p)


def test_bad_events_become_dead_letters_and_their_offsets_are_committed_in_order(store):
  bad = {3: b"not json", 6: b'{"event_id": "x"}', 7: b"\xff\xfe"}
  elements = [_record(o, 1000 + o) for o in range(10)]
  for offset, value in bad.items():
    good = elements[offset].value
    elements[offset] = TimestampedValue(good._replace(value=value), elements[offset].timestamp)
  stream = (
    test_stream.TestStream()
    .advance_watermark_to(990)
    .add_elements(elements)
    .advance_watermark_to_infinity()
  )
  _run(stream, {(SENSOR, 0): 0}, _options(), store)
  dead = store.rows("dead_letters")
  assert sorted(o for _, _, o in dead) == sorted(bad)
  reasons = {o: row[DEAD_LETTERS.names.index("reason")] for (_, _, o), row in dead.items()}
  assert reasons == {3: "not_json", 6: "missing_field", 7: "not_utf8"}
  assert sorted(o for _, _, o in store.rows(SENSOR_READINGS.name)) == sorted(
    set(range(10)) - set(bad)
  )
  _journal_checks(store, {(SENSOR, 0): (0, 10)})


def _poll_batches(elements: list, size: int) -> list:
  """Records -> the reader's poll batches (batched=True): lists stamped with their earliest time."""
  return [
    TimestampedValue(
      RecordBatch(tv.value for tv in elements[i : i + size]),
      min(tv.timestamp for tv in elements[i : i + size]),
    )
    for i in range(0, len(elements), size)
  ]


def test_poll_batches_store_and_commit_what_single_records_do():
  """The reader's poll batches (one element per poll, as the pipeline reads) against the same
  records one by one: the same rows, dead letters and windows, offset by offset, and the same
  commits; two partitions, bad events inside batches, batches that straddle windows."""
  by_partition = [[_record(o, 1000 + 7 * o + q, partition=q) for o in range(20)] for q in (0, 1)]
  for q, o, value in ((0, 5, b"not json"), (1, 2, b"[1]"), (1, 3, b"\xff")):
    good = by_partition[q][o]
    by_partition[q][o] = TimestampedValue(good.value._replace(value=value), good.timestamp)
  starts = {(SENSOR, 0): 0, (SENSOR, 1): 0}
  outcomes = []
  for stream_elements in (
    [e for records in by_partition for e in records],
    [b for records in by_partition for b in _poll_batches(records, 7)],
  ):
    stream = (
      test_stream.TestStream()
      .advance_watermark_to(990)
      .add_elements(stream_elements)
      .advance_watermark_to_infinity()
    )
    store = MemoryStore()
    try:
      _run(stream, starts, _options(), store)
      _journal_checks(store, {(SENSOR, 0): (0, 20), (SENSOR, 1): (0, 20)})
      rows = {
        c: {k: v for k, v in zip(SENSOR_READINGS.names, r) if k != "written_at"}
        for c, r in store.rows(SENSOR_READINGS.name).items()
      }
      dead = {
        c: r[DEAD_LETTERS.names.index("reason")] for c, r in store.rows("dead_letters").items()
      }
      commits = [e for e in store.journal() if e[0] != "write"]
      outcomes.append((rows, dead, commits[-2:]))
    finally:
      store.forget()
  assert len(outcomes[0][0]) == 37 and all(len(r) > 10 for r in outcomes[0][0].values())
  assert sorted((q, o) for _, q, o in outcomes[0][1]) == [(0, 5), (1, 2), (1, 3)]
  assert outcomes[0][0] == outcomes[1][0]
  assert outcomes[0][1] == outcomes[1][1]
  assert sorted(outcomes[0][2]) == sorted(outcomes[1][2])


def test_full_batches_are_written_in_the_stage_that_reads_them():
  """On FnApiRunner (one fused stage after the other), the batches that fill while reading
  are written in the reading stage; only leftovers (GroupIntoBatches) and acks cross stages,
  so memory does not grow with the records a round reads."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner

  options = PipelineOptions(["--bootstrap_servers=127.0.0.1:1", "--stop=end"])
  p = beam.Pipeline(options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions), store=MemoryStore())
  _, stages = FnApiRunner().create_stages(p.to_runner_api())

  def stage_of(label: str) -> int:
    found = [i for i, st in enumerate(stages) for t in st.transforms if t.unique_name == label]
    assert len(found) == 1, (label, found)
    return found[0]

  reading = stage_of("ReadFromKafka/ReadPartitions/ReadRecords/ParDo(_ReadPartitionFn)/Process")
  assert stage_of("ParseEvents/Parse/ParDo(_ParseEventsFn)") == reading
  assert stage_of("WriteBatches/WriteRows") == reading
  assert stage_of("BatchRows/GroupIntoBatches/ParDo(_GroupIntoBatchesDoFn)") != reading
  assert stage_of("WriteBatches/WriteRows1") == stage_of(
    "BatchRows/GroupIntoBatches/ParDo(_GroupIntoBatchesDoFn)"
  )


def test_the_reader_and_the_committer_get_one_client_config():
  """One Kafka client config shape: the graph builds it once (secrets as references) and the
  reader and the committer hold equal settings, group and SASL references included."""
  options = PipelineOptions(
    [
      "--bootstrap_servers=127.0.0.1:1,127.0.0.1:2",
      "--group_id=g",
      "--kafka_security_protocol=SASL_PLAINTEXT",
      "--kafka_sasl_mechanism=PLAIN",
    ]
  )
  p = beam.Pipeline(options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions), store=MemoryStore())
  found = {}

  class Visitor(beam.pipeline.PipelineVisitor):
    def enter_composite_transform(self, node):
      if node.full_label in ("ReadFromKafka", "CommitOffsets"):
        found[node.full_label] = node.transform

  p.visit(Visitor())
  reader, committer = found["ReadFromKafka"].config, found["CommitOffsets"]._fn._config
  assert reader == committer == smartgrid.kafka_client_config(options.view_as(SmartGridOptions))
  assert reader["bootstrap_servers"] == ["127.0.0.1:1", "127.0.0.1:2"]
  assert reader["group_id"] == "g" and reader["enable_auto_commit"] is False
  assert reader["sasl_mechanism"] == "PLAIN"
  assert type(reader["sasl_plain_password"]).__name__ == "FromEnv"  # a reference, no secret
