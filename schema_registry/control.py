"""Start and stop the local schema registry (Apicurio Registry) from Python.

All install/start/stop logic lives in ``registry.sh`` next to this file; this module only
calls it with the right environment, so the shell and Python entry points behave the same.

    from schema_registry.control import start_registry

    with start_registry() as registry:   # free ports, empty in-memory storage
        client = SchemaRegistryClient({"url": registry.url})
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from broker.kafka_broker import free_port
from scripts.service import ScriptedService, run_script, start_service

SCRIPT = Path(__file__).resolve().with_name("registry.sh")
HOST = "127.0.0.1"
INSTALL_TIMEOUT_S = 900  # about 151 MiB from Maven Central the first time


class RegistryError(RuntimeError):
  """registry.sh failed; the message carries its output (and the registry's log tail)."""


@dataclasses.dataclass
class Registry(ScriptedService):
  """A running registry; ``url`` is its Confluent-compatible API root."""

  script = SCRIPT
  error = RegistryError

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


def install() -> None:
  """Fetches the registry into .cache/apicurio (what ``registry.sh install`` does)."""
  run_script(SCRIPT, "install", dict(os.environ), INSTALL_TIMEOUT_S, RegistryError)


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

  def env_for(sdir: Path) -> dict:
    http_port = port or free_port()
    return {
      **os.environ,
      "SCHEMA_REGISTRY_PORT": str(http_port),
      "SCHEMA_REGISTRY_MGMT_PORT": str(management_port or free_port(exclude=(http_port,))),
      "SCHEMA_REGISTRY_STATE_DIR": str(sdir),
      "SCHEMA_REGISTRY_START_TIMEOUT": str(int(start_timeout)),
    }

  def build(sdir: Path, env: dict, remove: bool) -> Registry:
    pid = int((sdir / "registry.pid").read_text().strip())
    ports = int(env["SCHEMA_REGISTRY_PORT"]), int(env["SCHEMA_REGISTRY_MGMT_PORT"])
    return Registry(*ports, pid, sdir, env, remove)

  # A picked port may be taken before the registry binds it: then new ones are picked.
  attempts = 3 if port is None and management_port is None else 1
  return start_service(
    Registry,
    env_for,
    build,
    state_dir=state_dir,
    prefix="schema-registry-",
    attempts=attempts,
    timeout=INSTALL_TIMEOUT_S + start_timeout + 30,
  )
