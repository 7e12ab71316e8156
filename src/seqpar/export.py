"""`seqpar export RUN_DIR OUT_DIR`: a training run's checkpoint as a Hugging Face model directory.

The checkpoint (the newest, or `--checkpoint`) is verified and read in this one process,
whatever world size and FSDP sharding wrote it, and saved with `save_pretrained`, so
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads the trained weights:

- runs trained with `--hf-model`: the same architecture, next to the model directory's
  config and tokenizer files (`seqpar.hf.export_checkpoint`);
- runs of the built-in model: a `LlamaForCausalLM` — the built-in decoder is Llama's
  architecture (RMSNorm, RoPE with half-split rotation, GQA, SwiGLU, untied head), so
  the weights map one to one (`LLAMA_KEYS`) and the logits agree.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import read_model_state, resolve_checkpoint
from .model import Transformer
from .train.config import TrainConfig

__all__ = ["add_arguments", "main", "export_run", "export_builtin", "load_builtin", "llama_key", "llama_config"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a `seqpar train` output directory (config.json, checkpoints/)")
    p.add_argument("out_dir", help="the Hugging Face model directory to write (must not exist or be empty)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory (default: latest)")
    p.add_argument("--model-dir", help="the model directory trained from (default: the run's --hf-model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   help="dtype of the saved weights (default: as trained)")


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest", model_dir: str | None = None,
               dtype: str | None = None) -> Path:
    run = Path(run_dir)
    info_path = run / "config.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a seqpar training run directory (no config.json)")
    try:
        config = TrainConfig.from_tables(json.loads(info_path.read_text())["config"], str(info_path))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{str(info_path)!r} is not a seqpar run config: {e}") from None
    if config.model.kind != "llama":
        raise ValueError(f"run {str(run)!r} trained a {config.model.kind!r} model; seqpar export writes language "
                         "models")
    model_dir = model_dir or config.model.hf_model
    ckpt = run / "checkpoints" if checkpoint == "latest" else Path(checkpoint)
    from .hf import export_checkpoint
    if not model_dir:
        return export_builtin(ckpt, config, out_dir, getattr(torch, dtype) if dtype else None)
    return export_checkpoint(ckpt, model_dir, out_dir, getattr(torch, dtype) if dtype else None)


# -- the built-in model as LlamaForCausalLM --------------------------------------------------------
LLAMA_KEYS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
              "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
              "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj",
              "attention.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
              "mlp.w2": "mlp.down_proj"}


def llama_key(key: str) -> str:
    """seqpar.model.Transformer state-dict key -> LlamaForCausalLM key."""
    name, _, leaf = key.rpartition(".")
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"model.layers.{index}.{LLAMA_KEYS[rest]}.{leaf}"
    return f"{LLAMA_KEYS[name]}.{leaf}"


def llama_config(cfg, max_positions: int):
    """The transformers LlamaConfig of a seqpar ModelConfig."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=max_positions, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=cfg.init_std)


def load_builtin(checkpoint: Path, cfg: TrainConfig, ctx=None) -> Transformer:
    """The run's Transformer with the checkpoint's weights, on `ctx`, in this one process."""
    path = resolve_checkpoint(str(checkpoint), checkpoint, verify="full")
    model = Transformer(cfg.model_config(), ctx).to({"float64": torch.float64}.get(cfg.optim.dtype, torch.float32))
    state = model.state_dict()
    try:
        read_model_state(path, state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not hold this run's model: {e}") from None
    model.load_state_dict(state)
    return model


def export_builtin(checkpoint: Path, cfg: TrainConfig, out_dir: str | Path, dtype=None) -> Path:
    """A checkpoint of the built-in Transformer -> a LlamaForCausalLM `save_pretrained` directory."""
    from transformers import LlamaForCausalLM

    from .hf import check_export_dir, save_pretrained_dir
    check_export_dir(out_dir)
    model = load_builtin(checkpoint, cfg)
    stored = next(model.parameters()).dtype
    llama = LlamaForCausalLM(llama_config(model.cfg, max(cfg.data.seq_len, 2048))).to(dtype or stored)
    missing, unexpected = llama.load_state_dict({llama_key(k): v for k, v in model.state_dict().items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"weight mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return save_pretrained_dir(llama, out_dir)


def main(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.model_dir, args.dtype)
    print(f"seqpar export: wrote {out} (load with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0
