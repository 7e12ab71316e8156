"""`seqpar train --strategy auto`: the calibrated planner picks the strategy (and the mesh) of the run.

The run's model, sequence, batch, dtype and memory become a `seqpar.plan.PlanInput` on the
world / dp ranks of one data-parallel replica; the hardware numbers come from a calibration of
this world (`--calibration FILE`, written by `seqpar plan --calibrate`; without one the
launcher measures the local world once and keeps it in `<out_dir>/calibration.json`). Unless
the run fixes them (--tp, --sp, or --pp > 1), the planner also chooses the tensor-parallel
degree and the pipeline stages (with schedule and microbatches) around the sequence-parallel
group. The fastest candidate that fits memory and that the trainer accepts (`TrainConfig.validate`:
the one check of every option, e.g. --pp runs fp32/fp64 without --tp) is chosen (ties broken by
the planner's order, so the same calibration always gives the same choice); its `seqpar.init`
arguments replace the strategy flags and its tp / pp / pp_schedule / microbatches the mesh
flags. `choose` returns the new config and a line saying what was picked, the runner-up and why.
"""
from __future__ import annotations

import os

import torch

from ..attention import StrategyOptions
from ..plan import Calibration, Cluster, ModelShape, PlanInput, fit_suggestions, format_suggestions, measure, plan
from ..plan.memory import loss_piece_tokens
from ..plan.worlds import open_world
from .config import TrainConfig

__all__ = ["plan_input", "choose", "runnable_candidates", "describe_choice", "needs_no_plan", "local_memory_gib",
           "ensure_calibration"]


def local_memory_gib(processes: int) -> float:
    """Memory one of `processes` local ranks may use: the GPU's, or the host's share."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / max(1, processes) / 2 ** 30


def _model_shape(cfg: TrainConfig):
    if cfg.model.kind == "dit":
        d = cfg.dit_config()
        # GELU MLP (2 matrices of mlp_hidden) = SwiGLU's 3 matrices of 2/3 the width; patches ~ vocab
        return ModelShape(d.n_layers, d.dim, d.n_heads, d.n_kv_heads, max(1, 2 * d.mlp_hidden // 3), d.patch_dim)
    m = cfg.model_config()  # built-in or --hf-model
    return ModelShape(m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab_size)


def planned_ranks(cfg: TrainConfig, world: int) -> int:
    """The ranks the planner arranges: one data-parallel replica's (sp x tp x pp)."""
    return world // cfg.parallel.dp


def mesh_choices(cfg: TrainConfig) -> dict:
    """The tp and pp degrees the planner may choose: the run's own when it fixes the mesh
    (--tp, --sp or --pp > 1 given), else every one (None)."""
    par = cfg.parallel
    if par.tp > 1 or par.pp > 1 or par.sp is not None:
        return {"tp": (par.tp,), "pp": (par.pp,)}
    return {"tp": None, "pp": None}


def plan_input(cfg: TrainConfig, world: int, calibration, ranks_per_node: int | None = None,
               memory_gib: float | None = None):
    """The planner's view of this run on the ranks of one data-parallel replica (needs >= 2);
    memory per rank: this machine's (`local_memory_gib`) unless given."""
    ranks = planned_ranks(cfg, world)
    rpn = min(ranks, ranks_per_node or ranks)
    memory_gib = memory_gib or local_memory_gib(rpn * cfg.parallel.dp)
    cluster = Cluster(ranks, rpn, memory_gib=memory_gib, calibration=calibration)
    causal = cfg.model.kind != "dit"
    every_layer = causal and cfg.model.window and not cfg.model.local_global  # windows in every layer
    return PlanInput(cluster, _model_shape(cfg), cfg.sequence_length(), cfg.data.batch, cfg.optim.dtype,
                     causal=causal, zero=3 if cfg.parallel.fsdp else 0,
                     checkpointing=cfg.model.activation_checkpointing or cfg.model.offload_activations,
                     window=cfg.model.window if every_layer else None)


def _why(best, other) -> str:
    """What makes `best` faster than `other`, from the planner's numbers."""
    reasons = []
    if best.exposed_comm_time < other.exposed_comm_time:
        reasons.append(f"{1e3 * (other.exposed_comm_time - best.exposed_comm_time):.2f} ms less exposed "
                       "communication per layer")
    if best.attention_time < other.attention_time:
        reasons.append(f"attention {1e3 * best.attention_time:.2f} vs {1e3 * other.attention_time:.2f} ms per layer")
    if best.total_comm_bytes < other.total_comm_bytes:
        reasons.append(f"{best.total_comm_bytes / 2 ** 20:.1f} vs {other.total_comm_bytes / 2 ** 20:.1f} MiB sent "
                       "per layer")
    if best.step_time == other.step_time:
        return "a tie: the same predicted time, first in the planner's fixed order"
    return "; ".join(reasons) or "lower predicted step time"


def runnable_candidates(cfg: TrainConfig, world: int, calibration, ranks_per_node: int | None = None,
                        memory_gib: float | None = None) -> list[tuple]:
    """(planner Candidate, the run with its strategy and mesh) for every candidate that fits
    memory and that the trainer accepts (`TrainConfig.validate`), fastest predicted first;
    a one-line ValueError when none does (what to change, from the planner's fit suggestions)."""
    mesh = mesh_choices(cfg)
    inp = plan_input(cfg, world, calibration, ranks_per_node, memory_gib)
    candidates = [c for c in plan(inp, **mesh) if not c.config.chunked_blocks or cfg.chunked_blocks_apply()]
    fitting = [c for c in candidates if c.valid and c.fits]
    if not fitting:
        try:
            hint = format_suggestions(inp, fit_suggestions(inp, candidates, **mesh))
        except ValueError:  # e.g. more ranks than the calibration's node measured
            hint = ("try --offload-activations, --strategy fpdt with --chunks and --offload, --fsdp, a shorter "
                    "--seq-len or more ranks")
        raise ValueError(f"--strategy auto: no strategy fits this run in {inp.cluster.memory_gib:.1f} GiB per rank: "
                         + " ".join(hint.split()))
    tried = [(c, *_run_config(cfg, world, inp, c, ranks_per_node)) for c in fitting]
    runnable = [(c, chosen) for c, chosen, _ in tried if chosen is not None]
    if not runnable:
        raise ValueError(f"--strategy auto: the trainer refuses every candidate that fits (first: {fitting[0].label}: "
                         f"{tried[0][2]})")
    return runnable


def needs_no_plan(cfg: TrainConfig, world: int) -> bool:
    """One rank per replica (or an sp of 1 fixed by the mesh flags): nothing to plan."""
    return planned_ranks(cfg, world) < 2 or (mesh_choices(cfg)["tp"] is not None and cfg.sp_size(world) < 2)


def choose(cfg: TrainConfig, world: int, calibration, ranks_per_node: int | None = None,
           memory_gib: float | None = None) -> tuple[TrainConfig, str]:
    """(cfg with the planner's best fitting strategy and mesh, a one-line explanation)."""
    if needs_no_plan(cfg, world):
        return cfg.with_strategy("local", StrategyOptions()), "--strategy auto: sp = 1, no sequence parallelism (local)"
    runnable = runnable_candidates(cfg, world, calibration, ranks_per_node, memory_gib)
    return runnable[0][1], describe_choice(runnable, calibration)


def describe_choice(runnable: list[tuple], calibration) -> str:
    """One line: the planner's pick (the first runnable candidate), the runner-up and why."""
    fitting = [c for c, _ in runnable]
    best = fitting[0]
    line = (f"--strategy auto picked {best.label} (predicted {best.step_time:.3g} s/step, "
            f"{best.memory.get('total', 0) / 2 ** 30:.2f} GiB/rank)")
    if len(fitting) > 1:
        runner = fitting[1]
        line += (f"; runner-up {runner.label} ({runner.step_time:.3g} s/step, "
                 f"{100 * (runner.step_time / best.step_time - 1):+.1f}%): {_why(best, runner)}")
    return line + f" [{calibration.summary() if calibration else 'flag hardware'}]"


def _chosen_config(cfg: TrainConfig, inp, best, ranks_per_node: int | None) -> TrainConfig:
    """The run with the candidate's strategy options and mesh (dp stays the run's)."""
    options = StrategyOptions.from_kwargs(**best.config.init_kwargs(ranks_per_node))
    chosen = cfg.with_strategy(best.config.strategy, options).replace(auto_profile=0)  # resolved: nothing to measure
    c = best.config
    if mesh_choices(cfg)["tp"] is None:
        chosen = chosen.replace(tp=c.tp, pp=c.pp, pp_schedule=c.pp_schedule, microbatches=c.microbatches)
    if c.chunked_blocks:
        chosen = _with_chunked_blocks(chosen, inp, c)
    return chosen


def _run_config(cfg: TrainConfig, world: int, inp, best, ranks_per_node: int | None) -> tuple[TrainConfig | None, str]:
    """(the chosen run, "") or (None, why the trainer refuses it: TrainConfig.validate's message)."""
    try:
        chosen = _chosen_config(cfg, inp, best, ranks_per_node)
        chosen.validate(world)
    except ValueError as e:
        return None, str(e)
    return chosen, ""


def _with_chunked_blocks(cfg: TrainConfig, inp, config) -> TrainConfig:
    """The run as the planner modelled the chunked-block candidate: --chunked-blocks, block
    checkpointing as --offload-activations, the loss in pieces of `loss_piece_tokens`."""
    tokens = inp.batch * inp.tokens_per_rank
    loss_chunks = max(cfg.model.loss_chunks, -(-tokens // loss_piece_tokens(inp, config)))
    return cfg.replace(chunked_blocks=True, loss_chunks=loss_chunks, activation_checkpointing=False,
                       offload_activations=cfg.model.offload_activations or cfg.model.activation_checkpointing)


def ensure_calibration(cfg: TrainConfig, world: int):
    """The calibration of this run's world: --calibration, or <out_dir>/calibration.json, or a
    fresh measurement of the local world (saved there for the next run)."""
    path = cfg.calibration_path()
    if path.is_file():
        return Calibration.load(path)
    if cfg.parallel.calibration:
        raise FileNotFoundError(f"--calibration {cfg.parallel.calibration!r} does not exist (write one with "
                                "seqpar plan --calibrate)")
    shape = _model_shape(cfg)
    ranks = planned_ranks(cfg, world)
    with open_world(ranks) as run:
        cal = measure(run, ranks, dtypes=(cfg.optim.dtype,), heads=max(1, shape.heads // shape.kv_heads), kv_heads=1,
                      head_dim=shape.hidden // shape.heads, repeats=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    return cal
