"""Every decoder-only causal LM of the installed transformers through seqpar, as a markdown table.

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` whose attention goes through
transformers' `AttentionInterface` (the others, encoder-decoders and multimodal classes are
listed as skipped, with the reason): a tiny random instance (2 layers, hidden 64, vocab 128,
64 tokens, batch 2), one training step on 4 gloo ranks through a seqpar strategy (the
strategies in turn) against stock transformers in one process (sdpa, else eager; fp64 where the
model runs in fp64), loss and every gradient. The per-rank code is tests/checks/hf_sweep.py;
tests/test_hf_sweep.py runs a subset in the suite and all of it with SEQPAR_HF_SWEEP=1.

    python3 benchmarks/hf_sweep.py        # the table in docs/models.md; about 3.5 min on 2 shared cores
    python3 benchmarks/hf_sweep.py --only llama,gemma2
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from seqpar.testing import ProcessWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.hf_sweep import architectures, batch, entries, sweep_rank, table, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: all)")
    args = parser.parse_args()
    import transformers

    found = architectures()
    if args.only:
        found = {t: found[t] for t in args.only.split(",")}
    skipped = {t: reason for t, reason in found.items() if reason}
    window, ignored = batch()
    start = time.perf_counter()
    with ProcessWorld(4, timeout=7200.0, pg_timeout=600.0) as world:
        results = world.run(sweep_rank, entries([t for t, reason in found.items() if not reason]), window, ignored,
                            progress=True)[0]
    seconds = time.perf_counter() - start
    counts = {v: sum(verdict(r) == v for r in results) for v in ("exact", "mismatch", "refused", "error")}
    print(f"Command: `python3 {' '.join(sys.argv)}`  \nMachine: {platform.machine()} CPU, gloo, "
          f"one thread, 4 processes; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{datetime.date.today()}; {seconds:.0f} s.  \n{len(found)} model types: {counts['exact']} exact, "
          f"{counts['mismatch']} mismatch, {counts['refused']} refused, {counts['error']} error, "
          f"{len(skipped)} skipped.\n")
    print(table(results, skipped))


if __name__ == "__main__":
    main()
