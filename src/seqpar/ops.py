"""seqpar's attention as a torch custom op (`torch.ops.seqpar.attention`), for `torch.compile`.

Dynamo cannot trace a strategy's attention (process groups, Python-side plans, autograd
Functions with non-tensor state): without an op it breaks the graph of every compiled block
in two around attention. With the op, a compiled block is one graph: the op is opaque to
dynamo / AOTAutograd / inductor, which see only its fake implementation (output shapes) and
its registered backward (a second op).

How the op reaches a context and its backward without non-tensor arguments:

* the context (its process groups) is looked up in a registry by an int `handle`
  (`register_context`), the one argument of the op that names it;
* the forward runs the strategy's own autograd graph (its autograd Functions, exactly as in
  eager) on detached leaves and keeps that graph, the *tape*, under a fresh int id; the op
  returns the id as a third output, the `ticket` (an int64 scalar tensor that AOTAutograd
  saves for backward like any activation);
* the backward op finds the tape by its ticket and runs `torch.autograd.grad` through it:
  the strategy's own backward, the same communication and the same arithmetic as eager.

A tape lives as long as its ticket tensor (a finalizer on the ticket drops it): a forward
without backward (validation, or activation checkpointing's first forward, whose saved
tensors are discarded) leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["register_context", "attention_op", "live_tapes"]

_CONTEXTS: dict[int, Any] = {}  # handle -> weakref to the context (its `attention_impl`)
_HANDLES = itertools.count(1)
_TAPES: dict[int, tuple[tuple[Tensor, ...], Tensor]] = {}  # ticket -> ((q, k, v) leaves, out)
_TICKETS = itertools.count(1)


def register_context(ctx: Any) -> int:
    """A new int handle naming `ctx` (kept weakly) in the op's arguments."""
    handle = next(_HANDLES)
    _CONTEXTS[handle] = weakref.ref(ctx)
    weakref.finalize(ctx, _CONTEXTS.pop, handle, None)
    return handle


def _context(handle: int) -> Any:
    ref = _CONTEXTS.get(handle)
    ctx = ref() if ref is not None else None
    if ctx is None:
        raise ValueError(f"seqpar attention op: no live SeqParallel context with handle {handle} (the context "
                         "was garbage-collected; keep the seqpar.init result alive while the model runs)")
    return ctx


def live_tapes() -> int:
    """Forward graphs kept for a backward that has not run yet (0 after every backward)."""
    return len(_TAPES)


def _cu_arg(cu_seqlens: list[Tensor], cu_list: bool):
    """The op's cu_seqlens (a tensor list) back in SeqParallel.attention's form."""
    if not cu_seqlens:
        return None
    return list(cu_seqlens) if cu_list else cu_seqlens[0]


def _lse_shape(q: Tensor) -> tuple[int, int, int]:
    return (q.shape[0], q.shape[2], q.shape[1])  # [batch, heads, seq_local]


def _autograd_on():
    """Grad mode on and the autograd dispatch keys back in (a custom op's implementation runs
    below autograd): the strategy records its graph as in eager. Autocast stays off, as around
    the built-in models' attention."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    stack = contextlib.ExitStack()
    stack.enter_context(torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude))
    stack.enter_context(torch.enable_grad())
    return stack


_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@torch.library.custom_op("seqpar::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, handle: int, causal: bool, scale: float, need_lse: bool,
               cu_seqlens: list[Tensor], cu_list: bool) -> tuple[Tensor, Tensor, Tensor]:
    ctx = _context(handle)
    with _autograd_on():
        leaves = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in (q, k, v))
        out, lse = ctx.attention_impl(*leaves, causal, scale, need_lse, _cu_arg(cu_seqlens, cu_list))
    ticket = next(_TICKETS)
    _TAPES[ticket] = (leaves, out)
    ticket_t = torch.tensor(ticket, dtype=torch.int64)
    weakref.finalize(ticket_t, _TAPES.pop, ticket, None)
    lse = lse.detach().contiguous() if need_lse else q.new_empty((0,), dtype=torch.float32)
    out, lse = _unaliased([_strided_like(out.detach(), q), lse], (q, k, v))
    return out, lse, ticket_t


@_attention.register_fake
def _attention_fake(q, k, v, handle, causal, scale, need_lse, cu_seqlens, cu_list):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_empty(_lse_shape(q) if need_lse else (0,), dtype=lse_dtype if need_lse else torch.float32)
    return torch.empty_like(q), lse, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("seqpar::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, ticket: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    tape = _TAPES.pop(int(ticket), None)
    if tape is None:
        raise ValueError("seqpar attention op: backward without its forward graph (backward run twice? use "
                         "retain_graph=False, or activation checkpointing around the whole block)")
    leaves, out = tape
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else _strided_like(g.to(t.dtype), t) for g, t in zip(grads, leaves)]
    return _unaliased(grads, (dout, q, k, v))


def _strided_like(value: Tensor, like: Tensor) -> Tensor:
    """value [shape of like] in the strides `torch.empty_like(like)` has (what the fake
    implementation promises the compiled graph, which may view the result accordingly)."""
    want = torch.empty_like(like, device="meta").stride()  # no memory
    if value.stride() == want:
        return value
    out = torch.empty_strided(like.shape, want, dtype=value.dtype, device=value.device)
    return out.copy_(value)


def _unaliased(outputs: list[Tensor], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The outputs, each cloned if it shares memory with an input or an earlier output (a custom
    op's outputs may not alias: e.g. a strategy's dk and dv are views of one k/v buffer)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    result = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(t)
    return tuple(result)


@_attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, ticket):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, output[2])
    ctx.cu_count = len(inputs[7])


def _backward(ctx, dout, _dlse, _dticket):
    q, k, v, ticket = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(q)
    dq, dk, dv = _attention_backward(dout, q, k, v, ticket)
    return dq, dk, dv, None, None, None, None, [None] * ctx.cu_count, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def attention_op(q: Tensor, k: Tensor, v: Tensor, handle: int, causal: bool, scale: float, need_lse: bool,
                 cu_seqlens=None) -> tuple[Tensor, Tensor | None]:
    """`torch.ops.seqpar.attention`: q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> out
    [b, s_local, h, d], lse [b, h, s_local] (None unless need_lse); cu_seqlens: None, a tensor
    or a list of tensors (one per batch row), as `SeqParallel.attention` takes them."""
    cu_list = isinstance(cu_seqlens, (list, tuple))
    rows = [] if cu_seqlens is None else (list(cu_seqlens) if cu_list else [cu_seqlens])
    out, lse, _ = _attention(q, k, v, handle, causal, scale, need_lse, rows, cu_list)
    return out, (lse if need_lse else None)

