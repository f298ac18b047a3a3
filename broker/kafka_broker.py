"""A real single-node Apache Kafka broker (KRaft) for local runs and tests.

Owns: fetching the broker's jars from Maven Central into ``.cache/kafka/libs``
(once; later starts need no network), formatting KRaft storage, starting one
combined broker/controller bound to 127.0.0.1, waiting until it answers
metadata requests, and stopping it by PID.

Each broker instance lives in ``.run/kafka-<port>/`` (config, data, log, pid),
so the user's broker on 9092 and a test broker on a free port never collide.
Its data is kept across stop/start; delete that folder to start from nothing.

Command line (what ``./run_pipeline.sh broker ...`` calls)::

    python -m broker.kafka_broker start|stop|status [--port N]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "broker" / "pom.xml"
LOG4J_CONFIG = REPO / "broker" / "log4j2.properties"
LIBS = REPO / ".cache" / "kafka" / "libs"
RUN_ROOT = REPO / ".run"
DEFAULT_PORT = 9092
READY_DEADLINE_S = 90.0


class BrokerError(RuntimeError):
  """A broker could not be fetched, started or stopped; the message says why."""


# --------------------------------------------------------------------------
# Small helpers


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError:
      return True
  return False


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  # A zombie child still answers kill(0); treat it as dead.
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return f.read().split(b")")[-1].split()[0] != b"Z"
  except OSError:
    return False


def _is_kafka_process(pid: int) -> bool:
  try:
    return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
  except OSError:
    return False


def _require_tool(name: str) -> str:
  path = shutil.which(name)
  if not path:
    raise BrokerError(
        f"'{name}' was not found on PATH: the local Kafka broker needs Java 17+"
        f"{' and Maven' if name == 'mvn' else ''} (e.g. apt-get install "
        f"{'maven' if name == 'mvn' else 'openjdk-17-jre-headless'}).")
  return path


def _tail(path: Path, lines: int = 25) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  except OSError:
    return "(no log)"


def _kraft_cluster_id() -> str:
  # Kafka's Uuid: 16 random bytes, URL-safe base64 without padding, never starting with '-'.
  while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not cid.startswith("-"):
      return cid


# --------------------------------------------------------------------------
# Fetching the jars


def fetch_jars(quiet: bool = True) -> Path:
  """Copies the broker's jars into LIBS with Maven, once per pom.xml content."""
  stamp = LIBS / ".complete"
  digest = hashlib.sha256(POM.read_bytes()).hexdigest()
  if stamp.exists() and stamp.read_text().strip() == digest:
    return LIBS
  mvn = _require_tool("mvn")
  _require_tool("java")
  if LIBS.exists():
    shutil.rmtree(LIBS)
  LIBS.mkdir(parents=True)
  cmd = [mvn, "-B", "-f", str(POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={LIBS}", "-DincludeScope=runtime"]
  if quiet:
    cmd.insert(2, "-q")
  print("Fetching the Kafka broker from Maven Central (first run only)...", file=sys.stderr)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise BrokerError("Maven could not fetch the Kafka broker:\n" +
                      "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
  stamp.write_text(digest)
  return LIBS


# --------------------------------------------------------------------------
# One broker instance


@dataclass
class Broker:
  """A local broker on 127.0.0.1:port whose files live in run_dir."""

  port: int = DEFAULT_PORT
  run_dir: Path | None = None
  heap: str = "-Xms256m -Xmx512m"

  def __post_init__(self) -> None:
    if self.run_dir is None:
      self.run_dir = RUN_ROOT / f"kafka-{self.port}"
    self.run_dir = Path(self.run_dir)

  @property
  def bootstrap_servers(self) -> str:
    return f"127.0.0.1:{self.port}"

  @property
  def pid_file(self) -> Path:
    return self.run_dir / "broker.pid"

  @property
  def log_file(self) -> Path:
    return self.run_dir / "broker.log"

  @property
  def config_file(self) -> Path:
    return self.run_dir / "server.properties"

  def pid(self) -> int | None:
    """The broker's PID if it is running, else None (a stale pid file is removed)."""
    try:
      pid = int(self.pid_file.read_text().strip())
    except (OSError, ValueError):
      return None
    if _pid_alive(pid) and _is_kafka_process(pid):
      return pid
    self.pid_file.unlink(missing_ok=True)
    return None

  def is_running(self) -> bool:
    return self.pid() is not None

  # ---- start

  def _write_config(self, controller_port: int) -> None:
    data_dir = self.run_dir / "data"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": "16777216",
        "auto.create.topics.enable": "false",
        "log.retention.hours": "168",
    }
    self.config_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

  def _java_cmd(self, main: str, *args: str) -> list[str]:
    return [_require_tool("java"), *self.heap.split(), "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            f"-Dkafka.logs.file={self.log_file}",
            f"-Dkafka.logs.dir={self.run_dir}",
            "-cp", f"{LIBS}/*", main, *args]

  def start(self, deadline_s: float = READY_DEADLINE_S) -> bool:
    """Starts the broker and waits until it answers. False if it already ran."""
    if self.is_running():
      return False
    _require_tool("java")
    if port_in_use(self.port):
      raise BrokerError(
          f"port {self.port} on 127.0.0.1 is already in use by another program; "
          "stop it or choose another port with KAFKA_PORT=...")
    fetch_jars()
    # The log is kept across stop/start like a real broker's: topics, offsets and
    # committed group offsets survive (a recreated topic would reuse offsets, which
    # the sinks' unique keys would take for replays).
    formatted = (self.run_dir / "data" / "meta.properties").exists() and self.config_file.exists()
    if formatted:
      controller_port = int(self.config_file.read_text().split("CONTROLLER://127.0.0.1:")[1].split()[0])
      if port_in_use(controller_port):
        raise BrokerError(f"the broker's controller port {controller_port} on 127.0.0.1 is in use "
                          f"by another program")
    else:
      if self.run_dir.exists():
        shutil.rmtree(self.run_dir)
      self.run_dir.mkdir(parents=True)
      self._write_config(free_port())
      fmt = subprocess.run(
          self._java_cmd("kafka.tools.StorageTool", "format", "-t", _kraft_cluster_id(),
                         "-c", str(self.config_file), "-g"),
          capture_output=True, text=True)
      if fmt.returncode != 0:
        raise BrokerError("formatting KRaft storage failed:\n" + fmt.stdout + fmt.stderr)

    with open(self.run_dir / "broker.out", "wb") as out:
      proc = subprocess.Popen(
          self._java_cmd("kafka.Kafka", str(self.config_file)),
          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
          start_new_session=True, cwd=self.run_dir)
    self.pid_file.write_text(str(proc.pid))
    try:
      self._wait_ready(proc, deadline_s)
    except BaseException:
      self._kill(proc.pid)
      raise
    return True

  def _wait_ready(self, proc: subprocess.Popen, deadline_s: float) -> None:
    from kafka import KafkaAdminClient  # the project's venv has it
    from kafka.errors import RetriableError
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
      if proc.poll() is not None:
        raise BrokerError(
            f"the Kafka broker died at start (exit {proc.returncode}); end of "
            f"{self.log_file}:\n{_tail(self.log_file)}\n{_tail(self.run_dir / 'broker.out', 10)}")
      try:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers,
                                 request_timeout_ms=3000)
        try:
          admin.describe_cluster()
          return
        finally:
          admin.close()
      except (RetriableError, OSError) as e:
        # not ready yet: retried until the deadline
        last_error = e
        time.sleep(0.3)
    raise BrokerError(
        f"the Kafka broker did not answer on {self.bootstrap_servers} within "
        f"{deadline_s:.0f}s (last error: {last_error}); end of log:\n{_tail(self.log_file)}")

  # ---- stop

  def _kill(self, pid: int, grace_s: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _pid_alive(pid) and time.monotonic() < deadline:
      with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
      time.sleep(0.1)
    if _pid_alive(pid):
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
      os.waitpid(pid, 0)
    self.pid_file.unlink(missing_ok=True)

  def stop(self) -> bool:
    """Stops the broker by its PID. False if it was not running."""
    pid = self.pid()
    if pid is None:
      return False
    self._kill(pid)
    return True

  def status(self) -> str:
    pid = self.pid()
    if pid is None:
      return f"stopped ({self.bootstrap_servers})"
    return f"running on {self.bootstrap_servers} (pid {pid}, log {self.log_file})"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="run_pipeline.sh broker",
      description="Manage the local single-node Kafka broker (KRaft, 127.0.0.1 only).")
  parser.add_argument("action", choices=["start", "stop", "status", "fetch"])
  parser.add_argument("--port", type=int, default=int(os.environ.get("KAFKA_PORT", DEFAULT_PORT)),
                      help="listener port (default: $KAFKA_PORT or 9092)")
  args = parser.parse_args(argv)
  broker = Broker(port=args.port)
  try:
    if args.action == "fetch":
      print(fetch_jars())
    elif args.action == "start":
      if broker.start():
        print(f"Kafka broker started: {broker.status()}")
      else:
        print(f"Kafka broker already running: {broker.status()}")
    elif args.action == "stop":
      print("Kafka broker stopped." if broker.stop() else
            f"Kafka broker was not running ({broker.bootstrap_servers}).")
    else:
      print(broker.status())
  except BrokerError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
