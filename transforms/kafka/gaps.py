"""Offsets that hold no record to deliver: empty ranges and offset gaps.

The reader accounts for every offset it moves past. Records carry ``covers_from``;
what no record covers leaves the reader as an ``OffsetGap`` on its ``gaps`` output:

- ``empty``: offsets the broker returned no record for although they exist
  (transaction commit/abort markers, aborted records under read_committed,
  compacted records) after the last record of a read. Nothing is lost there, so
  they are acked as they are; without that a trailing commit marker would never be
  committed, and an idle streaming run would start an empty round forever.
  An empty range of length 0 is an idle reader's heartbeat (about once a minute): it
  acks nothing, but lets ``CommitOffsets`` re-commit an unchanged offset before the
  broker's ``offsets.retention.minutes`` expires it.
- ``offset_gap``: offsets deleted before they were read (retention, delete_records)
  or a committed offset past the end of a recreated topic. With
  ``--on_offset_gap=fail`` (the default) the run stops naming the partition, the
  offsets and the choices; with ``skip`` the range is recorded in the sink as a
  dead letter (reason ``offset_gap``, at the first skipped offset) before it is
  committed, so a gap is never hidden.
"""

from __future__ import annotations

from typing import NamedTuple

from transforms.acks import Ack

EMPTY = "empty"
OFFSET_GAP = "offset_gap"
GAP_POLICIES = ("fail", "skip")


class OffsetGap(NamedTuple):
  topic: str
  partition: int
  start: int  # inclusive
  end: int  # exclusive
  kind: str  # EMPTY | OFFSET_GAP
  detail: str = ""


class OffsetGapError(RuntimeError):
  """A committed or expected offset no longer exists; the message names the choices."""


def gap_message(topic: str, partition: int, expected: int, log_start: int, log_end: int) -> str:
  """One line naming the partition, the offsets and what the user can do."""
  if expected > log_end:
    what = (
      f"offset {expected} is past the partition's end offset {log_end} (was the topic "
      f"deleted and recreated?)"
    )
  else:
    what = (
      f"offsets [{expected}, {log_start}) were deleted (retention or delete_records) "
      f"before they were read; the log now starts at {log_start}"
    )
  return (
    f"{topic}-{partition}: {what}. Choices: --on_offset_gap=skip (continue and record the "
    f"skipped range as an 'offset_gap' dead letter), --start=earliest|latest|<timestamp>, "
    f"or reset the group's offsets; default --on_offset_gap=fail stops here"
  )


def check_start(
  topic: str, partition: int, start: int, log_start: int, log_end: int, policy: str
) -> int:
  """The offset a read resolved to ``start`` may begin at, given the log's bounds.

  fail: a start outside [log_start, log_end] raises OffsetGapError. skip: a start
  below the log start is kept (the reader meets the gap and records it); a start past
  the end (a recreated topic) moves to the new log start, so no record of the new
  topic is skipped.
  """
  if log_start <= start <= log_end:
    return start
  if policy != "skip":
    raise OffsetGapError(gap_message(topic, partition, start, log_start, log_end))
  return start if start < log_start else log_start


def covered_acks(gap: OffsetGap) -> list[Ack]:
  """What CommitOffsets may count as delivered for a gap without the sink's help.

  An empty range entirely; an offset gap all but its first offset, which is acked by
  the sink once the gap's dead letter (at that offset) is written.
  """
  if gap.kind == EMPTY and gap.start == gap.end:  # an idle reader's heartbeat: acks nothing
    return [Ack(gap.topic, gap.partition, gap.start, gap.end)]
  start = gap.start + 1 if gap.kind == OFFSET_GAP else gap.start
  return [Ack(gap.topic, gap.partition, start, gap.end)] if start < gap.end else []
