"""`seqpar plan` and its cost model (seqpar.plan).

The bytes model is checked rank by rank against what CommStats counts on real gloo worlds
(and FPDT's host copies against its OffloadStats); the WallFacer paper's example volumes
are reproduced; ranking, validity reasons, input errors, the CLI and --profile are exercised.
"""
import json

import pytest

from checks.plan import fpdt_host_copies, measured_attention_bytes
from seqpar import cli
from seqpar.attention.wallfacer import WallFacerGrid
from seqpar.layout import LAYOUTS, block_pairs
from seqpar.plan import (
    MODEL_PRESETS,
    Cluster,
    Config,
    GiB,
    ModelShape,
    PlanInput,
    add_arguments,
    all_pairs_busiest,
    attention_bytes,
    evaluate,
    fpdt_host_bytes,
    pair_count,
    paper_block_volume,
    plan,
    profile,
    profile_rank,
    ring_step_pairs,
    wallfacer_step_pairs,
)
from seqpar.plan.stages import Work

TINY = ModelShape(layers=1, hidden=64, heads=8, kv_heads=2, ffn_hidden=128, vocab=256)  # head_dim 8, GQA
SHAPE = {"batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 8}


def tiny_input(world, seq, dtype="bfloat16", causal=True, **cluster):
    return PlanInput(Cluster(world, **cluster), TINY, seq, 1, dtype, causal)


def candidate(strategy, world, layout="contiguous", **options):
    """The planner's candidate of seqpar.init(strategy, layout=layout, **options) on `world` ranks."""
    return Config.of(strategy, world, layout=layout, **options)


def wallfacer(world, layout, teams, placement):
    return candidate("wallfacer", world, layout, team_size=teams, placement=placement)


CASES = {
    4: [candidate("ring", 4), candidate("ring", 4, "zigzag"), candidate("ulysses", 4),
        candidate("usp", 4, "zigzag", ulysses=2, ring=2), candidate("allgather", 4, "zigzag"), candidate("lss", 4),
        wallfacer(4, "zigzag", 2, "collectives_intra"), wallfacer(4, "striped", 2, "rings_intra"),
        candidate("fpdt", 4, chunks=2), candidate("fpdt", 4, chunks=4, offload=True)],
    8: [candidate("ring", 8, "striped"), candidate("ulysses", 8), candidate("usp", 8, "zigzag", ulysses=2, ring=4),
        candidate("usp", 8, ulysses=4, ring=2), candidate("allgather", 8),
        wallfacer(8, "zigzag", 2, "collectives_intra"), wallfacer(8, "contiguous", 2, "rings_intra"),
        candidate("fpdt", 8, chunks=2)],
}


@pytest.mark.parametrize("world,dtype,causal", [(4, "bfloat16", True), (8, "float32", False)])
def test_predicted_bytes_equal_comm_stats(worlds, world, dtype, causal):
    """bf16 makes gradient accumulators (fp32) differ from the activations; 8 ranks give
    WallFacer C=2 a sub-ring of 2 and a non-trivial placement."""
    cases, rpn = CASES[world], world // 2
    configs = [(c.strategy, c.init_kwargs(rpn)) for c in cases]
    measured = worlds.run(world, measured_attention_bytes, configs, seq=64, dtype=dtype, causal=causal, **SHAPE)
    inp = tiny_input(world, 64, dtype, causal, ranks_per_node=rpn)
    for i, cfg in enumerate(cases):
        for rank in range(world):
            assert measured[rank][i], f"{cfg.label}: rank {rank} moved nothing"
            assert attention_bytes(inp, cfg, rank) == measured[rank][i], f"{cfg.label}, rank {rank}"


@pytest.mark.parametrize("causal", [True, False])
def test_fpdt_host_copies_equal_offload_stats(worlds, causal):
    got = worlds.run(4, fpdt_host_copies, 4, seq=64, dtype="bfloat16", causal=causal, **SHAPE)
    predicted = fpdt_host_bytes(tiny_input(4, 64, causal=causal), candidate("fpdt", 4, chunks=4, offload=True))
    assert all(g == predicted for g in got) and predicted["fwd"] > 0


# -- the WallFacer paper's example ---------------------------------------------------------------
def test_paper_example_volumes():
    """llama-30B, N=65536, H=6656, P=64, C=4, bf16: ring 1.625 GB P2P; WallFacer 0.152 GB
    collective + 0.406 GB P2P per block per rank (GB = GiB; forward, activation dtype)."""
    p, c, n, h, e = 64, 4, 65536, 6656, 2
    inp = PlanInput(Cluster(p, 8), MODEL_PRESETS["llama-30b"], n, 1, "bfloat16", True)
    ring_cfg, wf_cfg = candidate("ring", p, "zigzag"), wallfacer(p, "zigzag", c, "collectives_intra")
    ring, wf = paper_block_volume(inp, ring_cfg), paper_block_volume(inp, wf_cfg)
    assert (round(ring["p2p"] / GiB, 3), ring["collective"]) == (1.625, 0)
    assert (round(wf["collective"] / GiB, 3), round(wf["p2p"] / GiB, 3)) == (0.152, 0.406)
    assert ring["p2p"] == 2 * n * h * e  # the paper's formulas, B = 1
    assert wf["collective"] == 4 * n * h * (c - 1) // p * e and wf["p2p"] == 2 * n * h // c * e
    # relation to the exact schedule: ring sends P-1 of its P blocks; a WallFacer rank that
    # does not keep its own team's K/V sends P/C^2 blocks (placement + sub-ring steps)
    assert attention_bytes(inp, ring_cfg, 0, phase="fwd")["p2p"] * p == ring["p2p"] * (p - 1)
    assert attention_bytes(inp, wf_cfg, 1, phase="fwd")["p2p"] == wf["p2p"]


# -- busiest-rank compute tables vs brute force over every rank ---------------------------------------
def busiest(q_and_kv_ranks, kind, causal, n):
    return max(pair_count(block_pairs(kind, causal, q, kv, n), n) for q, kv in q_and_kv_ranks)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_busiest_rank_tables_match_brute_force(kind, causal):
    n, p = 6, 8
    assert ring_step_pairs(kind, causal, p, n) == tuple(
        busiest([(r, (r - s) % p) for r in range(p)], kind, causal, n) for s in range(p))
    assert all_pairs_busiest(kind, causal, p, n) == max(
        sum(pair_count(block_pairs(kind, causal, r, src, n), n) for src in range(p)) for r in range(p))
    for world, teams in ((8, 2), (16, 2), (16, 4)):
        grid = WallFacerGrid(world, teams)
        expected = tuple(busiest([(t, grid.kv_team(t, a, s)) for t in range(grid.team_count) for a in range(teams)],
                                 kind, causal, n) for s in range(grid.ring_len))
        assert wallfacer_step_pairs(kind, causal, world, teams, n) == expected


# -- ranking --------------------------------------------------------------------------------------
def test_fewer_heads_than_ranks_excludes_ulysses_with_reason():
    model = ModelShape(2, 256, 4, 4, 512, 1000)
    ranked = plan(PlanInput(Cluster(8, 8), model, 4096), tp=(1,), pp=(1,))
    ulysses = next(c for c in ranked if c.config.strategy == "ulysses")
    assert not ulysses.valid and "must divide the number of attention heads (4)" in ulysses.reason
    assert not any(c.valid for c in ranked if c.config.strategy == "fpdt")
    assert {c.config.ulysses for c in ranked if c.config.strategy == "usp" and c.valid} == {2, 4}
    first_invalid = next(i for i, c in enumerate(ranked) if not c.valid)
    assert all(not c.valid for c in ranked[first_invalid:])


def test_ranked_by_time_with_memory_misfits_last():
    inp = PlanInput(Cluster(16, 8, memory_gib=45), MODEL_PRESETS["llama-7b"], 131072, zero=3)
    ranked = plan(inp)
    fits = [c for c in ranked if c.valid and c.fits]
    too_big = [c for c in ranked if c.valid and not c.fits]
    assert fits and too_big and ranked[: len(fits)] == fits
    assert [c.step_time for c in fits] == sorted(c.step_time for c in fits)
    assert max(c.speedup_vs_ring for c in ranked if c.config.strategy == "ring" and c.valid) == 1.0
    by_label = {c.label: c for c in ranked}
    assert by_label["allgather zigzag"].memory["total"] > by_label["ring zigzag"].memory["total"]
    assert (by_label["wallfacer C=4 collectives_intra zigzag"].memory["total"]
            > by_label["wallfacer C=2 collectives_intra zigzag"].memory["total"])
    assert (by_label["fpdt chunks=8 offload contiguous"].memory["total"]
            < by_label["fpdt chunks=8 contiguous"].memory["total"])


def best_wallfacer_teams(inter_lat):
    inp = PlanInput(Cluster(64, 8, intra_bw=300, inter_bw=100, intra_lat=2, inter_lat=inter_lat),
                    MODEL_PRESETS["llama-7b"], 32768, zero=3)
    return next(c for c in plan(inp, ["wallfacer"], tp=(1,), pp=(1,)) if c.valid).config.team_size


def test_high_inter_node_latency_favours_larger_teams():
    assert best_wallfacer_teams(2.0) < best_wallfacer_teams(2000.0) == 8


def test_contiguous_causal_ring_pays_the_busiest_rank():
    """Compute-bound: every step after the first waits for a full block on the last rank
    (contiguous) instead of half blocks everywhere (zigzag)."""
    inp = tiny_input(8, 4096, intra_bw=1e9, inter_bw=1e9, intra_lat=0, inter_lat=0)
    t = {lay: evaluate(inp, candidate("ring", 8, lay)).attention_time for lay in ("contiguous", "zigzag")}
    assert t["contiguous"] / t["zigzag"] == pytest.approx((0.5 + 7) / (0.5 + 7 * 0.5), rel=1e-3)


def test_mean_document_length_scales_attention_compute_not_bytes():
    """Packed documents of mean length L: the visible-pair fraction of equal-length documents, the
    one seqpar really computes (test_documents.test_masked_blocks_are_not_computed measures 9/129
    for 8-token documents of a 128-token sequence); bytes stay, compute-bound time shrinks by it."""
    assert PlanInput(Cluster(4), TINY, 128, mean_doc_len=8).attention_fraction == pytest.approx(9 / 129)
    assert PlanInput(Cluster(4), TINY, 128, causal=False, mean_doc_len=8).attention_fraction == 8 / 128
    fast = dict(intra_bw=1e9, inter_bw=1e9, intra_lat=0, inter_lat=0)
    whole, packed = (PlanInput(Cluster(8, **fast), TINY, 4096, mean_doc_len=L) for L in (None, 256))
    cases = (candidate("ring", 8, "zigzag"), candidate("ulysses", 8), wallfacer(8, "zigzag", 2, "collectives_intra"))
    for cfg in cases:
        a, b = evaluate(whole, cfg), evaluate(packed, cfg)
        assert a.comm_bytes == b.comm_bytes
        assert b.attention_time / a.attention_time == pytest.approx(257 / 4097, rel=0.02)
    slow = PlanInput(Cluster(8), MODEL_PRESETS["llama-7b"], 131072, zero=3, mean_doc_len=4096)
    assert plan(slow)[0].config.strategy != "ring"  # ring becomes bound by its K/V traffic


def test_attention_efficiency_of_each_calls_length():
    """With attn_half_tokens h a call of L tokens (L = 2 pairs / (q rows + kv rows): nk for a full
    block, (n+1)/2 for a causal n x n one) runs at attn_efficiency x L / (L + h); None keeps one
    efficiency for every call, exactly."""
    half, eff, rows, head_dim = 512, 0.7, 32, 128
    curve = Cluster(8, tflops=312.0, attn_efficiency=eff, attn_half_tokens=half).hardware("bfloat16")
    flat = Cluster(8, tflops=312.0, attn_efficiency=eff).hardware("bfloat16")
    for nq, nk, causal, length in [(1024, 1024, False, 1024), (65536, 65536, False, 65536),
                                   (2048, 1024, False, 1024 * 4 / 3), (1024, 1024, True, 512.5)]:
        for backward in (False, True):
            work = Work(((nq, nk, causal, 3.0),), rows, head_dim, backward)
            pairs = nq * (nq + 1) // 2 if causal else nq * nk
            flops = 3 * rows * pairs * 4 * head_dim * (2.5 if backward else 1.0)
            assert work.seconds(flat) == flops / (312e12 * eff)
            assert work.seconds(curve) == pytest.approx(flops / (312e12 * eff * length / (length + half)), rel=1e-12)
    two = Work(((1024, 1024, False, 1.0), (8192, 8192, False, 2.0)), rows, head_dim, False)
    parts = [Work((call,), rows, head_dim, False).seconds(curve) for call in two.calls]
    assert two.seconds(curve) == pytest.approx(sum(parts), rel=1e-12)
    assert Cluster(8).attn_half_tokens is None and flat.attn_half_tokens is None


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,match", [
    (lambda: PlanInput(Cluster(8), TINY, 64, mean_doc_len=0.5), "mean document length must be"),
    (lambda: Cluster(0), "world size must be >= 1"),
    (lambda: Cluster(12, 8), "not a multiple of ranks per node"),
    (lambda: Cluster(8, inter_bw=0), "inter_bw must be > 0"),
    (lambda: Cluster(8, efficiency=1.5), "efficiency"),
    (lambda: Cluster(8, attn_half_tokens=0), "attn_half_tokens must be > 0 tokens"),
    (lambda: Cluster(8, attn_half_tokens=-512), "attn_half_tokens must be > 0 tokens"),
    (lambda: ModelShape(2, 100, 8, 8, 10, 10), "not divisible by heads"),
    (lambda: ModelShape(2, 64, 8, 3, 10, 10), "multiple of kv_heads"),
    (lambda: PlanInput(Cluster(8), TINY, 100), "not divisible by the world size"),
    (lambda: PlanInput(Cluster(8), TINY, 64, dtype="int8"), "unknown dtype"),
    (lambda: plan(PlanInput(Cluster(8), TINY, 64), ["magic"]), "unknown strategy 'magic'"),
    (lambda: plan(PlanInput(Cluster(8), TINY, 64), ["local"]), "strategy 'local' has no cost model"),
])
def test_invalid_inputs_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_invalid_layout_granularity_is_reported():
    c = evaluate(tiny_input(8, 8), candidate("ring", 8, "zigzag"))
    assert not c.valid and "not divisible by 16" in c.reason


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_json(capsys):
    rc = cli.main(["plan", "--world", "16", "--ranks-per-node", "8", "--model", "llama-7b", "--seq-len", "65536",
                   "--inter-lat", "50", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    cands = out["candidates"]
    assert cands[0]["valid"] and cands[0]["step_time_s"] > 0
    times = [c["step_time_s"] for c in cands if c["valid"] and c["fits"]]
    assert times == sorted(times)
    # sp = 1 (the world taken by tp x pp): local attention
    assert {c["strategy"] for c in cands} == {"ring", "ulysses", "usp", "allgather", "lss", "wallfacer", "fpdt",
                                              "local"}


def test_cli_table_and_errors(capsys):
    assert cli.main(["plan", "--world", "8", "--model", "tiny", "--seq-len", "1024", "--heads", "4",
                     "--kv-heads", "4"]) == 0
    table = capsys.readouterr().out
    assert "ring zigzag" in table and "invalid: Ulysses degree 8 must divide" in table
    assert cli.main(["plan", "--world", "8", "--seq-len", "100"]) == 2
    assert "not divisible by the world size 8" in capsys.readouterr().err
    assert cli.main(["plan", "--world", "4", "--model", "tiny", "--seq-len", "64", "--profile",
                     "--calibration-repeats", "0"]) == 2
    assert "--calibration-repeats must be >= 1" in capsys.readouterr().err


def test_profile_confirms_the_regret_only_by_re_measuring():
    """The predicted best measured slower than another: with --profile-confirm N the two run
    again (their ratio), with 0 the confirmed regret stays unknown (it used to read 1.0)."""
    import argparse
    import math

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from seqpar.plan import plan_input_from_args
    for confirm, expected in (("0", math.nan), ("3", 1.5)):
        args = parser.parse_args(["--world", "4", "--model", "tiny", "--seq-len", "256", "--profile-top", "3",
                                  "--profile-confirm", confirm])
        inp = plan_input_from_args(args)
        calls = []

        def runner(world, configs, kw, calls=calls):
            calls.append(len(configs))
            times = [2.0, 1.0, 3.0] if len(calls) == 1 else [1.5, 1.0]
            return [{"seconds": t, "times": [t], "bytes": {}} for t in times[:len(configs)]]

        report = profile(inp, plan(inp), args, runner=runner)
        assert report.regret == pytest.approx(2.0) and report.predicted_best != report.measured_best
        assert calls == ([3] if confirm == "0" else [3, 2])
        assert (math.isnan(report.confirmed_regret) if math.isnan(expected)
                else report.confirmed_regret == pytest.approx(expected))


def test_profile_ranks_by_measured_time(worlds):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--world", "4", "--ranks-per-node", "2", "--model", "tiny", "--seq-len", "256",
                              "--profile-seq", "64", "--profile-top", "3", "--profile-iters", "2",
                              "--profile-dtype", "float32", "--profile-confirm", "0"])
    from seqpar.plan import plan_input_from_args
    inp = plan_input_from_args(args)
    report = profile(inp, plan(inp), args,
                     runner=lambda world, configs, kw: worlds.run(world, profile_rank, configs, **kw)[0])
    ranked = report.candidates
    assert len(ranked) == 3
    seconds = [c.measured["seconds"] for c in ranked]
    assert all(s > 0 for s in seconds) and seconds == sorted(seconds)
    for c in ranked:
        assert c.measured["bytes"] == c.measured["predicted_bytes"] != {}
        assert c.measured["predicted_seconds"] > 0


# -- tensor and pipeline parallelism around the sequence-parallel group ---------------------------
def mesh_candidate(inp, strategy, sp, **mesh):
    """The planner's candidate of `strategy` on sp ranks inside the mesh (tp, pp, dp, ...)."""
    return Config(Config.of(strategy, sp, layout="contiguous").settings, **mesh)


def test_tensor_collectives_equal_the_runtime_formula():
    """The planner's timed tp collectives send what plan/tensor.py's formula says (which
    tests/test_hybrid.py checks against the runtime's counted traffic), and a candidate reports
    the formula's bytes per step."""
    from seqpar.plan.stages import bytes_by_kind
    from seqpar.plan.tensor import tensor_parallel_collectives, tensor_parallel_traffic
    for recompute in (False, True):
        args = dict(n_layers=3, dim=64, tokens=256, act_bytes=2, loss_bytes=4, recompute=recompute)
        formula = tensor_parallel_traffic(tp=4, **args, norm_params=7 * 64, param_bytes=2)
        counted = bytes_by_kind(tensor_parallel_collectives(group=(0, 1, 2, 3), **args))
        assert {f"tp_{k}": v for k, v in counted.items()} == {k: v for k, v in formula.items()
                                                             if k != "tp_grad_all_reduce"}
    model = ModelShape(4, 256, 8, 4, 512, 1024)
    inp = PlanInput(Cluster(8, 8), model, 4096, batch=2, checkpointing=True)
    cand = evaluate(inp, mesh_candidate(inp, "ring", 2, tp=4))
    assert cand.valid and cand.mesh_bytes == tensor_parallel_traffic(
        tp=4, n_layers=4, dim=256, tokens=2 * 4096 // 2, act_bytes=2, loss_bytes=4, norm_params=9 * 256,
        param_bytes=2, recompute=True)


def test_pipeline_bytes_bubble_and_in_flight_activations():
    """pp2 x sp4 with 4 microbatches: the busiest stage sends seqpar.pipeline_p2p_bytes; the step
    is (m + p - 1) microbatch slots of 1/(p m) of the work (links free: exactly); gpipe holds all
    m microbatches' activations on a stage, 1f1b p of them."""
    from seqpar.pipeline import pipeline_p2p_bytes
    model = ModelShape(4, 256, 8, 4, 512, 1024)
    free = Cluster(8, 8, intra_bw=1e12, inter_bw=1e12, intra_lat=0, inter_lat=0)
    inp = PlanInput(free, model, 4096, batch=4, dtype="float32")
    gpipe = evaluate(inp, mesh_candidate(inp, "ring", 4, pp=2, microbatches=4))
    ofob = evaluate(inp, mesh_candidate(inp, "ring", 4, pp=2, pp_schedule="1f1b", microbatches=4))
    assert gpipe.mesh_bytes["pp_p2p"] == pipeline_p2p_bytes(0, 2, 1, 4096 // 4, 256, 4, 4)[0] == 4 * 1024 * 256 * 4
    assert gpipe.bubble == ofob.bubble == pytest.approx(1 / 5)
    flat = PlanInput(Cluster(4, 8, intra_bw=1e12, inter_bw=1e12, intra_lat=0, inter_lat=0), model, 4096, 4,
                     "float32")
    whole = evaluate(flat, candidate("ring", 4)).step_time  # the same sp group, no pipeline
    head = 2.0 * 3 * 4 * 4096 / 4 * model.hidden * model.vocab / free.flops_per_s  # LM head: on the last stage only
    assert gpipe.step_time == pytest.approx((4 + 2 - 1) / 4 * ((whole - head) / 2 + head), rel=1e-6)
    assert gpipe.memory["activations"] == pytest.approx(2 * ofob.memory["activations"])
    assert gpipe.memory["total"] > ofob.memory["total"]


def test_tensor_parallel_memory_and_crossing_nodes():
    """tp2 x sp2 holds half the model states of sp4 (ZeRO-0) and the same activations (tokens / sp
    / tp either way); its collectives run on the intra-node link, tp8 on 4-rank nodes crosses
    nodes (inter bandwidth)."""
    model = ModelShape(4, 256, 8, 8, 512, 1024)
    inp = PlanInput(Cluster(4, 4), model, 4096)
    sp4, tp2 = (evaluate(inp, c) for c in (candidate("ring", 4), mesh_candidate(inp, "ring", 2, tp=2)))
    assert tp2.memory["model_states"] == pytest.approx(sp4.memory["model_states"] / 2, rel=0.01)
    assert tp2.memory["activations"] == sp4.memory["activations"]
    assert tp2.memory["logits"] == sp4.memory["logits"]
    times = {}
    for per_node in (8, 4):
        wide = PlanInput(Cluster(8, per_node, intra_bw=100, inter_bw=10, intra_lat=0, inter_lat=0), model, 4096)
        times[per_node] = evaluate(wide, Config(Config.of("local", 1).settings, tp=8)).mesh_time
    assert times[4] == pytest.approx(10 * times[8])


def test_sp_group_inside_the_mesh():
    """tp innermost: with tp2 an sp group of 4 fits in one 8-rank node, with tp4 it spans two;
    each rank's strategy sees heads / tp."""
    from seqpar.plan.hybrid import group_view
    inp = PlanInput(Cluster(16, 8), ModelShape(2, 256, 8, 4, 512, 1024), 4096)
    inner = group_view(inp, 4, 2)
    assert inner.cluster.link_class(inner.cluster.ranks) == "intra" and inner.model.heads == 4
    wide = group_view(inp, 4, 4)
    assert wide.cluster.link_class(wide.cluster.ranks) == "inter" and wide.model.kv_heads == 1


def test_mesh_validity_is_the_runtimes():
    """Reasons from seqpar.tensor_parallel / seqpar.pipeline / the strategy on heads / tp."""
    inp = PlanInput(Cluster(8, 8), ModelShape(6, 256, 8, 2, 512, 1024), 4096, batch=2)
    bad_tp = evaluate(inp, mesh_candidate(inp, "ring", 2, tp=4))
    assert not bad_tp.valid and "--tp 4 must divide n_heads (8) and n_kv_heads (2)" in bad_tp.reason
    ulysses = evaluate(inp, Config(Config.of("ulysses", 4).settings, tp=2))  # 4 heads per tp rank, 1 K/V head
    assert ulysses.valid and ulysses.comm_bytes["all_to_all"] > 0
    too_few = evaluate(inp, mesh_candidate(inp, "ring", 2, pp=2, dp=2, pp_schedule="1f1b", microbatches=1))
    assert not too_few.valid and "1f1b needs --microbatches >= --pp" in too_few.reason
    layers = evaluate(inp, mesh_candidate(inp, "ring", 2, pp=4))
    assert not layers.valid and "n_layers (6) must be divisible by the 4 pipeline stages (--pp 4)" in layers.reason
    labels = {(c.config.tp, c.config.pp, c.config.dp) for c in plan(inp, ["ring"]) if c.valid}
    assert {(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)} <= labels and not any(t in (4, 8) for t, _, _ in labels)


def test_cli_prints_tp_and_pp_columns(capsys):
    assert cli.main(["plan", "--world", "8", "--model", "tiny", "--seq-len", "1024", "--tp", "1,2", "--pp", "1,2",
                     "--strategies", "ring"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["#", "tp", "pp", "dp", "candidate"]
    rows = [line.split() for line in lines[3:]]
    assert {(r[1], r[2]) for r in rows} == {("1", "1"), ("2", "1"), ("1", "2"), ("2", "2")}
    assert any("pp_p2p" in line and "bubble 50%" in line for line in lines)
    assert cli.main(["plan", "--world", "8", "--seq-len", "1024", "--tp", "x"]) == 2
    assert "--tp must be comma-separated integers" in capsys.readouterr().err


def test_calibrated_all_gather_and_reduce_scatter_time_the_tp_collectives():
    """With a calibration, tp collectives take its measured all-gather / reduce-scatter fits (the
    link class of the tp group): doubling their per-byte cost adds exactly their bytes once more."""
    from dataclasses import replace

    from seqpar.plan import LinkFit
    from test_plan_calibration import hand_calibration
    cal = hand_calibration()
    slow = replace(cal, links={"intra": {**cal.links["intra"], "all_gather": LinkFit(1e-5, 2e-9),
                                         "reduce_scatter": LinkFit(1e-5, 2e-9)}})
    model = ModelShape(2, 256, 8, 4, 512, 1024)
    got = {}
    for name, c in (("fast", cal), ("slow", slow)):
        inp = PlanInput(Cluster(4, 4, calibration=c), model, 1024, dtype="float32")
        got[name] = evaluate(inp, mesh_candidate(inp, "ring", 2, tp=2))
    moved = got["fast"].mesh_bytes["tp_all_gather"] + got["fast"].mesh_bytes["tp_reduce_scatter"]
    assert got["slow"].mesh_time - got["fast"].mesh_time == pytest.approx(moved * 1e-9, rel=1e-9)

# -- sliding windows (issue #19 item 6) ------------------------------------------------------------
def test_window_scales_attention_work_and_localizes_ring_bytes():
    """A causal window W: about (W + 2T) x N pairs per head (T = 128-row tiles) instead of N(N+1)/2,
    for every strategy; a contiguous ring sends K/V only over the distances the window reaches,
    exactly `windowed_ring_bytes` (which test_local_attention checks against CommStats)."""
    from seqpar.plan import windowed_ring_bytes
    fast = dict(intra_bw=1e9, inter_bw=1e9, intra_lat=0, inter_lat=0)
    whole, windowed = (PlanInput(Cluster(8, **fast), TINY, 4096, window=w) for w in (None, 100))
    assert windowed.window_fraction == (100 + 256) * 4096 / (4096 * 4097 / 2)
    assert PlanInput(Cluster(8), TINY, 512, window=400).window_fraction == 1.0  # (W + 2T) N >= N(N+1)/2
    ulysses = candidate("ulysses", 8)
    a, b = evaluate(whole, ulysses), evaluate(windowed, ulysses)
    assert a.comm_bytes == b.comm_bytes
    assert b.attention_time / a.attention_time == pytest.approx(windowed.window_fraction, rel=1e-6)
    block = 2 * 512 * TINY.kv_heads * 8  # one rank's K and V: 512 tokens, 2 KV heads of 8
    for layout, steps in (("contiguous", 1), ("zigzag", 2)):
        want = windowed_ring_bytes(layout, 8, 4096, (99, 0), True, block * 2, block * 4)
        got = evaluate(windowed, candidate("ring", 8, layout)).comm_bytes["p2p"]
        assert want["steps"] == steps and got == want["fwd"] + want["bwd"]
    # a window of 4096 tokens spans ring ranks: zigzag needs every distance, the plain ring's bytes
    wide = PlanInput(Cluster(8, **fast), TINY, 4096, window=4096)
    zigzag = candidate("ring", 8, "zigzag")
    assert evaluate(wide, zigzag).comm_bytes == evaluate(whole, zigzag).comm_bytes
    contiguous = evaluate(windowed, candidate("ring", 8, "contiguous")).comm_bytes["p2p"]
    assert contiguous == block * 2 + block * (2 + 4)  # 1 K/V block forward, K/V + dK/dV backward


def test_sinks_add_one_logit_column_per_query_and_their_parameters(capsys):
    """Learned sinks (gpt-oss): each query row's softmax gets one more column, so the attention
    work grows by 1 / (keys per query) -- causal: (N + 1) / 2 keys, windowed: the window's share --
    with the same communication; the model gains heads x layers parameters (their gradients
    join the gradient sync); `seqpar plan --sinks` says so."""
    from dataclasses import replace
    fast = dict(intra_bw=1e9, inter_bw=1e9, intra_lat=0, inter_lat=0)
    with_sinks = replace(TINY, sinks=True)
    assert with_sinks.params() - TINY.params() == TINY.layers * TINY.heads
    for window in (None, 100):
        plain, sunk = (PlanInput(Cluster(8, **fast), m, 4096, window=window) for m in (TINY, with_sinks))
        keys = 4097 / 2 * plain.window_fraction
        assert sunk.sink_factor == pytest.approx(1 + 1 / keys) and plain.sink_factor == 1.0
        a, b = evaluate(plain, candidate("ring", 8)), evaluate(sunk, candidate("ring", 8))
        assert b.attention_time / a.attention_time == pytest.approx(1 + 1 / keys, rel=1e-6)
        assert a.comm_bytes == b.comm_bytes
    assert cli.main(["plan", "--world", "4", "--model", "tiny", "--seq-len", "1024", "--sinks", "--top", "1",
                     "--tp", "1", "--pp", "1"]) == 0
    assert f"sinks (attention x{1 + 2 / 1025:.6g})" in capsys.readouterr().out


def test_window_changes_the_chosen_strategy_and_says_why(capsys):
    """8 ranks on 2 nodes, 32K tokens of llama-7b, sequence parallelism alone (--tp 1 --pp 1): USP
    is best; with a 1024-token window every
    query's keys are on its own or the previous rank, so the contiguous ring's traffic is local
    (1 of 7 distances) and the planner picks it, and says so."""
    assert cli.main(["plan", "--world", "8", "--ranks-per-node", "4", "--seq-len", "32768", "--zero", "3",
                     "--window", "1024", "--top", "2", "--tp", "1", "--pp", "1"]) == 0
    out = capsys.readouterr().out
    assert "sliding window 1024" in out and out.splitlines()[3].split()[4:6] == ["ring", "contiguous"]
    assert "window 1024 changes the best candidate from usp u4xr2 zigzag to ring contiguous" in out
    assert "1 of 7 ring distances" in out and "ring traffic is local" in out
    with pytest.raises(ValueError, match="window must be >= 1"):
        PlanInput(Cluster(8), TINY, 64, causal=False, window=8)


def test_ranks_sharing_cores_reclaim_the_pipeline_bubble():
    """A calibration whose 4 ranks run matmuls together at half their speed alone has 2 cores:
    while a pipeline slot keeps only some stages busy they run faster (`slot_compute_scales`),
    so pp2 is predicted faster than with the same together speed on 4 cores; without a pipeline
    (and on devices of their own) nothing changes."""
    from seqpar.plan.hybrid import active_stages, slot_compute_scales
    from test_plan_calibration import hand_calibration
    pp2, pp2m4 = (Config(Config.of("ring", 2).settings, pp=2, microbatches=m) for m in (1, 4))
    assert [active_stages(pp2m4, k) for k in range(5)] == [1, 2, 2, 2, 1]
    assert slot_compute_scales(pp2m4, 4, 2.0) == [0.5, 1.0, 1.0, 1.0, 0.5]
    assert slot_compute_scales(pp2, 4, 2.0) == [0.5] * 2
    assert slot_compute_scales(pp2, 4, 4.0) == [1.0, 1.0]
    assert slot_compute_scales(Config.of("ring", 4), 4, 1.0) == [1.0]
    model = ModelShape(4, 256, 8, 4, 512, 1024)
    shared, own = (PlanInput(Cluster(4, 4, calibration=hand_calibration(matmul=m)), model, 4096, dtype="float32")
                   for m in ((1e11, 5e10), (5e10, 5e10)))
    assert (shared.hardware.compute_cores, own.hardware.compute_cores) == (2.0, 4.0)
    pipelined = [evaluate(inp, mesh_candidate(inp, "ring", 2, pp=2)).step_time for inp in (shared, own)]
    flat = [evaluate(inp, candidate("ring", 4)).step_time for inp in (shared, own)]
    assert pipelined[0] < pipelined[1] and flat[0] == flat[1]
    assert PlanInput(Cluster(4, 4), model, 4096).hardware.compute_cores == 4.0  # devices: no sharing
