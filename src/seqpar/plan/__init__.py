"""`seqpar plan`: rank strategies and degrees by predicted step time and memory.

An analytical cost model of seqpar's strategies: for each candidate (strategy + degrees +
layout) the schedule of one attention layer, forward and backward, as seen by each rank,
timed with the alpha-beta model on a two-level topology, plus memory per rank. The
equations are written out in docs/planner.md.

- `inputs`: Cluster, ModelShape (from seqpar.model.ModelConfig), PlanInput, Config, presets;
- `stages`: the stage/step algebra of a schedule and the busiest-rank compute tables;
- `schedules`: per-strategy schedules (bytes equal to what CommStats counts);
- `validity`: which candidates can run, and why not;
- `memory`: memory per rank;
- `search`: the strategy table, candidate enumeration, evaluation and ranking;
- `cli`: `seqpar plan` (add_arguments, main, table/JSON output);
- `profiling`: `--profile`, measuring the best candidates on a real process world.
"""
from .cli import add_arguments, format_profile, format_table, main, plan_input_from_args
from .inputs import DTYPE_BYTES, MODEL_PRESETS, GiB, Cluster, Config, Link, ModelShape, PlanInput
from .memory import memory_estimate, model_state_bytes
from .profiling import KINDS, attention_iteration, profile, profile_rank
from .schedules import fpdt_host_bytes, usp_groups
from .search import (STRATEGY_MODELS, Candidate, StrategyModel, attention_bytes, attention_schedule,
                     candidate_configs, evaluate, paper_block_volume, plan)
from .stages import Collective, Compute, Load, RingLoop, Send, Stage, Step, Steps, Work, bytes_by_kind, max_bytes_by_kind
from .tables import all_pairs_busiest, block_class_pairs, pair_count, ring_step_pairs, wallfacer_step_pairs

__all__ = [
    # inputs
    "GiB", "DTYPE_BYTES", "MODEL_PRESETS", "ModelShape", "Cluster", "Link", "PlanInput", "Config",
    # stages and tables
    "Collective", "RingLoop", "Compute", "Send", "Step", "Steps", "Stage", "Work", "Load", "bytes_by_kind",
    "max_bytes_by_kind",
    "pair_count", "block_class_pairs", "ring_step_pairs", "all_pairs_busiest", "wallfacer_step_pairs",
    # schedules, memory, search
    "usp_groups", "fpdt_host_bytes", "model_state_bytes", "memory_estimate", "StrategyModel", "STRATEGY_MODELS",
    "Candidate", "attention_schedule", "attention_bytes", "paper_block_volume", "candidate_configs", "evaluate",
    "plan",
    # command line and profiling
    "add_arguments", "main", "plan_input_from_args", "format_table", "format_profile", "KINDS",
    "attention_iteration", "profile", "profile_rank",
]
