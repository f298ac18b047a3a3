"""Where a read starts and stops: option parsing (pure) and resolution against the broker.

Start: ``'committed'`` (the group's committed offset, else the earliest), ``'earliest'``,
``'latest'``, a timestamp (``datetime``, ISO-8601 text or epoch milliseconds; the first
offset stamped at or after it), or ``{(topic, partition): offset}`` (as text
``TOPIC@PARTITION=OFFSET[,...]``; partitions not listed start from ``'committed'``).

Stop: ``None`` (unbounded), ``'end'`` (the end offsets seen when the read starts: batch),
or a timestamp (the first record stamped at or after it is not read).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from transforms.kafka.gaps import check_start, gap_message
from transforms.kafka.records import PartitionRead

_LOGGER = logging.getLogger(__name__)

START_KEYWORDS = ("committed", "earliest", "latest")


@dataclass(frozen=True)
class StartPosition:
  kind: str  # committed | earliest | latest | timestamp | offsets
  timestamp_ms: int | None = None
  offsets: tuple = ()  # ((topic, partition, offset), ...)


@dataclass(frozen=True)
class StopPosition:
  """never | end | timestamp | offsets ({(topic, partition): stop}, the rest: end).

  ``max_records`` caps every partition's read at that many offsets past its start
  (a bounded slice of a larger read: the launcher's rounds).
  """

  kind: str
  timestamp_ms: int | None = None
  offsets: tuple = ()  # ((topic, partition, stop offset), ...)
  max_records: int | None = None

  @property
  def is_bounded(self) -> bool:
    """Every partition gets a stop offset when the read starts (a batch read)."""
    return self.kind in ("end", "offsets")


def to_epoch_ms(value: Any, what: str) -> int:
  """datetime, ISO-8601 text (naive means UTC) or epoch milliseconds -> epoch ms."""
  if isinstance(value, bool):
    raise ValueError(f"{what}: not a timestamp: {value!r}")
  if isinstance(value, (int, float)):
    return int(value)
  if isinstance(value, str):
    text = value.strip()
    if text.lstrip("-").isdigit():
      return int(text)
    try:
      value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
      raise ValueError(
        f"{what}: {value!r} is neither a keyword, ISO-8601 time nor epoch ms"
      ) from None
  if isinstance(value, dt.datetime):
    if value.tzinfo is None:
      value = value.replace(tzinfo=dt.timezone.utc)
    return int(value.timestamp() * 1000)
  raise ValueError(f"{what}: unsupported value {value!r}")


def _parse_offsets_text(text: str) -> dict:
  """'TOPIC@PARTITION=OFFSET[,...]' -> {(topic, partition): offset} ('@' is in no topic
  name and no timestamp)."""
  out = {}
  for item in text.split(","):
    try:
      where, offset = item.strip().rsplit("=", 1)
      topic, partition = where.rsplit("@", 1)
      out[(topic, int(partition))] = int(offset)
    except ValueError:
      raise ValueError(
        f"start: expected TOPIC@PARTITION=OFFSET[,...], got {item.strip()!r}"
      ) from None
  return out


def parse_start(start: Any) -> StartPosition:
  if isinstance(start, StartPosition):
    return start
  if isinstance(start, str) and start.strip().lower() in START_KEYWORDS:
    return StartPosition(start.strip().lower())
  if isinstance(start, str) and "@" in start:
    start = _parse_offsets_text(start)
  if isinstance(start, Mapping):
    offsets = []
    for key, offset in start.items():
      try:
        topic, partition = key
        offsets.append((str(topic), int(partition), int(offset)))
      except (TypeError, ValueError):
        raise ValueError(
          f"start: expected {{(topic, partition): offset}}, got {key!r}: {offset!r}"
        ) from None
      if int(offset) < 0:
        raise ValueError(f"start: negative offset {offset} for {key}")
    return StartPosition("offsets", offsets=tuple(sorted(offsets)))
  return StartPosition(
    "timestamp",
    timestamp_ms=to_epoch_ms(
      start, "start (committed|earliest|latest|timestamp|{(topic, partition): offset})"
    ),
  )


def parse_stop(stop: Any) -> StopPosition:
  if isinstance(stop, StopPosition):
    return stop
  if stop is None or (isinstance(stop, str) and stop.strip().lower() in ("", "never", "none")):
    return StopPosition("never")
  if isinstance(stop, str) and stop.strip().lower() == "end":
    return StopPosition("end")
  return StopPosition("timestamp", timestamp_ms=to_epoch_ms(stop, "stop (end|never|timestamp)"))


def resolve(
  consumer,
  partitions: Iterable[tuple[str, int]],
  start: StartPosition,
  stop: StopPosition,
  on_offset_gap: str = "fail",
) -> list[PartitionRead]:
  """Turns positions into concrete offsets with a live kafka-python consumer.

  A start outside the log (deleted by retention, or past the end of a recreated
  topic) follows ``on_offset_gap`` (``gaps.check_start``): never a silent clamp.
  """
  from kafka import TopicPartition

  tps = [TopicPartition(t, p) for t, p in partitions]
  if not tps:
    return []
  beginning = consumer.beginning_offsets(tps)
  end = consumer.end_offsets(tps)
  starts = _start_offsets(consumer, tps, start, beginning, end)
  reads = []
  for tp in tps:
    offset = check_start(tp.topic, tp.partition, starts[tp], beginning[tp], end[tp], on_offset_gap)
    if offset != starts[tp]:
      _LOGGER.warning(
        "%s (--on_offset_gap=skip: reading from %d)",
        gap_message(tp.topic, tp.partition, starts[tp], beginning[tp], end[tp]),
        offset,
      )
    stop_offset, stop_ts = _stop_offset(consumer, tp, stop, offset, end[tp])
    reads.append(PartitionRead(tp.topic, tp.partition, offset, stop_offset, stop_ts))
  return reads


def _start_offsets(consumer, tps: list, start: StartPosition, beginning: dict, end: dict) -> dict:
  """TopicPartition -> the offset the start position names (before the gap check)."""
  from kafka import TopicPartition

  if start.kind == "earliest":
    return dict(beginning)
  if start.kind == "latest":
    return dict(end)
  if start.kind == "timestamp":
    found = consumer.offsets_for_times({tp: start.timestamp_ms for tp in tps})
    return {tp: (found[tp].offset if found.get(tp) else end[tp]) for tp in tps}
  # committed, or explicit offsets with 'committed' for the partitions not listed
  explicit = {TopicPartition(t, p): o for t, p, o in start.offsets}
  # Without a group nothing is committed (and kafka-python's committed() raises).
  has_group = getattr(consumer, "config", {}).get("group_id") is not None
  starts = {}
  for tp in tps:
    if tp in explicit:
      starts[tp] = explicit[tp]
    else:
      committed = consumer.committed(tp) if has_group else None
      starts[tp] = beginning[tp] if committed is None else committed
  return starts


def _stop_offset(consumer, tp, stop: StopPosition, offset: int, end: int) -> tuple:
  """(stop offset or None, stop timestamp or None) of one partition read from offset."""
  stop_offset = stop_ts = None
  if stop.kind == "end":
    stop_offset = max(end, offset)
  elif stop.kind == "offsets":
    listed = {(t, p): o for t, p, o in stop.offsets}
    stop_offset = max(listed.get((tp.topic, tp.partition), end), offset)
  elif stop.kind == "timestamp":
    found = consumer.offsets_for_times({tp: stop.timestamp_ms}).get(tp)
    if found is not None:
      stop_offset = max(found.offset, offset)
    else:
      stop_ts = stop.timestamp_ms  # not written yet: stop when a record reaches it
  if stop.max_records is not None:
    capped = offset + stop.max_records
    stop_offset = capped if stop_offset is None else min(stop_offset, capped)
  return stop_offset, stop_ts
