"""Retrying transient failures up to a deadline, for every client the pipeline calls.

One policy, built on tenacity: exponential backoff (``initial_backoff_s`` doubling up to
``max_backoff_s``) with jitter (each sleep in [backoff / 2, 1.5 * backoff]), as long as
the next attempt would still start before the deadline. A non-transient error is raised
at once, unchanged; a transient one that outlives the deadline becomes
``RetriesExhausted`` (its ``__cause__`` is the last error). Used by the sinks, the
start-up reconciliation and the offset committer, so none of them owns a retry loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception
from tenacity.wait import wait_base

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


class RetriesExhausted(RuntimeError):
  """A call kept failing transiently past its retry deadline (the bundle fails, nothing is acked)."""


class wait_jittered_exponential(wait_base):  # pylint: disable=invalid-name  (tenacity's naming)
  """Backoff ``initial * 2**(attempt - 1)`` capped at ``maximum``, each sleep drawn from
  [backoff / 2, 1.5 * backoff] so that workers retrying together spread out."""

  def __init__(self, initial: float, maximum: float):
    self.initial = initial
    self.maximum = maximum

  def backoff(self, attempt: int) -> float:
    return min(self.initial * 2 ** min(attempt - 1, 62), self.maximum)

  def __call__(self, retry_state: RetryCallState) -> float:
    b = self.backoff(retry_state.attempt_number)
    return random.uniform(b / 2, 1.5 * b)


def with_retries(
  fn: Callable[[], T],
  is_transient: Callable[[BaseException], bool],
  *,
  deadline_s: float,
  initial_backoff_s: float = 0.1,
  max_backoff_s: float = 5.0,
  what: str = "write",
  sleep: Callable[[float], None] = time.sleep,
  clock: Callable[[], float] = time.monotonic,
) -> T:
  """Calls fn until it succeeds; retries errors ``is_transient`` accepts until the deadline.

  ``sleep`` and ``clock`` are injectable for tests.
  """
  give_up_at = clock() + deadline_s

  def past_deadline(state: RetryCallState) -> bool:
    return clock() + state.upcoming_sleep > give_up_at

  def log_retry(state: RetryCallState) -> None:
    _LOGGER.warning(
      "%s failed (attempt %d, transient: %s); retrying",
      what,
      state.attempt_number,
      state.outcome.exception(),
    )

  retrying = Retrying(
    retry=retry_if_exception(lambda e: isinstance(e, Exception) and is_transient(e)),
    wait=wait_jittered_exponential(initial_backoff_s, max_backoff_s),
    stop=past_deadline,
    sleep=sleep,
    before_sleep=log_retry,
  )
  try:
    return retrying(fn)
  except RetryError as gave_up:
    attempts = gave_up.last_attempt.attempt_number
    e = gave_up.last_attempt.exception()
    raise RetriesExhausted(
      f"{what} still failing after {attempts} attempts over "
      f"{deadline_s:.0f}s: {type(e).__name__}: {e}"
    ) from e
