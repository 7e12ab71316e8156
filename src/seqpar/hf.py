"""Hugging Face causal LMs (Llama, Qwen2, Qwen3, Mistral, ...) through any seqpar strategy.

`HFCausalLM(hf_model, ctx)` wraps a `transformers` causal LM so that it follows the protocol of
`seqpar.model.Transformer`: `forward(tokens, positions, labels=None, cu_seqlens=None)` on this
rank's shard of the sequence, `(loss_sum, count)` with labels, logits without; `layers` (the
decoder blocks, for FSDP) and `num_params()`. Its state-dict keys are the HF model's keys with
the prefix ``hf_model.``.

How the context reaches attention: importing this module registers ONE attention function,
``"seqpar"``, in transformers' `AttentionInterface` (no model class is patched). The wrapper
sets the model's `attn_implementation` to it and passes its context with every forward as the
keyword argument ``seqpar_context`` (and the packed-document boundaries as
``seqpar_cu_seqlens``); transformers hands a model's forward kwargs through every decoder
layer to the attention function, which calls `ctx.attention(q, k, v, causal=True,
scale=scaling, cu_seqlens=..., window=..., sinks=..., softcap=...)`: a layer's
`sliding_window` W (transformers: key j visible from query i iff i - W < j <= i) becomes the
window (W - 1, 0), so per-layer windows (Gemma 2/3, gpt-oss, Cohere2 layer types, Mistral) work
at any sequence length; `s_aux` (gpt-oss's attention sinks, a parameter of the attention
module, [heads]) becomes `sinks` (its gradient flows like every parameter's) and `softcap`
(Gemma 2's attention logit soft-capping) `softcap`. So each model carries its own context and no process group
is global; calling `.hf_model` directly without ``seqpar_context`` raises. Models whose decoder
layers do not hand the kwargs on to attention (StableLM) still get them: for the duration of
its forward `HFCausalLM` also holds the context and boundaries on the model's modules
(`_CALL_ATTR`), where the attention function finds them on the module it is called for. ``"seqpar"`` has no
entry in transformers' `AttentionMaskInterface`, which is transformers' sanctioned way for
custom attention to get no mask at all (`create_causal_mask` returns None) rather than one
built for the local shard only; the causal and document masks are applied by seqpar, over the
global sequence.

Helpers for the trainer / CLI: `load_hf_model` (a local model directory: config.json, with or
without safetensors weights), `hf_vocab_size`, `tokenize_corpus` (text -> seqpar token file
with the model's tokenizer) and `export_checkpoint` (a seqpar training checkpoint -> a
`save_pretrained` directory that `AutoModelForCausalLM.from_pretrained` loads).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import read_model_state, resolve_checkpoint
from .context import SeqParallel
from .corpus import TOKENIZER_FILES
from .data import find_documents, open_tokens, write_document_index, write_token_file
from .io import atomic_write

try:
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
except ImportError as e:  # pragma: no cover - the "hf" extra is not installed
    raise ImportError("seqpar.hf needs transformers: pip install 'seqpar[hf]'") from e

__all__ = ["HFCausalLM", "load_hf_model", "sequence_mixers", "hf_vocab_size", "hf_model_shape", "tokenize_corpus",
           "export_checkpoint", "seqpar_attention_forward", "IMPLEMENTATION", "CONTEXT_KWARG", "CU_SEQLENS_KWARG",
           "PREFIX"]

IMPLEMENTATION = "seqpar"              # the attn_implementation name registered with transformers
CONTEXT_KWARG = "seqpar_context"       # forward kwarg carrying the SeqParallel context to attention
CU_SEQLENS_KWARG = "seqpar_cu_seqlens"  # forward kwarg carrying the global document boundaries
PREFIX = "hf_model."                   # HFCausalLM state-dict key = PREFIX + HF model key
_CALL_ATTR = "_seqpar_call"            # (context, cu_seqlens) on every module during HFCausalLM.forward
IGNORE_INDEX = -100
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
#: token mixers besides attention, by config layer type, class name or Conv1d (GPT-2's Conv1D is a Linear)
_MIXER_LAYER_TYPES = {"linear_attention", "mamba", "conv", "recurrent"}
_MIXER_CLASSES = re.compile(r"Mamba|DeltaNet|DeltaAttention|LightningAttention|Rglru|ShortConv", re.IGNORECASE)


# -- the attention function ----------------------------------------------------------------------
def seqpar_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             sliding_window: int | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function: query [batch, heads, seq_local, head_dim], key/value
    [batch, kv_heads, seq_local, head_dim] -> (out [batch, seq_local, heads, head_dim], None), exact
    causal self-attention over the whole (sharded) sequence of `kwargs["seqpar_context"]`."""
    held = module.__dict__.get(_CALL_ATTR)  # layers that drop the kwargs (StableLM)
    ctx = kwargs.get(CONTEXT_KWARG, held[0] if held else None)
    if not isinstance(ctx, SeqParallel):
        raise ValueError(f"attn_implementation {IMPLEMENTATION!r} needs the sequence-parallel context: call the "
                         f"model through seqpar.hf.HFCausalLM, or pass {CONTEXT_KWARG}=ctx to its forward")
    cu_seqlens = kwargs.get(CU_SEQLENS_KWARG, held[1] if held else None)
    _check_supported(module, query, key, attention_mask, dropout)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    window = (int(sliding_window) - 1, 0) if sliding_window else None
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    device = q.device.type
    if torch.is_autocast_enabled(device):  # as autocast runs F.scaled_dot_product_attention: its dtype;
        # HF's fp32 RoPE tables leave q, k in fp32 while v is bf16
        q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
    with torch.autocast(device, enabled=False):
        out = ctx.attention(q, k, v, causal=True, scale=scaling, cu_seqlens=cu_seqlens, window=window,
                            sinks=sinks, softcap=kwargs.get("softcap"))
    return out, None


def _check_supported(module: nn.Module, query: Tensor, key: Tensor, attention_mask, dropout: float) -> None:
    """ValueError for what sequence-parallel causal self-attention cannot compute exactly."""
    name = type(module).__name__
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{name} is not causal: seqpar's Hugging Face attention supports causal self-attention only")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{name}: {query.shape[2]} queries but {key.shape[2]} keys per rank; seqpar supports "
                         "self-attention over the sharded sequence only (no cross-attention, no KV cache: "
                         "use_cache=False)")
    if attention_mask is not None:
        raise ValueError(f"{name} got an attention mask; seqpar applies the causal mask itself over the global "
                         "sequence: pass no attention_mask (packed documents: cu_seqlens)")
    if dropout and dropout > 0:
        raise ValueError(f"{name}: attention dropout {dropout} is not supported by seqpar; set the config's "
                         "attention_dropout to 0 (or evaluate with model.eval())")


AttentionInterface.register(IMPLEMENTATION, seqpar_attention_forward)


# -- the model -----------------------------------------------------------------------------------
class HFCausalLM(nn.Module):
    """A `transformers` causal LM with the `seqpar.model.Transformer` protocol (see module doc).

    Sets `hf_model`'s attention implementation to ``"seqpar"`` (on its config object: a config
    shared with another model changes for both) and turns its KV cache off.
    """

    def __init__(self, hf_model: nn.Module, ctx: SeqParallel | None, activation_checkpointing: bool = False):
        super().__init__()
        if ctx is not None and ctx.size > 1:
            _refuse_sequence_mixers(hf_model, ctx.size)
        self.hf_model, self.ctx = hf_model, ctx
        hf_model.set_attn_implementation(IMPLEMENTATION)
        hf_model.config.use_cache = False
        if activation_checkpointing:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @contextlib.contextmanager
    def _held(self, cu_seqlens):
        """The context and boundaries held on every module of the model for one forward (and its
        activation-checkpointing recomputation, which runs inside backward: kept until then)."""
        modules = list(self.hf_model.modules())
        for m in modules:
            m.__dict__[_CALL_ATTR] = (self.ctx, cu_seqlens)
        try:
            yield
        finally:
            if not (torch.is_grad_enabled() and self.hf_model.is_gradient_checkpointing):
                for m in modules:
                    m.__dict__.pop(_CALL_ATTR, None)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (FSDP wraps each one)."""
        return self.hf_model.get_decoder().layers

    @property
    def config(self):
        """The Hugging Face config."""
        return self.hf_model.config

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: Tensor, positions: Tensor, labels: Tensor | None = None, cu_seqlens=None):
        """tokens/labels [batch, seq_local] (int64), positions [seq_local] or [batch, seq_local]
        (global positions, or positions inside documents); cu_seqlens: global document boundaries
        (see `SeqParallel.attention`), handed to every layer's attention.

        Without labels: logits [batch, seq_local, vocab]. With labels (already shifted, see
        `seqpar.data.shard_batch`): (loss_sum, count), the sum of this rank's token cross-entropies
        (fp32, fp64 for fp64 logits; labels == -100 ignored) and the number of labelled tokens.
        """
        if self.ctx is None:
            raise ValueError("this HFCausalLM has no sequence-parallel context (built with ctx=None)")
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        with self._held(cu_seqlens):
            logits = self.hf_model(input_ids=tokens, position_ids=positions, use_cache=False,
                                   **{CONTEXT_KWARG: self.ctx, CU_SEQLENS_KWARG: cu_seqlens}).logits
        if labels is None:
            return logits
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss_sum = F.cross_entropy(logits.flatten(0, 1).to(work), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        return loss_sum, (labels != IGNORE_INDEX).sum()


def sequence_mixers(hf_model: nn.Module) -> list[str]:
    """The modules of `hf_model` that mix tokens outside attention, as 'path (Class)' (or the
    config's layer types naming such layers): under sequence parallelism each would see only
    its rank's shard of the sequence, so the model would train as a different one."""
    found = [f"{name} ({type(m).__name__})" for name, m in hf_model.named_modules()
             if isinstance(m, nn.Conv1d) or _MIXER_CLASSES.search(type(m).__name__)]
    types = set(getattr(hf_model.config.get_text_config(), "layer_types", None) or ()) & _MIXER_LAYER_TYPES
    return found or ([f"config.layer_types {sorted(types)}"] if types else [])


def _refuse_sequence_mixers(hf_model: nn.Module, sp: int) -> None:
    mixers = sequence_mixers(hf_model)
    if mixers:
        more = f" and {len(mixers) - 1} more" if len(mixers) > 1 else ""
        raise ValueError(f"{hf_model.config.model_type}: {mixers[0]}{more} mixes tokens outside attention; on "
                         f"{sp} sequence-parallel ranks it would see only its rank's shard and train a different "
                         "model: train it with sp 1 (--nproc 1, or the other ranks as --dp / --tp / --pp)")


# -- model directories ---------------------------------------------------------------------------
def _config(path: str | os.PathLike):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Hugging Face model directory {str(path)!r} has no config.json")
    return AutoConfig.from_pretrained(path)


def has_weights(path: str | os.PathLike) -> bool:
    """Whether a model directory holds safetensors weights."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def hf_vocab_size(path: str | os.PathLike) -> int:
    """The vocabulary size (embedding rows) of the model in directory `path`."""
    return int(_config(path).get_text_config().vocab_size)


def hf_model_shape(path: str | os.PathLike) -> dict[str, int]:
    """The model's shape in seqpar.model.ModelConfig's terms (for FLOP counts and resume checks)."""
    c = _config(path).get_text_config()
    return {"vocab_size": int(c.vocab_size), "dim": int(c.hidden_size), "n_layers": int(c.num_hidden_layers),
            "n_heads": int(c.num_attention_heads),
            "n_kv_heads": int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
            "ffn_dim": int(c.intermediate_size)}


def load_hf_model(path: str | os.PathLike, ctx: SeqParallel | None, dtype: torch.dtype = torch.float32,
                  seed: int = 0, activation_checkpointing: bool = False) -> HFCausalLM:
    """The causal LM of local directory `path` (config.json; weights from its safetensors files,
    or a random initialisation from the config, the same on every rank for the same `seed`;
    the caller's RNG state is left as it was), on the CPU in `dtype`, wrapped in `HFCausalLM`."""
    config = _config(path)
    if has_weights(path):
        with _quiet():  # no per-rank "Loading weights" progress bars
            hf = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                      attn_implementation=IMPLEMENTATION)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=IMPLEMENTATION)
    return HFCausalLM(hf, ctx, activation_checkpointing)


@contextlib.contextmanager
def _quiet():
    """transformers' progress bars off for the block (restored after)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# -- tokenizing ----------------------------------------------------------------------------------
def has_tokenizer(model_dir: str | os.PathLike) -> bool:
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def tokenize_corpus(model_dir: str | os.PathLike, text_path: str | os.PathLike, out_path: str | os.PathLike,
                    chunk_bytes: int = 1 << 20) -> Path | None:
    """Tokenize the UTF-8 text file `text_path` with the tokenizer of `model_dir` (no special
    tokens added; read in line-aligned chunks of about `chunk_bytes`) into a seqpar token file:
    `out_path` with suffix .bin (`seqpar.data.write_token_file`) when the model's vocabulary has
    at most 65536 entries, else .npy (1-D int32). When the text has a document index
    (``<text>.docs.npy``, byte offsets) each document is tokenized on its own and the token
    offsets of the documents go to the output's index. Returns that path, or None when
    `model_dir` has no tokenizer files (the trainer then reads raw bytes)."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = hf_vocab_size(model_dir)
    blob = Path(text_path).read_bytes()
    byte_starts = find_documents(open_tokens(text_path), None).doc_starts
    bounds = [0, len(blob)] if byte_starts is None else [*byte_starts.tolist(), len(blob)]
    pieces, token_starts, total = [], [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        token_starts.append(total)
        for text in _line_chunks(blob[lo:hi].decode("utf-8", errors="replace"), chunk_bytes):
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            pieces.append(ids)
            total += len(ids)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if tokens.size and int(tokens.max()) >= vocab:
        raise ValueError(f"the tokenizer of {str(model_dir)!r} produced token id {int(tokens.max())}, outside the "
                         f"model's vocabulary of {vocab}")
    if vocab <= 65536:
        out = Path(out_path).with_suffix(".bin")
        write_token_file(out, tokens, vocab)
    else:
        out = Path(out_path).with_suffix(".npy")
        buffer = io.BytesIO()
        np.save(buffer, tokens.astype(np.int32))
        atomic_write(out, buffer.getvalue())
    if byte_starts is not None:
        starts = np.unique(np.asarray(token_starts, dtype=np.int64))  # an empty document adds no start
        write_document_index(out, starts[starts < len(tokens)])
    return out


def _line_chunks(text: str, size: int):
    """`text` in pieces of about `size` characters, each ending at a line boundary."""
    at = 0
    while at < len(text):
        end = text.find("\n", at + size)
        end = len(text) if end < 0 else end + 1
        yield text[at:end]
        at = end


# -- export --------------------------------------------------------------------------------------
def _checkpoint_tensors(path: Path) -> dict[str, Any]:
    """{HF key: tensor metadata} of the model tensors in a seqpar DCP checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    head = f"model.{PREFIX}"
    found = {k[len(head):]: m for k, m in meta.items() if k.startswith(head)}
    if not found:
        raise ValueError(f"checkpoint {str(path)!r} holds no HFCausalLM weights (no 'model.{PREFIX}*' tensors)")
    return found


def _load_dcp(path: Path, hf: nn.Module, keys: set[str]) -> None:
    """Load the model tensors of a DCP checkpoint into `hf`, in this one process (no process group)."""
    state = {PREFIX + k: t for k, t in hf.state_dict().items() if k in keys}
    read_model_state(path, state)
    _check_keys(hf, {k[len(PREFIX):] for k in state}, keys, f"checkpoint {str(path)!r}")


def _check_keys(hf: nn.Module, loaded: set[str], available: set[str], source: Any) -> None:
    """Every HF key was loaded or is tied to a loaded one; nothing in the source was left over."""
    own = hf.state_dict()
    ptrs = {own[k].data_ptr() for k in loaded}
    missing = sorted(k for k in own if k not in loaded and own[k].data_ptr() not in ptrs)
    extra = sorted(available - set(own))
    if missing or extra:
        more = lambda keys: "..." if len(keys) > 3 else ""  # noqa: E731
        raise ValueError(f"{source!s} does not match the model of this config: missing {missing[:3]}{more(missing)}, "
                         f"unexpected {extra[:3]}{more(extra)}")


def export_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Tensor], model_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the weights of a trained HFCausalLM as a Hugging Face model directory `out_dir`
    (config.json of `model_dir`, model.safetensors, and `model_dir`'s tokenizer and generation
    config files), loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`.

    checkpoint: a seqpar checkpoint directory (a ``step_*`` directory, or a checkpoint root with
    a ``latest`` pointer; verified against its checksums and read in this one process, no
    process group needed, whatever the world size and FSDP sharding it was saved with), or a
    state dict (`HFCausalLM.state_dict()`, or the HF model's own). dtype: of the saved weights
    (default: as stored). `out_dir` must not exist or be empty; it is written as a temporary
    sibling and renamed into place.
    """
    out = check_export_dir(out_dir)
    config = _config(model_dir)
    if isinstance(checkpoint, Mapping):
        state = {k.removeprefix(PREFIX): v for k, v in checkpoint.items()}
        stored = next(v.dtype for v in state.values() if v.is_floating_point())
    else:
        path = resolve_checkpoint(str(checkpoint), checkpoint, verify="full")
        tensors = _checkpoint_tensors(path)
        dtypes = [getattr(getattr(m, "properties", None), "dtype", None) for m in tensors.values()]
        stored = next(d for d in dtypes if d is not None and d.is_floating_point)
    hf = AutoModelForCausalLM.from_config(config, dtype=dtype or stored)
    try:
        if isinstance(checkpoint, Mapping):
            result = hf.load_state_dict({k: v.to(dtype or stored) for k, v in state.items()}, strict=False)
            _check_keys(hf, set(state) - set(result.unexpected_keys), set(state), "the state dict")
        else:
            _load_dcp(path, hf, set(tensors))
    except RuntimeError as e:  # shape mismatches (DCP's CheckpointException is a BaseException)
        raise ValueError(f"{checkpoint!s:.200} does not match the model of {str(model_dir)!r}: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    return save_pretrained_dir(hf, out, model_dir)


def check_export_dir(out_dir: str | os.PathLike) -> Path:
    """An export directory must not exist or be empty (checked before any work)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {str(out)!r} exists and is not empty")
    return out


def save_pretrained_dir(model: nn.Module, out_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None
                        ) -> Path:
    """`model.save_pretrained` into `out_dir` through a temporary sibling renamed into place, with
    `model_dir`'s tokenizer and generation-config files copied beside it."""
    out = check_export_dir(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet():
        model.save_pretrained(tmp)
    for name in (TOKENIZER_FILES + ("generation_config.json",)) if model_dir else ():
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, tmp / name)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out
