"""Start and stop the local schema registry (Apicurio Registry) from Python.

All install/start/stop logic lives in ``registry.sh`` next to this file; this module only
calls it with the right environment, so the shell and Python entry points behave the same.

    from schema_registry.control import start_registry

    with start_registry() as registry:   # free ports, empty in-memory storage
        client = SchemaRegistryClient({"url": registry.url})
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from broker.kafka_broker import free_port

SCRIPT = Path(__file__).resolve().with_name("registry.sh")
HOST = "127.0.0.1"
INSTALL_TIMEOUT_S = 900  # about 151 MiB from Maven Central the first time


class RegistryError(RuntimeError):
  """registry.sh failed; the message carries its output (and the registry's log tail)."""


def _run(command: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    ["bash", str(SCRIPT), command],
    env=env,
    stdin=subprocess.DEVNULL,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if proc.returncode != 0:
    raise RegistryError(
      f"registry.sh {command} failed (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}".rstrip()
    )
  return proc


@dataclasses.dataclass
class Registry:
  """A running registry; ``url`` is its Confluent-compatible API root."""

  port: int
  management_port: int
  pid: int
  state_dir: Path
  _env: dict = dataclasses.field(repr=False)
  _remove_state_dir: bool = dataclasses.field(default=False, repr=False)
  _stopped: bool = dataclasses.field(default=False, repr=False)

  @property
  def url(self) -> str:
    return f"http://{HOST}:{self.port}/apis/ccompat/v7"

  @property
  def log_file(self) -> Path:
    return self.state_dir / "registry.log"

  def stop(self) -> None:
    """Stops the registry (by PID, via registry.sh). Safe to call more than once."""
    if self._stopped:
      return
    _run("stop", self._env, timeout=60)
    self._stopped = True
    if self._remove_state_dir:
      shutil.rmtree(self.state_dir, ignore_errors=True)

  def __enter__(self) -> Registry:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def install() -> None:
  """Fetches the registry into .cache/apicurio (what ``registry.sh install`` does)."""
  _run("install", dict(os.environ), timeout=INSTALL_TIMEOUT_S)


def start_registry(
  port: int | None = None,
  management_port: int | None = None,
  *,
  state_dir: os.PathLike | None = None,
  start_timeout: float = 90,
) -> Registry:
  """Starts a registry on 127.0.0.1 and returns once it is ready.

  Free ports are picked when None; ``state_dir`` (log, pid file) is a fresh temporary folder,
  removed by ``stop()``, when None. Raises RegistryError with the reason (no Java 21, port in use...).
  """
  own_state_dir = state_dir is None
  attempts = (
    3 if port is None and management_port is None else 1
  )  # a picked port may be taken meanwhile
  for attempt in range(attempts):
    http_port = port or free_port()
    mgmt_port = management_port or free_port(exclude=(http_port,))
    sdir = Path(tempfile.mkdtemp(prefix="schema-registry-")) if own_state_dir else Path(state_dir)
    env = {
      **os.environ,
      "SCHEMA_REGISTRY_PORT": str(http_port),
      "SCHEMA_REGISTRY_MGMT_PORT": str(mgmt_port),
      "SCHEMA_REGISTRY_STATE_DIR": str(sdir),
      "SCHEMA_REGISTRY_START_TIMEOUT": str(int(start_timeout)),
    }
    try:
      _run("start", env, timeout=INSTALL_TIMEOUT_S + start_timeout + 30)
    except RegistryError as error:
      if own_state_dir:
        shutil.rmtree(sdir, ignore_errors=True)
      if "already in use" in str(error) and attempt + 1 < attempts:
        continue
      raise
    registry = Registry(
      http_port,
      mgmt_port,
      int((sdir / "registry.pid").read_text().strip()),
      sdir,
      env,
      own_state_dir,
    )
    atexit.register(_stop_quietly, registry)  # no orphan if the caller forgets stop()
    return registry
  raise AssertionError("unreachable")


def _stop_quietly(registry: Registry) -> None:
  try:
    registry.stop()
  except Exception:  # noqa: BLE001 - best effort at interpreter exit
    pass
