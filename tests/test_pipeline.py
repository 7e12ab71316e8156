"""Pipeline parallelism (torch.distributed.pipelining) with sequence parallelism: exactness.

Every pipeline run is compared with the 1-process run of the same global batch, fp64: per-step
loss and gradient norm (1e-9 relative) and every first-step gradient (each stage's gradients
gathered over the pipeline group: the comparison covers every parameter). The P2P bytes the
stages count equal the activation formula.
"""
import pytest

import test_train
from checks.pipeline import pipeline_layout, pipeline_step
from checks.train import run_training
from seqpar.pipeline import VIRTUAL_STAGES, pipeline_p2p_bytes
from seqpar.train import TrainConfig
from test_train import BASE, assert_gradients_match, assert_losses_match, config

corpus, reference = test_train.corpus, test_train.reference  # the same module fixtures (corpus, 1-process run)
PP = dict(pp=2, eval_every=0)


@pytest.fixture(scope="module")
def reference4(worlds, corpus, tmp_path_factory):
    """The 1-process run of a 4-block model (2 stages x 2 virtual stages of interleaved-1f1b)."""
    return worlds.run(1, run_training, config(corpus, tmp_path_factory.mktemp("ref4"), n_layers=4), gradients=True)[0]


CASES = [
    (2, dict(pp_schedule="gpipe", microbatches=2)),
    (2, dict(pp_schedule="1f1b", microbatches=2)),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="ring", layout="zigzag")),
    (4, dict(pp_schedule="gpipe", microbatches=1, strategy="ulysses")),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="lss", activation_checkpointing=True)),
    (4, dict(pp_schedule="1f1b", microbatches=2, tp=2)),
    (8, dict(pp_schedule="gpipe", microbatches=2, tp=2, strategy="ring", layout="zigzag")),
    (4, dict(pp_schedule="gpipe", microbatches=1, dp=2, batch=1, fsdp=True)),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="ulysses", fsdp=True)),
    (2, dict(pp_schedule="interleaved-1f1b", microbatches=2, n_layers=4)),
    (4, dict(pp_schedule="interleaved-1f1b", microbatches=2, n_layers=4, tp=2)),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="ring", layout="zigzag", compile=True,
             compile_backend="aot_eager")),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="usp", ulysses=2)),
    (4, dict(pp_schedule="gpipe", microbatches=2, strategy="wallfacer", team_size=1, layout="zigzag")),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="allgather")),
    (4, dict(pp_schedule="gpipe", microbatches=2, strategy="fpdt", chunks=2)),
]


@pytest.mark.parametrize("world,overrides", CASES, ids=["pp2-gpipe-mb2", "pp2-1f1b-mb2", "pp2-ring2-1f1b-mb2",
                                                          "pp2-ulysses2-gpipe-mb1", "pp2-lss2-1f1b-checkpointing",
                                                          "pp2-tp2-1f1b-mb2", "pp2-tp2-ring2-gpipe-mb2",
                                                          "dp2-pp2-fsdp-gpipe", "pp2-ulysses2-fsdp-1f1b-mb2",
                                                          "pp2-interleaved-mb2", "pp2-tp2-interleaved-mb2",
                                                          "pp2-ring2-1f1b-compiled", "pp2-usp2-1f1b",
                                                          "pp2-wallfacer2-gpipe", "pp2-allgather2-1f1b",
                                                          "pp2-fpdt2-gpipe"])
def test_pipeline_parity_with_one_process(worlds, corpus, tmp_path, reference, reference4, world, overrides):
    cfg = config(corpus, tmp_path, **PP, **overrides)
    ref = reference4 if overrides.get("n_layers") == 4 else reference
    results = worlds.run(world, run_training, cfg, gradients=True)
    got = results[0]
    assert_losses_match(got["losses"], ref["losses"])
    assert_gradients_match(got, ref)
    (_, val), = got["val_losses"]
    assert abs(val - ref["val_losses"][0][1]) <= 1e-9 * val
    assert all(r["losses"] == got["losses"] for r in results)  # every stage reports the global mean
    # P2P bytes: rank 0 sends one activation [microbatch, seq_local / tp, dim] (fp64) per microbatch and
    # stage boundary (stage 0: forward only; interleaved, its middle stage too: forward and backward)
    train = TrainConfig.of(**cfg)
    seq_local = BASE["seq_len"] // train.sp_size(world) // train.parallel.tp
    par = train.parallel
    sent, _ = pipeline_p2p_bytes(0, 2, microbatch=train.data.batch // par.microbatches, seq_local=seq_local,
                                 dim=BASE["dim"], element_size=8, microbatches=par.microbatches,
                                 virtual=VIRTUAL_STAGES[par.pp_schedule])
    assert sent == train.data.batch * seq_local * BASE["dim"] * 8 * (3 if "interleaved" in par.pp_schedule else 1)
    for record in (r for r in got["records"] if r["type"] == "train"):
        assert record["comm"]["pp_p2p"] == sent, f"step {record['step']}"


def test_mesh_order_pp_outermost(worlds):
    """rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank; the batch group stays in one stage."""
    for rank, r in enumerate(worlds.run(4, pipeline_layout, 2, 2)):
        pp, dp, sp, tp = r["coords"]
        assert (dp, tp) == (0, 0) and rank == pp * 2 + sp
        assert r["members"]["pp"] == [sp, 2 + sp]
        assert r["members"]["sp"] == r["members"]["batch"] == [2 * pp, 2 * pp + 1]
        assert r["members"]["dp"] == r["members"]["tp"] == [rank]
        assert r["mesh"] == ((2, 1, 2, 1), ("pp", "dp", "sp", "tp"))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_stages_hold_their_layers_and_count_p2p_bytes(worlds, corpus, tmp_path, schedule):
    """pp2 x sp2, 2 microbatches: stage 0 holds the embedding and blocks 0.., stage 1 the other blocks, the
    norm and the head, under their full names; every rank's counted P2P bytes (sent and received) equal
    the formula: activations [microbatch, seq_local, dim] x 8 bytes x microbatches, forward and backward."""
    cfg = config(corpus, tmp_path, **PP, pp_schedule=schedule, microbatches=2, strategy="ring", layout="zigzag",
                 n_layers=4)
    results = worlds.run(4, pipeline_step, cfg)
    for r in results:
        first = r["stage"] == 0
        assert ("tok_embeddings.weight" in r["names"]) == first and ("output.weight" in r["names"]) != first
        assert {n.split(".")[1] for n in r["names"] if n.startswith("layers.")} == ({"0", "1"} if first
                                                                                  else {"2", "3"})
        expect = pipeline_p2p_bytes(r["stage"], 2, microbatch=1, seq_local=32, dim=BASE["dim"], element_size=8,
                                    microbatches=2)
        assert (r["sent"], r["recv"]) == expect == (2 * 32 * BASE["dim"] * 8,) * 2


def test_microbatching_keeps_the_global_token_mean(worlds, corpus, tmp_path):
    """pp2 with 1 and with 2 microbatches (labels unevenly ignored per microbatch: packed documents):
    the same per-step losses and gradient norms (the loss is normalised by the global token count)."""
    runs = [worlds.run(2, run_training, config(corpus, tmp_path / f"mb{m}", **PP, microbatches=m))[0]
            for m in (1, 2)]
    assert_losses_match(runs[1]["losses"], runs[0]["losses"])
    norms = [[r["grad_norm"] for r in run["records"] if r["type"] == "train"] for run in runs]
    assert norms[1] == pytest.approx(norms[0], rel=1e-9)


def test_bf16_pipeline_parity(worlds, corpus, tmp_path):
    """pp2 x sp2 (ring, 1f1b, 2 microbatches) under bf16 autocast (forward and backward of the schedule)
    vs the 1-process bf16 run: per-step losses within 2e-2 relative (test_train's bf16 bound)."""
    cfg = dict(dtype="bfloat16", eval_every=0)
    ref = worlds.run(1, run_training, config(corpus, tmp_path / "ref", **cfg))[0]
    got = worlds.run(4, run_training, config(corpus, tmp_path / "pp", **cfg, pp=2, pp_schedule="1f1b",
                                             microbatches=2, strategy="ring", layout="zigzag"))[0]
    assert_losses_match(got["losses"], ref["losses"], rel=2e-2)


def test_a_pp2_checkpoint_resumes_at_pp1(worlds, corpus, tmp_path):
    """Stages save their parameters and AdamW state under the full names (DCP), so a pp2 checkpoint
    resumes in one process: the resumed steps equal an uninterrupted 1-process run."""
    steps = dict(steps=4, checkpoint_every=2, eval_every=0)
    straight = worlds.run(1, run_training, config(corpus, tmp_path / "straight", **steps))[0]
    worlds.run(2, run_training, config(corpus, tmp_path / "run", pp=2, **{**steps, "steps": 2}))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    resumed = worlds.run(1, run_training, config(corpus, tmp_path / "run", **steps, resume=str(ckpt)))[0]
    assert len(resumed["losses"]) == 2
    for a, b in zip(resumed["losses"], straight["losses"][2:]):
        assert abs(a - b) <= 1e-9 * abs(b), (resumed["losses"], straight["losses"])


def test_a_pp1_checkpoint_resumes_at_pp2(worlds, corpus, tmp_path):
    """And back: a 1-process checkpoint resumes on two pipeline stages (each loads its blocks and
    their AdamW state by name); the resumed steps equal the uninterrupted 1-process run."""
    steps = dict(steps=4, checkpoint_every=2, eval_every=0)
    straight = worlds.run(1, run_training, config(corpus, tmp_path / "run", **steps))[0]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    resumed = worlds.run(2, run_training, config(corpus, tmp_path / "pp2", pp=2, **steps, resume=str(ckpt)))[0]
    assert len(resumed["losses"]) == 2
    for a, b in zip(resumed["losses"], straight["losses"][2:]):
        assert abs(a - b) <= 1e-9 * abs(b), (resumed["losses"], straight["losses"])


@pytest.mark.parametrize("overrides,message", [
    (dict(pp=3), "pp (3) x dp (1) x sp (auto) x tp (1) must equal the number of processes (4)"),
    (dict(pp=2, n_layers=3), "n_layers (3) must be divisible by the 2 pipeline stages (--pp 2)"),
    (dict(pp=2, batch=3, microbatches=2), "--batch (3) must be divisible by --microbatches (2)"),
    (dict(pp=2, pp_schedule="interleaved-1f1b"), "n_layers (2) must be divisible by the 4 pipeline stages (--pp 2 "
                                                  "x 2 virtual stages of interleaved-1f1b)"),
    (dict(pp=2, pp_schedule="interleaved-1f1b", n_layers=4, fsdp=True), "not with --fsdp and interleaved-1f1b yet"),
    (dict(pp=2, pp_schedule="zb"), "unknown pp_schedule 'zb'"),
    (dict(pp=2, pp_schedule="1f1b"), "--pp-schedule 1f1b needs --microbatches >= --pp (2), got 1"),
    (dict(microbatches=2), "--microbatches 2 splits the batch of a pipeline: it needs --pp > 1"),
    (dict(pp=2, model="dit"), "not with --model dit yet"),
    (dict(pp=2, loss_chunks=2), "not with --mlp-chunks / --loss-chunks yet"),
    (dict(pp=2, strategy="fpdt", chunked_blocks=True), "not with --chunked-blocks yet"),
])
def test_unsupported_pipelines_are_one_line_errors(corpus, tmp_path, overrides, message):
    data = "" if overrides.get("model") == "dit" else corpus  # the DiT trains on its own photos
    cfg = TrainConfig.of(**{**config(corpus, tmp_path, nproc=4, **overrides), "data": data})
    with pytest.raises(ValueError) as info:
        cfg.validate(4)
    assert message in str(info.value) and "\n" not in str(info.value)
