"""RSS of a 1-worker ``batch`` run over time, with the rounds seen as jumps of the committed
offsets (benchmarks/PROFILE.md, section 5): does memory grow from round to round?

    python -m benchmarks.rss_timeline [--events 600000] [--round_max_records 100000]

Prints (seconds, RSS MB, peak RSS MB, committed offsets) at every commit and every 5 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from benchmarks.common import PIPELINE_MAIN, bench_broker, produce_smartgrid

REPO = Path(__file__).resolve().parent.parent
GROUP = "rss-timeline"


def _memory_mb(pid: int) -> tuple[int, int] | None:
  try:
    fields = dict(
      line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
  except OSError:
    return None
  return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def _committed(admin: KafkaAdminClient) -> int:
  try:
    offsets = admin.list_group_offsets(GROUP).get(GROUP, {})
  except KafkaError:  # no coordinator for the group before its first commit
    return 0
  return sum(om.offset for om in offsets.values() if om.offset >= 0)


def timeline(bootstrap: str, work: Path, n: int, round_max: int) -> list[tuple]:
  sensor, meter = produce_smartgrid(bootstrap, n)
  argv = [
    sys.executable,
    "-m",
    PIPELINE_MAIN,
    "--mode=batch",
    f"--bootstrap_servers={bootstrap}",
    f"--sensor_topic={sensor}",
    f"--meter_topic={meter}",
    f"--group_id={GROUP}",
    "--start=earliest",
    f"--sink=sqlite:///{work / 'rss.db'}",
    "--local_workers=1",
    "--progress_secs=0",
    f"--round_max_records={round_max}",
  ]
  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  t0, rows = time.monotonic(), []
  proc = subprocess.Popen(
    argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL
  )
  try:
    while proc.poll() is None:
      mem = _memory_mb(proc.pid)
      if mem is None:
        break
      rows.append((round(time.monotonic() - t0, 1), *mem, _committed(admin)))
      time.sleep(0.5)
  finally:
    proc.wait()
    admin.close()
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog="benchmarks.rss_timeline",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--events", type=int, default=600_000)
  ap.add_argument("--round_max_records", type=int, default=100_000)
  a = ap.parse_args(argv)
  with bench_broker(None, "rss-timeline") as (bootstrap, work):
    samples = timeline(bootstrap, work, a.events, a.round_max_records)
  prev = None
  for sample in samples:
    if (
      prev is None
      or sample[3] != prev[3]
      or (int(sample[0]) % 5 == 0 and int(sample[0]) != int(prev[0]))
    ):
      print(
        f"  {sample[0]:6.1f}s  RSS {sample[1]:4d} MB  peak {sample[2]:4d} MB  committed {sample[3]}"
      )
    prev = sample
  if samples:
    print(f"max RSS {max(s[1] for s in samples)} MB, peak RSS {samples[-1][2]} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
