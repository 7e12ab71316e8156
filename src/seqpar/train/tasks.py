"""What the trainer trains: a `Task` owns the model, its batches and its loss terms.

The trainer (trainer.py) is the same loop for every task: it asks the task for the batch
of a step, for the (loss_sum, count) of its local shard, and normalises by the global
count (`backward_global_mean`). A task:

- `model`: an nn.Module with `layers` (FSDP wraps each) built on the sequence-parallel context;
- `batch(split, step)`: the sharded batch of a step ("train" or "val"), opaque to the trainer;
- `loss_terms(batch)`: (sum of this rank's loss terms, their number), as 0-d tensors;
- `flops_per_token(batch)`, `tokens_per_batch`: for tokens/s and MFU;
- `loader_state()` / `load_loader_state(state)`: resumable data position (step);
- `shape()`: what a checkpoint must match to be resumed; `finish(out_dir)`: end-of-run output.

`LanguageTask`: the built-in Llama-style `Transformer`, or a Hugging Face causal LM
(`--hf-model`), on token data with packed documents. `ImageTask` (`--model dit`): a DiT on
the sample photos scikit-image ships, rectified flow, sharded over patch tokens; it writes a
grid of samples at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..context import SeqParallel
from ..corpus import CorpusSpec, Prepared, corpus_kind, prepare_corpus, tokenizer_files
from ..data import Prefetcher, SequenceLoader, find_documents, open_tokens, shard_batch, split_tokens, stdlib_corpus
from ..dit import DiT, SampleProgress, loss_terms, noise_seed, sample
from ..documents import visible_pairs
from ..images import image_loaders, save_image_grid
from ..metrics import training_flops_per_token
from ..model import Transformer
from .config import TrainConfig
from .sections import SHAPE_KEYS

__all__ = ["Task", "LanguageTask", "ImageTask", "build_task", "corpus_path", "tokenized_corpus", "corpus_spec",
           "prepared_corpus"]


class Task:
    """Base class; see the module docstring for the protocol."""

    model: torch.nn.Module
    tokens_per_batch: int
    packed: bool = False
    loss_label: str = "loss (nats / token)"

    def batch(self, split: str, step: int) -> Any:
        raise NotImplementedError

    def loss_terms(self, batch: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def flops_per_token(self, batch: Any) -> float:
        raise NotImplementedError

    def loader_state(self) -> dict:
        return self.loaders["train"].state_dict()

    def load_loader_state(self, state: dict) -> None:
        self.loaders["train"].load_state_dict(state)

    @property
    def step(self) -> int:
        """The next training batch's step."""
        return self.loaders["train"].step

    def advance(self) -> None:
        self.loaders["train"].step += 1

    def shape(self) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, out_dir: Path, write: bool = True, progress: Any = None) -> list[Path]:
        """End-of-run outputs (every rank calls it, it may be collective; only `write` ranks write);
        `progress(done, total)` reports long outputs (the DiT's sampler)."""
        return []

    def close(self) -> None:
        """Stop background work (the batch prefetcher)."""


def corpus_spec(cfg: TrainConfig) -> CorpusSpec:
    """What `prepare_corpus` needs of a run with corpus data: the tokenizer is --tokenizer, else
    --hf-model's when its directory has one, else bytes; the vocabulary is the model's."""
    hf = cfg.model.hf_model
    tokenizer = cfg.data.tokenizer or (hf if hf and tokenizer_files(hf) else "")
    vocab = cfg.model.vocab_size
    if hf:
        from ..hf import hf_vocab_size
        vocab = hf_vocab_size(hf)
    return CorpusSpec(cfg.data.data, cfg.data.data_cache or str(Path(cfg.output.out_dir) / "data"),
                      cfg.data.text_field, tokenizer, cfg.data.data_workers, vocab)


def prepared_corpus(cfg: TrainConfig, lead: bool = True) -> Prepared:
    """The run's corpus tokenized (once: cached), waiting for the lead process when not `lead`."""
    return prepare_corpus(corpus_spec(cfg), lead, cfg.faults.timeout)


def corpus_path(cfg: TrainConfig) -> str:
    """The data file: --data (a corpus: its cached token file), or the stdlib corpus (built once,
    with its document index)."""
    if cfg.data.data and corpus_kind(cfg.data.data):
        return str(prepared_corpus(cfg).path)
    return cfg.data.data or str(stdlib_corpus(Path(cfg.output.out_dir) / "data", cfg.data.corpus_bytes))


def param_dtype(cfg: TrainConfig) -> torch.dtype:
    """Weights are fp64 for float64 runs, fp32 otherwise (bf16 runs autocast)."""
    return torch.float64 if cfg.optim.dtype == "float64" else torch.float32


def tokenized_corpus(cfg: TrainConfig) -> str:
    """The data file of a language run: with `--hf-model` whose directory has a tokenizer, the
    corpus tokenized with it (cached in <out_dir>/data by the tokenizer's and text's identity;
    documents kept), else `corpus_path(cfg)` (bytes or a token file)."""
    text = corpus_path(cfg)
    if not cfg.model.hf_model or Path(text).suffix in (".bin", ".npy"):
        return text
    from ..hf import has_tokenizer, tokenize_corpus
    if not has_tokenizer(cfg.model.hf_model):
        return text
    key = hashlib.sha1()
    for f in sorted(Path(cfg.model.hf_model).glob("*token*")) + [Path(cfg.model.hf_model) / "config.json"]:
        key.update(f.name.encode() + f.read_bytes())
    stat = Path(text).stat()
    key.update(f"{Path(text).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = Path(cfg.output.out_dir) / "data" / f"{Path(text).name}.{key.hexdigest()[:12]}.tokens.bin"  # or .npy
    cached = [p for p in (out.with_suffix(".bin"), out.with_suffix(".npy")) if p.is_file()]
    return str(cached[0] if cached else tokenize_corpus(cfg.model.hf_model, text, out))


class LanguageTask(Task):
    """Next-token prediction on token data: tokens, labels shifted before sharding, positions
    (restarting per document when packed), cu_seqlens for every layer. The model is the
    built-in `Transformer`, or with `--hf-model` a Hugging Face causal LM (`seqpar.hf`)."""

    def __init__(self, cfg: TrainConfig, ctx: SeqParallel, dp: int, dp_rank: int, device: torch.device):
        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.model_cfg = cfg.model_config()
        if cfg.model.hf_model:
            from ..hf import load_hf_model
            self.model = load_hf_model(cfg.model.hf_model, ctx, param_dtype(cfg), seed=cfg.optim.seed,
                                       activation_checkpointing=cfg.model.activation_checkpointing).to(device)
        else:
            self.model = Transformer(self.model_cfg, ctx).to(device=device, dtype=param_dtype(cfg))
        self.vocab_size = self.model_cfg.vocab_size
        self.loaders = self._loaders(dp, dp_rank)
        self.tokens_per_batch = cfg.data.batch * cfg.data.seq_len
        self._flops = training_flops_per_token(self.model_cfg, cfg.data.seq_len, causal=True)

    def _loaders(self, dp: int, dp_rank: int) -> dict[str, SequenceLoader]:
        cfg = self.cfg
        data = open_tokens(tokenized_corpus(cfg))
        if data.vocab_size > self.vocab_size:
            raise ValueError(f"data {data.path!r} needs vocab_size >= {data.vocab_size}, the model has "
                             f"{self.vocab_size}")
        data = find_documents(data, cfg.data.separator)  # the split holds out whole documents, packed or not
        train, val = split_tokens(data, cfg.data.val_fraction, cfg.data.seq_len, cfg.data.val_seed)
        if not cfg.data.pack_documents:
            train, val = (dataclasses.replace(d, doc_starts=None) for d in (train, val))
        self.packed = train.doc_starts is not None
        common = dict(seq_len=cfg.data.seq_len, batch=cfg.data.batch, vocab_size=self.vocab_size, dp=dp,
                      dp_rank=dp_rank)
        loaders = {"train": SequenceLoader(train.tokens, seed=cfg.optim.seed, doc_starts=train.doc_starts, **common),
                   "val": SequenceLoader(val.tokens, seed=cfg.optim.seed + 1, doc_starts=val.doc_starts, **common)}
        load = loaders["train"]
        self._prefetch = Prefetcher(lambda step: (load.batch_at(step), load.documents_at(step)), cfg.data.prefetch)
        return loaders

    def batch(self, split: str, step: int) -> tuple[Tensor, Tensor, Tensor, list[Tensor] | None]:
        """Sharded tokens, labels [batch, seq_local], positions, cu_seqlens (None unpacked); the
        training windows [batch, seq_len + 1] come from the prefetcher."""
        loader = self.loaders[split]
        if split == "train":
            window, packed = self._prefetch.get(step)
        else:
            window, packed = loader.batch_at(step), loader.documents_at(step)
        if packed is None:
            return (*shard_batch(self.ctx, window, self.device), None)
        cu = packed.cu_seqlens()
        return (*shard_batch(self.ctx, window, self.device, cu, packed.ignored_labels()), cu)

    def close(self) -> None:
        self._prefetch.close()

    def loss_terms(self, batch) -> tuple[Tensor, Tensor]:
        tokens, labels, positions, cu = batch
        return self.model(tokens, positions, labels, **({} if cu is None else {"cu_seqlens": cu}))

    def flops_per_token(self, batch) -> float:
        """Training FLOPs per token: packed documents attend within themselves only."""
        cu_seqlens = batch[3]
        if cu_seqlens is None:
            return self._flops
        seq = self.cfg.data.seq_len
        doc_len = sum(2 * visible_pairs(cu.tolist(), True) / seq for cu in cu_seqlens) / len(cu_seqlens)
        return training_flops_per_token(self.model_cfg, seq, causal=True, doc_len=doc_len)

    def shape(self) -> dict[str, Any]:
        shape = {k: getattr(self.model_cfg, k) for k in SHAPE_KEYS}
        return {**shape, "hf_model": str(Path(self.cfg.model.hf_model).resolve())} if self.cfg.model.hf_model else shape

    def describe(self) -> dict[str, Any]:
        return self.model_cfg.to_dict()


class ImageTask(Task):
    """`--model dit`: rectified-flow DiT on random crops of skimage's photos (seqpar.dit,
    seqpar.images); validation on held-out photos; `finish` samples a PNG grid."""

    loss_label = "loss (velocity MSE per pixel value)"

    def __init__(self, cfg: TrainConfig, ctx: SeqParallel, dp: int, dp_rank: int, device: torch.device):
        self.cfg, self.ctx, self.device = cfg, ctx, device
        train, val = image_loaders(cfg.dit.image_size, cfg.data.batch, dp=dp, dp_rank=dp_rank, seed=cfg.optim.seed)
        self.dit_cfg = cfg.dit_config(num_classes=train.num_classes)
        self.model = DiT(self.dit_cfg, ctx).to(device=device, dtype=param_dtype(cfg))
        self.loaders = {"train": train, "val": val}
        self.tokens_per_batch = cfg.data.batch * self.dit_cfg.num_tokens
        self._flops = self.dit_cfg.flops_per_token()

    def batch(self, split: str, step: int) -> tuple[str, int, Tensor, Tensor]:
        images, class_ids = self.loaders[split].batch_at(step)
        return split, step, images, class_ids

    def loss_terms(self, batch) -> tuple[Tensor, Tensor]:
        split, step, images, class_ids = batch
        was_training = self.model.training
        self.model.train(split == "train")  # class dropout only in training
        try:
            return loss_terms(self.model, self.ctx, images, class_ids, noise_seed(self.cfg.optim.seed, step, split),
                              self.loaders[split].row_offset)
        finally:
            self.model.train(was_training)

    def flops_per_token(self, batch) -> float:
        return self._flops

    def shape(self) -> dict[str, Any]:
        keys = ("image_size", "patch_size", "channels", "dim", "n_layers", "n_heads", "n_kv_heads", "num_classes")
        return {k: getattr(self.dit_cfg, k) for k in keys}

    def finish(self, out_dir: Path, write: bool = True, progress: SampleProgress | None = None) -> list[Path]:
        """Sample one image per class (collective: every rank calls it), --sample-batch images per
        forward, `progress(done, total)` after each forward; rank 0 writes samples.png."""
        if not self.cfg.dit.samples:
            return []
        classes = [i % self.dit_cfg.num_classes for i in range(self.cfg.dit.samples)]
        was_training = self.model.training
        self.model.eval()
        images = sample(self.model, self.ctx, classes, self.cfg.dit.sample_steps, self.cfg.optim.seed,
                        batch_size=self.cfg.dit.sample_batch, progress=progress)
        self.model.train(was_training)
        if not write:
            return []
        path = Path(out_dir) / "samples.png"
        save_image_grid(images.float(), path)
        return [path]


def build_task(cfg: TrainConfig, ctx: SeqParallel, dp: int, dp_rank: int, device: torch.device) -> Task:
    """The task of this run's config (same weights on every rank: seeded before building)."""
    torch.manual_seed(cfg.optim.seed)
    if cfg.model.kind == "dit":
        return ImageTask(cfg, ctx, dp, dp_rank, device)
    return LanguageTask(cfg, ctx, dp, dp_rank, device)
