"""`seqpar plan` on the command line: arguments, the plan input they describe, table/JSON output.

Predictions come from seqpar.plan.search (docs/planner.md); `--profile` also measures the
best candidates on a real process world (seqpar.plan.profiling).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from .inputs import DTYPE_BYTES, MODEL_PRESETS, Cluster, GiB, PlanInput
from .profiling import profile
from .search import STRATEGY_MODELS, Candidate, plan

__all__ = ["add_arguments", "main", "plan_input_from_args", "format_table", "format_profile"]


# -- arguments ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    _cluster_arguments(p.add_argument_group("cluster"))
    _model_arguments(p.add_argument_group("model and batch"))
    out = p.add_argument_group("output")
    out.add_argument("--strategies", help=f"comma-separated subset of {sorted(STRATEGY_MODELS)}")
    out.add_argument("--top", type=int, default=0, help="print only the best N rows (0: all)")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _profile_arguments(p.add_argument_group("profiling (--profile)"))


def _cluster_arguments(topo) -> None:
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


def _model_arguments(model) -> None:
    model.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama-7b", help="shape preset")
    for name in ("layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab"):
        model.add_argument(f"--{name}", type=int, help=f"override the preset's {name.replace('-', ' ')}")
    model.add_argument("--seq-len", type=int, required=True, help="tokens per sequence N")
    model.add_argument("--batch", type=int, default=1, help="micro-batch B")
    model.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    model.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (memory only)")
    model.add_argument("--mean-doc-len", type=float, help="packed documents of this mean length: attention skips "
                       "the blocks where documents do not meet (default: one document per sequence)")


def _profile_arguments(prof) -> None:
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
                     args.zero, getattr(args, "mean_doc_len", None))


def _strategies(args) -> list[str] | None:
    return [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None


# -- output ------------------------------------------------------------------------------------
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
    return "\n".join([header, "-" * len(header)] + [_table_row(i, c) for i, c in enumerate(candidates, 1)])


def _table_row(i: int, c: Candidate) -> str:
    if not c.valid:
        return (f"{i:>3}  {c.label:<44} {'-':>10} {'-':>7} {'-':>10} {'-':>10} {'-':>10} {'-':>4}  "
                f"invalid: {c.reason}")
    speedup = f"{c.speedup_vs_ring:.2f}x" if c.speedup_vs_ring else "-"
    return (f"{i:>3}  {c.label:<44} {_fmt_seconds(c.step_time):>10} {speedup:>7} "
            f"{_fmt_seconds(c.attention_time):>10} {_fmt_seconds(c.exposed_comm_time):>10} "
            f"{_fmt_bytes(c.memory['total']):>10} {'yes' if c.fits else 'NO':>4}  {_fmt_kinds(c)}")


def format_profile(ranked: list[Candidate]) -> str:
    lines = ["measured (fwd+bwd of one attention layer; bytes: max over ranks, predicted | measured)"]
    return "\n".join(lines + [_profile_row(i, c) for i, c in enumerate(ranked, 1)])


def _profile_row(i: int, c: Candidate) -> str:
    m = c.measured
    if "error" in m:
        return f"{i:>3}  {c.label:<44} error: {m['error']}"
    kinds = sorted(set(m["bytes"]) | set(m["predicted_bytes"]))
    pairs = ", ".join(f"{k} {_fmt_bytes(m['predicted_bytes'].get(k, 0))} | {_fmt_bytes(m['bytes'].get(k, 0))}"
                      for k in kinds)
    match = "match" if m["bytes"] == m["predicted_bytes"] else "MISMATCH"
    return f"{i:>3}  {c.label:<44} {_fmt_seconds(m['seconds']):>10}  {pairs}  [{match}]"


def _describe(inp: PlanInput) -> str:
    c, m = inp.cluster, inp.model
    return (f"P={c.world} ({c.ranks_per_node}/node, intra {c.intra_bw:g} GB/s {c.intra_lat:g} us, inter "
            f"{c.inter_bw:g} GB/s {c.inter_lat:g} us, {c.tflops:g} TFLOP/s x {c.efficiency:g}, {c.memory_gib:g} GiB)"
            f"; model L={m.layers} H={m.hidden} heads={m.heads}/{m.kv_heads} ffn={m.ffn_hidden} V={m.vocab}; "
            f"N={inp.seq_len} B={inp.batch} {inp.dtype} {'causal' if inp.causal else 'full'} ZeRO-{inp.zero}"
            + (f"; documents of mean length {inp.mean_doc_len:g} (attention x{inp.attention_fraction:.3g})"
               if inp.mean_doc_len else ""))


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
