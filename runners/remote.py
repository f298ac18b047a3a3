"""Flink and Dataflow runs of the same pipeline.

Flink: Beam's FlinkRunner with the job-server jar of the pinned Beam version,
fetched by ``runners/flink/fetch_job_server.sh`` into ``.cache/jars`` and passed
explicitly (nothing downloads at run time); ``--flink_master=[local]`` (embedded)
by default, ``127.0.0.1:8081`` for the cluster of ``runners/flink/flink_cluster.sh``;
LOOPBACK environment (no Docker).

Dataflow: refuses to start without --project, --region and a gs:// --temp_location;
ships the packages with --setup_file; streaming when the read is unbounded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import (
  FlinkRunnerOptions,
  GoogleCloudOptions,
  PipelineOptions,
  PortableOptions,
  SetupOptions,
  StandardOptions,
)

from pipelines import smartgrid
from pipelines.options import OptionError, SmartGridOptions

REPO = Path(__file__).resolve().parent.parent


def flink_job_server_jar() -> Path:
  """The job-server jar of the pinned Beam version, fetched once with Maven."""
  proc = subprocess.run(
    ["bash", str(REPO / "runners" / "flink" / "fetch_job_server.sh")],
    capture_output=True,
    text=True,
  )
  if proc.returncode != 0:
    raise OptionError(
      "--mode=flink: the Flink job-server jar of Beam " + beam.__version__ + " could not be "
      "fetched from Maven Central (" + (proc.stderr.strip().splitlines() or ["?"])[-1] + ")"
    )
  return Path(proc.stdout.strip().splitlines()[-1])


def configure_flink(options: PipelineOptions) -> PipelineOptions:
  o = options.view_as(SmartGridOptions)
  std = options.view_as(StandardOptions)
  std.runner = "FlinkRunner"
  std.streaming = o.stop is None
  flink = options.view_as(FlinkRunnerOptions)
  if not flink.flink_master or flink.flink_master == "[auto]":
    flink.flink_master = "[local]"
  portable = options.view_as(PortableOptions)
  if portable.environment_type in (None, "DOCKER"):
    portable.environment_type = "LOOPBACK"
  if not getattr(flink, "flink_job_server_jar", None):
    flink.flink_job_server_jar = str(flink_job_server_jar())
  return options


def configure_dataflow(options: PipelineOptions, now: float | None = None) -> PipelineOptions:
  """Completes and checks Dataflow's options; OptionError names what is missing."""
  o = options.view_as(SmartGridOptions)
  gcp = options.view_as(GoogleCloudOptions)
  if not gcp.project:
    raise OptionError("--project: Dataflow needs the Google Cloud project to run in")
  if not gcp.region:
    raise OptionError("--region: Dataflow needs a region (e.g. europe-west1)")
  if not gcp.temp_location or not gcp.temp_location.startswith("gs://"):
    raise OptionError("--temp_location: Dataflow needs a gs://bucket/path for temporary files")
  if not gcp.staging_location:
    gcp.staging_location = gcp.temp_location.rstrip("/") + "/staging"
  if not gcp.job_name:
    gcp.job_name = time.strftime("smartgrid-%Y%m%d-%H%M%S", time.gmtime(now))
  if o.sink.startswith("sqlite:"):
    raise OptionError(
      "--sink: a SQLite file does not work on Dataflow's many workers; "
      "use bigquery://PROJECT/DATASET"
    )
  std = options.view_as(StandardOptions)
  std.runner = "DataflowRunner"
  std.streaming = o.stop is None
  options.view_as(SetupOptions).setup_file = str(REPO / "setup.py")
  return options


def run(options: PipelineOptions, mode: str) -> int:
  try:
    options = configure_flink(options) if mode == "flink" else configure_dataflow(options)
  except OptionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  p = beam.Pipeline(options=options)
  smartgrid.build(p, options.view_as(SmartGridOptions))
  result = p.run()
  if mode == "dataflow":
    print(
      f"Submitted Dataflow job {options.view_as(GoogleCloudOptions).job_name}; drain it with "
      f"./run_pipeline.sh drain dataflow JOB_ID --region={options.view_as(GoogleCloudOptions).region}"
    )
    return 0
  state = result.wait_until_finish()
  print(f"Flink job ended: {state}")
  return 0 if str(state).endswith("DONE") else 1
