"""Training configuration: `TrainConfig` (every field a --flag and a config-file key), config
files (TOML/YAML) and command-line parsing. Validation of each field lives here.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..attention import STRATEGIES, Settings
from ..context import resolve
from ..kernels import check_kernel_name
from ..model import ModelConfig

__all__ = ["TrainConfig", "DTYPES", "load_config", "build_config", "config_from_args", "add_arguments"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
NONFINITE = ("stop", "skip")
AUTO = "auto"  # resolved by the launcher (train/auto.py) before any worker starts
MODELS = ("llama", "dit")
SECTIONS = ("model", "data", "optim", "parallel", "output")
_MODEL_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "mlp_chunks", "loss_chunks",
               "activation_checkpointing", "offload_activations", "chunked_blocks")
_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


def _opt(default: Any, help_text: str):
    """A TrainConfig field with its --help text."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is a `--flag` and a config-file key."""

    # model (byte-level by default: vocab 256)
    model: str = _opt("llama", "llama: the built-in byte-level decoder (or --hf-model) on text | dit: a diffusion "
                               "transformer on scikit-image's sample photos, sharded over patch tokens")
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
    hf_model: str = _opt("", "a Hugging Face causal LM directory (config.json, optional safetensors weights and "
                             "tokenizer) to train instead of the built-in model; its shape replaces the model flags")
    # images (--model dit): (image_size / patch_size)^2 tokens per image replace seq_len
    image_size: int = _opt(256, "dit: square crop size in pixels")
    patch_size: int = _opt(2, "dit: patch size in pixels")
    samples: int = _opt(8, "dit: images sampled into samples.png at the end (one per class, cycling); 0: none")
    sample_steps: int = _opt(8, "dit: Euler steps of the sampler")
    # data
    data: str = _opt("", "raw byte file, .npy or .bin token file; empty: Python stdlib corpus")
    corpus_bytes: int = _opt(4_000_000, "size of the stdlib corpus")
    val_fraction: float = _opt(0.05, "held-out tail of the data for validation")
    pack_documents: bool = _opt(True, "mask attention at document boundaries (positions restart, no label "
                                      "crosses into the next document) where the data has documents: the stdlib "
                                      "corpus's files, a data file's <file>.docs.npy index, or --doc-separator")
    doc_separator: int = _opt(-1, "token id that ends every document of the data file (EOS style); -1: none")
    seq_len: int = _opt(1024, "global sequence length (sharded over sp ranks)")
    batch: int = _opt(1, "sequences per data-parallel rank and step")
    # optimisation
    steps: int = _opt(150, "optimizer steps")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = _opt(3e-4, "learning rate at the end of the cosine decay")
    warmup: int = _opt(15, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "global gradient-norm clip; 0: off (the norm is still computed and checked)")
    nonfinite: str = _opt("stop", "on a non-finite loss or gradient norm: stop (error, nothing saved) | skip "
                                  "(no update for that step)")
    max_skips: int = _opt(3, "with --nonfinite skip: consecutive skipped steps tolerated; one more stops the run")
    seed: int = _opt(0, "initial weights and data order")
    dtype: str = _opt("float32", "float32 | bfloat16 (autocast, fp32 weights) | float64")
    # parallelism
    nproc: int = _opt(4, "local processes when not under torchrun")
    dp: int = _opt(1, "data-parallel degree")
    sp: int = _opt(0, "sequence-parallel degree; 0: world size / dp")
    strategy: str = _opt("wallfacer", "attention strategy: local ring ulysses usp allgather wallfacer lss fpdt, or "
                                      "auto (the calibrated planner picks strategy, degrees, layout, chunks)")
    calibration: str = _opt("", "a `seqpar plan --calibrate` JSON of this world: hardware for --strategy auto and the "
                                "MFU peak; empty: <out_dir>/calibration.json when present (auto measures it once)")
    ulysses: int = _opt(0, "Ulysses degree (usp); 0: the strategy's default")
    ring: int = _opt(0, "ring degree (usp); 0: the strategy's default")
    team_size: int = _opt(0, "WallFacer team size C (--teams: deprecated alias); 0: the strategy's default "
                             "(2 when 4 divides sp)")
    layout: str = _opt("", "token layout: contiguous | zigzag | striped; empty: the strategy's default")
    chunks: int = _opt(1, "FPDT sequence chunks")
    offload: bool = _opt(False, "FPDT host offload of K/V chunks")
    kernel: str = _opt("auto", "block attention kernel")
    strategy_options: dict = field(default_factory=dict, metadata={"help": "extra seqpar.init options"})
    fsdp: bool = _opt(False, "shard parameters with FSDP2 fully_shard over all ranks")
    # output
    out_dir: str = _opt("runs/train", "log, plot, config, checkpoints, cached corpus")
    log_every: int = _opt(10, "progress-bar period (steps)")
    eval_every: int = _opt(50, "validation period (and at the end); 0: only at the end")
    eval_batches: int = _opt(2, "validation batches")
    checkpoint_every: int = _opt(50, "checkpoint period (and at the end); 0: never")
    keep_checkpoints: int = _opt(2, "checkpoints kept; 0: all")
    resume: str = _opt("", "'latest' or a checkpoint directory")
    peak_tflops: float = _opt(0.0, "per-process peak TFLOP/s for MFU; 0: the calibration's, else measured at start "
                                   "on CPU (all ranks at once), the GPU table on GPUs")
    progress: bool = _opt(True, "progress bar and summary on rank 0")
    plot: bool = _opt(True, "loss-curve PNG at the end")
    # fault handling
    timeout: float = _opt(600.0, "process-group timeout (s): a collective waiting longer fails the run")
    stall_timeout: float = _opt(0.0, "seconds without a heartbeat before the launcher names a rank stalled and "
                                     "stops the run; 0: min(60, timeout / 2)")
    stop_grace: float = _opt(10.0, "seconds workers get after SIGTERM/SIGINT to stop (and checkpoint on "
                                   "SIGTERM) before they are killed")

    # -- derived -------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The language model's shape: the model flags, or the --hf-model's config (its shape
        in seqpar's terms, for FLOP counts, head checks, the planner and resume checks)."""
        if self.hf_model:
            from ..hf import hf_model_shape
            return ModelConfig(**hf_model_shape(self.hf_model))
        return ModelConfig(**{k: getattr(self, k) for k in _MODEL_KEYS})

    @property
    def separator(self) -> int | None:
        """The document separator token (--doc-separator), None when there is none."""
        return self.doc_separator if self.doc_separator >= 0 else None

    def calibration_path(self) -> Path:
        """--calibration, else <out_dir>/calibration.json (what --strategy auto writes)."""
        return Path(self.calibration) if self.calibration else Path(self.out_dir) / "calibration.json"

    def dit_config(self, num_classes: int = 10):
        """The DiT of --model dit (model width flags shared with the language model)."""
        from ..dit import DiTConfig
        return DiTConfig(image_size=self.image_size, patch_size=self.patch_size, dim=self.dim, n_layers=self.n_layers,
                         n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, num_classes=num_classes,
                         activation_checkpointing=self.activation_checkpointing)

    def sequence_length(self) -> int:
        """Tokens per sample, sharded over the sp ranks: seq_len, or the patches of an image (dit)."""
        return self.dit_config().num_tokens if self.model == "dit" else self.seq_len

    def sp_size(self, world: int) -> int:
        return self.sp or world // self.dp

    def strategy_settings(self, world: int) -> Settings:
        """The attention strategy's settings on this run's sp group, resolved by the strategy
        itself (`seqpar.resolve`: what seqpar.init accepts; 0 / empty = the strategy's default)."""
        given = {"layout": self.layout or None, "ulysses": self.ulysses or None, "ring": self.ring or None,
                 "team_size": self.team_size or None, "chunks": self.chunks, "offload": self.offload}
        return resolve(self.strategy, self.sp_size(world), **given, **self.strategy_options)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- validation ----------------------------------------------------------------------------
    def validate(self, world: int | None = None) -> None:
        """Raise ValueError for anything that cannot work (world: number of ranks, default nproc)."""
        world = world or self.nproc
        self._validate_finite()
        _check_choice("model", self.model, MODELS)
        if self.model == "dit":
            self._validate_dit()
        else:
            if self.hf_model:
                self._validate_hf_model()
            self.model_config()  # model shape errors
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("strategy", self.strategy, (*STRATEGIES, AUTO))
        check_kernel_name(self.kernel)
        _check_choice("nonfinite", self.nonfinite, NONFINITE)
        for name in ("seq_len", "batch", "steps", "nproc", "dp", "chunks", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sp", "ulysses", "ring", "team_size", "warmup", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "corpus_bytes", "max_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need 0 <= beta1, beta2 < 1, weight_decay >= 0 and grad_clip >= 0")
        if self.offload_activations and (self.fsdp or self.model != "llama" or self.hf_model):
            raise ValueError("--offload-activations applies to the built-in language model without --fsdp")
        if self.chunked_blocks:
            self._validate_chunked_blocks()
        if self.doc_separator < -1 or (self.doc_separator >= 0 and not self.pack_documents):
            raise ValueError(f"doc_separator {self.doc_separator}: needs a token id >= 0 (-1: none) and "
                             "--pack-documents")
        if self.doc_separator >= self.vocab_size and not self.hf_model:
            raise ValueError(f"doc_separator {self.doc_separator} is not a token id of the model's vocabulary "
                             f"(vocab_size {self.vocab_size})")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0 (0 = auto), got {self.peak_tflops}")
        if not (self.timeout > 0 and self.stop_grace > 0 and self.stall_timeout >= 0):
            raise ValueError(f"need timeout > 0, stop_grace > 0 and stall_timeout >= 0, got timeout={self.timeout}, "
                             f"stop_grace={self.stop_grace}, stall_timeout={self.stall_timeout}")
        self._validate_mesh(world)

    def chunked_blocks_apply(self) -> bool:
        """Whether this run's model can take --chunked-blocks: the built-in LM without FSDP."""
        return self.model == "llama" and not self.hf_model and not self.fsdp

    def _validate_chunked_blocks(self) -> None:
        if self.strategy != "fpdt":
            raise ValueError(f"--chunked-blocks is FPDT's pipeline: it needs --strategy fpdt, got {self.strategy!r}")
        if not self.chunked_blocks_apply():
            raise ValueError("--chunked-blocks applies to the built-in language model without --fsdp")
        if self.activation_checkpointing:
            raise ValueError("--chunked-blocks recomputes its projections and MLP per chunk already; for block "
                             "inputs in host memory use --offload-activations, not --activation-checkpointing")

    def _validate_dit(self) -> None:
        self.dit_config()  # shape errors
        if self.data or self.hf_model:
            raise ValueError("--model dit trains on scikit-image's sample photos: --data / --hf-model are for "
                             "language models")
        if self.samples < 0 or self.sample_steps < 1:
            raise ValueError(f"need samples >= 0 and sample_steps >= 1, got {self.samples}, {self.sample_steps}")
        try:
            import skimage  # noqa: F401
        except ImportError:
            raise ValueError("--model dit needs scikit-image: pip install -e '.[dit]'") from None

    def _validate_hf_model(self) -> None:
        path = Path(self.hf_model)
        if not (path / "config.json").is_file():
            raise ValueError(f"--hf-model {self.hf_model!r} is not a Hugging Face model directory (no config.json)")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("--hf-model needs transformers: pip install -e '.[hf]'") from None
        if self.mlp_chunks > 1 or self.loss_chunks > 1:
            raise ValueError("--mlp-chunks / --loss-chunks apply to the built-in model only, not --hf-model")

    def _validate_finite(self) -> None:
        """Every float field (and float strategy option) must be finite: inf/nan would train NaN."""
        values = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        values += [(f"strategy option {k}", v) for k, v in self.strategy_options.items()]
        for name, value in values:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")

    def _validate_mesh(self, world: int) -> None:
        sp = self.sp_size(world)
        if sp < 1 or self.dp * sp != world:
            raise ValueError(f"dp ({self.dp}) x sp ({self.sp or 'auto'}) must equal the number of processes "
                             f"({world})")
        if self.strategy == AUTO:
            return  # the planner picks a strategy that passes the checks below (train/auto.py)
        layout = self.strategy_settings(world).layout
        if layout.kind == "documents" and self.pack_documents and self.batch > 1 and self.model != "dit":
            raise ValueError(f"layout 'documents' places tokens by one batch's documents, but --pack-documents "
                             f"gives each of the {self.batch} rows its own: use --batch 1 (more rows: --dp) or "
                             f"another layout")
        n = self.sequence_length()
        what = f"seq_len {n}" if self.model != "dit" else f"the {n} patch tokens of --image-size {self.image_size}"
        try:
            layout.check(n)
        except ValueError as e:
            raise ValueError(f"{what} must be a multiple of {layout.granularity()}: {e}") from None


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {sorted(choices)}")


# -- configuration files and flags -----------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_DEFAULTS = TrainConfig()


def _field_type(name: str) -> type:
    return type(getattr(_DEFAULTS, name))


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a config-file value against the field's type (ints are accepted for floats)."""
    want = _field_type(name)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {name} must be {want.__name__}, got {value!r}")
    return value


_DEPRECATED = {"teams": "team_size"}  # old key -> field (kept one release, with a warning)


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _DEPRECATED:
            warnings.warn(f"{source}: '{key}' is deprecated, use '{_DEPRECATED[key]}'", DeprecationWarning,
                          stacklevel=2)
            key = _DEPRECATED[key]
        if isinstance(value, dict) and key in SECTIONS:
            flat.update(_flatten(value, f"{source} [{key}]"))
        elif key in _FIELDS:
            flat[key] = _coerce(key, value, source)
        else:
            raise ValueError(f"{source}: unknown key {key!r}; valid keys: {sorted(_FIELDS)} "
                             f"(optionally grouped in tables {list(SECTIONS)})")
    return flat


def _config_path(name: str) -> Path:
    """A config file path, or the name of a packaged config (seqpar/configs/<name>.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = resources.files("seqpar") / "configs" / f"{path.stem}.toml"
    if path.suffix in ("", ".toml") and packaged.is_file():
        return Path(str(packaged))
    available = sorted(p.name[:-5] for p in (resources.files("seqpar") / "configs").iterdir()
                       if p.name.endswith(".toml"))
    raise FileNotFoundError(f"config file {name!r} not found (packaged configs: {available})")


def load_config(name: str) -> dict[str, Any]:
    """Read a TOML or YAML config file into flat TrainConfig keys (clear errors for bad keys/values)."""
    path = _config_path(name)
    text = path.read_bytes()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text.decode())
    except Exception as e:  # noqa: BLE001 - tomllib/yaml parse errors have several types
        raise ValueError(f"cannot parse config file {str(path)!r}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table/mapping of keys")
    return _flatten(raw, str(path))


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--strategy-option expects KEY=VALUE, got {text!r}")
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return key, parse(value)
    return key, {"true": True, "false": False}.get(value.lower(), value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML/YAML config file or packaged config name (default, tiny, ...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _field_type(name)
        help_text = f"{f.metadata['help']} (default: {getattr(_DEFAULTS, name)!r})".replace("%", "%%")
        if name == "strategy_options":
            parser.add_argument("--strategy-option", dest=name, action="append", metavar="KEY=VALUE",
                                help="extra seqpar.init option (repeatable)")
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            aliases = ["--" + old for old, new in _DEPRECATED.items() if new == name]
            parser.add_argument(flag, *aliases, dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=help_text)


def build_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from `seqpar train` arguments (for scripts and tests)."""
    parser = argparse.ArgumentParser(prog="seqpar train")
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_config(args.config) if getattr(args, "config", None) else {}
    for name in _FIELDS:
        given = getattr(args, name, None)
        if given is None:
            continue
        values[name] = dict(_parse_option(o) for o in given) if name == "strategy_options" else given
    return TrainConfig(**values)

