"""`--strategy auto --auto-profile K`: the planner's candidates, hybrid meshes included, measured
as training steps on a real world; the report's regret and the measured choice. Times are
measured, never asserted: the checks are on what ran, its bytes and the report's arithmetic."""
import json
import statistics

import pytest

from seqpar.data import stdlib_corpus
from seqpar.train import TrainConfig
from seqpar.train.auto import runnable_candidates
from seqpar.train.auto_profile import (
    choose_by_measurement,
    measured_choice,
    profile_candidates,
    profile_steps_rank,
    profiled_candidates,
    profiled_runs,
)
from test_plan_calibration import hand_calibration

# heads 4 / kv 2 on 4 ranks: sequence parallelism alone, tp2 x sp2 and pp2 meshes are all candidates
RUN = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, seq_len=256, nproc=4, strategy="auto",
           auto_profile=1, auto_profile_steps=2)


def _runner(worlds):
    return lambda configs, steps, warmup: worlds.run(4, profile_steps_rank, configs, steps, warmup)[0]


def test_auto_profile_trains_the_best_of_every_mesh_and_reports_the_regret(worlds, tmp_path):
    data = str(stdlib_corpus(tmp_path / "corpus", max_bytes=60_000))
    cfg = TrainConfig.of(**RUN, out_dir=str(tmp_path / "run"))
    cal = hand_calibration()
    chosen, report, line = choose_by_measurement(cfg, 4, cal, data, runner=_runner(worlds))
    measured = report.candidates
    meshes = [(c.config.tp, c.config.pp) for c in measured]
    assert len(set(meshes)) == len(meshes) and {(1, 1), (2, 1), (1, 2)} <= set(meshes), meshes
    for c in measured:
        m = c.measured
        assert len(m["times"]) == 2 and m["seconds"] == statistics.median(m["times"]) > 0, c.label
        # what a profiled step sends over the tp group is the planner's count, byte for byte
        tp_bytes = {k: v for k, v in m["bytes"].items() if k.startswith("tp_")}
        assert tp_bytes == {k: v for k, v in c.mesh_bytes.items() if k.startswith("tp_")}, c.label
        assert (c.config.tp > 1) == bool(tp_bytes)
    fastest = min(measured, key=lambda c: c.measured["seconds"])
    planners = next(c for c in measured if c.label == report.predicted_best)
    assert planners is min(measured, key=lambda c: c.step_time)  # the planner's pick is its first candidate
    assert report.regret == pytest.approx(planners.measured["seconds"] / fastest.measured["seconds"])
    assert report.measured_best == fastest.label and -1 <= report.spearman <= 1
    # the run trains a measured candidate with its mesh; nothing of the profile in the run's own files
    picked = next(c for c in measured if c.label in line.split(" picked ")[1])
    assert (chosen.parallel.strategy, chosen.parallel.tp, chosen.parallel.pp) == \
        (picked.config.strategy, picked.config.tp, picked.config.pp)
    assert chosen.parallel.auto_profile == 0 and chosen.output.out_dir == cfg.output.out_dir
    chosen.validate(4)
    saved = json.loads((tmp_path / "run" / "auto_profile.json").read_text())
    assert saved["regret"] == pytest.approx(report.regret) and len(saved["candidates"]) == len(measured)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _FakeRunner:
    """Known step times per config (by strategy, tp, pp); records what it was asked to run."""

    def __init__(self, seconds, again):
        self.seconds, self.again, self.calls = seconds, again, []

    def __call__(self, configs, steps, warmup):
        self.calls.append(configs)
        table = self.seconds if len(self.calls) == 1 else self.again
        return [{"seconds": table[i], "times": [table[i]] * steps, "bytes": {}} for i in range(len(configs))]


def _runs(tmp_path):
    cfg = TrainConfig.of(**RUN, out_dir=str(tmp_path))
    runnable = profiled_candidates(runnable_candidates(cfg, 4, hand_calibration(), memory_gib=8.0), 2)
    return profiled_runs(runnable, cfg, "corpus.bin")


def test_the_regret_confirmation_and_the_measured_choice(tmp_path):
    runs = _runs(tmp_path)
    n = len(runs)
    assert n >= 3 and all(run.output.out_dir.startswith(str(tmp_path / "auto_profile")) for _, run in runs)
    # the third candidate measures fastest, confirmed on its own: it is trained, regret 2 / 1
    times = [2.0] + [3.0] * (n - 1)
    times[2] = 1.0
    runner = _FakeRunner(times, again=[2.2, 1.1])
    report = profile_candidates(runs, 4, steps=3, warmup=1, confirm=4, runner=runner)
    assert report.regret == pytest.approx(2.0) and report.confirmed_regret == pytest.approx(2.0)
    assert [cfg.output.out_dir for cfg in runner.calls[1]] == [runs[0][1].output.out_dir, runs[2][1].output.out_dir]
    assert measured_choice(report, runs)[0] is runs[2][0]
    # re-measured alone the two run equally: the planner's pick stays
    report = profile_candidates(runs, 4, steps=3, warmup=1, confirm=4, runner=_FakeRunner(times, again=[1.0, 1.0]))
    assert report.confirmed_regret == 1.0 and measured_choice(report, runs)[0] is runs[0][0]
    # the planner's pick measured fastest: no confirmation run
    runner = _FakeRunner([1.0] + [2.0] * (n - 1), again=[])
    report = profile_candidates(runs, 4, steps=3, warmup=1, confirm=4, runner=runner)
    assert report.regret == 1.0 == report.confirmed_regret and len(runner.calls) == 1
    # a candidate that fails is reported, not measured
    failing = lambda configs, steps, warmup: [{"error": "ValueError: no"}] + [  # noqa: E731
        {"seconds": 1.0, "times": [1.0], "bytes": {}} for _ in configs[1:]]
    report = profile_candidates(runs, 4, steps=1, runner=failing)
    assert report.candidates[-1].measured["error"] == "ValueError: no" and report.predicted_best != runs[0][0].label


def test_auto_profile_options_are_validated():
    with pytest.raises(ValueError, match="measures the candidates of --strategy auto"):
        TrainConfig.of(strategy="ring", auto_profile=2).validate(4)
    with pytest.raises(ValueError, match="auto_profile_steps must be >= 1"):
        TrainConfig.of(strategy="auto", auto_profile=2, auto_profile_steps=0).validate(4)
    with pytest.raises(ValueError, match="auto_profile must be >= 0"):
        TrainConfig.of(strategy="auto", auto_profile=-1).validate(4)


def test_a_profile_runs_under_the_output_directorys_lock(tmp_path, capsys):
    """A run already holds the output directory: --auto-profile refuses in one line before it
    trains anything there (it used to profile first, beside the other run's files)."""
    from seqpar import cli
    from seqpar.train.control import RunLock
    out, cal = tmp_path / "run", tmp_path / "cal.json"
    out.mkdir()
    hand_calibration().save(cal)
    held = RunLock(out).acquire()  # this live process holds it
    try:
        rc = cli.main(["train", "--config", "tiny", "--strategy", "auto", "--auto-profile", "1", "--calibration",
                       str(cal), "--nproc", "4", "--seq-len", "256", "--no-progress", "--out-dir", str(out)])
    finally:
        held.release()
    err = capsys.readouterr().err
    assert rc == 2 and "is in use by pid" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "auto_profile").exists() and not (out / "auto_profile.json").exists()
