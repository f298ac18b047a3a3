"""Helpers for the pipeline's integration tests: the pipeline as a real subprocess,
an independent producer (also in a background thread), and the sink and the group's
offsets read back for an offset-by-offset comparison with the topic."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from kafka import KafkaProducer

from tests import support
from tools.produce import EventFactory

REPO = Path(__file__).resolve().parent.parent
TABLES = ("sensor_readings", "meter_readings", "dead_letters")


def prism_binary() -> Path | None:
  """The Prism binary runners/prism.py would use ($PRISM_BIN or .cache/prism-127/bin/prism),
  or None when it is not built (``./run_pipeline.sh prism build``)."""
  path = Path(os.environ.get("PRISM_BIN") or REPO / ".cache" / "prism-127" / "bin" / "prism")
  return path if path.is_file() and os.access(path, os.X_OK) else None


class Pipeline:
  """``python -m runners.main`` in a subprocess; stderr goes to a file (never a full pipe).

  runner: None or "FnApiRunner" = the default local engine (no --runner flag), else
  passed as --runner (e.g. "PrismRunner")."""

  def __init__(
    self,
    bootstrap: str,
    sensor_topic: str,
    meter_topic: str,
    group: str,
    work_dir: Path,
    *extra: str,
    mode: str = "local",
    log_name: str | None = None,
    runner: str | None = None,
  ):
    self.db = work_dir / "out.db"
    self.drain_file = work_dir / "drain"
    self.pid_file = self.drain_file.with_suffix(".pid")
    Pipeline._runs = getattr(Pipeline, "_runs", 0) + 1
    self.log = work_dir / (log_name or f"run-{Pipeline._runs}-{mode}.log")
    self.args = [
      sys.executable,
      "-m",
      "runners.main",
      f"--mode={mode}",
      "--bootstrap_servers",
      bootstrap,
      "--sensor_topic",
      sensor_topic,
      "--meter_topic",
      meter_topic,
      "--group_id",
      group,
      "--sink",
      f"sqlite:///{self.db}",
      "--drain_file",
      str(self.drain_file),
      "--progress_secs",
      "1",
      *([f"--runner={runner}"] if runner not in (None, "FnApiRunner") else []),
      # One process unless a test asks for workers: the summaries parsed here are a
      # single pipeline's (test_two_local_workers_* covers --local_workers=2).
      *([] if any(a.startswith("--local_workers") for a in extra) else ["--local_workers=1"]),
      *extra,
    ]
    self._log_handle = open(self.log, "w")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    self.proc = subprocess.Popen(
      self.args, cwd=str(REPO), env=env, stdout=self._log_handle, stderr=subprocess.STDOUT
    )

  @property
  def output(self) -> str:
    return self.log.read_text(errors="replace")

  def alive(self) -> bool:
    return self.proc.poll() is None

  def wait(self, timeout: float = 120.0) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"pipeline did not exit within {timeout:.0f}s:\n{self.tail()}") from None
    finally:
      self._log_handle.close()

  def terminate(self) -> None:
    self.proc.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=30)
    self._log_handle.close()

  def tail(self, n: int = 40) -> str:
    return "\n".join(self.output.splitlines()[-n:])

  def read_count(self) -> int:
    """The latest 'read N' of the progress lines (0 before the first)."""
    found = re.findall(r"\](?: round \d+)? read (\d+) \|", self.output)
    return int(found[-1]) if found else 0

  def summary_batches(self) -> int | None:
    m = re.search(r"^\s+batches:\s+(\d+)", self.output, re.M)
    return int(m.group(1)) if m else None

  def _summary_sum(self, label: str) -> int:
    m = re.search(rf"^\s+{label}:\s+(.*)$", self.output, re.M)
    assert m, self.tail()
    return sum(int(n) for n in re.findall(r"=(\d+)", m.group(1)))

  def summary_read(self) -> int:
    return self._summary_sum("records read")

  def summary_written(self) -> int:
    return self._summary_sum("rows written")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill()


def run_to_end(*args, timeout: float = 120.0, **kwargs) -> Pipeline:
  """A --mode=batch run to its exit; returns the finished Pipeline (check .proc.returncode)."""
  p = Pipeline(*args, mode="batch", **kwargs)
  p.wait(timeout)
  return p


# ---------------------------------------------------------------------------
# The sink


def sink_offsets(db: Path) -> dict[str, list[tuple[str, int, int]]]:
  """table -> every (topic, partition, offset) row, duplicates kept ({} if no file yet)."""
  if not db.exists():
    return {}
  conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
  try:
    out = {}
    for table in TABLES:
      try:
        out[table] = [
          tuple(r)
          for r in conn.execute(f"SELECT kafka_topic, kafka_partition, kafka_offset FROM {table}")
        ]
      except sqlite3.OperationalError as e:
        if "no such table" not in str(e):
          raise
        out[table] = []
    return out
  finally:
    conn.close()


def row_count(db: Path) -> int:
  return sum(len(v) for v in sink_offsets(db).values())


def query(db: Path, sql: str, params: tuple = ()) -> list:
  conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
  try:
    return conn.execute(sql, params).fetchall()
  finally:
    conn.close()


def assert_exactly_once(db: Path, produced: Iterable[tuple[str, int, int]]) -> dict:
  """Every produced (topic, partition, offset) is in exactly one table exactly once, and
  the sink holds nothing else. Returns table -> rows."""
  by_table = sink_offsets(db)
  everything = Counter(r for rows in by_table.values() for r in rows)
  duplicates = {k: n for k, n in everything.items() if n > 1}
  assert not duplicates, (
    f"{len(duplicates)} offsets written more than once, e.g. {list(duplicates)[:5]}"
  )
  produced = set(produced)
  missing = produced - set(everything)
  extra = set(everything) - produced
  assert not missing, f"{len(missing)} produced offsets not in the sink, e.g. {sorted(missing)[:5]}"
  assert not extra, f"{len(extra)} rows for offsets never produced, e.g. {sorted(extra)[:5]}"
  return by_table


def contiguous_frontier(db: Path, topic: str, partition: int, start: int = 0) -> int:
  """1 + the highest offset written contiguously from start (start if none)."""
  offsets = {
    o for rows in sink_offsets(db).values() for (t, p, o) in rows if t == topic and p == partition
  }
  f = start
  while f in offsets:
    f += 1
  return f


def committed(bootstrap: str, group: str, *topics: str) -> dict[tuple[str, int], int | None]:
  out = {}
  for t in topics:
    for p, o in support.committed_offsets(bootstrap, group, t).items():
      out[(t, p)] = o
  return out


def ends(bootstrap: str, *topics: str) -> dict[tuple[str, int], int]:
  return {(t, p): o for t in topics for p, o in support.end_offsets(bootstrap, t).items()}


def assert_commits_not_past_sink(bootstrap: str, group: str, db: Path, *topics: str) -> dict:
  c = committed(bootstrap, group, *topics)
  for (t, p), o in c.items():
    if o is not None:
      frontier = contiguous_frontier(db, t, p)
      assert o <= frontier, (
        f"{t}-{p}: committed {o} is past the sink's contiguous frontier {frontier}"
      )
  return c


# ---------------------------------------------------------------------------
# Producing


def produce_events(
  bootstrap: str, sensor_topic: str, meter_topic: str, events, *, timestamp_ms: int | None = None
) -> list[tuple[str, int, int]]:
  """Writes tools.produce.Event values; returns their (topic, partition, offset)."""
  producer = KafkaProducer(
    bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=2 * 1024 * 1024
  )
  try:
    futures = []
    for ev in events:
      topic = sensor_topic if ev.topic_kind == "sensor" else meter_topic
      futures.append(
        (topic, producer.send(topic, key=ev.key, value=ev.value, timestamp_ms=timestamp_ms))
      )
    producer.flush()
    return [(t, m.partition, m.offset) for t, m in ((t, f.get(timeout=30)) for t, f in futures)]
  finally:
    producer.close()


class BackgroundProducer:
  """Writes events at about `rate`/s from a thread until stop(); records every acked offset."""

  def __init__(
    self,
    bootstrap: str,
    sensor_topic: str,
    meter_topic: str,
    rate: float = 500.0,
    bad_ratio: float = 0.02,
    seed: int = 13,
  ):
    self._bootstrap = bootstrap
    self._topics = (sensor_topic, meter_topic)
    self._rate = rate
    self._bad_ratio = bad_ratio
    self._factory = EventFactory(seed)
    self._stop = threading.Event()
    self.produced: list[tuple[str, int, int]] = []
    self.error: BaseException | None = None
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

  def start(self) -> BackgroundProducer:
    self._thread.start()
    return self

  def count(self) -> int:
    with self._lock:
      return len(self.produced)

  def _record(self, topic):
    def cb(meta):
      with self._lock:
        self.produced.append((topic, meta.partition, meta.offset))

    return cb

  def _run(self):
    producer = KafkaProducer(
      bootstrap_servers=self._bootstrap, acks="all", linger_ms=5, max_request_size=2 * 1024 * 1024
    )
    sensor_topic, meter_topic = self._topics
    started = time.monotonic()
    i = 0
    try:
      while not self._stop.is_set():
        ev = next(self._factory.events(1, bad_ratio=self._bad_ratio))
        topic = sensor_topic if ev.topic_kind == "sensor" else meter_topic
        producer.send(topic, key=ev.key, value=ev.value).add_callback(self._record(topic))
        i += 1
        delay = started + i / self._rate - time.monotonic()
        if delay > 0:
          time.sleep(delay)
      producer.flush(timeout=30)
    except BaseException as e:  # noqa: BLE001 - reported by stop()
      self.error = e
    finally:
      producer.close()

  def stop(self) -> list[tuple[str, int, int]]:
    self._stop.set()
    self._thread.join(timeout=60)
    assert not self._thread.is_alive(), "producer thread did not stop"
    assert self.error is None, f"producer failed: {self.error!r}"
    with self._lock:
      return list(self.produced)


# ---------------------------------------------------------------------------
# A test's world: fresh topics, a group and a work dir


class PipelineEnv:
  """Fresh sensor and meter topics (``partitions`` each), a fresh group, a work dir, and
  the runs and checks the integration tests share. ``runner`` is the streaming engine."""

  def __init__(
    self, bootstrap: str, make_topic, work_dir: Path, runner: str | None = None, partitions: int = 2
  ):
    import uuid  # pylint: disable=import-outside-toplevel

    self.bs = bootstrap
    self.sensor = make_topic(partitions, "sensor")
    self.meter = make_topic(partitions, "meter")
    self.group = f"g-{uuid.uuid4().hex[:8]}"
    self.dir = work_dir
    self.db = work_dir / "out.db"
    self.runner = runner

  def pipeline(self, *extra, mode: str = "local", runner: str | None = "default") -> Pipeline:
    return Pipeline(
      self.bs,
      self.sensor,
      self.meter,
      self.group,
      self.dir,
      *extra,
      mode=mode,
      runner=self.runner if runner == "default" else runner,
    )

  def batch(self, *extra, timeout: float = 120.0) -> Pipeline:
    return run_to_end(
      self.bs, self.sensor, self.meter, self.group, self.dir, *extra, timeout=timeout
    )

  def produce(self, events, **kw) -> list[tuple[str, int, int]]:
    return produce_events(self.bs, self.sensor, self.meter, list(events), **kw)

  def committed(self) -> dict:
    return committed(self.bs, self.group, self.sensor, self.meter)

  def ends(self) -> dict:
    return ends(self.bs, self.sensor, self.meter)

  def commits_not_past_sink(self) -> dict:
    return assert_commits_not_past_sink(self.bs, self.group, self.db, self.sensor, self.meter)

  def assert_committed_equals_end(self) -> None:
    """Every partition's committed offset is its end offset (None only where it is 0)."""
    c, e = self.committed(), self.ends()
    assert {k: v for k, v in c.items() if v or e[k]} == {k: v for k, v in e.items() if v}, (c, e)


def produce_transactions(
  bootstrap: str,
  sensor_topic: str,
  meter_topic: str,
  events,
  *,
  abort_every: int = 3,
  per_txn: int = 10,
) -> list[tuple[str, int, int]]:
  """Writes events in transactions of ``per_txn``, aborting every ``abort_every``-th one.

  Returns the (topic, partition, offset) of the committed records only: aborted records
  and the commit/abort markers take offsets that no record covers.
  """
  producer = support.transactional_producer(bootstrap)
  kept: list[tuple[str, int, int]] = []
  try:
    events = list(events)
    for n, i in enumerate(range(0, len(events), per_txn)):
      producer.begin_transaction()
      futures = []
      for ev in events[i : i + per_txn]:
        topic = sensor_topic if ev.topic_kind == "sensor" else meter_topic
        futures.append((topic, producer.send(topic, key=ev.key, value=ev.value)))
      producer.flush()
      offsets = [
        (t, m.partition, m.offset) for t, m in ((t, f.get(timeout=30)) for t, f in futures)
      ]
      if abort_every and n % abort_every == abort_every - 1:
        producer.abort_transaction()
      else:
        producer.commit_transaction()
        kept.extend(offsets)
  finally:
    producer.close()
  return kept
