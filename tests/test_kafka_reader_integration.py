"""ReadFromKafka against the real broker, checked offset by offset.

Every test writes to a fresh topic with an independent kafka-python producer, runs the
reader on FnApiRunner (in-process: the collecting DoFn appends to a module-level list),
and asserts on exactly which (partition, offset)s came out: no gap, no duplicate, and
``[covers_from, offset]`` ranges that tile the partition from the read's start.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions
from kafka.structs import OffsetAndMetadata

from broker.kafka_broker import free_port
from tests import support
from transforms.kafka import (
  KafkaRecord,
  KafkaUnavailableError,
  ReadFromKafka,
  ReadPartitions,
  ResolvePartitions,
  UnknownTopicError,
)
from transforms.kafka.drain import DrainSignal
from transforms.kafka.positions import parse_start, parse_stop
from transforms.kafka.records import RecordBatch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# name -> collected elements. FnApiRunner runs the SDK worker in this process, and the
# DoFn below is unpickled from this module, so it appends to these very lists.
_SINKS: dict[str, list] = {}


class _Collect(beam.DoFn):
  def __init__(self, name: str):
    self._name = name

  def process(self, element, timestamp=beam.DoFn.TimestampParam):
    _SINKS[self._name].append((element, timestamp))


def an_hour_ago_ms() -> int:
  """A record timestamp for tests that set their own: recent, so within the broker's
  retention (168 h). Older ones made a rare flake: a segment whose first record is older
  than segment.ms rolls at the next append, and the retention check, every 5 minutes,
  could delete it between the test's produce and its read (log start moved past them)."""
  return (int(time.time()) - 3600) * 1000


def _sink(name: str) -> list:
  _SINKS[name] = []
  return _SINKS[name]


def run_read(build: Callable[[beam.Pipeline], beam.PCollection]) -> list[KafkaRecord]:
  """Builds with build(p), runs to completion on FnApiRunner, returns the records."""
  name = uuid.uuid4().hex
  out = _sink(name)
  p = beam.Pipeline(runner=FnApiRunner())
  _ = build(p) | "Collect" >> beam.ParDo(_Collect(name))
  p.run().wait_until_finish()
  for record, timestamp in out:
    assert timestamp.micros == record.timestamp_ms * 1000, record
  return [r for r, _ in _SINKS.pop(name)]


class BackgroundPipeline:
  """Runs a streaming read in a thread until drained through its drain file."""

  def __init__(self, build: Callable[[beam.Pipeline, str], beam.PCollection], drain_path: str):
    self.name = uuid.uuid4().hex
    self.out = _sink(self.name)
    self.drain_path = drain_path
    self.error: BaseException | None = None
    self.state = None
    self._p = beam.Pipeline(runner=FnApiRunner())
    _ = build(self._p, drain_path) | "Collect" >> beam.ParDo(_Collect(self.name))
    self._thread = threading.Thread(target=self._run, daemon=True, name="pipeline")

  def _run(self):
    try:
      result = self._p.run()
      self.state = result.wait_until_finish()
    except BaseException as e:  # reported by the test thread
      self.error = e

  def __enter__(self):
    self._thread.start()
    return self

  def records(self) -> list[KafkaRecord]:
    return [r for r, _ in list(self.out)]

  def drain_and_wait(self, timeout: float = 60.0) -> float:
    begun = time.monotonic()
    DrainSignal.request(self.drain_path)
    self._thread.join(timeout)
    assert not self._thread.is_alive(), f"pipeline still running {timeout:.0f}s after the drain"
    if self.error:
      raise self.error
    return time.monotonic() - begun

  def __exit__(self, *exc):
    # Never leave a reader polling in the background, even when the test failed.
    DrainSignal.request(self.drain_path)
    self._thread.join(30)
    _SINKS.pop(self.name, None)


class BackgroundProducer:
  """Writes keyed JSON events until stopped; knows the (partition, offset) of each."""

  def __init__(self, bootstrap: str, topic: str, partitions: int, every_s: float = 0.005):
    self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    self._topic, self._partitions, self._every = topic, partitions, every_s
    self._stop = threading.Event()
    self._futures = []
    self._thread = threading.Thread(target=self._run, daemon=True, name="producer")

  def _run(self):
    i = 0
    while not self._stop.is_set():
      self._futures.append(
        self._producer.send(
          self._topic,
          key=f"k{i % 13}".encode(),
          value=json.dumps({"n": i}).encode(),
          partition=i % self._partitions,
        )
      )
      i += 1
      time.sleep(self._every)

  def start(self) -> BackgroundProducer:
    self._thread.start()
    return self

  def stop(self) -> set[tuple[int, int]]:
    """Stops, waits until the broker acknowledged everything; returns what was written."""
    self._stop.set()
    self._thread.join(30)
    self._producer.flush()
    coords = {(m.partition, m.offset) for m in (f.get(timeout=30) for f in self._futures)}
    self._producer.close()
    return coords


# --------------------------------------------------------------------------
# assertions


def coords(records: Iterable[KafkaRecord]) -> list[tuple[int, int]]:
  return [(r.partition, r.offset) for r in records]


def assert_no_duplicates(records: list[KafkaRecord]) -> None:
  seen = coords(records)
  dupes = {c for c in seen if seen.count(c) > 1}
  assert not dupes, f"duplicates: {sorted(dupes)[:10]}"


def assert_tiles(records: list[KafkaRecord], starts: dict[int, int], last: dict[int, int]) -> None:
  """Per partition, [covers_from, offset] ranges cover starts[p]..last[p] exactly once."""
  assert_no_duplicates(records)
  by_p: dict[int, list[KafkaRecord]] = {}
  for r in records:
    by_p.setdefault(r.partition, []).append(r)
  assert set(by_p) == set(last), f"partitions read {sorted(by_p)}, expected {sorted(last)}"
  for p, rs in by_p.items():
    rs.sort(key=lambda r: r.offset)
    expected_from = starts[p]
    for r in rs:
      assert r.covers_from == expected_from, (
        f"p{p}: {r.covers_from=} {r.offset=}, expected from {expected_from}"
      )
      assert r.covers_from <= r.offset
      expected_from = r.offset + 1
    assert rs[-1].offset == last[p], f"p{p}: last offset read {rs[-1].offset}, expected {last[p]}"


def assert_contiguous(records: list[KafkaRecord], expected: set[tuple[int, int]]) -> None:
  assert expected, "the test produced nothing: it would pass vacuously"
  assert_no_duplicates(records)
  got = set(coords(records))
  assert got == expected, (
    f"missing {sorted(expected - got)[:10]} ({len(expected - got)}), "
    f"unexpected {sorted(got - expected)[:10]} ({len(got - expected)})"
  )


# --------------------------------------------------------------------------
# bounded reads


def test_bounded_read_returns_exactly_the_produced_records(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=4)
  events = [(f"sensor-{i % 11}", {"n": i, "pad": "x" * (i % 50)}) for i in range(400)]
  plain = support.produce(kafka_bootstrap, topic, events)
  expected = {
    pc: (f"sensor-{i % 11}".encode(), json.dumps(v).encode(), None, ())
    for i, (pc, (_, v)) in enumerate(zip(plain, events))
  }
  headers = [("trace", b"abc"), ("empty", b"")]
  stamp = an_hour_ago_ms() + 123
  for p in range(4):
    stamped = support.produce(
      kafka_bootstrap,
      topic,
      [(None, f"p{p}-{j}") for j in range(3)],
      partition=p,
      headers=headers,
      timestamp_ms=stamp + p,
    )
    for j, pc in enumerate(stamped):
      expected[pc] = (None, f"p{p}-{j}".encode(), stamp + p, tuple(headers))
  assert len({p for p, _ in expected}) == 4

  records = run_read(lambda p: p | ReadFromKafka(kafka_bootstrap, topic, stop="end"))

  assert_contiguous(records, set(expected))
  ends = support.end_offsets(kafka_bootstrap, topic)
  assert_tiles(records, {p: 0 for p in range(4)}, {p: ends[p] - 1 for p in range(4)})
  for r in records:
    key, value, ts, hdrs = expected[(r.partition, r.offset)]
    assert (r.topic, r.key, r.value, r.headers) == (topic, key, value, hdrs)
    if ts is not None:
      assert r.timestamp_ms == ts
    else:
      assert abs(r.timestamp_ms - time.time() * 1000) < 600_000  # stamped by the producer


def test_records_read_are_counted_per_topic_in_beam_metrics(kafka_bootstrap, make_topic):
  """The reader counts once per poll batch, in namespace smartgrid, one counter per topic
  (what the launchers read back from the PipelineResult)."""
  from apache_beam.metrics.metric import MetricsFilter

  topics = [make_topic(partitions=2), make_topic(partitions=1)]
  produced = {
    t: len(support.produce(kafka_bootstrap, t, [(f"k{i}", {"n": i}) for i in range(n)]))
    for t, n in zip(topics, (2_345, 678))
  }
  assert produced == {topics[0]: 2_345, topics[1]: 678}
  name = uuid.uuid4().hex
  _sink(name)
  p = beam.Pipeline(runner=FnApiRunner())
  _ = (
    p
    | ReadFromKafka(kafka_bootstrap, topics, stop="end", max_records_per_call=500)
    | "Collect" >> beam.ParDo(_Collect(name))
  )
  result = p.run()
  result.wait_until_finish()
  records = [r for r, _ in _SINKS.pop(name)]
  for t in topics:
    assert_no_duplicates([r for r in records if r.topic == t])
    assert sum(r.topic == t for r in records) == produced[t]
  counted = {
    c.key.metric.name: c.committed
    for c in result.metrics().query(MetricsFilter().with_namespace("smartgrid"))["counters"]
  }
  assert counted == {f"records_read/{t}": n for t, n in produced.items()}


def test_batched_read_emits_each_poll_as_one_batch_with_the_same_records(
  kafka_bootstrap, make_topic
):
  """ReadFromKafka(batched=True), as the pipeline reads: the same records as record by record,
  in offset order within each batch, one partition per batch, each batch stamped with its
  earliest record's time; polls of at most 100 records, checkpoints every 300."""
  topic = make_topic(partitions=3)
  support.produce(kafka_bootstrap, topic, [(f"k{i}", {"n": i}) for i in range(2_000)])
  single = run_read(lambda p: p | ReadFromKafka(kafka_bootstrap, topic, stop="end"))
  name = uuid.uuid4().hex
  out = _sink(name)
  p = beam.Pipeline(runner=FnApiRunner())
  batches = p | ReadFromKafka(
    kafka_bootstrap,
    topic,
    stop="end",
    max_records_per_call=300,
    consumer_config={"max_poll_records": 100},
    batched=True,
  )
  assert batches.element_type is RecordBatch
  _ = batches | "Collect" >> beam.ParDo(_Collect(name))
  p.run().wait_until_finish()
  collected = _SINKS.pop(name)
  assert out is collected and len(collected) >= 2_000 // 100
  for batch, timestamp in collected:
    assert isinstance(batch, RecordBatch) and batch
    assert len({(r.topic, r.partition) for r in batch}) == 1
    assert [r.offset for r in batch] == sorted(r.offset for r in batch)
    assert timestamp.micros == min(r.timestamp_ms for r in batch) * 1000
  batched = [r for batch, _ in collected for r in batch]
  assert len(batched) == len(single) == 2_000
  assert sorted(batched) == sorted(single)
  assert_no_duplicates(batched)
  last = {q: max(r.offset for r in batched if r.partition == q) for q in range(3)}
  assert_tiles(batched, dict.fromkeys(range(3), 0), last)


def _transaction(
  producer: KafkaProducer, topic: str, partition: int, keys: list[str], commit: bool
) -> list[int]:
  producer.begin_transaction()
  futures = [
    producer.send(topic, key=k.encode(), value=k.encode(), partition=partition) for k in keys
  ]
  producer.flush()
  offsets = [f.get(timeout=30).offset for f in futures]
  (producer.commit_transaction if commit else producer.abort_transaction)()
  return offsets


def test_transactions_only_committed_records_and_covers_tile_the_log(kafka_bootstrap, make_topic):
  """Aborted records and commit/abort markers take offsets but are never returned.

  Partition 0: committed, aborted, committed. Partition 1: committed, aborted (its last
  offsets hold nothing returnable). The bounded read must still finish, and the ranges
  [covers_from, offset] tile every offset from 0 to the last returned record. The
  markers (and aborted records) after the last returned record are covered by no record:
  nothing can carry them, so they stay unacknowledged; the next read starts before them
  and skips them again, which costs nothing.
  """
  topic = make_topic(partitions=2)
  producer = support.transactional_producer(kafka_bootstrap)
  try:
    committed = {}
    committed[0] = _transaction(producer, topic, 0, ["a0", "a1", "a2"], commit=True)
    aborted = _transaction(producer, topic, 0, ["x0", "x1"], commit=False)
    committed[0] += _transaction(producer, topic, 0, ["c0", "c1", "c2"], commit=True)
    committed[1] = _transaction(producer, topic, 1, ["b0", "b1"], commit=True)
    aborted += _transaction(producer, topic, 1, ["y0", "y1", "y2"], commit=False)
  finally:
    producer.close()
  ends = support.end_offsets(kafka_bootstrap, topic)
  # Markers take offsets: the second committed txn starts after the abort marker.
  assert committed[0][3] > max(committed[0][:3]) + len(["x0", "x1"]) + 1
  assert ends[0] == committed[0][-1] + 2 and ends[1] > committed[1][-1] + 4

  records = run_read(lambda p: p | ReadFromKafka(kafka_bootstrap, topic, stop="end"))

  expected = {(p, o) for p, offsets in committed.items() for o in offsets}
  assert_contiguous(records, expected)
  assert {r.key for r in records} == {b"a0", b"a1", b"a2", b"c0", b"c1", b"c2", b"b0", b"b1"}
  assert_tiles(records, {0: 0, 1: 0}, {0: committed[0][-1], 1: committed[1][-1]})
  gap = next(r for r in records if r.partition == 0 and r.key == b"c0")
  assert gap.covers_from == committed[0][2] + 1 < gap.offset  # the aborted txn and its markers


# --------------------------------------------------------------------------
# start positions


def test_start_committed_reads_from_the_group_offsets_and_commits_nothing(
  kafka_bootstrap, make_topic
):
  topic = make_topic(partitions=3)
  for p in range(3):
    support.produce(kafka_bootstrap, topic, [(None, f"{p}-{i}") for i in range(30)], partition=p)
  group = f"g-{uuid.uuid4().hex[:8]}"
  committer = KafkaConsumer(
    bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
  )
  try:
    committer.commit(
      offsets={
        TopicPartition(topic, 0): OffsetAndMetadata(10, "", -1),
        TopicPartition(topic, 1): OffsetAndMetadata(30, "", -1),
      }
    )
  finally:
    committer.close()
  before = support.committed_offsets(kafka_bootstrap, group, topic)
  assert before == {0: 10, 1: 30, 2: None}

  records = run_read(
    lambda p: (
      p | ReadFromKafka(kafka_bootstrap, [topic], group_id=group, start="committed", stop="end")
    )
  )

  # p0 from its committed offset, p1 fully consumed, p2 never committed: from the earliest.
  expected = {(0, o) for o in range(10, 30)} | {(2, o) for o in range(30)}
  assert_contiguous(records, expected)
  assert_tiles(records, {0: 10, 2: 0}, {0: 29, 2: 29})
  assert (
    support.committed_offsets(kafka_bootstrap, group, topic) == before
  )  # the reader never commits


def test_start_timestamp(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=2)
  base = an_hour_ago_ms()
  for p in range(2):
    for i in range(10):
      support.produce(
        kafka_bootstrap, topic, [(None, f"{p}-{i}")], partition=p, timestamp_ms=base + i * 1000 + p
      )
  expected = {(p, o) for p in range(2) for o in range(5, 10)}  # stamped at or after base + 4.5 s
  as_ms = run_read(
    lambda p: p | ReadFromKafka(kafka_bootstrap, topic, start=base + 4500, stop="end")
  )
  assert_contiguous(as_ms, expected)
  assert_tiles(as_ms, {0: 5, 1: 5}, {0: 9, 1: 9})
  when = dt.datetime.fromtimestamp((base + 4500) / 1000, tz=dt.timezone.utc)
  as_datetime = run_read(
    lambda p: p | ReadFromKafka(kafka_bootstrap, topic, start=when, stop="end")
  )
  assert sorted(coords(as_datetime)) == sorted(coords(as_ms))


def test_start_explicit_offsets_others_from_committed(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=3)
  for p in range(3):
    support.produce(kafka_bootstrap, topic, [(None, f"{p}-{i}") for i in range(12)], partition=p)
  records = run_read(
    lambda p: (
      p | ReadFromKafka(kafka_bootstrap, topic, start={(topic, 0): 4, (topic, 2): 11}, stop="end")
    )
  )
  # p1 is not listed: 'committed', and without a group that is the earliest offset.
  expected = {(0, o) for o in range(4, 12)} | {(1, o) for o in range(12)} | {(2, 11)}
  assert_contiguous(records, expected)
  assert_tiles(records, {0: 4, 1: 0, 2: 11}, {0: 11, 1: 11, 2: 11})


def test_start_latest_reads_only_what_is_written_after_the_read_starts(
  kafka_bootstrap, make_topic, tmp_path
):
  topic = make_topic(partitions=2)
  support.produce(kafka_bootstrap, topic, [(f"old{i}", "old") for i in range(40)])
  old_end = support.end_offsets(kafka_bootstrap, topic)

  with BackgroundPipeline(
    lambda p, drain: (
      p
      | ReadFromKafka(kafka_bootstrap, topic, start="latest", poll_timeout_ms=200, drain_file=drain)
    ),
    str(tmp_path / "drain"),
  ) as pipeline:
    producer = BackgroundProducer(kafka_bootstrap, topic, 2).start()
    try:
      support.wait_for(
        lambda: len({r.partition for r in pipeline.records()}) == 2,
        timeout=60,
        what="new records on both partitions",
      )
    finally:
      produced = producer.stop()
    last = {p: max(o for q, o in produced if q == p) for p in (0, 1)}
    support.wait_for(
      lambda: {(r.partition, r.offset) for r in pipeline.records()} >= set(last.items()),
      timeout=30,
      what="the reader to catch up",
    )
    pipeline.drain_and_wait()
    records = pipeline.records()

  assert records and all(r.value != b"old" for r in records)
  starts = {p: _first_read(records, p) for p in (0, 1)}
  assert all(starts[p] >= old_end[p] for p in (0, 1)), (starts, old_end)
  # From where it started, the read is complete: every later record, once.
  assert_contiguous(records, {(p, o) for p, o in produced if o >= starts[p]})
  assert_tiles(records, starts, last)


def _first_read(records: list[KafkaRecord], partition: int) -> int:
  """Where the read of a partition began: the first record's covers_from."""
  mine = [r for r in records if r.partition == partition]
  return min(mine, key=lambda r: r.offset).covers_from if mine else 1 << 62


def test_empty_topic_bounded_read_finishes(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=4)
  config = ReadFromKafka(kafka_bootstrap, topic).config
  reads_sink, records_sink = uuid.uuid4().hex, uuid.uuid4().hex
  _sink(reads_sink), _sink(records_sink)
  p = beam.Pipeline(runner=FnApiRunner())
  reads = p | ResolvePartitions([topic], config, parse_start("earliest"), parse_stop("end"))
  _ = reads | "CollectReads" >> beam.ParDo(_Collect(reads_sink))
  _ = (
    reads
    | ReadPartitions(config, bounded=True, poll_timeout_ms=200)
    | "CollectRecords" >> beam.ParDo(_Collect(records_sink))
  )
  begun = time.monotonic()
  p.run().wait_until_finish()
  resolved = sorted((r.partition, r.start_offset, r.stop_offset) for r, _ in _SINKS.pop(reads_sink))
  assert resolved == [(q, 0, 0) for q in range(4)]  # four empty restrictions [0, 0)
  assert _SINKS.pop(records_sink) == []
  assert time.monotonic() - begun < 30
  # The same through the public transform.
  assert run_read(lambda p: p | ReadFromKafka(kafka_bootstrap, topic, stop="end")) == []


def test_partitions_are_listed_when_the_pipeline_runs(kafka_bootstrap, make_topic):
  """Partitions are listed when the pipeline runs, not when the graph is built.

  A partition added after the graph was built but before it runs is read; the
  same transform's ``partitions()`` asks the broker on demand.
  """
  topic = make_topic(partitions=2)
  for p in range(2):
    support.produce(kafka_bootstrap, topic, [(None, f"{p}-{i}") for i in range(5)], partition=p)
  read = ReadFromKafka(kafka_bootstrap, topic, stop="end")
  name = uuid.uuid4().hex
  _sink(name)
  built = beam.Pipeline(runner=FnApiRunner())
  _ = built | read | beam.ParDo(_Collect(name))
  assert read.partitions() == [(topic, 0), (topic, 1)]

  admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
  try:
    admin.create_partitions({topic: NewPartitions(total_count=3)})
  finally:
    admin.close()
  support.wait_for(
    lambda: len(support.partitions_of(kafka_bootstrap, topic)) == 3, what="the third partition"
  )
  support.produce(kafka_bootstrap, topic, [(None, f"2-{i}") for i in range(5)], partition=2)
  assert read.partitions() == [(topic, 0), (topic, 1), (topic, 2)]

  built.run().wait_until_finish()
  first = [r for r, _ in _SINKS.pop(name)]
  assert_contiguous(first, {(p, o) for p in range(3) for o in range(5)})


def test_a_new_client_asks_for_topic_metadata_without_waiting_a_backoff(
  kafka_bootstrap, make_topic
):
  """kafka-python 3.0 counts its bootstrap's metadata request as a refresh, so a new client's
  first request for topics would wait its retry backoff (100 ms): ``new_consumer`` and the
  launcher's ``KafkaView`` forget that refresh time (KAFKA-4024's fix in the Java client).
  Checked on the client's schedule (the last refresh time its backoff counts from), not with
  a clock; a failed refresh still backs off."""
  from kafka.errors import KafkaConnectionError

  from pipelines.options import SmartGridOptions
  from runners.kafka_view import KafkaView
  from transforms.kafka.client import new_consumer, without_bootstrap_backoff
  from transforms.kafka.config import consumer_config

  topic = make_topic(partitions=2)
  plain = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
  view = KafkaView(
    SmartGridOptions([f"--bootstrap_servers={kafka_bootstrap}", f"--sensor_topic={topic}"])
  )
  ours = new_consumer(consumer_config(kafka_bootstrap, None, {}))
  try:
    # kafka-python's schedule: a request waits retry_backoff_ms after the last refresh time.
    backoff = plain._client.cluster.config["retry_backoff_ms"]
    assert backoff == 100 and plain._client.cluster._last_refresh_ms > 0, (
      "kafka-python no longer counts its bootstrap as a refresh: drop the fix"
    )
    cluster = ours._client.cluster
    assert cluster._last_refresh_ms == 0  # forgotten: the first request for topics goes at once
    assert ours.partitions_for_topic(topic) == {0, 1}
    assert {tp.partition for tp in view.tps} == {0, 1}  # the view's client too, and it works
    # A failed refresh still waits its backoff before the next request.
    cluster.failed_update(KafkaConnectionError("test"))
    assert cluster._last_refresh_ms > 0
    marker = object()
    assert without_bootstrap_backoff(marker) is marker  # another client shape: left alone
  finally:
    plain.close()
    ours.close()
    view.close()


# --------------------------------------------------------------------------
# streaming, drain, stop and resume


def test_unbounded_read_drain_then_resume_without_gap(kafka_bootstrap, make_topic, tmp_path):
  topic = make_topic(partitions=4)
  with BackgroundPipeline(
    lambda p, drain: (
      p
      | ReadFromKafka(
        kafka_bootstrap, topic, start="earliest", poll_timeout_ms=200, drain_file=drain
      )
    ),
    str(tmp_path / "drain"),
  ) as pipeline:
    producer = BackgroundProducer(kafka_bootstrap, topic, 4, every_s=0.002).start()
    try:
      support.wait_for(
        lambda: len(pipeline.records()) >= 300,
        timeout=60,
        what="300 records read while the producer writes",
      )
    finally:
      before_drain = producer.stop()
    took = pipeline.drain_and_wait()
    first = pipeline.records()

  assert took < 30, f"the drain took {took:.1f}s"
  assert pipeline.state == "DONE"
  # Everything acknowledged by the broker before the drain was requested was read.
  assert_contiguous(first, before_drain)
  last = {p: max(o for q, o in before_drain if q == p) for p in range(4)}
  assert_tiles(first, {p: 0 for p in range(4)}, last)

  # Resume after the drain from the saved offsets; more was written meanwhile.
  after = set(support.produce(kafka_bootstrap, topic, [(f"k{i}", {"late": i}) for i in range(100)]))
  second = run_read(
    lambda p: (
      p
      | ReadFromKafka(
        kafka_bootstrap, topic, start={(topic, p): o + 1 for p, o in last.items()}, stop="end"
      )
    )
  )
  assert_contiguous(second, after)
  assert_contiguous(first + second, before_drain | after)
  assert_tiles(
    first + second,
    {p: 0 for p in range(4)},
    {p: max(o for q, o in before_drain | after if q == p) for p in range(4)},
  )


def test_stop_at_timestamp_then_resume_from_saved_offsets(kafka_bootstrap, make_topic):
  topic = make_topic(partitions=2)
  base = an_hour_ago_ms()
  for p in range(2):
    support.produce(
      kafka_bootstrap,
      topic,
      [(None, f"early-{i}") for i in range(15)],
      partition=p,
      timestamp_ms=base,
    )
    support.produce(
      kafka_bootstrap,
      topic,
      [(None, f"late-{i}") for i in range(10)],
      partition=p,
      timestamp_ms=base + 60_000,
    )

  first = run_read(
    lambda p: p | ReadFromKafka(kafka_bootstrap, topic, start="earliest", stop=base + 30_000)
  )
  assert_contiguous(first, {(p, o) for p in range(2) for o in range(15)})
  saved = {}
  for r in first:
    saved[r.partition] = max(saved.get(r.partition, -1), r.offset)

  second = run_read(
    lambda p: (
      p
      | ReadFromKafka(
        kafka_bootstrap, topic, start={(topic, p): o + 1 for p, o in saved.items()}, stop="end"
      )
    )
  )
  assert_contiguous(second, {(p, o) for p in range(2) for o in range(15, 25)})
  assert_tiles(first + second, {0: 0, 1: 0}, {0: 24, 1: 24})


# --------------------------------------------------------------------------
# errors when the pipeline runs (building the graph needs no broker)


def test_unreachable_broker_builds_then_fails_the_run_quickly_and_clearly():
  port = free_port()
  read = ReadFromKafka(
    f"127.0.0.1:{port}",
    "anything",
    resolve_retry_s=0,
    consumer_config={"bootstrap_timeout_ms": 3000},
  )
  begun = time.monotonic()
  p = beam.Pipeline(runner=FnApiRunner())
  _ = p | read  # no broker round trip while the graph is built
  with pytest.raises(KafkaUnavailableError) as err:
    p.run().wait_until_finish()
  took = time.monotonic() - begun
  assert took < 15, f"took {took:.1f}s"
  assert f"cannot reach Kafka at 127.0.0.1:{port}" in str(err.value)


def test_unknown_topic_fails_the_run_naming_it_without_retrying(kafka_bootstrap, make_topic):
  known = make_topic(partitions=1)
  missing = f"missing-{uuid.uuid4().hex[:8]}"
  p = beam.Pipeline(runner=FnApiRunner())
  # The default resolve retry (120 s) would make a retried missing topic show here.
  _ = p | ReadFromKafka(kafka_bootstrap, [known, missing], stop="end")
  begun = time.monotonic()
  with pytest.raises(UnknownTopicError, match=missing) as err:
    p.run().wait_until_finish()
  assert time.monotonic() - begun < 60
  assert isinstance(err.value, KafkaUnavailableError)
  assert known not in str(err.value).split("[while running")[0].split(":")[-1]
  admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
  try:
    assert missing not in admin.list_topics()  # checking did not auto-create it
  finally:
    admin.close()


def test_skip_missing_topics_reads_the_topics_that_exist_when_the_run_starts(
  kafka_bootstrap, make_topic
):
  known = make_topic(partitions=2)
  missing = f"missing-{uuid.uuid4().hex[:8]}"
  for p in range(2):
    support.produce(kafka_bootstrap, known, [(None, f"{p}-{i}") for i in range(3)], partition=p)
  records = run_read(
    lambda p: (
      p | ReadFromKafka(kafka_bootstrap, [known, missing], stop="end", skip_missing_topics=True)
    )
  )
  assert_contiguous(records, {(p, o) for p in range(2) for o in range(3)})
