"""Re-export of seqpar.world: real multi-process gloo worlds for tests, checks and benchmarks."""
from ..world import ProcessWorld, WorkerError, WorldPool

__all__ = ["ProcessWorld", "WorkerError", "WorldPool"]
