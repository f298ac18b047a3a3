"""Unit tests of the audit's comparison (tools/audit.py): pure logic, no broker, no sink."""

from __future__ import annotations

import json

from tools import audit
from tools.audit import PartitionReport
from tools.audit_kafka import EventIds
from tools.audit_sink import Coordinate
from tools.ranges import RangeSet


def _rep(log_start=0, end=20, committed=20, records=((0, 20),)) -> PartitionReport:
  rep = PartitionReport("t", 0, log_start, end, committed)
  rep.records = RangeSet(records)
  return rep


def test_sink_rows_fold_into_present_doubled_and_out_of_range_counts():
  rep = _rep(log_start=5, end=20)
  rows = [
    ("t", 0, 3, "sensor_readings"),  # below the log start
    ("t", 0, 5, "sensor_readings"),
    ("t", 0, 6, "dead_letters"),
    ("t", 0, 6, "sensor_readings"),  # doubled across tables
    ("t", 0, 7, "meter_readings"),
    ("t", 0, 7, "meter_readings"),
    ("t", 0, 7, "dead_letters"),  # three rows at one offset
    ("t", 0, 8, "dead_letters:duplicate"),
    ("t", 0, 25, "sensor_readings"),  # past the end
    ("t", 9, 1, "sensor_readings"),
  ]  # a partition Kafka does not have
  unknown = audit.absorb_sink_rows({("t", 0): rep}, rows)
  assert unknown == {"t-9": 1}
  assert rep.present.ranges() == [(3, 4), (5, 9), (25, 26)]
  assert rep.doubled.ranges() == [(6, 8)]
  assert rep.doubled_rows == 3
  assert [o for o, _ in rep.doubled_examples] == [6, 7]
  assert sorted(rep.doubled_examples[1][1]) == ["dead_letters", "meter_readings", "meter_readings"]
  assert (rep.below_log_start, rep.beyond_end, rep.duplicate_events) == (1, 1, 1)


def test_classify_splits_missing_and_pending_at_the_committed_offset():
  rep = _rep(committed=10)
  rep.present = RangeSet([(0, 4), (5, 12)])
  audit.classify(rep, strict=False)
  assert rep.missing.ranges() == [(4, 5)]
  assert rep.pending.ranges() == [(12, 20)]
  assert rep.committed_ahead and not rep.ok
  audit.classify(rep, strict=True)
  assert rep.missing.ranges() == [(4, 5), (12, 20)] and not rep.pending


def test_without_a_committed_offset_everything_lacking_is_pending():
  rep = _rep(committed=None)
  rep.present = RangeSet([(0, 10)])
  audit.classify(rep, strict=False)
  assert (rep.missing.ranges(), rep.pending.ranges()) == ([], [(10, 20)])
  assert rep.ok and not rep.committed_ahead


def test_rows_at_offsets_without_records_are_not_records_and_fail():
  rep = _rep(records=((0, 5), (6, 9), (11, 20)))  # 5, 9, 10: markers or aborted records
  rep.present = RangeSet([(0, 20)])
  audit.classify(rep, strict=True)
  assert rep.not_records.ranges() == [(5, 6), (9, 11)]
  assert not rep.missing and not rep.ok


def test_a_committed_offset_past_the_end_is_ahead_even_with_nothing_missing():
  rep = _rep(end=20, committed=25)
  rep.present = RangeSet([(0, 20)])
  audit.classify(rep, strict=False)
  assert not rep.missing and rep.committed_ahead and not rep.ok


class _FakeSink:
  def __init__(self, stored: dict):
    self.stored = stored
    self.asked: list = []

  def where_event_ids(self, ids):
    ids = list(ids)
    self.asked.append(ids)
    return {i: self.stored[i] for i in ids if i in self.stored}


def test_lacking_records_whose_event_id_is_stored_elsewhere_are_duplicate_events():
  rep = _rep(committed=10)
  rep.present = RangeSet([(0, 3), (5, 12)])
  audit.classify(rep, strict=False)  # missing 3, 4; pending 12..19
  values = [
    (3, json.dumps({"event_id": "a"}).encode()),
    (4, b"not json"),
    (12, json.dumps({"event_id": "b"}).encode()),
    (13, json.dumps({"event_id": "zz"}).encode()),
  ]
  sink = _FakeSink({"a": [Coordinate("t", 0, 1)], "b": [Coordinate("u", 2, 7)]})
  audit.explain_duplicates(rep, values, EventIds(), sink)
  assert rep.missing.ranges() == [(4, 5)]
  assert rep.pending.ranges() == [(13, 20)]
  assert rep.duplicate_events == 2
  assert rep.duplicate_examples == [[3, "a", "t-0@1"], [12, "b", "u-2@7"]]
  assert sink.asked == [["a", "b", "zz"]]


def test_event_ids_of_json_values_only_when_they_are_strings_or_numbers():
  ids = EventIds()
  assert ids.of(b'{"event_id": "x-1"}') == "x-1"
  assert ids.of(b'{"event_id": 17}') == "17"
  for value in (
    None,
    b"",
    b"[1]",
    b'{"event_id": true}',
    b'{"event_id": {"a": 1}}',
    b"\xff\x00",
    b'{"other": 1}',
  ):
    assert ids.of(value) is None, value


def test_reports_serialise_and_read_as_sentences():
  rep = _rep(committed=15)
  rep.present = RangeSet([(0, 3), (4, 12), (14, 20)])
  audit.classify(rep, strict=False)
  report = audit.AuditReport("sqlite:///x.db", "127.0.0.1:1", "g", False, partitions=[rep])
  j = report.to_json()
  assert j["ok"] is False and j["totals"]["missing"] == 3 and j["totals"]["committed_ahead"] == 1
  assert json.loads(json.dumps(j)) == j
  text = audit.format_report(report)
  assert "t-0: 3 missing from the sink: 3, 12-13 (first missing: 3, 12, 13)" in text
  assert "committed offset 15 is ahead of the sink" in text
  assert text.splitlines()[-1].startswith("FAILED: 20 records, 17 in the sink; missing 3")


def test_scattered_offsets_are_read_in_few_passes():
  from tools.audit_kafka import scan_windows

  assert scan_windows([(1, 2), (10, 11), (9000, 9001), (9500, 9600)], 5000) == [
    (1, 11),
    (9000, 9600),
  ]
  assert scan_windows([], 5000) == []
  assert scan_windows([(0, 5), (5000, 5001)], 4995) == [(0, 5), (5000, 5001)]
  assert scan_windows([(0, 5), (5000, 5001)], 4996) == [(0, 5001)]


def test_rows_of_a_partition_kafka_lacks_fail_the_audit():
  report = audit.AuditReport(
    "s", "b", "g", False, partitions=[_rep()], unknown_partitions={"t-7": 3}
  )
  report.partitions[0].present = RangeSet([(0, 20)])
  assert not report.ok
  assert "3 rows of partition t-7, which Kafka does not have" in audit.format_report(report)


def test_event_ids_of_confluent_framed_avro_through_the_registry():
  import io
  import struct

  import fastavro

  schema = {
    "type": "record",
    "name": "MeterReading",
    "namespace": "com.smartgrid.analytics",
    "fields": [{"name": "event_id", "type": "string"}, {"name": "reading", "type": "double"}],
  }
  body = io.BytesIO()
  fastavro.schemaless_writer(
    body, fastavro.parse_schema(schema), {"event_id": "m-1", "reading": 2.5}
  )
  value = b"\x00" + struct.pack(">I", 7) + body.getvalue()

  class _Registry:  # stands in for confluent_kafka's SchemaRegistryClient
    calls = 0

    def get_schema(self, schema_id):
      assert schema_id == 7
      _Registry.calls += 1
      return type("Schema", (), {"schema_str": json.dumps(schema)})()

  ids = EventIds("http://registry.invalid")
  ids._registry = _Registry()
  assert ids.of(value) == ids.of(value) == "m-1"
  assert _Registry.calls == 1  # cached by id
  assert EventIds().of(value) is None  # no registry: not JSON, no event_id
