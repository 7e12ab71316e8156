"""Real multi-process gloo worlds and the exactness check `seqpar verify` runs on them.

The per-rank bodies of the test suite live beside the tests (tests/checks/), not here."""
from ..world import ProcessWorld, WorkerError, WorldPool

__all__ = ["ProcessWorld", "WorkerError", "WorldPool"]
