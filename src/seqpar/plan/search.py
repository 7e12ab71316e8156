"""The candidates, their evaluation and the ranking.

`candidate_configs` asks every registered strategy with a cost model (seqpar.plan.costs)
for its candidates (`Strategy.candidates`: degrees x layouts) and resolves them as
`seqpar.init` would; `evaluate` predicts one candidate's step time, bytes and memory from
its cost model, `plan` ranks them all. `paper_block_volume` recounts a schedule the way the
WallFacer paper does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from ..attention import get_strategy
from . import memory as mem
from . import validity as val
from .costs import cost_model, planned_strategies
from .inputs import Config, GiB, Hardware, PlanInput
from .stages import Collective, Compute, RingLoop, Stage, bytes_by_kind, max_bytes_by_kind

__all__ = ["FPDT_CHUNKS", "Candidate", "attention_schedule", "attention_bytes", "paper_block_volume",
           "candidate_configs", "evaluate", "memory_fits", "plan"]

DENSE_BWD_FACTOR = 2.0  # backward of a linear layer: grad input + grad weight


def attention_schedule(inp: PlanInput, cfg: Config, rank: int = 0) -> list[Stage]:
    """The stages of one attention layer (fwd + bwd) on `rank`; raises ValueError if invalid."""
    model = cost_model(cfg.strategy)
    val.check(inp, cfg)
    return model.schedule(inp, cfg, rank)


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
    step_time: float = math.inf            # seconds per training step (one micro-batch)
    attention_time: float = 0.0            # seconds per layer, fwd + bwd, incl. its communication
    exposed_comm_time: float = 0.0         # seconds per layer of attention time not hidden by compute
    comm_bytes: dict[str, int] = field(default_factory=dict)  # per kind, max over ranks, per layer fwd + bwd
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
                "memory_bytes": self.memory, "fits": self.fits,
                "speedup_vs_ring": self.speedup_vs_ring, "measured": self.measured}


FPDT_CHUNKS = (1, 2, 4, 8)


def candidate_configs(inp: PlanInput, strategies: list[str] | None = None,
                      chunks: tuple[int, ...] = FPDT_CHUNKS) -> list[Config]:
    """Every strategy x degree x layout worth considering (invalid ones included, to be reported):
    each strategy's own `candidates`, resolved on the world; a strategy with a per-chunk block
    pipeline (FPDT) also as that pipeline where it chunks and offloads. `chunks`: the chunk
    counts to consider."""
    names = planned_strategies() if strategies is None else strategies
    out = []
    for name in names:
        cost_model(name)  # a clear error for a strategy the planner cannot model
        cls = get_strategy(name)
        configs = [Config(cls.resolve(options, inp.world)) for options in cls.candidates(inp.world, inp.causal, chunks)]
        out += configs
        if cls.block_pipeline:
            out += [Config(c.settings, chunked_blocks=True) for c in configs if c.chunks > 1 and c.offload]
    return out


# -- evaluation and ranking --------------------------------------------------------------------
def _dense_seconds(inp: PlanInput) -> float:
    """Projections, MLP and LM head of one rank's tokens, forward + backward
    (seqpar.model.ModelConfig.matmul_flops_per_token), every rank computing at once."""
    tokens = inp.batch * inp.tokens_per_rank
    flops = (1 + DENSE_BWD_FACTOR) * tokens * inp.model.config.matmul_flops_per_token()
    return flops / inp.hardware.matmul_flops_per_s


def evaluate(inp: PlanInput, cfg: Config) -> Candidate:
    """Predict step time, bytes and memory of one configuration (invalid -> valid=False + reason)."""
    model = cost_model(cfg.strategy)
    try:
        val.check(inp, cfg)
        schedules = [model.schedule(inp, cfg, r) for r in range(inp.world)]
        memory = mem.memory_estimate(inp, model.memory(inp, cfg), cfg)
    except ValueError as e:
        return Candidate(cfg, valid=False, reason=str(e))
    hw, cl = inp.hardware, inp.cluster
    attn = max(sum(_stage_seconds(s, hw) for s in stages) for stages in schedules)
    compute = max(sum(_compute_seconds(s, hw) for s in stages) for stages in schedules)
    dense = _dense_seconds(inp)
    step = inp.model.layers * attn + dense + _state_sync_seconds(inp, dense)
    step += _recompute_seconds(inp, cfg, schedules, dense)
    host = max(sum(s.host_bytes for s in stages if isinstance(s, Compute)) for stages in schedules)
    return Candidate(cfg, step_time=step, attention_time=attn, exposed_comm_time=attn - compute,
                     comm_bytes=max_bytes_by_kind(schedules), host_bytes=host, memory=memory,
                     fits=memory["total"] <= cl.memory_gib * GiB)


def _recompute_seconds(inp: PlanInput, cfg: Config, schedules, dense: float) -> float:
    """Forward work done again in backward. Activation checkpointing: every block's forward
    (attention and matmuls). FPDT's chunked blocks: the matmuls of every block (projections
    and MLP, per chunk), not the attention, whose outputs wait in host memory; checkpointed
    on top (--offload-activations) its chunk loop runs once more as well: projections and
    attention (counted as the block's whole forward)."""
    dense_fwd = dense / (1 + DENSE_BWD_FACTOR)
    seconds = dense_fwd if cfg.chunked_blocks else 0.0
    if inp.checkpointing:
        seconds += dense_fwd + inp.model.layers * max(
            sum(_stage_seconds(s, inp.hardware) for s in stages if s.phase == "fwd") for stages in schedules)
    return seconds


def _state_sync_seconds(inp: PlanInput, dense: float) -> float:
    """Exposed data-parallel traffic of one step over the world. Default: one all-reduce of
    the gradients, hidden under the dense backward. With `Cluster.zero_traffic`: ZeRO-3
    all-gathers the weights in forward and again in backward and reduce-scatters the
    gradients (other stages: the all-reduce), prefetched under all the dense compute."""
    hw, cl, params = inp.hardware, inp.cluster, inp.model.params()
    if not cl.zero_traffic:
        grads = Collective("all_reduce", params, inp.itemsize, cl.ranks, "bwd", "grads")
        return max(0.0, grads.seconds(hw) - DENSE_BWD_FACTOR / (1 + DENSE_BWD_FACTOR) * dense)
    if inp.zero >= 3:
        calls = [Collective("all_gather", params // inp.world, inp.itemsize, cl.ranks, "fwd", "weights"),
                 Collective("all_gather", params // inp.world, inp.itemsize, cl.ranks, "bwd", "weights"),
                 Collective("reduce_scatter", params // inp.world, inp.itemsize, cl.ranks, "bwd", "grads")]
    else:
        calls = [Collective("all_reduce", params, inp.itemsize, cl.ranks, "bwd", "grads")]
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
        total = mem.memory_estimate(inp, cost_model(cfg.strategy).memory(inp, cfg), cfg)["total"]
    except ValueError:
        return False
    return total <= inp.cluster.memory_gib * GiB


def _rank_key(c: Candidate):
    return (not c.valid, not c.fits, c.step_time)


def plan(inp: PlanInput, strategies: list[str] | None = None,
         chunks: tuple[int, ...] = FPDT_CHUNKS) -> list[Candidate]:
    """All candidates ranked: valid and fitting by predicted step time, then valid but too
    large for device memory, then invalid ones (each with its reason)."""
    candidates = [evaluate(inp, cfg) for cfg in candidate_configs(inp, strategies, chunks)]
    rings = [c.step_time for c in candidates if c.valid and c.config.strategy == "ring"]
    if rings:
        for c in candidates:
            if c.valid:
                c.speedup_vs_ring = min(rings) / c.step_time
    return sorted(candidates, key=_rank_key)
