"""Example runs of the model families `seqpar train` brings: a Hugging Face Llama and a DiT.

Runs (or, with --reuse, reads back) the README's two commands on the local CPU world and
writes docs/models.md with their loss curves, the DiT's sample grid and tokens/s; then
times a few steps of `--model dit --image-size 256` (256x256 crops, patch 2: 16,384
tokens per image, one flag from the defaults' 1,024).

    python3 benchmarks/models.py > docs/models.md
    python3 benchmarks/models.py --runs /tmp/ex --reuse > docs/models.md   # runs already made there
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from seqpar.metrics import plot_loss_curve, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "hf": ["--hf-model", str(ROOT / "examples" / "hf-llama-tiny"), "--nproc", "4", "--strategy", "usp",
           "--ulysses", "2", "--seq-len", "1024", "--steps", "150"],
    "dit": ["--model", "dit", "--image-size", "64", "--dim", "128", "--n-heads", "8", "--n-kv-heads", "8",
            "--nproc", "4", "--strategy", "wallfacer", "--batch", "4", "--steps", "400", "--lr", "1e-3",
            "--min-lr", "1e-4", "--warmup", "20", "--eval-every", "100", "--samples", "10", "--sample-steps", "16"],
}
DEFAULT_DIT = ["--model", "dit", "--image-size", "256", "--nproc", "4", "--strategy", "ulysses", "--steps", "2",
               "--samples", "0", "--eval-every", "0", "--eval-batches", "1", "--checkpoint-every", "0", "--no-plot"]


def train(args: list[str], out: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seqpar", "train", *args, "--out-dir", str(out), "--no-progress"],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"seqpar train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def summary(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_r = [r for r in records if r["type"] == "train"]
    val = [r for r in records if r["type"] == "val"]
    info = json.loads((out / "config.json").read_text())
    return {"params": info["num_params"], "first": train_r[0]["loss"], "last": train_r[-1]["loss"],
            "steps": len(train_r), "val": [(r["step"], r["val_loss"]) for r in val],
            "tok_s": statistics.median(r["tokens_per_s"] for r in train_r[1:]),
            "step_s": statistics.median(r["step_time_s"] for r in train_r[1:]),
            "comm_mib": statistics.median(r["comm_bytes"] for r in train_r[1:]) / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/models", help="directory of the run outputs")
    ap.add_argument("--reuse", action="store_true", help="read runs already in --runs instead of training")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    a = ap.parse_args()
    runs, docs = Path(a.runs), Path(a.docs)
    seconds = {}
    for name, args in RUNS.items():
        if not (a.reuse and (runs / name / "metrics.jsonl").is_file()):
            shutil.rmtree(runs / name, ignore_errors=True)
            seconds[name] = train(args, runs / name)
    shutil.copy(runs / "hf" / "loss.png", docs / "models_hf_loss.png")
    plot_loss_curve(read_jsonl(runs / "dit" / "metrics.jsonl"), docs / "models_dit_loss.png",
                    "DiT 64x64, wallfacer sp=4", "loss (velocity MSE per pixel value)")
    shutil.copy(runs / "dit" / "samples.png", docs / "models_dit_samples.png")
    shutil.rmtree(runs / "dit256", ignore_errors=True)
    default_seconds = train(DEFAULT_DIT, runs / "dit256")
    hf, dit, d256 = summary(runs / "hf"), summary(runs / "dit"), summary(runs / "dit256")
    cmd = lambda args: "seqpar train " + " ".join(args).replace(str(ROOT) + "/", "")  # noqa: E731
    print(f"""# Bring your own model: example runs

Command: `python3 benchmarks/models.py`  
Machine: {torch.get_num_threads()}-thread CPU ({platform.machine()}), gloo, 4 processes; torch {torch.__version__},
Python {platform.python_version()}; date {datetime.date.today()}.

## A Hugging Face Llama (`--hf-model`)

`{cmd(RUNS['hf'])}`

`examples/hf-llama-tiny` holds only a `config.json` (a {hf['params'] / 1e6:.2f}M-parameter
`LlamaForCausalLM`: 4 layers, 8 heads / 4 KV heads, vocab 256), so transformers builds it with
random weights and, without tokenizer files, the stdlib corpus is read as bytes (packed
documents: each source file is one). Its attention runs through seqpar's USP (Ulysses 2 x
ring 2) on 4 gloo processes. Loss {hf['first']:.2f} -> {hf['last']:.2f} in {hf['steps']} steps;
validation {', '.join(f'{v:.3f} (step {s})' for s, v in hf['val'])}; median {hf['tok_s']:,.0f} tokens/s
({hf['step_s'] * 1e3:.0f} ms per step of 1024 tokens), {hf['comm_mib']:.1f} MiB sent per rank and step.
`seqpar export runs/models/hf OUT` then writes a directory `AutoModelForCausalLM.from_pretrained`
loads (tested bit for bit in `tests/test_hf.py`).

![HF Llama loss](models_hf_loss.png)

## A DiT on real photos (`--model dit`)

`{cmd(RUNS['dit'])}`

A {dit['params'] / 1e6:.2f}M-parameter DiT (4 adaLN-Zero blocks, dim 128, 8 heads, patch 2: 1,024
tokens per 64x64 crop) learns rectified flow on random crops and flips of the 10 colour and
gray photos scikit-image ships (class = photo), with WallFacer (2 teams of 2) over the patch
tokens. Validation uses 4 other photos it never trains on. Loss {dit['first']:.3f} ->
{dit['last']:.3f} in {dit['steps']} steps; validation {', '.join(f'{v:.3f} (step {s})' for s, v in dit['val'])};
median {dit['tok_s']:,.0f} tokens/s ({dit['step_s'] * 1e3:.0f} ms per step of 4 images). At the end
every rank runs the sampler (16 Euler steps, one image per class) and rank 0 writes the grid:

![DiT samples](models_dit_samples.png)

![DiT loss](models_dit_loss.png)

In the 16K-token configuration (`--image-size 256`: 256x256 crops, 16,384 tokens per image,
dim 256, 4 layers) one training step of one image takes {d256['step_s']:.1f} s on this machine with
Ulysses over 4 processes ({d256['tok_s']:,.0f} tokens/s; `{cmd(DEFAULT_DIT)}`, {default_seconds:.0f} s
in all): attention over 16K tokens dominates, which is what sequence parallelism is for on
more devices.
""")
    if seconds:
        print("Wall time of the runs: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".")


if __name__ == "__main__":
    main()
