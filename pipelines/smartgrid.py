"""The pipeline graph, built from injectable parts.

    Kafka (both topics) -> SkipStored (records the sink holds already: acked, not written)
      -> ParseEvents (rows; batches that fill within a bundle; dead letters)
      -> BatchRows (fixed event-time windows; the rest of the rows through
         GroupIntoBatches(batch_size, max_buffering)) -> WriteBatches(store) -> Acks
      -> CommitOffsets (with the resolved starts) -> Committed
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from pipelines.options import SmartGridOptions
from transforms.batching import BatchRows
from transforms.commit import CommitOffsets
from transforms.kafka import ReadFromKafka
from transforms.kafka.read import shard_of
from transforms.kafka.config import consumer_config
from transforms.kafka.positions import StartPosition, StopPosition, parse_start, parse_stop
from transforms.reconcile import SkipStored
from transforms.parse import METER, SENSOR, ParseEvents, key_dead_letters
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
    extra["sasl_plain_username"] = os.environ.get("KAFKA_SASL_USERNAME")
    extra["sasl_plain_password"] = os.environ.get("KAFKA_SASL_PASSWORD")
  return extra


def make_store(o: SmartGridOptions) -> Store:
  if o.sink.startswith("sqlite:"):
    from transforms.sinks.sqlite import SqliteStore, sqlite_path_from_url
    return SqliteStore(sqlite_path_from_url(o.sink))
  from transforms.sinks.bigquery import BigQueryStore  # pylint: disable=import-outside-toplevel
  project, dataset = o.sink[len("bigquery://"):].split("/", 1)
  return BigQueryStore(project, dataset, api_endpoint=o.bigquery_api_endpoint,
                       write_method=o.bigquery_write_method,
                       storage_api_endpoint=o.bigquery_storage_api_endpoint)


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
  """'I/N' (--partition_shard) -> (I, N)."""
  if not shard:
    return None
  index, count = (int(x) for x in shard.split("/"))
  return index, count


def shard_partitions(partitions: list, shard: Optional[str]) -> list:
  """Every N-th of the sorted (topic, partition) pairs from the I-th on, for shard 'I/N'
  (the partitions ReadFromKafka(shard=...) reads)."""
  return shard_of(partitions, parse_shard(shard))


@dataclass
class Outputs:
  records: beam.PCollection
  dead_letters: beam.PCollection
  acks: beam.PCollection
  committed: beam.PCollection


def build(p: beam.Pipeline, o: SmartGridOptions, *, store: Optional[Store] = None,
          drain_file: Optional[str] = None, start: Optional[StartPosition] = None,
          stop: Optional[StopPosition] = None) -> Outputs:
  """The pipeline on p; ``start``/``stop`` override --start/--stop (the launcher's rounds)."""
  config = kafka_client_config(o)
  topics = {o.sensor_topic: SENSOR, o.meter_topic: METER}
  start = start if start is not None else parse_start(o.start)
  stop = stop if stop is not None else parse_stop(o.stop)
  store = store if store is not None else make_store(o)

  records, reads = p | "ReadFromKafka" >> ReadFromKafka(
      o.bootstrap_servers, list(topics), group_id=o.group_id, start=start, stop=stop,
      consumer_config=_kafka_security(o), poll_timeout_ms=o.poll_timeout_ms,
      drain_file=drain_file, shard=parse_shard(o.partition_shard), with_partition_reads=True)
  read, skipped_acks = records, None
  if o.reconcile == "on":
    records, skipped_acks = records | "SkipStored" >> SkipStored(
        store, retry_deadline_s=o.sink_retry_deadline_secs)
  rows, dead_letters, full_batches = records | "ParseEvents" >> ParseEvents(
      topics, window_size_secs=o.window_size_secs, allowed_lateness_secs=o.allowed_lateness_secs,
      num_shards=o.num_shards, shard_by=o.shard_by, batch_size=o.batch_size,
      schema_registry_url=o.schema_registry_url)
  dead_rows = dead_letters | "KeyDeadLetters" >> beam.Map(
      key_dead_letters, o.num_shards).with_output_types(Tuple[str, Any])
  batches = (full_batches, (rows, dead_rows) | "OtherRows" >> beam.Flatten()) | "BatchRows" >> BatchRows(
      o.batch_size, FixedEventWindows(o.window_size_secs),
      allowed_lateness_secs=o.allowed_lateness_secs,
      # A bounded read ends with the watermark at +inf, which flushes every partial batch; a
      # buffering timer adds nothing there, and FnApiRunner fails a run that ends with one
      # still pending (even a cleared one).
      max_buffering_secs=None if stop.is_bounded else o.max_buffering_secs)
  acks = batches | "WriteBatches" >> WriteBatches(
      store, flush_rows=o.sink_flush_rows, retry_deadline_s=o.sink_retry_deadline_secs,
      batch_size=o.batch_size)
  if skipped_acks is not None:
    written_acks = acks | "WrittenAcksToGlobalWindow" >> beam.WindowInto(GlobalWindows())
    acks = (written_acks, skipped_acks) | "AllAcks" >> beam.Flatten()
  committed = (reads, acks) | "CommitOffsets" >> CommitOffsets(
      config, interval_s=o.commit_interval_secs, retry_deadline_s=o.sink_retry_deadline_secs,
      flush_timer=not stop.is_bounded)
  return Outputs(read, dead_letters, acks, committed)
