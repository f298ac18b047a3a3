"""SmartGridOptions: every setting of the pipeline, validated before anything starts.

``python -m runners.main --help`` lists them. A bad value fails at start with a
message naming the option (``OptionError``), never deep inside a worker.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import NoReturn

from apache_beam.options.pipeline_options import PipelineOptions

from transforms import arguments
from transforms.kafka.positions import parse_start, parse_stop
from transforms.parse import MAX_WINDOW_SECS, check_registry_url

DEFAULT_SINK = "sqlite:///output/smartgrid.db"


def default_bootstrap() -> str:
  """127.0.0.1:$KAFKA_PORT (9092 when unset): the local broker of ./run_pipeline.sh broker."""
  return f"127.0.0.1:{os.environ.get('KAFKA_PORT') or 9092}"


class OptionError(ValueError):
  """A pipeline option has a bad value; the message names the option."""


class SmartGridOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    g = parser.add_argument_group("smart-grid pipeline")
    try:
      g.add_argument(
        "--bootstrap_servers",
        default=default_bootstrap(),
        help="Kafka brokers, host:port[,host:port]. Default: 127.0.0.1:$KAFKA_PORT "
        "(9092 when KAFKA_PORT is unset)",
      )
    except argparse.ArgumentError:
      # Beam's KafkaStreamsRunnerOptions declares the same flag (default localhost:9092);
      # when every options class shares one parser, theirs stands and the value is the same.
      pass
    g.add_argument(
      "--sensor_topic",
      default="smartgrid-sensor-data",
      help="topic of sensor readings. Default: smartgrid-sensor-data",
    )
    g.add_argument(
      "--meter_topic",
      default="smartgrid-meter-readings",
      help="topic of meter readings. Default: smartgrid-meter-readings",
    )
    g.add_argument(
      "--group_id",
      default="smartgrid-pipeline",
      help="consumer group whose offsets are read at start and committed after "
      "the sink. Default: smartgrid-pipeline",
    )
    g.add_argument(
      "--start",
      default="committed",
      help="where to start: committed (default; earliest when the group has no "
      "offset), earliest, latest, a timestamp (ISO-8601 or epoch ms), or "
      "offsets TOPIC@PARTITION=OFFSET[,...] (the other partitions: committed)",
    )
    g.add_argument(
      "--stop",
      default=None,
      help="where to stop: unset = never (streaming), 'end' = the end offsets "
      "seen at start (batch), or a timestamp",
    )
    g.add_argument(
      "--window_size_secs",
      type=float,
      default=60.0,
      help="fixed event-time window length in seconds. Default: 60",
    )
    g.add_argument(
      "--allowed_lateness_secs",
      type=float,
      default=300.0,
      help="events arriving later than this after their window closed are "
      "written with is_late=1 (never dropped). Default: 300",
    )
    g.add_argument(
      "--batch_size", type=int, default=100, help="GroupIntoBatches size. Default: 100"
    )
    g.add_argument(
      "--max_buffering_secs",
      type=float,
      default=5.0,
      help="longest time a partial batch waits before it is written. Default: 5",
    )
    g.add_argument(
      "--num_shards",
      type=int,
      default=4,
      help="batching keys per table; few keys fill batches. Default: 4",
    )
    g.add_argument(
      "--shard_by",
      default="partition",
      choices=["partition", "id"],
      help="shard batching keys by Kafka partition (default) or by sensor/meter id",
    )
    g.add_argument(
      "--sink",
      default=DEFAULT_SINK,
      help=f"sqlite:///path.db or bigquery://PROJECT/DATASET. Default: {DEFAULT_SINK}",
    )
    g.add_argument(
      "--bigquery_api_endpoint",
      default=None,
      help="BigQuery API endpoint (e.g. a local emulator: http://127.0.0.1:9050); "
      "anonymous credentials are used then, else Application Default Credentials",
    )
    g.add_argument(
      "--bigquery_write_method",
      default="storage_write",
      choices=["storage_write", "streaming_inserts"],
      help="storage_write (default): the Storage Write API, application-created "
      "COMMITTED streams with explicit offsets (exactly once); streaming_inserts: "
      "insert_rows_json with insertIds (de-duplicated for about a minute only)",
    )
    g.add_argument(
      "--bigquery_storage_api_endpoint",
      default=None,
      help="host:port of a plaintext gRPC Storage Write API (a local emulator); "
      "default: Google's, with Application Default Credentials",
    )
    g.add_argument(
      "--reconcile",
      default="on",
      choices=["on", "off"],
      help="on (default): before writing a partition, ask the sink which offsets at "
      "or above the first one read are stored already, and skip (but ack) them, "
      "so a replay at any distance writes nothing twice",
    )
    g.add_argument(
      "--sink_flush_rows",
      type=int,
      default=40000,
      help="rows the sink buffers before a write, one transaction (also flushed at bundle "
      "end). Larger writes cost less per row (fewer index pages rewritten) and hold more "
      "memory, about 0.6 KB a row. Default: 40000",
    )
    g.add_argument(
      "--sink_retry_deadline_secs",
      type=float,
      default=60.0,
      help="how long transient sink errors are retried before the bundle fails. Default: 60",
    )
    g.add_argument(
      "--commit_interval_secs",
      type=float,
      default=5.0,
      help="least time between two offset commits of a partition. Default: 5",
    )
    g.add_argument(
      "--local_workers",
      type=int,
      default=min(2, os.cpu_count() or 1),
      help="local and batch runs: worker processes, each running the pipeline on its "
      "share of the partitions (they commit disjoint partitions and share the "
      "sink); one FnApiRunner process uses one core. Default: 2 (1 on a "
      "one-core machine)",
    )
    g.add_argument(
      "--partition_shard",
      default=None,
      help="I/N: read only every N-th of the topics' partitions, starting at the I-th "
      "(set by --local_workers for its workers)",
    )
    g.add_argument(
      "--round_max_records",
      type=int,
      default=1_000_000,
      help="local and batch runs on FnApiRunner go in rounds of at most this many "
      "records (shared out over the partitions); offsets are committed when a round "
      "ends. The first round reads 500, the next ones 100 times more, up to this cap. "
      "Default: 1000000",
    )
    g.add_argument(
      "--poll_timeout_ms",
      type=int,
      default=1000,
      help="how long an idle reader blocks in poll before it checkpoints. Default: 1000",
    )
    g.add_argument(
      "--kafka_security_protocol",
      default=None,
      help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; SASL credentials come from "
      "KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD (never on the command line)",
    )
    g.add_argument("--kafka_sasl_mechanism", default=None, help="e.g. PLAIN, SCRAM-SHA-512")
    g.add_argument(
      "--schema_registry_url",
      default=None,
      help="Confluent-compatible schema registry (e.g. http://127.0.0.1:8081 or "
      "Apicurio's http://HOST:PORT/apis/ccompat/v7): values in the Confluent "
      "wire format are decoded as Avro with the writer's schema. Basic-auth "
      "credentials come from SCHEMA_REGISTRY_USERNAME / SCHEMA_REGISTRY_PASSWORD. "
      "Unset: such values are dead letters (avro_needs_registry)",
    )
    g.add_argument(
      "--require_topics",
      action="store_true",
      default=False,
      help="batch: exit non-zero naming the topics that do not exist (default: a "
      "batch run over missing topics exits 0 with 'nothing to read'; a "
      "streaming run waits for them)",
    )
    g.add_argument(
      "--on_offset_gap",
      default="fail",
      choices=["fail", "skip"],
      help="a committed offset below the log start (retention) or past the end "
      "(a recreated topic), or offsets deleted while being read: 'fail' "
      "(default) stops naming the partition; 'skip' goes on and records the "
      "skipped range as an 'offset_gap' dead letter",
    )
    g.add_argument(
      "--recommit_interval_secs",
      type=float,
      default=3600.0,
      help="re-commit unchanged offsets at least this often, so the broker never "
      "expires them (offsets.retention.minutes). Default: 3600",
    )
    g.add_argument(
      "--drain_file",
      default=None,
      help="local runs: a file whose creation drains the pipeline "
      "(default .run/<mode>-pipeline.drain)",
    )
    g.add_argument(
      "--progress_secs",
      type=float,
      default=5.0,
      help="local runs: seconds between progress lines (0 = none). Default: 5",
    )


_BQ_URL = re.compile(r"^bigquery://([a-z][a-z0-9\-]{4,61}[a-z0-9])/([A-Za-z0-9_]{1,1024})$")


def _fail(name: str, message: str) -> NoReturn:
  raise OptionError(f"--{name}: {message}")


def validate(o: SmartGridOptions) -> None:
  """Raises OptionError naming the first bad option."""
  for check in (
    _check_kafka,
    _check_positions,
    _check_numbers,
    _check_local,
    _check_sink,
    _check_bigquery,
  ):
    try:
      check(o)
    except OptionError:
      raise
    except ValueError as e:  # a shared rule of transforms.arguments: "--name: ..."
      raise OptionError(str(e)) from None


def _check_kafka(o: SmartGridOptions) -> None:
  if not o.bootstrap_servers or not all(
    re.match(r"^[^\s:,]+:\d{1,5}$", s) for s in o.bootstrap_servers.split(",")
  ):
    _fail("bootstrap_servers", f"expected host:port[,host:port], got {o.bootstrap_servers!r}")
  for name in ("sensor_topic", "meter_topic"):
    value = getattr(o, name)
    if not value or not re.match(r"^[A-Za-z0-9._\-]{1,249}$", value):
      _fail(name, f"not a valid Kafka topic name: {value!r}")
  if o.sensor_topic == o.meter_topic:
    _fail("meter_topic", "must differ from --sensor_topic")
  if not o.group_id:
    _fail("group_id", "must not be empty")
  if o.kafka_security_protocol not in (None, "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
    _fail("kafka_security_protocol", f"unknown protocol {o.kafka_security_protocol!r}")
  check_registry_url(o.schema_registry_url)  # its errors name --schema_registry_url already


def _check_positions(o: SmartGridOptions) -> None:
  for name, parse in (("start", parse_start), ("stop", parse_stop)):
    try:
      parse(getattr(o, name))
    except ValueError as e:
      _fail(name, str(e))


def _check_numbers(o: SmartGridOptions) -> None:
  arguments.above_and_at_most("window_size_secs", o.window_size_secs, 0, MAX_WINDOW_SECS)
  arguments.at_least("allowed_lateness_secs", o.allowed_lateness_secs, 0)
  arguments.batch_size(o.batch_size)
  arguments.above("max_buffering_secs", o.max_buffering_secs, 0)
  arguments.within("num_shards", o.num_shards, 1, 1024)
  arguments.at_least("sink_flush_rows", o.sink_flush_rows, 1)
  arguments.above("sink_retry_deadline_secs", o.sink_retry_deadline_secs, 0)
  arguments.above("commit_interval_secs", o.commit_interval_secs, 0)
  arguments.above("poll_timeout_ms", o.poll_timeout_ms, 0)
  arguments.above("recommit_interval_secs", o.recommit_interval_secs, 0)


def _check_local(o: SmartGridOptions) -> None:
  arguments.within("local_workers", o.local_workers, 1, 64)
  if o.partition_shard is not None:
    m = re.match(r"^(\d+)/(\d+)$", o.partition_shard)
    if not m or not int(m.group(1)) < int(m.group(2)):
      _fail("partition_shard", f"expected I/N with 0 <= I < N, got {o.partition_shard!r}")
  arguments.at_least("round_max_records", o.round_max_records, 1)
  arguments.at_least("progress_secs", o.progress_secs, 0)


def _check_sink(o: SmartGridOptions) -> None:
  if o.sink.startswith("sqlite:"):
    if not o.sink.startswith("sqlite:///") or len(o.sink) == len("sqlite:///"):
      _fail(
        "sink",
        f"expected sqlite:///relative/path.db or sqlite:////absolute/path.db, got {o.sink!r}",
      )
  elif o.sink.startswith("bigquery:"):
    if not _BQ_URL.match(o.sink):
      _fail("sink", f"expected bigquery://PROJECT/DATASET, got {o.sink!r}")
  else:
    _fail("sink", f"unknown sink {o.sink!r}: use sqlite:///path.db or bigquery://PROJECT/DATASET")


def _check_bigquery(o: SmartGridOptions) -> None:
  endpoint = o.bigquery_storage_api_endpoint
  if endpoint is not None and not re.match(r"^[^\s:/]+:\d{1,5}$", endpoint):
    _fail("bigquery_storage_api_endpoint", f"expected host:port, got {endpoint!r}")
  if (
    o.sink.startswith("bigquery:")
    and o.bigquery_api_endpoint
    and endpoint is None
    and o.bigquery_write_method == "storage_write"
  ):
    _fail(
      "bigquery_storage_api_endpoint",
      "needed with --bigquery_api_endpoint (an emulator) when "
      "--bigquery_write_method=storage_write: the emulator's gRPC host:port",
    )
