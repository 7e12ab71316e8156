"""Text corpora as training data, tokenized once into a seqpar token file and its document index.

Formats (`corpus_kind`): JSON lines (``.jsonl``) or a JSON file (``.json``: an array of objects,
or one object per line), Parquet (``.parquet``), a folder of ``.txt``/``.md`` files (searched
recursively, in sorted path order) and a directory written by `datasets`' ``save_to_disk`` (a
DatasetDict: its ``train`` split). Each row (or file) is one document; the text is the row's
`text_field`.

`prepare_corpus` reads the corpus through the `datasets` library (Arrow files, memory-mapped,
in a temporary directory of the cache), tokenizes it with `Dataset.map` in `workers` processes
(a Hugging Face tokenizer directory, or UTF-8 bytes: vocab 256) and writes the tokens as a
`.bin` token file (a `.npy` of int32 for vocabularies over 65536) with its ``.docs.npy`` index
(one document start per row: `seqpar.data` packs them). The entry is named by a hash of the
corpus's bytes, the text field and the tokenizer's files, so a second run (or `seqpar prepare`
ahead of it) reads the cache; hashing a large corpus is skipped when its files' sizes and
modification times are those of a hash made before (``.hashes/``).

Bad input is a one-line ValueError before anything is written: a missing field, a field that is
not text, an empty or null row, invalid UTF-8, an unreadable Parquet file, a tokenizer larger
than the model's vocabulary. Outputs are written under temporary names and renamed, and the
temporary directory is removed whatever happens, so the cache holds complete entries only.

Concurrency: a file lock per entry makes one process build it; `lead=False` callers (local
ranks other than 0 under torchrun) never build: they wait for the hash and the entry to appear.

`datasets` (and `transformers` for a tokenizer) are optional: imported when a corpus is
prepared, with a clear error when missing (``pip install -e '.[data]'``).
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import token_file_header, write_document_index
from .io import atomic_write

__all__ = ["CorpusSpec", "Prepared", "corpus_kind", "prepare_corpus", "tokenizer_files", "check_tokenizer_dir",
           "TOKENIZER_FILES", "TEXT_SUFFIXES"]

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
_READ = 1 << 22  # bytes per read when hashing / checking UTF-8


def corpus_kind(path: str | os.PathLike) -> str | None:
    """"json" | "parquet" | "text" (a folder of .txt/.md) | "arrow" (save_to_disk), or None for
    the formats `seqpar.data.open_tokens` reads (raw bytes, .npy, .bin)."""
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "arrow"
        return "text"
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix.lower())


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    return [Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()]


def check_tokenizer_dir(directory: str) -> None:
    if not tokenizer_files(directory):
        raise ValueError(f"--tokenizer {directory!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                         "...): pass a directory written by a tokenizer's save_pretrained")


@dataclass(frozen=True)
class CorpusSpec:
    """What to prepare: `tokenizer` a tokenizer directory ("" = UTF-8 bytes), `vocab` the model's
    vocabulary size (None: not checked), `workers` processes of the tokenizing map."""

    path: str
    cache_dir: str
    text_field: str = "text"
    tokenizer: str = ""
    workers: int = 1
    vocab: int | None = None

    @property
    def kind(self) -> str:
        kind = corpus_kind(self.path)
        if kind is None:
            raise ValueError(f"{self.path!r} is not a corpus (.jsonl, .json, .parquet, a folder of .txt/.md files "
                             "or a save_to_disk directory)")
        return kind


@dataclass(frozen=True)
class Prepared:
    """A prepared corpus: the token file (its index beside it) and what building it took."""

    path: Path
    documents: int
    tokens: int
    built: bool
    seconds: float = 0.0

    def describe(self, source: str) -> str:
        if not self.built:
            return f"{source}: cached tokens {self.path} ({self.documents:,} documents, {self.tokens:,} tokens)"
        rate = self.tokens / max(self.seconds, 1e-9)
        return (f"{source}: tokenized {self.documents:,} documents into {self.tokens:,} tokens in {self.seconds:.1f} s "
                f"({rate:,.0f} tokens/s) -> {self.path}")


# -- identity ---------------------------------------------------------------------------------------
def _source_files(spec: CorpusSpec) -> list[Path]:
    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"data {spec.path!r} does not exist")
    if path.is_file():
        return [path]
    if spec.kind == "text":
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES and f.is_file())
        if not files:
            raise ValueError(f"data folder {spec.path!r} has no .txt/.md files and is not a save_to_disk directory")
        return files
    return sorted(f for f in path.rglob("*") if f.is_file())


def _stat_signature(spec: CorpusSpec, files: list[Path]) -> str:
    """Hash of the files' paths, sizes and modification times: the memo key of their content hash."""
    root = Path(spec.path).resolve()
    items = [(str(f.resolve().relative_to(root)) if f != root else "", *_stat(f)) for f in files]
    return hashlib.sha256(json.dumps([str(root), items]).encode()).hexdigest()[:32]


def _stat(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


def _hash_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_READ):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _entry_key(spec: CorpusSpec, content: str) -> str:
    """The cache key: corpus content, format, text field and tokenizer (its files' bytes)."""
    digest = hashlib.sha256(f"seqpar-corpus {FORMAT_VERSION} {spec.kind} {spec.text_field!r} {content}".encode())
    if spec.tokenizer:
        digest.update(_hash_files(tokenizer_files(spec.tokenizer), Path(spec.tokenizer)).encode())
    else:
        digest.update(b"utf-8 bytes")
    return digest.hexdigest()[:16]


def _entry(spec: CorpusSpec, key: str) -> Path | None:
    """The complete cache entry of `key` (token file with its index), or None."""
    stem = Path(spec.path).name.replace(".", "_")
    for suffix in (".bin", ".npy"):
        path = Path(spec.cache_dir) / f"{stem}.{key}{suffix}"
        if path.is_file() and Path(f"{path}.docs.npy").is_file():
            return path
    return None


# -- preparing ----------------------------------------------------------------------------------------
def prepare_corpus(spec: CorpusSpec, lead: bool = True, wait_s: float = 600.0) -> Prepared:
    """The corpus's cached token file, built first if missing (see the module docstring)."""
    files = _source_files(spec)
    memo = Path(spec.cache_dir) / ".hashes" / _stat_signature(spec, files)
    if not lead:
        content = _wait_for(memo, wait_s, spec).read_text().strip()
        key = _entry_key(spec, content)
        return _cached(_wait_for(lambda: _entry(spec, key), wait_s, spec))
    from filelock import FileLock  # a dependency of torch
    Path(spec.cache_dir).mkdir(parents=True, exist_ok=True)
    if memo.is_file():
        content = memo.read_text().strip()
    else:
        content = _hash_files(files, Path(spec.path))
        atomic_write(memo, content)
    key = _entry_key(spec, content)
    with FileLock(str(Path(spec.cache_dir) / f".{key}.lock")):
        found = _entry(spec, key)
        return _cached(found) if found else _build(spec, files, key)


def _wait_for(what, wait_s: float, spec: CorpusSpec) -> Path:
    """Poll until the path (or what the callable returns) exists; a ValueError after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        path = what() if callable(what) else what
        if path is not None and path.is_file():
            return path
        if time.monotonic() > deadline:
            raise ValueError(f"waited {wait_s:.0f} s for local rank 0 to prepare {spec.path!r} in "
                             f"{spec.cache_dir!r}; run `seqpar prepare` first or raise --timeout")
        time.sleep(0.2)


def _cached(path: Path) -> Prepared:
    starts = np.load(f"{path}.docs.npy", mmap_mode="r")
    n = (path.stat().st_size - 16) // 2 if path.suffix == ".bin" else len(np.load(path, mmap_mode="r"))
    return Prepared(path, len(starts), int(n), built=False)


def _build(spec: CorpusSpec, files: list[Path], key: str) -> Prepared:
    t0 = time.perf_counter()
    tokenizer, vocab = _tokenizer(spec)
    if spec.kind in ("json", "text"):
        for f in files:
            _check_utf8(f)
    datasets = _datasets()
    tmp = Path(spec.cache_dir) / f".tmp-{key}-{os.getpid()}"
    stem = Path(spec.path).name.replace(".", "_")
    out = Path(spec.cache_dir) / f"{stem}.{key}{'.bin' if vocab <= 65536 else '.npy'}"
    try:
        with _quiet_datasets(datasets):
            table = _tokenize(_load(spec, files, tmp, datasets), spec, tokenizer, tmp, files, key)
            documents, tokens = _write(table, out, tmp, vocab, spec)
    except BaseException:
        Path(f"{out}.docs.npy").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(out, documents, tokens, built=True, seconds=time.perf_counter() - t0)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("reading .jsonl/.json/.parquet/text-folder/save_to_disk data needs the `datasets` "
                         "package: pip install -e '.[data]'") from None
    return datasets


@contextlib.contextmanager
def _quiet_datasets(datasets):
    """datasets' progress bars only on a terminal, its log at CRITICAL (our errors say what failed)."""
    level, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    (datasets.enable_progress_bars if sys.stderr.isatty() else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()


def _tokenizer(spec: CorpusSpec):
    """(tokenizer or None for bytes, the token file's vocabulary), checked against the model's."""
    if not spec.tokenizer:
        if spec.vocab is not None and spec.vocab < 256:
            raise ValueError(f"byte tokens need a vocabulary of 256, the model has {spec.vocab}: set --vocab-size "
                             "256 or pass --tokenizer")
        return None, 256
    check_tokenizer_dir(spec.tokenizer)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError("--tokenizer needs transformers: pip install -e '.[hf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for unreadable tokenizers
        raise ValueError(f"cannot load the tokenizer in {spec.tokenizer!r}: {_reason(e)}") from None
    size = len(tokenizer)
    if spec.vocab is not None and size > spec.vocab:
        raise ValueError(f"the tokenizer in {spec.tokenizer!r} has {size} tokens, more than the model's vocabulary "
                         f"of {spec.vocab}: use the model's own tokenizer (or --vocab-size {size} for the built-in "
                         "model)")
    return tokenizer, size


def _check_utf8(path: Path) -> None:
    decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_READ)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise ValueError(f"{str(path)!r} is not valid UTF-8 (byte {done + e.start}: {e.reason})") from None
            if not chunk:
                return
            done += len(chunk)


def _load(spec: CorpusSpec, files: list[Path], tmp: Path, datasets):
    """The corpus as a `datasets.Dataset` (Arrow, memory-mapped) with its text field checked."""
    kind, where = spec.kind, str(spec.path)
    try:
        if kind == "arrow":
            ds = datasets.load_from_disk(where)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds and len(ds) != 1:
                    raise ValueError(f"the DatasetDict in {where!r} has splits {list(ds)} and none named 'train'")
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            builder = {"json": "json", "parquet": "parquet", "text": "text"}[kind]
            extra = {"sample_by": "document", "keep_linebreaks": True} if kind == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       cache_dir=str(tmp / "load"), **extra)
    except Exception as e:  # noqa: BLE001 - datasets / pyarrow raise many types for unreadable files
        raise ValueError(f"cannot read {where!r}: {_reason(e)}") from None
    if kind == "text":
        return ds
    if spec.text_field not in ds.column_names:
        raise ValueError(f"{where!r} has no field {spec.text_field!r} (its fields: {ds.column_names}); pick one with "
                         "--text-field")
    feature = ds.features[spec.text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"field {spec.text_field!r} of {where!r} is not text in every row (its type: {feature})")
    return ds


def _reason(e: BaseException) -> str:
    """The innermost cause's message, on one line."""
    while (nxt := e.__cause__ or (None if e.__suppress_context__ else e.__context__)) is not None:
        e = nxt
    return " ".join(str(e).split()) or type(e).__name__


class _Tokenize:
    """The map function: a batch of rows -> {"ids": token lists}; empty / null rows are errors."""

    def __init__(self, field: str, tokenizer, source: str, names: list[str] | None = None):
        self.field, self.tokenizer, self.source, self.names = field, tokenizer, source, names

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        texts = batch[self.field]
        for i, text in zip(indices, texts):
            if not isinstance(text, str) or not text:
                what = "null" if text is None else "empty"
                if self.names:
                    raise ValueError(f"{self.names[i]!r} is {what} (every file must be a non-empty document)")
                raise ValueError(f"{self.source}: row {i}: field {self.field!r} is {what} (every row must be a "
                                 "non-empty document)")
        if self.tokenizer is None:
            return {"ids": [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int32) for t in texts]}
        return {"ids": self.tokenizer(texts, add_special_tokens=False)["input_ids"]}


def _tokenize(ds, spec: CorpusSpec, tokenizer, tmp: Path, files: list[Path], key: str):
    """The Arrow column of token lists, one row per document (map in spec.workers processes;
    0: one per core, at most 8, and none beyond one per 64 rows)."""
    datasets = _datasets()
    field = "text" if spec.kind == "text" else spec.text_field
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(spec.workers or min(cores, 8), len(ds) // 64 or 1))
    (tmp / "map").mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
    names = [str(f) for f in files] if spec.kind == "text" else None
    mapped = ds.map(_Tokenize(field, tokenizer, repr(str(spec.path)), names), batched=True, with_indices=True,
                    remove_columns=ds.column_names, features=features, num_proc=workers if workers > 1 else None,
                    cache_file_name=str(tmp / "map" / "tokens.arrow"), new_fingerprint=f"seqpar-{key}",
                    desc="tokenizing")
    return mapped.data.table.column("ids")


def _write(column, out: Path, tmp: Path, vocab: int, spec: CorpusSpec) -> tuple[int, int]:
    """Stream the token lists into `out` (temporary name, renamed last) and its document index."""
    import pyarrow.compute as pc  # with datasets

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        raise ValueError(f"{spec.path!r}: the tokenizer produced no tokens")
    part = tmp / out.name
    if out.suffix == ".bin":
        with open(part, "wb") as fh:
            fh.write(token_file_header(vocab))
            for chunk in column.chunks:
                fh.write(_checked(chunk, vocab, spec).astype("<u2").tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    else:
        array, at = np.lib.format.open_memmap(part, mode="w+", dtype=np.int32, shape=(total,)), 0
        for chunk in column.chunks:
            ids = _checked(chunk, vocab, spec)
            array[at:at + len(ids)], at = ids, at + len(ids)
        array.flush()
        del array
    ends = np.cumsum(lengths)
    starts = np.unique(ends - lengths)  # a document of no tokens adds no start
    write_document_index(out, starts[starts < total])
    os.replace(part, out)
    return len(lengths), total


def _checked(chunk, vocab: int, spec: CorpusSpec) -> np.ndarray:
    ids = chunk.flatten().to_numpy(zero_copy_only=False)
    if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"the tokenizer of {spec.tokenizer!r} produced token id {int(ids.max())}, outside the "
                         f"vocabulary of {vocab}")
    return ids
