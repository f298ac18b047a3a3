"""A real single-node Apache Kafka broker (KRaft) for local runs and tests.

Owns: choosing the broker version (``$KAFKA_VERSION``, default 3.9.1, the last
line that still accepts the old protocol versions of kafka-python 2.0.2 with
``api_version=(0, 10, 1)``; 4.1.1 is today's), fetching that version's jars from
Maven Central into ``.cache/kafka/<version>/libs`` (once; later starts need no
network), formatting KRaft storage, starting one combined broker/controller
bound to 127.0.0.1 that creates topics on first use with ``$KAFKA_PARTITIONS``
partitions (default 4), waiting until it answers metadata requests, and
stopping it by PID.

Each broker instance lives in ``.run/kafka-<port>/`` (config, data, log, pid,
the version that formatted it), so the user's broker on 9092 and a test broker
on a free port never collide. Its data is kept across stop/start; delete that
folder to start from nothing.

Command line (what ``./run_pipeline.sh broker ...`` calls)::

    python -m broker.kafka_broker start|stop|status [--port N] [--kafka_version V]
    python -m broker.kafka_broker fetch [--kafka_version V[,V...]]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "broker" / "pom.xml"
LOG4J2_CONFIG = REPO / "broker" / "log4j2.properties"  # Kafka 4.x
LOG4J1_CONFIG = REPO / "broker" / "log4j.properties"  # Kafka 3.x (reload4j)
KAFKA_CACHE = REPO / ".cache" / "kafka"
RUN_ROOT = REPO / ".run"
DEFAULT_PORT = 9092
DEFAULT_VERSION = "3.9.1"
# Versions the test suite runs against (tests/conftest.py, $KAFKA_TEST_VERSIONS).
TESTED_VERSIONS = ("3.9.1", "4.1.1")
DEFAULT_PARTITIONS = 4
# A run folder formatted before versions were recorded was made by the only version then used.
_UNRECORDED_VERSION = "4.1.1"
READY_DEADLINE_S = 90.0


class BrokerError(RuntimeError):
  """A broker could not be fetched, started or stopped; the message says why."""


# --------------------------------------------------------------------------
# Versions and settings from the environment


def parse_version(text: str, what: str = "KAFKA_VERSION") -> str:
  """A Kafka version this module can run (3.7+ or 4.x: KRaft with static voters), else BrokerError."""
  text = (text or "").strip()
  m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
  if not m:
    raise BrokerError(f"{what}={text!r} is not a Kafka version like {DEFAULT_VERSION}")
  major, minor = int(m.group(1)), int(m.group(2))
  if not (major == 4 or (major == 3 and minor >= 7)):
    raise BrokerError(
      f"{what}={text} is not supported: use 3.7.x to 3.9.x or 4.x "
      f"(tested: {', '.join(TESTED_VERSIONS)})"
    )
  return text


def default_version() -> str:
  return parse_version(os.environ.get("KAFKA_VERSION") or DEFAULT_VERSION)


def default_partitions() -> int:
  text = os.environ.get("KAFKA_PARTITIONS") or str(DEFAULT_PARTITIONS)
  try:
    n = int(text)
  except ValueError:
    n = 0
  if not 1 <= n <= 10_000:
    raise BrokerError(f"KAFKA_PARTITIONS={text!r} must be a whole number from 1 to 10000")
  return n


def default_port() -> int:
  text = os.environ.get("KAFKA_PORT") or str(DEFAULT_PORT)
  try:
    port = int(text)
  except ValueError:
    port = 0
  if not 1 <= port <= 65535:
    raise BrokerError(f"KAFKA_PORT={text!r} must be a port number from 1 to 65535")
  return port


def default_bootstrap() -> str:
  """The local broker's address, 127.0.0.1:$KAFKA_PORT: every command's default."""
  return f"127.0.0.1:{default_port()}"


def versions_under_test() -> list[str]:
  """The broker versions the integration tests run against: $KAFKA_TEST_VERSIONS
  (comma-separated), default every tested version, oldest first."""
  text = os.environ.get("KAFKA_TEST_VERSIONS") or ",".join(TESTED_VERSIONS)
  versions = [parse_version(v, "KAFKA_TEST_VERSIONS") for v in text.split(",") if v.strip()]
  if not versions:
    raise BrokerError("KAFKA_TEST_VERSIONS is empty")
  return list(dict.fromkeys(versions))


def major_version(version: str) -> int:
  return int(version.split(".")[0])


def libs_dir(version: str) -> Path:
  return KAFKA_CACHE / version / "libs"


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


def free_port(exclude: Collection[int] = ()) -> int:
  """A port on 127.0.0.1 that is free now (not one of exclude: ports picked for the same service
  but not bound yet). Another program may take it before the caller binds it: callers retry."""
  while True:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port not in exclude:
      return port


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
  """Whether something accepts TCP connections on host:port (quietly: no client logs)."""
  try:
    with socket.create_connection((host, port), timeout=1.0):
      return True
  except OSError:
    return False


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
      f"{'maven' if name == 'mvn' else 'openjdk-17-jre-headless'})."
    )
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


def fetch_jars(version: str | None = None, quiet: bool = True) -> Path:
  """Copies one broker version's jars into .cache/kafka/<version>/libs with Maven, once per
  pom.xml content; concurrent callers (parallel test sessions) wait for each other."""
  version = parse_version(version or default_version())
  libs = libs_dir(version)
  stamp = libs / ".complete"
  profile = "log4j1" if major_version(version) == 3 else "log4j2"
  digest = hashlib.sha256(POM.read_bytes() + f"|{version}|{profile}".encode()).hexdigest()
  if stamp.exists() and stamp.read_text().strip() == digest:
    return libs
  libs.parent.mkdir(parents=True, exist_ok=True)
  with open(libs.parent / ".fetch.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if stamp.exists() and stamp.read_text().strip() == digest:
      return libs
    mvn = _require_tool("mvn")
    _require_tool("java")
    # Into a fresh folder first: a broker of this version may be running from libs right now.
    staging = libs.parent / "libs.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    cmd = [
      mvn,
      "-B",
      "-f",
      str(POM),
      "dependency:copy-dependencies",
      f"-P{profile}",
      f"-Dkafka.version={version}",
      f"-DoutputDirectory={staging}",
      "-DincludeScope=runtime",
    ]
    if quiet:
      cmd.insert(2, "-q")
    print(
      f"Fetching the Kafka {version} broker from Maven Central (first run only)...", file=sys.stderr
    )
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
      shutil.rmtree(staging, ignore_errors=True)
      raise BrokerError(
        f"Maven could not fetch the Kafka {version} broker:\n"
        + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
      )
    (staging / ".complete").write_text(digest)
    if libs.exists():
      old = libs.parent / f"libs.old-{os.getpid()}"
      libs.rename(old)
      shutil.rmtree(old, ignore_errors=True)
    staging.rename(libs)
  return libs


# --------------------------------------------------------------------------
# One broker instance


@dataclass
class Broker:
  """A local broker of Kafka `version` on 127.0.0.1:port whose files live in run_dir.

  version defaults to $KAFKA_VERSION, else to the version that formatted run_dir, else 3.9.1;
  partitions to $KAFKA_PARTITIONS (4): the partition count of topics it creates on first use."""

  port: int = DEFAULT_PORT
  run_dir: Path | None = None
  heap: str = "-Xms256m -Xmx512m"
  version: str | None = None
  partitions: int | None = None

  def __post_init__(self) -> None:
    if self.run_dir is None:
      self.run_dir = RUN_ROOT / f"kafka-{self.port}"
    self.run_dir = Path(self.run_dir)
    if self.version:
      self.version = parse_version(self.version)
    elif os.environ.get("KAFKA_VERSION"):
      self.version = default_version()
    else:
      # Unasked, an existing broker keeps the version that formatted its data (e.g. one made
      # by 4.1.1 before 3.9.1 became the default); a new one gets the default.
      self.version = self.formatted_version() or DEFAULT_VERSION
    if self.partitions is None:
      self.partitions = default_partitions()
    elif self.partitions < 1:
      raise BrokerError(f"partitions must be >= 1, got {self.partitions}")

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

  @property
  def version_file(self) -> Path:
    return self.run_dir / "kafka.version"

  def formatted_version(self) -> str | None:
    """The Kafka version that formatted run_dir's storage, or None if it is not formatted."""
    if not ((self.run_dir / "data" / "meta.properties").exists() and self.config_file.exists()):
      return None
    try:
      return self.version_file.read_text().strip() or _UNRECORDED_VERSION
    except OSError:
      return _UNRECORDED_VERSION

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
      # Kafka's default, which the old ingestion service relies on: the first produce or
      # metadata request for a topic creates it with num.partitions partitions.
      "auto.create.topics.enable": "true",
      "num.partitions": str(self.partitions),
      "default.replication.factor": "1",
      "offsets.topic.replication.factor": "1",
      "offsets.topic.num.partitions": "1",
      "transaction.state.log.replication.factor": "1",
      "transaction.state.log.min.isr": "1",
      "transaction.state.log.num.partitions": "1",
      "group.initial.rebalance.delay.ms": "0",
      "log.cleaner.dedupe.buffer.size": "16777216",
      "log.retention.hours": "168",
    }
    if major_version(self.version) >= 4:
      # Share groups exist from 4.0; 3.x would only warn that these are unknown.
      props["share.coordinator.state.topic.replication.factor"] = "1"
      props["share.coordinator.state.topic.min.isr"] = "1"
    self.config_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

  def _java_cmd(self, main: str, *args: str) -> list[str]:
    if major_version(self.version) >= 4:
      log_config = f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}"
    else:
      log_config = f"-Dlog4j.configuration={LOG4J1_CONFIG.as_uri()}"
    return [
      _require_tool("java"),
      *self.heap.split(),
      "-XX:+UseG1GC",
      "-Djava.awt.headless=true",
      log_config,
      f"-Dkafka.logs.file={self.log_file}",
      f"-Dkafka.logs.dir={self.run_dir}",
      "-cp",
      f"{libs_dir(self.version)}/*",
      main,
      *args,
    ]

  def _check_formatted_version(self, formatted: str) -> None:
    if formatted == self.version:
      return
    raise BrokerError(
      f"the broker data in {self.run_dir} was formatted by Kafka {formatted}, not "
      f"{self.version}: start it with KAFKA_VERSION={formatted}, or delete that folder "
      f"to start a new {self.version} broker from nothing (its topics and offsets are lost)"
    )

  def start(self, deadline_s: float = READY_DEADLINE_S) -> bool:
    """Starts the broker and waits until it answers. False if it already ran."""
    if self.is_running():
      return False
    _require_tool("java")
    formatted = self.formatted_version()
    if formatted is not None:
      self._check_formatted_version(formatted)
    if port_in_use(self.port):
      raise BrokerError(
        f"port {self.port} on 127.0.0.1 is already in use by another program; "
        "stop it or choose another port with KAFKA_PORT=..."
      )
    fetch_jars(self.version)
    # The log is kept across stop/start like a real broker's: topics, offsets and
    # committed group offsets survive (a recreated topic would reuse offsets, which
    # the sinks' unique keys would take for replays).
    if formatted is not None:
      controller_port = int(
        self.config_file.read_text().split("CONTROLLER://127.0.0.1:")[1].split()[0]
      )
      if port_in_use(controller_port):
        raise BrokerError(
          f"the broker's controller port {controller_port} on 127.0.0.1 is in use "
          f"by another program"
        )
      # Rewritten so that a changed $KAFKA_PARTITIONS applies to topics created from now on.
      self._write_config(controller_port)
    else:
      self._format()

    with open(self.run_dir / "broker.out", "wb") as out:
      proc = subprocess.Popen(
        self._java_cmd("kafka.Kafka", str(self.config_file)),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=self.run_dir,
      )
    self.pid_file.write_text(str(proc.pid))
    try:
      self._wait_ready(proc, deadline_s)
    except BaseException:
      self._kill(proc.pid)
      raise
    return True

  def _format(self) -> None:
    if self.run_dir.exists():
      shutil.rmtree(self.run_dir)
    self.run_dir.mkdir(parents=True)
    self._write_config(free_port())
    fmt = subprocess.run(  # noqa: PLW1510 - the return code is checked below
      self._java_cmd(
        "kafka.tools.StorageTool",
        "format",
        "-t",
        _kraft_cluster_id(),
        "-c",
        str(self.config_file),
        "-g",
      ),
      capture_output=True,
      text=True,
    )
    if fmt.returncode != 0:
      raise BrokerError(
        f"formatting KRaft storage for Kafka {self.version} failed:\n" + fmt.stdout + fmt.stderr
      )
    self.version_file.write_text(self.version + "\n")

  def _wait_ready(self, proc: subprocess.Popen, deadline_s: float) -> None:
    from kafka import KafkaAdminClient  # the project's venv has it
    from kafka.errors import RetriableError

    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
      if proc.poll() is not None:
        raise BrokerError(
          f"the Kafka broker died at start (exit {proc.returncode}); end of "
          f"{self.log_file}:\n{_tail(self.log_file)}\n{_tail(self.run_dir / 'broker.out', 10)}"
        )
      # A plain TCP probe first: kafka-python logs every refused connection at ERROR,
      # which would print a screen of ECONNREFUSED while the JVM starts.
      if not _accepts(self.port):
        time.sleep(0.2)
        continue
      try:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=3000)
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
      f"{deadline_s:.0f}s (last error: {last_error}); end of log:\n{_tail(self.log_file)}"
    )

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
    return (
      f"running on {self.bootstrap_servers} (pid {pid}, Kafka "
      f"{self.formatted_version() or self.version}, log {self.log_file})"
    )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="run_pipeline.sh broker",
    description="Manage the local single-node Kafka broker (KRaft, 127.0.0.1 only).",
  )
  parser.add_argument("action", choices=["start", "stop", "status", "fetch"])
  parser.add_argument(
    "--port", type=int, default=None, help="listener port (default: $KAFKA_PORT or 9092)"
  )
  parser.add_argument(
    "--kafka_version",
    default=None,
    help=f"broker version (default: $KAFKA_VERSION or {DEFAULT_VERSION}); "
    "fetch takes a comma-separated list",
  )
  parser.add_argument(
    "--tested",
    action="store_true",
    help="fetch: every version the test suite runs against ($KAFKA_TEST_VERSIONS)",
  )
  args = parser.parse_args(argv)
  try:
    if args.action == "fetch":
      versions = (
        versions_under_test()
        if args.tested
        else (args.kafka_version or default_version()).split(",")
      )
      for v in versions:
        print(fetch_jars(parse_version(v, "--kafka_version")))
      return 0
    broker = Broker(
      port=args.port if args.port is not None else default_port(), version=args.kafka_version
    )
    if args.action == "start":
      if broker.start():
        print(f"Kafka broker started: {broker.status()}")
      else:
        print(f"Kafka broker already running: {broker.status()}")
    elif args.action == "stop":
      print(
        "Kafka broker stopped."
        if broker.stop()
        else f"Kafka broker was not running ({broker.bootstrap_servers})."
      )
    else:
      print(broker.status())
  except BrokerError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
