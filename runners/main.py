"""The entry point: ``python -m runners.main --mode=local|batch|flink|dataflow [options]``.

``--help`` lists every option (SmartGridOptions, then Beam's own).
"""

from __future__ import annotations

import argparse
import logging
import sys

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.options import OptionError, SmartGridOptions, default_bootstrap, validate
from runners import local, remote

_LOGGER = logging.getLogger(__name__)
MODES = ("local", "batch", "flink", "dataflow")


def parse(argv: list[str]) -> tuple[str, PipelineOptions]:
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--mode", choices=MODES, default="local")
  parser.add_argument("-h", "--help", action="store_true")
  known, rest = parser.parse_known_args(argv)
  if known.help:
    print(__doc__)
    print(
      f"--mode {{{','.join(MODES)}}}: local = streaming until drained; batch = committed "
      "offsets to the end offsets seen at start, then exit.\n"
    )
    SmartGridOptions(["--help"])  # argparse prints the options and exits
  options = PipelineOptions(rest)
  unknown = set(options.get_all_options(retain_unknown_options=True)) - set(
    options.get_all_options()
  )
  if unknown:
    raise OptionError(
      "unknown option(s): " + ", ".join(f"--{u}" for u in sorted(unknown)) + " (see --help)"
    )
  o = options.view_as(SmartGridOptions)
  if not any(a == "--bootstrap_servers" or a.startswith("--bootstrap_servers=") for a in rest):
    # Beam's KafkaStreamsRunnerOptions declares the same flag with its own default.
    o.bootstrap_servers = default_bootstrap()
  if known.mode == "batch" and o.stop is None:
    o.stop = "end"
  validate(o)
  return known.mode, options


def configure_logging() -> None:
  # force: a library may have configured the root logger already (a root-level
  # logging.warning() at import time does).
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
  )
  # Beam's INFO lines (type hints, job states, workers) say nothing a user needs.
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  # kafka-python logs every failed connection attempt (dozens of lines a second while a
  # broker is down); the launcher says it once, with what to do ("Kafka unreachable ...").
  logging.getLogger("kafka").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
  configure_logging()
  try:
    mode, options = parse(sys.argv[1:] if argv is None else argv)
  except OptionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if mode in ("local", "batch"):
    runner = options.view_as(StandardOptions).runner
    # PrismRunner (opt-in, streaming only): one really-streaming pipeline on Prism
    # (runners/prism.py; built by ./run_pipeline.sh prism build). It passes the streaming
    # zero-loss tests; bounded runs are refused (Prism 2.77 loses GroupIntoBatches state there).
    if runner not in (None, "DirectRunner", "FnApiRunner", "PrismRunner"):
      print(
        f"error: --runner={runner} is not a local runner; use ./run_pipeline.sh flink|dataflow",
        file=sys.stderr,
      )
      return 2
    if runner == "DirectRunner":
      _LOGGER.info(
        "--runner=DirectRunner: running on Beam's FnApiRunner engine, because the "
        "DirectRunner would pick its BundleBasedDirectRunner for this pipeline, which "
        "drops the Kafka reader's checkpointed residuals (see README, Runners)"
      )
    local.tune_process()
    return local.run(options, mode)
  return remote.run(options, mode)


if __name__ == "__main__":
  sys.exit(main())
