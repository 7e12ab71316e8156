"""The candidates, their evaluation and the ranking.

`candidate_configs` asks every registered strategy with a cost model (seqpar.plan.costs)
for its candidates (`Strategy.candidates`: degrees x layouts) and resolves them as
`seqpar.init` would; `evaluate` predicts one candidate's step time, bytes and memory from
its cost model, `plan` ranks them all. `paper_block_volume` recounts a schedule the way the
WallFacer paper does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..attention import StrategyOptions, get_strategy
from . import hybrid
from . import memory as mem
from . import validity as val
from .candidate import Config
from .costs import config_cost_model, cost_model, planned_strategies
from .inputs import GiB, Hardware, PlanInput
from .stages import Collective, Compute, RingLoop, Stage, bytes_by_kind, max_bytes_by_kind

__all__ = ["FPDT_CHUNKS", "Candidate", "attention_schedule", "attention_bytes", "paper_block_volume",
           "candidate_configs", "evaluate", "memory_fits", "plan"]

DENSE_BWD_FACTOR = 2.0  # backward of a linear layer: grad input + grad weight


def attention_schedule(inp: PlanInput, cfg: Config, rank: int = 0) -> list[Stage]:
    """The stages of one attention layer (fwd + bwd) on `rank` of its sp group (one microbatch);
    raises ValueError if invalid."""
    model = config_cost_model(cfg)
    val.check(inp, cfg)
    return model.schedule(hybrid.sp_input(inp, cfg), cfg, rank)


def attention_bytes(inp: PlanInput, cfg: Config, rank: int = 0, phase: str | None = None) -> dict[str, int]:
    """Bytes `rank` sends per collective kind in one attention layer (CommStats' accounting)."""
    return bytes_by_kind(attention_schedule(inp, cfg, rank), phase)


# -- the paper's per-block volume (WallFacer, arXiv 2407.00611, "costs per block per rank") -----------
def paper_block_volume(inp: PlanInput, cfg: Config, rank: int = 0) -> dict[str, float]:
    """Forward communication of one transformer block on one rank, as the WallFacer paper
    counts it: elements x activation dtype size (accumulator dtypes and the tiny LSE
    exchanges are not counted); a (sub-)ring contributes one K/V block per loop step,
    i.e. all the K/V the rank streams through its loop (ring: P blocks although the own
    block is never sent; WallFacer: P/C^2 team blocks, the first one delivered by the
    initial placement). Returns {"collective": bytes, "p2p": bytes}."""
    vol = {"collective": 0.0, "p2p": 0.0}
    for stage in attention_schedule(inp, cfg, rank):
        if stage.phase != "fwd":
            continue
        if isinstance(stage, Collective) and stage.what != "lse":
            vol["collective"] += stage.elems * inp.itemsize * _collective_factor(stage)
        elif isinstance(stage, RingLoop) and len(stage.steps.items) > 1:
            vol["p2p"] += len(stage.steps.items) * stage.steps.block_elems * inp.itemsize
    return vol


def _collective_factor(c: Collective) -> float:
    n = len(c.group)
    return {"all_to_all": (n - 1) / n, "all_reduce": 2 * (n - 1) / n}.get(c.kind, n - 1)


# -- candidates --------------------------------------------------------------------------------
@dataclass
class Candidate:
    config: Config
    valid: bool = True
    reason: str = ""
    step_time: float = math.inf            # seconds per training step (the batch)
    attention_time: float = 0.0            # seconds per layer and microbatch, fwd + bwd, incl. its communication
    exposed_comm_time: float = 0.0         # seconds per layer and microbatch of attention time not hidden by compute
    comm_bytes: dict[str, int] = field(default_factory=dict)  # attention: per kind, max over ranks, per layer
    # and microbatch fwd + bwd
    mesh_bytes: dict[str, int] = field(default_factory=dict)  # tp_* and pp_p2p bytes per rank per step (busiest)
    mesh_time: float = 0.0                 # seconds per step of exposed tp collectives and pipeline sends
    bubble: float = 0.0                    # idle fraction of a pipeline step
    host_bytes: int = 0                    # host<->device copies per layer (offload), max over ranks
    memory: dict[str, float] = field(default_factory=dict)    # bytes per rank
    fits: bool = False
    speedup_vs_ring: float | None = None
    measured: dict | None = None           # filled by `seqpar plan --profile`

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def total_comm_bytes(self) -> int:
        return sum(self.comm_bytes.values())

    def to_dict(self) -> dict:
        c = self.config
        return {"label": self.label, "strategy": c.strategy, "init_kwargs": c.init_kwargs(), "valid": self.valid,
                "reason": self.reason, "step_time_s": self.step_time if self.valid else None,
                "attention_time_per_layer_s": self.attention_time, "exposed_comm_per_layer_s": self.exposed_comm_time,
                "comm_bytes_per_layer": self.comm_bytes, "host_bytes_per_layer": self.host_bytes,
                "mesh": c.mesh_kwargs(), "mesh_bytes_per_step": self.mesh_bytes,
                "mesh_seconds_per_step": self.mesh_time, "pipeline_bubble": self.bubble,
                "memory_bytes": self.memory, "fits": self.fits,
                "speedup_vs_ring": self.speedup_vs_ring, "measured": self.measured}


FPDT_CHUNKS = (1, 2, 4, 8)


def candidate_configs(inp: PlanInput, strategies: list[str] | None = None,
                      chunks: tuple[int, ...] = FPDT_CHUNKS, tp: tuple[int, ...] | None = None,
                      pp: tuple[int, ...] | None = None) -> list[Config]:
    """Every mesh (seqpar.plan.hybrid.meshes: tp x pp x dp, sp the rest of the world) x strategy x
    degree x layout worth considering (invalid ones included, to be reported): each strategy's
    own `candidates` on sp ranks, resolved; where sp = 1, local attention; a strategy with a
    per-chunk block pipeline (FPDT) also as that pipeline where it chunks and offloads (without
    tp and pp). `chunks`: the FPDT chunk counts to consider; `tp` / `pp`: the degrees (None: all)."""
    names = planned_strategies() if strategies is None else strategies
    for name in names:
        cost_model(name)  # a clear error for a strategy the planner cannot model
    out = []
    for dp, t, p, schedule, microbatches in hybrid.meshes(inp, tp, pp):
        sp = inp.world // (dp * t * p)
        mesh = dict(tp=t, pp=p, dp=dp, pp_schedule=schedule, microbatches=microbatches)
        if sp == 1:
            out.append(Config(get_strategy("local").resolve(StrategyOptions(), 1), **mesh))
            continue
        for name in names:
            cls = get_strategy(name)
            configs = [Config(cls.resolve(options, sp), **mesh) for options in cls.candidates(sp, inp.causal, chunks)]
            out += configs
            if cls.block_pipeline and t == p == 1:
                out += [replace(c, chunked_blocks=True) for c in configs if c.chunks > 1 and c.offload]
    return out


# -- evaluation and ranking --------------------------------------------------------------------
def _dense_seconds(inp: PlanInput, cfg: Config) -> float:
    """Projections, MLP and LM head of one microbatch on one rank of the busiest (last) stage,
    forward + backward (seqpar.model.ModelConfig's matmul FLOPs: layers / pp blocks and the head,
    / tp), every rank computing at once."""
    m, group = inp.model.config, hybrid.sp_input(inp, cfg)
    tokens = group.batch * group.tokens_per_rank
    per_token = 2.0 * (hybrid.stage_layers(inp, cfg) * m.layer_matmul_params() + m.dim * m.vocab_size) / cfg.tp
    return (1 + DENSE_BWD_FACTOR) * tokens * per_token / inp.hardware.matmul_flops_per_s


def evaluate(inp: PlanInput, cfg: Config) -> Candidate:
    """Predict step time, bytes and memory of one configuration (invalid -> valid=False + reason).

    One microbatch on the busiest pipeline stage takes layers / pp x (attention layer) + dense
    matmuls + recompute + exposed tp collectives + the stage's activation sends; a step runs
    m + p - 1 such slots (the bubble: p - 1 of them; on ranks sharing cores a slot's compute runs
    faster while stages idle, `hybrid.slot_compute_scales`), then the exposed gradient / ZeRO traffic."""
    model = config_cost_model(cfg)
    try:
        val.check(inp, cfg)
        group = hybrid.sp_input(inp, cfg)
        schedules = [model.schedule(group, cfg, r) for r in range(group.world)]
        memory = _memory(inp, cfg)
    except ValueError as e:
        return Candidate(cfg, valid=False, reason=str(e))
    hw, cl = group.hardware, inp.cluster
    attn = max(sum(_stage_seconds(s, hw) for s in stages) for stages in schedules)
    compute = max(sum(_compute_seconds(s, hw) for s in stages) for stages in schedules)
    dense = _dense_seconds(inp, cfg)
    mesh, mesh_bytes = _mesh_seconds(inp, cfg)
    layers = hybrid.stage_layers(inp, cfg)
    slot_compute = layers * compute + dense + _recompute_seconds(inp, cfg, schedules, dense, hw)
    slot_other = layers * (attn - compute) + mesh  # exposed communication
    scales = hybrid.slot_compute_scales(cfg, inp.world, inp.hardware.compute_cores)
    slots = len(scales)
    step = sum(scales) * slot_compute + slots * slot_other + _state_sync_seconds(inp, cfg, cfg.microbatches * dense)
    host = max(sum(s.host_bytes for s in stages if isinstance(s, Compute)) for stages in schedules)
    return Candidate(cfg, step_time=step, attention_time=attn, exposed_comm_time=attn - compute,
                     comm_bytes=max_bytes_by_kind(schedules), host_bytes=host, memory=memory,
                     fits=memory["total"] <= cl.memory_gib * GiB, mesh_bytes=mesh_bytes, mesh_time=slots * mesh,
                     bubble=hybrid.bubble(cfg))


def _mesh_seconds(inp: PlanInput, cfg: Config) -> tuple[float, dict[str, int]]:
    """(seconds per microbatch of the exposed tp collectives and the stage's activation send
    and gradient receive, bytes per rank per step by kind). The norms' once-per-step gradient
    all-reduce is spread over the microbatches."""
    hw = inp.hardware
    seconds = sum(_stage_seconds(c, hw) for c in hybrid.tensor_collectives(inp, cfg))
    seconds += sum(_stage_seconds(c, hw) for c in hybrid.norm_grad_collective(inp, cfg)) / cfg.microbatches
    out = dict(hybrid.tensor_step_bytes(inp, cfg))
    if cfg.pp > 1:
        pair, send = hybrid.pipeline_sends(inp, cfg)
        seconds += 2 * hw.p2p_link(pair).seconds("p2p", 2, send.nbytes)  # activation out, its gradient back
        out["pp_p2p"] = max(hybrid.pipeline_step_bytes(inp, cfg, s) for s in range(cfg.pp))
    return seconds, out


def _recompute_seconds(inp: PlanInput, cfg: Config, schedules, dense: float, hw: Hardware) -> float:
    """Forward work done again in backward. Activation checkpointing: every block's forward
    (attention and matmuls). FPDT's chunked blocks: the matmuls of every block (projections
    and MLP, per chunk), not the attention, whose outputs wait in host memory; checkpointed
    on top (--offload-activations) its chunk loop runs once more as well: projections and
    attention (counted as the block's whole forward)."""
    dense_fwd = dense / (1 + DENSE_BWD_FACTOR)
    seconds = dense_fwd if cfg.chunked_blocks else 0.0
    if inp.checkpointing:
        seconds += dense_fwd + hybrid.stage_layers(inp, cfg) * max(
            sum(_stage_seconds(s, hw) for s in stages if s.phase == "fwd") for stages in schedules)
    return seconds


def _state_sync_seconds(inp: PlanInput, cfg: Config, dense: float) -> float:
    """Exposed data-parallel traffic of one step over the dp x sp ranks of one tp rank and stage
    (seqpar.parallel's batch group), of that rank's parameters. Default: one all-reduce of the
    gradients, hidden under the dense backward (`dense`: the step's dense seconds). With
    `Cluster.zero_traffic`: ZeRO-3 all-gathers the weights in forward and again in backward and
    reduce-scatters the gradients (other stages: the all-reduce), prefetched under all the
    dense compute."""
    hw, cl = inp.hardware, inp.cluster
    params = int(max(hybrid.stage_params(inp, cfg, s) for s in {0, cfg.pp - 1}))
    shards = cfg.dp * cfg.sp
    group = tuple(range(0, shards * cfg.tp, cfg.tp))
    if not cl.zero_traffic:
        grads = Collective("all_reduce", params, inp.itemsize, group, "bwd", "grads")
        return max(0.0, grads.seconds(hw) - DENSE_BWD_FACTOR / (1 + DENSE_BWD_FACTOR) * dense)
    if inp.zero >= 3:
        calls = [Collective("all_gather", params // shards, inp.itemsize, group, "fwd", "weights"),
                 Collective("all_gather", params // shards, inp.itemsize, group, "bwd", "weights"),
                 Collective("reduce_scatter", params // shards, inp.itemsize, group, "bwd", "grads")]
    else:
        calls = [Collective("all_reduce", params, inp.itemsize, group, "bwd", "grads")]
    return max(0.0, sum(c.seconds(hw) for c in calls) - dense)


@lru_cache(maxsize=65536)
def _stage_seconds(stage: Stage, hw: Hardware) -> float:
    """Memoised: ranks running the same stage on equal groups share the result."""
    return stage.seconds(hw)


def _compute_seconds(stage: Stage, hw: Hardware) -> float:
    return stage.compute_seconds(hw) if isinstance(stage, (RingLoop, Compute)) else 0.0


def memory_fits(inp: PlanInput, cfg: Config) -> bool:
    """Whether a valid candidate fits device memory (the memory model only, no timing)."""
    try:
        val.check(inp, cfg)
        total = _memory(inp, cfg)["total"]
    except ValueError:
        return False
    return total <= inp.cluster.memory_gib * GiB


def _memory(inp: PlanInput, cfg: Config) -> dict[str, float]:
    """Bytes per rank by part: the strategy's attention memory on its sp group and the rest of the
    model (seqpar.plan.memory)."""
    return mem.memory_estimate(inp, config_cost_model(cfg).memory(hybrid.sp_input(inp, cfg), cfg), cfg)


def _rank_key(c: Candidate):
    return (not c.valid, not c.fits, c.step_time)


def plan(inp: PlanInput, strategies: list[str] | None = None,
         chunks: tuple[int, ...] = FPDT_CHUNKS, tp: tuple[int, ...] | None = None,
         pp: tuple[int, ...] | None = None) -> list[Candidate]:
    """All candidates ranked: valid and fitting by predicted step time, then valid but too
    large for device memory, then invalid ones (each with its reason). `tp` / `pp`: the
    tensor-parallel degrees and pipeline stage counts to consider (None: every divisor)."""
    candidates = [evaluate(inp, cfg) for cfg in candidate_configs(inp, strategies, chunks, tp, pp)]
    rings = [c.step_time for c in candidates if c.valid and c.config.strategy == "ring"]
    if rings:
        for c in candidates:
            if c.valid:
                c.speedup_vs_ring = min(rings) / c.step_time
    return sorted(candidates, key=_rank_key)
