"""`seqpar plan --profile`: measure candidates on a real world and compare with the prediction.

`profile` runs one attention layer (forward + backward) of every valid candidate (or the
best `--profile-top K`) on a local gloo `seqpar.world.ProcessWorld` (or the current world
under torchrun), at the profiled shape, and predicts the same quantity with the cost model on
the measured hardware (a `Calibration` of that world). The candidates run interleaved: after
a warm-up of each, iteration i of every candidate runs before iteration i+1 of any, so a
change of the machine's load hits them all alike. A candidate's time is the median over
iterations of the slowest rank's time (each iteration starts at a barrier). The report: per
candidate predicted and measured time and bytes, the Spearman rank correlation of
predicted vs measured times, and the regret = measured time of the predicted best / the
measured best. The minimum of noisy times is biased low (the winner's curse), so with
`--profile-confirm N` the predicted best and the measured best run again, on their own and
interleaved, N iterations each: their ratio is the confirmed regret.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist

from ..comm import Comm, CommStats
from ..context import init
from .candidate import Config
from .hardware import Calibration
from .inputs import ModelShape, PlanInput
from .search import Candidate, attention_schedule, evaluate
from .stages import max_bytes_by_kind
from .worlds import open_world

__all__ = ["KINDS", "attention_iteration", "backend_device", "profile_rank", "profile", "profile_input", "spearman",
           "score", "confirm_regret", "ProfileReport"]

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

    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim)
    q, dout = torch.randn(shape_q, generator=g), torch.randn(shape_q, generator=g)
    k, v = torch.randn(shape_kv, generator=g), torch.randn(shape_kv, generator=g)
    return tuple(t.to(device=device, dtype=getattr(torch, dtype)) for t in (q, k, v, dout))


def backend_device() -> torch.device:
    """Where this rank's collectives take tensors: its GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def profile_rank(configs: list[tuple[str, dict]], *, batch: int, seq: int, heads: int, kv_heads: int,
                 head_dim: int, dtype: str, causal: bool, iters: int, warmup: int, seed: int = 0) -> list[dict]:
    """Per rank: `warmup` then `iters` interleaved fwd+bwd iterations of each (strategy,
    init_kwargs). Returns, for every config, {"seconds": median over iterations of the max
    over ranks, "times": those maxima, "bytes": per kind, max over ranks} (identical on
    every rank) or {"error": message}."""



    control = Comm(None, CommStats())  # timing/bytes reductions, kept out of the measured stats
    device = backend_device()
    full = _full_inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs, results = [], []
    for strategy, kwargs in configs:
        try:  # same on every rank: bad config / strategy not installed
            ctx = init(strategy, **kwargs)
            shards = tuple(ctx.shard(t) for t in full)
            sent = {}
            for _ in range(max(1, warmup)):  # the first call also runs the input check's collective
                sent = attention_iteration(ctx, shards, causal)
            runs.append((ctx, shards, sent, []))
            results.append(None)
        except (ValueError, ImportError) as e:
            results.append({"error": f"{type(e).__name__}: {e}"})
    for _ in range(iters):
        for ctx, shards, _sent, times in runs:
            dist.barrier()
            t0 = time.perf_counter()
            attention_iteration(ctx, shards, causal)
            sync()
            times.append(time.perf_counter() - t0)
    it = iter(runs)
    for i, res in enumerate(results):
        if res is not None:
            continue
        _ctx, _shards, sent, times = next(it)
        stats = torch.tensor([float(t) for t in times] + [float(sent.get(k, 0)) for k in KINDS],
                             dtype=torch.float64, device=device)
        control.all_reduce(stats, op=dist.ReduceOp.MAX)
        stats = stats.cpu().tolist()
        results[i] = {"seconds": statistics.median(stats[:iters]), "times": stats[:iters],
                      "bytes": {k: int(b) for k, b in zip(KINDS, stats[iters:]) if b}}
    return results


def profile_input(inp: PlanInput, *, seq: int | None = None, heads: int | None = None, kv_heads: int | None = None,
                  head_dim: int | None = None, dtype: str | None = None,
                  calibration: Calibration | None = None) -> PlanInput:
    """The plan input of what a profile runs: one attention layer of the given shape (default:
    the model's) on the same world, predicted with `calibration` when given."""
    m = inp.model
    heads = heads or m.heads
    kv_heads = kv_heads or (heads if heads != m.heads and m.kv_heads == m.heads else m.kv_heads)
    head_dim = head_dim or m.head_dim
    model = ModelShape(1, heads * head_dim, heads, kv_heads, m.ffn_hidden, m.vocab)
    cluster = replace(inp.cluster, calibration=calibration) if calibration is not None else inp.cluster
    return replace(inp, cluster=cluster, model=model, seq_len=seq or inp.seq_len, dtype=dtype or inp.dtype)


def _shape(small: PlanInput) -> dict:
    m = small.model
    return {"batch": small.batch, "seq": small.seq_len, "heads": m.heads, "kv_heads": m.kv_heads,
            "head_dim": m.head_dim, "dtype": small.dtype, "causal": small.causal}


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank); nan for fewer than 2 points or
    a constant side."""
    if len(xs) != len(ys) or len(xs) < 2:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else math.nan


@dataclass
class ProfileReport:
    """Measured candidates (fastest first, failed ones last), each with `.measured` =
    {seconds, times, bytes, predicted_seconds, predicted_bytes, shape} or {error, ...}."""

    candidates: list[Candidate]
    shape: dict
    iters: int
    warmup: int
    spearman: float = math.nan
    regret: float = math.nan
    confirmed_regret: float = math.nan  # the two re-measured alone (interleaved): no winner's curse
    predicted_best: str = ""
    measured_best: str = ""
    calibration: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "iters": self.iters, "warmup": self.warmup, "spearman": _finite(self.spearman),
                "regret": _finite(self.regret), "confirmed_regret": _finite(self.confirmed_regret),
                "predicted_best": self.predicted_best,
                "measured_best": self.measured_best, "calibration": self.calibration,
                "candidates": [c.to_dict() for c in self.candidates]}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _predicted_bytes(small: PlanInput, cfg: Config) -> dict[str, int]:
    """Per kind, the most any rank sends in one attention layer (what profile_rank reports)."""
    return max_bytes_by_kind([attention_schedule(small, cfg, rank) for rank in range(small.world)])


def profile(inp: PlanInput, candidates: list[Candidate], args, runner: Runner | None = None,
            calibration: Calibration | None = None) -> ProfileReport:
    """Measure every valid candidate (the best `args.profile_top` when > 0) at the profiled
    shape and compare with the prediction there (on `calibration` when given, else on the
    cluster's numbers). runner(world, configs, kwargs) runs profile_rank on a world and returns
    rank 0's result (default: `seqpar.plan.worlds.open_world`)."""
    if args.profile_top < 0 or args.profile_iters < 1 or args.profile_warmup < 0:
        raise ValueError(f"--profile-top must be >= 0 and --profile-iters >= 1 and --profile-warmup >= 0, got "
                         f"{args.profile_top}, {args.profile_iters}, {args.profile_warmup}")
    small = profile_input(inp, seq=args.profile_seq, heads=args.profile_heads, kv_heads=args.profile_kv_heads,
                          head_dim=args.profile_head_dim, dtype=args.profile_dtype, calibration=calibration)
    chosen = [c for c in candidates if c.valid and not c.config.hybrid]  # one attention layer on the whole world
    chosen = chosen[: args.profile_top] if args.profile_top else chosen
    shape = _shape(small)
    kwargs = {"iters": args.profile_iters, "warmup": args.profile_warmup, **shape}
    configs = [(c.config.strategy, c.config.init_kwargs(inp.cluster.ranks_per_node)) for c in chosen]
    if runner is None:
        with open_world(inp.world) as run:
            return profile(inp, candidates, args, lambda w, c, kw: run(profile_rank, c, **kw), calibration)
    report = _report(small, chosen, runner(inp.world, configs, kwargs), shape, args, calibration)
    config_of = {c.label: (c.config.strategy, c.config.init_kwargs(inp.cluster.ranks_per_node)) for c in chosen}
    confirm_regret(report, getattr(args, "profile_confirm", 0),
                   lambda labels, iters: runner(inp.world, [config_of[x] for x in labels], {**kwargs, "iters": iters}))
    return report


def score(report: ProfileReport, ok: list[Candidate]) -> None:
    """Fill the report's Spearman correlation, regret and the two bests from the candidates
    `ok` (in the planner's order), each measured {seconds, predicted_seconds}."""
    if not ok:
        return
    pred = [c.measured["predicted_seconds"] for c in ok]
    meas = [c.measured["seconds"] for c in ok]
    best_pred = min(ok, key=lambda c: c.measured["predicted_seconds"])
    best_meas = min(ok, key=lambda c: c.measured["seconds"])
    report.spearman = spearman(pred, meas)
    report.regret = best_pred.measured["seconds"] / best_meas.measured["seconds"]
    report.predicted_best, report.measured_best = best_pred.label, best_meas.label


def confirm_regret(report: ProfileReport, iters: int, rerun: Callable[[list[str], int], list[dict]]) -> None:
    """The confirmed regret: 1 when the predicted best measured best; else the two re-measured
    alone, `rerun([predicted_best, measured_best], iters)`, their time ratio (at least 1); not
    re-measured (iters 0, or a failed run): stays nan."""
    if not report.predicted_best:
        return
    if report.predicted_best == report.measured_best:
        report.confirmed_regret = 1.0
    elif iters:
        again = rerun([report.predicted_best, report.measured_best], iters)
        if all("seconds" in r for r in again):
            report.confirmed_regret = max(1.0, again[0]["seconds"] / again[1]["seconds"])


def _report(small: PlanInput, chosen: list[Candidate], results: list[dict], shape: dict, args,
            calibration: Calibration | None) -> ProfileReport:
    for cand, res in zip(chosen, results):
        predicted = evaluate(small, cand.config)
        try:
            pbytes = _predicted_bytes(small, cand.config)
        except ValueError as e:
            pbytes = {"error": str(e)}
        cand.measured = {**res, "predicted_seconds": predicted.attention_time if predicted.valid else None,
                         "predicted_bytes": pbytes, "shape": shape}
    ok = [c for c in chosen if "seconds" in c.measured and c.measured["predicted_seconds"] is not None]
    report = ProfileReport(sorted(chosen, key=lambda c: c.measured.get("seconds", math.inf)), shape,
                           args.profile_iters, args.profile_warmup,
                           calibration=calibration.summary() if calibration else "cluster flags (not calibrated)")
    score(report, ok)
    return report
