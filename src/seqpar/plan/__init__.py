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
- `hybrid`: the mesh around the sequence-parallel group (tp, pp, dp): what the strategy sees,
  tensor-parallel collectives, pipeline bubble and sends, per-stage parameters;
- `tensor`: the tensor-parallel traffic formula (equal to the runtime's count) and its calls;
- `validity`: which candidates can run, and why not;
- `memory`: memory per rank;
- `costs`: each strategy's cost model (schedule + memory), named by the strategy itself;
- `search`: candidate enumeration (each strategy's `candidates`), evaluation and ranking;
- `advice`: when nothing fits in memory, the single changes that make a candidate fit;
- `cli`: `seqpar plan` (add_arguments, main, table/JSON output);
- `worlds`: the world `--calibrate` / `--profile` measure (local gloo processes or torchrun);
- `calibrate`: `--calibrate`, measuring a world into a Calibration;
- `profiling`: `--profile`, measuring the candidates and comparing with the prediction.
"""
from .advice import fit_suggestions, format_suggestions
from .calibrate import measure
from .candidate import Config
from .cli import add_arguments, main, plan_input_from_args
from .costs import CostModel, planned_strategies
from .hardware import Calibration, KernelTable, LinkFit, calibrated_peak_flops
from .inputs import MODEL_PRESETS, Cluster, GiB, ModelShape, PlanInput
from .profiling import attention_iteration, profile, profile_rank
from .schedules import fpdt_host_bytes, windowed_ring_bytes
from .search import attention_bytes, candidate_configs, evaluate, paper_block_volume, plan
from .tables import all_pairs_busiest, pair_count, ring_step_pairs, wallfacer_step_pairs

# what is used outside seqpar.plan (the command line, the trainer, tests, benchmarks); the rest
# stays in its module
__all__ = [
    "GiB", "MODEL_PRESETS", "ModelShape", "Cluster", "PlanInput", "Config",
    "Calibration", "LinkFit", "KernelTable", "calibrated_peak_flops", "measure",
    "CostModel", "planned_strategies", "candidate_configs", "evaluate", "plan", "attention_bytes",
    "paper_block_volume", "fpdt_host_bytes", "windowed_ring_bytes", "pair_count", "ring_step_pairs",
    "all_pairs_busiest", "wallfacer_step_pairs", "fit_suggestions", "format_suggestions",
    "add_arguments", "main", "plan_input_from_args", "profile", "profile_rank", "attention_iteration",
]
