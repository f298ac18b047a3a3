"""Local services that a shell script installs, starts and stops (the schema registry, the
BigQuery emulator): the Python side, shared by their ``control`` modules.

The script owns install/start/stop; this module runs it, starts a service in a state folder
(a fresh temporary one by default, removed on stop) and tries again on new free ports when a
port it picked was taken meanwhile, and stops the service once: by PID through the script, at
interpreter exit at the latest.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar


def run_script(
  script: Path, command: str, env: dict, timeout: float, error: type[Exception]
) -> subprocess.CompletedProcess:
  """``bash script command``; ``error`` with the script's output when it fails."""
  proc = subprocess.run(
    ["bash", str(script), command],
    env=env,
    stdin=subprocess.DEVNULL,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if proc.returncode != 0:
    raise error(
      f"{script.name} {command} failed (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}".rstrip()
    )
  return proc


class ScriptedService:
  """What a running service's dataclass gets: ``stop()`` and use as a context manager.

  Subclasses set ``script`` and ``error`` and have the fields ``state_dir``, ``_env``,
  ``_remove_state_dir`` and ``_stopped``.
  """

  script: ClassVar[Path]
  error: ClassVar[type[Exception]]

  def stop(self) -> None:
    """Stops the service (by PID, via its script). Safe to call more than once."""
    if self._stopped:
      return
    run_script(self.script, "stop", self._env, 60, self.error)
    self._stopped = True
    if self._remove_state_dir:
      shutil.rmtree(self.state_dir, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


S = TypeVar("S", bound=ScriptedService)


def start_service(
  kind: type[S],
  env_for: Callable[[Path], dict],
  build: Callable[[Path, dict, bool], S],
  *,
  state_dir,
  prefix: str,
  attempts: int,
  timeout: float,
) -> S:
  """Runs ``kind.script start`` with ``env_for(state folder)`` (which picks the ports) and
  returns ``build(state folder, env, remove the folder on stop)``; up to ``attempts`` times
  when a port was taken in the meantime."""
  own_state_dir = state_dir is None
  for attempt in range(attempts):
    sdir = Path(tempfile.mkdtemp(prefix=prefix)) if own_state_dir else Path(state_dir)
    env = env_for(sdir)
    try:
      run_script(kind.script, "start", env, timeout, kind.error)
    except kind.error as error:
      if own_state_dir:
        shutil.rmtree(sdir, ignore_errors=True)
      if "already in use" in str(error) and attempt + 1 < attempts:
        continue
      raise
    service = build(sdir, env, own_state_dir)
    atexit.register(_stop_quietly, service)  # no orphan if the caller forgets stop()
    return service
  raise AssertionError("unreachable")


def _stop_quietly(service: ScriptedService) -> None:
  try:
    service.stop()
  except Exception:  # noqa: BLE001 - best effort at interpreter exit
    pass
