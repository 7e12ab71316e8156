"""Training throughput of every strategy against data parallelism at equal total cores.

For each sequence length, `seqpar train`'s loop (`Trainer`) runs the default model on a
2-process gloo world (one thread each: the machine's 2 cores) for every strategy at sp = 2,
and once as pure data parallelism (dp = 2, each process a whole sequence of the same length,
the same tokens per step in all). Sequence-parallel efficiency = tokens/s of the strategy /
tokens/s of dp. Steps after the first `--warmup` are timed (median step time).

    python3 benchmarks/throughput.py > docs/throughput.md
    python3 benchmarks/throughput.py --seq 4096 --steps 3 --quick      # a minute
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from seqpar.testing import ProcessWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.train import run_training

STRATEGIES = [("ring zigzag", {"strategy": "ring", "layout": "zigzag"}),
              ("ulysses", {"strategy": "ulysses"}),
              ("usp u2", {"strategy": "usp", "ulysses": 2}),
              ("usp u2 contiguous", {"strategy": "usp", "ulysses": 2, "layout": "contiguous"}),
              ("allgather zigzag", {"strategy": "allgather", "layout": "zigzag"}),
              ("wallfacer", {"strategy": "wallfacer"}),
              ("lss contiguous (the paper's segments)", {"strategy": "lss", "layout": "contiguous"}),
              ("lss zigzag", {"strategy": "lss", "layout": "zigzag"}),
              ("fpdt chunks 2", {"strategy": "fpdt", "chunks": 2})]
QUICK = STRATEGIES[:2]


def config(seq: int, steps: int, out: str, **overrides) -> dict:
    return {"seq_len": seq, "batch": 1, "steps": steps, "warmup": 1, "eval_every": 0, "eval_batches": 1,
            "checkpoint_every": 0, "progress": False, "plot": False, "pack_documents": False, "out_dir": out,
            "nproc": 2, "layout": "", "corpus_bytes": max(400_000, 25 * seq), **overrides}


def measure(world: ProcessWorld, cfg: dict, warmup: int) -> dict:
    records = [r for r in world.run(run_training, cfg)[0]["records"] if r["type"] == "train"]
    timed = records[warmup:]
    step = statistics.median(r["step_time_s"] for r in timed)
    tokens = records[0]["tokens_per_s"] * records[0]["step_time_s"]
    return {"step_s": step, "tok_s": tokens / step, "mfu": statistics.median(r["mfu"] for r in timed),
            "comm_mib": statistics.median(r["comm_bytes"] for r in timed) / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="ring and ulysses only")
    ap.add_argument("--only", nargs="+", help="labels (prefixes) of the strategies to run")
    a = ap.parse_args()
    strategies = QUICK if a.quick else STRATEGIES
    if a.only:
        strategies = [s for s in strategies if any(s[0].startswith(o) for o in a.only)]
    t0 = datetime.datetime.now()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ProcessWorld(2, threads=1, timeout=3600) as world:
        for seq in a.seq:
            base = measure(world, config(seq, a.steps, f"{tmp}/dp{seq}", strategy="local", dp=2), a.warmup)
            rows.append((seq, "data parallel (dp=2)", base, 1.0))
            print(f"seq {seq} dp: {base['tok_s']:.0f} tok/s", file=sys.stderr)
            for label, overrides in strategies:
                got = measure(world, config(seq, a.steps, f"{tmp}/{label}{seq}", **overrides), a.warmup)
                rows.append((seq, label, got, got["tok_s"] / base["tok_s"]))
                print(f"seq {seq} {label}: {got['tok_s']:.0f} tok/s ({got['tok_s'] / base['tok_s']:.3f})",
                      file=sys.stderr)
    minutes = (datetime.datetime.now() - t0).total_seconds() / 60
    print(f"""# Training throughput: sequence parallelism vs data parallelism

Command: `python3 benchmarks/throughput.py {' '.join(sys.argv[1:])}`  
Machine: {os.cpu_count()} CPU cores ({platform.machine()}), gloo, 2 processes x 1 thread; torch {torch.__version__},
Python {platform.python_version()}; date {datetime.date.today()}; {minutes:.1f} min.  
Model: the default `seqpar train` model (3.08M parameters, 4 layers, dim 256, 8 heads / 4 KV), fp32,
causal, one sequence per step and dp rank, no document packing; {a.steps} steps, the first
{a.warmup} not timed.

On the same 2 cores, the strategies split one sequence of `seq` tokens over the 2 ranks
(sp=2) and the baseline gives each rank its own sequence of `seq` tokens (dp=2). Per token
both do the same work (attention over the same causal context, the same matmuls), so
tokens/s compares what each parallelisation costs. *efficiency* = tokens/s / tokens/s of dp.

| seq | configuration | step (s) | tokens/s | efficiency | MFU (nominal peak) | comm MiB/step/rank |
|---:|---|---:|---:|---:|---:|---:|""")
    for seq, label, r, eff in rows:
        print(f"| {seq} | {label} | {r['step_s']:.2f} | {r['tok_s']:,.0f} | {eff:.3f} | {100 * r['mfu']:.1f}% | "
              f"{r['comm_mib']:.1f} |")


if __name__ == "__main__":
    main()
