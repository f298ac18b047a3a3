"""Dataflow and Flink launch options and the drain command lines, without a cloud or a cluster."""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import (
  GoogleCloudOptions,
  PipelineOptions,
  SetupOptions,
  StandardOptions,
)

from pipelines.options import OptionError
from runners import drain, remote

BQ = "--sink=bigquery://my-project/smartgrid"
REQUIRED = ["--project=my-project", "--region=europe-west1", "--temp_location=gs://bucket/tmp", BQ]


def _configured(*args: str) -> PipelineOptions:
  return remote.configure_dataflow(PipelineOptions(list(args)), now=1_795_780_000)


def test_dataflow_streaming_job_gets_everything_it_needs():
  o = _configured(*REQUIRED)
  gcp = o.view_as(GoogleCloudOptions)
  assert o.view_as(StandardOptions).runner == "DataflowRunner"
  assert o.view_as(StandardOptions).streaming is True  # no --stop: unbounded read
  assert gcp.staging_location == "gs://bucket/tmp/staging"
  assert gcp.job_name == "smartgrid-20261127-114640"
  assert o.view_as(SetupOptions).setup_file == str(remote.REPO / "setup.py")


def test_dataflow_batch_job_is_not_streaming_and_keeps_given_names():
  o = _configured(
    *REQUIRED,
    "--stop=end",
    "--job_name=nightly",
    "--staging_location=gs://b/stage",
    "--service_account_email=sa@my-project.iam.gserviceaccount.com",
    "--subnetwork=regions/europe-west1/subnetworks/private",
    "--no_use_public_ips",
  )
  gcp = o.view_as(GoogleCloudOptions)
  assert o.view_as(StandardOptions).streaming is False
  assert (gcp.job_name, gcp.staging_location) == ("nightly", "gs://b/stage")
  assert gcp.service_account_email == "sa@my-project.iam.gserviceaccount.com"
  flags = o.get_all_options(drop_default=True)
  assert flags["subnetwork"] == "regions/europe-west1/subnetworks/private"
  assert flags["use_public_ips"] is False


def test_dataflow_update_keeps_the_job_name():
  o = _configured(*REQUIRED, "--update", "--job_name=smartgrid-prod")
  assert o.view_as(StandardOptions).streaming is True
  assert o.view_as(GoogleCloudOptions).update is True
  assert o.view_as(GoogleCloudOptions).job_name == "smartgrid-prod"


@pytest.mark.parametrize(
  "missing, named",
  [
    ("--project=my-project", "--project"),
    ("--region=europe-west1", "--region"),
    ("--temp_location=gs://bucket/tmp", "--temp_location"),
  ],
)
def test_dataflow_refuses_to_start_without_a_required_option(missing, named):
  args = [a for a in REQUIRED if a != missing]
  with pytest.raises(OptionError, match=f"^{named}:"):
    _configured(*args)


def test_dataflow_refuses_a_local_temp_location_and_a_sqlite_sink():
  with pytest.raises(OptionError, match="^--temp_location:"):
    _configured("--project=p-123456", "--region=r", "--temp_location=/tmp/x", BQ)
  with pytest.raises(OptionError, match="^--sink:"):
    _configured("--project=p-123456", "--region=r", "--temp_location=gs://b/t")


def test_main_exits_2_with_the_message_for_a_missing_region(capsys):
  from runners import main

  assert main.main(["--mode=dataflow", "--project=my-project", "--temp_location=gs://b/t", BQ]) == 2
  assert "--region: Dataflow needs a region" in capsys.readouterr().err


def test_dataflow_drain_command_lines():
  assert drain.dataflow_drain_command("2026-11-27_01_02_03-42", "europe-west1") == [
    "gcloud",
    "dataflow",
    "jobs",
    "drain",
    "2026-11-27_01_02_03-42",
    "--region=europe-west1",
  ]
  assert drain.dataflow_drain_command("j", "us-central1", "p") == [
    "gcloud",
    "dataflow",
    "jobs",
    "drain",
    "j",
    "--region=us-central1",
    "--project=p",
  ]
  assert drain.dataflow_state_command("j", "us-central1") == [
    "gcloud",
    "dataflow",
    "jobs",
    "describe",
    "j",
    "--region=us-central1",
    "--format=value(currentState)",
  ]


def test_drain_dataflow_needs_a_job_and_a_region(capsys):
  assert drain.main(["dataflow"]) == 2
  assert "needs the job id and --region" in capsys.readouterr().err


def test_flink_options_use_loopback_the_embedded_cluster_and_an_explicit_jar(monkeypatch, tmp_path):
  jar = tmp_path / "beam-runners-flink-2.2-job-server-2.77.0.jar"
  monkeypatch.setattr(remote, "flink_job_server_jar", lambda: jar)
  o = remote.configure_flink(PipelineOptions([]))
  flags = o.get_all_options()
  assert flags["runner"] == "FlinkRunner"
  assert flags["flink_master"] == "[local]"
  assert flags["environment_type"] == "LOOPBACK"
  assert flags["flink_job_server_jar"] == str(jar)
  assert flags["streaming"] is True
  o = remote.configure_flink(PipelineOptions(["--flink_master=127.0.0.1:8081", "--stop=end"]))
  assert o.get_all_options()["flink_master"] == "127.0.0.1:8081"
  assert o.get_all_options()["streaming"] is False


# ---------------------------------------------------------------------------
# --local_workers: partition shards and the workers' command lines


def test_partition_shards_cover_every_partition_once_and_balance_topics():
  from pipelines.smartgrid import shard_partitions

  parts = [("s", p) for p in range(4)] + [("m", p) for p in range(3)]
  shards = [shard_partitions(parts, f"{i}/3") for i in range(3)]
  assert sorted(x for s in shards for x in s) == sorted(parts)
  assert [len(s) for s in shards] == [3, 2, 2]
  assert shard_partitions(parts, None) == parts


def test_a_restarted_workers_job_carries_the_parsed_options_through_json(monkeypatch, tmp_path):
  """The supervisor hands a restarted worker its parsed options (not the user's argv), and
  run_worker gives every worker its shard, drain file and silence."""
  import json

  from pipelines.options import SmartGridOptions
  from runners import local, main
  from runners.workers import options_of, worker_job

  monkeypatch.setenv("KAFKA_PORT", "19092")  # --bootstrap_servers computed at start
  _, options = main.parse(
    [
      "--mode=batch",
      "--local_workers=2",
      "--sink",
      "sqlite:///x.db",
      "--progress_secs=5",
      "--group_id=g",
      "--require_topics",
    ]
  )
  job = json.loads(json.dumps(worker_job(options, "batch", 1, 2, tmp_path / "drain")))
  assert (job["mode"], job["index"], job["count"]) == ("batch", 1, 2)
  assert job["drain_file"] == str(tmp_path / "drain")
  ran = []
  monkeypatch.setattr(local, "run", lambda opts, mode: ran.append((opts, mode)) or 0)
  assert local.run_worker(options_of(job), job["mode"], 1, 2, tmp_path / "drain") == 0
  o = ran[0][0].view_as(SmartGridOptions)
  parent = options.view_as(SmartGridOptions)
  assert ran[0][1] == "batch"
  assert (o.sink, o.group_id, o.require_topics, o.stop) == ("sqlite:///x.db", "g", True, "end")
  assert o.bootstrap_servers == parent.bootstrap_servers == "127.0.0.1:19092"
  assert (o.local_workers, o.partition_shard, o.progress_secs) == (1, "1/2", 0)
  assert o.drain_file == f"{tmp_path / 'drain'}.1"
  assert parent.local_workers == 2 and parent.partition_shard is None  # the supervisor's own


@pytest.mark.parametrize("bad", ["2", "2/2", "-1/2", "a/b"])
def test_partition_shard_must_be_i_of_n(bad):
  from runners import main

  with pytest.raises(OptionError, match="^--partition_shard:"):
    main.parse([f"--partition_shard={bad}"])
