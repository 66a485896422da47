"""Fixtures of the docker-compose tests: a Docker engine for the session (docker_engine.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from docker_engine import Engine, EngineUnavailable, acquire_engine


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """A reachable engine: the running one, or our own dockerd (root + CI=true), else skip."""
    try:
        engine = acquire_engine()
    except EngineUnavailable as e:
        pytest.skip(f"no Docker engine: {e}")
    try:
        yield engine
    finally:
        engine.stop()
