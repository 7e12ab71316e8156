"""The DiT: config validation, patch tokens, the rectified-flow objective, sequence-parallel
training steps and sampling equal to one process, the image loader and PNG grids.

Parity tolerance: fp64, 1e-10 relative to the largest reference value. The reference runs in
this process with `FullContext` (naive softmax attention, no sharding, positions 0..N-1) on
the whole global batch and back-propagates the plain mean loss, so it shares only the model
code with the 4-rank runs (seqpar kernels, layouts, collectives, the trainer's global-mean
normalisation and gradient averaging).
"""
import numpy as np
import pytest
import torch

from checks.dit import (
    TEST_DIT,
    FullContext,
    build_model,
    dit_sample,
    dit_step,
    reference_sample,
    reference_step,
)
from seqpar.dit import DIT_PRESETS, DiT, DiTConfig, flow_draws, loss_terms, noise_seed, sample, sincos_2d
from seqpar.images import TRAIN_IMAGES, VAL_IMAGES, ImageLoader, image_grid, image_loaders, save_image_grid

TOL = 1e-10
SMALL = ("astronaut", "coffee", "camera", "chelsea")  # colour and gray, 4 classes like TEST_DIT
GEN = noise_seed(1, 0)  # the training step's generator seed: class dropout hits one row of four


def assert_close(got, ref, what):
    bound = TOL * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.1e}"


@pytest.fixture(scope="module")
def batch():
    """A global batch of 4 real 16x16 crops with class ids, and its class-dropout pattern."""
    images, labels = ImageLoader(16, 4, names=SMALL, seed=3).batch_at(0)
    _, u, _ = flow_draws(GEN, range(4), (3, 16, 16))
    dropped = (u < TEST_DIT.class_dropout).tolist()
    assert any(dropped) and not all(dropped), "pick a seed where class dropout hits some rows, not all"
    return images, labels


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"image_size": 15}, "multiple of patch_size"), ({"dim": 30, "n_heads": 3, "n_kv_heads": 1}, "multiple of 4"),
    ({"n_heads": 3}, "divisible by n_heads"), ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"n_layers": 0}, "n_layers must be >= 1"), ({"class_dropout": 1.0}, "class_dropout"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
])
def test_config_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig.preset("test", **overrides)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig.preset("huge")


def test_presets_and_flops():
    default, long = DIT_PRESETS["default"], DIT_PRESETS["16k"]
    assert (default.image_size, default.patch_size, default.num_tokens) == (64, 2, 1024)
    assert (long.image_size, long.patch_size, long.num_tokens) == (256, 2, 16384)
    assert default.num_classes == len(TRAIN_IMAGES)
    cfg = DIT_PRESETS["test"]
    # forward matmuls: 2 flops per weight a token passes through (+ per-image conditioning / N)
    model = DiT(cfg, FullContext())
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if p.dim() == 2 and not n.startswith(("t_embedder", "y_embedder")) and "adaLN" not in n)
    per_image = sum(p.numel() for n, p in model.named_parameters()
                    if p.dim() == 2 and (n.startswith("t_embedder") or "adaLN" in n))
    assert cfg.matmul_flops_per_token() == 2 * (per_token + per_image / cfg.num_tokens)
    attention = 4 * cfg.num_tokens * cfg.dim * cfg.n_layers
    assert cfg.flops_per_token() == 3 * (cfg.matmul_flops_per_token() + attention)
    assert cfg.flops_per_token(causal=True) == cfg.flops_per_token()  # DiT attention is never causal


# -- tokens and the objective (one process) -------------------------------------------------------------
def test_patch_tokens_and_positions():
    model = DiT(TEST_DIT, FullContext())
    images = torch.randn(2, 3, 16, 16)
    tokens = model.patchify(images)
    assert tokens.shape == (2, 64, 12)
    # token 8 * r + c is the 2x2 patch at row r, column c, flattened as (y, x, channel)
    assert torch.equal(tokens[1, 8 * 3 + 5], images[1, :, 6:8, 10:12].permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(tokens), images)
    emb = sincos_2d(torch.tensor([8 * 3 + 5]), 8, 32, torch.float64)[0]
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    expect = torch.cat([torch.sin(5 * omega), torch.cos(5 * omega), torch.sin(3 * omega), torch.cos(3 * omega)])
    assert torch.allclose(emb, expect, atol=1e-15)


def test_loss_terms_is_the_rectified_flow_objective(batch):
    images, labels = batch
    model = build_model(FullContext())
    t, u, noise = flow_draws((5, 1), range(2, 6), (3, 16, 16))
    x0 = images.double()
    x_t = (1 - t[:, None, None, None].double()) * x0 + t[:, None, None, None].double() * noise.double()
    for training in (True, False):
        model.train(training)
        y = torch.where((u < TEST_DIT.class_dropout) & training, TEST_DIT.num_classes, labels)
        with torch.no_grad():
            v = model.unpatchify(model(model.patchify(x_t), t.double(), y))
            got_sum, got_count = loss_terms(model, FullContext(), images, labels, (5, 1), row_offset=2)
        assert got_count == images.numel()
        want = (v - (noise.double() - x0)).pow(2).sum()
        assert abs(got_sum.item() - want.item()) <= 1e-12 * want.item()
    assert 0 < t.min() and t.max() < 1
    # row i's draws depend on (seed, i) only: not on the batch it is drawn with, but on the seed
    assert torch.equal(flow_draws((5, 1), range(3, 4), (3, 16, 16))[2][0], noise[1])
    assert not torch.equal(flow_draws((5, 2), range(3, 4), (3, 16, 16))[2][0], noise[1])
    seeds = [(5, 1), (5, 1, 0), noise_seed(5, 1), noise_seed(5, 1, "val")]  # trailing zeros count
    assert len({float(flow_draws(s, range(1), (1, 1, 1))[0]) for s in seeds}) == len(seeds)


def test_activation_checkpointing_is_exact(batch):
    images, labels = batch
    plain = reference_step(images, labels, GEN)
    recomputed = reference_step(images, labels, GEN, cfg=DiTConfig.preset("test", class_dropout=0.5,
                                                                           activation_checkpointing=True))
    assert plain["loss"] == recomputed["loss"]
    for name, g in plain["grads"].items():
        assert_close(recomputed["grads"][name], g, name)


# -- sequence parallel = one process (4-rank gloo worlds) -------------------------------------------------
@pytest.mark.parametrize("strategy,kwargs,dp", [
    ("ulysses", {}, 1),                          # contiguous tokens, heads all-to-all
    ("wallfacer", {"team_size": 2}, 1),          # its default zigzag layout
    ("ring", {"layout": "zigzag"}, 2),           # dp 2 x sp 2: row offsets, dp slicing
], ids=["ulysses", "wallfacer-zigzag", "ring-zigzag-dp2"])
def test_training_step_matches_one_process(worlds, batch, strategy, kwargs, dp):
    images, labels = batch
    ref = reference_step(images, labels, GEN)
    results = worlds.run(4, dit_step, strategy, kwargs, images, labels, dp=dp, generator_seed=GEN)
    got = results[0]
    assert abs(got["loss"] - ref["loss"]) <= TOL * ref["loss"], (got["loss"], ref["loss"])
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in got["grads"].items():
        assert_close(g, ref["grads"][name], f"grad of {name}")
    assert len({r["grad_digest"] for r in results}) == 1, "ranks hold different averaged gradients"
    counts = [r["local_count"] for r in results]
    assert sum(counts) == ref["count"] and len(set(counts)) == 1
    sums = [r["local_sum"] for r in results]
    assert len(set(sums)) == 4 and abs(sum(sums) / sum(counts) - ref["loss"]) <= TOL * ref["loss"]
    positions = [r["positions"] for r in results[:4 // dp]]  # one sequence-parallel group
    assert sorted(sum(positions, [])) == list(range(TEST_DIT.num_tokens))
    n = len(positions[0])
    contiguous = positions == [list(range(r * n, (r + 1) * n)) for r in range(len(positions))]
    assert contiguous == (strategy == "ulysses"), positions  # zigzag: global indices != local order


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sampler_matches_one_process(worlds, guidance):
    classes = [0, 3, TEST_DIT.num_classes]  # the null class too
    ref = reference_sample(classes, steps=3, seed=11, guidance=guidance)
    results = worlds.run(4, dit_sample, "usp", {"ulysses": 2, "layout": "zigzag"}, classes, 3, 11, guidance)
    assert ref.shape == (3, 3, 16, 16) and torch.isfinite(ref).all()
    assert ref.abs().max() <= 1 and (ref.abs() < 1).float().mean() > 0.3, "mostly saturated: a weak test"
    for r in results:
        assert torch.equal(r["images"], results[0]["images"]), "ranks disagree"
        assert r["repeat_equal"] and r["other_seed_differs"]
        assert r["events"] == [(i, 3 * 3) for i in range(1, 10)]  # 3 images one at a time x 3 Euler steps
    assert_close(results[0]["images"], ref, "samples")
    assert_close(results[0]["one_by_one"], results[0]["images"], "samples one image per forward")
    assert_close(results[0]["pairs"], results[0]["images"], "samples two images per forward")


def test_cli_defaults_fit_a_small_machine():
    """`seqpar train --model dit` alone: 1,024 tokens, the sampler <= 10% of the run's FLOPs; the
    16K-token configuration is one flag away."""
    from seqpar.train import TrainConfig
    cfg = TrainConfig.of(model="dit")
    assert cfg.sequence_length() == 1024 and cfg.dit.sample_batch == cfg.dit.samples == 8
    assert 0.05 < cfg.sampling_share() <= 0.10
    assert TrainConfig.of(model="dit", image_size=256).sequence_length() == 16384
    assert TrainConfig.of(model="dit", samples=0).sampling_share() == TrainConfig().sampling_share() == 0.0


def test_sampler_batches_give_the_images_of_one_by_one():
    """fp64, one process: any --sample-batch gives the images of one image per forward (values),
    with one progress event per forward; fp32 agrees to rounding."""
    model, classes = build_model(FullContext()), [0, 1, 2, 3, 0]
    events = {}
    runs = {b: sample(model, FullContext(), classes, 2, 5, batch_size=b,
                      progress=lambda d, t, b=b: events.setdefault(b, []).append((d, t))) for b in (0, 1, 2, 5, 9)}
    for b, images in runs.items():
        assert_close(images, runs[1], f"batch_size {b}")
    assert events[1] == [(i, 10) for i in range(1, 11)] and events[2] == [(i, 6) for i in range(1, 7)]
    assert events[0] == events[5] == events[9] == [(1, 2), (2, 2)]
    model32 = model.float()
    one, five = (sample(model32, FullContext(), classes, 2, 5, batch_size=b) for b in (1, 5))
    assert (one - five).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="batch_size >= 0"):
        sample(model, FullContext(), classes, 2, 5, batch_size=-1)


# -- data ---------------------------------------------------------------------------------------------
def test_loader_is_deterministic_resumable_and_dp_sliced():
    loader = ImageLoader(16, 3, names=SMALL, seed=7)
    batches = [loader.next() for _ in range(3)]
    images, labels = batches[0]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and set(labels.tolist()) <= set(range(4))
    resumed = ImageLoader(16, 3, names=SMALL, seed=0)
    resumed.load_state_dict(ImageLoader(16, 3, names=SMALL, seed=7).state_dict() | {"step": 1})
    for want in batches[1:]:
        got = resumed.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.state_dict() == loader.state_dict() == {"seed": 7, "step": 3}
    assert not torch.equal(ImageLoader(16, 3, names=SMALL, seed=8).batch_at(0)[0], images)
    # dp rank r takes rows [r*b, (r+1)*b) of the global batch
    whole = ImageLoader(16, 4, names=SMALL, seed=7).batch_at(5)
    halves = [ImageLoader(16, 2, names=SMALL, seed=7, dp=2, dp_rank=r).batch_at(5) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    assert [ImageLoader(16, 2, names=SMALL, dp=2, dp_rank=r).row_offset for r in range(2)] == [0, 2]


def test_loader_crops_flips_gray_and_small_images():
    loader = ImageLoader(16, 64, names=("camera", "chelsea"), seed=1)
    images, labels = loader.batch_at(0)
    gray = images[labels == 0]
    assert len(gray) and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    draws = loader.global_draws(0)
    assert draws["flip"].any() and not draws["flip"].all()
    r = int(np.flatnonzero(draws["flip"])[0])
    source = loader.images[draws["image"][r]]
    y, x = draws["y"][r], draws["x"][r]
    assert np.array_equal(images[r].numpy(), source[:, y:y + 16, x:x + 16][:, :, ::-1])
    assert min(loader.images[1].shape[1:]) == 32  # resized to short_side = 2 * crop
    small = ImageLoader(128, 2, names=("microaneurysms",), short_side=128)  # 102 px: resized up
    assert small.images[0].shape == (3, 128, 128) and small.batch_at(0)[0].shape == (2, 3, 128, 128)
    with pytest.raises(ValueError, match="not a scikit-image sample image"):
        ImageLoader(16, 2, names=("no_such_image",))


def test_validation_images_are_held_out():
    train, val = image_loaders(16, 4, seed=2, train_names=SMALL)
    assert not set(val.names) & set(train.names) and val.names == VAL_IMAGES
    images, labels = val.batch_at(0)
    assert labels.tolist() == [len(SMALL)] * 4  # the null class
    assert torch.equal(val.batch_at(0)[0], images) and not val.global_draws(0)["flip"].any()
    assert val.step == 0


def test_image_grid_png_round_trips(tmp_path):
    from PIL import Image

    images = torch.rand(5, 3, 16, 16) * 2 - 1
    path = save_image_grid(images, tmp_path / "samples.png", ncols=3)
    png = np.asarray(Image.open(path))
    assert png.shape == (2 * 18 + 2, 3 * 18 + 2, 3) and png.dtype == np.uint8
    assert np.array_equal(png, image_grid(images, ncols=3))
    tile = png[2 + 18:2 + 18 + 16, 2 + 18:2 + 18 + 16]  # image 4: row 1, column 1
    want = np.round((images[4].permute(1, 2, 0).numpy() + 1) * 127.5)
    assert np.abs(tile.astype(float) - want).max() <= 1
    assert (png[-2:] == 255).all()  # background / padding


# -- `seqpar train --model dit` -------------------------------------------------------------------------
DIT_TRAIN = dict(model="dit", image_size=16, patch_size=2, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, batch=2,
                 steps=3, warmup=1, lr=1e-2, min_lr=1e-3, dtype="float64", eval_every=0, eval_batches=1,
                 checkpoint_every=0, progress=False, plot=False, samples=0, strategy="local", layout="contiguous")


@pytest.mark.parametrize("strategy,overrides", [("ulysses", {}), ("wallfacer", {"layout": None, "dp": 1}),
                                                ("ring", {"layout": "zigzag", "dp": 2, "batch": 1})])
def test_training_loop_matches_one_process(worlds, tmp_path, strategy, overrides):
    """The trainer's DiT loop (fp64): per-step loss and grad norm and the validation loss on 4
    ranks equal 1 process on the same global batch."""
    from checks.train import run_training
    ref = worlds.run(1, run_training, {**DIT_TRAIN, "out_dir": str(tmp_path / "ref")})[0]
    got = worlds.run(4, run_training, {**DIT_TRAIN, "strategy": strategy, "out_dir": str(tmp_path / "sp"),
                                       **overrides})[0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-9) and len(ref["losses"]) == 3
    assert [v for _, v in got["val_losses"]] == pytest.approx([v for _, v in ref["val_losses"]], rel=1e-9)
    norms = lambda r: [x["grad_norm"] for x in r["records"] if x["type"] == "train"]  # noqa: E731
    assert norms(got) == pytest.approx(norms(ref), rel=1e-9)


def test_cli_trains_resumes_and_writes_the_sample_grid(worlds, tmp_path):
    """Two steps in the session's 2-process world, then `seqpar train --resume latest` continues to
    step 3 and writes the sample grid (progress records, share of the run)."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from checks.train import run_training
    out = tmp_path / "run"
    worlds.run(2, run_training, dict(model="dit", image_size=16, dim=32, n_heads=4, n_kv_heads=4, strategy="ring",
                                     batch=2, checkpoint_every=2, eval_every=0, samples=3, sample_steps=2,
                                     sample_batch=2, progress=False, out_dir=str(out), steps=2))
    args = [sys.executable, "-m", "seqpar", "train", "--model", "dit", "--image-size", "16", "--dim", "32",
            "--n-heads", "4", "--n-kv-heads", "4", "--nproc", "2", "--strategy", "ring", "--batch", "2",
            "--checkpoint-every", "2", "--eval-every", "0", "--samples", "3", "--sample-steps", "2",
            "--sample-batch", "2", "--no-progress", "--out-dir", str(out)]
    proc = subprocess.run(args + ["--steps", "3", "--resume", "latest"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == [1, 2, 3]
    outputs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["type"] == "outputs" and json.loads(x)["step"] == 3]  # sampler: 2 batches x 2 steps
    assert [(o.get("done"), o.get("total")) for o in outputs] == [(1, 4), (2, 4), (3, 4), (4, 4), (None, None)]
    assert 0 < outputs[-1]["share_of_run"] < 1 and outputs[-1]["files"] == [str(out / "samples.png")]
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 3 samples of 16x16 in a 2x2 grid, 2-pixel padding
    assert (out / "loss.png").is_file()
