"""Unit tests of the row layout (``transforms.rows``): the accessors on rows the pipeline
really makes, the schema derived from the row types, tuple batch keys through Beam's
coders, and that nothing outside rows.py slices rows or splits keys any more."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from apache_beam.coders import typecoders
from apache_beam.typehints.native_type_compatibility import convert_to_beam_type

from tests.parse_support import (
  METER_TOPIC,
  jbytes,
  old_service_meter,
  old_service_sensor,
  parse_one,
)
from transforms import rows
from transforms.events import (
  DeadLetter,
  dead_letter_row,
  meter_row,
  parse_meter,
  parse_sensor,
  sensor_row,
)
from transforms.parse import key_dead_letters
from transforms.sinks import schema
from transforms.sinks.base import rejected_dead_letter_row

ROOT = Path(__file__).resolve().parents[1]
SENSOR = parse_sensor(
  jbytes(
    {
      "event_id": "e1",
      "sensor_id": "s1",
      "sensor_type": "voltage",
      "value": 230.5,
      "timestamp": "2024-01-15T10:30:00Z",
    }
  )
)
METER = parse_meter(
  jbytes(
    {
      "event_id": "m1",
      "meter_id": "m",
      "customer_id": "c",
      "reading": 7.5,
      "timestamp": "2024-01-15T10:30:00Z",
    }
  )
)


def _sensor(offset: int = 12, covers_from: int = 9) -> tuple:
  return sensor_row(SENSOR, 0, 60_000_000, False, "sensors", 3, offset, covers_from)


def test_accessors_read_the_kafka_coordinates_of_a_real_row():
  row = _sensor()
  assert rows.coordinates(row) == ("sensors", 3, 12)
  assert rows.partition_of(row) == ("sensors", 3)
  assert rows.offset_of(row) == 12
  assert rows.covers_from(row) == 9
  assert rows.ack_span(row) == ("sensors", 3, 9, 12)
  assert rows.stored(row) == row[: len(rows.SENSOR_ROW.columns)]
  assert len(rows.stored(row)) == len(rows.SENSOR_ROW.columns) == len(row) - 1


def test_every_row_builder_follows_its_row_type():
  dead = dead_letter_row(
    DeadLetter("t", 1, 5, 4, b"k", b"v", "not_json", "not_json: x", "parse", 0)
  )
  for row, row_type in (
    (_sensor(), rows.SENSOR_ROW),
    (meter_row(METER, 0, 60_000_000, True, "meters", 0, 2, 2), rows.METER_ROW),
    (dead, rows.DEAD_LETTER_ROW),
  ):
    assert len(row) == len(row_type.columns) + 1, row_type.table
    values = row_type.as_dict(row)
    assert (values["kafka_topic"], values["kafka_partition"]) == rows.partition_of(row)
    assert values["kafka_offset"] == rows.offset_of(row)
  assert rows.SENSOR_ROW.as_dict(_sensor())["sensor_id"] == "s1"
  assert rows.DEAD_LETTER_ROW.as_dict(dead)["reason"] == "not_json"
  assert rows.SENSOR_ROW.index("value") == 3 and _sensor()[rows.SENSOR_ROW.index("value")] == 230.5


def test_payload_leaves_out_the_kafka_columns_and_covers_from():
  payload = rows.SENSOR_ROW.payload(_sensor())
  assert list(payload) == list(rows.SENSOR_ROW.columns[:-3])
  assert payload["event_id"] == "e1" and "kafka_offset" not in payload


def test_the_parser_and_the_old_service_rows_read_by_name():
  sensor = rows.SENSOR_ROW.as_dict(parse_one(jbytes(old_service_sensor("s-9"))).row)
  assert sensor["sensor_id"] == "s-9" and sensor["kafka_topic"] == "sensor-t"
  meter = rows.METER_ROW.as_dict(parse_one(jbytes(old_service_meter()), METER_TOPIC).row)
  assert meter["meter_id"] == "meter_7" and meter["unit"] == "kWh"


def test_at_offset_moves_a_row_within_its_partition():
  row = _sensor(offset=12, covers_from=9)
  moved = rows.at_offset(row, 40)
  assert rows.coordinates(moved) == ("sensors", 3, 40) and rows.covers_from(moved) == 40
  assert rows.stored(moved)[:-1] == rows.stored(row)[:-1]  # only the offset changed
  assert rows.covers_from(rows.at_offset(row, 40, 35)) == 35


def test_the_schema_is_derived_from_the_row_types():
  assert set(schema.TABLES) == set(rows.ROW_TYPES)
  for name, table in schema.TABLES.items():
    assert table.names == (*rows.ROW_TYPES[name].columns, rows.WRITTEN_AT), name
  row = _sensor()
  assert schema.SENSOR_READINGS.row_dict(row, "W") == {
    **rows.SENSOR_ROW.as_dict(row),
    "written_at": "W",
  }


def test_a_row_type_or_table_that_disagrees_is_refused_at_import():
  with pytest.raises(ValueError, match="must end with"):
    rows.RowType("t", ("a", "kafka_offset"))
  with pytest.raises(ValueError, match=r"\['value'\]"):
    schema._table(
      rows.RowType("t", ("value", *rows.KAFKA_COLUMNS)),
      {},
      partition_column="x",
      cluster_columns=(),
    )


def test_batch_keys_are_table_shard_tuples():
  key, row = key_dead_letters(DeadLetter("t", 6, 5, 5, None, b"v", "not_json", "e", "parse", 0), 4)
  assert key == ("dead_letters", 2) == rows.batch_key(rows.DEAD_LETTERS_TABLE, 2)
  assert rows.key_table(key) == "dead_letters" and rows.coordinates(row) == ("t", 6, 5)
  assert parse_one(jbytes(old_service_sensor())).rows[0][0] == ("sensor_readings", 0)


def test_keyed_rows_get_a_deterministic_tuple_coder_that_round_trips():
  coder = typecoders.registry.get_coder(convert_to_beam_type(rows.KeyedRow))
  assert coder.is_deterministic() or coder.key_coder().is_deterministic()
  element = (("sensor_readings", 3), _sensor())
  assert coder.decode(coder.encode(element)) == element


def test_a_refused_row_becomes_a_dead_letter_at_its_own_coordinates():
  dead = rejected_dead_letter_row("sensor_readings", _sensor(12, 9), "bad value")
  assert rows.coordinates(dead) == ("sensors", 3, 12) and rows.covers_from(dead) == 9
  assert rows.DEAD_LETTER_ROW.as_dict(dead)["reason"] == "sink_rejected"


_SLICING = re.compile(
  r"\brows?\[(-\d|:-\d)|\br\[(-\d|:-\d)|\.split\(\"\|\"|\"\|\"\.join|\bkv\[1\]\[-"
)


def test_no_code_slices_rows_or_splits_keys_outside_rows_py():
  offenders = []
  for folder in ("transforms", "tools", "benchmarks", "tests", "pipelines"):
    for path in (ROOT / folder).rglob("*.py"):
      if path.name in ("rows.py", Path(__file__).name):
        continue
      for n, line in enumerate(path.read_text().splitlines(), 1):
        if _SLICING.search(line):
          offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
  assert offenders == [], "\n".join(offenders)


def _imports(module_path: Path) -> set:
  import ast

  found = set()
  for node in ast.walk(ast.parse(module_path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
  return found


@pytest.mark.parametrize(
  "module, forbidden",
  [
    ("transforms/parse.py", ("transforms.sinks",)),
    ("transforms/events.py", ("transforms.sinks", "transforms.parse")),
    ("transforms/commit.py", ("transforms.sinks", "transforms.kafka.read")),
    ("transforms/acks.py", ("transforms.sinks",)),
    ("transforms/sinks/base.py", ("transforms.kafka",)),
    ("transforms/rows.py", ("transforms", "apache_beam")),
    ("transforms/retry.py", ("transforms", "apache_beam")),
    ("transforms/kafka/client.py", ("transforms.kafka.read", "transforms.sinks", "apache_beam")),
  ],
)
def test_imports_follow_the_flow(module, forbidden):
  bad = {m for m in _imports(ROOT / module) for f in forbidden if m == f or m.startswith(f + ".")}
  assert bad == set(), f"{module} imports {sorted(bad)}"


def test_sinks_take_the_time_format_from_timestamps_not_events():
  import ast

  tree = ast.parse((ROOT / "transforms/sinks/base.py").read_text())
  sources = {
    a.name: n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
  }
  assert sources["iso_us"] == "transforms.timestamps"
  assert sources["with_retries"] == "transforms.retry"
