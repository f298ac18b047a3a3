"""The pipeline graph, built from injectable parts: ``build`` = ``read`` + ``process``.

Building needs no broker (partitions are listed when the pipeline runs), and
``process`` takes any ``records`` (a ``TestStream`` in the unit tests).

    Kafka (both topics, one element per poll) -> SkipStored (records the sink holds
      already: acked, not written) -> ParseEvents (rows; batches that fill within a bundle;
      dead letters) -> BatchRows (fixed event-time windows; the rest of the rows through
      GroupIntoBatches(batch_size, max_buffering)) -> WriteBatches(store) -> Acks
      -> CommitOffsets (with the resolved starts) -> Committed

The batches that fill within a bundle are written in the stage that read them; only
the leftover rows and the acks cross to later stages. So on a runner that runs one
stage after the other (FnApiRunner), memory does not grow with the records read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from pipelines.options import SmartGridOptions
from transforms.batching import BatchRows
from transforms.commit import CommitFn, CommitOffsets
from transforms.events import DeadLetter
from transforms.kafka import ReadFromKafka
from transforms.kafka.config import FromEnv, consumer_config
from transforms.kafka.gaps import OFFSET_GAP, OffsetGap, covered_acks
from transforms.kafka.positions import StartPosition, StopPosition, parse_start, parse_stop
from transforms.kafka.read import shard_of
from transforms.parse import METER, SENSOR, ParseEvents, key_dead_letters
from transforms.reconcile import SkipStored
from transforms.rows import KeyedRow
from transforms.sinks.base import Store, WriteBatches
from transforms.windows import FixedEventWindows

_LOGGER = logging.getLogger(__name__)


def kafka_client_config(o: SmartGridOptions) -> dict:
  """kafka-python settings from the options; SASL secrets only from the environment."""
  return consumer_config(o.bootstrap_servers, o.group_id, _kafka_security(o))


def _kafka_security(o: SmartGridOptions) -> dict:
  extra: dict[str, Any] = {}
  if o.kafka_security_protocol:
    extra["security_protocol"] = o.kafka_security_protocol
  if o.kafka_sasl_mechanism:
    extra["sasl_mechanism"] = o.kafka_sasl_mechanism
    # References, resolved where a client opens: the values never enter a pickled DoFn.
    extra["sasl_plain_username"] = FromEnv("KAFKA_SASL_USERNAME")
    extra["sasl_plain_password"] = FromEnv("KAFKA_SASL_PASSWORD")
  return extra


def make_store(o: SmartGridOptions) -> Store:
  if o.sink.startswith("sqlite:"):
    from transforms.sinks.sqlite import SqliteStore, sqlite_path_from_url

    return SqliteStore(sqlite_path_from_url(o.sink))
  from transforms.sinks.bigquery import BigQueryStore  # pylint: disable=import-outside-toplevel

  project, dataset = o.sink[len("bigquery://") :].split("/", 1)
  return BigQueryStore(
    project,
    dataset,
    api_endpoint=o.bigquery_api_endpoint,
    write_method=o.bigquery_write_method,
    storage_api_endpoint=o.bigquery_storage_api_endpoint,
  )


def _offset_gap_dead_letter(gap: OffsetGap, num_shards: int) -> list:
  """An OFFSET_GAP -> a keyed dead_letters row at its first offset (reason offset_gap).

  Built like the parser's dead letters (``DeadLetter`` -> ``key_dead_letters``), so it
  follows the dead_letters columns of ``transforms.rows`` wherever they go.
  """
  if gap.kind != OFFSET_GAP:
    return []
  dead = DeadLetter(
    kafka_topic=gap.topic,
    kafka_partition=gap.partition,
    kafka_offset=gap.start,
    covers_from=gap.start,
    raw_key=None,
    raw_value=None,
    reason=OFFSET_GAP,
    error=f"{OFFSET_GAP}: offsets [{gap.start}, {gap.end}) skipped: {gap.detail}",
    stage="read",
    failed_at_us=int(time.time() * 1_000_000),
  )
  return [key_dead_letters(dead, num_shards)]


def parse_shard(shard: str | None) -> tuple[int, int] | None:
  """'I/N' (--partition_shard) -> (I, N)."""
  if not shard:
    return None
  index, count = (int(x) for x in shard.split("/"))
  return index, count


def shard_partitions(partitions: list, shard: str | None) -> list:
  """Every N-th of the sorted (topic, partition) pairs from the I-th on, for shard 'I/N'
  (the partitions ReadFromKafka(shard=...) reads)."""
  return shard_of(partitions, parse_shard(shard))


@dataclass
class Outputs:
  records: beam.PCollection
  dead_letters: beam.PCollection
  acks: beam.PCollection
  committed: beam.PCollection


def topic_tables(o: SmartGridOptions) -> dict:
  """topic -> the table its events go to."""
  return {o.sensor_topic: SENSOR, o.meter_topic: METER}


def read(
  p: beam.Pipeline,
  o: SmartGridOptions,
  *,
  start: StartPosition,
  stop: StopPosition,
  drain_file: str | None = None,
  skip_missing_topics: bool = False,
) -> tuple:
  """Both topics -> (records, the resolved PartitionReads, the OffsetGaps).

  Needs no broker while the graph is built: partitions are listed when it runs.
  """
  return p | "ReadFromKafka" >> ReadFromKafka.from_client_config(
    kafka_client_config(o),
    list(topic_tables(o)),
    start=start,
    stop=stop,
    poll_timeout_ms=o.poll_timeout_ms,
    drain_file=drain_file,
    shard=parse_shard(o.partition_shard),
    with_partition_reads=True,
    on_offset_gap=o.on_offset_gap,
    skip_missing_topics=skip_missing_topics,
    # One element per poll of a partition: SkipStored and ParseEvents run once per poll.
    batched=True,
  )


def _batches(records, gaps, o: SmartGridOptions, bounded: bool, clock) -> tuple:
  """records and gaps -> ((full batches, grouped batches) in fixed event-time windows,
  dead letters)."""
  rows, dead_letters, full_batches = records | "ParseEvents" >> ParseEvents(
    topic_tables(o),
    window_size_secs=o.window_size_secs,
    allowed_lateness_secs=o.allowed_lateness_secs,
    num_shards=o.num_shards,
    shard_by=o.shard_by,
    batch_size=o.batch_size,
    schema_registry_url=o.schema_registry_url,
  )
  dead_rows = dead_letters | "KeyDeadLetters" >> beam.Map(
    key_dead_letters, o.num_shards
  ).with_output_types(KeyedRow)
  # Skipped offsets (--on_offset_gap=skip) are written as dead letters like any other.
  gap_rows = gaps | "OffsetGapDeadLetters" >> beam.FlatMap(
    _offset_gap_dead_letter, o.num_shards
  ).with_output_types(KeyedRow)
  other_rows = (rows, dead_rows, gap_rows) | "OtherRows" >> beam.Flatten()
  batches = (full_batches, other_rows) | "BatchRows" >> BatchRows(
    o.batch_size,
    FixedEventWindows(o.window_size_secs),
    allowed_lateness_secs=o.allowed_lateness_secs,
    # A bounded read ends with the watermark at +inf, which flushes every partial batch; a
    # buffering timer adds nothing there, and FnApiRunner fails a run that ends with one
    # still pending (even a cleared one).
    max_buffering_secs=None if bounded else o.max_buffering_secs,
    clock=clock,
  )
  return batches, dead_letters


def process(
  records,
  reads,
  gaps,
  o: SmartGridOptions,
  *,
  store: Store,
  bounded: bool,
  commit_fn: CommitFn | None = None,
  clock: Callable[[], float] = time.time,
) -> Outputs:
  """What the pipeline does with what it read: SkipStored, parse, batch, write, commit.

  ``bounded``: the read ends (a batch run or a round), so no processing-time timers.
  ``commit_fn``: commits instead of the Kafka group (``CommitOffsets``); ``clock``:
  GroupIntoBatches' processing time. Both for tests (a ``TestStream`` and a fake clock).
  """
  read_records, skipped_acks = records, None
  if o.reconcile == "on":
    records, skipped_acks = records | "SkipStored" >> SkipStored(
      store, retry_deadline_s=o.sink_retry_deadline_secs
    )
  batches, dead_letters = _batches(records, gaps, o, bounded, clock)
  acks = batches | "WriteBatches" >> WriteBatches(
    store,
    flush_rows=o.sink_flush_rows,
    retry_deadline_s=o.sink_retry_deadline_secs,
    batch_size=o.batch_size,
  )
  if skipped_acks is not None:
    written_acks = acks | "WrittenAcksToGlobalWindow" >> beam.WindowInto(GlobalWindows())
    acks = (written_acks, skipped_acks) | "AllAcks" >> beam.Flatten()
  covered = gaps | "CoveredOffsets" >> beam.FlatMap(covered_acks)
  committed = (reads, acks, covered) | "CommitOffsets" >> CommitOffsets(
    kafka_client_config(o),
    interval_s=o.commit_interval_secs,
    retry_deadline_s=o.sink_retry_deadline_secs,
    flush_timer=not bounded,
    recommit_s=o.recommit_interval_secs,
    commit_fn=commit_fn,
  )
  return Outputs(read_records, dead_letters, acks, committed)


def build(
  p: beam.Pipeline,
  o: SmartGridOptions,
  *,
  store: Store | None = None,
  drain_file: str | None = None,
  start: StartPosition | None = None,
  stop: StopPosition | None = None,
  skip_missing_topics: bool = False,
  commit_fn: CommitFn | None = None,
) -> Outputs:
  """The pipeline on p (``read`` then ``process``); ``start``/``stop`` override
  --start/--stop (the launcher's rounds). Building needs no broker.

  ``skip_missing_topics``: read the topics that exist when the run starts (the local
  launcher waits for the others); else a missing topic fails the run, naming it.
  """
  start = start if start is not None else parse_start(o.start)
  stop = stop if stop is not None else parse_stop(o.stop)
  store = store if store is not None else make_store(o)
  records, reads, gaps = read(
    p, o, start=start, stop=stop, drain_file=drain_file, skip_missing_topics=skip_missing_topics
  )
  return process(records, reads, gaps, o, store=store, bounded=stop.is_bounded, commit_fn=commit_fn)
