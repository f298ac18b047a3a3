"""RSS of a 1-worker batch run over time, with round boundaries seen as committed-offset jumps."""
import os, subprocess, sys, time, json
from pathlib import Path
from benchmarks.common import PIPELINE_MAIN, bench_broker, produce_smartgrid
from kafka import KafkaAdminClient
N = int(sys.argv[1]); ROUND = int(sys.argv[2])
with bench_broker(None, "rss") as (b, work):
  s, m = produce_smartgrid(b, N)
  admin = KafkaAdminClient(bootstrap_servers=b)
  argv = [sys.executable, "-m", PIPELINE_MAIN, "--mode=batch", f"--bootstrap_servers={b}", f"--sensor_topic={s}",
          f"--meter_topic={m}", "--group_id=rss", "--start=earliest", f"--sink=sqlite:///{work}/r.db",
          "--local_workers=1", "--progress_secs=0", f"--round_max_records={ROUND}"]
  t0 = time.monotonic()
  p = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=subprocess.DEVNULL)
  last = None; rows = []
  while p.poll() is None:
    try:
      st = Path(f"/proc/{p.pid}/status").read_text()
      rss = int([l for l in st.splitlines() if l.startswith("VmRSS")][0].split()[1]) // 1024
      hwm = int([l for l in st.splitlines() if l.startswith("VmHWM")][0].split()[1]) // 1024
    except Exception:
      break
    try:
      off = admin.list_group_offsets("rss").get("rss", {})
      committed = sum(o.offset for o in off.values() if o.offset >= 0)
    except Exception:
      committed = 0
    rows.append((round(time.monotonic() - t0, 1), rss, hwm, committed))
    time.sleep(0.5)
  admin.close()
  # print at commit changes and every 5 s
  prev = None
  for r in rows:
    if prev is None or r[3] != prev[3] or int(r[0]) % 5 == 0 and int(r[0]) != int(prev[0]):
      print(r)
    prev = r
  print("max rss", max(r[1] for r in rows), "hwm", rows[-1][2])
