"""Runs the pipeline's entry point in this process and prints, as one JSON line on stderr at
exit, when it reached each start-up milestone (seconds since the interpreter started):

    python -m benchmarks.startup_probe [pipeline options]

  imports:      the entry point's modules imported (Beam, kafka-python, the transforms);
  first_kafka_client, pipeline_built, stages_planned: the first Kafka client made, the first
                Pipeline.run called (graph built), FnApiRunner's stages fused and planned;
  first_poll:   the first KafkaConsumer.poll call (pipeline built, runner started, reader open);
  first_record: the first poll that returned records.
The time of the first committed offset is seen from outside (benchmarks.measure.CommitWatch).
Measurement only: the wrapper records a timestamp and calls the real poll. With
$BENCH_CPROFILE set to a file, every round (Pipeline.run) is also profiled into it; with
$BENCH_STAGES, the fused stages of the first round are written to that file.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
import time

MARKS: dict[str, float] = {}
CPROFILE_ENV = "BENCH_CPROFILE"  # a file: cProfile the pipeline's rounds into it
STAGES_ENV = "BENCH_STAGES"  # a file: the first round's fused stages, as JSON
GC_ENV = "BENCH_GC_THRESHOLD"  # "g0,g1,g2": gc.freeze() after the imports, then these thresholds


def _since_start() -> float:
  """Seconds since this process started (the kernel's start time, 10 ms resolution)."""
  with open("/proc/self/stat", "rb") as f:
    start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
  return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def _mark(name: str) -> None:
  MARKS.setdefault(name, round(_since_start(), 3))


def _mark_first_call(owner, name: str, mark: str) -> None:
  real = getattr(owner, name)

  def wrapper(*args, **kwargs):
    _mark(mark)
    return real(*args, **kwargs)

  setattr(owner, name, wrapper)


def _wrap_milestones() -> None:
  """Marks the first Kafka client, the first Pipeline.run (graph built) and the first
  FnApiRunner.run_stages (stages fused and planned)."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=import-outside-toplevel
  from kafka import KafkaAdminClient, KafkaConsumer  # pylint: disable=import-outside-toplevel

  _mark_first_call(KafkaConsumer, "__init__", "first_kafka_client")
  _mark_first_call(KafkaAdminClient, "__init__", "first_kafka_client")
  _mark_first_call(beam.Pipeline, "run", "pipeline_built")
  _mark_first_call(fn_runner.FnApiRunner, "run_stages", "stages_planned")


def _wrap_poll() -> None:
  from kafka import KafkaConsumer  # pylint: disable=import-outside-toplevel

  real = KafkaConsumer.poll

  def poll(self, *args, **kwargs):
    _mark("first_poll")
    out = real(self, *args, **kwargs)
    if out:
      _mark("first_record")
    return out

  KafkaConsumer.poll = poll


def _profile_rounds(path: str) -> None:
  """cProfile every Pipeline.run (a round: it runs in a launcher thread, which ``python -m
  cProfile`` would not see) into one profile, written to path at exit."""
  import cProfile  # pylint: disable=import-outside-toplevel

  import apache_beam as beam  # pylint: disable=import-outside-toplevel

  prof, real = cProfile.Profile(), beam.Pipeline.run

  def run(self, *args, **kwargs):
    return prof.runcall(real, self, *args, **kwargs)

  beam.Pipeline.run = run
  atexit.register(prof.dump_stats, path)


def _dump_stages(path: str) -> None:
  """Writes the fused stages of the first round (FnApiRunner.run_stages): for each stage its
  transforms, so one sees which steps are fused and where elements cross a stage boundary."""
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=import-outside-toplevel

  real = fn_runner.FnApiRunner.run_stages

  def run_stages(self, stage_context, stages):
    if not os.path.exists(path):
      with open(path, "w", encoding="utf-8") as f:
        json.dump(
          [{"stage": s.name, "transforms": [t.unique_name for t in s.transforms]} for s in stages],
          f,
          indent=1,
        )
    return real(self, stage_context, stages)

  fn_runner.FnApiRunner.run_stages = run_stages


def main() -> int:
  from benchmarks.common import PIPELINE_MAIN  # pylint: disable=import-outside-toplevel

  _mark("python_ready")
  entry = importlib.import_module(PIPELINE_MAIN)
  _mark("imports")
  _wrap_poll()
  _wrap_milestones()
  if os.environ.get(CPROFILE_ENV):
    _profile_rounds(os.environ[CPROFILE_ENV])
  if os.environ.get(GC_ENV):
    # An experiment for PROFILE.md: the collector's thresholds (e.g. "50000,20,100"), and the
    # objects of the imports moved out of its reach.
    import gc  # pylint: disable=import-outside-toplevel

    gc.freeze()
    gc.set_threshold(*(int(x) for x in os.environ[GC_ENV].split(",")))
  if os.environ.get(STAGES_ENV):
    _dump_stages(os.environ[STAGES_ENV])
  atexit.register(lambda: print("STARTUP_JSON " + json.dumps(MARKS), file=sys.stderr, flush=True))
  return entry.main(sys.argv[1:])


if __name__ == "__main__":
  sys.exit(main())
