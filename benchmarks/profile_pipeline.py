"""Where a 1-worker ``batch`` run spends its CPU, its start-up and its memory (benchmarks/PROFILE.md).

    python -m benchmarks.profile_pipeline [--events 200000] [--repeat 3] [--out output/profile]
        [--rounds 25000,50000,100000,200000,400000] [--bootstrap host:port]

On one set of topics (N realistic events, benchmarks.common.produce_smartgrid), each run a
fresh consumer group and SQLite file, ``--start=earliest``, ``--local_workers=1``:
  plain:    --repeat runs without a profiler (events/s, CPU µs/event, peak RSS: the noise);
  startup:  the same through benchmarks.startup_probe: imports, first poll, first record,
            and the first committed offset seen from another client;
  py-spy:   a sampling profile (py-spy record --format raw, --native off); its stacks are
            grouped by component (``components`` below) into CPU µs per event;
  cProfile: a deterministic profile of the rounds (benchmarks.startup_probe with
            $BENCH_CPROFILE): call counts per DoFn, state, SQLite;
  rounds:   peak RSS and events/s for each --round_max_records in --rounds.
Everything lands in --out (stacks, .prof, a JSON summary); the summary is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.common import PIPELINE_MAIN, bench_broker, produce_smartgrid
from benchmarks.measure import CommitWatch, run_measured
from benchmarks.startup_probe import CPROFILE_ENV, GC_ENV

REPO = Path(__file__).resolve().parent.parent
# (component, pattern on "file:function" of one frame). The innermost frame that matches any
# pattern names the component of a sample; order decides between patterns on the same frame.
COMPONENTS = (
  ("startup: imports", r"<frozen importlib|importlib/__init__"),
  ("SQLite write (executemany, commit, fsync)", r"transforms/sinks/sqlite\.py:.*"),
  ("JSON decode", r"json/(decoder|__init__)\.py"),
  ("timestamp parsing", r"transforms/timestamps\.py"),
  ("parse + validate + row building", r"transforms/(parse|events|avro)\.py"),
  ("reconcile / SkipStored", r"transforms/reconcile\.py"),
  ("batching in ParseEvents + keys", r"transforms/batching\.py"),
  ("windowing (project)", r"transforms/windows\.py"),
  ("acks + CommitOffsets", r"transforms/(acks|commit)\.py"),
  ("progress counters", r"transforms/progress\.py"),
  ("reader: record building + tracking", r"transforms/kafka/"),
  ("kafka-python: record decode (v2 batches, crc)", r"kafka/record/"),
  ("kafka-python: fetch, protocol, network", r"kafka/"),
  (
    "Beam: GroupIntoBatches (state, timers)",
    (
      r"apache_beam/transforms/util\.py|statecache|state_?handler|"
      r"userstate|bundle_processor\.py:.*(State|state|Timer|timer)"
    ),
  ),
  ("Beam: coders", r"apache_beam/coders/"),
  ("Beam: windowing", r"apache_beam/transforms/(window|trigger|timeutil)\.py|windowed_value"),
  ("Beam: metrics", r"apache_beam/metrics/"),
  (
    "Beam: runner (FnApiRunner, data plane, stage scheduling)",
    r"apache_beam/runners/portability/|data_plane|apache_beam/runners/worker/(sdk_worker|worker_pool)",
  ),
  ("Beam: per-element dispatch (operations, DoFnRunner, outputs)", r"apache_beam/"),
  ("logging", r"logging/"),
)
_COMPILED = [(name, re.compile(pattern)) for name, pattern in COMPONENTS]
# Leaf frames of a thread that waits (py-spy samples some waiting threads as active): the
# kafka-python network thread in select, runner threads on conditions, thread targets in C.
_IDLE = re.compile(
  r"selectors\.py:|threading\.py:(Condition\.wait|Event\.wait|Thread\._wait_for_tstate_lock"
  r"|Thread\.run|Thread\.join)$|queue\.py:Queue\.get$|time\.sleep"
)
IDLE = "idle (waiting threads)"
_PROJECT = re.compile(r"(transforms|pipelines|runners)/")


def _env() -> dict:
  return {**os.environ, "PYTHONPATH": str(REPO)}


def _pipeline_args(common: list[str], group: str, db: Path, extra: tuple = ()) -> list[str]:
  return [
    "--mode=batch",
    *common,
    f"--group_id={group}",
    "--start=earliest",
    f"--sink=sqlite:///{db}",
    "--local_workers=1",
    "--progress_secs=0",
    *extra,
  ]


def _frame_key(frame: str) -> str:
  # py-spy raw frames: "function (path/to/file.py:line)".
  m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
  return f"{m.group(2)}:{m.group(1)}" if m else frame


def components(stacks_file: Path) -> tuple[Counter, Counter, int]:
  """Samples per component, and for Beam's per-element dispatch the project frame it serves."""
  by_component, dispatch_after, total = Counter(), Counter(), 0
  for line in stacks_file.read_text().splitlines():
    stack, _, count = line.rpartition(" ")
    if not count.isdigit():
      continue
    n, frames = int(count), [_frame_key(f) for f in stack.split(";")]
    total += n
    if _IDLE.search(frames[-1]):
      by_component[IDLE] += n
      continue
    name = "other (python stdlib)"
    for frame in reversed(frames):
      hit = next((c for c, rx in _COMPILED if rx.search(frame)), None)
      if hit:
        name = hit
        break
    by_component[name] += n
    if name.startswith("Beam:"):
      owner = next((f for f in reversed(frames) if _PROJECT.match(f)), "-")
      dispatch_after[f"{name} | under {owner}"] += n
  return by_component, dispatch_after, total


def plain_runs(common, work: Path, n: int, repeat: int, gc_threshold: str = "") -> list[dict]:
  out, tag = [], f"gc{gc_threshold.replace(',', '-')}" if gc_threshold else "plain"
  for i in range(repeat):
    group = f"prof-{tag}-{i}"
    argv = [
      sys.executable,
      "-m",
      "benchmarks.startup_probe",
      *_pipeline_args(common, group, work / f"{tag}-{i}.db"),
    ]
    watch = CommitWatch(common[0].split("=", 1)[1], group, [a.split("=", 1)[1] for a in common[1:]])
    env = {**_env(), GC_ENV: gc_threshold} if gc_threshold else _env()
    m = run_measured(argv, env, REPO, watch=watch)
    marks = json.loads(re.search(r"STARTUP_JSON (.*)", m.stderr).group(1))
    row = {
      "wall_s": round(m.wall_s, 2),
      "events_per_s": round(n / m.wall_s),
      "cpu_us_per_event": round(m.cpu_s / n * 1e6, 1),
      "peak_rss_mb": round(m.peak_rss_mb),
      "first_commit_s": m.first_commit_s and round(m.first_commit_s, 2),
      **marks,
    }
    print(f"  {tag} run {i}: {row}", flush=True)
    out.append(row)
  return out


def py_spy_run(common, work: Path, out: Path, native: bool = False) -> Path:
  stacks = out / f"pyspy-stacks{'-native' * native}.txt"
  cmd = [
    str(Path(sys.executable).with_name("py-spy")),
    "record",
    "--rate",
    "200",
    "--format",
    "raw",
    *(["--native"] * native),
    "--output",
    str(stacks),
    "--",
    sys.executable,
    "-m",
    PIPELINE_MAIN,
    *_pipeline_args(common, f"prof-pyspy{'-native' * native}", work / f"pyspy{native}.db"),
  ]
  subprocess.run(
    cmd, env=_env(), cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  return stacks


def cprofile_run(common, work: Path, out: Path) -> Path:
  prof = out / "cprofile.prof"
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.startup_probe",
    *_pipeline_args(common, "prof-cprofile", work / "cprofile.db"),
  ]
  m = run_measured(cmd, {**_env(), CPROFILE_ENV: str(prof)}, REPO)
  if m.returncode != 0:
    raise RuntimeError(m.stderr[-2000:])
  return prof


def cprofile_summary(prof: Path, top: int = 40) -> list[dict]:
  stats = pstats.Stats(str(prof))
  rows = []
  for (path, line, func), (_cc, nc, tt, ct, _) in stats.stats.items():
    rows.append(
      {
        "function": f"{path.replace(str(REPO) + '/', '')}:{line}:{func}",
        "ncalls": nc,
        "tottime_s": round(tt, 3),
        "cumtime_s": round(ct, 3),
      }
    )
  rows.sort(key=lambda r: r["tottime_s"], reverse=True)
  return rows[:top]


def round_runs(common, work: Path, n: int, sizes: list[int]) -> list[dict]:
  out = []
  for size in sizes:
    argv = [
      sys.executable,
      "-m",
      PIPELINE_MAIN,
      *_pipeline_args(
        common, f"prof-round-{size}", work / f"round-{size}.db", (f"--round_max_records={size}",)
      ),
    ]
    m = run_measured(argv, _env(), REPO)
    row = {
      "round_max_records": size,
      "events_per_s": round(n / m.wall_s),
      "cpu_us_per_event": round(m.cpu_s / n * 1e6, 1),
      "peak_rss_mb": round(m.peak_rss_mb),
    }
    print(f"  round size: {row}", flush=True)
    out.append(row)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog="benchmarks.profile_pipeline",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--events", type=int, default=200_000)
  ap.add_argument("--repeat", type=int, default=3)
  ap.add_argument("--out", default=str(REPO / "output" / "profile"))
  ap.add_argument("--rounds", default="25000,50000,100000,200000,400000")
  ap.add_argument("--bootstrap", default=None)
  ap.add_argument(
    "--gc",
    default="",
    metavar="G0,G1,G2",
    help="only the plain runs, without and with gc.freeze() + these gc thresholds",
  )
  ap.add_argument("--startup-only", action="store_true", help="only the plain runs")
  ap.add_argument(
    "--native",
    action="store_true",
    help="py-spy --native as well: Beam's Cython frames (operations, coders) by name",
  )
  a = ap.parse_args(argv)
  out = Path(a.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  n, summary = a.events, {}
  with bench_broker(a.bootstrap, "profile") as (bootstrap, work):
    sensor, meter = produce_smartgrid(bootstrap, n)
    common = [
      f"--bootstrap_servers={bootstrap}",
      f"--sensor_topic={sensor}",
      f"--meter_topic={meter}",
    ]
    summary["plain"] = plain_runs(common, work, n, a.repeat)
    if a.startup_only:
      (out / "summary.json").write_text(json.dumps(summary, indent=1))
      return 0
    if a.gc:
      summary["gc"] = plain_runs(common, work, n, a.repeat, a.gc)
      (out / "summary.json").write_text(json.dumps(summary, indent=1))
      return 0
    by_component, dispatch, total = components(py_spy_run(common, work, out))
    summary["pyspy_samples"] = total
    busy = total - by_component[IDLE]
    summary["pyspy_idle_share"] = round(by_component.pop(IDLE) / total, 4)
    # Shares of the busy samples: they split the measured CPU.
    summary["pyspy_share"] = {k: round(v / busy, 4) for k, v in by_component.most_common()}
    summary["pyspy_beam_by_owner"] = {k: round(v / busy, 4) for k, v in dispatch.most_common(30)}
    if a.native:
      native, _, _ = components(py_spy_run(common, work, out, native=True))
      busy = sum(native.values()) - native.pop(IDLE, 0)
      summary["pyspy_native_share"] = {k: round(v / busy, 4) for k, v in native.most_common()}
    summary["cprofile_top"] = cprofile_summary(cprofile_run(common, work, out))
    summary["rounds"] = round_runs(common, work, n, [int(s) for s in a.rounds.split(",") if s])
  cpu = sorted(r["cpu_us_per_event"] for r in summary["plain"])[len(summary["plain"]) // 2]
  print(
    f"\nCPU per event (median of plain runs): {cpu} µs; py-spy share -> µs per event:", flush=True
  )
  for k, share in summary["pyspy_share"].items():
    print(f"  {k:62s} {share * 100:5.1f}%  {share * cpu:6.1f} µs", flush=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"summary: {out / 'summary.json'}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
