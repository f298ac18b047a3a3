"""A restarted worker of ``--local_workers``: ``python -m runners.worker --partition_shard=I/N``
(started by runners/workers.py; the shard in argv only labels the process).

Reads its job from stdin (JSON: the supervisor's options as Beam's ``get_all_options``,
the mode, its shard index and count, the run's drain file) and calls
``local.run_worker``: the user's command line is not parsed again, and no option value
(credentials included) is written to disk or shows in the process's argv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runners import local, workers
from runners.main import configure_logging


def main() -> int:
  configure_logging()
  job = json.loads(sys.stdin.read())
  return local.run_worker(
    workers.options_of(job), job["mode"], job["index"], job["count"], Path(job["drain_file"])
  )


if __name__ == "__main__":
  sys.exit(main())
