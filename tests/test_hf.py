"""Hugging Face causal LMs through seqpar strategies, against stock single-process transformers.

The 4-rank runs use the trainer's own pieces (shard_batch, loss_and_backward, average_gradients);
the reference is the same checkpoint loaded with `attn_implementation="sdpa"` in this process,
with the standard mean token loss (transformers' own `labels=` loss in the fp32 case).
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
)

from checks.hf import hf_errors, hf_steps, hf_train_and_save
from seqpar.data import open_tokens
from seqpar.hf import PREFIX, export_checkpoint, hf_vocab_size, load_hf_model, tokenize_corpus

SEQ, BATCH, VOCAB = 64, 2, 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.1)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),  # q/k/v biases, tied embeddings
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=16),                # q/k norms
    "mistral": lambda: MistralConfig(**SHAPE),                         # sliding window 4096 >= SEQ
    "mistral_w16": lambda: MistralConfig(**SHAPE, sliding_window=16),
    # local attention (issue #19): per-layer windows, logit soft-capping, attention sinks
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=16, sliding_window=7, attn_logit_softcapping=2.0,
                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "stablelm": lambda: StableLmConfig(**SHAPE),  # decoder layers drop the kwargs on the way to attention
    "gpt_oss": lambda: GptOssConfig(**SHAPE, head_dim=16, sliding_window=9, num_local_experts=4,
                                    num_experts_per_tok=2),
    "llama_dropout": lambda: LlamaConfig(**SHAPE, attention_dropout=0.1),
}
ALL_STRATEGIES = [("ring", {"layout": "zigzag"}), ("usp", {"ulysses": 2, "ring": 2}),
                  ("wallfacer", {"team_size": 2}), ("fpdt", {"chunks": 2})]
DOCS = [0, 5, 16, 30, 31, 44, 56, SEQ]         # packed documents, all <= 16 tokens
DOCS_LONG = [0, 9, 40, SEQ]                 # a 31-token document


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> a saved tiny model directory (config.json + model.safetensors, fp32)."""
    root = tmp_path_factory.mktemp("hf_models")
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        AutoModelForCausalLM.from_config(make()).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    window = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return window, torch.rand(BATCH, SEQ, generator=gen) < 0.3


EAGER = ("gemma2", "gpt_oss")  # soft-capping, sinks: transformers' eager attention (no sdpa path)


def reference(model_dir, window, ignored, cu=None, dtype=torch.float64):
    """Stock transformers (sdpa, eager where a model has no sdpa path) on the full batch: (mean loss,
    logits [b, SEQ, vocab], grads by name). Packed documents: per-document positions and a
    block-diagonal causal 4-D mask."""
    impl = "eager" if model_dir.endswith(EAGER) else "sdpa"
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=impl)
    tokens, labels = window[:, :-1], window[:, 1:].masked_fill(ignored, -100)
    if cu is None and dtype == torch.float32:  # transformers' own shift and mean loss on SEQ + 1 tokens
        hf_labels = window.clone()
        hf_labels[:, 1:] = labels
        out = ref(input_ids=window, labels=hf_labels)
        loss, logits = out.loss, out.logits[:, :-1]
    else:
        kwargs = {}
        if cu is not None:
            doc = torch.searchsorted(torch.tensor(cu), torch.arange(SEQ), right=True)
            labels[:, torch.tensor(cu[1:-1]) - 1] = -100  # a document's last token predicts nothing
            kwargs["position_ids"] = (torch.arange(SEQ) - torch.tensor(cu)[doc - 1]).expand(BATCH, -1)
            causal = torch.arange(SEQ)[None, :] <= torch.arange(SEQ)[:, None]
            if getattr(ref.config, "sliding_window", None) and getattr(ref.config, "layer_types", None) is None:
                causal &= torch.arange(SEQ)[None, :] > torch.arange(SEQ)[:, None] - ref.config.sliding_window
            kwargs["attention_mask"] = ((doc[:, None] == doc[None, :]) & causal).expand(BATCH, 1, SEQ, SEQ)
        logits = ref(input_ids=tokens, **kwargs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), logits.detach(), {n: p.grad for n, p in ref.named_parameters()}


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_matches(results, ref, tol, label):
    """Every rank's loss, rank 0's logits and every gradient within relative `tol` of the reference."""
    loss, logits, grads = ref
    for rank, got in enumerate(results):
        assert abs(got["loss"] - loss) <= tol * abs(loss), (label, rank, got["loss"], loss)
    got = results[0]
    assert rel(got["logits"], logits) < tol, label
    assert got["grads"].keys() == grads.keys(), label
    errors = {n: rel(got["grads"][n], g) for n, g in grads.items()}
    assert max(errors.values()) < tol, (label, {n: e for n, e in errors.items() if e >= tol})


@pytest.mark.parametrize("name,cases,dtype,tol", [
    ("llama", ALL_STRATEGIES, "float64", 1e-9),
    ("qwen2", ALL_STRATEGIES, "float64", 1e-9),
    ("mistral", [("usp", {"ulysses": 4})], "float64", 1e-9),
    ("mistral_w16", [("ring", {"layout": "contiguous", "tile": 8}), ("ulysses", {})], "float64", 1e-9),
    # transformers' eager Gemma 2 attention takes its softmax in fp32 even for fp64 models
    ("gemma2", [("usp", {"ulysses": 2, "ring": 2}), ("wallfacer", {"team_size": 1})], "float64", 1e-6),
    ("gpt_oss", [("ring", {"layout": "zigzag"}), ("fpdt", {"chunks": 2})], "float32", 1e-5),  # MoE: no fp64
    ("stablelm", [("ulysses", {})], "float64", 1e-9),
    ("qwen3", [("ring", {"layout": "zigzag"})], "float32", 1e-5),
])
def test_matches_single_process_transformers(worlds, models, name, cases, dtype, tol):
    window, ignored = batch()
    ref = reference(models[name], window, ignored, dtype=getattr(torch, dtype))
    steps = worlds.run(4, hf_steps, models[name], cases, window, ignored, dtype=dtype,
                       activation_checkpointing=dtype == "float32")
    for i, (strategy, _) in enumerate(cases):
        assert_matches([r[i] for r in steps], ref, tol, strategy)


@pytest.mark.parametrize("name,strategy,kwargs,cu", [
    ("llama", "usp", {"ulysses": 2, "ring": 2}, DOCS_LONG),
    ("mistral_w16", "ring", {"layout": "zigzag"}, DOCS),  # window 16 >= every document: exact
    ("mistral_w16", "allgather", {}, DOCS_LONG),         # window 16 inside a 31-token document
])
def test_packed_documents(worlds, models, name, strategy, kwargs, cu):
    window, ignored = batch(1)
    ref = reference(models[name], window, ignored, cu=cu)
    steps = worlds.run(4, hf_steps, models[name], [(strategy, kwargs)], window, ignored, cu=cu)
    assert_matches([r[0] for r in steps], ref, 1e-9, strategy)


def test_unsupported_settings_raise(worlds, models):
    cases = [(models["mistral_w16"], "eval", {}),                 # window 16 < 64 tokens: computed
             (models["mistral_w16"], "eval", {"cu": DOCS_LONG}),  # a 31-token document: computed
             (models["llama_dropout"], "train", {}),
             (models["llama_dropout"], "eval", {}),               # no dropout in eval: fine
             (models["llama"], "direct", {})]                     # no context given
    for errors in worlds.run(4, hf_errors, cases):
        assert errors[:2] == ["", ""]
        assert "attention dropout 0.1 is not supported" in errors[2]
        assert errors[3] == ""
        assert "seqpar_context=ctx" in errors[4]


def _write_tokenizer(model_dir):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    words = ["<unk>", "the", "cat", "sat", "on", "mat", ".", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"),
                                                 pre_tokenizers.Split(Regex(r"[.\n]"), behavior="isolated")])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)
    return words


def test_export_round_trip(worlds, models, tmp_path):
    """Train 2 steps with FSDP on 4 ranks, checkpoint, export in this process, from_pretrained."""
    src = tmp_path / "qwen2"
    AutoModelForCausalLM.from_pretrained(models["qwen2"]).save_pretrained(src)
    _write_tokenizer(src)
    window, _ = batch(2)
    trained = worlds.run(4, hf_train_and_save, str(src), str(tmp_path / "ckpt"), "ring", {}, window)[0]
    out = export_checkpoint(tmp_path / "ckpt", src, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(out)
    state = back.state_dict()
    assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
    assert set(trained) <= set(state)
    for k, v in trained.items():
        assert torch.equal(state[k], v), k
    # a state dict exports the same; a mismatching one fails clearly; out_dir is never overwritten
    export_checkpoint({PREFIX + k: v for k, v in trained.items()}, src, tmp_path / "export2")
    assert all(torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "export2").state_dict()[k], v)
               for k, v in trained.items())
    with pytest.raises(ValueError, match="does not match"):
        export_checkpoint({"model.embed_tokens.weight": trained["model.embed_tokens.weight"]}, src, tmp_path / "x")
    with pytest.raises(FileExistsError):
        export_checkpoint(tmp_path / "ckpt", src, out)


def test_random_init_is_seeded_and_tokenizer_files(models, tmp_path):
    cfg_dir = tmp_path / "cfg"
    LlamaConfig(**SHAPE).save_pretrained(cfg_dir)  # config only: random init
    state = torch.get_rng_state()
    a, b, c = (load_hf_model(cfg_dir, None, torch.float32, seed=s).state_dict() for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a[PREFIX + "lm_head.weight"],
                                                                         c[PREFIX + "lm_head.weight"])
    assert hf_vocab_size(cfg_dir) == VOCAB
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat.\nthe dog sat.\n" * 3)
    assert tokenize_corpus(cfg_dir, text, tmp_path / "tokens") is None  # no tokenizer: bytes
    words = _write_tokenizer(cfg_dir)
    path = tokenize_corpus(cfg_dir, text, tmp_path / "tokens", chunk_bytes=10)
    data = open_tokens(path)
    assert path.suffix == ".bin" and data.vocab_size == VOCAB
    assert [words[t] for t in data.tokens[:8]] == ["the", "cat", "sat", "on", "the", "mat", ".", "\n"]
    assert list(data.tokens).count(0) == 3  # "dog" is unknown
    config = json.loads((cfg_dir / "config.json").read_text())
    (cfg_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 70000}))
    big = tokenize_corpus(cfg_dir, text, tmp_path / "tokens")
    assert big.suffix == ".npy" and np.load(big).dtype == np.int32 and np.array_equal(np.load(big), data.tokens)


def test_tokenized_corpus_keeps_its_documents(tmp_path):
    """A text with a document index: each document is tokenized alone, token offsets indexed."""
    from seqpar.data import find_documents, write_document_index
    cfg_dir = tmp_path / "cfg"
    LlamaConfig(**SHAPE).save_pretrained(cfg_dir)
    _write_tokenizer(cfg_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat.\nthe dog sat.\n" * 3)
    write_document_index(text, [0, 24, 37, 61, 74, 98])
    data = find_documents(open_tokens(tokenize_corpus(cfg_dir, text, tmp_path / "tokens")), None)
    assert data.doc_starts.tolist() == [0, 8, 13, 21, 26, 34] and len(data) == 39


def _char_tokenizer(model_dir):
    """A character-level tokenizer (printable ASCII, newline, <unk>) saved to model_dir."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    chars = ["<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)


def test_cli_hf_model_trains_the_same_on_1_and_4_processes_and_exports(worlds, tmp_path):
    """`seqpar train --hf-model DIR` (config + tokenizer, random init) on 4 processes (USP 2x2) gives
    the losses of the same configuration trained on 1 process (fp64, 3 steps), and `seqpar export`
    of it loads back with the 1-process run's weights (exported through the same function)."""
    import subprocess
    import sys

    from checks.train import run_training
    from seqpar.export import export_run
    model_dir = tmp_path / "llama"
    LlamaConfig(**SHAPE).save_pretrained(model_dir)
    _char_tokenizer(model_dir)
    common = ["--hf-model", str(model_dir), "--seq-len", "64", "--batch", "2", "--steps", "3", "--warmup", "1",
              "--eval-every", "0", "--eval-batches", "1", "--checkpoint-every", "3", "--corpus-bytes", "40000",
              "--no-plot", "--no-progress", "--lr", "1e-2", "--dtype", "float64"]
    usp = tmp_path / "usp"
    for cmd in (["train", *common, "--nproc", "4", "--strategy", "usp", "--ulysses", "2", "--out-dir", str(usp)],
                ["export", str(usp), str(tmp_path / "xusp")]):
        proc = subprocess.run([sys.executable, "-m", "seqpar", *cmd], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    cfg = dict(hf_model=str(model_dir), seq_len=64, batch=2, steps=3, warmup=1, eval_every=0, eval_batches=1,
               checkpoint_every=3, corpus_bytes=40000, plot=False, progress=False, lr=1e-2, dtype="float64",
               strategy="local", out_dir=str(one))
    losses = {"one": worlds.run(1, run_training, cfg)[0]["losses"]}
    export_run(one, tmp_path / "xone")
    records = [json.loads(line) for line in (usp / "metrics.jsonl").read_text().splitlines()]
    losses["usp"] = [r["loss"] for r in records if r["type"] == "train"]
    for out in (one, usp):
        assert list((out / "data").glob("*.tokens.bin")), f"{out.name}: not tokenized with the model's tokenizer"
    exported = {name: AutoModelForCausalLM.from_pretrained(tmp_path / f"x{name}").state_dict() for name in losses}
    assert len(losses["one"]) == 3 and losses["usp"] == pytest.approx(losses["one"], rel=1e-9)
    for key, value in exported["one"].items():
        assert value.dtype == torch.float64 and torch.allclose(exported["usp"][key], value, rtol=0, atol=1e-9), key


def test_trainer_hf_model_with_fsdp_dp_and_resume(worlds, tmp_path):
    """The training loop with --hf-model (bytes, packed stdlib documents, fp64): dp=2 x sp=2 ring
    zigzag with FSDP equals 1 process; a run resumed from its step-2 checkpoint reproduces step 3."""
    from checks.train import run_training
    from seqpar.data import stdlib_corpus
    model_dir = tmp_path / "llama256"
    LlamaConfig(**{**SHAPE, "vocab_size": 256}).save_pretrained(model_dir)
    base = dict(hf_model=str(model_dir), data=str(stdlib_corpus(tmp_path / "corpus", max_bytes=40_000)), seq_len=64,
                batch=2, steps=3, warmup=1, lr=1e-2, min_lr=1e-3, dtype="float64", eval_every=0, eval_batches=1,
                checkpoint_every=0, progress=False, plot=False, strategy="local", layout="contiguous")
    ref = worlds.run(1, run_training, {**base, "out_dir": str(tmp_path / "ref")})[0]["losses"]
    sharded = {**base, "strategy": "ring", "layout": "zigzag", "dp": 2, "batch": 1, "fsdp": True}
    got = worlds.run(4, run_training, {**sharded, "out_dir": str(tmp_path / "fsdp")})[0]["losses"]
    assert got == pytest.approx(ref, rel=1e-9)
    out = str(tmp_path / "resume")
    worlds.run(4, run_training, {**sharded, "out_dir": out, "steps": 2, "checkpoint_every": 2})
    resumed = worlds.run(4, run_training, {**sharded, "out_dir": out, "resume": "latest"})[0]["losses"]
    assert resumed == pytest.approx(ref[2:], rel=1e-9)


def test_builtin_model_exports_as_llama(worlds, tmp_path):
    """`seqpar export` of a built-in-model run: LlamaForCausalLM gives the same logits (fp64 weights;
    transformers computes RoPE tables and RMSNorm in fp32, hence 1e-6, where a wrong key or rotation
    convention gives O(1) differences)."""
    from checks.hf import builtin_logits
    from checks.train import run_training
    from seqpar.data import stdlib_corpus
    from seqpar.export import export_run
    run = tmp_path / "run"
    cfg = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch=2, steps=2, warmup=1,
               dtype="float64", eval_every=0, eval_batches=1, checkpoint_every=2, progress=False, plot=False,
               strategy="ring", data=str(stdlib_corpus(tmp_path / "corpus", max_bytes=40_000)), out_dir=str(run))
    worlds.run(2, run_training, cfg)
    out = export_run(run, tmp_path / "llama")
    llama = AutoModelForCausalLM.from_pretrained(out)
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.dtype == torch.float64
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = torch.tensor(worlds.run(1, builtin_logits, str(run), tokens.tolist())[0], dtype=torch.float64)
    with torch.no_grad():
        theirs = llama(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-6 * max(1.0, theirs.abs().max().item())


def test_trainer_hf_model_bf16_autocast_matches_one_process(worlds, tmp_path):
    """--hf-model with --dtype bfloat16 (autocast, fp32 weights): USP 2x2 on 4 ranks equals 1 process
    within the bf16 bound the built-in model's parity uses (2e-2 relative)."""
    from checks.train import run_training
    from seqpar.data import stdlib_corpus
    model_dir = tmp_path / "llama256"
    LlamaConfig(**{**SHAPE, "vocab_size": 256}).save_pretrained(model_dir)
    base = dict(hf_model=str(model_dir), data=str(stdlib_corpus(tmp_path / "corpus", max_bytes=40_000)), seq_len=64,
                batch=2, steps=3, warmup=1, lr=1e-2, min_lr=1e-3, dtype="bfloat16", eval_every=0, eval_batches=1,
                checkpoint_every=0, progress=False, plot=False, strategy="local", layout="contiguous")
    ref = worlds.run(1, run_training, {**base, "out_dir": str(tmp_path / "ref")})[0]["losses"]
    got = worlds.run(4, run_training, {**base, "strategy": "usp", "ulysses": 2, "layout": "zigzag",
                                       "out_dir": str(tmp_path / "usp")})[0]["losses"]
    assert len(ref) == 3 and got == pytest.approx(ref, rel=2e-2)


def test_models_mixing_tokens_outside_attention_are_refused_under_sequence_parallelism(worlds):
    """Mamba / linear-attention / short-convolution hybrids would see one shard per rank (the sweep
    measured losses off by 1e-3..1e-1): one clear error on 2 sequence-parallel ranks; a pure
    attention model is accepted, and so is a hybrid on one rank."""
    from checks.hf import hybrid_model_errors
    from checks.hf_sweep import tiny_config
    from seqpar.hf import sequence_mixers
    types = ["jamba", "qwen3_next", "minimax", "lfm3", "llama"]
    errors = worlds.run(2, hybrid_model_errors, types)[0]
    for model_type, error in zip(types[:-1], errors):
        assert f"{model_type}: " in error and "mixes tokens outside attention" in error, (model_type, error)
        assert "train it with sp 1" in error
    assert errors[-1] == ""
    assert "MiniMaxLightningAttention" in " ".join(sequence_mixers(AutoModelForCausalLM.from_config(
        tiny_config("minimax"))))
    assert worlds.run(1, hybrid_model_errors, ["jamba"]) == [[""]]
