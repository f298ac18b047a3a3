"""Local runs on Prism, Beam's portable Go runner: ``--runner=PrismRunner``.

    ./run_pipeline.sh prism build                          once: go install, same version as apache-beam
    ./run_pipeline.sh local --runner=PrismRunner [...]     one unbounded pipeline, really streaming
    ./run_pipeline.sh batch --runner=PrismRunner [...]     the bounded run, on Prism

Why it is worth having: FnApiRunner hands a stage's output downstream only when the
stage finishes, so ``local`` on FnApiRunner runs in rounds of bounded reads
(runners/local.py). Prism schedules bundles continuously and fires watermarks and
processing-time timers while the read goes on, so ``local`` runs ONE unbounded
pipeline there: windows close, GroupIntoBatches' buffering timer flushes partial
batches and offsets are committed while events stream in.

How it fits the launcher (runners/local.py: no rounds on Prism, nothing else changes):
- Loopback: Prism runs the Python DoFns in an SDK harness thread of the launcher
  process itself, through a worker pool this module starts on 127.0.0.1
  (``environment_type=EXTERNAL``): Beam's own LOOPBACK pool listens on every
  interface (``worker_pool_main`` binds ``[::]``), and so does Prism's job server
  unless it is the patched build of ``runners/prism.sh`` (binds 127.0.0.1). So the drain
  file works exactly as on FnApiRunner; the progress line and the summary read the Beam
  metrics from the job's PipelineResult (asked again at each line while it runs) and the
  committed offsets from Kafka.
- The launcher starts the Prism binary itself (``job_server()``) and hands the runner its
  ``--job_endpoint``, instead of letting PrismRunner start it: PrismRunner's job server
  installs a SIGINT handler (which fails outside the main thread, where local.py runs
  pipelines, and would stop Prism on the first Ctrl-C instead of draining). Started here,
  Prism is in its own session (a terminal's Ctrl-C reaches only the launcher, which
  drains), dies with the launcher (PR_SET_PDEATHSIG, so a SIGKILL or the second signal's
  ``os._exit`` leaves no orphan), and is stopped at exit otherwise.
- Bounded runs (``--stop``, i.e. ``batch``) are refused on Prism: Prism 2.77 loses
  elements buffered in GroupIntoBatches when a bounded input ends (the watermark jumps to
  +inf; the window-end timer fires and reads a bag that is already empty: the run exits 0
  having written nothing of that window, and commits nothing, so nothing is lost from
  Kafka, but the run does not do its job). A plain Create -> FixedWindows ->
  GroupIntoBatches pipeline shows it (20 of 50 elements lost with two windows, 50 of 50
  with one), with allowed lateness 0 or 300. ``PRISM_ALLOW_BOUNDED=1`` lifts the refusal
  for experiments and benchmarks only. Streaming passes the zero-loss tests (SIGTERM
  drain, SIGKILL loops, drain while producing).
- Unbounded Kafka ranges refuse fractional splits (transforms/kafka/tracking.py);
  Prism asks for 0.5 splits of busy bundles, which would otherwise cut at sys.maxsize/2.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from broker.kafka_broker import free_port
from pipelines.options import SmartGridOptions

_LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO / ".cache" / "prism-127" / "bin" / "prism"
RUNNER = "PrismRunner"
_RUNNER_NAMES = (RUNNER, "apache_beam.runners.portability.prism_runner.PrismRunner")


class PrismNotBuilt(ValueError):
  """The Prism binary is missing; the message says how to build it."""


class PrismUnsupported(ValueError):
  """A run Prism cannot do without losing output (bounded runs; see the module doc)."""


def is_prism(options: PipelineOptions) -> bool:
  return options.view_as(StandardOptions).runner in _RUNNER_NAMES


def binary() -> Path:
  """$PRISM_BIN, else .cache/prism-127/bin/prism (built by ``./run_pipeline.sh prism build``)."""
  path = Path(os.environ.get("PRISM_BIN") or DEFAULT_BINARY)
  if not (path.is_file() and os.access(path, os.X_OK)):
    raise PrismNotBuilt(
      f"--runner=PrismRunner: no Prism binary at {path}; "
      f"run ./run_pipeline.sh prism build (needs Go; a few minutes)"
    )
  return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_worker_pool: str | None = None


def worker_pool(state_cache_bytes: int = 0) -> str:
  """This process's SDK worker pool on 127.0.0.1 (what LOOPBACK starts, on every interface)."""
  global _worker_pool
  if _worker_pool is None:
    import grpc  # pylint: disable=import-outside-toplevel
    from apache_beam.portability.api import beam_fn_api_pb2_grpc  # pylint: disable=import-outside-toplevel
    from apache_beam.runners.worker import worker_pool_main  # pylint: disable=import-outside-toplevel
    from apache_beam.utils import thread_pool_executor  # pylint: disable=import-outside-toplevel

    server = grpc.server(
      thread_pool_executor.shared_unbounded_instance(),
      options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
      worker_pool_main.BeamFnExternalWorkerPoolServicer(
        use_process=False, state_cache_size=state_cache_bytes, data_buffer_time_limit_ms=-1
      ),
      server,
    )
    server.start()
    atexit.register(server.stop, 1)
    _worker_pool = f"127.0.0.1:{port}"
  return _worker_pool


class JobServer:
  """The Prism binary as this process's child: its job endpoint, its log lines forwarded."""

  def __init__(self, path: Path, log_level: str = "warn"):
    self.port = free_port()
    self.endpoint = f"127.0.0.1:{self.port}"
    self._log = logging.getLogger("prism")
    self.proc = subprocess.Popen(
      [
        str(path),
        "--job_port",
        str(self.port),
        "--log_level",
        log_level,
        "--log_kind",
        "text",
        "--serve_http=false",
      ],
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      start_new_session=True,
      preexec_fn=_die_with_parent,
    )
    threading.Thread(target=self._forward, name="prism-log", daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"Prism ({path}) exited with {self.proc.returncode} at start")
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        break
      except OSError:
        if time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(
            f"Prism ({path}) did not listen on {self.endpoint} within 60s"
          ) from None
        time.sleep(0.05)

  def _forward(self) -> None:
    for line in self.proc.stdout:
      text = line.decode(errors="replace").rstrip()
      if "empty transform, with payload" not in text:  # Reshuffle's no-op stage, at every start
        self._log.warning("%s", text)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGINT)
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout=5)


_server: JobServer | None = None


def job_server(log_level: str = "warn") -> JobServer:
  """This process's Prism (started on first use, stopped at exit)."""
  global _server
  if _server is None or _server.proc.poll() is not None:
    _server = JobServer(binary(), log_level)
    atexit.register(_server.stop)
  return _server


def prism_options(options: PipelineOptions) -> PipelineOptions:
  """The run's options for Prism: streaming unless --stop is set (batch = --stop=end).

  Starts this process's Prism (``job_server()``) unless --job_endpoint is given: call it
  from the main thread, which must outlive the run (Prism dies with the thread that
  started it)."""
  o = options.view_as(SmartGridOptions)
  if o.stop is not None and os.environ.get("PRISM_ALLOW_BOUNDED") != "1":
    raise PrismUnsupported(
      f"--runner=PrismRunner runs only unbounded streaming (./run_pipeline.sh local without "
      f"--stop); with --stop={o.stop} (batch) Prism 2.77 drops rows buffered in "
      f"GroupIntoBatches when the input ends (see runners/prism.py). Use the default "
      f"runner (FnApiRunner) for batch."
    )
  if o.stop is not None:
    _LOGGER.warning(
      "PRISM_ALLOW_BOUNDED=1: a bounded run on Prism may drop rows buffered in "
      "GroupIntoBatches (see runners/prism.py); for experiments only"
    )
  flags = options.get_all_options(drop_default=True)
  path = binary()
  log_level = flags.get("prism_log_level") or "warn"
  flags.update(
    runner=RUNNER,
    prism_location=str(path),  # documentation only: the runner is given job_endpoint
    job_endpoint=flags.get("job_endpoint") or job_server(log_level).endpoint,
    # The SDK harness runs in this process: the drain file is the launcher's own
    # (see the module doc); its pool listens on 127.0.0.1 only.
    environment_type="EXTERNAL",
    environment_config=worker_pool(),
    streaming=o.stop is None,
    # Prism's own INFO lines (job submitted, stages) would drown the progress line.
    prism_log_level=log_level,
  )
  return PipelineOptions.from_dictionary(flags)
