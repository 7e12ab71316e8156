"""`seqpar train --strategy auto`: the calibrated planner's choice is valid, reproducible, follows
the calibration, and trains; MFU takes its peak from the calibration. No timing is asserted."""
import json
import subprocess
import sys

import pytest

from seqpar.plan import plan
from seqpar.train import TrainConfig
from seqpar.train.auto import choose, plan_input
from test_plan_calibration import hand_calibration

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=4096, nproc=4, strategy="auto", out_dir="unused")


def test_auto_choice_is_valid_reproducible_and_the_planners_best():
    cfg, cal = TrainConfig.of(**TINY), hand_calibration()
    first, line = choose(cfg, 4, cal, memory_gib=8.0)
    again, _ = choose(cfg, 4, cal, memory_gib=8.0)
    assert first == again and first.parallel.strategy != "auto"
    first.validate(4)  # the strategy's own resolve accepts every chosen option
    best = next(c for c in plan(plan_input(cfg, 4, cal, memory_gib=8.0)) if c.valid and c.fits)
    assert first.parallel.strategy == best.config.strategy and best.label in line and "runner-up" in line


def test_auto_follows_the_calibration():
    """Expensive all-to-all: nothing built on it (Ulysses, USP with u > 1, FPDT) is chosen."""
    cfg = TrainConfig.of(**TINY)
    chosen, line = choose(cfg, 4, hand_calibration(a2a_beta=1e-3), memory_gib=8.0)
    strategy, options = chosen.parallel.strategy, chosen.parallel.options
    assert strategy not in ("ulysses", "fpdt") and not (strategy == "usp" and options.ulysses > 1), line


def test_auto_picks_fpdt_chunked_blocks_when_only_they_fit():
    """A 256K-token run in 0.25 GiB per rank: only FPDT's per-chunk block pipeline fits; the chosen
    run is what the planner modelled (block checkpointing as --offload-activations, the LM loss
    in pieces) and passes TrainConfig's checks."""
    cfg = TrainConfig.of(**{**TINY, "seq_len": 1 << 18, "activation_checkpointing": True})
    chosen, line = choose(cfg, 4, hand_calibration(), memory_gib=0.25)
    chosen.validate(4)
    assert chosen.parallel.strategy == "fpdt" and chosen.model.chunked_blocks and chosen.parallel.options.offload, line
    assert chosen.model.offload_activations and not chosen.model.activation_checkpointing
    assert chosen.model.loss_chunks == (1 << 16) // 4096  # 64K tokens per rank in pieces of 4096
    fsdp, _ = choose(cfg.replace(fsdp=True), 4, hand_calibration(), memory_gib=8.0)
    assert not fsdp.model.chunked_blocks  # not a candidate with --fsdp


def test_auto_says_what_would_fit():
    cfg = TrainConfig.of(**{**TINY, "seq_len": 1 << 20, "dim": 1024, "n_heads": 8, "n_layers": 8})
    with pytest.raises(ValueError, match="no strategy fits this run in 0.0"):
        choose(cfg, 4, hand_calibration(), memory_gib=0.01)


def test_cli_auto_trains_with_its_choice_and_mfu_from_the_calibration(tmp_path):
    path = tmp_path / "cal.json"
    hand_calibration().save(path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "seqpar", "train", "--config", "tiny", "--strategy", "auto",
                           "--calibration", str(path), "--nproc", "4", "--steps", "1", "--seq-len", "256",
                           "--eval-every", "0", "--checkpoint-every", "0", "--no-plot", "--no-progress",
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    picked = [line for line in proc.stderr.splitlines() if "--strategy auto picked" in line]
    info = json.loads((out / "config.json").read_text())
    strategy = info["config"]["parallel"]["strategy"]
    assert len(picked) == 1 and strategy in picked[0] and strategy != "auto"
    # the machine's peak: the together rate of one rank x the calibration's 4 ranks per node
    assert info["peak_source"] == f"calibration {path}" and info["peak_tflops"] == pytest.approx(4 * 5e10 / 1e12)


def _mesh_run(kv_heads):
    return TrainConfig.of(**{**TINY, "dim": 512, "n_layers": 4, "n_kv_heads": kv_heads, "seq_len": 256})


def test_auto_chooses_tensor_parallelism_and_the_trainer_takes_it():
    """4 ranks on their own cores, heads 4 / kv 2: tp2 x sp2 predicted fastest (half the matmuls
    per rank); the chosen run carries --tp 2 and passes the trainer's checks."""
    cfg, cal = _mesh_run(2), hand_calibration(matmul=(5e10, 5e10))
    chosen, line = choose(cfg, 4, cal, memory_gib=8.0)
    chosen.validate(4)
    best = next(c for c in plan(plan_input(cfg, 4, cal, memory_gib=8.0)) if c.valid and c.fits)
    assert (chosen.parallel.tp, chosen.parallel.pp, chosen.sp_size(4)) == (best.config.tp, 1, 2) == (2, 1, 2), line
    assert chosen.parallel.strategy == best.config.strategy and "[tp2]" in line
    fixed, _ = choose(cfg.replace(sp=4), 4, cal, memory_gib=8.0)  # --sp given: the mesh is the run's
    assert (fixed.parallel.tp, fixed.parallel.pp) == (1, 1)


def test_auto_chooses_pipeline_stages_when_only_they_fit():
    """kv_heads 1 (no tp): in 0.12 GiB per rank only pipeline stages fit (the fp32 states of half
    the blocks); the chosen run is the planner's pp2 gpipe with one microbatch."""
    chosen, line = choose(_mesh_run(1), 4, hand_calibration(), memory_gib=0.12)
    chosen.validate(4)
    par = chosen.parallel
    assert (par.tp, par.pp, par.pp_schedule, par.microbatches) == (1, 2, "gpipe", 1), line


def test_auto_skips_what_the_trainer_refuses():
    """With FPDT's MLP chunks, which tensor and pipeline parallelism replace and the trainer refuses
    beside them (TrainConfig.validate, the one check), the planner's fastest tp2 x sp2 is skipped
    and auto runs the best candidate without tp or pp."""
    cfg, cal = _mesh_run(2).replace(mlp_chunks=2), hand_calibration(matmul=(5e10, 5e10))
    fitting = [c for c in plan(plan_input(cfg, 4, cal, memory_gib=8.0)) if c.valid and c.fits]
    assert fitting[0].config.tp == 2
    chosen, line = choose(cfg, 4, cal, memory_gib=8.0)
    chosen.validate(4)
    first_plain = next(c for c in fitting if c.config.tp == c.config.pp == 1)
    assert (chosen.parallel.tp, chosen.parallel.pp) == (1, 1)
    assert chosen.parallel.strategy == first_plain.config.strategy
    assert chosen.sp_size(4) == 4, line


def test_auto_plans_the_models_window():
    """A model windowed in every layer is planned with its window (interleaved global layers: none)."""
    cal = hand_calibration()
    assert plan_input(TrainConfig.of(**TINY, window=256), 4, cal, memory_gib=8.0).window == 256
    assert plan_input(TrainConfig.of(**TINY, window=256, local_global=1), 4, cal, memory_gib=8.0).window is None
    assert plan_input(TrainConfig.of(**TINY), 4, cal, memory_gib=8.0).window is None
