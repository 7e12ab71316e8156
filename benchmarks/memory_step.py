"""Memory of a whole training step per rank vs sequence length: plain / activation
checkpointing / FPDT (chunks + host offload + chunked MLP + chunked loss + checkpointing).

For each configuration and sequence length, `seqpar train`'s loop (`Trainer`, the default
3.08M-parameter model, fp32, batch 1) runs two steps on a 2-process gloo world (sp = 2) and
`tests/checks/fpdt.py: training_step_memory` meters the second on every rank: `static` (parameters +
AdamW state) and the step's peak working set above it (activations, attention, logits and
loss, gradients, optimizer temporaries; CPU: bytes of live torch storages, FPDT's offloaded
K/V chunks are host memory outside torch). A least-squares line through the peaks gives
bytes per token per rank, and the longest sequence that fits a per-rank budget (16 GiB by
default) is extrapolated from it: attention time on 2 CPU cores forbids running those
lengths here, so they are extrapolations from the measured slope, checked for linearity
on the measured points (the table shows each point's deviation from the line).

    python3 benchmarks/memory_step.py >> docs/memory.md
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from seqpar.testing import ProcessWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.fpdt import training_step_memory

GiB, MiB = 2 ** 30, 2 ** 20


def configs(chunks: int) -> dict[str, dict]:
    return {
        "plain (ulysses)": {"strategy": "ulysses"},
        "activation checkpointing": {"strategy": "ulysses", "activation_checkpointing": True},
        f"FPDT u={chunks} offload + chunked MLP/loss + ckpt": {
            "strategy": "fpdt", "chunks": chunks, "offload": True, "mlp_chunks": chunks, "loss_chunks": chunks,
            "activation_checkpointing": True},
        f"FPDT u={chunks} offload + chunked MLP/loss + offloaded ckpt": {
            "strategy": "fpdt", "chunks": chunks, "offload": True, "mlp_chunks": chunks, "loss_chunks": chunks,
            "offload_activations": True},
        f"FPDT u={chunks} offload + chunked blocks + chunked loss": {
            "strategy": "fpdt", "chunks": chunks, "offload": True, "loss_chunks": chunks, "chunked_blocks": True},
        f"FPDT u={chunks} offload + chunked blocks + chunked loss + offloaded ckpt": {
            "strategy": "fpdt", "chunks": chunks, "offload": True, "loss_chunks": chunks, "chunked_blocks": True,
            "offload_activations": True},
    }


def base(seq: int, out: str) -> dict:
    return {"seq_len": seq, "batch": 1, "steps": 2, "warmup": 1, "eval_every": 0, "eval_batches": 1,
            "checkpoint_every": 0, "progress": False, "plot": False, "pack_documents": False, "out_dir": out,
            "nproc": 2, "corpus_bytes": max(400_000, 25 * seq)}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--plot", default="docs/memory_step.png")
    a = ap.parse_args()
    t0 = datetime.datetime.now()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in configs(a.chunks).items():
            for seq in a.seq:
                with ProcessWorld(2, threads=1, timeout=3600) as world:  # fresh: no allocator history
                    runs = world.run(training_step_memory, {**base(seq, f"{tmp}/{seq}"), **overrides})
                r = max(runs, key=lambda x: x["activations"])
                results.setdefault(label, []).append(r)
                print(f"{label} seq {seq}: fwd+bwd {r['activations'] / MiB:.1f} MiB, optimizer "
                      f"{r['optimizer'] / MiB:.1f} MiB ({r['seconds']:.1f} s)", file=sys.stderr)
    minutes = (datetime.datetime.now() - t0).total_seconds() / 60
    print(HEADER.format(budget=a.budget_gib, args=" ".join(sys.argv[1:]), torch=torch.__version__,
                        python=platform.python_version(), date=datetime.date.today(), minutes=minutes))
    summary = []
    for label, rows in results.items():
        for r in rows:
            cells = [label, 2 * r["tokens_per_rank"], r["tokens_per_rank"], f"{r['activations'] / MiB:.1f}",
                     f"{r['retained'] / MiB:.1f}", f"{r['optimizer'] / MiB:.1f}", f"{r['host_peak'] / MiB:.1f}",
                     f"{r['seconds']:.1f}"]
            print("| " + " | ".join(str(c) for c in cells) + " |")
        xs, ys = [r["tokens_per_rank"] for r in rows], [r["activations"] for r in rows]
        intercept, slope = fit(xs, ys)
        err = max(abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys))
        room = a.budget_gib * GiB - rows[0]["static"]
        longest = 2 * (room - intercept) / slope if max(r["optimizer"] for r in rows) < room else 0.0
        summary.append((label, rows[0]["static"], intercept, slope, err, longest))
    plain = summary[0][5]
    print(f"\n| configuration | static (MiB) | intercept (MiB) | bytes / token / rank | fit error | "
          f"longest seq in {a.budget_gib:g} GiB | vs plain |\n|---|---:|---:|---:|---:|---:|---:|")
    for label, static, intercept, slope, err, longest in summary:
        print(f"| {label} | {static / MiB:.1f} | {intercept / MiB:.1f} | {slope:,.0f} | {100 * err:.1f}% | "
              f"{longest / 1e6:.2f}M | {longest / plain:.1f}x |")
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in results.items():
        ax.plot([2 * r["tokens_per_rank"] for r in rows], [r["activations"] / MiB for r in rows], "o-", label=label)
    ax.set_xlabel("sequence length (2 ranks)")
    ax.set_ylabel("forward + backward peak per rank (MiB)")
    ax.set_title("Whole training step memory, default model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.plot, dpi=100)
    print(f"\n![whole-step memory]({a.plot.removeprefix('docs/')})")


HEADER = """
## Whole training step: bytes per token per rank, and the longest sequence in {budget:g} GiB

Command: `python3 benchmarks/memory_step.py {args}`  
Machine: 2-core CPU, gloo, 2 processes (sp = 2) x 1 thread; torch {torch}, Python {python};
date {date}; {minutes:.1f} min.  
Model: the default `seqpar train` model (3.08M parameters: 4 layers, dim 256, 8 heads / 4 KV,
vocab 256), fp32, batch 1, causal; the second of two steps metered on every rank (worst rank).

*static* = parameters + AdamW state (held across steps); *fwd+bwd* = the forward + backward
working peak above that (activations, attention, logits/loss, gradients); *kept* = what the
forward leaves for the backward (saved activations); *optimizer* = the peak of gradient sync,
clipping and the AdamW update (no activations are live then); *host* = FPDT's host store;
*per token* = slope of a least-squares line through the fwd+bwd peaks against the tokens each
rank holds; *fit error* = the largest deviation of a measured point from that line; *longest
seq* = the sequence (2 ranks) at which static + the fwd+bwd line reaches the budget,
extrapolated: the attention time of such lengths on 2 CPU cores forbids running them here.

| configuration | seq | tokens/rank | fwd+bwd (MiB) | kept (MiB) | optimizer (MiB) | host (MiB) | time (s) |
|---|---:|---:|---:|---:|---:|---:|---:|"""


if __name__ == "__main__":
    main()
