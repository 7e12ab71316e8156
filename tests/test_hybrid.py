"""Hybrid parallelism: dp x sp x tp on one mesh, tensor parallelism on torch's DTensor.

Every tensor-parallel training run is compared with the 1-process run of the same global
batch, fp64: per-step loss and gradient norm (1e-9 relative) and every first-step gradient
(full tensors gathered from the DTensor shards, 1e-10 of the largest value). The TP traffic
the trainer counts equals the planner's formula byte for byte.
"""
import pytest

import test_train
from checks.hybrid import init_error, layout_groups
from checks.train import run_training
from seqpar.data import stdlib_corpus
from seqpar.plan.tensor import tensor_parallel_traffic
from seqpar.train import TrainConfig
from test_train import assert_gradients_match, assert_losses_match, config

corpus, reference = test_train.corpus, test_train.reference  # the same module fixtures (corpus, 1-process run)


def test_mesh_order_tp_innermost(worlds):
    """rank = (dp_rank * sp + sp_rank) * tp + tp_rank: tp groups are consecutive ranks."""
    results = worlds.run(8, layout_groups, 2, 2)
    for rank, r in enumerate(results):
        dp, sp, tp = r["coords"]
        assert rank == (dp * 2 + sp) * 2 + tp
        assert r["members"]["tp"] == [rank - tp, rank - tp + 1]
        assert r["members"]["sp"] == [dp * 4 + tp, dp * 4 + 2 + tp]
        assert r["members"]["dp"] == [sp * 2 + tp, 4 + sp * 2 + tp]
        assert r["members"]["batch"] == [tp, 2 + tp, 4 + tp, 6 + tp]
        assert r["mesh"] == ((2, 2, 2), ("dp", "sp", "tp")) and r["batch_mesh"] == (4,)
        assert r["ctx_ranks"] == r["members"]["sp"]  # seqpar.init(group=DeviceMesh) takes its "sp" dimension


def test_init_with_a_mesh_without_sp_dimension_is_an_error(worlds):
    assert all("name its sequence-parallel dimension 'sp'" in e for e in worlds.run(4, init_error))


CASES = [
    (2, dict(tp=2)),
    (4, dict(tp=2, strategy="ring", layout="zigzag")),
    (4, dict(tp=2, strategy="usp", ulysses=2)),
    (4, dict(tp=2, strategy="wallfacer", team_size=1, layout="zigzag")),
    (4, dict(tp=2, dp=2, batch=1, fsdp=True)),
    (4, dict(tp=2, strategy="ring", layout="zigzag", activation_checkpointing=True)),
]


@pytest.mark.parametrize("world,overrides", CASES, ids=["tp2", "tp2-ring2", "tp2-usp2", "tp2-wallfacer2",
                                                          "dp2-tp2-fsdp", "tp2-ring2-checkpointing"])
def test_tensor_parallel_parity_with_one_process(worlds, corpus, tmp_path, reference, world, overrides):
    results = worlds.run(world, run_training, config(corpus, tmp_path, **overrides), gradients=True)
    got = results[0]
    assert_losses_match(got["losses"], reference["losses"])
    assert_gradients_match(got, reference)
    (step, val), = got["val_losses"]
    assert abs(val - reference["val_losses"][0][1]) <= 1e-9 * val
    cfg = TrainConfig.of(**config(corpus, tmp_path, **overrides))
    sp = cfg.sp_size(world)
    m = cfg.model_config()
    expected = tensor_parallel_traffic(
        tp=2, n_layers=m.n_layers, dim=m.dim, tokens=cfg.data.batch * cfg.data.seq_len // sp, act_bytes=8,
        loss_bytes=8, norm_params=(2 * m.n_layers + 1) * m.dim, param_bytes=8,
        recompute=cfg.model.activation_checkpointing, fsdp=cfg.parallel.fsdp)
    for record in (r for r in got["records"] if r["type"] == "train"):
        counted = {k: v for k, v in record["comm"].items() if k.startswith("tp_")}
        assert counted == expected, f"step {record['step']}"


@pytest.mark.parametrize("overrides,message", [
    (dict(tp=3), "x tp (3) must equal the number of processes (4)"),
    (dict(tp=4, n_heads=4, n_kv_heads=2), "--tp 4 must divide n_heads (4) and n_kv_heads (2)"),
    (dict(tp=2, seq_len=66, strategy="ring", layout="contiguous"), "--tp 2 must divide each sequence-parallel"),
    (dict(tp=2, loss_chunks=2), "drop --mlp-chunks, --loss-chunks"),
    (dict(tp=2, model="dit", n_heads=4, n_kv_heads=1), "--tp 2 must divide n_heads (4) and n_kv_heads (1)"),
    (dict(tp=2, strategy="usp", ulysses=2, n_heads=2, n_kv_heads=2, dim=32), "must divide the number of "
                                                                              "attention heads"),
])
def test_bad_tensor_parallel_layouts_are_one_line_errors(overrides, message, corpus, tmp_path):
    from seqpar.train.launch import check
    data = {} if overrides.get("model") == "dit" else {"data": corpus}
    cfg = TrainConfig.of(**{**config(corpus, tmp_path, nproc=4, **overrides), "data": "", **data})
    with pytest.raises(ValueError) as info:
        check(cfg, 4)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("first,then", [
    (dict(tp=2, strategy="ring", layout="zigzag"), dict(strategy="ring", layout="zigzag")),  # tp2 x sp2 -> sp4
    (dict(strategy="ring", layout="zigzag"), dict(tp=2, dp=2, batch=1, fsdp=True)),         # sp4 -> dp2 x tp2, FSDP
], ids=["tp2xsp2-to-sp4", "sp4-to-dp2xtp2-fsdp"])
def test_checkpoints_resume_at_another_layout(worlds, corpus, tmp_path, first, then):
    """A checkpoint written at one layout resumes at another through DCP's resharding: the resumed
    steps equal an uninterrupted run at the new layout (weights and AdamW state carried exactly)."""
    steps = dict(steps=4, checkpoint_every=2, eval_every=0)
    straight = worlds.run(4, run_training, config(corpus, tmp_path / "straight", **then, **steps))[0]
    worlds.run(4, run_training, config(corpus, tmp_path / "run", **first, **{**steps, "steps": 2}))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    resumed = worlds.run(4, run_training, config(corpus, tmp_path / "run", **then, **steps, resume=str(ckpt)))[0]
    assert len(resumed["losses"]) == 2
    for a, b in zip(resumed["losses"], straight["losses"][2:]):
        assert abs(a - b) <= 1e-9 * abs(b), (resumed["losses"], straight["losses"])


def test_dit_tensor_parallel_parity_with_one_process(worlds, tmp_path):
    """The DiT at tp2 x sp2 (heads and MLP split over tp, tokens over sp): per-step loss, grad norm
    and every first-step gradient equal the 1-process run (fp64)."""
    from test_dit import DIT_TRAIN
    ref = worlds.run(1, run_training, {**DIT_TRAIN, "out_dir": str(tmp_path / "ref")}, gradients=True)[0]
    got = worlds.run(4, run_training, {**DIT_TRAIN, "strategy": "ring", "layout": "zigzag", "tp": 2,
                                       "out_dir": str(tmp_path / "tp")}, gradients=True)[0]
    assert_losses_match(got["losses"], ref["losses"])
    assert_gradients_match(got, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_tensor_parallel_parity_with_one_process(worlds, tmp_path, arch):
    """A Hugging Face decoder (Llama; Qwen2 with q/k/v biases and tied embeddings) at tp2 x sp2 by
    its own transformers TP plan applied with torch's parallelize_module: per-step loss, grad norm
    and every first-step gradient equal the 1-process run (fp64)."""
    from transformers import LlamaConfig, Qwen2Config

    from test_hf import SHAPE
    model_dir = tmp_path / arch
    make = {"llama": LlamaConfig, "qwen2": lambda **kw: Qwen2Config(**kw, tie_word_embeddings=True)}[arch]
    make(**{**SHAPE, "vocab_size": 256}).save_pretrained(model_dir)
    base = dict(hf_model=str(model_dir), data=str(stdlib_corpus(tmp_path / "corpus", max_bytes=40_000)), seq_len=64,
                batch=2, steps=3, warmup=1, lr=1e-2, min_lr=1e-3, dtype="float64", eval_every=0, eval_batches=1,
                checkpoint_every=0, progress=False, plot=False, strategy="local", layout="contiguous")
    ref = worlds.run(1, run_training, {**base, "out_dir": str(tmp_path / "ref")}, gradients=True)[0]
    got = worlds.run(4, run_training, {**base, "strategy": "ring", "layout": "zigzag", "tp": 2,
                                       "out_dir": str(tmp_path / "tp")}, gradients=True)[0]
    assert_losses_match(got["losses"], ref["losses"])
    assert_gradients_match(got, ref)
