"""`seqpar train --compile`: every block compiled with torch.compile, seqpar's attention one
custom op (`torch.ops.seqpar.attention`, seqpar/ops.py) inside the block's graph.

Backends (inductor compiles C++ for minutes on a 2-core machine): the graph checks use dynamo's
explain and aot_eager (the same dynamo graph and AOTAutograd forward/backward split as inductor,
no code generation); the training runs use aot_eager for every strategy and case, and inductor
for one run (ring on 4 processes). Exactness: compiled vs eager on 4 processes, fp32, 3 steps,
losses and gradient norms within 1e-5 relative.
"""
import pytest

from checks.compiled import block_graphs
from checks.train import STRATEGY_CASES, run_training
from seqpar.train import TrainConfig

REL = 1e-5
BASE = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch=2, steps=3,
            warmup=1, lr=1e-2, min_lr=1e-3, dtype="float32", eval_every=0, eval_batches=1, checkpoint_every=0,
            progress=False, plot=False, layout="contiguous", strategy="local")
DIT = dict(model="dit", image_size=16, patch_size=2, samples=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from seqpar.data import stdlib_corpus
    return str(stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=60_000))


@pytest.mark.parametrize("strategy,kwargs,kind,documents", [
    ("ring", {"layout": "zigzag"}, "llama", False),
    ("usp", {"ulysses": 2}, "llama", True),
    ("wallfacer", {}, "dit", False),
])
def test_a_compiled_block_is_one_graph_around_attention(worlds, strategy, kwargs, kind, documents):
    """Without the op, dynamo broke every block's graph at attention (process groups, plans);
    now: one graph, no break, the op inside, and no forward graph left behind after backward."""
    for r in worlds.run(2 if strategy != "wallfacer" else 4, block_graphs, strategy, kwargs, kind, documents):
        assert r["graph_count"] == 1 and r["graph_breaks"] == 0, r
        assert r["compiled_graphs"] == 1 and r["attention_ops"] == 1, r
        assert r["live_tapes"] == 0 and r["grad_finite"], r


def _norms(result):
    return [r["grad_norm"] for r in result["records"] if r["type"] == "train"]


def _assert_close(got, ref):
    assert got["losses"] == pytest.approx(ref["losses"], rel=REL) and len(ref["losses"]) == 3
    assert _norms(got) == pytest.approx(_norms(ref), rel=REL)


@pytest.fixture(scope="module")
def eager(worlds, corpus, tmp_path_factory):
    """Eager runs of the same configurations, by case name (computed once each)."""
    cache = {}

    def run(name, cfg):
        if name not in cache:
            cache[name] = worlds.run(4, run_training, {**cfg, "out_dir": str(tmp_path_factory.mktemp(name))})[0]
        return cache[name]
    return run


CASES = [(s, o) for s, o in STRATEGY_CASES] + [
    ("usp-fsdp-ac", dict(strategy="usp", ulysses=2, fsdp=True, activation_checkpointing=True)),
    ("ring-dp2", dict(strategy="ring", layout="zigzag", dp=2, batch=1)),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=[n for n, _ in CASES])
def test_compiled_training_matches_eager(worlds, corpus, tmp_path, eager, name, overrides):
    """4 processes, packed documents (the stdlib corpus's files), aot_eager: every strategy, FSDP2 with
    activation checkpointing, dp x sp."""
    overrides = overrides if "strategy" in overrides else {"strategy": name, **overrides}
    cfg = {**BASE, "data": corpus, **overrides}
    ref = eager(name, cfg)
    got = worlds.run(4, run_training, {**cfg, "compile": True, "compile_backend": "aot_eager",
                                       "out_dir": str(tmp_path)})[0]
    _assert_close(got, ref)


def test_compiled_dit_matches_eager(worlds, eager, tmp_path):
    cfg = {**BASE, **DIT, "strategy": "ulysses"}
    ref = eager("dit", cfg)
    got = worlds.run(4, run_training, {**cfg, "compile": True, "compile_backend": "aot_eager",
                                       "out_dir": str(tmp_path)})[0]
    _assert_close(got, ref)


def test_inductor_training_matches_eager(worlds, corpus, eager, tmp_path):
    """The real backend once (C++ kernels on CPU): ring, zigzag, packed documents."""
    cfg = {**BASE, "data": corpus, "strategy": "ring", "layout": "zigzag"}
    ref = eager("ring", cfg)
    got = worlds.run(4, run_training, {**cfg, "compile": True, "out_dir": str(tmp_path)})[0]
    _assert_close(got, ref)


def test_compile_options_are_validated():
    with pytest.raises(ValueError, match="unknown compile_backend 'tvm'"):
        TrainConfig.of(compile=True, compile_backend="tvm").validate(4)
    with pytest.raises(ValueError, match="--compile"):
        TrainConfig.of(compile=True, strategy="fpdt", chunked_blocks=True, seq_len=64).validate(4)
