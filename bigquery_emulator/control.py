"""Start and stop the local BigQuery emulator from Python (pytest fixtures, local trials).

All install/start/stop logic lives in ``emulator.sh`` next to this file; this module only calls it
with the right environment, so the shell and the Python entry points behave the same.

    from bigquery_emulator.control import start_emulator, make_client

    with start_emulator() as emu:              # free ports, fresh data dir, project "test-project"
        client = make_client(emu.endpoint, emu.project)
        ...

The emulator runs in its own Python 3.13 venv (see emulator.sh); the caller's interpreter only needs
google-cloud-bigquery for ``make_client``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from broker.kafka_broker import free_port
from scripts.service import ScriptedService, run_script, start_service

SCRIPT = Path(__file__).resolve().with_name("emulator.sh")
HOST = "127.0.0.1"
# Creating the venv downloads ~300 MB of wheels the first time.
INSTALL_TIMEOUT_S = 900


class EmulatorError(RuntimeError):
  """emulator.sh failed; the message carries its output (including the emulator's log tail)."""


@dataclasses.dataclass
class Emulator(ScriptedService):
  """A running emulator. ``endpoint`` is its REST root, e.g. ``http://127.0.0.1:9050``."""

  script = SCRIPT
  error = EmulatorError

  endpoint: str
  project: str
  port: int
  grpc_port: int
  pid: int
  state_dir: Path
  _env: dict[str, str] = dataclasses.field(repr=False)
  _remove_state_dir: bool = dataclasses.field(default=False, repr=False)
  _stopped: bool = dataclasses.field(default=False, repr=False)

  @property
  def grpc_address(self) -> str:
    """Storage Read/Write API address (plain gRPC, no TLS)."""
    return f"{HOST}:{self.grpc_port}"

  @property
  def log_file(self) -> Path:
    return self.state_dir / "emulator.log"

  def client(self):
    return make_client(self.endpoint, self.project)


def install() -> None:
  """Create or refresh the emulator's venv (what `emulator.sh install` does)."""
  run_script(SCRIPT, "install", dict(os.environ), INSTALL_TIMEOUT_S, EmulatorError)


def start_emulator(
  port: int | None = None,
  project: str = "test-project",
  *,
  grpc_port: int | None = None,
  state_dir: str | os.PathLike | None = None,
  start_timeout: float = 60,
) -> Emulator:
  """Start an emulator on 127.0.0.1 and return once its HTTP API answers.

  ``port``/``grpc_port``: free ports are picked when None. ``state_dir`` holds data, log and pid file;
  when None a fresh temporary directory is used and removed by ``stop()``. Installs the venv first if
  it is missing (slow once). Raises EmulatorError with the reason (no Python 3.13, port in use, ...).
  """

  def env_for(sdir: Path) -> dict:
    http_port = port or free_port()
    return {
      **os.environ,
      "BQ_EMULATOR_PORT": str(http_port),
      "BQ_EMULATOR_GRPC_PORT": str(grpc_port or free_port(exclude=(http_port,))),
      "BQ_EMULATOR_PROJECT": project,
      "BQ_EMULATOR_STATE_DIR": str(sdir),
      "BQ_EMULATOR_START_TIMEOUT": str(int(start_timeout)),
    }

  def build(sdir: Path, env: dict, remove: bool) -> Emulator:
    http_port, rpc_port = int(env["BQ_EMULATOR_PORT"]), int(env["BQ_EMULATOR_GRPC_PORT"])
    return Emulator(
      endpoint=f"http://{HOST}:{http_port}",
      project=project,
      port=http_port,
      grpc_port=rpc_port,
      pid=int((sdir / "emulator.pid").read_text().strip()),
      state_dir=sdir,
      _env=env,
      _remove_state_dir=remove,
    )

  # A picked free port can be taken before the emulator binds it: then new ones are picked.
  attempts = 3 if port is None or grpc_port is None else 1
  return start_service(
    Emulator,
    env_for,
    build,
    state_dir=state_dir,
    prefix="bq-emulator-",
    attempts=attempts,
    timeout=INSTALL_TIMEOUT_S + start_timeout + 30,
  )


def make_client(endpoint: str, project: str):
  """A google.cloud.bigquery.Client talking to the emulator at ``endpoint`` without credentials."""
  from google.api_core.client_options import ClientOptions
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import bigquery

  return bigquery.Client(
    project=project,
    credentials=AnonymousCredentials(),
    client_options=ClientOptions(api_endpoint=endpoint),
  )
