"""The chaos run's producers: continuous, mixed, adversarial traffic into both topics.

Owns two threads. One writes through five producers, one per codec (none, gzip,
snappy, lz4, zstd), switching codec every burst: valid sensor and meter events,
malformed input of every kind ``tools.produce`` knows, and repeated sends of
an earlier event (same event_id at a new offset, as the old system's producer does).
The other is a transactional producer that commits some transactions and aborts
others. Both keep going through broker outages: a failed send is counted and the
producer is rebuilt when it must be.

It records, per partition, the highest offset acknowledged for a record that must
reach the sink (``frontier``): the chaos run waits for the group's committed offsets
to pass it. Records of aborted transactions are counted, never expected.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter

from kafka import KafkaProducer
from kafka.errors import KafkaError

from tools.produce import BAD_KINDS, EventFactory

_LOGGER = logging.getLogger(__name__)
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
_BURST = 25  # events per codec before switching
_PRODUCER_CONFIG = {
  "acks": "all",
  "linger_ms": 5,
  "max_block_ms": 5000,
  "request_timeout_ms": 10000,
  "delivery_timeout_ms": 60000,
  "max_request_size": 2 * 1024 * 1024,
  "reconnect_backoff_max_ms": 2000,
}


class Traffic:
  """Background producers; ``start()``, ``stop()``, ``frontier()``, ``counts``."""

  def __init__(
    self,
    bootstrap: str,
    sensor_topic: str,
    meter_topic: str,
    *,
    seed: int,
    rate: float,
    bad_ratio: float = 0.05,
    repeat_ratio: float = 0.02,
    transaction_share: float = 0.2,
  ):
    self.bootstrap = bootstrap
    self.topics = {"sensor": sensor_topic, "meter": meter_topic}
    self.rate = rate
    self.bad_ratio = bad_ratio
    self.repeat_ratio = repeat_ratio
    self.transaction_share = transaction_share
    self._seed = seed
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._frontier: dict[tuple[str, int], int] = {}
    self.counts: Counter = Counter()
    self.errors: Counter = Counter()
    self._threads = [
      threading.Thread(target=self._guard, args=(self._plain,), name="chaos-plain", daemon=True),
      threading.Thread(
        target=self._guard, args=(self._transactional,), name="chaos-tx", daemon=True
      ),
    ]

  # -- bookkeeping (callbacks run on the producers' I/O threads)

  def _acked(self, topic: str, what: tuple, meta) -> None:
    with self._lock:
      key = (topic, meta.partition)
      self._frontier[key] = max(self._frontier.get(key, 0), meta.offset + 1)
      for w in what:
        self.counts[w] += 1

  def _failed(self, what: str, exc: BaseException) -> None:
    with self._lock:
      self.errors[f"{what}: {type(exc).__name__}"] += 1

  def frontier(self) -> dict[tuple[str, int], int]:
    """(topic, partition) -> 1 + the highest acknowledged offset of an expected record."""
    with self._lock:
      return dict(self._frontier)

  def produced(self) -> int:
    with self._lock:
      return sum(n for k, n in self.counts.items() if k.startswith("kind:"))

  # -- lifecycle

  def start(self) -> Traffic:
    for t in self._threads:
      t.start()
    return self

  def stop(self, timeout: float = 90.0) -> None:
    self._stop.set()
    for t in self._threads:
      t.join(timeout)

  def _guard(self, body) -> None:
    while not self._stop.is_set():
      try:
        body()
      except Exception as e:  # noqa: BLE001 - an outage must not end the traffic
        self._failed("producer", e)
        _LOGGER.debug("producer thread restarts after %r", e)
        self._stop.wait(1.0)

  def _pace(self, started: float, sent: int, rate: float) -> None:
    delay = started + sent / rate - time.monotonic()
    if delay > 0:
      self._stop.wait(delay)

  # -- the plain producers (one per codec)

  def _plain(self) -> None:
    rng = random.Random(self._seed)
    factory = EventFactory(seed=self._seed)
    producers = {
      c: KafkaProducer(
        bootstrap_servers=self.bootstrap,
        compression_type=(None if c == "none" else c),
        **_PRODUCER_CONFIG,
      )
      for c in CODECS
    }
    sent_before: list = []  # earlier valid events, to send again
    rate = self.rate * (1 - self.transaction_share)
    started, sent = time.monotonic(), 0
    try:
      while not self._stop.is_set():
        codec = CODECS[(sent // _BURST) % len(CODECS)]
        kind, topic_kind, key, value = self._next_event(rng, factory, sent_before)
        topic = self.topics[topic_kind]
        what = (f"kind:{kind}", f"codec:{codec}")
        try:
          producers[codec].send(topic, key=key, value=value).add_callback(
            lambda meta, t=topic, w=what: self._acked(t, w, meta)
          ).add_errback(lambda e, w=kind: self._failed(f"send {w}", e))
        except KafkaError as e:  # e.g. metadata not available within max_block_ms
          self._failed(f"send {kind}", e)
          self._stop.wait(0.5)
        sent += 1
        self._pace(started, sent, rate)
    finally:
      for p in producers.values():
        _close(p)

  def _next_event(self, rng: random.Random, factory: EventFactory, sent_before: list):
    r = rng.random()
    now = time.time()
    if r < self.bad_ratio:
      ev = factory.bad(now, rng.choice(BAD_KINDS))
      return f"bad_{ev.bad}", ev.topic_kind, ev.key, ev.value
    if r < self.bad_ratio + self.repeat_ratio and sent_before:
      topic_kind, key, value = rng.choice(sent_before)
      return "repeated_event", topic_kind, key, value
    ev = factory.meter(now) if rng.random() < 0.3 else factory.sensor(now)
    if len(sent_before) < 500:
      sent_before.append((ev.topic_kind, ev.key, ev.value))
    else:
      sent_before[rng.randrange(500)] = (ev.topic_kind, ev.key, ev.value)
    return "valid", ev.topic_kind, ev.key, ev.value

  # -- the transactional producer

  def _transactional(self) -> None:
    rng = random.Random(self._seed + 1)
    factory = EventFactory(seed=self._seed + 1)
    producer: KafkaProducer | None = None
    started, sent = time.monotonic(), 0
    rate = max(self.rate * self.transaction_share, 1.0)
    try:
      while not self._stop.is_set():
        if producer is None:
          producer = self._transactional_producer()
        n = rng.randint(3, 20)
        commit = rng.random() < 0.7
        try:
          self._one_transaction(producer, factory, n, commit)
        except Exception as e:  # noqa: BLE001 - outage mid-transaction: start over
          self._failed("transaction", e)
          _close(producer)
          producer = None  # init_transactions on the next one aborts what was left open
          self._stop.wait(1.0)
        sent += n
        self._pace(started, sent, rate)
    finally:
      if producer is not None:
        _close(producer)

  def _transactional_producer(self) -> KafkaProducer:
    producer = KafkaProducer(
      bootstrap_servers=self.bootstrap,
      transactional_id=f"chaos-tx-{self._seed}",
      **_PRODUCER_CONFIG,
    )
    try:
      # Fences an earlier producer of the same id and aborts what it left open.
      producer.init_transactions()
    except BaseException:
      _close(producer)
      raise
    return producer

  def _one_transaction(
    self, producer: KafkaProducer, factory: EventFactory, n: int, commit: bool
  ) -> None:
    producer.begin_transaction()
    futures = []
    for _ in range(n):
      ev = factory.meter(time.time()) if factory.rng.random() < 0.3 else factory.sensor(time.time())
      topic = self.topics[ev.topic_kind]
      futures.append((topic, producer.send(topic, key=ev.key, value=ev.value)))
    producer.flush(timeout=30)
    metas = [(t, f.get(timeout=30)) for t, f in futures]
    if not commit:
      producer.abort_transaction()
      with self._lock:
        self.counts["aborted"] += n
      return
    producer.commit_transaction()
    for topic, meta in metas:
      self._acked(topic, ("kind:transactional", "codec:none"), meta)


def _close(producer: KafkaProducer) -> None:
  try:
    producer.close(timeout=5)
  except Exception as e:  # noqa: BLE001 - closing during an outage may fail; nothing to keep
    _LOGGER.debug("producer close: %r", e)


def describe(counts: Counter) -> dict:
  """{'kinds': {...}, 'codecs': {...}, 'aborted': n} from the raw counters."""
  return {
    "kinds": {k[5:]: n for k, n in sorted(counts.items()) if k.startswith("kind:")},
    "codecs": {k[6:]: n for k, n in sorted(counts.items()) if k.startswith("codec:")},
    "aborted": counts.get("aborted", 0),
  }
