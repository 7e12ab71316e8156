"""Memory per rank: model states, saved activations, logits and the attention working set.

`*_memory(inp, cfg)` give a strategy's attention memory beyond the layer's own q/k/v/out
as (saved per layer for backward, peak working set), in bytes, from the buffers its source
allocates; `memory_estimate` adds the rest of the model (docs/planner.md).
"""
from __future__ import annotations

from ..attention.ulysses import kv_replication
from . import hybrid
from .candidate import Config
from .inputs import PlanInput
from .schedules import fpdt_chunk_sizes

__all__ = ["local_memory", "ring_memory", "ulysses_memory", "usp_memory", "allgather_memory", "wallfacer_memory",
           "fpdt_memory", "model_state_bytes", "memory_estimate"]


def _lse_bytes(inp: PlanInput, heads: int, seq: int) -> float:
    return inp.batch * heads * seq * inp.acc_itemsize


def _ring_buffers(inp: PlanInput, seq_local: int, heads: int, kv_heads: int) -> float:
    """Backward peak of ring_backward: two K/V blocks (current + incoming), three dK/dV
    accumulators (own, in flight, incoming) and the dq accumulator."""
    d, b = inp.model.head_dim, inp.batch
    kv = 2 * b * seq_local * kv_heads * d
    return 2 * kv * inp.itemsize + 3 * kv * inp.acc_itemsize + b * seq_local * heads * d * inp.acc_itemsize


def _ulysses_parts(inp: PlanInput, ud: int) -> tuple[float, float]:
    """Head-scattered q,k,v and output saved for backward (Ulysses degree ud); peak of the
    fused all-to-all: send + receive copies of packed q,k,v."""
    m = inp.model
    rep = kv_replication(m.heads, m.kv_heads, ud)
    tokens = inp.batch * inp.tokens_per_rank
    packed = tokens * (m.heads + 2 * m.kv_heads * rep) * m.head_dim * inp.itemsize
    saved = packed + tokens * m.heads * m.head_dim * inp.itemsize
    return saved, 2 * packed


def local_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    """sp = 1: the LSE of the whole sequence saved; no buffers beyond q/k/v/out."""
    return _lse_bytes(inp, inp.model.heads, inp.seq_len), 0.0


def ring_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    m, n = inp.model, inp.tokens_per_rank
    return _lse_bytes(inp, m.heads, n), _ring_buffers(inp, n, m.heads, m.kv_heads)


def ulysses_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    saved, peak = _ulysses_parts(inp, inp.world)
    return saved + _lse_bytes(inp, inp.model.heads // inp.world, inp.seq_len), peak


def usp_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    m, ud, rd = inp.model, cfg.ulysses, cfg.ring
    saved, peak = _ulysses_parts(inp, ud) if ud > 1 else (0.0, 0.0)
    kv_heads = m.kv_heads * kv_replication(m.heads, m.kv_heads, ud) // ud
    ring_peak = _ring_buffers(inp, inp.seq_len // rd, m.heads // ud, kv_heads) if rd > 1 else 0.0
    return saved + _lse_bytes(inp, m.heads // ud, inp.seq_len // rd), max(peak, ring_peak)


def allgather_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    """kv_all (the whole sequence's K,V) is saved for backward; backward holds dK/dV of all blocks."""
    m, b = inp.model, inp.batch
    kv_all = 2 * b * inp.seq_len * m.kv_dim
    dq = b * inp.tokens_per_rank * m.hidden * inp.acc_itemsize
    return kv_all * inp.itemsize + _lse_bytes(inp, m.heads, inp.tokens_per_rank), kv_all * inp.acc_itemsize + dq


def wallfacer_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    """Saved: the team's q (C*n rows), the placed team K/V and the team LSE; backward peak:
    gathered dO and O of the team plus ring_backward's buffers on C*n-token blocks."""
    m, b, e = inp.model, inp.batch, inp.itemsize
    team_tokens = cfg.team_size * inp.tokens_per_rank
    saved = b * team_tokens * (m.hidden + 2 * m.kv_dim) * e + _lse_bytes(inp, m.heads, team_tokens)
    peak = 2 * b * team_tokens * m.hidden * e + _ring_buffers(inp, team_tokens, m.heads, m.kv_heads)
    return saved, peak


def fpdt_memory(inp: PlanInput, cfg: Config) -> tuple[float, float]:
    """Without offload the ChunkStore keeps every chunk of q, k/v, o, lse on the device (saved)
    and adds dO and dQ in backward; with offload they live on the host and the device holds
    the chunks in use plus the prefetched ones (two of each) and one dK/dV accumulator."""
    u, s = cfg.chunks, fpdt_chunk_sizes(inp, cfg)
    dkv = s["kv"] * inp.acc_itemsize // inp.itemsize
    if cfg.offload:
        return 0.0, 2 * (s["q"] + s["kv"] + s["o"] + s["lse"] + s["do"] + s["dq"]) + dkv
    return u * (s["q"] + s["kv"] + s["o"] + s["lse"]), u * (s["do"] + s["dq"]) + dkv


def model_state_bytes(inp: PlanInput, cfg: Config | None = None, stage: int = 0) -> float:
    """Weights and grads in the dtype, Adam m/v (fp32 at least) and an fp32 master copy for
    16-bit dtypes, of the parameters one rank of pipeline stage `stage` holds (its share of the
    tensor-parallel shards: seqpar.plan.hybrid.stage_params); ZeRO stage s shards the first s of
    (optimizer, grads, weights) over the dp x sp ranks (the world without tp and pp); with
    `optimizer_offload` the optimizer's part lives in host memory (ZeRO-Offload)."""
    e = inp.itemsize
    p = inp.model.params() if cfg is None else hybrid.stage_params(inp, cfg, stage)
    shards = inp.world if cfg is None else cfg.dp * cfg.sp
    optimizer = 0 if inp.optimizer_offload else 2 * max(4, e) + (4 if e < 4 else 0)
    parts = [(optimizer, 1), (e, 2), (e, 3)]  # (bytes per parameter, first ZeRO stage sharding it)
    return sum(p * b / (shards if inp.zero >= stage_ else 1) for b, stage_ in parts)


def memory_estimate(inp: PlanInput, attention: tuple[float, float], cfg: Config | None = None) -> dict[str, float]:
    """Bytes per rank: model states, saved activations of all layers (with activation
    checkpointing: every block's input plus one block being recomputed), the logits, and the
    attention working set; `attention` = a strategy's (saved per layer, peak) from above, on
    what its sp group sees (seqpar.plan.hybrid.sp_input: one microbatch, heads / tp).
    With tp every activation is / tp (the norms' and the residual's sequence-sharded), with pp
    a stage holds layers / pp blocks for the microbatches in flight (hybrid.in_flight) and the
    busier of the first stage (most in flight, the embedding) and the last (the LM head and
    logits) is reported. FPDT's chunked blocks (`cfg.chunked_blocks`) are `_chunked_block_memory`.
    `host` is resident host memory (offloaded chunks and block inputs), not part of `total`."""
    if cfg is None:
        return _stage_memory(inp, attention, None, 0)
    return max((_stage_memory(inp, attention, cfg, s) for s in sorted({0, cfg.pp - 1})), key=lambda m: m["total"])


def _stage_memory(inp: PlanInput, attention: tuple[float, float], cfg: Config | None, stage: int) -> dict[str, float]:
    m, e = inp.model, inp.itemsize
    group = inp if cfg is None else hybrid.sp_input(inp, cfg)
    tp, pp = (1, 1) if cfg is None else (cfg.tp, cfg.pp)
    t, layers = group.batch * group.tokens_per_rank, m.layers // pp  # tokens of one microbatch on this sp rank
    flight = 1 if cfg is None else hybrid.in_flight(cfg, stage)
    states = model_state_bytes(inp, cfg, stage)
    saved, peak = attention
    if cfg is not None and cfg.chunked_blocks:
        activations, attention_saved, logits, host = _chunked_block_memory(group, cfg)
    else:
        per_layer = _block_activations(inp, t) / tp
        logits, host = (t * m.vocab * (e + 4) / tp if stage == pp - 1 else 0.0), 0.0
        if inp.checkpointing:  # block inputs kept; one block's activations live again while it recomputes
            activations, attention_saved = flight * layers * t * m.hidden * e / tp + per_layer, saved
        else:
            activations, attention_saved = flight * layers * per_layer, flight * layers * saved
    total = states + activations + attention_saved + logits + peak
    return {"model_states": states, "activations": activations, "attention_saved": attention_saved,
            "attention_peak": peak, "logits": logits, "total": total, "host": host}


def _block_activations(inp: PlanInput, tokens: int | None = None) -> float:
    """What one block saves for backward over `tokens` (default: the rank's): norms, q/k/v, RoPE
    copies, attention output, projections and the MLP's hidden layers."""
    m = inp.model
    t = inp.batch * inp.tokens_per_rank if tokens is None else tokens
    return t * (6 * m.hidden + 2 * m.kv_dim + 3 * m.ffn_hidden) * inp.itemsize


#: FPDT's chunked blocks pair with the LM loss in pieces of at most this many tokens (--loss-chunks)
LOSS_PIECE_TOKENS = 4096


def loss_piece_tokens(inp: PlanInput, cfg: Config) -> int:
    """Tokens per LM-loss piece with chunked blocks: a block chunk's, at most LOSS_PIECE_TOKENS."""
    return min(inp.batch * inp.tokens_per_rank // cfg.chunks, LOSS_PIECE_TOKENS)


def _chunked_block_memory(inp: PlanInput, cfg: Config) -> tuple[float, float, float, float]:
    """(activations, attention saved, logits, host) of FPDT's per-chunk block pipeline
    (attention/fpdt_block.py) with K/V offload, its LM loss in pieces of `loss_piece_tokens`.

    Device: the block's input and output (forward) or their gradients (backward), t x H each,
    plus one chunk's projections and MLP. Host: per block the chunk store (the input, q, k/v,
    the attention output in both layouts and lse), for every block; with checkpointing
    (--offload-activations: the pipeline keeps only the block input and runs its chunk loop
    again in backward) every block's input plus the store of the one in backward."""
    m, e, t, u = inp.model, inp.itemsize, inp.batch * inp.tokens_per_rank, cfg.chunks
    s = fpdt_chunk_sizes(inp, cfg)
    block_io = t * m.hidden * e
    store = u * (s["q"] + s["kv"] + 2 * s["o"] + s["lse"]) + block_io
    chunk = _block_activations(inp) / u
    logits = loss_piece_tokens(inp, cfg) * m.vocab * (e + 4)
    if inp.checkpointing:
        return 2 * block_io + chunk, 0.0, logits, m.layers * block_io + store
    return 2 * block_io + chunk, 0.0, logits, m.layers * store
