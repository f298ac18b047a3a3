"""Local BigQuery emulator (PyPI `local-bigquery`) for tests and local trials.

Shell: ``bigquery_emulator/emulator.sh install|start|stop|status``. Python: see ``control``.
"""

from bigquery_emulator.control import Emulator, EmulatorError, install, make_client, start_emulator

__all__ = ["Emulator", "EmulatorError", "install", "make_client", "start_emulator"]
