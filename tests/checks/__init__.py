"""Per-rank bodies the tests run on real gloo worlds (`worlds.run(n, fn, ...)`); importable
from the spawned workers because pytest puts tests/ on sys.path, which they inherit."""
