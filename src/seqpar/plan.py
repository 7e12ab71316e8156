"""`seqpar plan`: rank strategies and degrees by predicted step time and memory.

Predictions come from `seqpar.costmodel` (docs/planner.md); `--profile` also runs a few
forward+backward iterations of one attention layer for the best candidates on a real
process world (a local gloo `ProcessWorld`, or the current world under torchrun) and
ranks them by measured time, with predicted vs measured bytes side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from typing import Callable

from .costmodel import (DTYPE_BYTES, MODEL_PRESETS, STRATEGY_MODELS, Candidate, Cluster, Config, GiB, ModelShape,
                        PlanInput, attention_schedule, max_bytes_by_kind, plan)

__all__ = ["add_arguments", "main", "plan_input_from_args", "profile", "profile_rank", "attention_iteration",
           "KINDS"]

KINDS = ("p2p", "all_to_all", "all_gather", "reduce_scatter", "all_reduce")


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    topo = p.add_argument_group("cluster")
    topo.add_argument("--world", type=int, required=True, help="sequence-parallel ranks P")
    topo.add_argument("--ranks-per-node", type=int, default=8, help="consecutive ranks sharing a node")
    topo.add_argument("--intra-bw", type=float, default=150.0, help="intra-node GB/s per rank")
    topo.add_argument("--inter-bw", type=float, default=25.0, help="inter-node GB/s per rank")
    topo.add_argument("--intra-lat", type=float, default=5.0, help="intra-node latency, us")
    topo.add_argument("--inter-lat", type=float, default=20.0, help="inter-node latency, us")
    topo.add_argument("--tflops", type=float, default=312.0, help="device peak TFLOP/s in the dtype")
    topo.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak the kernels reach")
    topo.add_argument("--memory-gib", type=float, default=80.0, help="device memory, GiB")
    topo.add_argument("--host-bw", type=float, default=25.0, help="host<->device GB/s (offloading)")

    model = p.add_argument_group("model and batch")
    model.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama-7b", help="shape preset")
    for name in ("layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab"):
        model.add_argument(f"--{name}", type=int, help=f"override the preset's {name.replace('-', ' ')}")
    model.add_argument("--seq-len", type=int, required=True, help="tokens per sequence N")
    model.add_argument("--batch", type=int, default=1, help="micro-batch B")
    model.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    model.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (memory only)")

    out = p.add_argument_group("output")
    out.add_argument("--strategies", help=f"comma-separated subset of {sorted(STRATEGY_MODELS)}")
    out.add_argument("--top", type=int, default=0, help="print only the best N rows (0: all)")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")

    prof = p.add_argument_group("profiling (--profile)")
    prof.add_argument("--profile", action="store_true", help="measure the best candidates on a real world")
    prof.add_argument("--profile-top", type=int, default=3, help="how many valid candidates to measure")
    prof.add_argument("--profile-seq", type=int, help="sequence length to run (default: --seq-len)")
    prof.add_argument("--profile-heads", type=int, help="heads to run (default: the model's)")
    prof.add_argument("--profile-kv-heads", type=int, help="kv heads to run (default: the model's)")
    prof.add_argument("--profile-head-dim", type=int, help="head dim to run (default: the model's)")
    prof.add_argument("--profile-dtype", choices=sorted(DTYPE_BYTES), help="dtype to run (default: --dtype)")
    prof.add_argument("--profile-iters", type=int, default=3)
    prof.add_argument("--profile-warmup", type=int, default=1)


def plan_input_from_args(args: argparse.Namespace) -> PlanInput:
    preset = MODEL_PRESETS[args.model]
    overrides = {f: getattr(args, f) for f in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")
                 if getattr(args, f) is not None}
    if "heads" in overrides and "kv_heads" not in overrides and preset.kv_heads == preset.heads:
        overrides["kv_heads"] = overrides["heads"]
    cluster = Cluster(args.world, args.ranks_per_node, args.intra_bw, args.inter_bw, args.intra_lat,
                      args.inter_lat, args.tflops, args.efficiency, args.memory_gib, args.host_bw)
    return PlanInput(cluster, replace(preset, **overrides), args.seq_len, args.batch, args.dtype, args.causal,
                     args.zero)


def _strategies(args) -> list[str] | None:
    return [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None


# ---------------------------------------------------------------------------------------------
# profiling
# ---------------------------------------------------------------------------------------------
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


def profile_rank(configs: list[tuple[str, dict]], *, batch: int, seq: int, heads: int, kv_heads: int,
                 head_dim: int, dtype: str, causal: bool, iters: int, warmup: int, seed: int = 0) -> list[dict]:
    """Per-rank: time `iters` fwd+bwd iterations of each (strategy, init_kwargs). Returns, for
    every config, {"seconds": median over iterations of the max over ranks, "bytes": per kind,
    max over ranks} (identical on every rank) or {"error": message}."""
    import torch
    import torch.distributed as dist

    import seqpar
    from .comm import Comm, CommStats
    from .testing.checks import DTYPES, make_inputs

    control = Comm(None, CommStats())  # timing/bytes reductions, kept out of the measured stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    full = tuple(t.to(device) for t in make_inputs(batch, seq, heads, kv_heads, head_dim, DTYPES[dtype], seed))
    results = []
    for strategy, kwargs in configs:
        try:
            ctx = seqpar.init(strategy, **kwargs)
            shards = tuple(ctx.shard(t) for t in full)
            for _ in range(warmup):
                attention_iteration(ctx, shards, causal)
            times, sent = [], {}
            for _ in range(iters):
                dist.barrier()
                t0 = time.perf_counter()
                sent = attention_iteration(ctx, shards, causal)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
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


Runner = Callable[[int, list, dict], list[dict]]


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
    import torch.distributed as dist

    created = "WORLD_SIZE" in os.environ and not dist.is_initialized()  # under torchrun
    if created:
        import torch
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    if dist.is_initialized():
        try:
            if dist.get_world_size() != world:
                raise ValueError(f"--world {world} does not match the running world of "
                                 f"{dist.get_world_size()} ranks")
            return profile_rank(configs, **kwargs)
        finally:
            if created:
                dist.destroy_process_group()
    from .testing import ProcessWorld
    with ProcessWorld(world) as pw:
        return pw.run(profile_rank, configs, **kwargs)[0]


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"


def _fmt_seconds(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.4g} {unit}"
    return f"{t * 1e9:.4g} ns"


def _fmt_kinds(c: Candidate) -> str:
    parts = [f"{k} {_fmt_bytes(v)}" for k, v in c.comm_bytes.items()]
    if c.host_bytes:
        parts.append(f"host copies {_fmt_bytes(c.host_bytes)}")
    return ", ".join(parts) or "-"


def format_table(candidates: list[Candidate]) -> str:
    header = (f"{'#':>3}  {'candidate':<44} {'step':>10} {'vs ring':>7} {'attn/layer':>10} {'exposed':>10} "
              f"{'mem/rank':>10} {'fits':>4}  comm per layer per rank (fwd+bwd)")
    lines = [header, "-" * len(header)]
    for i, c in enumerate(candidates, 1):
        if not c.valid:
            lines.append(f"{i:>3}  {c.label:<44} {'-':>10} {'-':>7} {'-':>10} {'-':>10} {'-':>10} {'-':>4}  "
                         f"invalid: {c.reason}")
            continue
        speedup = f"{c.speedup_vs_ring:.2f}x" if c.speedup_vs_ring else "-"
        lines.append(f"{i:>3}  {c.label:<44} {_fmt_seconds(c.step_time):>10} {speedup:>7} "
                     f"{_fmt_seconds(c.attention_time):>10} {_fmt_seconds(c.exposed_comm_time):>10} "
                     f"{_fmt_bytes(c.memory['total']):>10} {'yes' if c.fits else 'NO':>4}  {_fmt_kinds(c)}")
    return "\n".join(lines)


def format_profile(ranked: list[Candidate]) -> str:
    lines = ["measured (fwd+bwd of one attention layer; bytes: max over ranks, predicted | measured)"]
    for i, c in enumerate(ranked, 1):
        m = c.measured
        if "error" in m:
            lines.append(f"{i:>3}  {c.label:<44} error: {m['error']}")
            continue
        kinds = sorted(set(m["bytes"]) | set(m["predicted_bytes"]))
        pairs = ", ".join(f"{k} {_fmt_bytes(m['predicted_bytes'].get(k, 0))} | {_fmt_bytes(m['bytes'].get(k, 0))}"
                          for k in kinds)
        match = "match" if m["bytes"] == m["predicted_bytes"] else "MISMATCH"
        lines.append(f"{i:>3}  {c.label:<44} {_fmt_seconds(m['seconds']):>10}  {pairs}  [{match}]")
    return "\n".join(lines)


def _describe(inp: PlanInput) -> str:
    c, m = inp.cluster, inp.model
    return (f"P={c.world} ({c.ranks_per_node}/node, intra {c.intra_bw:g} GB/s {c.intra_lat:g} us, inter "
            f"{c.inter_bw:g} GB/s {c.inter_lat:g} us, {c.tflops:g} TFLOP/s x {c.efficiency:g}, {c.memory_gib:g} GiB)"
            f"; model L={m.layers} H={m.hidden} heads={m.heads}/{m.kv_heads} ffn={m.ffn_hidden} V={m.vocab}; "
            f"N={inp.seq_len} B={inp.batch} {inp.dtype} {'causal' if inp.causal else 'full'} ZeRO-{inp.zero}")


def main(args: argparse.Namespace) -> int:
    inp = plan_input_from_args(args)
    candidates = plan(inp, _strategies(args))
    ranked = profile(inp, candidates, args) if args.profile else None
    if _is_secondary_rank():
        return 0
    shown = candidates[: args.top] if args.top else candidates
    if args.json:
        out = {"input": _describe(inp), "candidates": [c.to_dict() for c in shown]}
        if ranked is not None:
            out["profiled"] = [c.to_dict() for c in ranked]
        print(json.dumps(out, indent=2))
        return 0
    print(_describe(inp))
    print(format_table(shown))
    if ranked is not None:
        print()
        print(format_profile(ranked))
    return 0


def _is_secondary_rank() -> bool:
    """Under torchrun only rank 0 prints."""
    return int(os.environ.get("RANK", "0")) != 0
