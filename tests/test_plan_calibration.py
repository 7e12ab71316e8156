"""`seqpar plan --calibrate / --calibration / --profile` and the "what makes it fit" advice.

Calibrations are measured on real 4-rank gloo worlds with tiny sizes (fast; their numbers are
not asserted, only their shape), or written by hand where a test needs known numbers. No
test asserts a timing value.
"""
import json
import math

import pytest

from seqpar import cli
from seqpar.plan import (
    MODEL_PRESETS,
    Calibration,
    Cluster,
    Config,
    KernelTable,
    LinkFit,
    ModelShape,
    PlanInput,
    add_arguments,
    calibrated_peak_flops,
    evaluate,
    fit_suggestions,
    measure,
    plan,
    plan_input_from_args,
    profile,
    profile_rank,
)
from seqpar.plan.calibrate import link_partitions
from seqpar.plan.hardware import CALIBRATED_KINDS, KERNEL_COLUMNS, fit_alpha_beta

QUICK = {"sizes": (1024, 16384), "kernel_sizes": (16, 32), "repeats": 1, "target_s": 0.005}


def quick_calibration(worlds, ranks_per_node=4, **kw):
    run = lambda fn, **kwargs: worlds.run(4, fn, **kwargs)[0]  # noqa: E731
    return measure(run, 4, ranks_per_node=ranks_per_node, heads=2, kv_heads=1, head_dim=8, **QUICK, **kw)


def hand_calibration(a2a_beta=1e-9, slots=4.0, world=4, together_factor=1.0, sync_s=0.0,
                     matmul=(1e11, 5e10)) -> Calibration:
    """Known numbers: every link 10 us + 1 ns/B (all-to-all: a2a_beta), kernel time = pairs x 1 ns
    per row alone (`together_factor` x when every rank computes), matmul FLOP/s (alone, every
    rank at once): 1e11 / 5e10, i.e. 4 ranks sharing 2 cores."""
    sizes = (64, 256, 1024)
    alone = {c: tuple((n * (n + 1) / 2 if c.startswith("causal") else n * n) * 1e-9 * (2.5 if c.endswith("bwd")
                                                                                        else 1.0) for n in sizes)
             for c in KERNEL_COLUMNS}
    together = {c: tuple(t * together_factor for t in v) for c, v in alone.items()}
    fits = {k: LinkFit(1e-5, a2a_beta if k == "all_to_all" else 1e-9) for k in CALIBRATED_KINDS}
    return Calibration(world, world, 1, 2, "cpu", "gloo", "test", "2026-01-01", slots, 0.0, sync_s, 1e9,
                       {"intra": fits}, {"float32": KernelTable(1, 1, 8, sizes, alone, together)},
                       {"float32": matmul})


# -- calibration: measurement shape, JSON --------------------------------------------------------------
def test_calibration_shape_and_json_round_trip(worlds, tmp_path):
    for rpn in (4, 2):
        cal = quick_calibration(worlds, rpn)
        classes = {c for c, _ in link_partitions(4, rpn)}
        assert set(cal.links) == classes == ({"intra"} if rpn == 4 else {"intra", "inter"})
        for link_class, fits in cal.links.items():
            assert set(fits) == set(CALIBRATED_KINDS)
            groups = {len(blocks[0]) for c, blocks in link_partitions(4, rpn) if c == link_class}
            for fit in fits.values():
                assert fit.alpha_s >= 0 and fit.beta_s_per_byte >= 0 and math.isfinite(fit.alpha_s)
                assert len(fit.points) == len(groups) * len(QUICK["sizes"])
                assert {n for n, _, _ in fit.points} == groups
                assert all(b > 0 and math.isfinite(t) and t > 0 for _, b, t in fit.points)
        table = cal.kernels["float32"]
        assert table.sizes == QUICK["kernel_sizes"] and (table.heads, table.kv_heads, table.head_dim) == (2, 1, 8)
        for mode in (table.alone, table.together):
            assert set(mode) == set(KERNEL_COLUMNS)
            assert all(len(v) == 2 and all(math.isfinite(t) and t > 0 for t in v) for v in mode.values())
        assert 1 <= cal.slots <= 4 and 0 <= cal.overlap <= 1 and cal.sync_s >= 0
        assert all(x > 0 for x in (cal.host_bw, *cal.matmul_flops["float32"])) and cal.threads >= 1
        path = tmp_path / f"cal{rpn}.json"
        cal.save(path)
        again = Calibration.load(path)
        assert again.to_dict() == cal.to_dict() == json.loads(path.read_text())


def test_alpha_beta_fit_recovers_a_line():
    points = [(n, b, 3 * (n - 1) * 1e-5 + b * 2e-9) for n in (2, 4) for b in (1000, 10 ** 5, 10 ** 6)]
    fit = fit_alpha_beta("all_gather", points)
    assert fit.alpha_s == pytest.approx(3e-5) and fit.beta_s_per_byte == pytest.approx(2e-9)
    flat = fit_alpha_beta("p2p", [(2, 10, 1e-3), (2, 10 ** 6, 0.9e-3)])  # noisy: negative slope refitted at 0
    assert flat.beta_s_per_byte == 0 and flat.alpha_s > 0


@pytest.mark.parametrize("mutate,message", [
    (lambda d: "{not json", "invalid JSON"),
    (lambda d: {**d, "schema": "other/9"}, "schema"),
    (lambda d: {**d, "slots": -1}, "slots must be a finite number > 0"),
    (lambda d: {**d, "links": {"intra": {**d["links"]["intra"], "p2p": {"alpha_s": "x", "beta_s_per_byte": 1}}}},
     "links.intra.p2p.alpha_s"),
    (lambda d: {**d, "links": {"intra": {"p2p": d["links"]["intra"]["p2p"]}}}, "lacks"),
    (lambda d: {**d, "kernels": {"float32": {**d["kernels"]["float32"], "sizes": [64, 32, 1024]}}}, "increasing"),
    (lambda d: {**d, "world": 1}, "world must be an integer >= 2"),
])
def test_corrupt_calibration_file_is_a_clear_error(tmp_path, capsys, mutate, message):
    bad = mutate(hand_calibration().to_dict())
    path = tmp_path / "bad.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError, match=message) as info:
        Calibration.load(path)
    assert str(path) in str(info.value)
    assert cli.main(["plan", "--world", "4", "--model", "tiny", "--seq-len", "256", "--calibration", str(path)]) == 2
    assert f"seqpar plan: error: {path}" in capsys.readouterr().err


def test_mismatched_calibration_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "cal.json"
    hand_calibration().save(path)
    assert cli.main(["plan", "--world", "16", "--ranks-per-node", "8", "--model", "tiny", "--seq-len", "1024",
                     "--calibration", str(path)]) == 2
    assert "no 'inter' link measurements" in capsys.readouterr().err
    assert cli.main(["plan", "--world", "4", "--model", "tiny", "--seq-len", "1024", "--dtype", "bfloat16",
                     "--calibration", str(path)]) == 2
    assert "no attention kernel timings for bfloat16" in capsys.readouterr().err


# -- predictions on a calibration ------------------------------------------------------------------
def planned(capsys, *extra):
    assert cli.main(["plan", "--world", "4", "--model", "tiny", "--seq-len", "4096", "--dtype", "float32",
                     "--json", *extra]) == 0
    return {c["label"]: c for c in json.loads(capsys.readouterr().out)["candidates"]}


def test_calibration_file_changes_predictions(tmp_path, capsys):
    flags = planned(capsys)
    fast, slow_a2a = tmp_path / "fast.json", tmp_path / "slow_a2a.json"
    hand_calibration().save(fast)
    hand_calibration(a2a_beta=1e-6).save(slow_a2a)
    on_fast, on_slow = planned(capsys, "--calibration", str(fast)), planned(capsys, "--calibration", str(slow_a2a))
    assert {k: v["step_time_s"] for k, v in on_fast.items()} != {k: v["step_time_s"] for k, v in flags.items()}
    assert on_fast["ring zigzag"]["comm_bytes_per_layer"] == flags["ring zigzag"]["comm_bytes_per_layer"]
    # a slow all-to-all makes Ulysses slower than ring, and changes nothing for ring
    assert on_slow["ring zigzag"]["step_time_s"] == on_fast["ring zigzag"]["step_time_s"]
    assert on_slow["ulysses contiguous"]["step_time_s"] > on_fast["ulysses contiguous"]["step_time_s"]
    assert on_slow["ulysses contiguous"]["step_time_s"] > on_slow["ring zigzag"]["step_time_s"]


def test_shared_cores_make_imbalance_cheaper():
    """With 4 ranks on 2 slots, every rank computing costs twice its time alone; a causal
    contiguous ring step where half the ranks idle costs no more than one block alone."""
    model = ModelShape(1, 64, 8, 8, 128, 256)
    times = {}
    for factor in (1.0, 2.0):
        inp = PlanInput(Cluster(4, 4, calibration=hand_calibration(together_factor=factor, slots=4 / factor)), model,
                        1024, 1, "float32", True)
        times[factor] = {lay: evaluate(inp, Config.of("ring", 4, layout=lay)) for lay in ("zigzag", "contiguous")}
        times[factor] = {lay: c.attention_time - c.exposed_comm_time for lay, c in times[factor].items()}  # compute
    assert times[2.0]["zigzag"] == pytest.approx(2 * times[1.0]["zigzag"], rel=0.02)  # balanced: all share
    assert times[2.0]["contiguous"] / times[1.0]["contiguous"] < 1.7  # the idle ranks' cores go to the busy ones


def test_calibrated_peak_flops_is_the_together_rate(tmp_path):
    cal = hand_calibration()
    cal.save(tmp_path / "c.json")
    assert calibrated_peak_flops(cal) == calibrated_peak_flops(tmp_path / "c.json") == 5e10


# -- --profile: every valid candidate, predicted vs measured ---------------------------------------------
def test_profile_reports_every_valid_candidate(worlds):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--world", "4", "--ranks-per-node", "2", "--model", "tiny", "--seq-len", "64",
                              "--kv-heads", "2", "--profile-iters", "1", "--profile-warmup", "0",
                              "--profile-confirm", "1",
                              "--profile-head-dim", "8", "--dtype", "float32"])
    inp = plan_input_from_args(args)
    cal = quick_calibration(worlds, 2)
    inp = PlanInput(Cluster(4, 2, calibration=cal), inp.model, inp.seq_len, 1, "float32", True)
    candidates = plan(inp)
    report = profile(inp, candidates, args, calibration=cal,
                     runner=lambda world, configs, kw: worlds.run(world, profile_rank, configs, **kw)[0])
    valid = {c.label for c in candidates if c.valid and not c.config.hybrid}  # --profile runs one attention layer
    assert {c.label for c in report.candidates} == valid and len(valid) > 10
    for c in report.candidates:
        m = c.measured
        assert m["seconds"] > 0 and m["predicted_seconds"] > 0 and len(m["times"]) == 1
        assert m["bytes"] == m["predicted_bytes"] != {}, c.label  # measured bytes == predicted bytes
    assert report.regret >= 1 and report.confirmed_regret >= 1 and -1 <= report.spearman <= 1
    assert report.predicted_best in valid and report.measured_best == report.candidates[0].label
    assert json.dumps(report.to_dict())


# -- what makes it fit ---------------------------------------------------------------------------------
def test_fit_suggestion_for_llama7b_on_32_ranks_really_fits(capsys):
    base = ["plan", "--model", "llama-7b", "--world", "32", "--seq-len", "32768", "--json"]
    assert cli.main(base) == 0  # tensor parallelism shards the ZeRO-0 states: some mesh fits
    assert any(c["fits"] and c["mesh"]["tp"] > 1 for c in json.loads(capsys.readouterr().out)["candidates"])
    base += ["--tp", "1", "--pp", "1"]  # sequence parallelism alone: nothing fits
    assert cli.main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert not any(c["fits"] for c in out["candidates"] if c["valid"])
    good = [s for s in out["fit_suggestions"] if s["fits"]]
    assert good and good[0]["flags"] == "--zero 1"
    for s in good:  # re-plan with each suggested change: a candidate fits, the one named
        assert cli.main(base + s["flags"].split()) == 0
        again = json.loads(capsys.readouterr().out)
        fitting = [c for c in again["candidates"] if c["valid"] and c["fits"]]
        assert fitting and fitting[0]["label"] == s["best"] and "fit_suggestions" not in again
        assert fitting[0]["memory_bytes"]["total"] == s["memory_bytes"] <= 80 * 2 ** 30


def test_fit_suggestions_name_checkpointing_and_more_ranks():
    inp = PlanInput(Cluster(32, 8, memory_gib=40), MODEL_PRESETS["llama-7b"], 1 << 20, zero=3)
    fitting = [c for c in plan(inp) if c.valid and c.fits]  # FPDT's chunked blocks fit 1M tokens
    assert fitting and all(c.config.chunked_blocks for c in fitting)
    others = ["ring", "ulysses", "usp", "allgather", "wallfacer", "lss"]
    suggestions = {s.flags: s for s in fit_suggestions(inp, plan(inp, others), others)}
    assert suggestions["--activation-checkpointing"].fits and suggestions["--world 128"].fits
    assert fit_suggestions(PlanInput(Cluster(32, 8), MODEL_PRESETS["llama-7b"], 32768, zero=1),
                           plan(PlanInput(Cluster(32, 8), MODEL_PRESETS["llama-7b"], 32768, zero=1))) is None
