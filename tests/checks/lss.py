"""Per-rank LSS checks: full-model gradients on a dp x sp mesh vs 1-process training.

`TinySegmentLM` is a one-layer LM with a learned absolute position embedding split by
segment (SegmentPositionEmbedding), attention through ctx.attention, a chunked MLP and
a chunked LM loss. The same class with a 1-rank "local" context is the 1-process
reference (math kernel, full sequence, full position table).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import seqpar
from seqpar.attention.lss import SegmentPositionEmbedding, segment_local_parameters
from seqpar.chunked import chunked_lm_loss, chunked_mlp, count_tokens
from seqpar.mesh import Mesh
from seqpar.parallel import ParallelDims, average_gradients
from seqpar.testing.checks import DTYPES

__all__ = ["TinySegmentLM", "lss_model_gradients", "segment_embedding_errors"]


class TinySegmentLM(nn.Module):
    """tokens [b, s_local] -> mean token loss of this rank's segment (LSS's per-segment loss)."""

    def __init__(self, ctx, vocab: int, dim: int, heads: int, kv_heads: int, max_seq_len: int,
                 causal: bool = True, chunks: int = 2):
        super().__init__()
        self.ctx, self.heads, self.kv_heads, self.causal, self.chunks = ctx, heads, kv_heads, causal, chunks
        self.head_dim = dim // heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = SegmentPositionEmbedding(max_seq_len, dim, ctx)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor, labels: Tensor, seq_len: int) -> Tensor:
        b, s = tokens.shape
        x = self.tok(tokens) + self.pos(self.ctx.positions(seq_len))
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k, v = self.wkv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        x = x + self.wo(self.ctx.attention(q, k, v, causal=self.causal).flatten(2))
        x = x + chunked_mlp(self.mlp, self.norm(x), self.chunks)
        return chunked_lm_loss(x, self.head.weight, labels, self.chunks) / count_tokens(labels)


def _data(samples: int, seq: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (samples, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _restore(model: nn.Module, grads: dict[str, Tensor]) -> None:
    for n, p in model.named_parameters():
        p.grad.copy_(grads[n])


def lss_model_gradients(sp: int = 2, *, layout: str = "contiguous", causal: bool = True, seq: int = 32,
                        vocab: int = 24, dim: int = 32, heads: int = 4, kv_heads: int = 2, dtype: str = "float64",
                        seed: int = 0) -> dict[str, Any]:
    """On a dp x sp world (dp = world / sp, one sample per dp rank): train step of the LSS model,
    gradients averaged "double" (and "flat" for shared params, and "double" with the position
    embedding wrongly averaged over the sequence group), each compared with a 1-process
    full-sequence step on all dp samples. Returns max abs errors, reference magnitude, comm kinds."""
    mesh = ParallelDims(sp)
    alone = Mesh().partition([[r] for r in range(mesh.size)])
    ref_ctx = seqpar.init("local", group=alone, kernel="math")
    ctx = seqpar.init("lss", group=mesh.sp_group, layout=layout)
    dt = DTYPES[dtype]
    torch.manual_seed(seed)
    ref = TinySegmentLM(ref_ctx, vocab, dim, heads, kv_heads, seq, causal).to(dt)
    model = TinySegmentLM(ctx, vocab, dim, heads, kv_heads, seq, causal).to(dt)
    _copy_weights(ref, model)

    tokens, labels = _data(mesh.dp, seq, vocab, seed)
    ref(tokens, labels, seq).backward()  # mean over every token of every sample
    mine = slice(mesh.dp_rank, mesh.dp_rank + 1)
    model(ctx.shard(tokens[mine]), ctx.shard(labels[mine]), seq).backward()
    raw = _grads(model)
    local = segment_local_parameters(model)
    shared = [p for p in model.parameters() if all(p is not q for q in local)]

    mesh.stats.reset()
    average_gradients(model.parameters(), mesh, mode="double", segment_local=local)
    kinds = {k: v["sent"] for k, v in mesh.stats.snapshot().items() if k != "total"}
    double = _errors(model, ref)
    _restore(model, raw)
    average_gradients(shared, mesh, mode="flat")
    flat = {n: e for n, e in _errors(model, ref).items() if n != "pos.weight"}
    _restore(model, raw)
    average_gradients(model.parameters(), mesh, mode="double")  # position rows mixed across segments
    wrong = _errors(model, ref)["pos.weight"]
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    return {"double": double, "flat": flat, "pos_without_rule": wrong, "grad_ref": scale, "comm": kinds,
            "pos_rows": model.pos.weight.shape[0]}


@torch.no_grad()
def _copy_weights(ref: TinySegmentLM, model: TinySegmentLM) -> None:
    params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name == "pos.weight":
            model.pos.load_full_(params[name])
        else:
            p.copy_(params[name])


def _errors(model: TinySegmentLM, ref: TinySegmentLM) -> dict[str, float]:
    """Max abs gradient error per parameter (the position rows this rank owns)."""
    ref_grads = dict(ref.named_parameters())
    out = {}
    for name, p in model.named_parameters():
        want = ref_grads[name].grad
        if name == "pos.weight":
            want = want[model.pos.owned_positions]
        out[name] = (p.grad - want).abs().max().item()
    return out


def segment_embedding_errors(max_seq_len: int = 16, dim: int = 4) -> dict[str, Any]:
    """SegmentPositionEmbedding on an lss context with the paper's contiguous segments: lookup vs
    the full table, gather, and errors."""
    ctx = seqpar.init("lss", layout="contiguous")
    full = torch.arange(max_seq_len * dim, dtype=torch.float64).view(max_seq_len, dim)
    emb = SegmentPositionEmbedding(max_seq_len, dim, ctx, dtype=torch.float64).load_full_(full)
    positions = ctx.positions(max_seq_len)
    result = {"lookup_ok": bool(torch.equal(emb(positions), full[positions])),
              "gather_ok": bool(torch.equal(emb.full_weight(), full)), "rows": emb.weight.shape[0]}
    for case, pos in {"foreign": (positions + max_seq_len // ctx.size) % max_seq_len,
                      "out_of_range": positions + max_seq_len, "float": positions.float()}.items():
        try:
            emb(pos)
            result[case] = ""
        except ValueError as e:
            result[case] = str(e)
    try:
        SegmentPositionEmbedding(max_seq_len + 1, dim, ctx)
        result["bad_length"] = ""
    except ValueError as e:
        result["bad_length"] = str(e)
    return result
