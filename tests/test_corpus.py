"""Corpora as training data (seqpar.corpus): every format keeps its rows as documents, tokenized
once (cached by content, field and tokenizer), bad input is one line with exit code 2 and leaves
no partial cache entry; the validation split holds out whole documents; batches are prefetched
(data_wait_s); --tensorboard mirrors metrics.jsonl; `seqpar train --data x.jsonl` end to end."""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from checks.train import run_training
from seqpar import corpus
from seqpar.cli import main
from seqpar.corpus import CorpusSpec, prepare_corpus
from seqpar.data import Prefetcher, TokenData, find_documents, open_tokens, split_tokens
from seqpar.train import TrainConfig

datasets = pytest.importorskip("datasets")

ROWS = ["def f(x):\n    return x + 1\n", "# a second document\nprint('hello')\n", "ünïcödé ✓ text",
        "class A:\n    pass\n" * 20, "x = [1, 2, 3]\n"]
TINY = ["--config", "tiny", "--nproc", "2", "--dim", "32", "--seq-len", "32", "--batch", "1", "--no-plot",
        "--checkpoint-every", "0", "--data-workers", "1"]


# -- helpers ------------------------------------------------------------------------------------------
def char_tokenizer(directory, extra=""):
    """A character-level tokenizer (printable ASCII + newline + `extra`, <unk>) saved offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<unk>", "\n", *map(chr, range(32, 127)), *extra]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)
    return str(directory)


def write_corpus(kind, root: Path, rows=ROWS) -> Path:
    """`rows` written in format `kind`; the returned path is what --data takes."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = root / "c.jsonl"
        path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    elif kind == "json":
        path = root / "c.json"
        path.write_text(json.dumps([{"text": r} for r in rows]))
    elif kind == "parquet":
        path = root / "c.parquet"
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(path))
    elif kind == "txt":
        path = root / "texts"
        for i, r in enumerate(rows):  # sorted path order is row order; .md and a subfolder count too
            folder = path / "sub" if i == len(rows) - 1 else path
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}.{'md' if i % 2 else 'txt'}").write_text(r)
    elif kind in ("saved", "saved_dict"):
        path = root / kind
        ds = datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))})
        (datasets.DatasetDict({"train": ds, "test": ds.select([0])}) if kind == "saved_dict" else ds) \
            .save_to_disk(str(path))
    return path


def documents(token_file) -> list[np.ndarray]:
    data = find_documents(open_tokens(token_file), None)
    bounds = [*data.doc_starts.tolist(), len(data)]
    return [np.asarray(data.tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def cache_is_clean(cache: Path) -> None:
    """Nothing but complete entries: no token file, index or temporary directory after a failure."""
    left = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")
            and p.parent.name != ".hashes"]
    assert not left, left
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def count_builds(monkeypatch):
    """The number of times a corpus was tokenized (corpus._tokenize called)."""
    calls = []
    real = corpus._tokenize
    monkeypatch.setattr(corpus, "_tokenize", lambda *a, **k: calls.append(a[1].path) or real(*a, **k))
    return calls


# -- formats --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "txt", "saved", "saved_dict"])
def test_every_format_keeps_its_rows_as_documents(tmp_path, kind):
    path = write_corpus(kind, tmp_path / "src")
    prepared = prepare_corpus(CorpusSpec(str(path), str(tmp_path / "cache"), workers=1, vocab=256))
    assert prepared.built and prepared.documents == len(ROWS)
    assert [bytes(d.astype(np.uint8)).decode() for d in documents(prepared.path)] == ROWS
    assert open_tokens(prepared.path).vocab_size == 256


def test_a_tokenizer_in_several_processes_keeps_documents(tmp_path):
    """200 rows, `map` in 2 processes, a Hugging Face tokenizer: document i is row i's token ids."""
    tok = char_tokenizer(tmp_path / "tok")
    rows = [f"row {i}: " + "ab\n" * (i % 7 + 1) for i in range(200)]
    path = write_corpus("jsonl", tmp_path / "src", rows)
    prepared = prepare_corpus(CorpusSpec(str(path), str(tmp_path / "cache"), tokenizer=tok, workers=2, vocab=128))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok)
    got = documents(prepared.path)
    assert len(got) == 200
    assert all(d.tolist() == tokenizer(r, add_special_tokens=False)["input_ids"] for d, r in zip(got, rows))
    assert open_tokens(prepared.path).vocab_size == len(tokenizer)


# -- caching --------------------------------------------------------------------------------------------
def test_a_second_prepare_reads_the_cache(tmp_path, count_builds):
    path = write_corpus("jsonl", tmp_path / "src")
    cache = str(tmp_path / "cache")
    spec = CorpusSpec(str(path), cache, workers=1, vocab=256)
    first = prepare_corpus(spec)
    stamp = first.path.stat().st_mtime_ns
    again = prepare_corpus(spec)
    assert (again.path, again.built, len(count_builds)) == (first.path, False, 1)  # not tokenized again
    assert again.path.stat().st_mtime_ns == stamp and again.documents == len(ROWS)
    tok_a, tok_b = char_tokenizer(tmp_path / "a"), char_tokenizer(tmp_path / "b", extra="é")
    with_a = prepare_corpus(CorpusSpec(str(path), cache, tokenizer=tok_a, workers=1, vocab=128))
    with_b = prepare_corpus(CorpusSpec(str(path), cache, tokenizer=tok_b, workers=1, vocab=128))
    assert len({first.path, with_a.path, with_b.path}) == 3 and len(count_builds) == 3  # tokenizer in the key
    assert prepare_corpus(CorpusSpec(str(path), cache, tokenizer=tok_a, workers=1, vocab=128)).built is False
    path.write_text(path.read_text() + json.dumps({"text": "one more row"}) + "\n")  # new content: new entry
    changed = prepare_corpus(spec)
    assert changed.built and changed.path != first.path and changed.documents == len(ROWS) + 1


def test_train_and_prepare_share_the_cache(tmp_path, count_builds, capsys):
    """`seqpar prepare` ahead of a run: `seqpar train`'s launcher then reads the same entry."""
    path = write_corpus("jsonl", tmp_path / "src")
    flags = ["--data", str(path), "--out-dir", str(tmp_path / "run"), "--data-cache", str(tmp_path / "cache")]
    assert main(["prepare", *flags]) == 0
    out = capsys.readouterr()
    assert "tokenized 5 documents" in out.err and out.out.strip().endswith(".bin")
    from seqpar.train.launch import resolve_inputs
    cfg = resolve_inputs(TrainConfig.of(data=str(path), out_dir=str(tmp_path / "run"), seq_len=16, val_fraction=0.3,
                                        data_cache=str(tmp_path / "cache")))
    assert cfg.data.data == out.out.strip() and len(count_builds) == 1


def test_other_local_ranks_wait_for_the_lead(tmp_path, count_builds):
    """Under torchrun local rank 0 prepares; the others never tokenize: they wait for its entry."""
    path = write_corpus("jsonl", tmp_path / "src")
    spec = CorpusSpec(str(path), str(tmp_path / "cache"), workers=1, vocab=256)
    with pytest.raises(ValueError, match="waited 0 s for local rank 0 to prepare"):
        prepare_corpus(spec, lead=False, wait_s=0.3)
    got = []
    waiter = threading.Thread(target=lambda: got.append(prepare_corpus(spec, lead=False, wait_s=120)))
    waiter.start()
    lead = prepare_corpus(spec)
    waiter.join(120)
    assert got and got[0].path == lead.path and not got[0].built and lead.built and len(count_builds) == 1


# -- bad input ------------------------------------------------------------------------------------------
def _bad_jsonl(root, lines):
    path = root / "bad.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _bad_texts(root, files):
    for name, data in files.items():
        (root / "texts").mkdir(parents=True, exist_ok=True)
        (root / "texts" / name).write_bytes(data)
    return root / "texts"


BAD = {
    "missing field": (lambda r: _bad_jsonl(r, [b'{"body": "no text field"}']), "has no field 'text'"),
    "empty row": (lambda r: _bad_jsonl(r, [b'{"text": "fine"}', b'{"text": ""}']), "row 1: field 'text' is empty"),
    "null row": (lambda r: _bad_jsonl(r, [b'{"text": "fine"}', b'{"text": null}']), "row 1: field 'text' is null"),
    "numbers": (lambda r: _bad_jsonl(r, [b'{"text": 5}', b'{"text": 6}']), "field 'text' of .* is not text"),
    "mixed types": (lambda r: _bad_jsonl(r, [b'{"text": "a"}', b'{"text": 6}']), "field 'text' of .* is not text"),
    "invalid utf-8 jsonl": (lambda r: _bad_jsonl(r, [b'{"text": "ok"}', b'{"text": "bad \xff\xfe"}']),
                            r"bad.jsonl' is not valid UTF-8 \(byte 29"),
    "invalid utf-8 text": (lambda r: _bad_texts(r, {"a.txt": b"fine", "b.md": b"\xc3("}), "b.md' is not valid UTF-8"),
    "empty file": (lambda r: _bad_texts(r, {"a.txt": b"fine", "b.txt": b""}), "b.txt' is empty"),
    "corrupt parquet": (lambda r: (r / "c.parquet").write_bytes(b"PAR1 not really") and r / "c.parquet",
                        "cannot read .*c.parquet'.*(magic bytes|corrupt)"),
    "truncated parquet": (lambda r: (r / "t.parquet").write_bytes(
        (write_corpus("parquet", r / "ok").read_bytes())[:-20]) and r / "t.parquet", "cannot read .*t.parquet'"),
    "missing file": (lambda r: r / "nope.jsonl", "nope.jsonl' does not exist"),
    "no text files": (lambda r: _bad_texts(r, {"a.csv": b"1,2"}), "has no .txt/.md files"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_partial_cache(tmp_path, capsys, case):
    make, message = BAD[case]
    data = make(tmp_path)
    capsys.readouterr()  # writing a valid parquet file first shows datasets' progress bar
    cache = tmp_path / "cache"
    rc = main(["train", "--data", str(data), "--out-dir", str(tmp_path / "run"), "--data-cache", str(cache), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("seqpar train: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no worker started
    if cache.exists():
        cache_is_clean(cache)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_rejected(tmp_path, capsys):
    tok = char_tokenizer(tmp_path / "tok")
    data = write_corpus("jsonl", tmp_path / "src")
    cache = tmp_path / "cache"
    rc = main(["train", "--data", str(data), "--tokenizer", tok, "--vocab-size", "64", "--data-cache", str(cache),
               "--out-dir", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert "has 97 tokens, more than the model's vocabulary of 64" in err
    cache_is_clean(cache)
    assert main(["train", "--data", str(tmp_path / "raw.txt"), "--tokenizer", tok, *TINY]) == 2  # not a corpus
    assert "--tokenizer applies to corpus data" in capsys.readouterr().err


def test_missing_packages_are_clear_errors(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("datasets", "tensorboard")
                        else real(name, *a))
    with pytest.raises(ValueError, match=r"needs the tensorboard package: pip install -e '.\[data\]'"):
        TrainConfig.of(tensorboard=True).validate(4)
    with pytest.raises(ValueError, match=r"read with the `datasets` package: pip install -e '.\[data\]'"):
        TrainConfig.of(data=str(tmp_path / "x.jsonl")).validate(4)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        corpus._datasets()


# -- validation split -------------------------------------------------------------------------------------
def test_validation_holds_out_whole_documents():
    """Document d is 40..200 copies of token d: the split must put each document in one split only,
    the same for the same seed, and about val_fraction of the tokens in validation."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 200, size=60)
    tokens = np.repeat(np.arange(60), lengths)
    data = TokenData(tokens, 60, "docs", np.concatenate([[0], np.cumsum(lengths)[:-1]]))

    def split(seed):
        train, val = split_tokens(data, 0.1, 32, seed)
        docs = [sorted(set(np.asarray(part.tokens[:]).tolist())) for part in (train, val)]
        for part, ids in zip((train, val), docs):  # its document starts are where a new document begins
            assert [int(np.asarray(part.tokens[s:s + 1])[0]) for s in part.doc_starts] == ids
        return docs, len(val)

    (train, val), n_val = split(0)
    assert not set(train) & set(val) and sorted(train + val) == list(range(60))
    assert 0.1 * len(tokens) <= n_val <= 0.2 * len(tokens)
    assert split(0)[0] == [train, val]  # reproducible
    assert split(1)[0][1] != val  # another seed, other documents
    tail = TokenData(np.arange(1000) % 7, 7, "raw")  # no documents: the tail, as before
    assert len(split_tokens(tail, 0.1, 32)[1]) == 100


def test_training_windows_come_from_training_documents_only(tmp_path):
    """A prepared corpus through LanguageTask's split: the val loader's windows only hold val text."""
    rows = [f"{chr(65 + i)}" * 80 for i in range(20)]  # document i: 80 copies of one letter
    prepared = prepare_corpus(CorpusSpec(str(write_corpus("jsonl", tmp_path, rows)), str(tmp_path / "c"),
                                         workers=1, vocab=256))
    train, val = split_tokens(find_documents(open_tokens(prepared.path), None), 0.2, 16, seed=3)
    letters = [set(np.asarray(p.tokens[:]).tolist()) for p in (train, val)]
    assert not letters[0] & letters[1] and len(letters[1]) >= 4


# -- prefetch and metrics ---------------------------------------------------------------------------------
def test_prefetcher_serves_each_step_once_and_ahead():
    calls, lock = [], threading.Lock()

    def batch(step):
        with lock:
            calls.append(step)
        return step * 10

    pre = Prefetcher(batch, 3)
    assert [pre.get(s) for s in range(5)] == [0, 10, 20, 30, 40]
    assert pre.get(9) == 90  # a jump (resume): the stale look-ahead is dropped
    pre.close()
    assert calls[:1] == [0] and set(range(5)) | {9} <= set(calls) and len(calls) == len(set(calls))
    assert Prefetcher(batch, 0).get(4) == 40


def test_prefetched_training_matches_on_demand(worlds, tmp_path):
    """Two ranks train on a corpus (each prepares: one tokenizes, the file lock makes the other read
    its entry); prefetched batches give the same losses as on-demand ones; data_wait_s is logged."""
    path = write_corpus("jsonl", tmp_path / "src", [r * 8 for r in ROWS])
    cfg = dict(data=str(path), out_dir=str(tmp_path / "a"), vocab_size=256, dim=32, n_layers=1, n_heads=4,
               n_kv_heads=2, seq_len=32, batch=2, steps=3, warmup=1, eval_every=0, eval_batches=1,
               checkpoint_every=0, progress=False, plot=False, strategy="ring", data_workers=1, val_fraction=0.2)
    ahead = worlds.run(2, run_training, {**cfg, "prefetch": 2})[0]
    now = worlds.run(2, run_training, {**cfg, "prefetch": 0, "out_dir": str(tmp_path / "b")})[0]
    assert ahead["losses"] == now["losses"] and ahead["val_losses"] == now["val_losses"]
    train = [r for r in ahead["records"] if r["type"] == "train"]
    assert len(train) == 3 and all(r["data_wait_s"] >= 0 for r in train)
    assert len(list((tmp_path / "a" / "data").glob("*.bin"))) == 1


# -- end to end -----------------------------------------------------------------------------------------
def test_train_on_a_jsonl_corpus_end_to_end_with_tensorboard(tmp_path):
    """`seqpar train --data x.jsonl` on 2 processes: the corpus's documents are packed, metrics.jsonl
    has data_wait_s, and the TensorBoard event file holds the same scalars."""
    path = write_corpus("jsonl", tmp_path / "src", [r * 10 for r in ROWS] * 4)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "seqpar", "train", "--data", str(path), "--out-dir", str(out), "--steps", "3",
           "--eval-every", "2", "--tensorboard", "--val-fraction", "0.2", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenized 20 documents" in proc.stderr and "20 packed documents" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["data_wait_s"] >= 0 for r in train)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb", "comm_bytes", "step_time_s",
                "data_wait_s", "comm/p2p", "comm/grad_all_reduce", "val_loss"}
    assert expected <= tags, expected - tags
    for record in records:
        for key, value in record.items():
            if key in ("loss", "lr", "grad_norm", "mfu", "val_loss", "data_wait_s"):
                (event,) = [e for e in events.Scalars(key) if e.step == record["step"]]
                assert event.value == pytest.approx(value, rel=1e-6)
        for kind, sent in record.get("comm", {}).items():
            (event,) = [e for e in events.Scalars(f"comm/{kind}") if e.step == record["step"]]
            assert event.value == pytest.approx(sent, rel=1e-6)


def test_torchrun_local_rank_zero_prepares(tmp_path):
    """Under torchrun (2 local ranks) local rank 0 tokenizes the corpus once; rank 1 waits for it."""
    path = write_corpus("jsonl", tmp_path / "src", [r * 10 for r in ROWS] * 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "seqpar",
           "train", "--data", str(path), "--out-dir", str(tmp_path / "run"), "--steps", "2", "--val-fraction", "0.2",
           *TINY[:2], *TINY[4:]]  # torchrun sets the world (it would take --nproc for its own flag)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tokenized 10 documents") == 1 and "cached tokens" not in proc.stderr
    assert len(list((tmp_path / "run" / "data").glob("*.bin"))) == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
