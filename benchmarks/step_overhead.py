"""Per-step overheads of `seqpar train`'s loop: what the trainer adds around forward/backward.

Times, on a 2-process gloo world (sp = 2, one thread each), the pieces `Trainer.run` calls
every step besides the model: the stop-signal agreement (one 4-byte MAX all-reduce), the
gradient sync (torch DDP inside backward: the step's time minus an interleaved step with
DDP's all-reduce off), the gradient norm (clip + the host sync that decides whether the step is
finite) and the metrics record; the loss normalisation's all-reduce is inside the step. Each
as milliseconds per step (median, worst rank) and as a share of the step.

    python3 benchmarks/step_overhead.py                     # seq 1024 (README default) and 8192
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

from seqpar.testing import ProcessWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.train import step_overheads

PIECES = [("_agreed_stop_signal", "stop-signal all-reduce"),
          ("_sync_gradients", "gradient sync (DDP: step minus step without)"),
          ("_clip", "gradient norm + clip (host sync)"), ("_record", "metrics record")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--strategy", default="ring")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ProcessWorld(2, threads=1, timeout=3600) as world:
        for seq in a.seq:
            cfg = {"seq_len": seq, "batch": 1, "steps": 1000, "warmup": 1, "eval_every": 0, "eval_batches": 1,
                   "checkpoint_every": 0, "progress": False, "plot": False, "out_dir": f"{tmp}/{seq}", "nproc": 2,
                   "strategy": a.strategy, "corpus_bytes": max(400_000, 25 * seq)}
            got = world.run(step_overheads, cfg, a.steps)
            rows.append((seq, {k: max(r[k] for r in got) for k in got[0]}))
            print(f"seq {seq}: step {rows[-1][1]['step'] * 1e3:.1f} ms", file=sys.stderr)
    print(f"Command: `python3 benchmarks/step_overhead.py {' '.join(sys.argv[1:])}`  \n"
          f"Machine: 2-core CPU, gloo, 2 processes x 1 thread; torch {torch.__version__}, Python "
          f"{platform.python_version()}; date {datetime.date.today()}; strategy {a.strategy}, default model, "
          f"packed stdlib documents; median of {a.steps} steps, worst rank.\n")
    print("| seq | step (ms) | " + " | ".join(label for _, label in PIECES) + " | all four |")
    print("|---:|---:|" + "---:|" * (len(PIECES) + 1))
    for seq, r in rows:
        cells = [f"{r[k] * 1e3:.2f} ms ({100 * r[k] / r['step']:.2f}%)" for k, _ in PIECES]
        total = sum(r[k] for k, _ in PIECES)
        print(f"| {seq} | {r['step'] * 1e3:.1f} | " + " | ".join(cells) + f" | {100 * total / r['step']:.2f}% |")


if __name__ == "__main__":
    main()
