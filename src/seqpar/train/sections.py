"""The sections of `TrainConfig` (train/config.py), one per config-file table, each validating itself.

    [model]     ModelSection     the network (built-in decoder, --hf-model, or the DiT's width)
    [dit]       DitSection       --model dit: images, patches, the sampler
    [data]      DataSection      corpus, packing, sequence length, batch
    [optim]     OptimSection     schedule, AdamW, seed, dtype
    [parallel]  ParallelSection  processes, dp / sp, FSDP, the strategy and its options
    [output]    OutputSection    logs, validation, checkpoints, metrics
    [faults]    FaultsSection    non-finite steps, timeouts, signals

Every field carries its --help text (`_opt`); `validate()` checks the section alone (the checks
between sections are `TrainConfig.validate`'s).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..attention import STRATEGIES, Settings, StrategyOptions
from ..context import resolve
from ..corpus import check_tokenizer_dir, corpus_kind
from ..dit import DiTConfig
from ..kernels import check_kernel_name
from ..model import ModelConfig
from ..pipeline import PP_SCHEDULES

__all__ = ["ModelSection", "DitSection", "DataSection", "OptimSection", "ParallelSection", "OutputSection",
           "FaultsSection", "SECTIONS", "DTYPES", "AUTO", "SHAPE_KEYS"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
NONFINITE = ("stop", "skip")
AUTO = "auto"  # --strategy auto: resolved by the launcher (train/auto.py) before any worker starts
MODELS = ("llama", "dit")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


def _opt(default: Any, help_text: str, flag: str | None = None):
    """A section field with its --help text (and its flag when it is not the field name)."""
    return field(default=default, metadata={"help": help_text, "flag": flag})


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {sorted(choices)}")


def _at_least(section: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(section, name)}")


def _finite(section: Any) -> None:
    """Every float field must be finite: inf/nan would train NaN."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


# -- the sections --------------------------------------------------------------------------------
@dataclass
class ModelSection:
    """[model]: the network (byte-level by default: vocab 256)."""

    kind: str = _opt("llama", "llama: the built-in byte-level decoder (or --hf-model) on text | dit: a diffusion "
                              "transformer on scikit-image's sample photos, sharded over patch tokens", flag="model")
    vocab_size: int = _opt(256, "vocabulary size (256 for raw bytes)")
    dim: int = _opt(256, "model width")
    n_layers: int = _opt(4, "decoder blocks")
    n_heads: int = _opt(8, "attention heads")
    n_kv_heads: int = _opt(4, "key/value heads (GQA when < n_heads)")
    ffn_dim: int = _opt(0, "SwiGLU hidden size; 0: 8/3 * dim rounded up to 32")
    mlp_chunks: int = _opt(1, "FPDT chunked MLP (recompute in backward)")
    loss_chunks: int = _opt(1, "FPDT chunked LM head + cross-entropy")
    activation_checkpointing: bool = _opt(False, "recompute every block in backward")
    offload_activations: bool = _opt(False, "checkpoint every block and keep its saved input in host memory "
                                            "(pinned on CUDA): no per-token state on the device between forward "
                                            "and backward (FPDT / ALST); not with --fsdp")
    chunked_blocks: bool = _opt(False, "FPDT's per-chunk block pipeline (--strategy fpdt): projections, attention "
                                       "and MLP of one chunk at a time, forward and backward, so no whole-sequence "
                                       "q/k/v or attention output exists on the device; with --offload-activations "
                                       "only the block inputs wait in host memory and the backward runs each "
                                       "block's chunk loop again")
    window: int = _opt(0, "built-in model: causal sliding-window attention of W tokens (each token sees itself and "
                          "the W-1 before it; tiles outside the window are skipped); 0: full causal attention")
    local_global: int = _opt(0, "built-in model with --window: K windowed layers per global one (Gemma 3 style, "
                                "every (K+1)-th layer global); 0: every layer windowed")
    hf_model: str = _opt("", "a Hugging Face causal LM directory (config.json, optional safetensors weights and "
                             "tokenizer) to train instead of the built-in model; its shape replaces the model flags")

    def config(self) -> ModelConfig:
        """The language model's shape: these fields, or the --hf-model's config (its shape in
        seqpar's terms, for FLOP counts, head checks, the planner and resume checks)."""
        if self.hf_model:
            from ..hf import hf_model_shape  # the optional `hf` extra
            return ModelConfig(**hf_model_shape(self.hf_model))
        names = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in names})

    def validate(self) -> None:
        _check_choice("model", self.kind, MODELS)
        if self.kind == "llama" and self.hf_model:
            self._validate_hf_model()
        if self.kind == "llama":
            self.config()  # shape errors

    def _validate_hf_model(self) -> None:
        if not (Path(self.hf_model) / "config.json").is_file():
            raise ValueError(f"--hf-model {self.hf_model!r} is not a Hugging Face model directory (no config.json)")
        try:
            import transformers  # noqa: F401 - the optional `hf` extra
        except ImportError:
            raise ValueError("--hf-model needs transformers: pip install -e '.[hf]'") from None
        if self.mlp_chunks > 1 or self.loss_chunks > 1:
            raise ValueError("--mlp-chunks / --loss-chunks apply to the built-in model only, not --hf-model")
        if self.window or self.local_global:
            raise ValueError("--window / --local-global apply to the built-in model only, not --hf-model (its "
                             "config decides its layers' windows)")

    def builtin_lm(self) -> bool:
        """The built-in language model (not --hf-model, not the DiT)."""
        return self.kind == "llama" and not self.hf_model


@dataclass
class DitSection:
    """[dit]: --model dit (the model width fields of [model] are shared)."""

    image_size: int = _opt(64, "dit: square crop size in pixels (64 with patch 2: 1,024 tokens, a run of minutes on a "
                               "2-core CPU; 256: 16,384 tokens, the long-sequence configuration)")
    patch_size: int = _opt(2, "dit: patch size in pixels")
    samples: int = _opt(8, "dit: images sampled into samples.png at the end (one per class, cycling); 0: none")
    sample_steps: int = _opt(6, "dit: Euler steps of the sampler")
    sample_batch: int = _opt(8, "dit: images per sampler forward (the same images whatever the batching); 0: all")

    def config(self, model: ModelSection, num_classes: int = 10) -> DiTConfig:
        return DiTConfig(image_size=self.image_size, patch_size=self.patch_size, dim=model.dim,
                         n_layers=model.n_layers, n_heads=model.n_heads, n_kv_heads=model.n_kv_heads,
                         num_classes=num_classes, activation_checkpointing=model.activation_checkpointing)

    def validate(self) -> None:
        if self.samples < 0 or self.sample_steps < 1 or self.sample_batch < 0:
            raise ValueError(f"need samples >= 0, sample_steps >= 1 and sample_batch >= 0, got {self.samples}, "
                             f"{self.sample_steps}, {self.sample_batch}")


@dataclass
class DataSection:
    """[data]"""

    data: str = _opt("", "a corpus (.jsonl / .json / .parquet, a folder of .txt/.md files, a `datasets` "
                         "save_to_disk directory: one document per row or file, tokenized once into --data-cache), "
                         "a raw byte file, or a .npy / .bin token file; empty: Python stdlib corpus")
    text_field: str = _opt("text", "the field holding each row's text (.jsonl / .json / .parquet / save_to_disk)")
    tokenizer: str = _opt("", "a Hugging Face tokenizer directory for a corpus; empty: --hf-model's tokenizer when "
                              "it has one, else UTF-8 bytes (vocab 256)")
    data_cache: str = _opt("", "directory of tokenized corpora (keyed by content, text field and tokenizer); "
                               "empty: <out_dir>/data")
    data_workers: int = _opt(0, "processes tokenizing a corpus (datasets' map); 0: one per core, at most 8")
    prefetch: int = _opt(2, "training batches prepared ahead by a background thread; 0: on demand")
    corpus_bytes: int = _opt(4_000_000, "size of the stdlib corpus")
    val_fraction: float = _opt(0.05, "share of the tokens held out for validation: whole documents where the data "
                                     "has them (seeded by --val-seed), else the tail")
    val_seed: int = _opt(0, "seed choosing the validation documents (the same held-out set whatever --seed)")
    pack_documents: bool = _opt(True, "mask attention at document boundaries (positions restart, no label "
                                      "crosses into the next document) where the data has documents: the stdlib "
                                      "corpus's files, a data file's <file>.docs.npy index, or --doc-separator")
    doc_separator: int = _opt(-1, "token id that ends every document of the data file (EOS style); -1: none")
    seq_len: int = _opt(1024, "global sequence length (sharded over sp ranks)")
    batch: int = _opt(1, "sequences per data-parallel rank and step")

    @property
    def separator(self) -> int | None:
        """The document separator token (--doc-separator), None when there is none."""
        return self.doc_separator if self.doc_separator >= 0 else None

    def validate(self) -> None:
        _finite(self)
        _at_least(self, 1, "seq_len", "batch")
        _at_least(self, 0, "corpus_bytes", "data_workers", "prefetch")
        self._validate_corpus()
        if self.doc_separator < -1 or (self.doc_separator >= 0 and not self.pack_documents):
            raise ValueError(f"doc_separator {self.doc_separator}: needs a token id >= 0 (-1: none) and "
                             "--pack-documents")


    def _validate_corpus(self) -> None:
        if not self.text_field:
            raise ValueError("text_field must name a field (default 'text')")
        corpus = bool(self.data) and corpus_kind(self.data) is not None
        if self.tokenizer and not corpus:
            raise ValueError("--tokenizer applies to corpus data (.jsonl, .json, .parquet, a folder of .txt/.md files "
                             "or a save_to_disk directory); pass one with --data")
        if self.tokenizer:
            check_tokenizer_dir(self.tokenizer)
        if corpus and importlib.util.find_spec("datasets") is None:
            raise ValueError(f"--data {self.data!r} is read with the `datasets` package: pip install -e '.[data]'")


@dataclass
class OptimSection:
    """[optim]"""

    steps: int = _opt(150, "optimizer steps")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = _opt(3e-4, "learning rate at the end of the cosine decay")
    warmup: int = _opt(15, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "global gradient-norm clip; 0: off (the norm is still computed and checked)")
    seed: int = _opt(0, "initial weights and data order")
    dtype: str = _opt("float32", "float32 | bfloat16 (autocast, fp32 weights) | float64")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        _finite(self)
        _check_choice("dtype", self.dtype, DTYPES)
        _at_least(self, 1, "steps")
        _at_least(self, 0, "warmup")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need 0 <= beta1, beta2 < 1, weight_decay >= 0 and grad_clip >= 0")


@dataclass
class ParallelSection:
    """[parallel]: processes, the dp x sp mesh, FSDP, the strategy and its options (the schema of
    `seqpar.StrategyOptions`: `options`, one flag and config key per option)."""

    nproc: int = _opt(4, "local processes when not under torchrun")
    dp: int = _opt(1, "data-parallel degree")
    sp: int | None = _opt(None, "sequence-parallel degree (default: world size / (dp x tp))")
    tp: int = _opt(1, "tensor-parallel degree (torch DTensor: heads, MLP, vocabulary and the norms' tokens "
                      "sharded; innermost in the mesh)")
    pp: int = _opt(1, "pipeline-parallel stages (torch.distributed.pipelining: the decoder's blocks split evenly; "
                      "outermost in the mesh)")
    pp_schedule: str = _opt("gpipe", "pipeline schedule with --pp > 1: gpipe | 1f1b (--microbatches >= --pp) "
                                     "| interleaved-1f1b (2 virtual stages per rank)")
    microbatches: int = _opt(1, "pipeline microbatches per step (--batch must be divisible by it)")
    strategy: str = _opt("wallfacer", "attention strategy (a registered name: local ring ulysses usp allgather "
                                      "wallfacer lss fpdt), or auto (the calibrated planner picks strategy, degrees, "
                                      "layout, chunks)")
    options: StrategyOptions = field(default_factory=StrategyOptions, metadata={"help": None, "flag": None})
    strategy_options: dict = field(default_factory=dict, metadata={
        "help": "an option of a strategy registered from outside seqpar (KEY=VALUE, repeatable)", "flag": None})
    calibration: str = _opt("", "a `seqpar plan --calibrate` JSON of this world: hardware for --strategy auto and "
                                "the MFU peak; empty: <out_dir>/calibration.json when present (auto measures it "
                                "once)")
    auto_profile: int = _opt(0, "with --strategy auto: measure the planner's best K runnable candidates and the "
                                "best of each other tp x pp mesh as training steps on this world, print predicted vs "
                                "measured and the regret, and train the measured fastest; 0: trust the prediction")
    auto_profile_steps: int = _opt(3, "timed steps per candidate of --auto-profile (after one warm-up step)")
    kernel: str = _opt("auto", "block attention kernel")
    fsdp: bool = _opt(False, "shard parameters with FSDP2 fully_shard over all ranks")
    compile: bool = _opt(False, "torch.compile every block (after tensor parallelism, before FSDP; seqpar's "
                                "attention is one custom op inside the compiled graph)")
    compile_backend: str = _opt("inductor", "torch.compile backend of --compile: inductor (C++ on CPU, Triton on "
                                            "GPU) | aot_eager (no code generation: the tests) | eager")

    def sp_size(self, world: int) -> int:
        return self.sp or world // (self.dp * self.tp * self.pp)

    def mesh_description(self, world: int) -> str:
        """The process mesh in USP's order, outermost first (what seqpar.parallel.ParallelDims builds)."""
        pipeline = f"pp{self.pp} ({self.pp_schedule}, {self.microbatches} microbatches) x " if self.pp > 1 else ""
        return f"mesh {pipeline}dp{self.dp} x sp{self.sp_size(world)} x tp{self.tp} (tp innermost" + \
            (", FSDP over dp x sp)" if self.fsdp else ")")

    def strategy_settings(self, world: int) -> Settings:
        """The strategy's settings on this run's sp group, resolved by the strategy itself
        (`seqpar.resolve`: what seqpar.init accepts; None = the strategy's default)."""
        return resolve(self.strategy, self.sp_size(world), **self.options.given(), **self.strategy_options)

    def validate(self) -> None:
        _check_choice("strategy", self.strategy, (*STRATEGIES, AUTO))
        _check_choice("compile_backend", self.compile_backend, COMPILE_BACKENDS)
        check_kernel_name(self.kernel)
        _at_least(self, 1, "nproc", "dp", "tp", "pp", "microbatches", "auto_profile_steps")
        _at_least(self, 0, "auto_profile")
        if self.auto_profile and self.strategy != AUTO:
            raise ValueError(f"--auto-profile {self.auto_profile} measures the candidates of --strategy auto; "
                             f"this run fixes --strategy {self.strategy}")
        _check_choice("pp_schedule", self.pp_schedule, PP_SCHEDULES)
        if self.sp is not None:
            _at_least(self, 1, "sp")
        self.options.check_types()
        for key, value in self.strategy_options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"strategy option {key} must be a finite number, got {value}")


@dataclass
class OutputSection:
    """[output]"""

    out_dir: str = _opt("runs/train", "log, plot, config, checkpoints, cached corpus")
    log_every: int = _opt(10, "progress-bar period (steps)")
    eval_every: int = _opt(50, "validation period (and at the end); 0: only at the end")
    eval_batches: int = _opt(2, "validation batches")
    checkpoint_every: int = _opt(50, "checkpoint period (and at the end); 0: never")
    keep_checkpoints: int = _opt(2, "checkpoints kept; 0: all")
    resume: str = _opt("", "'latest' or a checkpoint directory")
    peak_tflops: float = _opt(0.0, "peak TFLOP/s of one machine (all its cores; on GPUs one device) for MFU; 0: the "
                                   "calibration's (its together rate x ranks per node), else measured once with all "
                                   "cores and cached per machine (~/.cache/seqpar/machine_peak.json or "
                                   "$SEQPAR_CACHE_DIR), the GPU table on GPUs")
    progress: bool = _opt(True, "progress bar and summary on rank 0")
    plot: bool = _opt(True, "loss-curve PNG at the end")
    tensorboard: bool = _opt(False, "also write metrics.jsonl's scalars as TensorBoard events (<out_dir>/tensorboard)")

    def validate(self) -> None:
        _finite(self)
        _at_least(self, 1, "log_every", "eval_batches")
        _at_least(self, 0, "eval_every", "checkpoint_every", "keep_checkpoints")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0 (0 = auto), got {self.peak_tflops}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package: pip install -e '.[data]'")


@dataclass
class FaultsSection:
    """[faults]: what the run does about non-finite steps, hung collectives, stalls and signals."""

    nonfinite: str = _opt("stop", "on a non-finite loss or gradient norm: stop (error, nothing saved) | skip "
                                  "(no update for that step)")
    max_skips: int = _opt(3, "with --nonfinite skip: consecutive skipped steps tolerated; one more stops the run")
    timeout: float = _opt(600.0, "process-group timeout (s): a collective waiting longer fails the run")
    stall_timeout: float = _opt(0.0, "seconds without a heartbeat before the launcher names a rank stalled and "
                                     "stops the run; 0: min(60, timeout / 2)")
    stop_grace: float = _opt(10.0, "seconds workers get after SIGTERM/SIGINT to stop (and checkpoint on "
                                   "SIGTERM) before they are killed")

    def validate(self) -> None:
        _finite(self)
        _check_choice("nonfinite", self.nonfinite, NONFINITE)
        _at_least(self, 0, "max_skips")
        if not (self.timeout > 0 and self.stop_grace > 0 and self.stall_timeout >= 0):
            raise ValueError(f"need timeout > 0, stop_grace > 0 and stall_timeout >= 0, got timeout={self.timeout}, "
                             f"stop_grace={self.stop_grace}, stall_timeout={self.stall_timeout}")


SECTIONS = {"model": ModelSection, "dit": DitSection, "data": DataSection, "optim": OptimSection,
            "parallel": ParallelSection, "output": OutputSection, "faults": FaultsSection}
