"""`seqpar plan` on the command line: arguments, the plan input they describe, table/JSON output.

Predictions come from seqpar.plan.search (docs/planner.md), on the cluster flags or on a
measured calibration (`--calibrate` measures the running world, `--calibration FILE` reads
one; seqpar.plan.calibrate); `--profile` measures the candidates on a real process world and
compares (seqpar.plan.profiling); when nothing fits in memory, seqpar.plan.advice says what
single change would.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from .advice import fit_suggestions, format_suggestions
from .calibrate import measure
from .costs import planned_strategies
from .hardware import Calibration
from .inputs import DTYPE_BYTES, MODEL_PRESETS, Cluster, GiB, PlanInput
from .presets import CLUSTER_PRESETS
from .profiling import ProfileReport, profile, profile_input, profile_rank
from .schedules import windowed_ring_steps
from .search import Candidate, plan
from .worlds import open_world

__all__ = ["add_arguments", "main", "plan_input_from_args", "format_table", "format_profile", "DEFAULT_CALIBRATION"]

DEFAULT_CALIBRATION = "seqpar-calibration.json"


# -- arguments ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    _cluster_arguments(p.add_argument_group("cluster"))
    _model_arguments(p.add_argument_group("model and batch"))
    out = p.add_argument_group("output")
    out.add_argument("--strategies", help=f"comma-separated subset of {planned_strategies()}")
    out.add_argument("--top", type=int, default=0, help="print only the best N rows (0: all)")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cal = p.add_argument_group("calibration (measured hardware)")
    cal.add_argument("--calibrate", action="store_true",
                     help="measure the running world (local: --world gloo processes; torchrun: its world), predict "
                          f"with it and save it to --calibration (default {DEFAULT_CALIBRATION})")
    cal.add_argument("--calibration", metavar="FILE", help="predict with this calibration (JSON from --calibrate)")
    cal.add_argument("--calibration-repeats", type=int, default=5, help="timed repeats per measurement")
    _profile_arguments(p.add_argument_group("profiling (--profile)"))


#: cluster flags and their defaults (None in argparse so that a --cluster preset can fill them)
CLUSTER_FLAG_DEFAULTS = {"world": None, "ranks_per_node": 8, "intra_bw": 150.0, "inter_bw": 25.0, "intra_lat": 5.0,
                         "inter_lat": 20.0, "tflops": 312.0, "efficiency": 0.5, "memory_gib": 80.0, "host_bw": 25.0}


def _cluster_arguments(topo) -> None:
    topo.add_argument("--cluster", choices=sorted(CLUSTER_PRESETS),
                      help="a published setup (docs/planner.md, 'Against the papers' own tables'): its cluster, "
                           "assumptions and run (model, sequence, ZeRO, checkpointing); explicit flags override")
    topo.add_argument("--world", type=int, help="sequence-parallel ranks P (required without --cluster)")
    topo.add_argument("--ranks-per-node", type=int, help="consecutive ranks sharing a node (default 8)")
    topo.add_argument("--intra-bw", type=float, help="intra-node GB/s per rank (default 150)")
    topo.add_argument("--inter-bw", type=float, help="inter-node GB/s per rank (default 25)")
    topo.add_argument("--intra-lat", type=float, help="intra-node latency, us (default 5)")
    topo.add_argument("--inter-lat", type=float, help="inter-node latency, us (default 20)")
    topo.add_argument("--tflops", type=float, help="device peak TFLOP/s in the dtype (default 312)")
    topo.add_argument("--efficiency", type=float, help="fraction of peak the kernels reach (default 0.5)")
    topo.add_argument("--attn-efficiency", type=float, help="fraction of peak the attention kernels reach "
                      "on long calls (default: --efficiency)")
    topo.add_argument("--attn-half-tokens", type=int, help="call length (tokens) at which attention runs at half "
                      "--attn-efficiency: a call of L tokens at attn_efficiency x L / (L + this), short ring blocks "
                      "below long calls (default: none, every call at --attn-efficiency)")
    topo.add_argument("--p2p-efficiency", type=float,
                      help="fraction of the link bandwidth ring sends reach (default 1)")
    topo.add_argument("--node-inter-bw", type=float, help="GB/s of one node's NICs together, shared by its ranks "
                      "crossing nodes (default: none, every rank has --inter-bw)")
    topo.add_argument("--zero-traffic", action=argparse.BooleanOptionalAction, default=None,
                      help="time the ZeRO / data-parallel traffic of every step (default: only the gradient "
                           "all-reduce hidden under the dense backward)")
    topo.add_argument("--memory-gib", type=float, help="device memory, GiB (default 80)")
    topo.add_argument("--host-bw", type=float, help="host<->device GB/s (offloading, default 25)")


def _model_arguments(model) -> None:
    model.add_argument("--model", choices=sorted(MODEL_PRESETS), help="shape preset (default llama-7b)")
    for name in ("layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab"):
        model.add_argument(f"--{name}", type=int, help=f"override the preset's {name.replace('-', ' ')}")
    model.add_argument("--seq-len", type=int, help="tokens per sequence N (required without --cluster)")
    model.add_argument("--batch", type=int, default=1, help="micro-batch B")
    model.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    model.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (memory; time with --zero-traffic)")
    model.add_argument("--mean-doc-len", type=float, help="packed documents of this mean length: attention skips "
                       "the blocks where documents do not meet (default: one document per sequence)")
    model.add_argument("--window", type=int, help="causal sliding window of W tokens in every layer: attention "
                       "computes about (W + 2x128) x N pairs per head, and a contiguous ring sends K/V only to the "
                       "ranks whose keys the window reaches")
    model.add_argument("--sinks", action="store_true", help="a learned sink logit per query head (gpt-oss): one "
                       "more softmax column per query row, heads x layers more parameters")
    model.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute every block in backward (memory: one block's activations; time: one more "
                            "forward)")
    model.add_argument("--optimizer-offload", action=argparse.BooleanOptionalAction, default=None,
                       help="AdamW states and fp32 master weights in host memory (ZeRO-Offload): device memory "
                            "only (the optimizer's host step is not timed)")
    model.add_argument("--fpdt-chunks", default="1,2,4,8", help="FPDT chunk counts to consider (comma-separated)")
    model.add_argument("--tp", help="tensor-parallel degrees to consider, comma-separated (default: every divisor "
                       "of the world and the heads; 1: sequence parallelism alone)")
    model.add_argument("--pp", help="pipeline stage counts to consider, comma-separated (default: every divisor of "
                       "the world and the layers; each with gpipe and 1f1b, one sequence per microbatch)")


def _profile_arguments(prof) -> None:
    prof.add_argument("--profile", action="store_true",
                      help="measure the candidates on a real world (calibrating it unless --calibration is given) "
                           "and compare with the prediction: rank correlation and regret")
    prof.add_argument("--profile-top", type=int, default=0, help="measure only the best K valid candidates (0: all)")
    prof.add_argument("--profile-seq", type=int, help="sequence length to run (default: --seq-len)")
    prof.add_argument("--profile-heads", type=int, help="heads to run (default: the model's)")
    prof.add_argument("--profile-kv-heads", type=int, help="kv heads to run (default: the model's)")
    prof.add_argument("--profile-head-dim", type=int, help="head dim to run (default: the model's)")
    prof.add_argument("--profile-dtype", choices=sorted(DTYPE_BYTES), help="dtype to run (default: --dtype)")
    prof.add_argument("--profile-iters", type=int, default=5, help="timed iterations (median reported)")
    prof.add_argument("--profile-warmup", type=int, default=1)
    prof.add_argument("--profile-confirm", type=int, default=5,
                      help="re-measure the predicted and the measured best this many iterations (0: no)")


def plan_input_from_args(args: argparse.Namespace) -> PlanInput:
    name = getattr(args, "cluster", None)
    preset = CLUSTER_PRESETS[name] if name else None
    base = {f: getattr(preset.cluster, f) for f in CLUSTER_FLAG_DEFAULTS} if preset else dict(CLUSTER_FLAG_DEFAULTS)
    extra = ("attn_efficiency", "attn_half_tokens", "p2p_efficiency", "node_inter_bw", "zero_traffic")
    base.update({f: getattr(preset.cluster, f) for f in extra} if preset else {})
    for f in (*CLUSTER_FLAG_DEFAULTS, *extra):
        if getattr(args, f, None) is not None:
            base[f] = getattr(args, f)
    if base["world"] is None:
        raise ValueError("--world is required (or --cluster NAME)")

    def run(field: str, default):
        value = getattr(args, field, None)
        return value if value is not None else (getattr(preset, field) if preset else default)

    seq_len = getattr(args, "seq_len", None) or (preset.seq_len if preset else None)
    if seq_len is None:
        raise ValueError("--seq-len is required (or --cluster NAME)")
    shape = MODEL_PRESETS[run("model", "llama-7b")]
    overrides = {f: getattr(args, f) for f in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")
                 if getattr(args, f, None) is not None}
    if "heads" in overrides and "kv_heads" not in overrides and shape.kv_heads == shape.heads:
        overrides["kv_heads"] = overrides["heads"]
    cluster = Cluster(**base)
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = preset.checkpointing if preset else False
    if getattr(args, "sinks", False):
        overrides["sinks"] = True
    return PlanInput(cluster, replace(shape, **overrides), seq_len, args.batch, args.dtype, args.causal,
                     run("zero", 0), checkpointing, getattr(args, "mean_doc_len", None),
                     run("optimizer_offload", False), window=getattr(args, "window", None))


def fpdt_chunks_from_args(args: argparse.Namespace) -> tuple[int, ...]:
    try:
        chunks = tuple(int(c) for c in str(getattr(args, "fpdt_chunks", "1,2,4,8")).split(",") if c.strip())
    except ValueError:
        raise ValueError(f"--fpdt-chunks must be comma-separated integers, got {args.fpdt_chunks!r}") from None
    if not chunks or min(chunks) < 1:
        raise ValueError(f"--fpdt-chunks must list chunk counts >= 1, got {args.fpdt_chunks!r}")
    return chunks


def degrees_from_args(args: argparse.Namespace, name: str) -> tuple[int, ...] | None:
    """--tp / --pp: the degrees to consider (None: every divisor)."""
    text = getattr(args, name, None)
    if text is None:
        return None
    try:
        degrees = tuple(int(c) for c in str(text).split(",") if c.strip())
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not degrees or min(degrees) < 1:
        raise ValueError(f"--{name} must list degrees >= 1, got {text!r}")
    return degrees


def _mesh(args) -> dict:
    return {"tp": degrees_from_args(args, "tp"), "pp": degrees_from_args(args, "pp")}


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
    if c.mesh_bytes:
        parts.append("per step: " + " ".join(f"{k} {_fmt_bytes(v)}" for k, v in c.mesh_bytes.items()))
    if c.bubble:
        parts.append(f"bubble {100 * c.bubble:.0f}%")
    if c.host_bytes:
        parts.append(f"host copies {_fmt_bytes(c.host_bytes)}")
    if c.memory.get("host"):
        parts.append(f"host memory {_fmt_bytes(c.memory['host'])}/rank")
    return ", ".join(parts) or "-"


def format_table(candidates: list[Candidate]) -> str:
    header = (f"{'#':>3}  {'tp':>2} {'pp':>11} {'dp':>2}  {'candidate':<44} {'step':>10} {'vs ring':>7} "
              f"{'attn/layer':>10} {'exposed':>10} {'mem/rank':>10} {'fits':>4}  comm per layer per rank (fwd+bwd)")
    return "\n".join([header, "-" * len(header)] + [_table_row(i, c) for i, c in enumerate(candidates, 1)])


def _mesh_columns(c: Candidate) -> str:
    """tp, pp (with its schedule and microbatches) and dp of a candidate."""
    cfg = c.config
    pp = f"{cfg.pp} {cfg.pp_schedule} m{cfg.microbatches}" if cfg.pp > 1 else "1"
    return f"{cfg.tp:>2} {pp:>11} {cfg.dp:>2}"


def _table_row(i: int, c: Candidate) -> str:
    label = c.label.split(" [")[0]  # the mesh is in its columns
    if not c.valid:
        return (f"{i:>3}  {_mesh_columns(c)}  {label:<44} {'-':>10} {'-':>7} {'-':>10} {'-':>10} {'-':>10} {'-':>4}  "
                f"invalid: {c.reason}")
    speedup = f"{c.speedup_vs_ring:.2f}x" if c.speedup_vs_ring else "-"
    return (f"{i:>3}  {_mesh_columns(c)}  {label:<44} {_fmt_seconds(c.step_time):>10} {speedup:>7} "
            f"{_fmt_seconds(c.attention_time):>10} {_fmt_seconds(c.exposed_comm_time):>10} "
            f"{_fmt_bytes(c.memory['total']):>10} {'yes' if c.fits else 'NO':>4}  {_fmt_kinds(c)}")


def format_profile(report: ProfileReport) -> str:
    sh = report.shape
    lines = [f"profile: fwd+bwd of one attention layer, B={sh['batch']} N={sh['seq']} heads {sh['heads']}/"
             f"{sh['kv_heads']} x {sh['head_dim']} {sh['dtype']} {'causal' if sh['causal'] else 'full'}; median of "
             f"{report.iters} interleaved iterations (slowest rank) after {report.warmup} warm-up",
             f"predicted on: {report.calibration}",
             f"{'#':>3}  {'candidate':<44} {'predicted':>10} {'measured':>10} {'meas/pred':>9}  "
             f"bytes per kind: predicted | measured"]
    lines += [_profile_row(i, c) for i, c in enumerate(report.candidates, 1)]
    lines.append(f"Spearman rank correlation (predicted vs measured) {report.spearman:.3f}; regret {report.regret:.3f} "
                 f"= measured time of the predicted best ({report.predicted_best}) / the measured best "
                 f"({report.measured_best}); confirmed by re-measuring the two: {report.confirmed_regret:.3f}")
    return "\n".join(lines + report.notes)


def _profile_row(i: int, c: Candidate) -> str:
    m = c.measured
    if "error" in m:
        return f"{i:>3}  {c.label:<44} error: {m['error']}"
    kinds = sorted(set(m["bytes"]) | set(m["predicted_bytes"]))
    pairs = ", ".join(f"{k} {_fmt_bytes(m['predicted_bytes'].get(k, 0))} | {_fmt_bytes(m['bytes'].get(k, 0))}"
                      for k in kinds)
    match = "match" if m["bytes"] == m["predicted_bytes"] else "MISMATCH"
    pred = m.get("predicted_seconds")
    ratio = f"{m['seconds'] / pred:.2f}" if pred else "-"
    return (f"{i:>3}  {c.label:<44} {_fmt_seconds(pred) if pred else '-':>10} {_fmt_seconds(m['seconds']):>10} "
            f"{ratio:>9}  {pairs}  [{match}]")


def _attention_summary(c) -> str:
    """The attention kernels' efficiency where it differs from the dense layers'."""
    if c.attn_half_tokens is not None:
        eff = c.efficiency if c.attn_efficiency is None else c.attn_efficiency
        return f", attention x {eff:g} x L/(L+{c.attn_half_tokens}) per call of L tokens"
    return f", attention x {c.attn_efficiency:g}" if c.attn_efficiency is not None else ""


def _describe(inp: PlanInput) -> str:
    c, m = inp.cluster, inp.model
    hw = (c.calibration.summary() if c.calibration else
          f"intra {c.intra_bw:g} GB/s {c.intra_lat:g} us, inter {c.inter_bw:g} GB/s {c.inter_lat:g} us, "
          f"{c.tflops:g} TFLOP/s x {c.efficiency:g}"
          + _attention_summary(c)
          + (f", P2P x {c.p2p_efficiency:g}" if c.p2p_efficiency != 1.0 else "")
          + (f", node NICs {c.node_inter_bw:g} GB/s" if c.node_inter_bw is not None else "")
          + (", ZeRO traffic timed" if c.zero_traffic else ""))
    return (f"P={c.world} ({c.ranks_per_node}/node, {hw}, {c.memory_gib:g} GiB)"
            f"; model L={m.layers} H={m.hidden} heads={m.heads}/{m.kv_heads} ffn={m.ffn_hidden} V={m.vocab}; "
            f"N={inp.seq_len} B={inp.batch} {inp.dtype} {'causal' if inp.causal else 'full'} ZeRO-{inp.zero}"
            + (" activation checkpointing" if inp.checkpointing else "")
            + (" optimizer offload" if inp.optimizer_offload else "")
            + (f"; documents of mean length {inp.mean_doc_len:g} (attention x{inp.attention_fraction:.3g})"
               if inp.mean_doc_len else "")
            + (f"; sliding window {inp.window} (attention x{inp.window_fraction:.3g})" if inp.window else "")
            + (f"; sinks (attention x{inp.sink_factor:.6g})" if inp.model.sinks else ""))


def window_note(inp: PlanInput, candidates: list[Candidate], without: list[Candidate]) -> str | None:
    """One line on what the window did to the choice: the best candidate with and `without` the
    window, and its ring traffic (None without a window)."""
    best = next((c for c in candidates if c.valid), None)
    if inp.window is None or best is None:
        return None
    before = next((c.label for c in without if c.valid), "none")
    choice = (f"window {inp.window} changes the best candidate from {before} to {best.label}" if before != best.label
              else f"window {inp.window} leaves the best candidate at {best.label}")
    cfg = best.config
    ring = {"ring": inp.world, "usp": cfg.ring}.get(cfg.strategy, 1)
    if ring > 1:
        steps = len(windowed_ring_steps(cfg.layout, ring, inp.seq_len, inp.window_pair, inp.causal))
        if steps < ring - 1:
            return (f"{choice}: its ring sends K/V over {steps} of {ring - 1} ring distances (the keys in a "
                    f"query's window live on {steps} other ring rank(s) at most), so ring traffic is local "
                    f"({steps}/{ring - 1} of the plain ring's K/V bytes); attention work x{inp.window_fraction:.3g}")
    return (f"{choice}: attention work x{inp.window_fraction:.3g} for every strategy, its communication "
            f"unchanged")


def _measure(run, inp: PlanInput, args) -> Calibration:
    """Calibrate the world `run` reaches for what this plan predicts: the plan's and the
    profile's dtypes, the profiled head size and GQA ratio."""
    small = profile_input(inp, seq=args.profile_seq, heads=args.profile_heads, kv_heads=args.profile_kv_heads,
                          head_dim=args.profile_head_dim, dtype=args.profile_dtype)
    dtypes = tuple(dict.fromkeys([small.dtype, inp.dtype])) if args.profile else (inp.dtype,)
    m = small.model if args.profile else inp.model
    return measure(run, inp.world, ranks_per_node=inp.cluster.ranks_per_node, dtypes=dtypes,
                   heads=m.heads // m.kv_heads, kv_heads=1, head_dim=m.head_dim, repeats=args.calibration_repeats)


def main(args: argparse.Namespace) -> int:

    inp = plan_input_from_args(args)
    chunks = fpdt_chunks_from_args(args)
    if args.calibration_repeats < 1:
        raise ValueError(f"--calibration-repeats must be >= 1, got {args.calibration_repeats}")
    calibration = Calibration.load(args.calibration) if args.calibration and not args.calibrate else None
    notes, report = [], None
    if args.calibrate or args.profile:
        with open_world(inp.world) as run:
            if calibration is None:
                calibration = _measure(run, inp, args)
                if args.calibrate and not _is_secondary_rank():
                    path = args.calibration or DEFAULT_CALIBRATION
                    calibration.save(path)
                    notes.append(f"calibration saved to {path} (reuse: --calibration {path})")
                elif not args.calibrate:
                    notes.append("calibration measured on this world for the profile (not saved; --calibrate saves it)")
            inp = replace(inp, cluster=replace(inp.cluster, calibration=calibration))
            candidates = plan(inp, _strategies(args), chunks, **_mesh(args))
            if args.profile and calibration.world != inp.world:
                notes.append(f"note: the calibration was measured on {calibration.world} ranks, this world has "
                             f"{inp.world}: predictions extrapolate")
            if args.profile:
                report = profile(inp, candidates, args, calibration=calibration,
                                 runner=lambda world, configs, kw: run(profile_rank, configs, **kw))
    else:
        if calibration is not None:
            inp = replace(inp, cluster=replace(inp.cluster, calibration=calibration))
        candidates = plan(inp, _strategies(args), chunks, **_mesh(args))
    if _is_secondary_rank():
        return 0
    advice = fit_suggestions(inp, candidates, _strategies(args), chunks, **_mesh(args))
    without = plan(replace(inp, window=None), _strategies(args), chunks, **_mesh(args)) if inp.window else []
    note = window_note(inp, candidates, without)
    notes = notes + ([note] if note else [])
    shown = candidates[: args.top] if args.top else candidates
    if args.json:
        out = {"input": _describe(inp), "candidates": [c.to_dict() for c in shown], "notes": notes}
        if advice is not None:
            out["fit_suggestions"] = [a.to_dict() for a in advice]
        if report is not None:
            out["profile"] = report.to_dict()
        print(json.dumps(out, indent=2))
        return 0
    print(_describe(inp))
    print(format_table(shown))
    if advice is not None:
        print()
        print(format_suggestions(inp, advice))
    if report is not None:
        print()
        print(format_profile(report))
    for note in notes:
        print(note)
    return 0


def _is_secondary_rank() -> bool:
    """Under torchrun only rank 0 prints."""
    return int(os.environ.get("RANK", "0")) != 0
