"""Pipeline parallelism (torch.distributed.pipelining) with sequence parallelism: exactness.

Every pipeline run is compared with the 1-process run of the same global batch, fp64: per-step
loss and gradient norm (1e-9 relative) and every first-step gradient (each stage's gradients
gathered over the pipeline group: the comparison covers every parameter). The P2P bytes the
stages count equal the activation formula.
"""
import pytest

from checks.train import run_training
from seqpar.data import stdlib_corpus
from seqpar.pipeline import pipeline_p2p_bytes
from seqpar.train import TrainConfig
from test_train import BASE, assert_gradients_match, assert_losses_match

PP = dict(pp=2, eval_every=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=60_000))


def config(corpus, out_dir, **overrides):
    return {**BASE, "data": corpus, "out_dir": str(out_dir), **overrides}


@pytest.fixture(scope="module")
def reference(worlds, corpus, tmp_path_factory):
    return worlds.run(1, run_training, config(corpus, tmp_path_factory.mktemp("ref")), gradients=True)[0]


CASES = [
    (2, dict(pp_schedule="gpipe", microbatches=2)),
    (2, dict(pp_schedule="1f1b", microbatches=2)),
    (4, dict(pp_schedule="1f1b", microbatches=2, strategy="ring", layout="zigzag")),
    (4, dict(pp_schedule="gpipe", microbatches=1, strategy="ulysses")),
]


@pytest.mark.parametrize("world,overrides", CASES, ids=["pp2-gpipe-mb2", "pp2-1f1b-mb2", "pp2-ring2-1f1b-mb2",
                                                          "pp2-ulysses2-gpipe-mb1"])
def test_pipeline_parity_with_one_process(worlds, corpus, tmp_path, reference, world, overrides):
    cfg = config(corpus, tmp_path, **PP, **overrides)
    results = worlds.run(world, run_training, cfg, gradients=True)
    got = results[0]
    assert_losses_match(got["losses"], reference["losses"])
    assert_gradients_match(got, reference)
    (_, val), = got["val_losses"]
    assert abs(val - reference["val_losses"][0][1]) <= 1e-9 * val
    assert all(r["losses"] == got["losses"] for r in results)  # every stage reports the global mean
    # P2P bytes: one activation [microbatch, seq_local, dim] (fp64) per microbatch forward, its gradient back
    train = TrainConfig.of(**cfg)
    mbs = train.parallel.microbatches
    sent, _ = pipeline_p2p_bytes(0, 2, BASE["batch"] // mbs, BASE["seq_len"] // train.sp_size(world), BASE["dim"],
                                 8, mbs)
    assert sent == 2 * BASE["batch"] * BASE["seq_len"] // train.sp_size(world) * BASE["dim"] * 8 // 2 * 2 // 2
    for record in (r for r in got["records"] if r["type"] == "train"):
        assert record["comm"]["pp_p2p"] == sent, f"step {record['step']}"
