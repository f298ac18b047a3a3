"""What every benchmark here needs: a broker and a scratch folder, and the sink's row count."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from broker.kafka_broker import Broker, free_port

SINK_TABLES = ("sensor_readings", "meter_readings", "dead_letters")


@contextlib.contextmanager
def bench_broker(bootstrap: Optional[str], prefix: str) -> Iterator[tuple[str, Path]]:
  """(bootstrap servers, scratch folder): the given broker, or one started here on a free
  port; the broker this started and the folder are gone afterwards."""
  work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
  broker = None
  try:
    if bootstrap is None:
      broker = Broker(port=free_port(), run_dir=work / "kafka")
      broker.start()
      bootstrap = broker.bootstrap_servers
    yield bootstrap, work
  finally:
    if broker is not None:
      broker.stop()
    shutil.rmtree(work, ignore_errors=True)


def sink_rows(db: Path) -> int:
  """Rows in all three tables of a SQLite sink, read-only (also while a run writes it);
  0 before it has its tables."""
  if not Path(db).exists():
    return 0
  try:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
      return sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in SINK_TABLES)
    finally:
      conn.close()
  except sqlite3.OperationalError:  # tables not created yet
    return 0
