"""``./run_pipeline.sh chaos [--minutes N] [--cycles N] [--seed S]``: faults at random, then audit.

Starts its own Kafka broker (free port, temporary folder) and SQLite sink, produces
continuously into both topics (valid events, malformed input of every kind, repeated
event_ids, every codec, committed and aborted transactions; ``tools.chaos_traffic``),
runs the local pipeline (``--local_workers=2``) and injects, one at a time in a seeded
random order:

- ``kill_worker``: SIGKILL one worker (a child of the supervisor);
- ``kill_all``: SIGKILL every process of the pipeline's tree, then start it again;
- ``term_all``: SIGTERM to every process of the tree at once (systemd's KillMode=control-group,
  ``pkill -f``); it must drain and exit 0; then start it again;
- ``broker_restart``: stop the broker for a few to tens of seconds, start it again (data kept);
- ``sink_lock``: the sink fails for a while (BEGIN EXCLUSIVE held from another connection).

A fault is survived when the pipeline heals by itself: within ``--recovery_secs`` the group's
committed offsets pass every record acknowledged before the fault, with the pipeline running
(and, for ``term_all``, the tree drained with exit code 0). When it does not, chaos restarts
the pipeline as an operator would, says so, and goes on. At the end it stops producing, waits
for the pipeline to catch up, drains it, runs ``audit --strict`` and prints one table. Exit 0
only if the audit is clean and every fault was survived. Everything it started is stopped by
PID at the end (also on Ctrl-C or SIGTERM); its folder is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_LOGGER = logging.getLogger(__name__)
FAULTS = ("kill_worker", "kill_all", "term_all", "broker_restart", "sink_lock")


def _count(conn: sqlite3.Connection, table: str) -> int:
  return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@dataclass
class ChaosConfig:
  minutes: float = 10.0
  cycles: int | None = None
  seed: int = 0
  rate: float = 100.0
  workers: int = 2
  faults: tuple = FAULTS
  gap_secs: tuple = (2.0, 10.0)
  broker_down_secs: tuple = (3.0, 30.0)
  sink_lock_secs: tuple = (3.0, 30.0)
  recovery_secs: float = 120.0
  keep: bool = False


@dataclass
class Tally:
  injected: int = 0
  survived: int = 0
  notes: list = field(default_factory=list)  # what went wrong, per failed injection


def _interrupt(signum, _frame):
  raise KeyboardInterrupt(signal.Signals(signum).name)


class ChaosRun:
  """One chaos run: set up, inject, finish, clean up (see the module doc)."""

  def __init__(self, cfg: ChaosConfig):
    self.cfg = cfg
    self.rng = random.Random(cfg.seed)
    self.tally = {k: Tally() for k in cfg.faults}
    self.events: list = []  # (elapsed, text) of everything that happened
    self.restarts_by_chaos = 0
    self.unprovoked_exits = 0
    self.dir = Path(tempfile.mkdtemp(prefix=f"chaos-{cfg.seed}-"))
    self.db = self.dir / "sink.db"
    self.started = time.monotonic()
    self.broker = self.traffic = self.pipeline = self.view = None
    self._lock = None
    self.topics = ("chaos-sensor", "chaos-meter")
    self.group = "chaos-pipeline"

  def say(self, text: str) -> None:
    elapsed = time.monotonic() - self.started
    self.events.append((round(elapsed, 1), text))
    print(f"[{elapsed:6.0f}s] {text}", file=sys.stderr, flush=True)

  # -- set-up and clean-up

  def setup(self) -> None:
    from broker.kafka_broker import Broker, free_port
    from tools.chaos_faults import CommitView, PipelineProcess
    from tools.chaos_traffic import Traffic
    from tools.produce import ensure_topics

    self.broker = Broker(port=free_port(), run_dir=self.dir / "kafka")
    self.broker.start()
    bootstrap = self.broker.bootstrap_servers
    ensure_topics(bootstrap, list(self.topics), partitions=4)
    self.say(f"broker on {bootstrap}, folder {self.dir}, seed {self.cfg.seed}")
    self.traffic = Traffic(bootstrap, *self.topics, seed=self.cfg.seed, rate=self.cfg.rate).start()
    self.pipeline = PipelineProcess(self.pipeline_args(), self.dir / "pipeline.log")
    self.pipeline.start()
    self.view = CommitView(bootstrap, self.group)
    # Faults start from a pipeline that works: up, reading, committing what was produced.
    deadline = time.monotonic() + 60
    while not self.traffic.frontier() and time.monotonic() < deadline:
      time.sleep(0.2)
    ok, note = self.await_progress(self.traffic.frontier(), max(self.cfg.recovery_secs, 180))
    self.say(f"pipeline up: {note}" if ok else f"warning: the pipeline is not up: {note}")

  def pipeline_args(self) -> list[str]:
    return [
      "--bootstrap_servers",
      self.broker.bootstrap_servers,
      "--sensor_topic",
      self.topics[0],
      "--meter_topic",
      self.topics[1],
      "--group_id",
      self.group,
      "--sink",
      f"sqlite:///{self.db}",
      "--drain_file",
      str(self.dir / "drain"),
      f"--local_workers={self.cfg.workers}",
      "--progress_secs=10",
    ]

  def cleanup(self) -> None:
    # A second Ctrl-C must not leave a broker or a pipeline behind: finish cleaning first.
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, signal.SIG_IGN)
    for step in (
      lambda: self.traffic and self.traffic.stop(timeout=15),
      lambda: self._lock and self._lock.release(),
      lambda: self.pipeline and self.pipeline.kill(),
      lambda: self.view and self.view.close(),
      lambda: self.broker and self.broker.stop(),
    ):
      try:
        step()
      except Exception as e:  # noqa: BLE001 - clean up the rest whatever one step says
        print(f"warning: clean-up step failed: {e!r}", file=sys.stderr)
    if self.cfg.keep:
      print(f"kept: {self.dir} (pipeline.log, sink.db, kafka/)", file=sys.stderr)
    else:
      shutil.rmtree(self.dir, ignore_errors=True)

  # -- waiting

  def await_progress(self, target: dict, timeout: float) -> tuple[bool, str]:
    """Until the committed offsets pass target with the pipeline running: (ok, what happened)."""
    began = time.monotonic()
    keys = sorted(target)
    while time.monotonic() - began < timeout:
      if not self.pipeline.running():
        return False, f"pipeline exited with code {self.pipeline.returncode()}"
      committed = self.view.committed(keys)
      if committed is not None and all((committed[k] or 0) >= v for k, v in target.items()):
        return True, f"caught up in {time.monotonic() - began:.0f}s"
      time.sleep(0.5)
    committed = self.view.committed(keys) or {}
    behind = [
      f"{t}-{p} at {committed.get((t, p))} < {v}"
      for (t, p), v in sorted(target.items())
      if (committed.get((t, p)) or 0) < v
    ]
    return False, f"not caught up within {timeout:.0f}s: {', '.join(behind) or 'broker away'}"

  def restart_pipeline(self, why: str) -> None:
    """The operator's move after a fault was not survived: stop what is left, start again."""
    self.restarts_by_chaos += 1
    self.say(f"  chaos restarts the pipeline ({why})")
    if self.pipeline.running() and self.pipeline.drain(60) is None:
      self.say("  the drain hung for 60s: SIGKILL")
    self.pipeline.kill()
    self.pipeline.start()
    ok, note = self.await_progress(self.traffic.frontier(), self.cfg.recovery_secs)
    if not ok:
      self.say(f"  after the restart: {note}")

  def pause(self, seconds: float) -> None:
    """Waits between faults; a pipeline that exits meanwhile is counted and restarted."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      if not self.pipeline.running():
        self.unprovoked_exits += 1
        self.restart_pipeline(f"it exited by itself with code {self.pipeline.returncode()}")
      time.sleep(0.2)

  # -- the faults

  def run_faults(self) -> None:
    cfg = self.cfg
    bag: list = []
    n = 0
    end = self.started + cfg.minutes * 60
    while (cfg.cycles is None or n < cfg.cycles) and time.monotonic() < end:
      self.pause(self.rng.uniform(*cfg.gap_secs))
      if not bag:
        bag = list(cfg.faults)
        self.rng.shuffle(bag)
      kind = bag.pop()
      n += 1
      target = self.traffic.frontier()
      self.say(f"fault {n}{'' if cfg.cycles is None else f'/{cfg.cycles}'}: {kind}")
      survived, note = getattr(self, f"_fault_{kind}")(target)
      tally = self.tally[kind]
      tally.injected += 1
      tally.survived += survived
      self.say(f"  {'survived' if survived else 'NOT SURVIVED'}: {note}")
      if not survived:
        tally.notes.append(note)
        # Some faults end with a restart of their own (term_all): restart only what is stuck.
        if not self.await_progress(target, 1.0)[0]:
          self.restart_pipeline(f"{kind} not survived")

  def _fault_kill_worker(self, target: dict) -> tuple[bool, str]:
    workers = self.pipeline.workers()
    if not workers:
      return False, "no worker to kill (the supervisor has no children)"
    victim = self.rng.choice(sorted(workers))
    os.kill(victim, signal.SIGKILL)
    ok, note = self.await_progress(target, self.cfg.recovery_secs)
    return ok, f"worker {victim} killed; {note}"

  def _fault_kill_all(self, target: dict) -> tuple[bool, str]:
    pids = self.pipeline.tree()
    self.pipeline.kill()
    self.pipeline.start()
    ok, note = self.await_progress(target, self.cfg.recovery_secs)
    return ok, f"SIGKILL to {len(pids)} processes, restarted; {note}"

  def _fault_term_all(self, target: dict) -> tuple[bool, str]:
    pids = self.pipeline.signal_tree(signal.SIGTERM)
    code = self.pipeline.wait(180, also=tuple(pids[1:]))
    if code is None:
      self.pipeline.kill()
    self.pipeline.start()
    ok, note = self.await_progress(target, self.cfg.recovery_secs)
    drained = code == 0
    what = (
      "drained (exit 0)"
      if drained
      else "did not exit within 180s"
      if code is None
      else f"exit code {code}, not a drain"
    )
    return ok and drained, f"SIGTERM to {len(pids)} processes at once: {what}; restarted; {note}"

  def _fault_broker_restart(self, target: dict) -> tuple[bool, str]:
    down = self.rng.uniform(*self.cfg.broker_down_secs)
    self.broker.stop()
    time.sleep(down)
    self.broker.start()
    ok, note = self.await_progress(target, self.cfg.recovery_secs)
    return ok, f"broker down {down:.0f}s; {note}"

  def _fault_sink_lock(self, target: dict) -> tuple[bool, str]:
    from tools.chaos_faults import SinkLock

    seconds = self.rng.uniform(*self.cfg.sink_lock_secs)
    self._lock = SinkLock(self.db, seconds).start()
    self._lock.released.wait(seconds + 180)
    error = self._lock.error
    self._lock = None
    if error is not None:
      return False, f"the sink lock could not be taken: {error!r}"
    ok, note = self.await_progress(target, self.cfg.recovery_secs)
    return ok, f"sink locked {seconds:.0f}s; {note}"

  # -- the end

  def finish(self) -> dict:
    """Stop producing, catch up, drain, audit --strict; the result as a dict."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import SmartGridOptions
    from tools.audit import format_report, run_audit
    from tools.chaos_traffic import describe

    self.traffic.stop()
    final = self.traffic.frontier()
    self.say(f"producers stopped ({self.traffic.produced()} events acknowledged); catching up")
    if not self.pipeline.running():
      self.unprovoked_exits += 1
      self.restart_pipeline(f"it had exited with code {self.pipeline.returncode()}")
    caught_up, note = self.await_progress(final, max(self.cfg.recovery_secs, 180))
    self.say(f"final catch-up: {note}")
    drain_code = self.pipeline.drain(180)
    self.say(f"drain: exit code {drain_code}")
    if drain_code is None:
      self.pipeline.kill()
    o = PipelineOptions(self.pipeline_args()).view_as(SmartGridOptions)
    report = run_audit(o, strict=True)
    audit_text = format_report(report)
    totals = report.to_json()["totals"]
    rows, dead = self._sink_counts()
    return {
      "seed": self.cfg.seed,
      "elapsed_s": round(time.monotonic() - self.started, 1),
      "faults": {
        k: {"injected": t.injected, "survived": t.survived, "notes": t.notes}
        for k, t in self.tally.items()
      },
      "restarts_by_chaos": self.restarts_by_chaos,
      "unprovoked_exits": self.unprovoked_exits,
      "produced": self.traffic.produced(),
      "traffic": describe(self.traffic.counts),
      "send_errors": dict(self.traffic.errors),
      "records": totals["records"],
      "rows": rows,
      "dead_letters": dead,
      "duplicate_events": totals["duplicate_events"],
      "repeated_event_ids_in_sink": report.repeated_event_ids,
      "lost": totals["missing"],
      "duplicated": totals["doubled"],
      "not_records": totals["not_records"],
      "committed_ahead": totals["committed_ahead"],
      "final_catch_up": caught_up,
      "drain_exit_code": drain_code,
      "audit_ok": report.ok,
      "audit_text": audit_text,
    }

  def _sink_counts(self) -> tuple[int, int]:
    if not self.db.exists():
      return 0, 0
    conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=60)
    try:
      return _count(conn, "sensor_readings") + _count(conn, "meter_readings"), _count(
        conn, "dead_letters"
      )
    finally:
      conn.close()


def result_ok(result: dict) -> bool:
  survived = all(f["survived"] == f["injected"] for f in result["faults"].values())
  return bool(result["audit_ok"]) and survived and result["lost"] == 0 and result["duplicated"] == 0


def format_table(r: dict) -> str:
  faults = sum(f["injected"] for f in r["faults"].values())
  lines = [
    f"Chaos run, seed {r['seed']}: {faults} faults in {r['elapsed_s']:.0f}s",
    f"  {'fault':<18}{'injected':>9}{'survived':>9}",
  ]
  for kind, f in r["faults"].items():
    lines.append(
      f"  {kind:<18}{f['injected']:>9}{f['survived']:>9}"
      + (f"   e.g. {f['notes'][0]}" if f["notes"] else "")
    )
  t = r["traffic"]
  kinds = t["kinds"]
  bad = sum(n for k, n in kinds.items() if k.startswith("bad_"))
  lines += [
    (
      f"  {'events produced':<27}{r['produced']:>9}   (valid {kinds.get('valid', 0)}, malformed "
      f"{bad}, repeated event_ids {kinds.get('repeated_event', 0)}, in committed transactions "
      f"{kinds.get('transactional', 0)}; {t['aborted']} in aborted transactions, not expected)"
    ),
    f"  {'  by codec':<27}{'':>9}   " + ", ".join(f"{c}={n}" for c, n in t["codecs"].items()),
    f"  {'records in the topics':<27}{r['records']:>9}",
    f"  {'rows':<27}{r['rows']:>9}",
    f"  {'dead letters':<27}{r['dead_letters']:>9}",
    f"  {'duplicate events':<27}{r['duplicate_events']:>9}",
    f"  {'lost':<27}{r['lost']:>9}",
    f"  {'duplicated':<27}{r['duplicated']:>9}",
  ]
  if r["repeated_event_ids_in_sink"]:
    lines.append(
      f"  {'event_ids stored twice':<27}{r['repeated_event_ids_in_sink']:>9}   "
      "(a later copy of an event stored as a row of its own)"
    )
  if r["not_records"]:
    lines.append(f"  {'rows that are not records':<27}{r['not_records']:>9}")
  lines.append(
    f"  pipeline restarts by chaos (faults not survived, exits): {r['restarts_by_chaos']}"
    f"; final catch-up {'ok' if r['final_catch_up'] else 'FAILED'}; final drain exit "
    f"code {r['drain_exit_code']}"
  )
  lines.append("RESULT: " + ("OK" if result_ok(r) else "FAILED"))
  return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[ChaosConfig, bool]:
  ap = argparse.ArgumentParser(
    prog="run_pipeline.sh chaos",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--minutes", type=float, default=10.0, help="time for faults (default 10)")
  ap.add_argument(
    "--cycles",
    type=int,
    default=None,
    help="number of faults (default: as many as fit in --minutes)",
  )
  ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
  ap.add_argument("--rate", type=float, default=100.0, help="events per second (default 100)")
  ap.add_argument(
    "--gap_secs",
    type=float,
    default=10.0,
    help="longest pause between two faults (default 10; the shortest is 2)",
  )
  ap.add_argument(
    "--workers", type=int, default=2, help="--local_workers of the pipeline (default 2)"
  )
  ap.add_argument("--faults", default=",".join(FAULTS), help=f"subset of {','.join(FAULTS)}")
  ap.add_argument(
    "--broker_down_secs",
    type=float,
    default=30.0,
    help="longest broker outage (default 30; the shortest is 3)",
  )
  ap.add_argument(
    "--sink_lock_secs",
    type=float,
    default=30.0,
    help="longest sink outage (default 30; the shortest is 3). Past the pipeline's "
    "--sink_retry_deadline_secs (60) a local run fails loudly by design (exit 1, "
    "nothing unwritten committed): such outages are not survived",
  )
  ap.add_argument(
    "--recovery_secs",
    type=float,
    default=120.0,
    help="time the pipeline has to catch up after a fault (default 120)",
  )
  ap.add_argument("--keep", action="store_true", help="keep the run's folder (logs, sink, broker)")
  ap.add_argument("--json", action="store_true", help="print the result as JSON (table on stderr)")
  a = ap.parse_args(argv)
  faults = tuple(f for f in a.faults.split(",") if f)
  for name, bad in (
    ("--minutes", a.minutes <= 0),
    ("--cycles", a.cycles is not None and a.cycles < 1),
    ("--rate", a.rate <= 0),
    ("--workers", a.workers < 2),
    ("--faults", not faults or any(f not in FAULTS for f in faults)),
    ("--broker_down_secs", a.broker_down_secs < 3),
    ("--sink_lock_secs", a.sink_lock_secs < 3),
    ("--gap_secs", a.gap_secs < 2),
    ("--recovery_secs", a.recovery_secs <= 0),
  ):
    if bad:
      ap.error(f"{name}: bad value (see --help; --workers must be >= 2 so a worker can be killed)")
  seed = a.seed if a.seed is not None else int(time.time()) % 100_000
  return ChaosConfig(
    minutes=a.minutes,
    cycles=a.cycles,
    seed=seed,
    rate=a.rate,
    workers=a.workers,
    faults=faults,
    gap_secs=(2.0, a.gap_secs),
    broker_down_secs=(3.0, a.broker_down_secs),
    sink_lock_secs=(3.0, a.sink_lock_secs),
    recovery_secs=a.recovery_secs,
    keep=a.keep,
  ), a.json


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("kafka").setLevel(logging.CRITICAL)  # outages are the point here
  cfg, as_json = parse_args(sys.argv[1:] if argv is None else argv)
  signal.signal(signal.SIGTERM, _interrupt)
  run = ChaosRun(cfg)
  try:
    run.setup()
    run.run_faults()
    result = run.finish()
  except KeyboardInterrupt as e:
    print(f"\ninterrupted ({e or 'SIGINT'}): stopping everything chaos started", file=sys.stderr)
    return 130
  finally:
    run.cleanup()
  table = format_table(result)
  print(result["audit_text"], file=sys.stderr)
  if as_json:
    print(table, file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "audit_text"}, indent=1))
  else:
    print(table)
  return 0 if result_ok(result) else 1


if __name__ == "__main__":
  sys.exit(main())
