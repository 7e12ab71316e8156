"""The regret of `--strategy auto` over whole training steps, hybrid meshes included.

For each sequence length, the default model (`seqpar train`'s: dim 256, 4 layers, 8 heads,
4 KV heads) on a 4-process gloo world: the planner ranks every candidate (sequence
parallelism alone, tp2 / tp4 with sequence parallelism, pp2 / pp4 stages) on this world's
calibration; the best `--top` and the best of every other tp x pp mesh train `--steps`
interleaved steps each (`seqpar.train.auto_profile`, what `seqpar train --strategy auto
--auto-profile K` runs). Printed: per shape the Spearman rank correlation of predicted vs
measured step times, the regret (measured step of the planner's pick / the measured best),
the confirmed regret (the two re-measured alone) and, with --details, every candidate.

    python3 benchmarks/auto_regret.py --seqs 1024 4096 --details
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from seqpar.data import stdlib_corpus
from seqpar.testing import ProcessWorld
from seqpar.train import TrainConfig
from seqpar.train.auto import ensure_calibration, runnable_candidates
from seqpar.train.auto_profile import profile_candidates, profile_steps_rank, profiled_candidates, profiled_runs


def shape_report(world: ProcessWorld, seq: int, args, tmp: str, data: str):
    cfg = TrainConfig.of(seq_len=seq, nproc=4, strategy="auto", out_dir=f"{tmp}/{seq}", batch=args.batch,
                         calibration=args.calibration or "", corpus_bytes=max(400_000, 25 * seq))
    cal = ensure_calibration(cfg, 4)
    runs = profiled_runs(profiled_candidates(runnable_candidates(cfg, 4, cal), args.top), cfg, data)
    runner = lambda configs, steps, warmup: world.run(profile_steps_rank, configs, steps, warmup)[0]  # noqa: E731
    return profile_candidates(runs, 4, steps=args.steps, warmup=1, confirm=args.confirm, runner=runner)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=3, help="the planner's best K, plus the best of every other mesh")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--confirm", type=int, default=3)
    ap.add_argument("--calibration", help="a `seqpar plan --calibrate` JSON of this 4-rank world (default: measure)")
    ap.add_argument("--details", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0, rows, details = time.time(), [], []
    with ProcessWorld(4, timeout=3600.0) as world, tempfile.TemporaryDirectory() as tmp:
        data = str(stdlib_corpus(Path(tmp) / "corpus", max_bytes=max(400_000, 25 * max(args.seqs))))
        for seq in args.seqs:
            report = shape_report(world, seq, args, tmp, data)
            pred = next(c for c in report.candidates if c.label == report.predicted_best)
            meas = next(c for c in report.candidates if c.label == report.measured_best)
            rows.append(f"| seq {seq}, batch {args.batch} | {len(report.candidates)} | {report.spearman:.2f} | "
                        f"{report.regret:.3f} | {report.confirmed_regret:.3f} | {pred.label} "
                        f"({pred.measured['seconds']:.3f} s) | {meas.label} ({meas.measured['seconds']:.3f} s) |")
            details.append((seq, report))
            print(rows[-1], file=sys.stderr)
    print("| shape (4 processes) | candidates | Spearman | regret | confirmed regret | planner's pick (measured "
          "step) | measured best (step) |\n|---|---:|---:|---:|---:|---|---|")
    print("\n".join(rows))
    if args.details:
        for seq, report in details:
            print(f"\nseq {seq}:\n\n| candidate | predicted s/step | measured s/step |\n|---|---:|---:|")
            for c in report.candidates:
                got = f"{c.measured['seconds']:.3f}" if "seconds" in c.measured else c.measured.get("error", "-")
                print(f"| {c.label} | {c.step_time:.3f} | {got} |")
    print(f"\nCommand: `python3 benchmarks/auto_regret.py {' '.join(sys.argv[1:])}` — machine: "
          f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores), gloo, 4 local processes of 1 thread; torch "
          f"{torch.__version__}; date {datetime.date.today()}; total {(time.time() - t0) / 60:.0f} min.")


if __name__ == "__main__":
    main()
