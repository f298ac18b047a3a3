"""The checks of numeric and choice arguments, one rule each, with one message form.

``pipelines.options.validate`` applies them to the command line (and turns the error
into an ``OptionError``); the few public transforms that take the same values
(``ParseEvents``, ``WriteBatches``) call the same functions on their constructor
arguments, so a value is judged, and reported, the same way everywhere:
``--name: must be ..., got value``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def at_least(name: str, value: float, minimum: float) -> None:
  if value < minimum:
    raise ValueError(f"--{name}: must be >= {minimum}, got {value}")


def above(name: str, value: float, bound: float) -> None:
  if not value > bound:
    raise ValueError(f"--{name}: must be > {bound}, got {value}")


def within(name: str, value: float, low: float, high: float) -> None:
  """low <= value <= high."""
  if not low <= value <= high:
    raise ValueError(f"--{name}: must be in {low}..{high}, got {value}")


def above_and_at_most(name: str, value: float, low: float, high: float) -> None:
  """low < value <= high."""
  if not low < value <= high:
    raise ValueError(f"--{name}: must be in ({low}, {high}], got {value}")


def one_of(name: str, value: Any, choices: Collection) -> None:
  if value not in choices:
    raise ValueError(f"--{name}: must be one of {tuple(choices)}, got {value!r}")


def batch_size(value: int) -> None:
  """The batch size rule, shared by the options, ``BatchRows`` and ``WriteBatches``."""
  at_least("batch_size", value, 1)
