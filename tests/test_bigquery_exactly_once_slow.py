"""Exactly once in BigQuery past the insertId window: three scenarios at once, each on its
own topics and dataset, through the default Storage Write API path and the real broker.

- replay: a batch run, then 90 s later (past the emulator's 60 s insertId memory) a new
  consumer group from the earliest offset reads everything again and writes nothing;
- outage: the emulator (HTTP and gRPC) is cut for 90 s while a run is writing; the run
  waits it out and ends with every record stored once;
- kill: SIGKILL while a run is writing; a restart 90 s later completes it.

Each ends with the offset-by-offset check: every produced offset in exactly one table
exactly once, nothing else, and the group's committed offsets at the end offsets.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests import support
from tests.faulty_proxy import TcpProxy
from tests.pipeline_support import Pipeline
from tests.test_bigquery_integration import PROJECT, Env, assert_exactly_once, bq_offsets
from tools.produce import EventFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

NOW = time.time()
PAST_INSERT_ID_WINDOW_S = 90


def _rows(env: Env) -> int:
  try:
    return sum(len(r) for r in bq_offsets(env.client, env.dataset).values())
  except Exception:  # noqa: BLE001 - tables not created yet
    return 0


def _start(env: Env, name: str, *extra: str, endpoint=None, grpc=None, group=None) -> Pipeline:
  work = env.dir / f"{name}-{uuid.uuid4().hex[:6]}"
  work.mkdir()
  return Pipeline(
    env.bs,
    env.sensor,
    env.meter,
    group or env.group,
    work,
    "--sink",
    f"bigquery://{PROJECT}/{env.dataset}",
    "--bigquery_api_endpoint",
    endpoint or env.emulator.endpoint,
    "--bigquery_storage_api_endpoint",
    grpc or env.emulator.grpc_address,
    *extra,
    mode="batch",
  )


def _finish(p: Pipeline, timeout: float = 300) -> Pipeline:
  code = p.wait(timeout)
  assert code == 0, f"exit {code}:\n{p.tail()}"
  return p


def test_replay_outage_and_kill_past_the_insert_id_window(
  kafka_bootstrap, make_topic, bq_emulator, tmp_path
):
  envs = {
    name: Env(kafka_bootstrap, make_topic, bq_emulator, tmp_path)
    for name in ("replay", "outage", "kill")
  }
  produced = {
    name: env.produce(
      EventFactory(80 + i).events(
        3000, meter_ratio=0.3, bad_ratio=0.02, start=NOW - 300, spacing_s=0.1
      )
    )
    for i, (name, env) in enumerate(envs.items())
  }
  small = ("--sink_flush_rows=100", "--batch_size=50", "--num_shards=2")
  http_host, http_port = bq_emulator.endpoint.rsplit("//", 1)[1].split(":")
  grpc_host, grpc_port = bq_emulator.grpc_address.split(":")
  with TcpProxy(http_host, int(http_port)) as http, TcpProxy(grpc_host, int(grpc_port)) as rpc:
    first = _start(envs["replay"], "first", *small)
    outage = _start(
      envs["outage"],
      "outage",
      *small,
      "--sink_retry_deadline_secs=300",
      endpoint=http.endpoint,
      grpc=rpc.address,
    )
    killed = _start(envs["kill"], "killed", *small)

    # cut the sink while the outage run is writing, and kill the other in the middle of a write
    support.wait_for(
      lambda: _rows(envs["outage"]) > 0 or not outage.alive(),
      timeout=120,
      interval=0.2,
      what="the outage run's first rows",
    )
    assert outage.alive() and _rows(envs["outage"]) < len(produced["outage"]), outage.tail()
    http.outage()
    rpc.outage()
    cut_at = time.monotonic()
    support.wait_for(
      lambda: _rows(envs["kill"]) > 0 or not killed.alive(),
      timeout=120,
      interval=0.2,
      what="the killed run's first rows",
    )
    assert killed.alive(), killed.tail()
    killed.kill()
    killed_at = time.monotonic()
    partial = _rows(envs["kill"])
    assert 0 < partial < len(produced["kill"]), partial
    _finish(first)
    first_done = time.monotonic()
    before = bq_offsets(envs["replay"].client, envs["replay"].dataset)

    time.sleep(max(0.0, cut_at + PAST_INSERT_ID_WINDOW_S - time.monotonic()))
    assert outage.alive(), outage.tail()  # it waited the outage out instead of failing
    stuck = _rows(envs["outage"])
    http.heal()
    rpc.heal()
    time.sleep(max(0.0, killed_at + PAST_INSERT_ID_WINDOW_S - time.monotonic()))
    restart = _start(envs["kill"], "restart", *small)
    time.sleep(max(0.0, first_done + PAST_INSERT_ID_WINDOW_S - time.monotonic()))
    replay = _start(
      envs["replay"], "replay", *small, "--start=earliest", group=f"replay-{uuid.uuid4().hex[:6]}"
    )
    _finish(outage)
    _finish(restart)
    _finish(replay)

  assert stuck < len(produced["outage"]), "the outage began after the run had written everything"
  assert replay.summary_read() == len(produced["replay"])
  assert replay.summary_written() == 0, replay.tail()  # skipped by reconciliation
  assert {
    t: sorted(r) for t, r in bq_offsets(envs["replay"].client, envs["replay"].dataset).items()
  } == {t: sorted(r) for t, r in before.items()}
  for name, env in envs.items():
    assert_exactly_once(env.client, env.dataset, produced[name])
    env.assert_committed_equals_end()
  print(
    f"killed with {partial} of {len(produced['kill'])} rows written; outage with {stuck} of "
    f"{len(produced['outage'])}"
  )
