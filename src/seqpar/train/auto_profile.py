"""`--strategy auto --auto-profile K`: measure the planner's best K runnable candidates as
whole training steps, hybrid meshes included, and train the measured fastest.

`seqpar plan --profile` times one attention layer per candidate, which cannot compare a tp or
pp mesh (tensor parallelism changes the dense layers and adds its own collectives; pipeline
stages add a bubble). Here every candidate is a `Trainer` of the run itself (its model, batch,
sequence, dtype, with the candidate's strategy and mesh) on the run's world, and its step is
what the planner predicts (`Candidate.step_time`, on the same calibration). The candidates'
steps are interleaved as in `seqpar plan --profile`: after `warmup` steps of each, step i of
every candidate runs before step i+1 of any, each from a barrier; a candidate's time is the
median over steps of the slowest rank's step. The report (`seqpar.plan.ProfileReport`) gives
predicted and measured seconds per step, the Spearman rank correlation, the regret (measured
step of the predicted best / the measured best) and, when they differ, the confirmed regret
(the two measured again on their own, `confirm` steps each).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..comm import Comm, CommStats
from ..plan.profiling import ProfileReport, backend_device, confirm_regret, score
from ..plan.worlds import open_world
from .auto import runnable_candidates
from .config import TrainConfig
from .trainer import Trainer

__all__ = ["profile_steps_rank", "profile_candidates", "measured_choice", "choose_by_measurement",
           "format_step_profile"]

Runner = Callable[[list[TrainConfig], int, int], list[dict]]


def _max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise max over the world's ranks (a control comm: not counted in any run's stats)."""
    t = torch.tensor(values, dtype=torch.float64, device=backend_device())
    Comm(None, CommStats()).all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _busiest(sent: dict[str, int]) -> dict[str, int]:
    """Per kind, the most any rank sent (what the planner predicts: its busiest rank or stage)."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sent)
    return {k: max(d.get(k, 0) for d in every) for k in sorted({k for d in every for k in d})}


def _timed_step(trainer: Trainer) -> tuple[float, dict]:
    """(seconds of one training step started from a barrier, its metrics record)."""
    dist.barrier()
    t0 = time.perf_counter()
    record = trainer.train_step()
    return time.perf_counter() - t0, record


def profile_steps_rank(configs: list[TrainConfig], steps: int, warmup: int) -> list[dict]:
    """Per rank: build a Trainer of every config (one that raises ValueError is reported as
    {"error"}; the same on every rank), run `warmup` steps of each, then `steps` interleaved
    timed steps. Returns per config {"seconds": median of the per-step max over ranks,
    "times": those maxima, "bytes": per kind, the most a rank sent in its last step}
    (the same list on every rank)."""
    trainers, results = [], []
    for cfg in configs:
        try:
            trainers.append(Trainer(cfg))
            results.append(None)
        except ValueError as e:
            results.append({"error": f"ValueError: {e}"})
    try:
        records = {id(t): {} for t in trainers}
        for _ in range(warmup):
            for t in trainers:
                t.train_step()
        times = {id(t): [] for t in trainers}
        for _ in range(steps):
            for t in trainers:
                seconds, record = _timed_step(t)
                times[id(t)].append(seconds)
                records[id(t)] = {k: v for k, v in record["comm"].items() if v}
    finally:
        for t in trainers:
            t.task.close()
    it = iter(trainers)
    for i, res in enumerate(results):
        if res is None:
            t = next(it)
            maxima = _max_over_ranks(times[id(t)])
            results[i] = {"seconds": statistics.median(maxima), "times": maxima, "bytes": _busiest(records[id(t)])}
    return results


def _local_runner(world: int) -> Runner:
    def run(configs: list[TrainConfig], steps: int, warmup: int) -> list[dict]:
        with open_world(world) as run_on_world:
            return run_on_world(profile_steps_rank, configs, steps, warmup)
    return run


def profile_candidates(runs: list[tuple], world: int, *, steps: int, warmup: int = 1, confirm: int = 0,
                       runner: Runner | None = None) -> ProfileReport:
    """Measure (planner Candidate, its TrainConfig) pairs, in the planner's order, as training
    steps on `world` ranks (runner(configs, steps, warmup) -> per config result; default: a
    local world, or the running torchrun world) and compare with the predicted steps."""
    if steps < 1 or warmup < 0 or confirm < 0:
        raise ValueError(f"--auto-profile-steps must be >= 1 (got {steps}), warmup and confirm >= 0")
    runner = runner or _local_runner(world)
    results = runner([cfg for _, cfg in runs], steps, warmup)
    chosen = []
    for (cand, cfg), res in zip(runs, results):
        cand.measured = {**res, "predicted_seconds": cand.step_time, "config": cfg.to_dict()}
        chosen.append(cand)
    shape = {"seq": runs[0][1].sequence_length(), "batch": runs[0][1].data.batch, "dtype": runs[0][1].optim.dtype,
             "world": world, "what": "training step"} if runs else {}
    report = ProfileReport(sorted(chosen, key=lambda c: c.measured.get("seconds", math.inf)), shape, steps, warmup,
                           calibration="the run's calibration")
    score(report, [c for c in chosen if "seconds" in c.measured])
    config_of = {c.label: cfg for c, cfg in runs}
    confirm_regret(report, confirm, lambda labels, iters: runner([config_of[x] for x in labels], iters, warmup))
    return report


def measured_choice(report: ProfileReport, runs: list[tuple]) -> tuple:
    """The (Candidate, TrainConfig) of the measured best; with a confirmation that did not
    confirm it (confirmed regret 1: the re-measured pair ran equally), the planner's pick."""
    by_label = {c.label: (c, cfg) for c, cfg in runs}
    if not report.measured_best:
        return runs[0]
    if report.measured_best != report.predicted_best and report.confirmed_regret == 1.0:
        return by_label[report.predicted_best]
    return by_label[report.measured_best]


def format_step_profile(report: ProfileReport) -> str:
    """The report as a table: predicted and measured seconds per step of each candidate."""
    sh = report.shape
    lines = [f"auto-profile: {report.iters} training steps of each candidate (after {report.warmup} warm-up), "
             f"seq {sh.get('seq')} batch {sh.get('batch')} {sh.get('dtype')} on {sh.get('world')} ranks",
             f"  {'candidate':<48} {'predicted':>11} {'measured':>11}"]
    for c in report.candidates:
        m = c.measured or {}
        got = f"{m['seconds']:.4g} s" if "seconds" in m else m.get("error", "-")
        lines.append(f"  {c.label:<48} {c.step_time:>9.4g} s {got:>11}")
    lines.append(f"Spearman {report.spearman:.3f}; regret {report.regret:.3f} (predicted best {report.predicted_best}, "
                 f"measured best {report.measured_best}); confirmed regret {report.confirmed_regret:.3f}")
    return "\n".join(lines)


def profiled_candidates(runnable: list[tuple], top: int) -> list[tuple]:
    """The planner's best `top` runnable candidates and the best of every other tp x pp mesh
    (a profile then also says whether the mesh was right), in the planner's order."""
    chosen, meshes = [], set()
    for i, (cand, run) in enumerate(runnable):
        mesh = (cand.config.tp, cand.config.pp)
        if i < top or mesh not in meshes:
            chosen.append((cand, run))
        meshes.add(mesh)
    return chosen


def profiled_runs(runnable: list[tuple], cfg: TrainConfig, data: str) -> list[tuple]:
    """(Candidate, run) pairs as the profile trains them: on `data`, each writing under
    <out_dir>/auto_profile/<i> (never the run's own files), no evaluation, checkpoints or plots."""
    out = Path(cfg.output.out_dir) / "auto_profile"
    return [(c, run.replace(data=data, out_dir=str(out / str(i)), checkpoint_every=0, eval_every=0, progress=False,
                            plot=False, tensorboard=False, resume=""))
            for i, (c, run) in enumerate(runnable)]


def choose_by_measurement(cfg: TrainConfig, world: int, calibration, data: str, ranks_per_node: int | None = None,
                          runner: Runner | None = None, write: bool = True) -> tuple[TrainConfig, ProfileReport, str]:
    """--auto-profile K: (the measured fastest of the planner's best K runnable candidates as
    the run to train, the report, one line saying what was picked against the planner's pick).
    `write`: the report goes to <out_dir>/auto_profile.json."""
    runnable = profiled_candidates(runnable_candidates(cfg, world, calibration, ranks_per_node),
                                   cfg.parallel.auto_profile)
    runs = profiled_runs(runnable, cfg, data)
    steps = cfg.parallel.auto_profile_steps
    report = profile_candidates(runs, world, steps=steps, warmup=1, confirm=steps, runner=runner)
    if not report.measured_best:
        raise ValueError("--auto-profile: no candidate trained: " + "; ".join(
            f"{c.label}: {c.measured.get('error')}" for c in report.candidates))
    candidate, _ = measured_choice(report, runs)
    chosen = {id(c): run for c, run in runnable}[id(candidate)]
    if write:
        out = Path(cfg.output.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "auto_profile.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    line = (f"--strategy auto --auto-profile {cfg.parallel.auto_profile} picked {candidate.label} (measured "
            f"{candidate.measured['seconds']:.3g} s/step, predicted {candidate.step_time:.3g}; the planner's pick "
            f"{report.predicted_best}, regret {report.regret:.3f}, confirmed {report.confirmed_regret:.3f})")
    return chosen, report, line
