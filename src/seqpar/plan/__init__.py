"""`seqpar plan`: rank strategies and degrees by predicted step time and memory.

An analytical cost model of seqpar's strategies: for each candidate (strategy + degrees +
layout) the schedule of one attention layer, forward and backward, as seen by each rank,
timed with the alpha-beta model on a two-level topology, plus memory per rank. The
equations are written out in docs/planner.md.

- `hardware`: the measured `Calibration` of a world (JSON), its link fits and kernel tables;
- `inputs`: Cluster, ModelShape (from seqpar.model.ModelConfig), PlanInput, Config, presets,
  and `Hardware`, the one place the cost model reads hardware numbers from (flags or calibration);
- `stages`: the stage/step algebra of a schedule, attention work as per-step `Load`s;
- `tables`: busiest-rank tables and per-step loads from the layouts' block rules;
- `schedules`: per-strategy schedules (bytes equal to what CommStats counts);
- `validity`: which candidates can run, and why not;
- `memory`: memory per rank;
- `search`: the strategy table, candidate enumeration, evaluation and ranking;
- `advice`: when nothing fits in memory, the single changes that make a candidate fit;
- `cli`: `seqpar plan` (add_arguments, main, table/JSON output);
- `worlds`: the world `--calibrate` / `--profile` measure (local gloo processes or torchrun);
- `calibrate`: `--calibrate`, measuring a world into a Calibration;
- `profiling`: `--profile`, measuring the candidates and comparing with the prediction.
"""
from .advice import Suggestion, fit_suggestions, format_suggestions
from .calibrate import measure
from .cli import add_arguments, format_profile, format_table, main, plan_input_from_args
from .hardware import Calibration, KernelTable, LinkFit, calibrated_peak_flops
from .inputs import DTYPE_BYTES, MODEL_PRESETS, Cluster, Config, GiB, Hardware, Link, ModelShape, PlanInput
from .memory import memory_estimate, model_state_bytes
from .profiling import KINDS, ProfileReport, attention_iteration, profile, profile_input, profile_rank, spearman
from .schedules import fpdt_host_bytes, usp_groups
from .search import (
                     STRATEGY_MODELS,
                     Candidate,
                     StrategyModel,
                     attention_bytes,
                     attention_schedule,
                     candidate_configs,
                     evaluate,
                     paper_block_volume,
                     plan,
)
from .stages import (
                     Collective,
                     Compute,
                     Load,
                     RingLoop,
                     Send,
                     Stage,
                     Step,
                     Steps,
                     Work,
                     bytes_by_kind,
                     max_bytes_by_kind,
)
from .tables import all_pairs_busiest, block_class_pairs, pair_count, ring_step_pairs, wallfacer_step_pairs

__all__ = [
    # inputs
    "GiB", "DTYPE_BYTES", "MODEL_PRESETS", "ModelShape", "Cluster", "Link", "Hardware", "PlanInput", "Config",
    # measured hardware
    "Calibration", "LinkFit", "KernelTable", "calibrated_peak_flops", "measure",
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
    "attention_iteration", "profile", "profile_rank", "profile_input", "spearman", "ProfileReport",
    "Suggestion", "fit_suggestions", "format_suggestions",
]
