"""``./run_pipeline.sh audit [pipeline options] [--strict] [--json]``: the sink against Kafka.

Checks, partition by partition and offset by offset, that the sink (SQLite or BigQuery)
holds every record of the two topics exactly once, and that the consumer group never
committed past what the sink holds. It reads the topics with ``read_committed`` (records
of aborted transactions and markers are not expected in the sink) and the sink's
coordinates from the union of ``sensor_readings``, ``meter_readings`` and ``dead_letters``.

Per partition it reports:
- missing: records below the committed offset that the sink lacks, as ranges, naming the
  first ones; the committed offset is then ahead of the sink (also when it is past the end);
- pending: records at or past the committed offset not in the sink yet (not an error; with
  ``--strict`` they are missing);
- doubled: coordinates held by two rows (in one table or across tables);
- not records: sink rows at offsets that hold no committed record (aborted, markers);
- duplicate events: records whose event_id the sink holds at other coordinates (a later copy
  of one event: expected, counted, not an error), and dead letters with a duplicate reason;
- recorded gaps: ``offset_gap`` dead letters (ranges skipped with ``--on_offset_gap=skip``).

Exit 0 only when nothing is missing, doubled, committed ahead, or held that is not a record.
Order of reads: committed offsets, then end offsets, then the sink, then the records, so an
audit of a running pipeline never reports a false "committed ahead".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from tools.ranges import RangeSet, format_ranges

_LOGGER = logging.getLogger(__name__)
_EXAMPLES = 10  # first offsets named per finding
_EVENT_ID_BATCH = 5000


@dataclass
class PartitionReport:
  topic: str
  partition: int
  log_start: int
  end: int
  committed: int | None
  records: RangeSet = field(default_factory=RangeSet)
  present: RangeSet = field(default_factory=RangeSet)  # distinct offsets the sink holds
  doubled: RangeSet = field(default_factory=RangeSet)
  doubled_rows: int = 0  # rows beyond the first at doubled coordinates
  doubled_examples: list = field(default_factory=list)  # (offset, [tables])
  missing: RangeSet = field(default_factory=RangeSet)
  pending: RangeSet = field(default_factory=RangeSet)
  not_records: RangeSet = field(default_factory=RangeSet)
  beyond_end: int = 0  # sink rows past the end offset read at the audit's start
  below_log_start: int = 0  # sink rows below the log start (deleted by retention: unverifiable)
  duplicate_events: int = 0
  duplicate_examples: list = field(default_factory=list)  # (offset, event_id, stored at)
  gaps: list = field(default_factory=list)  # (offset, error)

  @property
  def name(self) -> str:
    return f"{self.topic}-{self.partition}"

  @property
  def committed_ahead(self) -> bool:
    """A record below the committed offset is missing, or the committed offset is past the end."""
    if self.committed is None:
      return False
    return self.committed > self.end or bool(self.missing.clip(None, self.committed))

  @property
  def ok(self) -> bool:
    return not (self.missing or self.doubled or self.committed_ahead or self.not_records)

  def to_json(self) -> dict:
    return {
      "topic": self.topic,
      "partition": self.partition,
      "log_start": self.log_start,
      "end": self.end,
      "committed": self.committed,
      "records": len(self.records),
      "in_sink": len(self.present.clip(self.log_start, self.end)),
      "missing": len(self.missing),
      "missing_ranges": _listed(self.missing),
      "first_missing": self.missing.head(_EXAMPLES),
      "pending": len(self.pending),
      "pending_ranges": _listed(self.pending),
      "doubled": len(self.doubled),
      "doubled_rows": self.doubled_rows,
      "doubled_examples": [[o, sorted(k)] for o, k in self.doubled_examples],
      "committed_ahead": self.committed_ahead,
      "not_records": len(self.not_records),
      "not_record_ranges": _listed(self.not_records),
      "beyond_end": self.beyond_end,
      "below_log_start": self.below_log_start,
      "duplicate_events": self.duplicate_events,
      "duplicate_examples": self.duplicate_examples,
      "recorded_gaps": [{"offset": o, "error": e} for o, e in self.gaps],
      "ok": self.ok,
    }


def _listed(rs: RangeSet, limit: int = 1000) -> list:
  return [[s, e] for s, e in rs.ranges()[:limit]]


@dataclass
class AuditReport:
  sink: str
  bootstrap: str
  group: str
  strict: bool
  partitions: list = field(default_factory=list)
  missing_topics: list = field(default_factory=list)
  other_topics: dict = field(default_factory=dict)
  unknown_partitions: dict = field(default_factory=dict)  # sink rows of partitions Kafka lacks
  repeated_event_ids: int = 0

  def total(self, attr: str) -> int:
    values = (getattr(p, attr) for p in self.partitions)
    return sum(v if isinstance(v, int) else len(v) for v in values)

  @property
  def ok(self) -> bool:
    return all(p.ok for p in self.partitions) and not self.unknown_partitions

  def to_json(self) -> dict:
    totals = {
      k: self.total(k)
      for k in (
        "records",
        "missing",
        "pending",
        "doubled",
        "doubled_rows",
        "not_records",
        "duplicate_events",
        "beyond_end",
        "below_log_start",
      )
    }
    totals["in_sink"] = sum(len(p.present.clip(p.log_start, p.end)) for p in self.partitions)
    totals["committed_ahead"] = sum(p.committed_ahead for p in self.partitions)
    totals["recorded_gaps"] = sum(len(p.gaps) for p in self.partitions)
    return {
      "sink": self.sink,
      "bootstrap_servers": self.bootstrap,
      "group_id": self.group,
      "strict": self.strict,
      "ok": self.ok,
      "totals": totals,
      "missing_topics": self.missing_topics,
      "other_topics": self.other_topics,
      "unknown_partitions": self.unknown_partitions,
      "repeated_event_ids": self.repeated_event_ids,
      "partitions": [p.to_json() for p in self.partitions],
    }


# ---------------------------------------------------------------------------
# The comparison (pure: sink rows and record ranges in, findings out)


def absorb_sink_rows(reports: dict, rows: Iterable[tuple]) -> dict[str, int]:
  """Folds the sink's ordered (topic, partition, offset, kind) rows into the reports.

  Returns {'topic-partition': rows} for rows of audited topics' partitions Kafka lacks.
  """
  unknown: dict[str, int] = {}
  prev = None
  kinds: list = []
  for topic, partition, offset, kind in rows:
    key = (topic, partition)
    rep = reports.get(key)
    if rep is None:
      unknown[f"{topic}-{partition}"] = unknown.get(f"{topic}-{partition}", 0) + 1
      continue
    if (key, offset) == prev:
      kinds.append(kind)
      if len(kinds) == 2:
        rep.doubled.add(offset)
      rep.doubled_rows += 1
      if len(rep.doubled_examples) < _EXAMPLES and len(kinds) == 2:
        rep.doubled_examples.append([offset, kinds])
      continue
    prev, kinds = (key, offset), [kind]
    if kind.endswith(":duplicate"):
      rep.duplicate_events += 1
    if offset < rep.log_start:
      rep.below_log_start += 1
    elif offset >= rep.end:
      rep.beyond_end += 1
    rep.present.add(offset)
  return unknown


def classify(rep: PartitionReport, strict: bool) -> None:
  """records vs present -> missing, pending and not_records (before event_id matching)."""
  lacking = rep.records.difference(rep.present)
  if strict or rep.committed is None:
    below, above = (lacking, RangeSet()) if strict else (RangeSet(), lacking)
  else:
    below, above = lacking.clip(None, rep.committed), lacking.clip(rep.committed, None)
  rep.missing, rep.pending = below, above
  rep.not_records = rep.present.clip(rep.log_start, rep.end).difference(rep.records)


def explain_duplicates(
  rep: PartitionReport, values: Iterable[tuple[int, bytes]], event_ids, sink
) -> None:
  """Moves missing/pending offsets whose event_id the sink holds elsewhere to duplicate_events.

  ``values`` are (offset, value) of records the sink lacks, so any reading row with the
  same event_id is necessarily at other coordinates: this record is a later copy.
  """
  batch: dict[str, list[int]] = {}

  def flush() -> None:
    found = sink.where_event_ids(batch)
    explained = RangeSet()
    for eid, offsets in batch.items():
      stored = found.get(eid)
      if not stored:
        continue
      for offset in offsets:
        explained.add(offset)
        if len(rep.duplicate_examples) < _EXAMPLES:
          c = stored[0]
          rep.duplicate_examples.append([offset, eid, f"{c.topic}-{c.partition}@{c.offset}"])
    rep.duplicate_events += len(explained)
    rep.missing = rep.missing.difference(explained)
    rep.pending = rep.pending.difference(explained)
    batch.clear()

  for offset, value in values:
    eid = event_ids.of(value)
    if eid is not None:
      batch.setdefault(eid, []).append(offset)
    if len(batch) >= _EVENT_ID_BATCH:
      flush()
  if batch:
    flush()


# ---------------------------------------------------------------------------
# Running it


def run_audit(o, strict: bool = False) -> AuditReport:
  """Audits the sink and group of SmartGridOptions ``o``; raises on unreadable sources."""
  from pipelines.smartgrid import kafka_client_config
  from tools.audit_kafka import EventIds, KafkaView
  from tools.audit_sink import open_sink

  topics = [o.sensor_topic, o.meter_topic]
  report = AuditReport(o.sink, o.bootstrap_servers, o.group_id, strict)
  view = KafkaView(kafka_client_config(o))
  try:
    tps, report.missing_topics = view.partitions(topics)
    offsets = view.offsets(tps)
    sink = open_sink(o.sink, o.bigquery_api_endpoint)
    try:
      reps = {
        (tp.topic, tp.partition): PartitionReport(
          tp.topic, tp.partition, po.log_start, po.end, po.committed
        )
        for tp, po in offsets.items()
      }
      report.unknown_partitions = absorb_sink_rows(reps, sink.coordinates(topics))
      report.other_topics = sink.other_topics(topics)
      for gap in sink.recorded_gaps(topics):
        rep = reps.get((gap.topic, gap.partition))
        if rep is not None:
          rep.gaps.append((gap.offset, gap.error))
      records = view.record_offsets({tp: (po.log_start, po.end) for tp, po in offsets.items()})
      event_ids = EventIds(getattr(o, "schema_registry_url", None))
      for tp in tps:
        rep = reps[(tp.topic, tp.partition)]
        rep.records = records[tp]
        classify(rep, strict)
        lacking = RangeSet(rep.missing.ranges() + rep.pending.ranges())
        if lacking:
          explain_duplicates(rep, view.values_at(tp, lacking), event_ids, sink)
      report.repeated_event_ids = sink.repeated_event_ids()
      report.partitions = [reps[k] for k in sorted(reps)]
    finally:
      sink.close()
  finally:
    view.close()
  return report


def format_report(r: AuditReport) -> str:
  """The human report: a table per partition, then each finding in a sentence."""
  head = (
    f"Audit of {r.sink} against {r.bootstrap} (read_committed), group {r.group}"
    f"{' [strict]' if r.strict else ''}"
  )
  cols = (
    "partition",
    "log start",
    "committed",
    "end",
    "records",
    "in sink",
    "missing",
    "pending",
    "doubled",
    "not rec.",
    "dup events",
  )
  rows = [
    [
      p.name,
      p.log_start,
      "-" if p.committed is None else p.committed,
      p.end,
      len(p.records),
      len(p.present.clip(p.log_start, p.end)),
      len(p.missing),
      len(p.pending),
      len(p.doubled),
      len(p.not_records),
      p.duplicate_events,
    ]
    for p in r.partitions
  ]
  widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
  lines = [head, "  " + "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))]
  lines += ["  " + "  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines += _findings(r)
  j = r.to_json()["totals"]
  verdict = "OK" if r.ok else "FAILED"
  lines.append(
    f"{verdict}: {j['records']} records, {j['in_sink']} in the sink; missing "
    f"{j['missing']}, doubled {j['doubled']}, committed ahead in "
    f"{j['committed_ahead']} partition(s), not records {j['not_records']}; pending "
    f"{j['pending']}, duplicate events {j['duplicate_events']}, recorded gaps "
    f"{j['recorded_gaps']}."
  )
  return "\n".join(lines)


def _findings(r: AuditReport) -> list[str]:
  out = []
  for t in r.missing_topics:
    out.append(f"  topic {t} does not exist: nothing of it can be checked")
  for p in r.partitions:
    if p.missing:
      out.append(
        f"  {p.name}: {len(p.missing)} missing from the sink: "
        f"{format_ranges(p.missing.ranges())} (first missing: "
        f"{', '.join(map(str, p.missing.head(_EXAMPLES)))})"
      )
    if p.committed_ahead:
      why = (
        f"past the end offset {p.end}"
        if p.committed > p.end
        else f"the sink lacks {len(p.missing.clip(None, p.committed))} records below it "
        f"(first: {p.missing.first()})"
      )
      out.append(f"  {p.name}: committed offset {p.committed} is ahead of the sink: {why}")
    if p.doubled:
      ex = "; ".join(f"{o} in {' and '.join(sorted(k))}" for o, k in p.doubled_examples[:3])
      out.append(
        f"  {p.name}: {len(p.doubled)} offsets held by more than one row "
        f"({p.doubled_rows} extra rows): {format_ranges(p.doubled.ranges())} (e.g. {ex})"
      )
    if p.not_records:
      out.append(
        f"  {p.name}: {len(p.not_records)} sink rows at offsets that hold no committed "
        f"record (aborted transaction, marker): {format_ranges(p.not_records.ranges())}"
      )
    if p.pending:
      out.append(
        f"  {p.name}: {len(p.pending)} records at or past the committed offset are not in "
        f"the sink yet: pending, not missing ({format_ranges(p.pending.ranges(), 3)}); "
        "--strict counts them as missing"
      )
    if p.beyond_end:
      out.append(
        f"  {p.name}: {p.beyond_end} sink rows past the end offset {p.end} read at the "
        "audit's start (written meanwhile, or the topic was recreated)"
      )
    if p.below_log_start:
      out.append(
        f"  {p.name}: {p.below_log_start} sink rows below the log start {p.log_start} "
        "(deleted by retention; not checked)"
      )
    for offset, error in p.gaps:
      out.append(f"  {p.name}: recorded gap at {offset}: {error}")
    for offset, eid, where in p.duplicate_examples[:3]:
      out.append(f"  {p.name}: duplicate event at {offset}: event_id {eid} stored at {where}")
  for name, n in sorted(r.unknown_partitions.items()):
    out.append(f"  the sink holds {n} rows of partition {name}, which Kafka does not have")
  for name, n in sorted(r.other_topics.items()):
    out.append(f"  the sink holds {n} rows of {name}, which is not audited")
  if r.repeated_event_ids:
    out.append(f"  {r.repeated_event_ids} event_ids are stored in more than one reading row")
  return out


def parse_args(argv: list[str]):
  """(SmartGridOptions, strict, as_json); pipeline-only options are accepted and ignored."""
  from apache_beam.options.pipeline_options import PipelineOptions

  from pipelines.options import SmartGridOptions, validate

  own = argparse.ArgumentParser(add_help=False)
  own.add_argument("--strict", action="store_true")
  own.add_argument("--json", action="store_true")
  own.add_argument("-h", "--help", action="store_true")
  known, rest = own.parse_known_args(argv)
  if known.help:
    print(__doc__)
    print(
      "Options: --strict, --json, and the pipeline's (python -m runners.main --help): "
      "--bootstrap_servers, --sensor_topic, --meter_topic, --group_id, --sink, "
      "--bigquery_api_endpoint."
    )
    raise SystemExit(0)
  o = PipelineOptions(rest).view_as(SmartGridOptions)
  # The audit only reads (queries over REST): no write method, so no Storage Write endpoint.
  o.bigquery_write_method = "streaming_inserts"
  validate(o)
  return o, known.strict, known.json


def main(argv: list[str] | None = None) -> int:
  from kafka.errors import KafkaError

  from pipelines.options import OptionError
  from tools.audit_kafka import KafkaAuditError
  from tools.audit_sink import SinkError

  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    o, strict, as_json = parse_args(sys.argv[1:] if argv is None else argv)
    report = run_audit(o, strict)
  except (OptionError, SinkError, KafkaAuditError, KafkaError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report.to_json(), indent=1) if as_json else format_report(report))
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
