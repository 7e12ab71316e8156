"""The named cluster presets reproduce their papers' figures (docs/planner.md, "Against the
papers' own tables") within +-15%, and explicit flags override a preset."""
import argparse

import pytest

from seqpar.plan import plan
from seqpar.plan.cli import add_arguments, plan_input_from_args
from seqpar.plan.inputs import MODEL_PRESETS, Cluster, PlanInput
from seqpar.plan.presets import CLUSTER_PRESETS

FPDT_CHUNKS = (32,)  # the paper's 64K-token chunks at 2M tokens


def predicted(name: str) -> float:
    p = CLUSTER_PRESETS[name]
    inp = PlanInput(p.cluster, MODEL_PRESETS[p.model], p.seq_len, zero=p.zero, checkpointing=p.checkpointing)
    strategies = ["ring", "wallfacer"] if p.metric == "ratio" else [p.strategy]
    ranked = [c for c in plan(inp, strategies, FPDT_CHUNKS) if c.valid]
    best = {s: min((c for c in ranked if c.config.strategy == s), key=lambda c: (not c.fits, c.step_time))
            for s in strategies}
    if p.metric == "ratio":
        return best["ring"].step_time / best["wallfacer"].step_time
    flops = inp.model.config.flops_per_token(inp.seq_len) * inp.seq_len
    return flops / best[p.strategy].step_time / (inp.world * p.cluster.tflops * 1e12)


@pytest.mark.parametrize("name", ["wallfacer-h100-32", "wallfacer-a100-32", "usp-a800-16"])
def test_preset_reproduces_published_figure(name):
    assert predicted(name) == pytest.approx(CLUSTER_PRESETS[name].published, rel=0.15)


def test_fpdt_preset_documented_gap():
    """FPDT's > 55% MFU is not reproduced within 15% with defensible efficiencies (docs): the
    recompute of activation checkpointing caps seqpar's MFU near 3/4 of the kernel efficiency."""
    mfu = predicted("fpdt-a100-4")
    assert 0.45 < mfu < CLUSTER_PRESETS["fpdt-a100-4"].published


def test_presets_default_to_todays_model():
    plain = Cluster(8)
    assert plain.attn_efficiency is None and plain.p2p_efficiency == 1.0
    assert plain.node_inter_bw is None and not plain.zero_traffic
    assert plain.attn_flops_per_s == plain.flops_per_s


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_cluster_flag_sets_preset_and_flags_override():
    inp = plan_input_from_args(_args("--cluster", "wallfacer-h100-32"))
    preset = CLUSTER_PRESETS["wallfacer-h100-32"]
    assert inp.cluster == preset.cluster
    assert (inp.seq_len, inp.zero, inp.model) == (preset.seq_len, preset.zero, MODEL_PRESETS[preset.model])
    inp = plan_input_from_args(_args("--cluster", "wallfacer-h100-32", "--world", "16", "--inter-bw", "25",
                                     "--attn-efficiency", "0.5", "--no-zero-traffic", "--seq-len", "4096",
                                     "--model", "llama-3b", "--zero", "1"))
    c = inp.cluster
    assert (c.world, c.inter_bw, c.attn_efficiency, c.zero_traffic) == (16, 25.0, 0.5, False)
    assert (c.node_inter_bw, c.tflops) == (200.0, 989.0)
    assert (inp.seq_len, inp.zero, inp.model) == (4096, 1, MODEL_PRESETS["llama-3b"])


def test_without_cluster_world_and_seq_len_required():
    with pytest.raises(ValueError, match="--world"):
        plan_input_from_args(_args("--seq-len", "64"))
    inp = plan_input_from_args(_args("--world", "8", "--seq-len", "64"))
    assert inp.cluster == Cluster(8) and inp.zero == 0 and not inp.checkpointing
