"""The audit's read-only view of Kafka: partitions, offsets, and which offsets hold records.

Everything is read with ``isolation_level=read_committed``, as the pipeline reads: the
end offset of a partition is then its last stable offset, and records of aborted
transactions and transaction markers are not records (the sink must not hold them).
The consumer never joins the group and never commits; it only reads the group's
committed offsets. Record offsets are collected as ranges (``tools.ranges``), so
memory follows the number of holes, not of records.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kafka import TopicPartition

from tools.ranges import RangeSet
from transforms.kafka.client import open_consumer

_LOGGER = logging.getLogger(__name__)
# A partition whose position does not move for this long while short of its end fails the audit.
STALL_DEADLINE_S = 60.0
# Ranges of wanted offsets closer than this are read in one pass (see values_at).
_SCAN_MERGE_GAP = 5000


class KafkaAuditError(RuntimeError):
  """Kafka could not be read to the end offsets; the message names the partitions."""


@dataclass(frozen=True)
class PartitionOffsets:
  log_start: int
  end: int  # the last stable offset (read_committed)
  committed: int | None  # the group's committed offset, None when it has none


class KafkaView:
  """One consumer (assigned, never subscribed) over the audited topics."""

  def __init__(self, client_config: dict):
    config = dict(client_config)
    config.update(
      isolation_level="read_committed",
      enable_auto_commit=False,
      auto_offset_reset="earliest",
      max_poll_records=5000,
    )
    self._consumer = open_consumer(config)  # SASL secrets: FromEnv references resolved here

  def close(self) -> None:
    self._consumer.close(autocommit=False)

  def partitions(self, topics: list[str]) -> tuple[list[TopicPartition], list[str]]:
    """(every partition of the topics that exist, the topics that do not)."""
    tps, missing = [], []
    for topic in topics:
      parts = self._consumer.partitions_for_topic(topic)
      if not parts:
        missing.append(topic)
      tps.extend(TopicPartition(topic, p) for p in sorted(parts or ()))
    return tps, missing

  def offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, PartitionOffsets]:
    # Committed first: what the group committed before the sink is read must be in it.
    committed = {tp: self._consumer.committed(tp) for tp in tps}
    end = self._consumer.end_offsets(tps)
    start = self._consumer.beginning_offsets(tps)
    return {tp: PartitionOffsets(start[tp], end[tp], committed[tp]) for tp in tps}

  def record_offsets(self, bounds: dict[TopicPartition, tuple[int, int]]) -> dict:
    """tp -> RangeSet of the offsets in [start, end) that hold committed records."""
    found = {tp: RangeSet() for tp in bounds}
    for tp, offset, _value in self._scan(bounds):
      found[tp].add(offset)
    return found

  def values_at(self, tp: TopicPartition, ranges: RangeSet) -> Iterator[tuple[int, bytes]]:
    """(offset, value) of the records at the given offsets of one partition.

    Nearby ranges are read in one pass: a seek costs a fetch of up to a poll's worth of
    records, so scattered single offsets (later copies of events) would cost more apart.
    """
    for start, end in scan_windows(ranges.ranges(), _SCAN_MERGE_GAP):
      for _tp, offset, value in self._scan({tp: (start, end)}):
        if offset in ranges:
          yield offset, value

  def _scan(self, bounds: dict) -> Iterator[tuple[TopicPartition, int, bytes | None]]:
    todo = {tp: (s, e) for tp, (s, e) in bounds.items() if s < e}
    c = self._consumer
    c.assign(list(todo))
    for tp, (start, _end) in todo.items():
      c.seek(tp, start)
    last_move = {tp: (start, time.monotonic()) for tp, (start, _e) in todo.items()}
    try:
      while todo:
        for tp, records in c.poll(timeout_ms=500).items():
          if tp not in todo:
            continue
          end = todo[tp][1]
          for r in records:
            if r.offset >= end:
              break
            yield tp, r.offset, r.value
        self._retire_done(todo, last_move)
    finally:
      c.assign([])

  def _retire_done(self, todo: dict, last_move: dict) -> None:
    now = time.monotonic()
    for tp in list(todo):
      position = self._consumer.position(tp)
      if position >= todo[tp][1]:
        del todo[tp]
        self._consumer.pause(tp)
      elif position != last_move[tp][0]:
        last_move[tp] = (position, now)
      elif now - last_move[tp][1] > STALL_DEADLINE_S:
        raise KafkaAuditError(
          f"{tp.topic}-{tp.partition}: stuck at offset {position} for {STALL_DEADLINE_S:.0f}s "
          f"while reading to {todo[tp][1]}"
        )


def scan_windows(ranges: list[tuple[int, int]], merge_gap: int) -> list[tuple[int, int]]:
  """Sorted ranges -> fewer ranges covering them, merging neighbours less than merge_gap apart."""
  out: list[list[int]] = []
  for start, end in ranges:
    if out and start - out[-1][1] < merge_gap:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [(s, e) for s, e in out]


class EventIds:
  """event_id of a record's value: JSON, or Confluent-framed Avro with a schema registry."""

  def __init__(self, schema_registry_url: str | None = None):
    self._registry_url = schema_registry_url
    self._registry = None
    self._schemas: dict = {}

  def of(self, value: bytes | None) -> str | None:
    if not value:
      return None
    try:
      if value[:1] == b"\x00" and len(value) > 5 and self._registry_url:
        event = self._avro(value)
      else:
        event = json.loads(value)
    except Exception as e:  # noqa: BLE001 - an undecodable record simply has no event_id
      _LOGGER.debug("no event_id in a record: %s", e)
      return None
    eid = event.get("event_id") if isinstance(event, dict) else None
    return str(eid) if isinstance(eid, (str, int)) and not isinstance(eid, bool) else None

  def _avro(self, value: bytes) -> object:
    import fastavro

    schema_id = struct.unpack(">I", value[1:5])[0]
    parsed = self._schemas.get(schema_id)
    if parsed is None:
      if self._registry is None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._registry = SchemaRegistryClient({"url": self._registry_url})
      schema = self._registry.get_schema(schema_id)
      parsed = self._schemas[schema_id] = fastavro.parse_schema(json.loads(schema.schema_str))
    return fastavro.schemaless_reader(io.BytesIO(value[5:]), parsed)
