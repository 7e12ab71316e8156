"""Shared fixtures: real gloo process worlds, spawned once per size and reused by all tests.
The machine-peak cache (MFU) of the session is a temporary directory, not the user's."""
import os
import tempfile

import pytest

from seqpar.testing import WorldPool

os.environ.setdefault("SEQPAR_CACHE_DIR", tempfile.mkdtemp(prefix="seqpar-test-cache-"))


@pytest.fixture(scope="session")
def worlds():
    """`worlds.run(n, fn, *args)` runs fn on every rank of a live n-process gloo world."""
    pool = WorldPool()
    yield pool
    pool.close()
