"""Shared fixtures: real gloo process worlds, spawned once per size and reused by all tests."""
import pytest

from seqpar.testing import WorldPool


@pytest.fixture(scope="session")
def worlds():
    """`worlds.run(n, fn, *args)` runs fn on every rank of a live n-process gloo world."""
    pool = WorldPool()
    yield pool
    pool.close()
