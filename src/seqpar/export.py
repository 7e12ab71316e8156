"""`seqpar export RUN_DIR OUT_DIR`: a training run's checkpoint as a Hugging Face model directory.

For runs trained with `--hf-model`: the checkpoint (the newest, or `--checkpoint`) is verified,
read in this one process whatever world size and FSDP sharding wrote it, and saved with
`save_pretrained` next to the model directory's config and tokenizer files, so
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads the trained weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "main", "export_run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a `seqpar train --hf-model` output directory (config.json, checkpoints/)")
    p.add_argument("out_dir", help="the Hugging Face model directory to write (must not exist or be empty)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory (default: latest)")
    p.add_argument("--model-dir", help="the model directory trained from (default: the run's --hf-model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   help="dtype of the saved weights (default: as trained)")


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest", model_dir: str | None = None,
               dtype: str | None = None) -> Path:
    import torch

    from .hf import export_checkpoint
    run = Path(run_dir)
    info_path = run / "config.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a seqpar training run directory (no config.json)")
    try:
        config = json.loads(info_path.read_text())["config"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{str(info_path)!r} is not a seqpar run config: {e}") from None
    model_dir = model_dir or config.get("hf_model")
    if not model_dir:
        raise ValueError(f"run {str(run)!r} trained the built-in model; seqpar export writes runs trained with "
                         "--hf-model (or give --model-dir of a matching Hugging Face model)")
    ckpt = run / "checkpoints" if checkpoint == "latest" else Path(checkpoint)
    return export_checkpoint(ckpt, model_dir, out_dir, getattr(torch, dtype) if dtype else None)


def main(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.model_dir, args.dtype)
    print(f"seqpar export: wrote {out} (load with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0
