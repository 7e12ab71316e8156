"""Token data for training: corpora, memory-mapped token files, a resumable loader, sharding.

Sources (all memory-mapped, read-only, 1-D token arrays):

- raw bytes (any file that is not .npy/.bin, e.g. enwik8): one token per byte, vocab 256;
- ``.npy``: a 1-D integer array (np.save);
- ``.bin``: packed tokens with a 16-byte header: magic ``SEQPTOK1``, uint32 little-endian
  version (1) and vocab size, then uint16 little-endian tokens (`write_token_file`).

With no data file, `stdlib_corpus` builds a deterministic byte corpus from the Python
standard library's ``.py`` sources (hash-ordered files, capped), cached under the run directory.

`SequenceLoader` draws windows of seq_len + 1 tokens at offsets that depend only on
(seed, step), so its state is two integers and a resumed run sees the same batches;
data-parallel rank r takes rows [r*batch, (r+1)*batch) of each global batch.
`shard_batch` splits a window with the sequence-parallel context: tokens and labels with
`ctx.shard`, positions with `ctx.positions`.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .context import SeqParallel
from .io import atomic_write

__all__ = ["open_tokens", "write_token_file", "stdlib_corpus", "split_tokens", "SequenceLoader", "shard_batch",
           "TOKEN_MAGIC"]

TOKEN_MAGIC = b"SEQPTOK1"
_HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("vocab", "<u4")])


@dataclass
class TokenData:
    """A read-only 1-D token array and the vocabulary size it needs."""

    tokens: np.ndarray
    vocab_size: int
    path: str

    def __len__(self) -> int:
        return len(self.tokens)


def write_token_file(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens (< vocab_size <= 65536) as a `.bin` token file, atomically."""
    tokens = np.asarray(tokens)
    if vocab_size > 65536 or (tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size)):
        raise ValueError(f"tokens must lie in [0, {vocab_size}) with vocab_size <= 65536")
    header = np.array([(TOKEN_MAGIC, 1, vocab_size)], dtype=_HEADER)
    atomic_write(Path(path), header.tobytes() + tokens.astype("<u2").tobytes())


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
    rebuilt only if missing.
    """
    out = Path(cache_dir) / f"python_stdlib_{max_bytes}.txt"
    if out.is_file() and out.stat().st_size > 0:
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file()]
    files.sort(key=lambda f: hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest())
    pieces, total = [], 0
    for f in files:
        data = f.read_bytes()
        pieces.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(pieces)[:max_bytes]
    if not blob:
        raise FileNotFoundError(f"no Python sources found under {root}; pass a data file with --data")
    atomic_write(out, blob)
    return out


def split_tokens(data: TokenData, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) views: the last val_fraction of the tokens is held out; both must fit a window."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(len(data) * val_fraction)
    train, val = data.tokens[: len(data) - n_val], data.tokens[len(data) - n_val:]
    need = seq_len + 1
    if len(train) < need or len(val) < need:
        raise ValueError(f"data file {data.path!r} has {len(data)} tokens: too few for train/val windows of "
                         f"{need} tokens with val_fraction {val_fraction} (train {len(train)}, val {len(val)})")
    return train, val


class SequenceLoader:
    """Random windows [batch, seq_len + 1] for one data-parallel rank; state = (seed, step)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, vocab_size: int, *, dp: int = 1,
                 dp_rank: int = 0, seed: int = 0):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch, self.vocab_size = tokens, seq_len, batch, vocab_size
        self.dp, self.dp_rank, self.seed, self.step = dp, dp_rank, seed, 0

    def global_offsets(self, step: int) -> np.ndarray:
        """Start offsets of the dp * batch windows of `step` (identical on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.dp * self.batch)

    def batch_at(self, step: int) -> Tensor:
        """This dp rank's windows of `step`: int64 [batch, seq_len + 1]."""
        offsets = self.global_offsets(step)[self.dp_rank * self.batch:(self.dp_rank + 1) * self.batch]
        rows = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in offsets])
        if rows.max() >= self.vocab_size:
            raise ValueError(f"token id {int(rows.max())} in the data is >= the model's vocab_size "
                             f"{self.vocab_size}")
        return torch.from_numpy(rows)

    def next(self) -> Tensor:
        window = self.batch_at(self.step)
        self.step += 1
        return window

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def shard_batch(ctx: SeqParallel, window: Tensor, device: torch.device | str = "cpu", cu_seqlens: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """window [batch, seq_len + 1] -> tokens, labels [batch, seq_local], positions [seq_local].

    Labels are shifted on the *full* sequence before sharding, so every local token keeps
    its true next token even when the layout interleaves (zigzag/striped). With packed
    documents (`cu_seqlens`, global boundaries of the seq_len tokens) positions restart in
    each document and the last token of a document predicts nothing (its label, the next
    document's first token, is IGNORE_INDEX = -100).
    """
    seq_len = window.shape[1] - 1
    tokens, labels = window[:, :-1], window[:, 1:]
    if cu_seqlens is not None:
        labels = labels.clone()
        labels[:, cu_seqlens[1:-1].long() - 1] = -100
    shard = lambda t: ctx.shard(t, cu_seqlens=cu_seqlens).to(device)  # noqa: E731
    return shard(tokens), shard(labels), ctx.positions(seq_len, device, cu_seqlens=cu_seqlens)
