"""The mesh around the sequence-parallel group: tensor parallelism, pipeline stages, data replicas.

A candidate (`Config`) runs its strategy on sp = world / (dp x tp x pp) ranks laid out as
seqpar.parallel.ParallelDims lays them out (rank = ((pp_rank x dp + dp_rank) x sp + sp_rank) x
tp + tp_rank: tp innermost, inside a node while tp <= ranks per node). What that changes for
one rank, per microbatch of batch / (dp x microbatches) rows, on the busiest pipeline stage:

- the strategy sees heads / tp and kv_heads / tp (`group_view`);
- compute: the matmuls of layers / pp blocks (plus the LM head on the last stage) / tp;
- Megatron-SP traffic (`tensor_collectives`): per block and pass two all-gathers and two
  reduce-scatters of the [rows, tokens / tp, hidden] shard on the tp group (plan/tensor.py's
  formula, equal to what the runtime counts), exposed;
- pipeline: (m + p - 1) microbatch slots per step, a bubble of (p - 1) / (m + p - 1), one
  activation [rows, tokens / (sp x tp), hidden] to the next stage per microbatch and its
  gradient back (seqpar.pipeline.pipeline_p2p_bytes);
- memory: weights, grads and optimizer states / tp of the stage's share (ZeRO shards them
  further over the dp x sp ranks), activations / tp, times the microbatches in flight (gpipe:
  all m; 1f1b: p - stage, at most m).

Validity is the runtime's: seqpar.tensor_parallel.check_tensor_parallel and
seqpar.pipeline.check_pipeline (what `seqpar train --tp / --pp` checks).
"""
from __future__ import annotations

from dataclasses import replace

from ..pipeline import check_pipeline, pipeline_p2p_bytes
from ..tensor_parallel import check_tensor_parallel
from .candidate import Config
from .inputs import PlanInput
from .stages import Collective, Send, Stage
from .tensor import tensor_parallel_collectives, tensor_parallel_traffic

__all__ = ["PLANNED_SCHEDULES", "divisors", "meshes", "check", "sp_input", "group_view", "microbatch_rows", "in_flight",
           "bubble", "active_stages", "slot_compute_scales",
           "stage_layers", "stage_params", "tensor_collectives", "tensor_step_bytes", "pipeline_sends",
           "pipeline_step_bytes", "norm_params", "norm_grad_collective"]

#: the pipeline schedules the planner models (seqpar.pipeline.PP_SCHEDULES also runs interleaved-1f1b,
#: whose virtual stages the cost model does not describe)
PLANNED_SCHEDULES = ("gpipe", "1f1b")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(inp: PlanInput, tp: tuple[int, ...] | None = None,
           pp: tuple[int, ...] | None = None) -> list[tuple[int, int, int, str, int]]:
    """(dp, tp, pp, schedule, microbatches) worth comparing on the world: tp dividing the world
    and the heads, pp dividing the world and the layers (both schedules, one sequence per
    microbatch: the smallest bubble), dp dividing the batch; `tp` / `pp`: the degrees allowed
    (None: every divisor)."""
    world, m = inp.world, inp.model
    out = []
    for t in divisors(world):
        if (tp is not None and t not in tp) or (tp is None and m.heads % t):
            continue
        for p in divisors(world // t):
            if (pp is not None and p not in pp) or (pp is None and m.layers % p):
                continue
            for d in divisors(world // (t * p)):
                if inp.batch % d:
                    continue
                rows = inp.batch // d
                out += [(d, t, p, s, rows) for s in PLANNED_SCHEDULES] if p > 1 else [(d, t, 1, "gpipe", 1)]
    return out


def check(inp: PlanInput, cfg: Config) -> None:
    """The runtime's checks of the mesh (one-line ValueErrors naming the flag to change)."""
    if cfg.dp * cfg.sp * cfg.tp * cfg.pp != inp.world:
        raise ValueError(f"pp ({cfg.pp}) x dp ({cfg.dp}) x sp ({cfg.sp}) x tp ({cfg.tp}) must equal the number of "
                         f"ranks ({inp.world})")
    if inp.batch % cfg.dp:
        raise ValueError(f"--batch ({inp.batch}) must be divisible by --dp ({cfg.dp})")
    check_tensor_parallel(cfg.tp, inp.model.heads, inp.model.kv_heads, inp.seq_len // cfg.sp)
    if cfg.pp > 1 or cfg.microbatches > 1:
        check_pipeline(cfg.pp, inp.model.layers, inp.batch // cfg.dp, cfg.microbatches, cfg.pp_schedule)
    if cfg.chunked_blocks and (cfg.tp > 1 or cfg.pp > 1):
        raise ValueError("--chunked-blocks runs without --tp and --pp")


def microbatch_rows(inp: PlanInput, cfg: Config) -> int:
    """Sequences per microbatch on one data-parallel replica."""
    return inp.batch // (cfg.dp * cfg.microbatches)


def sp_input(inp: PlanInput, cfg: Config) -> PlanInput:
    """The plan input the candidate's strategy sees (its group, heads / tp, one microbatch)."""
    return group_view(inp, cfg.sp, cfg.tp, microbatch_rows(inp, cfg))


def group_view(inp: PlanInput, sp: int, tp: int = 1, batch: int | None = None) -> PlanInput:
    """What one sequence-parallel group of `sp` ranks sees while `tp` tensor-parallel ranks share
    each of its positions (sp rank r is global rank r x tp): a node holds ranks_per_node / tp of
    its ranks (1 when tp spans nodes) and shares its NICs with all its ranks; each rank attends
    with heads / tp query and kv_heads / tp K/V heads (hidden = heads x head_dim), `batch` rows at
    a time. The strategies' cost models run on it unchanged. Memoised per input (`views`); the tp
    check (check_tensor_parallel) comes first."""
    key = (sp, tp, inp.batch if batch is None else batch)
    if key not in inp.views:
        inp.views[key] = inp if key == (inp.world, 1, inp.batch) else _group_view(inp, *key)
    return inp.views[key]


def _group_view(inp: PlanInput, sp: int, tp: int, batch: int) -> PlanInput:
    cl, m = inp.cluster, inp.model
    per_node = max(1, cl.ranks_per_node // tp)
    nics = None if cl.node_inter_bw is None else cl.node_inter_bw * per_node / cl.ranks_per_node
    cluster = replace(cl, world=sp, ranks_per_node=per_node, node_inter_bw=nics)
    shape = replace(m, hidden=m.hidden // tp, heads=m.heads // tp, kv_heads=m.kv_heads // tp)
    return replace(inp, cluster=cluster, model=shape, batch=batch)


def in_flight(cfg: Config, stage: int) -> int:
    """Microbatches whose activations stage `stage` holds at its peak: gpipe all of them, 1f1b
    the p - stage warm-up forwards (at most m); 1 without a pipeline."""
    if cfg.pp == 1:
        return 1
    return cfg.microbatches if cfg.pp_schedule == "gpipe" else min(cfg.pp - stage, cfg.microbatches)


def bubble(cfg: Config) -> float:
    """Idle fraction of a pipeline step, gpipe and 1f1b alike: (p - 1) / (m + p - 1)."""
    return (cfg.pp - 1) / (cfg.microbatches + cfg.pp - 1)


def active_stages(cfg: Config, slot: int) -> int:
    """Stages computing in pipeline slot `slot` (0 .. m + p - 2) of the wave: the microbatches
    j and stages s with s + j = slot (gpipe's forward and backward waves; 1f1b keeps the same
    count per slot)."""
    m, p = cfg.microbatches, cfg.pp
    return min(slot + 1, p, m, m + p - 1 - slot)


def slot_compute_scales(cfg: Config, world: int, cores: float) -> list[float]:
    """Per pipeline slot, the compute time relative to every rank computing at once, when the
    `world` ranks share `cores` (`Hardware.compute_cores`): a slot's a active stages keep
    a x world / p ranks busy, each at min(1, cores / busy) of its speed alone. Ranks on their
    own devices (cores = world): 1 in every slot; on 4 processes sharing 2 cores the idle
    stages of a bubble give their cores to the busy ones."""
    together = max(1.0, world / cores)
    return [max(1.0, active_stages(cfg, k) * world / cfg.pp / cores) / together
            for k in range(cfg.microbatches + cfg.pp - 1)]


def stage_layers(inp: PlanInput, cfg: Config) -> int:
    return inp.model.layers // cfg.pp


def norm_params(inp: PlanInput) -> int:
    """RMSNorm weights of the model (replicated over tp: their gradients are all-reduced)."""
    return (2 * inp.model.layers + 1) * inp.model.hidden


def last_stage_norm_params(inp: PlanInput, cfg: Config) -> int:
    """Norm weights of the last pipeline stage (its blocks' two each and the final norm): the
    busiest stage's once-per-step gradient all-reduce over tp."""
    return (2 * stage_layers(inp, cfg) + 1) * inp.model.hidden


def stage_params(inp: PlanInput, cfg: Config, stage: int) -> float:
    """Parameters one rank of stage `stage` holds: its blocks' matmuls / tp and norms, the
    embedding (first stage) and the final norm and LM head (last stage), vocabulary-sharded."""
    m = inp.model
    layers = stage_layers(inp, cfg)
    params = layers * (m.config.layer_matmul_params() / cfg.tp + 2 * m.hidden)
    if stage == 0:
        params += m.vocab * m.hidden / cfg.tp
    if stage == cfg.pp - 1:
        params += m.vocab * m.hidden / cfg.tp + m.hidden
    return params


def _tp_group(cfg: Config) -> tuple[int, ...]:
    return tuple(range(cfg.tp))


def _tp_tokens(inp: PlanInput, cfg: Config) -> int:
    """Rows x tokens of one microbatch on one sp rank (before the tp split)."""
    return microbatch_rows(inp, cfg) * (inp.seq_len // cfg.sp)


def tensor_collectives(inp: PlanInput, cfg: Config) -> list[Stage]:
    """The tensor-parallel collectives of one microbatch on the busiest stage (fwd + bwd,
    recompute included; the once-per-step gradient all-reduce of the norms is not here)."""
    if cfg.tp == 1:
        return []
    # the last stage (LM head and loss) is the busiest; without a pipeline it has the embedding too
    return tensor_parallel_collectives(
        group=_tp_group(cfg), n_layers=stage_layers(inp, cfg), dim=inp.model.hidden, tokens=_tp_tokens(inp, cfg),
        act_bytes=inp.itemsize, loss_bytes=4, recompute=inp.checkpointing, embedding=cfg.pp == 1, head=True)


def norm_grad_collective(inp: PlanInput, cfg: Config) -> list[Stage]:
    """The once-per-step all-reduce of the busiest stage's norm weights' gradients over tp."""
    if cfg.tp == 1:
        return []
    return [Collective("all_reduce", last_stage_norm_params(inp, cfg), inp.itemsize, _tp_group(cfg), "bwd",
                       "norm_grads")]


def tensor_step_bytes(inp: PlanInput, cfg: Config) -> dict[str, int]:
    """Bytes one rank of the busiest pipeline stage (the last: LM head, loss, final norm) sends
    per training step over tp, by kind, as the runtime counts them
    (seqpar.tensor_parallel.TensorParallelTraffic; plan/tensor.py's formula; pp = 1: the whole model)."""
    if cfg.tp == 1:
        return {}
    layers = stage_layers(inp, cfg)  # the busiest stage: the last (LM head, loss, final norm)
    per = tensor_parallel_traffic(tp=cfg.tp, n_layers=layers, dim=inp.model.hidden,
                                  tokens=_tp_tokens(inp, cfg), act_bytes=inp.itemsize, loss_bytes=4,
                                  norm_params=last_stage_norm_params(inp, cfg), param_bytes=inp.itemsize,
                                  recompute=inp.checkpointing, fsdp=inp.zero >= 3, embedding=cfg.pp == 1)
    return {k: v * (1 if k == "tp_grad_all_reduce" else cfg.microbatches) for k, v in per.items()}


def _pp_tokens(inp: PlanInput, cfg: Config) -> int:
    """Tokens of a stage's activation on one rank: sequence-sharded over sp and (Megatron-SP) tp."""
    return inp.seq_len // (cfg.sp * cfg.tp)


def pipeline_step_bytes(inp: PlanInput, cfg: Config, stage: int) -> int:
    """P2P bytes a rank of stage `stage` sends per training step (seqpar.pipeline's count)."""
    if cfg.pp == 1:
        return 0
    sent, _ = pipeline_p2p_bytes(stage, cfg.pp, microbatch_rows(inp, cfg), _pp_tokens(inp, cfg), inp.model.hidden,
                                 inp.itemsize, cfg.microbatches)
    return sent


def pipeline_sends(inp: PlanInput, cfg: Config) -> tuple[tuple[int, ...], Send]:
    """(ranks of two neighbouring stages, the activation one microbatch sends forward; its
    gradient comes back the same size) of the busiest stage."""
    stride = inp.world // cfg.pp
    act = microbatch_rows(inp, cfg) * _pp_tokens(inp, cfg) * inp.model.hidden
    return (0, stride), Send(act, inp.itemsize, "pp_activation")
