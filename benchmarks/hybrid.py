"""Hybrid layouts on 4 processes: tokens/s and communication bytes per rank and step by kind.

`seqpar train`'s loop (`Trainer`) runs the default model (dim 256, 4 layers, 8 heads, 4 KV heads)
at one sequence length on a 4-process gloo world for each layout: sp4 (WallFacer, ring, USP),
tp2 x sp2 (ring, USP), tp4 and dp2 x tp2 with FSDP. Bytes are what the comm layer and
`TensorParallelTraffic` count (exact, machine-independent); tokens/s is the median step after
the first. On a 2-core machine 4 processes share 2 cores, so tokens/s compares layouts only
roughly; the byte columns are the part that carries over to a cluster.

    python3 benchmarks/hybrid.py > docs/hybrid_measured.md
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

LAYOUTS = [("sp4 wallfacer", {"strategy": "wallfacer"}),
           ("sp4 ring zigzag", {"strategy": "ring", "layout": "zigzag"}),
           ("sp4 usp u2 x r2", {"strategy": "usp", "ulysses": 2}),
           ("tp2 x sp2 ring zigzag", {"tp": 2, "strategy": "ring", "layout": "zigzag"}),
           ("tp2 x sp2 usp u2", {"tp": 2, "strategy": "usp", "ulysses": 2}),
           ("tp4", {"tp": 4, "strategy": "local"}),
           ("dp2 x tp2 FSDP", {"tp": 2, "dp": 2, "strategy": "local", "fsdp": True})]


def config(seq: int, steps: int, out: str, **overrides) -> dict:
    return {"seq_len": seq, "batch": 1, "steps": steps, "warmup": 1, "eval_every": 0, "eval_batches": 1,
            "checkpoint_every": 0, "progress": False, "plot": False, "pack_documents": False, "out_dir": out,
            "nproc": 4, "layout": None, "corpus_bytes": max(400_000, 25 * seq), **overrides}


def measure(world: ProcessWorld, cfg: dict) -> dict:
    records = [r for r in world.run(run_training, cfg)[0]["records"] if r["type"] == "train"][1:]
    tokens = statistics.median(r["tokens_per_s"] for r in records)
    comm = records[-1]["comm"]
    return {"tokens_per_s": tokens, "sp": sum(v for k, v in comm.items() if not k.startswith(("tp_", "fsdp", "grad",
                                                                                             "loss"))),
            "tp": sum(v for k, v in comm.items() if k.startswith("tp_")),
            "grad": sum(v for k, v in comm.items() if k.startswith(("grad", "fsdp")))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with ProcessWorld(4) as world, tempfile.TemporaryDirectory() as tmp:
        for name, overrides in LAYOUTS:
            got = measure(world, config(args.seq, args.steps, f"{tmp}/{len(rows)}", **overrides))
            rows.append((name, got))
            print(f"{name}: {got}", file=sys.stderr)
    mib = 2 ** 20
    print(f"| layout (4 processes, seq {args.seq}) | tokens/s | SP bytes/rank/step | TP bytes/rank/step | "
          f"gradient sync bytes/rank/step |\n|---|---:|---:|---:|---:|")
    for name, got in rows:
        print(f"| {name} | {got['tokens_per_s']:,.0f} | {got['sp'] / mib:.2f} MiB | {got['tp'] / mib:.2f} MiB | "
              f"{got['grad'] / mib:.2f} MiB |")
    print(f"\n`python3 benchmarks/hybrid.py --seq {args.seq} --steps {args.steps}` on {platform.processor() or 'cpu'} "
          f"({os.cpu_count()} cores), torch {torch.__version__}, {datetime.date.today()}.")


if __name__ == "__main__":
    main()
