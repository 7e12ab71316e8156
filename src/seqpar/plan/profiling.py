"""`seqpar plan --profile`: measure the best candidates on a real process world.

`profile` runs a few forward+backward iterations of one attention layer per candidate on
a local gloo `seqpar.world.ProcessWorld` (or the current world under torchrun) and ranks
the candidates by measured time, with predicted and measured bytes side by side.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Callable

from .inputs import Config, ModelShape, PlanInput
from .search import Candidate, attention_schedule
from .stages import max_bytes_by_kind

__all__ = ["KINDS", "attention_iteration", "profile_rank", "profile"]

KINDS = ("p2p", "all_to_all", "all_gather", "reduce_scatter", "all_reduce")

Runner = Callable[[int, list, dict], list[dict]]


def attention_iteration(ctx, shards: tuple, causal: bool) -> dict[str, int]:
    """One forward+backward of ctx.attention on this rank's q, k, v, dout shards
    ([batch, seq_local, heads, head_dim], `ctx.shard` of the full tensors); returns the bytes
    this rank sent per kind."""
    q, k, v, dout = shards
    local = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ctx.reset_comm_stats()
    out = ctx.attention(*local, causal=causal)
    out.backward(dout)
    return {kind: int(row["sent"]) for kind, row in ctx.comm_stats().items() if kind != "total" and row["sent"]}


def _full_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str, seed: int, device):
    """Full-sequence random q, k, v, dout, identical on every rank (same seed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim)
    q, dout = torch.randn(shape_q, generator=g), torch.randn(shape_q, generator=g)
    k, v = torch.randn(shape_kv, generator=g), torch.randn(shape_kv, generator=g)
    return tuple(t.to(device=device, dtype=getattr(torch, dtype)) for t in (q, k, v, dout))


def _time_config(ctx, shards: tuple, causal: bool, iters: int, warmup: int) -> tuple[list[float], dict[str, int]]:
    """Seconds of each timed iteration on this rank and the bytes the last one sent."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        attention_iteration(ctx, shards, causal)
    times, sent = [], {}
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        sent = attention_iteration(ctx, shards, causal)
        if shards[0].device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, sent


def profile_rank(configs: list[tuple[str, dict]], *, batch: int, seq: int, heads: int, kv_heads: int,
                 head_dim: int, dtype: str, causal: bool, iters: int, warmup: int, seed: int = 0) -> list[dict]:
    """Per-rank: time `iters` fwd+bwd iterations of each (strategy, init_kwargs). Returns, for
    every config, {"seconds": median over iterations of the max over ranks, "bytes": per kind,
    max over ranks} (identical on every rank) or {"error": message}."""
    import torch
    import torch.distributed as dist

    import seqpar
    from ..comm import Comm, CommStats

    control = Comm(None, CommStats())  # timing/bytes reductions, kept out of the measured stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    full = _full_inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed, device)
    results = []
    for strategy, kwargs in configs:
        try:
            ctx = seqpar.init(strategy, **kwargs)
            times, sent = _time_config(ctx, tuple(ctx.shard(t) for t in full), causal, iters, warmup)
        except (ValueError, ImportError) as e:  # same on every rank: bad config / strategy not installed
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        stats = torch.tensor([float(t) for t in times] + [float(sent.get(k, 0)) for k in KINDS],
                             dtype=torch.float64, device=device)
        control.all_reduce(stats, op=dist.ReduceOp.MAX)
        stats = stats.cpu()
        results.append({"seconds": statistics.median(stats[:iters].tolist()),
                        "bytes": {k: int(b) for k, b in zip(KINDS, stats[iters:].tolist()) if b}})
    return results


def _profile_shape(inp: PlanInput, args) -> tuple[PlanInput, dict]:
    m = inp.model
    heads = args.profile_heads or m.heads
    kv_heads = args.profile_kv_heads or (heads if args.profile_heads and m.kv_heads == m.heads else m.kv_heads)
    head_dim = args.profile_head_dim or m.head_dim
    shape = {"batch": inp.batch, "seq": args.profile_seq or inp.seq_len, "heads": heads, "kv_heads": kv_heads,
             "head_dim": head_dim, "dtype": args.profile_dtype or inp.dtype, "causal": inp.causal}
    model = ModelShape(1, heads * head_dim, heads, kv_heads, m.ffn_hidden, m.vocab)
    return replace(inp, model=model, seq_len=shape["seq"], dtype=shape["dtype"]), shape


def _max_bytes(inp: PlanInput, cfg: Config) -> dict[str, int]:
    """Per kind, the most any rank sends in one attention layer (what profile_rank reports)."""
    return max_bytes_by_kind([attention_schedule(inp, cfg, rank) for rank in range(inp.world)])


def profile(inp: PlanInput, candidates: list[Candidate], args, runner: Runner | None = None) -> list[Candidate]:
    """Measure the best `args.profile_top` valid candidates; returns them ranked by measured time
    (each with `.measured` = seconds, measured and predicted bytes, or an error).
    runner(world, configs, kwargs) runs profile_rank on a world (default: local ProcessWorld,
    or the current torch.distributed world under torchrun) and returns its result."""
    if args.profile_top < 1 or args.profile_iters < 1 or args.profile_warmup < 0:
        raise ValueError(f"--profile-top and --profile-iters must be >= 1 and --profile-warmup >= 0, got "
                         f"{args.profile_top}, {args.profile_iters}, {args.profile_warmup}")
    chosen = [c for c in candidates if c.valid][: args.profile_top]
    small, shape = _profile_shape(inp, args)
    kwargs = {"iters": args.profile_iters, "warmup": args.profile_warmup, **shape}
    configs = [(c.config.strategy, c.config.init_kwargs(inp.cluster.ranks_per_node)) for c in chosen]
    results = (runner or _run_on_world)(inp.world, configs, kwargs)
    for cand, res in zip(chosen, results):
        try:
            predicted = _max_bytes(small, cand.config)
        except ValueError as e:
            predicted = {"error": str(e)}
        cand.measured = {**res, "predicted_bytes": predicted, "shape": shape}
    return sorted(chosen, key=lambda c: c.measured.get("seconds", float("inf")))


def _run_on_world(world: int, configs, kwargs) -> list[dict]:
    """profile_rank on the current world under torchrun, else on a local gloo ProcessWorld."""
    import torch.distributed as dist

    created = "WORLD_SIZE" in os.environ and not dist.is_initialized()  # under torchrun
    if created:
        _init_torchrun_group()
    if dist.is_initialized():
        try:
            if dist.get_world_size() != world:
                raise ValueError(f"--world {world} does not match the running world of "
                                 f"{dist.get_world_size()} ranks")
            return profile_rank(configs, **kwargs)
        finally:
            if created:
                dist.destroy_process_group()
    from ..world import ProcessWorld
    with ProcessWorld(world) as pw:
        return pw.run(profile_rank, configs, **kwargs)[0]


def _init_torchrun_group() -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
