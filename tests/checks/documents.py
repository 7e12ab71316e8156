"""Packed-document checks run inside a ProcessWorld: exactness of every strategy under the
document mask, FLOP fractions, cu_seqlens errors and document positions."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import seqpar
from seqpar.documents import visible_pairs
from seqpar.testing.checks import make_inputs


def doc_patterns(seq: int) -> dict[str, list[int] | list[list[int]]]:
    """Document boundaries for a sequence of `seq` tokens (a multiple of 32 works for every layout)."""
    u = seq // 32
    straddle = [0, 5 * u, 18 * u, 25 * u, seq]                        # across rank and chunk boundaries
    short = [0] + [min(seq, x * u) for x in (3, 5, 8, 9, 12, 14, 17, 19, 22, 23, 26, 28, 31)] + [seq]
    ones = list(range(0, 20 * u)) + [27 * u, seq]                      # many 1-token documents
    return {"straddle": straddle, "short": short, "whole": [0, seq], "ones": ones, "rows": [straddle, short]}


def reference_doc_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, rows: list[list[int]]):
    """Naive fp64 attention with the block-diagonal document mask of each batch row ->
    (out [b, n, h, d], lse [b, h, n])."""
    b, n, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    pos = torch.arange(n)
    masks = []
    for cu in rows:
        doc = torch.searchsorted(torch.tensor(cu), pos, right=True)
        m = doc[:, None] == doc[None, :]
        masks.append(m & (pos[None, :] <= pos[:, None]) if causal else m)
    s = s.masked_fill(~torch.stack(masks)[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)


def _cu_arg(cu: list[int] | list[list[int]], batch: int):
    """Pattern -> (cu_seqlens argument, boundaries per batch row)."""
    if isinstance(cu[0], list):
        return [torch.tensor(c, dtype=torch.int32) for c in cu], cu
    return torch.tensor(cu), [cu] * batch


def doc_exactness(ctx: seqpar.SeqParallel, cu, causal: bool, *, seq: int, heads: int = 4, kv_heads: int = 2,
                  head_dim: int = 4, seed: int = 0) -> dict[str, float]:
    """Max abs error of out, lse, dq, dk, dv vs the fp64 reference under the document mask, and
    this rank's computed (query, key) pairs forward."""
    batch = 2
    cu_arg, rows = _cu_arg(cu, batch)
    q, k, v, dout = make_inputs(batch, seq, heads, kv_heads, head_dim, torch.float64, seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_doc_attention(*full, causal, rows)
    ref_out.backward(dout)
    local = [ctx.shard(t, cu_seqlens=cu_arg).clone().requires_grad_() for t in (q, k, v)]
    ctx.reset_flop_stats()
    out, lse = ctx.attention(*local, causal=causal, return_lse=True, cu_seqlens=cu_arg)
    out.backward(ctx.shard(dout, cu_seqlens=cu_arg))
    unshard = lambda t, dim=1: ctx.unshard(t, dim, cu_seqlens=cu_arg)  # noqa: E731
    got = [unshard(out), unshard(lse, 2)] + [unshard(t.grad) for t in local]
    ref = [ref_out, ref_lse] + [t.grad for t in full]
    res = {name: (g - r).abs().max().item() for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
    res["pairs"] = ctx.flop_stats()["forward_pairs"]
    return res


def doc_exactness_all(strategy: str, init_kwargs: dict[str, Any], seq: int = 32) -> dict[str, dict[str, float]]:
    """doc_exactness for every pattern of `doc_patterns(seq)`, causal and not (one context)."""
    ctx = seqpar.init(strategy, **init_kwargs)
    out = {}
    for name, cu in doc_patterns(seq).items():
        if name == "rows" and ctx.layout.kind == "documents":
            continue  # the documents layout follows one cu_seqlens for the whole batch
        for causal in (True, False):
            out[f"{name}/{'causal' if causal else 'full'}"] = doc_exactness(ctx, cu, causal, seq=seq,
                                                                            seed=len(out))
    return out


def expected_pairs(cu: list[int], causal: bool, batch: int = 2, heads: int = 4) -> int:
    """(query, key) pairs the document mask keeps, over batch and heads."""
    return batch * heads * visible_pairs(cu, causal)


def doc_flops(strategy: str, init_kwargs: dict[str, Any], cu: list[int], seq: int, causal: bool = True,
              heads: int = 4, kv_heads: int = 2, head_dim: int = 4) -> dict[str, int]:
    """This rank's computed pairs / flops forward and backward for one packed batch (batch 2)."""
    ctx = seqpar.init(strategy, **init_kwargs)
    q, k, v, dout = make_inputs(2, seq, heads, kv_heads, head_dim, torch.float64, 1)
    cu_t = torch.tensor(cu)
    local = [ctx.shard(t, cu_seqlens=cu_t).requires_grad_() for t in (q, k, v)]
    ctx.reset_flop_stats()
    ctx.attention(*local, causal=causal, cu_seqlens=cu_t).backward(ctx.shard(dout, cu_seqlens=cu_t))
    return ctx.flop_stats()


def doc_error(strategy: str, init_kwargs: dict[str, Any], cu_by_rank: dict[int, Any], default: Any,
              seq: int = 32, batch: int = 2) -> str:
    """Call attention with this rank's cu_seqlens (cu_by_rank.get(rank, default)); the error text or ''."""
    ctx = seqpar.init(strategy, **init_kwargs)
    cu = cu_by_rank.get(ctx.rank, default)
    cu = [torch.tensor(c) for c in cu] if isinstance(cu, list) and cu and isinstance(cu[0], list) else \
        (torch.tensor(cu) if isinstance(cu, list) else cu)
    x = torch.randn(batch, seq // ctx.size, 4, 4, dtype=torch.float64)
    try:
        ctx.attention(x, x, x, causal=True, cu_seqlens=cu)
    except ValueError as e:
        return f"ValueError: {e}"
    return ""


def doc_positions(strategy: str, init_kwargs: dict[str, Any], cu: list[int], seq: int) -> dict[str, list]:
    """This rank's global positions and positions inside documents (single and per-row cu_seqlens)."""
    ctx = seqpar.init(strategy, **init_kwargs)
    return {"global": ctx.positions(seq).tolist(), "doc": ctx.positions(seq, cu_seqlens=torch.tensor(cu)).tolist(),
            "rows": ctx.positions(seq, cu_seqlens=[torch.tensor(cu), torch.tensor([0, seq])]).tolist()}


def packed_training(strategy: str, init_kwargs: dict[str, Any] | None = None, *, steps: int = 3,
                    seq_len: int = 64, batch: int = 2, model: dict[str, Any] | None = None) -> list[float]:
    """Losses of `steps` AdamW steps (fp32) of the tiny Transformer (TINY_MODEL updated by `model`)
    on packed documents: positions restart per document, no label crosses a boundary, cu_seqlens
    reach every layer."""
    from checks.train import TINY_MODEL, grad_mode
    from seqpar.data import shard_batch
    from seqpar.model import ModelConfig, Transformer
    from seqpar.parallel import ParallelDims, average_gradients
    from seqpar.train import loss_and_backward

    mesh = ParallelDims(torch.distributed.get_world_size())
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **(init_kwargs or {}))
    torch.manual_seed(0)
    net = Transformer(ModelConfig(**{**TINY_MODEL, **(model or {})}), ctx)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        window = torch.randint(0, TINY_MODEL["vocab_size"], (batch, seq_len + 1), generator=gen)
        cuts = sorted(torch.randperm(seq_len - 1, generator=gen)[:5 + step].add(1).tolist())
        cu = torch.tensor([0] + cuts + [seq_len])
        tokens, labels, positions = shard_batch(ctx, window, cu_seqlens=cu)
        opt.zero_grad()
        losses.append(loss_and_backward(lambda *a, cu=cu: net(*a, cu_seqlens=cu), tokens, labels, positions,
                                        mesh.batch_comm))
        average_gradients(net.parameters(), mesh, mode=grad_mode(strategy))
        opt.step()
    return losses


def packed_loader_batch(strategy: str, init_kwargs: dict[str, Any], tokens: list[int], doc_starts: list[int],
                        seq_len: int, batch: int = 2) -> dict[str, Any]:
    """Step 0 of a packed SequenceLoader, sharded by `shard_batch` and gathered back: the window
    offsets, full labels and full per-document positions of every row."""
    import numpy as np

    from seqpar.data import SequenceLoader, shard_batch

    ctx = seqpar.init(strategy, **init_kwargs)
    loader = SequenceLoader(np.asarray(tokens), seq_len, batch, vocab_size=1000, doc_starts=np.asarray(doc_starts))
    packed = loader.documents_at(0)
    cu = packed.cu_seqlens()
    _, labels, positions = shard_batch(ctx, loader.batch_at(0), cu_seqlens=cu, ignore=packed.ignored_labels())
    return {"offsets": loader.global_offsets(0).tolist(), "labels": ctx.unshard(labels, cu_seqlens=cu).tolist(),
            "positions": ctx.unshard(positions, cu_seqlens=cu).tolist(), "cu": [c.tolist() for c in cu]}
