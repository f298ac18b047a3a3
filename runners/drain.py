"""``./run_pipeline.sh drain [local|flink|dataflow] [job]``: drain a running pipeline.

local     SIGTERM to the local pipeline (pid in .run/local-pipeline.pid or
          .run/batch-pipeline.pid), then wait until it has flushed, committed and exited.
flink     Flink REST ``POST /jobs/<id>/stop`` with ``drain: true`` and a savepoint folder
          (the only running job unless JOB is given); waits for FINISHED.
dataflow  ``gcloud dataflow jobs drain JOB --region REGION``; waits for the final state.
With no runner: the one local pipeline that is running, or an explanation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = REPO / ".run"
SAVEPOINTS = REPO / ".cache" / "flink" / "savepoints"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
    return True
  except ProcessLookupError:
    return False


def local_pipelines() -> list[tuple[Path, int]]:
  found = []
  for pidf in sorted(RUN_DIR.glob("*-pipeline.pid")):
    try:
      pid = int(pidf.read_text().strip())
    except (OSError, ValueError):
      continue
    if _alive(pid):
      found.append((pidf, pid))
  return found


def drain_local(timeout_s: float = 600.0) -> int:
  running = local_pipelines()
  if not running:
    print("No local pipeline is running (no live pid in .run/*-pipeline.pid).", file=sys.stderr)
    return 1
  for pidf, pid in running:
    print(f"Draining the local pipeline (pid {pid}, {pidf.name}) ...")
    os.kill(pid, signal.SIGTERM)
  deadline = time.monotonic() + timeout_s
  while any(_alive(pid) for _, pid in running):
    if time.monotonic() > deadline:
      print(f"error: still running after {timeout_s:.0f}s", file=sys.stderr)
      return 1
    time.sleep(0.2)
  print(
    "Drained: the pipeline flushed its sink, committed its offsets and exited "
    "(its summary is in its own output)."
  )
  return 0


def _flink_request(base: str, path: str, body: dict | None = None) -> dict:
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(
    base + path,
    data=data,
    method="POST" if body is not None else "GET",
    headers={"Content-Type": "application/json"},
  )
  with urllib.request.urlopen(req, timeout=30) as resp:
    return json.loads(resp.read() or b"{}")


def drain_flink(job: str | None, rest: str, timeout_s: float = 600.0) -> int:
  base = rest if rest.startswith("http") else f"http://{rest}"
  if job is None:
    running = [j for j in _flink_request(base, "/jobs/overview")["jobs"] if j["state"] == "RUNNING"]
    if len(running) != 1:
      names = ", ".join(f"{j['jid']} ({j['name']})" for j in running) or "none"
      print(
        f"error: {len(running)} running Flink jobs ({names}); name the one to drain: "
        "./run_pipeline.sh drain flink JOB_ID",
        file=sys.stderr,
      )
      return 1
    job = running[0]["jid"]
  SAVEPOINTS.mkdir(parents=True, exist_ok=True)
  trigger = _flink_request(
    base, f"/jobs/{job}/stop", {"drain": True, "targetDirectory": SAVEPOINTS.as_uri()}
  )
  request_id = trigger["request-id"]
  print(f"Draining Flink job {job} (savepoint request {request_id}) ...")
  deadline = time.monotonic() + timeout_s
  savepoint = None
  while time.monotonic() < deadline:
    status = _flink_request(base, f"/jobs/{job}/savepoints/{request_id}")
    if status.get("status", {}).get("id") == "COMPLETED":
      op = status.get("operation", {})
      if "failure-cause" in op:
        print(f"error: the drain failed: {op['failure-cause'].get('class')}", file=sys.stderr)
        return 1
      savepoint = op.get("location")
    state = _flink_request(base, f"/jobs/{job}")["state"]
    if state in ("FINISHED", "FAILED", "CANCELED"):
      print(f"Flink job {job}: {state}; savepoint: {savepoint}")
      return 0 if state == "FINISHED" else 1
    time.sleep(1)
  print(f"error: job {job} did not finish within {timeout_s:.0f}s", file=sys.stderr)
  return 1


def dataflow_drain_command(job: str, region: str, project: str | None = None) -> list[str]:
  cmd = ["gcloud", "dataflow", "jobs", "drain", job, f"--region={region}"]
  if project:
    cmd.append(f"--project={project}")
  return cmd


def dataflow_state_command(job: str, region: str, project: str | None = None) -> list[str]:
  cmd = [
    "gcloud",
    "dataflow",
    "jobs",
    "describe",
    job,
    f"--region={region}",
    "--format=value(currentState)",
  ]
  if project:
    cmd.append(f"--project={project}")
  return cmd


def drain_dataflow(
  job: str | None, region: str | None, project: str | None, timeout_s: float = 1800.0
) -> int:
  if not job or not region:
    print(
      "error: drain dataflow needs the job id and --region (e.g. ./run_pipeline.sh drain "
      "dataflow 2026-11-27_01_02_03-123 --region=europe-west1)",
      file=sys.stderr,
    )
    return 2
  if shutil.which("gcloud") is None:
    print(
      "error: gcloud is not installed; run on a machine with the Google Cloud SDK:\n  "
      + " ".join(dataflow_drain_command(job, region, project)),
      file=sys.stderr,
    )
    return 2
  subprocess.run(dataflow_drain_command(job, region, project), check=True)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    state = subprocess.run(
      dataflow_state_command(job, region, project), check=True, capture_output=True, text=True
    ).stdout.strip()
    if state in ("JOB_STATE_DRAINED", "JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
      print(f"Dataflow job {job}: {state}")
      return 0 if state in ("JOB_STATE_DRAINED", "JOB_STATE_DONE") else 1
    time.sleep(10)
  print(f"error: job {job} not drained within {timeout_s:.0f}s", file=sys.stderr)
  return 1


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    prog="run_pipeline.sh drain",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("runner", nargs="?", choices=["local", "flink", "dataflow"])
  ap.add_argument("job", nargs="?", help="Flink job id or Dataflow job id")
  ap.add_argument("--flink_rest", default=f"127.0.0.1:{os.environ.get('FLINK_REST_PORT', '8081')}")
  ap.add_argument("--region", default=None, help="Dataflow region")
  ap.add_argument("--project", default=None, help="Google Cloud project")
  a = ap.parse_args(argv)
  if a.runner == "local":
    return drain_local()
  if a.runner == "flink":
    return drain_flink(a.job, a.flink_rest)
  if a.runner == "dataflow":
    return drain_dataflow(a.job, a.region, a.project)
  if local_pipelines():
    return drain_local()
  print(
    "No local pipeline is running. Say which one to drain: ./run_pipeline.sh drain "
    "flink [JOB_ID] | drain dataflow JOB_ID --region=REGION",
    file=sys.stderr,
  )
  return 1


if __name__ == "__main__":
  sys.exit(main())
