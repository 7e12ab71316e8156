"""FPDT's per-chunk block pipeline (arXiv 2408.16978, section 4): a whole transformer block,
one sequence chunk at a time, forward and backward.

`FpdtAttention` chunks the attention only: the projections around it still see all of a
rank's tokens at once, so q, k, v, the attention output and their gradients exist for the
whole local sequence. Here the block is split at the attention into two position-wise parts
given by the model,

    project(x_piece, rows) -> q [b, c, h, d], k, v [b, c, hkv, d]     (norm, Q/K/V, RoPE)
    finish(x_piece, a_piece, rows) -> y_piece [b, c, H]             (O projection, residual, MLP)

(x_piece [b, c, H] = this rank's c = N / (P u) tokens of chunk j; rows = their slice of the
local sequence), and FPDT's chunk loop runs between them:

* forward, for chunk i: project the pieces of the K/V chunks i needs (causal: chunk i itself,
  just in time), all-to-all them into global chunks, attend chunk i (online softmax over the
  stored K/V chunks), all-to-all back and finish -> y_i. Under autograd it stores, per chunk,
  x_i and the local attention output a_i besides FPDT's q/kv/o/lse (host memory with offload).
* backward: finish is recomputed per chunk to get dx_i (residual and MLP paths) and da_i, which
  goes to the heads layout as dO_i; FPDT's K/V-outer loop then hands back (dq_i, dk_i, dv_i)
  as soon as chunk i is final, and project is recomputed for chunk i to add its dx_i and the
  parameter gradients.

So besides the block's input and output (and their gradients) only one chunk's projections,
MLP hidden layer and attention partials exist on the device at a time. Parameter gradients
go through autograd (the parameters are inputs of the Function). Exact: every token goes
through the same operations as the unfused block; only summation orders change.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .fpdt_chunks import ChunkCall, backward_chunks, forward_chunks, heads_to_seq, seq_to_heads

__all__ = ["BlockFunctions", "FpdtBlock"]

Project = Callable[[Tensor, slice], tuple[Tensor, Tensor, Tensor]]
Finish = Callable[[Tensor, Tensor, slice], Tensor]


@dataclass(frozen=True)
class BlockFunctions:
    """The model's two position-wise halves of a block and the parameters they use.

    project(x_piece [b, c, H], rows) -> q [b, c, heads, head_dim], k, v [b, c, kv_heads, head_dim];
    finish(x_piece, a_piece [b, c, heads, head_dim], rows) -> [b, c, H] (the block's output);
    rows: the piece's slice of the local sequence (for RoPE tables and the like)."""

    project: Project
    finish: Finish
    params: tuple[Tensor, ...]
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class _Autocast:
    """The autocast state of the forward, re-entered for the backward's recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> "_Autocast":
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def forward(self):
        """The forward's autocast state (grad mode unchanged)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    @contextmanager
    def recompute(self):
        """The forward's autocast state, with autograd on."""
        with torch.enable_grad(), self.forward():
            yield


def _project(xj: Tensor, j: int, call: ChunkCall, fns: BlockFunctions) -> tuple[Tensor, Tensor, Tensor]:
    """project() of chunk j's piece xj [b, c, H], its shapes checked against the declared heads."""
    rows = call.plan.rows(j)
    q, k, v = fns.project(xj, rows)
    b, c = xj.shape[0], call.plan.piece
    want = {"q": (b, c, fns.heads, fns.head_dim), "k": (b, c, fns.kv_heads, fns.head_dim)}
    for name, t, shape in (("q", q, want["q"]), ("k", k, want["k"]), ("v", v, want["k"])):
        if tuple(t.shape) != shape:
            raise ValueError(f"chunked block: project returned {name}{tuple(t.shape)}, expected {shape}")
    return q, k, v


def _chunk_loop(piece: Callable[[int], Tensor], call: ChunkCall, fns: BlockFunctions, y: Tensor | None,
                keep: bool) -> None:
    """FPDT's chunk loop (`forward_chunks`) between project and finish. piece(j): chunk j's x piece
    [b, c, H]; y: the block output to fill (None: attention only, the backward's re-forward);
    keep: leave o, lse and the attention output of every chunk (and the q, kv chunks) in the store."""
    plan, store = call.plan, call.store

    def emit(i: int, oi: Tensor, lse_i: Tensor) -> None:
        ai = heads_to_seq(oi, call.comm)
        if y is not None:
            rows = plan.rows(i)
            y[:, rows] = fns.finish(piece(i), ai, rows)
        if keep:
            store.put(("a", i), ai)

    forward_chunks(call, lambda j: _project(piece(j), j, call, fns), emit, keep)


def _forward(x: Tensor, call: ChunkCall, fns: BlockFunctions, recompute: bool) -> Tensor:
    """The block's output; for backward (call.keep) the store keeps every chunk's x piece, and
    unless `recompute` also FPDT's q/kv/o/lse and the attention output (else the backward
    runs the chunk loop again from the x pieces)."""
    y = torch.empty_like(x)
    _chunk_loop(lambda j: x[:, call.plan.rows(j)], call, fns, y, keep=call.keep and not recompute)
    if call.keep and recompute:
        call.store.clear()
    if call.keep:
        for j in range(call.plan.chunks):
            call.store.put(("x", j), x[:, call.plan.rows(j)])
    return y


class _Grads:
    """dx [b, s, H] and the parameter gradients, accumulated chunk by chunk."""

    def __init__(self, x_meta: Tensor, device: torch.device, params: tuple[Tensor, ...]):
        self.dx = torch.empty_like(x_meta, device=device)
        self.params = [p for p in params if p.requires_grad]
        self.param_grads: dict[int, Tensor] = {}

    def add(self, outputs, inputs_x: Tensor, extra: tuple[Tensor, ...], grads_out, rows: slice, first: bool):
        """Backprop `outputs` with `grads_out` into x (written or added at rows), `extra` (returned)
        and the parameters (accumulated)."""
        got = torch.autograd.grad(outputs, (inputs_x, *extra, *self.params), grads_out, allow_unused=True)
        dx = got[0] if got[0] is not None else torch.zeros_like(inputs_x)
        if first:
            self.dx[:, rows] = dx
        else:
            self.dx[:, rows] += dx
        for n, g in enumerate(got[1 + len(extra):]):
            if g is not None:
                key = id(self.params[n])
                self.param_grads[key] = g if key not in self.param_grads else self.param_grads[key] + g
        return got[1:1 + len(extra)]

    def for_params(self, params: tuple[Tensor, ...]) -> list[Tensor | None]:
        return [self.param_grads.get(id(p)) for p in params]


def _backward(dy: Tensor, x_meta: Tensor, call: ChunkCall, fns: BlockFunctions, amp: _Autocast, recompute: bool):
    plan, store, comm = call.plan, call.store, call.comm
    if recompute:  # the forward kept only the x pieces: its chunk loop again, attention only
        with torch.no_grad(), amp.forward():
            _chunk_loop(lambda j: store.get(("x", j)), call, fns, None, keep=True)
    grads = _Grads(x_meta, dy.device, fns.params)
    dtype = None
    for i in range(plan.chunks):  # finish: dx_i (residual + MLP) and dO_i
        rows = call.plan.rows(i)
        with amp.recompute():
            xi = store.get(("x", i)).detach().requires_grad_()
            ai = store.get(("a", i)).detach().requires_grad_()
            (dai,) = grads.add(fns.finish(xi, ai, rows), xi, (ai,), dy[:, rows], rows, first=True)
        dtype = ai.dtype
        store.discard(("a", i))
        store.put(("do", i), seq_to_heads(dai.to(dtype), comm))
        del xi, ai, dai
    for j, dq, dk, dv in backward_chunks(call, dtype):  # project: dx_j += ..., parameter grads
        rows = call.plan.rows(j)
        with amp.recompute():
            xj = store.get(("x", j)).detach().requires_grad_()
            q, k, v = fns.project(xj, rows)
            grads.add((q, k, v), xj, (), (dq, dk, dv), rows, first=False)
        store.discard(("x", j))
    return grads


class FpdtBlock(torch.autograd.Function):
    """y = block(x) by FPDT's per-chunk pipeline; x [b, N/P, H] in the FPDT layout -> y like x.
    The parameters are inputs so that their gradients flow through autograd. recompute: keep
    only x (its chunk pieces) for backward, which runs the attention loop again (activation
    checkpointing inside the pipeline: host memory of one block's chunks, not every block's)."""

    @staticmethod
    def forward(ctx, x, call: ChunkCall, fns: BlockFunctions, recompute: bool, *params):
        amp = _Autocast.current(x.device)
        y = _forward(x, call, fns, recompute)
        if call.keep:
            ctx.call, ctx.fns, ctx.amp, ctx.x_meta, ctx.recompute = call, fns, amp, x.to("meta"), recompute
        else:
            call.store.clear()
        return y

    @staticmethod
    def backward(ctx, dy):
        call, fns = ctx.call, ctx.fns
        try:
            grads = _backward(dy, ctx.x_meta, call, fns, ctx.amp, ctx.recompute)
        finally:
            call.store.clear()
        return (grads.dx, None, None, None, *grads.for_params(fns.params))
