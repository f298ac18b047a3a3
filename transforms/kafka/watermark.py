"""The source's watermark: from record timestamps, advanced for idle partitions.

Invariants: monotonic; while a partition has a backlog the watermark is at most
the timestamp of the last record emitted (never ahead of records still to be
read); only when the reader has caught up with the end of the partition and a
poll found nothing does it move to ``now - idle_lag``, the earliest timestamp a
record written from now on can carry (up to producer clock skew).
"""

from __future__ import annotations

from apache_beam.io.iobase import WatermarkEstimator
from apache_beam.transforms.core import WatermarkEstimatorProvider
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

DEFAULT_IDLE_LAG_MS = 2000


class KafkaWatermarkEstimator(WatermarkEstimator):
  def __init__(self, state: Timestamp | None, idle_lag_ms: int = DEFAULT_IDLE_LAG_MS):
    self._watermark = MIN_TIMESTAMP if state is None else state
    self._idle_lag_ms = idle_lag_ms

  def observe_record(self, timestamp_ms: int) -> None:
    ts = Timestamp(micros=timestamp_ms * 1000)
    if ts > self._watermark:
      self._watermark = ts

  def observe_idle(self, now_ms: int) -> None:
    """Called only when caught up with the partition's end and a poll returned nothing."""
    ts = Timestamp(micros=(now_ms - self._idle_lag_ms) * 1000)
    if ts > self._watermark:
      self._watermark = ts

  def observe_timestamp(self, timestamp) -> None:
    # Called by the runner per output; the reader reports once per poll instead.
    pass

  def current_watermark(self) -> Timestamp:
    return self._watermark

  def get_estimator_state(self) -> Timestamp:
    return self._watermark


class KafkaWatermarkEstimatorProvider(WatermarkEstimatorProvider):
  def __init__(self, idle_lag_ms: int = DEFAULT_IDLE_LAG_MS):
    self._idle_lag_ms = idle_lag_ms

  def initial_estimator_state(self, element, restriction):
    return None

  def create_watermark_estimator(self, estimator_state):
    return KafkaWatermarkEstimator(estimator_state, self._idle_lag_ms)
