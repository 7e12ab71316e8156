"""Sweep: every decoder-only causal LM of the installed transformers through seqpar (issue #19).

`architectures()` lists the model types of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` with the reason
each one is skipped ('' when it is swept); `tiny_config(model_type)` builds a tiny instance's
config (2 layers, hidden 64, 4 heads / 2 KV heads, vocab 128, dropout off, a sliding window of
9 where the config has one); `sweep_rank(entries, window, ignored)` runs in a ProcessWorld: for
each (model type, strategy, init kwargs) one trainer-style training step through seqpar on every
rank, then on rank 0 stock transformers on the full batch in one process (sdpa where the model
has it, else eager) with the same weights, and returns per architecture: the dtype, the
reference's attention implementation, |Δloss| and the largest gradient difference relative to
that gradient's largest entry (or the error text). Used by tests/test_hf_sweep.py and
benchmarks/hf_sweep.py.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar
from seqpar.data import shard_batch
from seqpar.hf import HFCausalLM
from seqpar.model import IGNORE_INDEX
from seqpar.parallel import ParallelDims, average_gradients
from seqpar.train import loss_and_backward

VOCAB = 128
# applied where the config has the attribute (its defaults are kept otherwise)
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, initializer_range=0.1, n_embd=64, n_layer=2, n_head=4,
            n_positions=256, max_position_embeddings=256, ffn_dim=96, n_inner=96,
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            sliding_window=9, rotary_dim=8, num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            dropout=0.0, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, summary_first_dropout=0.0)
# reasons that hold for a whole model type, known before running it
SKIP = {
    "is_encoder_decoder": "encoder-decoder",
    "multimodal": "multimodal model class (image/audio inputs); its text-only model type is swept where it has one",
    "no_interface": "attention does not go through transformers' AttentionInterface",
    "encoder": "an encoder (BERT family) used as a decoder: bidirectional by design, outside issue #19",
}
STRATEGIES = [("ring", {"layout": "zigzag"}), ("usp", {"ulysses": 2, "ring": 2}), ("ulysses", {}),
              ("wallfacer", {"team_size": 2}), ("fpdt", {"chunks": 2}), ("allgather", {})]


def _modeling_source(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    spec = importlib.util.find_spec(f"transformers.models.{name}.modeling_{name}")
    return open(spec.origin).read() if spec and spec.origin else ""


def architectures() -> dict[str, str]:
    """{model type: '' (swept) or the reason it is skipped} over the causal-LM mapping."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = {}
    for model_type, cls in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        source = _modeling_source(model_type)
        try:
            default = AutoConfig.for_model(model_type)
            nested = any(hasattr(default, k) for k in ("vision_config", "audio_config", "text_config"))
            encoder_decoder = None if nested else getattr(default, "is_encoder_decoder", False)
        except Exception:  # noqa: BLE001 - a default config that does not validate: tiny_config says
            encoder_decoder = False
        if encoder_decoder is None:
            out[model_type] = SKIP["multimodal"]
        elif encoder_decoder:
            out[model_type] = SKIP["is_encoder_decoder"]
        elif "ALL_ATTENTION_FUNCTIONS" not in source:
            out[model_type] = SKIP["no_interface"]
        elif "ForConditionalGeneration" in cls:
            out[model_type] = SKIP["multimodal"]
        elif "add_cross_attention" in source and "is_decoder" in source:
            out[model_type] = SKIP["encoder"]
        else:
            out[model_type] = ""
    return out


def tiny_config(model_type: str, dtype: torch.dtype = torch.float64):
    """The tiny config of `model_type` (TINY where the config has the key), eager experts."""
    from transformers import CONFIG_MAPPING, AutoConfig

    cls = CONFIG_MAPPING[model_type]
    keys = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    try:
        default = cls()
        keys |= set(default.to_dict())
    except Exception:  # noqa: BLE001 - some defaults do not validate; the tiny values may
        default = None
    kwargs = {k: v for k, v in TINY.items() if k in keys}
    if "qk_rope_head_dim" in keys:  # multi-head latent attention: RoPE on head_dim = qk_rope_head_dim
        kwargs["head_dim"] = TINY["qk_rope_head_dim"]
    if "use_sliding_window" in keys:
        kwargs["use_sliding_window"] = True
    if getattr(default, "sliding_window", None) is None:
        kwargs.pop("sliding_window", None)  # no sliding-window layers by default: keep it so
    config = AutoConfig.for_model(model_type, **kwargs)
    config._experts_implementation = "eager"  # grouped matmuls have no fp64
    config.use_cache = False
    return config


MAX_PARAMS = 20_000_000  # a bigger "tiny" model means the tiny sizes did not reach its config


def _build(model_type: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny_config(model_type)).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"the tiny sizes do not reach this config: {n / 1e6:.0f}M parameters")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=dtype)


def _step(model_type: str, strategy: str, kwargs: dict, dtype: torch.dtype, window, ignored, mesh):
    """One training step through seqpar on this rank: (model, global mean loss)."""
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **kwargs)
    model = HFCausalLM(_build(model_type, dtype).eval(), ctx)  # eval: no dropout, router jitter (gradients still)
    tokens, labels, positions = shard_batch(ctx, window)
    labels = labels.masked_fill(ctx.shard(ignored), IGNORE_INDEX)
    loss = loss_and_backward(model, tokens, labels, positions, mesh.batch_comm)
    average_gradients(model.parameters(), mesh, mode="flat")
    return model, loss


def _reference(model_type: str, state: dict, dtype: torch.dtype, window, ignored):
    """Stock transformers in this process: (impl, mean loss, grads by name)."""
    from transformers import AutoModelForCausalLM

    tokens, labels = window[:, :-1], window[:, 1:].masked_fill(ignored, IGNORE_INDEX)
    config = tiny_config(model_type)
    for impl in ("sdpa", "eager"):
        try:
            config._attn_implementation = impl
            ref = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=impl)
            ref.load_state_dict(state)
            ref.eval()
            logits = ref(input_ids=tokens, use_cache=False).logits
        except (ValueError, NotImplementedError):
            if impl == "eager":
                raise
            continue
        loss = F.cross_entropy(logits.flatten(0, 1).to(dtype), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        return impl, loss.item(), {n: p.grad for n, p in ref.named_parameters()}


def _compare(model, loss, ref) -> dict[str, Any]:
    impl, ref_loss, grads = ref
    got = {n.removeprefix("hf_model."): p.grad for n, p in model.named_parameters()}
    diffs = {}
    floor = 1e-6 * max(g.abs().max().item() for g in grads.values() if g is not None)
    for name, g in grads.items():  # relative to the gradient's largest entry, at least 1e-6 of the largest
        mine = got.get(name)     # of all (a key bias's exact gradient is 0: its rounding noise is not)
        if (g is None) != (mine is None):
            diffs[name] = float("inf")
        elif g is not None:
            diffs[name] = ((mine - g).abs().max() / max(g.abs().max().item(), floor)).item()
    worst = max(diffs, key=diffs.get)
    return {"impl": impl, "dloss": abs(loss - ref_loss), "loss": ref_loss, "dgrad": diffs[worst], "worst": worst}


def _error(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:1] if not lines or not lines[0].endswith(":") else lines[:2])
    return f"{type(e).__name__}: {text}"[:300]


def _one(model_type, strategy, kwargs, window, ignored, mesh) -> dict[str, Any]:
    """fp64 first; fp32 when fp64 fails (the same exception on every rank: deterministic code)."""
    errors = []
    for dtype in (torch.float64, torch.float32):
        try:
            model, loss = _step(model_type, strategy, kwargs, dtype, window, ignored, mesh)
        except Exception as e:  # noqa: BLE001 - reported per architecture
            errors.append(_error(e))
            continue
        out = {"dtype": str(dtype).removeprefix("torch."), "fp64_error": errors[0] if errors else ""}
        if mesh.rank == 0:
            try:
                state = {k: v.detach() for k, v in model.hf_model.state_dict().items()}
                out.update(_compare(model, loss, _reference(model_type, state, dtype, window, ignored)))
            except Exception as e:  # noqa: BLE001
                out["error"] = "reference: " + _error(e)
                out["trace"] = traceback.format_exc()[-2000:]
        return out
    return {"error": errors[-1], "fp64_error": errors[0]}


def sweep_rank(entries: list[tuple[str, str, dict]], window: torch.Tensor, ignored: torch.Tensor,
               progress: bool = False) -> list[dict]:
    """For each (model type, strategy, init kwargs): the result of `_one` (rank 0's is the full one)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    mesh = ParallelDims(dist.get_world_size())
    results = []
    for model_type, strategy, kwargs in entries:
        if progress and mesh.rank == 0:
            print(f"hf_sweep: {model_type} ({strategy})", file=sys.stderr, flush=True)
        results.append({"arch": model_type, "strategy": strategy, "kwargs": kwargs,
                        **_one(model_type, strategy, kwargs, window, ignored, mesh)})
    return results


def batch(seq: int = 64, batch_size: int = 2, seed: int = 0):
    """window [batch, seq + 1] of random tokens and ignored [batch, seq] (30% of the labels)."""
    gen = torch.Generator().manual_seed(seed)
    window = torch.randint(3, VOCAB, (batch_size, seq + 1), generator=gen)
    return window, torch.rand(batch_size, seq, generator=gen) < 0.3


# -- the table -----------------------------------------------------------------------------------
# model type -> why it does not match or run (from the sweep's failures; the full sweep test
# requires one for every model type that is not exact)
_MAMBA = "hybrid: its Mamba layers mix the sequence outside attention and see only this rank's shard"
_LINEAR = "hybrid: its linear-attention (gated delta net) layers see only this rank's shard"
_CONV = "hybrid: its short causal convolutions see only this rank's shard"
_TINY = "not run: the tiny sizes do not build a valid instance of this config (not analysed further)"
_FAILED = "not run: the tiny instance fails before attention (not analysed further)"
KNOWN: dict[str, str] = {
    **dict.fromkeys(["bamba", "falcon_h1", "granitemoehybrid", "jamba", "nemotron_h", "zamba", "zamba2"], _MAMBA),
    **dict.fromkeys(["olmo_hybrid", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "qwen4_exp_text",
                     "kimi_linear", "bailing_hybrid"], _LINEAR),
    **dict.fromkeys(["lara_mini", "lfm3"], _CONV),
    "minimax": "hybrid: its lightning (linear) attention layers see only this rank's shard",
    "recurrent_gemma": "hybrid: its RG-LRU recurrent blocks see only this rank's shard",
    "inkling_text": "not analysed: the loss differs (8e-4) and r_proj has a gradient on one side only; "
                    "probably a sequence mixer beside attention",
    "qwen2_moe": "transformers inconsistency: its sliding layers get a sliding-window mask but the attention call "
                 "is not given `sliding_window` (flash-attention attends full causal there too); seqpar follows "
                 "the attention call",
    "doge": "builds a dynamic (data-dependent) attention mask and passes it to attention: seqpar refuses masks",
    "inkling2_text": "per-token attention sinks [batch, heads, seq, 1]: seqpar's sinks are one logit per head",
    "inkling2_loop_text": "per-token attention sinks [batch, heads, seq, 1]: seqpar's sinks are one logit per head",
    "blt": "byte latent transformer (local encoder/decoder with cross-attention, nested configs): not run, "
           "the tiny sizes do not reach its nested configs",
    "dbrx": _TINY + " (nested attn_config)",
    **dict.fromkeys(["dots3_note_text", "kolibri1_1", "zaya"], _TINY),
    **dict.fromkeys(["axk1", "deepseek_v3"], _TINY + " (multi-head latent attention sizes)"),
    **dict.fromkeys(["axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4", "lfm2_moe", "cohere_compass_text"], _FAILED),
}


def entries(model_types: list[str]) -> list[tuple[str, str, dict]]:
    """(model type, strategy, init kwargs): the strategies in turn over the sorted model types."""
    return [(t, *STRATEGIES[i % len(STRATEGIES)]) for i, t in enumerate(sorted(model_types))]


def tolerance(result: dict) -> float:
    """Relative bound on |Δloss| / loss and on each gradient's max difference / its max: 1e-5 for
    fp64 models (many compute their norms, RoPE or router in fp32 even then, and transformers'
    eager attention takes its softmax in fp32: differences of 1e-7 are their rounding; a wrong
    mask or position gives 1e-3 to 1); 1e-4 for fp32 models."""
    return 1e-5 if result.get("dtype") == "float64" else 1e-4


def verdict(result: dict) -> str:
    """'exact', 'mismatch', 'refused' (seqpar.hf's one-line refusal of a model that mixes tokens
    outside attention) or 'error'."""
    if "mixes tokens outside attention" in result.get("error", ""):
        return "refused"
    if "error" in result or "dgrad" not in result:
        return "error"
    tol = tolerance(result)
    ok = result["dloss"] <= tol * abs(result["loss"]) and result["dgrad"] <= tol
    return "exact" if ok else "mismatch"


def _strategy_label(result: dict) -> str:
    kw = " ".join(f"{k}={v}" for k, v in result["kwargs"].items())
    return f"{result['strategy']} {kw}".strip()


def table(results: list[dict], skipped: dict[str, str]) -> str:
    """Markdown: one row per model type (swept or skipped)."""
    lines = ["| architecture | result | strategy (4 ranks) | dtype, reference | max abs Δloss | max rel Δgrad | "
             "note |", "|---|---|---|---|---|---|---|"]
    rows = {}
    for r in results:
        v = verdict(r)
        note = KNOWN.get(r["arch"], "") if v != "exact" else ""
        if v == "refused":
            note = f"{note}: refused with one line (ValueError: {r['error'].split(': ', 1)[-1]})"
        elif v == "error":
            note = f"{note} ({r['error']})" if note else r["error"]
        elif v == "mismatch" and not note:
            note = f"largest difference: {r['worst']}"
        ref = f"{r['dtype']}, {r['impl']}" if "impl" in r else r.get("dtype", "")
        nums = (f"{r['dloss']:.1e}", f"{r['dgrad']:.1e}") if "dgrad" in r else ("", "")
        rows[r["arch"]] = f"| {r['arch']} | {v} | {_strategy_label(r)} | {ref} | {nums[0]} | {nums[1]} | {note} |"
    for arch, reason in skipped.items():
        rows[arch] = f"| {arch} | skipped | | | | | {reason} |"
    return "\n".join(lines + [rows[a] for a in sorted(rows)])
