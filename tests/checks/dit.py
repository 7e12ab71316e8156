"""DiT checks: a training step (rectified-flow loss + every parameter gradient) and the sampler
on a real gloo world, and the same on one process with `FullContext`, a trivial context
whose attention is a naive softmax over the whole sequence (no seqpar kernel, layout or
communication), so the two sides share only the model code.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import seqpar
from checks.train import grad_mode
from seqpar.dit import DiT, DiTConfig, loss_terms, sample
from seqpar.parallel import ParallelDims, average_gradients
from seqpar.train import loss_and_backward

#: the tiny model of the tests: 16x16 images in 2x2 patches = 64 tokens
TEST_DIT = DiTConfig.preset("test", class_dropout=0.5)


class FullContext:
    """One process holding the whole sequence: shard/unshard are the identity, positions are
    0..N-1 and attention is a naive fp64-exact softmax(q k^T * scale) v (GQA by repetition)."""

    size, rank = 1, 0

    def shard(self, x: Tensor, dim: int = 1, cu_seqlens=None) -> Tensor:
        return x

    def unshard(self, x: Tensor, dim: int = 1, cu_seqlens=None) -> Tensor:
        return x.detach()

    def positions(self, seq_len: int, device=None, cu_seqlens=None) -> Tensor:
        return torch.arange(seq_len, device=device)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                  cu_seqlens=None) -> Tensor:
        assert not causal and cu_seqlens is None
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or q.shape[-1] ** -0.5)
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


def build_model(ctx, cfg: DiTConfig = TEST_DIT, seed: int = 0, std: float = 0.1) -> DiT:
    """The fp64 test DiT with every parameter perturbed by N(0, std) noise, so the zero-initialised
    adaLN modulations and output layer do not hide any path (identical on every rank)."""
    torch.manual_seed(seed)
    model = DiT(cfg, ctx).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference_step(images: Tensor, labels: Tensor, generator_seed=(0, 0), cfg: DiTConfig = TEST_DIT,
                   seed: int = 0) -> dict[str, Any]:
    """One process, whole global batch, whole images: the mean loss and every gradient of it."""
    model = build_model(FullContext(), cfg, seed)
    loss_sum, count = loss_terms(model, FullContext(), images, labels, generator_seed)
    (loss_sum / count).backward()
    return {"loss": (loss_sum / count).item(), "count": int(count), "grads": _grads(model)}


def dit_step(strategy: str, init_kwargs: dict[str, Any], images: Tensor, labels: Tensor, *, dp: int = 1,
             generator_seed=(0, 0), cfg: DiTConfig = TEST_DIT, seed: int = 0) -> dict[str, Any]:
    """One training step on a dp x sp world as the trainer does it: dp rank r takes rows
    [r*b, (r+1)*b) of the global batch, `loss_terms` on its token shard, `loss_and_backward`
    (global-mean normalisation), then gradient averaging over the world."""
    mesh = ParallelDims(dist.get_world_size() // dp)
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **init_kwargs)
    model = build_model(ctx, cfg, seed)
    b = len(images) // dp
    rows = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b)
    local = {}

    def forward(*_):
        local["sum"], local["count"] = loss_terms(model, ctx, images[rows], labels[rows], generator_seed,
                                                  row_offset=mesh.dp_rank * b)
        return local["sum"], local["count"]

    loss = loss_and_backward(forward, None, None, None, mesh.batch_comm)
    average_gradients(model.parameters(), mesh, mode=grad_mode(strategy))
    grads = _grads(model)
    digest = hashlib.sha256(b"".join(g.numpy().tobytes() for g in grads.values())).hexdigest()
    return {"loss": loss, "grads": grads if dist.get_rank() == 0 else None, "grad_digest": digest,
            "local_sum": float(local["sum"]), "local_count": int(local["count"]),
            "positions": ctx.positions(cfg.num_tokens).tolist()}


def reference_sample(class_ids: list[int], steps: int, seed: int, guidance: float = 1.0,
                     cfg: DiTConfig = TEST_DIT) -> Tensor:
    return sample(build_model(FullContext(), cfg), FullContext(), class_ids, steps, seed, guidance=guidance)


def dit_sample(strategy: str, init_kwargs: dict[str, Any], class_ids: list[int], steps: int, seed: int,
               guidance: float = 1.0, cfg: DiTConfig = TEST_DIT) -> dict[str, Any]:
    """This rank's `sample` (twice, to check it is deterministic), a second seed's, and the same
    images one at a time (with the progress events) and two at a time."""
    ctx = seqpar.init(strategy, **init_kwargs)
    model = build_model(ctx, cfg)
    first = sample(model, ctx, class_ids, steps, seed, guidance=guidance)
    again = sample(model, ctx, class_ids, steps, seed, guidance=guidance)
    other = sample(model, ctx, class_ids, steps, seed + 1, guidance=guidance)
    events: list[tuple[int, int]] = []
    one_by_one = sample(model, ctx, class_ids, steps, seed, guidance=guidance, batch_size=1,
                        progress=lambda done, total: events.append((done, total)))
    pairs = sample(model, ctx, class_ids, steps, seed, guidance=guidance, batch_size=2)
    return {"images": first, "repeat_equal": bool(torch.equal(first, again)),
            "other_seed_differs": not torch.equal(first, other), "one_by_one": one_by_one, "pairs": pairs,
            "events": events}
