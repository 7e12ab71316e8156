"""Token data for training: corpora, memory-mapped token files, a resumable loader, sharding.

Sources (all memory-mapped, read-only, 1-D token arrays):

- raw bytes (any file that is not .npy/.bin, e.g. enwik8): one token per byte, vocab 256;
- ``.npy``: a 1-D integer array (np.save);
- ``.bin``: packed tokens with a 16-byte header: magic ``SEQPTOK1``, uint32 little-endian
  version (1) and vocab size, then uint16 little-endian tokens (`write_token_file`).

With no data file, `stdlib_corpus` builds a deterministic byte corpus from the Python
standard library's ``.py`` sources (hash-ordered files, capped), cached under the run directory,
with its document index (each file's start offset) beside it.

Packed documents: a token source may carry document boundaries, either a sidecar index
``<file>.docs.npy`` (1-D sorted start offsets, written by `write_document_index`) or a
separator token that ends every document (EOS style: `find_documents`). `SequenceLoader`
then also gives, per window row, the document starts inside it (`Packed`), from which
`shard_batch` derives cu_seqlens, per-document positions and the labels to ignore.

Validation: with document boundaries, `split_tokens` holds out whole documents, chosen by a
seeded permutation until they hold about val_fraction of the tokens (no document is in both
splits; the same seed gives the same split); without boundaries, the tail of the tokens. Each
split is a `Segments` view (the runs of its documents in the memory-mapped file, nothing copied).

`SequenceLoader` draws windows of seq_len + 1 tokens at offsets that depend only on
(seed, step), so its state is two integers and a resumed run sees the same batches;
data-parallel rank r takes rows [r*batch, (r+1)*batch) of each global batch.
`shard_batch` splits a window with the sequence-parallel context: tokens and labels with
`ctx.shard`, positions with `ctx.positions`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sysconfig
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .context import SeqParallel
from .io import atomic_write
from .model import IGNORE_INDEX

__all__ = ["open_tokens", "write_token_file", "token_file_header", "write_document_index", "find_documents",
           "stdlib_corpus", "split_tokens", "Segments", "SequenceLoader", "Prefetcher", "Packed", "shard_batch",
           "TOKEN_MAGIC", "IGNORE_INDEX"]

TOKEN_MAGIC = b"SEQPTOK1"
_HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("vocab", "<u4")])


@dataclass
class TokenData:
    """A read-only 1-D token array and the vocabulary size it needs."""

    tokens: np.ndarray
    vocab_size: int
    path: str
    doc_starts: np.ndarray | None = None  # sorted int64 document start offsets (None: no boundaries known)

    def __len__(self) -> int:
        return len(self.tokens)


def _index_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.docs.npy")


def write_document_index(data_path: str | os.PathLike, starts) -> Path:
    """Write the document start offsets of a token source as its sidecar ``<file>.docs.npy``."""
    starts = np.asarray(starts, dtype=np.int64)
    if starts.ndim != 1 or (len(starts) > 1 and not (np.diff(starts) > 0).all()) or (len(starts) and starts[0] < 0):
        raise ValueError("document starts must be a 1-D strictly increasing array of offsets >= 0")
    out = _index_path(data_path)
    buf = io.BytesIO()
    np.save(buf, starts)
    atomic_write(out, buf.getvalue())
    return out


def _read_document_index(data: TokenData) -> np.ndarray | None:
    path = _index_path(data.path)
    if not path.is_file():
        return None
    try:
        starts = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"document index {str(path)!r} is not a valid .npy file: {e}") from None
    ok = starts.ndim == 1 and np.issubdtype(starts.dtype, np.integer) and (np.diff(starts) > 0).all()
    if not ok or (len(starts) and (starts[0] < 0 or starts[-1] >= len(data))):
        raise ValueError(f"document index {str(path)!r} must hold strictly increasing offsets in "
                         f"[0, {len(data)}) (the data has {len(data)} tokens); rebuild it or delete it")
    return starts.astype(np.int64)


def find_documents(data: TokenData, separator: int | None) -> TokenData:
    """`data` with its document starts: after every `separator` token (which ends its document)
    when one is given, else from the sidecar index ``<file>.docs.npy`` when present."""
    if separator is None:
        return dataclasses.replace(data, doc_starts=_read_document_index(data))
    if not 0 <= separator < max(data.vocab_size, 1):
        raise ValueError(f"document separator {separator} is not a token id of {data.path!r} "
                         f"(vocab {data.vocab_size})")
    ends = np.flatnonzero(np.asarray(data.tokens) == separator)
    if not len(ends):
        raise ValueError(f"document separator {separator} never occurs in {data.path!r}: no documents to pack")
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    return dataclasses.replace(data, doc_starts=starts[starts < len(data)])


def token_file_header(vocab_size: int) -> bytes:
    """The 16-byte header of a `.bin` token file (its uint16 little-endian tokens follow)."""
    if not 0 < vocab_size <= 65536:
        raise ValueError(f"a .bin token file holds vocab sizes in [1, 65536], got {vocab_size}")
    return np.array([(TOKEN_MAGIC, 1, vocab_size)], dtype=_HEADER).tobytes()


def write_token_file(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens (< vocab_size <= 65536) as a `.bin` token file, atomically."""
    tokens = np.asarray(tokens)
    if vocab_size > 65536 or (tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size)):
        raise ValueError(f"tokens must lie in [0, {vocab_size}) with vocab_size <= 65536")
    atomic_write(Path(path), token_file_header(vocab_size) + tokens.astype("<u2").tobytes())


def open_tokens(path: str | os.PathLike) -> TokenData:
    """Memory-map a token source (see module docstring); clear errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    if path.suffix == ".npy":
        return _open_npy(path)
    if path.suffix == ".bin":
        return _open_bin(path)
    return TokenData(np.memmap(path, dtype=np.uint8, mode="r"), 256, str(path))


def _open_npy(path: Path) -> TokenData:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{str(path)!r} is not a valid .npy file: {e}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{str(path)!r} must hold a 1-D integer token array, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    vocab = int(arr.max()) + 1 if len(arr) else 0
    if len(arr) and int(arr.min()) < 0:
        raise ValueError(f"{str(path)!r} contains negative token ids")
    return TokenData(arr, vocab, str(path))


def _open_bin(path: Path) -> TokenData:
    size = path.stat().st_size
    if size < _HEADER.itemsize:
        raise ValueError(f"{str(path)!r} is too short for a seqpar token file header")
    header = np.fromfile(path, dtype=_HEADER, count=1)[0]
    if header["magic"] != TOKEN_MAGIC or header["version"] != 1:
        raise ValueError(f"{str(path)!r} is not a seqpar token file (bad magic/version); "
                         "write one with seqpar.data.write_token_file")
    if (size - _HEADER.itemsize) % 2:
        raise ValueError(f"{str(path)!r} is truncated: {size - _HEADER.itemsize} payload bytes is not a "
                         "whole number of uint16 tokens")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=_HEADER.itemsize)
    return TokenData(tokens, int(header["vocab"]), str(path))


def stdlib_corpus(cache_dir: str | os.PathLike, max_bytes: int = 4_000_000) -> Path:
    """Concatenate the standard library's .py files into a cached byte file of at most max_bytes.

    Files are taken in the order of the SHA-1 of their relative paths: deterministic for a
    given Python installation, yet a mix of the whole library (alphabetical order would put,
    e.g., all the encodings/ code-page tables into the held-out tail). Written atomically,
    rebuilt only if missing. Each file is a document: their start offsets go to the sidecar
    index (`write_document_index`).
    """
    out = Path(cache_dir) / f"python_stdlib_{max_bytes}.txt"
    if out.is_file() and out.stat().st_size > 0 and _index_path(out).is_file():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file()]
    files.sort(key=lambda f: hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest())
    pieces, starts, total = [], [], 0
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        pieces.append(data)
        starts.append(total)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(pieces)[:max_bytes]
    if not blob:
        raise FileNotFoundError(f"no Python sources found under {root}; pass a data file with --data")
    atomic_write(out, blob)
    write_document_index(out, starts)
    return out


class Segments:
    """Read-only concatenation of runs of a 1-D token array: runs int64 [n, 2] of (start, length)
    in `base`. Sliced like an array (`view[a:b]`, step 1), copying only the tokens returned."""

    def __init__(self, base: np.ndarray, runs: np.ndarray):
        self.base, self.runs = base, np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        self.offsets = np.concatenate([[0], np.cumsum(self.runs[:, 1])])  # run i at [offsets[i], offsets[i+1])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("Segments supports slices only")
        lo, hi, step = key.indices(len(self))
        if step != 1:
            raise ValueError("Segments supports slices of step 1 only")
        pieces, i = [], int(np.searchsorted(self.offsets, lo, side="right")) - 1
        while lo < hi:
            start = int(self.runs[i, 0] + lo - self.offsets[i])
            n = int(min(hi, self.offsets[i + 1]) - lo)
            pieces.append(np.asarray(self.base[start:start + n]))
            lo, i = lo + n, i + 1
        return np.concatenate(pieces) if pieces else np.asarray(self.base[0:0])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


def split_tokens(data: TokenData, val_fraction: float, seq_len: int, seed: int = 0) -> tuple[TokenData, TokenData]:
    """(train, val): whole documents held out when `data` has document starts (about val_fraction
    of the tokens, chosen by a permutation seeded with `seed`: disjoint and reproducible) when it
    has two or more, else the tail val_fraction of the tokens; both must fit a window of seq_len + 1
    tokens."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if data.doc_starts is not None and len(data.doc_starts) + int(data.doc_starts[0] != 0) >= 2:
        return _split_documents(data, val_fraction, seq_len, seed)  # (one document: its tail, below)
    n_val = int(len(data) * val_fraction)
    train, val = data.tokens[: len(data) - n_val], data.tokens[len(data) - n_val:]
    _check_split(data, val_fraction, seq_len, len(train), len(val), "")
    return TokenData(train, data.vocab_size, data.path), TokenData(val, data.vocab_size, data.path)


def _check_split(data: TokenData, val_fraction: float, seq_len: int, n_train: int, n_val: int, how: str) -> None:
    need = seq_len + 1
    if n_train < need or n_val < need:
        raise ValueError(f"data file {data.path!r} has {len(data)} tokens: too few for train/val windows of "
                         f"{need} tokens with val_fraction {val_fraction}{how} (train {n_train}, val {n_val})")


def _split_documents(data: TokenData, val_fraction: float, seq_len: int, seed: int) -> tuple[TokenData, TokenData]:
    """Documents in a seeded random order go to validation until they hold >= val_fraction of the
    tokens (and a window), skipping any that would take more than twice that share; if they
    still hold less than a window, the shortest remaining documents are added."""
    starts = data.doc_starts if data.doc_starts[0] == 0 else np.concatenate([[0], data.doc_starts])
    lengths = np.diff(np.append(starts, len(data)))
    target = max(int(len(data) * val_fraction), seq_len + 1)
    chosen, total = np.zeros(len(starts), dtype=bool), 0
    for d in np.random.default_rng(seed).permutation(len(starts)):
        if total >= target:
            break
        if total + lengths[d] <= 2 * target:
            chosen[d], total = True, total + int(lengths[d])
    for d in np.argsort(lengths, kind="stable"):
        if total > seq_len or len(starts) - chosen.sum() <= 1:
            break
        if not chosen[d]:
            chosen[d], total = True, total + int(lengths[d])
    train, val = _documents(data, starts, lengths, ~chosen), _documents(data, starts, lengths, chosen)
    _check_split(data, val_fraction, seq_len, len(train), len(val), f" held out as whole documents "
                 f"({int(chosen.sum())} of {len(starts)})")
    return train, val


def _documents(data: TokenData, starts: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> TokenData:
    """The documents `mask` selects, in file order, as one `Segments` view with their starts."""
    sel = np.flatnonzero(mask)
    groups = np.split(sel, np.flatnonzero(np.diff(sel) != 1) + 1) if len(sel) else []
    runs = np.array([(starts[g[0]], starts[g[-1]] + lengths[g[-1]] - starts[g[0]]) for g in groups],
                    dtype=np.int64).reshape(-1, 2)
    doc_starts = np.concatenate([[0], np.cumsum(lengths[sel])[:-1]]).astype(np.int64) if len(sel) else None
    return TokenData(Segments(data.tokens, runs), data.vocab_size, data.path, doc_starts)


@dataclass(frozen=True)
class Packed:
    """The documents of one batch of windows: starts[r] = sorted offsets in [1, seq_len] of row r
    where a document begins (seq_len: the row's last label is the next document's first token)."""

    starts: tuple[tuple[int, ...], ...]
    seq_len: int

    def cu_seqlens(self) -> list[Tensor]:
        """Global boundaries of each row's seq_len input tokens: [0, ..., seq_len] (int64)."""
        return [torch.tensor([0, *(s for s in row if s < self.seq_len), self.seq_len]) for row in self.starts]

    def ignored_labels(self) -> Tensor:
        """bool [rows, seq_len]: the labels that would predict the first token of the next document."""
        mask = torch.zeros(len(self.starts), self.seq_len, dtype=torch.bool)
        for r, row in enumerate(self.starts):
            mask[r, [s - 1 for s in row]] = True
        return mask

    @property
    def mean_document_length(self) -> float:
        return self.seq_len * len(self.starts) / sum(1 + sum(s < self.seq_len for s in row) for row in self.starts)


class SequenceLoader:
    """Random windows [batch, seq_len + 1] for one data-parallel rank; state = (seed, step).

    With `doc_starts` (sorted start offsets of the documents in `tokens`), `documents_at(step)`
    gives the documents inside each window (`Packed`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, vocab_size: int, *, dp: int = 1,
                 dp_rank: int = 0, seed: int = 0, doc_starts: np.ndarray | None = None):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch, self.vocab_size = tokens, seq_len, batch, vocab_size
        self.dp, self.dp_rank, self.seed, self.step = dp, dp_rank, seed, 0
        self.doc_starts = None if doc_starts is None else np.asarray(doc_starts, dtype=np.int64)

    def global_offsets(self, step: int) -> np.ndarray:
        """Start offsets of the dp * batch windows of `step` (identical on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.dp * self.batch)

    def _offsets(self, step: int) -> np.ndarray:
        return self.global_offsets(step)[self.dp_rank * self.batch:(self.dp_rank + 1) * self.batch]

    def batch_at(self, step: int) -> Tensor:
        """This dp rank's windows of `step`: int64 [batch, seq_len + 1]."""
        rows = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in self._offsets(step)])
        if rows.max() >= self.vocab_size:
            raise ValueError(f"token id {int(rows.max())} in the data is >= the model's vocab_size "
                             f"{self.vocab_size}")
        return torch.from_numpy(rows)

    def documents_at(self, step: int) -> Packed | None:
        """The documents inside this dp rank's windows of `step` (None without document starts)."""
        if self.doc_starts is None:
            return None
        rows = []
        for o in self._offsets(step):
            lo, hi = np.searchsorted(self.doc_starts, [o + 1, o + self.seq_len + 1])
            rows.append(tuple(int(s - o) for s in self.doc_starts[lo:hi]))
        return Packed(tuple(rows), self.seq_len)

    def next(self) -> Tensor:
        window = self.batch_at(self.step)
        self.step += 1
        return window

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


class Prefetcher:
    """`get(step)` returns fn(step), computed ahead for the next `depth` steps by one background
    thread (fn must depend on the step only: the loaders' batches do); depth 0: on demand."""

    def __init__(self, fn, depth: int):
        self.fn, self.depth = fn, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="seqpar-prefetch") if depth > 0 else None
        self._ahead: dict[int, Future] = {}

    def get(self, step: int):
        if self._pool is None:
            return self.fn(step)
        current = self._ahead.pop(step, None) or self._pool.submit(self.fn, step)
        for s in [s for s in self._ahead if s < step or s > step + self.depth]:  # after a jump (resume)
            self._ahead.pop(s).cancel()
        for s in range(step + 1, step + 1 + self.depth):
            if s not in self._ahead:
                self._ahead[s] = self._pool.submit(self.fn, s)
        return current.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._ahead.clear()


def shard_batch(ctx: SeqParallel, window: Tensor, device: torch.device | str = "cpu", cu_seqlens=None,
                ignore: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """window [batch, seq_len + 1] -> tokens, labels [batch, seq_local], positions.

    Labels are shifted on the *full* sequence before sharding, so every local token keeps
    its true next token even when the layout interleaves (zigzag/striped). With packed
    documents (`cu_seqlens`: global boundaries of the seq_len tokens, one tensor or one per
    batch row) positions restart in each document ([seq_local], or [batch, seq_local] for a
    list) and the last token of a document predicts nothing (its label, the next document's
    first token, is IGNORE_INDEX); `ignore` (bool [batch, seq_len]) marks further labels to
    ignore, e.g. `Packed.ignored_labels()` for a document that starts right after the window.
    """
    seq_len = window.shape[1] - 1
    tokens, labels = window[:, :-1], window[:, 1:]
    if cu_seqlens is not None or ignore is not None:
        labels = labels.clone()
    if cu_seqlens is not None:
        rows = cu_seqlens if isinstance(cu_seqlens, (list, tuple)) else [cu_seqlens] * len(labels)
        if len(rows) != len(labels):
            raise ValueError(f"cu_seqlens has {len(rows)} rows, the batch {len(labels)}")
        for row, cu in zip(labels, rows):
            row[torch.as_tensor(cu)[1:-1].long() - 1] = IGNORE_INDEX
    if ignore is not None:
        labels[ignore] = IGNORE_INDEX
    shard = lambda t: ctx.shard(t, cu_seqlens=cu_seqlens).to(device)  # noqa: E731
    return shard(tokens), shard(labels), ctx.positions(seq_len, device, cu_seqlens=cu_seqlens)
