"""Smoke test: the local BigQuery emulator starts via control.py (the session fixture
``bq_emulator`` in conftest.py) and de-duplicates insertIds.

Needs Python 3.13 for the emulator's own venv (created on first use by emulator.sh) and
google-cloud-bigquery in the interpreter running pytest.
"""

import itertools
import uuid

import pytest
from google.cloud import bigquery

from bigquery_emulator.control import make_client

pytestmark = pytest.mark.integration

SCHEMA = [
  bigquery.SchemaField("reading_id", "STRING", mode="REQUIRED"),
  bigquery.SchemaField("ts", "TIMESTAMP", mode="REQUIRED"),
  bigquery.SchemaField("meter_id", "STRING", mode="REQUIRED"),
  bigquery.SchemaField("kwh", "FLOAT64"),
]
_names = itertools.count()
DATASET = f"smoke_{uuid.uuid4().hex[:8]}"  # the emulator is shared by the whole session


@pytest.fixture(scope="module")
def emulator(bq_emulator):
  return bq_emulator


@pytest.fixture(scope="module")
def client(emulator):
  c = make_client(emulator.endpoint, emulator.project)
  c.create_dataset(f"{emulator.project}.{DATASET}")
  return c


@pytest.fixture
def table(client, emulator):
  t = bigquery.Table(f"{emulator.project}.{DATASET}.readings_{next(_names)}", schema=SCHEMA)
  t.time_partitioning = bigquery.TimePartitioning(
    type_=bigquery.TimePartitioningType.DAY, field="ts"
  )
  t.clustering_fields = ["meter_id"]
  return client.create_table(t)


def rows(n, start=0):
  return [
    {
      "reading_id": f"r{i}",
      "ts": f"2024-01-0{1 + i % 3}T00:00:00Z",
      "meter_id": f"m{i % 2}",
      "kwh": i / 2,
    }
    for i in range(start, start + n)
  ]


def count(client, table):
  return next(
    iter(
      client.query_and_wait(f"SELECT COUNT(*) AS n FROM `{table.full_table_id.replace(':', '.')}`")
    )
  ).n


def test_emulator_endpoint(emulator):
  assert emulator.endpoint.startswith("http://127.0.0.1:")
  assert emulator.project == "test-project"


def test_table_keeps_partitioning_and_clustering(client, table):
  got = client.get_table(table)
  assert got.time_partitioning.type_ == "DAY"
  assert got.time_partitioning.field == "ts"
  assert got.clustering_fields == ["meter_id"]
  assert [f.mode for f in got.schema][:3] == ["REQUIRED"] * 3


def test_replay_with_same_row_ids_does_not_double_rows(client, table):
  batch = rows(5)
  ids = [str(uuid.uuid4()) for _ in batch]
  assert client.insert_rows_json(table, batch, row_ids=ids) == []
  assert (
    client.insert_rows_json(table, batch, row_ids=ids) == []
  )  # replay: accepted, not written again
  assert count(client, table) == 5


def test_replay_overlapping_batch_adds_only_new_rows(client, table):
  first, extra = rows(4), rows(2, start=4)
  ids = [f"id-{r['reading_id']}" for r in first + extra]
  assert client.insert_rows_json(table, first, row_ids=ids[:4]) == []
  assert client.insert_rows_json(table, first + extra, row_ids=ids) == []
  assert count(client, table) == 6
  got = sorted(r.reading_id for r in client.list_rows(table))
  assert got == sorted(r["reading_id"] for r in first + extra)


def test_rows_without_row_ids_are_not_deduplicated(client, table):
  batch = rows(3)
  assert client.insert_rows_json(table, batch, row_ids=[None] * 3) == []
  assert client.insert_rows_json(table, batch, row_ids=[None] * 3) == []
  assert count(client, table) == 6


def test_bad_row_rejects_request_and_stops_good_rows(client, table):
  good = rows(2)
  bad = {"reading_id": "bad", "ts": "2024-01-01T00:00:00Z"}  # meter_id is REQUIRED
  errors = client.insert_rows_json(table, [good[0], bad, good[1]], row_ids=["g0", "b", "g1"])
  assert errors == [
    {"index": 0, "errors": [{"reason": "stopped", "location": "", "message": ""}]},
    {
      "index": 1,
      "errors": [
        {
          "reason": "invalid",
          "location": "meter_id",
          "message": "Missing required field: meter_id.",
          "debugInfo": "",
        }
      ],
    },
    {"index": 2, "errors": [{"reason": "stopped", "location": "", "message": ""}]},
  ]
  assert count(client, table) == 0
  # The stopped rows' insertIds were not consumed: resending the good rows writes them.
  assert client.insert_rows_json(table, good, row_ids=["g0", "g1"]) == []
  assert count(client, table) == 2
