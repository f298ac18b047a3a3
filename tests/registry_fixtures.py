"""Session fixture: one real schema registry (Apicurio Registry, ``schema_registry/``).

Import the fixture into a test module (``from tests.registry_fixtures import schema_registry``).
$SCHEMA_REGISTRY_URL reuses one already running; else one is started on free ports for the
session and stopped by PID after it.
"""

from __future__ import annotations

import os

import pytest


class _GivenRegistry:
  def __init__(self, url: str):
    self.url = url


@pytest.fixture(scope="session")
def schema_registry():
  """A running registry with ``.url`` (the Confluent-compatible API root)."""
  given = os.environ.get("SCHEMA_REGISTRY_URL")
  if given:
    yield _GivenRegistry(given)
    return
  from schema_registry.control import start_registry

  registry = start_registry()
  try:
    yield registry
  finally:
    registry.stop()
