"""Per-rank checks of the public seams: strategies as modules, the Ulysses wrapper of a
user's local attention, USP placement (run inside a ProcessWorld)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import seqpar
from seqpar.modules import UlyssesAttention
from seqpar.testing.checks import make_inputs, reference_attention


def _sdpa_bshd(q, k, v, causal: bool = False):
    """A user's local attention on [b, s, h, d] tensors (torch SDPA, math backend on CPU)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def _errors(ctx_shard, unshard, out, grads, ref_out, ref_grads):
    errs = {"out": (unshard(out).double() - ref_out).abs().max().item()}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        errs[name] = (unshard(g).double() - r).abs().max().item()
    return errs


def ulysses_module_exactness(causal: bool, seq: int = 32, heads: int = 4, kv_heads: int = 4) -> dict[str, float]:
    """UlyssesAttention(user SDPA) vs fp64 reference: max abs error of out, dq, dk, dv."""
    q, k, v, dout = make_inputs(2, seq, heads, kv_heads, 8, torch.float64, seed=3)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, causal)
    ref_out.backward(dout)
    module = UlyssesAttention(_sdpa_bshd)
    ctx = seqpar.init("ulysses", layout="contiguous")  # same contiguous sharding as the module's layout
    assert module.layout == ctx.layout
    local = [ctx.shard(t).clone().requires_grad_() for t in (q, k, v)]
    if kv_heads < heads:  # SDPA needs equal heads: the user's function expands K/V itself
        fn = module.local_attention
        module.local_attention = lambda q_, k_, v_, c: fn(q_, k_.repeat_interleave(q_.shape[2] // k_.shape[2], 2),
                                                          v_.repeat_interleave(q_.shape[2] // v_.shape[2], 2), c)
    out = module(*local, causal)
    out.backward(ctx.shard(dout))
    return _errors(ctx.shard, ctx.unshard, out, [t.grad for t in local], ref_out.detach(),
                   [t.grad for t in full])


def module_exactness(strategy: str, init_kwargs: dict, causal: bool) -> dict[str, float]:
    """ctx.as_module() forward/backward vs the fp64 reference; plus the module's repr."""
    q, k, v, dout = make_inputs(1, 32, 4, 2, 8, torch.float64, seed=5)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, causal, 0.3)
    ref_out.backward(dout)
    ctx = seqpar.init(strategy, **init_kwargs)
    attn = ctx.as_module()
    local = [ctx.shard(t).clone().requires_grad_() for t in (q, k, v)]
    out = attn(*local, causal=causal, scale=0.3)
    out.backward(ctx.shard(dout))
    errs = _errors(ctx.shard, ctx.unshard, out, [t.grad for t in local], ref_out.detach(), [t.grad for t in full])
    return {**errs, "repr": repr(attn)}


def usp_placement(placement: str) -> dict:
    """Group ranks of this rank's Ulysses and ring groups and its layout rank under `placement`."""
    ctx = seqpar.init("usp", ulysses=2, placement=placement)
    s = ctx.strategy
    return {"layout_rank": ctx.layout_rank, "ulysses_group": s.ulysses_comm.global_ranks,
            "ring_group": [s.kv_ring.comm.global_ranks[r] for r in s.kv_ring.ranks],
            "describe": ctx.describe()}


def init_validity(configs: list[tuple[str, dict]], *, seq: int, heads: int, kv_heads: int,
                  head_dim: int = 8) -> list[str]:
    """For each (strategy, init kwargs): '' if seqpar.init and one attention call on a
    [1, seq/P, heads, head_dim] shard succeed, else the ValueError text."""
    import warnings

    import torch.distributed as dist

    out = []
    for strategy, kwargs in configs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx = seqpar.init(strategy, **kwargs)
            n = seq // dist.get_world_size()
            q = torch.randn(1, n, heads, head_dim)
            kv = torch.randn(1, n, kv_heads, head_dim)
            ctx.attention(q, kv, kv, causal=True)
            out.append("")
        except ValueError as e:
            out.append(str(e) or "ValueError")
    return out


def _groups_held() -> int:
    from torch.distributed import distributed_c10d
    return len(distributed_c10d._world.pg_map)


def create_subgroups(count: int) -> int:
    """Create `count` subgroups of the whole world (the way meshes do) and use each once;
    returns how many process groups this rank holds while the task runs."""
    import torch.distributed as dist
    for _ in range(count):
        group = dist.new_group(list(range(dist.get_world_size())))
        dist.barrier(group=group)
    return _groups_held()


def gloo_threads_and_groups() -> tuple[int, int]:
    """(gloo threads alive in this process, process groups held) between tasks."""
    from pathlib import Path
    names = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    return sum(name.startswith(("gloo", "pt_gloo")) for name in names), _groups_held()
