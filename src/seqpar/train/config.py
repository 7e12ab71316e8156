"""Training configuration: `TrainConfig`, one section per config-file table (train/sections.py:
model, dit, data, optim, parallel, output, faults), each validating itself. Every field is also a
`--flag` (the field name with dashes; `ModelSection.kind` is `--model`): flat command line, tables
in files. `[parallel]`'s strategy options are `seqpar.StrategyOptions` itself (flags, types, help;
None = the strategy's default). Defaults < config file < flags. `TrainConfig.of(**flags)` builds a
config from flag names, `cfg.replace(**flags)` changes some; `validate(world)` checks all.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..attention import Settings, StrategyOptions
from ..attention.options import option_fields
from ..dit import DiTConfig
from ..model import ModelConfig
from ..pipeline import check_pipeline
from ..tensor_parallel import check_decoder_chunkings, check_tensor_parallel
from .sections import (
    AUTO,
    DTYPES,
    SECTIONS,
    DataSection,
    DitSection,
    FaultsSection,
    ModelSection,
    OptimSection,
    OutputSection,
    ParallelSection,
)

__all__ = ["TrainConfig", "ModelSection", "DitSection", "DataSection", "OptimSection", "ParallelSection",
           "OutputSection", "FaultsSection", "DTYPES", "AUTO", "load_config", "build_config", "config_from_args",
           "add_arguments", "flat_values"]

@dataclass(frozen=True)
class _Flag:
    """Where a --flag lives: section, attribute (and the option schema's field, for strategy options)."""

    section: str
    attr: str
    help: str
    kind: type
    option: bool = False  # a field of ParallelSection.options (StrategyOptions)
    choices: tuple = ()


def _flags() -> dict[str, _Flag]:
    """dest name -> _Flag for every flag of `seqpar train` (what TrainConfig.of takes)."""
    out: dict[str, _Flag] = {}
    defaults = {name: cls() for name, cls in SECTIONS.items()}
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name == "options":
                for o in option_fields():
                    out[o.name] = _Flag(name, o.name, o.metadata["help"], o.metadata["kind"], True,
                                        o.metadata["choices"])
                continue
            kind = dict if f.name == "strategy_options" else (int if f.name == "sp" else
                                                               type(getattr(defaults[name], f.name)))
            out[f.metadata.get("flag") or f.name] = _Flag(name, f.name, f.metadata["help"], kind)
    return out


FLAGS = _flags()


def config_table() -> str:
    """docs/training.md's table of every config key: its table, key, flag, default and meaning
    (generated from the sections' fields; a test keeps the docs equal to it)."""
    defaults = {name: cls() for name, cls in SECTIONS.items()}
    rows = ["| table | key | flag | default | meaning |", "|---|---|---|---|---|"]
    for dest, f in FLAGS.items():
        section = defaults[f.section]
        default = getattr(section.options, f.attr) if f.option else getattr(section, f.attr)
        flag = "--strategy-option K=V" if f.attr == "strategy_options" else "--" + dest.replace("_", "-")
        meaning = f.help.replace("|", "\\|")
        rows.append(f"| {f.section} | `{f.attr}` | `{flag}` | `{default!r}` | {meaning} |")
    return "\n".join(rows)


# -- the whole config ------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a training run needs, in its sections (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    dit: DitSection = field(default_factory=DitSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    output: OutputSection = field(default_factory=OutputSection)
    faults: FaultsSection = field(default_factory=FaultsSection)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def of(cls, **flags: Any) -> "TrainConfig":
        """A config from flag names (`--seq-len` -> seq_len=...), the defaults for the rest."""
        return cls().replace(**flags)

    def replace(self, **flags: Any) -> "TrainConfig":
        """A copy with these flags (by flag name) changed."""
        sections = {name: dataclasses.replace(getattr(self, name)) for name in SECTIONS}
        sections["parallel"].strategy_options = dict(self.parallel.strategy_options)
        options = dict(sections["parallel"].options.__dict__)
        for name, value in flags.items():
            if name not in FLAGS:
                raise ValueError(f"unknown training option {name!r}")
            spec = FLAGS[name]
            if spec.option:
                options[spec.attr] = value
            else:
                setattr(sections[spec.section], spec.attr, value)
        sections["parallel"].options = StrategyOptions(**options)
        return TrainConfig(**sections)

    def with_strategy(self, strategy: str, options: StrategyOptions) -> "TrainConfig":
        """A copy running `strategy` with exactly these options (the others back to their defaults)."""
        parallel = dataclasses.replace(self.parallel, strategy=strategy, options=options,
                                       strategy_options=dict(options.extras))
        return dataclasses.replace(self, parallel=parallel)

    @classmethod
    def from_tables(cls, tables: dict[str, dict[str, Any]], source: str = "config") -> "TrainConfig":
        """A config from {table: {key: value}} (a config file, or `to_dict()`); a key outside its
        table, or of the wrong type, is a one-line ValueError naming it."""
        flags = {}
        for table, values in tables.items():
            if table not in SECTIONS or not isinstance(values, dict):
                raise ValueError(f"{source}: unknown table or top-level key {table!r}; the tables are "
                                 f"{list(SECTIONS)}" + _home_hint(table))
            for key, value in values.items():
                if key == "options" and table == "parallel" and isinstance(value, dict):  # to_dict()'s form
                    flags.update({k: v for k, v in value.items() if k != "extras"})
                    continue
                flag = _flag_of(table, key)
                if flag is None:
                    raise ValueError(f"{source} [{table}]: unknown key {key!r}" + _home_hint(key, table))
                if value is not None or FLAGS[flag].option:  # None: not given (JSON of to_dict)
                    flags[flag] = value if value is None else _coerce(flag, value, f"{source} [{table}]")
        return cls.of(**flags)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{table: {key: value}}: what from_tables reads back (JSON-able)."""
        out = {}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if name == "parallel":
                options = section.pop("options")
                section.update({k: v for k, v in options.items() if k != "extras"})
            out[name] = section
        return out

    # -- derived -----------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return self.model.config()

    def dit_config(self, num_classes: int = 10) -> DiTConfig:
        return self.dit.config(self.model, num_classes)

    def sequence_length(self) -> int:
        """Tokens per sample, sharded over the sp ranks: seq_len, or the patches of an image (dit)."""
        return self.dit_config().num_tokens if self.model.kind == "dit" else self.data.seq_len

    def sp_size(self, world: int) -> int:
        return self.parallel.sp_size(world)

    def sampling_share(self) -> float:
        """The DiT sampler's share of the run's model FLOPs (training steps, validations and the
        samples at the end; 0 for language models): what --samples / --sample-steps cost."""
        if self.model.kind != "dit" or not self.dit.samples:
            return 0.0
        dit = self.dit_config()
        image = dit.num_tokens * dit.forward_flops_per_token()
        o, rows = self.output, self.data.batch * self.parallel.dp
        evals = (self.optim.steps // o.eval_every if o.eval_every else 0) + (1 if not o.eval_every or
                                                                              self.optim.steps % o.eval_every else 0)
        sampling = self.dit.samples * self.dit.sample_steps * image
        return sampling / (3 * self.optim.steps * rows * image + evals * o.eval_batches * rows * image + sampling)

    def strategy_settings(self, world: int) -> Settings:
        """The strategy's settings; a model whose every layer is windowed tells the strategy its
        window (`local_window`: the default layout becomes contiguous) unless the options do."""
        par, m = self.parallel, self.model
        if m.builtin_lm() and m.window and not m.local_global and par.options.local_window is None:
            par = replace(par, options=replace(par.options, local_window=m.window))
        return par.strategy_settings(world)

    def calibration_path(self) -> Path:
        """--calibration, else <out_dir>/calibration.json (what --strategy auto writes)."""
        given = self.parallel.calibration
        return Path(given) if given else Path(self.output.out_dir) / "calibration.json"

    def chunked_blocks_apply(self) -> bool:
        """Whether this run's model can take --chunked-blocks: the built-in LM without FSDP."""
        return self.model.builtin_lm() and not self.parallel.fsdp

    # -- validation ----------------------------------------------------------------------------------
    def validate(self, world: int | None = None) -> None:
        """Raise ValueError for anything that cannot work (world: number of ranks, default nproc)."""
        world = world or self.parallel.nproc
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.model.kind == "dit":
            self._validate_dit()
        m = self.model
        if m.offload_activations and not self.chunked_blocks_apply():
            raise ValueError("--offload-activations applies to the built-in language model without --fsdp")
        if m.chunked_blocks:
            self._validate_chunked_blocks()
        if self.parallel.compile and (m.chunked_blocks or m.offload_activations or m.hf_model):
            raise ValueError("--compile compiles the built-in blocks (decoder or DiT): not with --chunked-blocks, "
                             "--offload-activations or --hf-model yet")
        if self.data.doc_separator >= m.vocab_size and not m.hf_model:
            raise ValueError(f"doc_separator {self.data.doc_separator} is not a token id of the model's vocabulary "
                             f"(vocab_size {m.vocab_size})")
        self._validate_mesh(world)

    def _validate_chunked_blocks(self) -> None:
        if self.parallel.strategy != "fpdt":
            raise ValueError(f"--chunked-blocks is FPDT's pipeline: it needs --strategy fpdt, got "
                             f"{self.parallel.strategy!r}")
        if not self.chunked_blocks_apply():
            raise ValueError("--chunked-blocks applies to the built-in language model without --fsdp")
        if self.model.activation_checkpointing:
            raise ValueError("--chunked-blocks recomputes its projections and MLP per chunk already; for block "
                             "inputs in host memory use --offload-activations, not --activation-checkpointing")

    def _validate_tensor_parallel(self, sp: int) -> None:
        """--tp > 1: the built-in language model (the DiT and --hf-model are not tensor-parallel yet),
        whole heads per tp rank (and per Ulysses rank of each tp rank's heads), tokens per sp rank
        divisible by tp, and none of the chunkings that TP's sharding replaces."""
        m, tp = self.model, self.parallel.tp
        if m.kind == "dit":
            d = self.dit_config()
            check_tensor_parallel(tp, d.n_heads, d.n_kv_heads or d.n_heads)
            return
        if m.hf_model:
            return  # heads and the model's own TP plan are checked where the model is read (launch.check_strategy)
        check_decoder_chunkings(m)
        check_tensor_parallel(tp, m.n_heads, m.n_kv_heads, self.data.seq_len // sp)

    def _validate_dit(self) -> None:
        self.dit_config()  # shape errors
        if self.data.data or self.model.hf_model:
            raise ValueError("--model dit trains on scikit-image's sample photos: --data / --hf-model are for "
                             "language models")
        try:
            import skimage  # noqa: F401 - the optional `dit` extra
        except ImportError:
            raise ValueError("--model dit needs scikit-image: pip install -e '.[dit]'") from None

    def _validate_pipeline(self) -> None:
        """--pp > 1: the built-in language model alone, layers divisible
        by the stages, the batch by the microbatches, a schedule that runs on gloo."""
        par, m = self.parallel, self.model
        if par.pp == 1:
            raise ValueError(f"--microbatches {par.microbatches} splits the batch of a pipeline: it needs --pp > 1")
        unsupported = [name for name, on in {
            "--model dit": m.kind == "dit", "--hf-model": bool(m.hf_model),
            "--strategy auto": par.strategy == AUTO, "--chunked-blocks": m.chunked_blocks,
            "--offload-activations": m.offload_activations,
            "--mlp-chunks / --loss-chunks": m.mlp_chunks > 1 or m.loss_chunks > 1,
            "--fsdp and interleaved-1f1b": par.fsdp and par.pp_schedule == "interleaved-1f1b"}.items() if on]
        if unsupported:
            raise ValueError(f"--pp {par.pp} runs the built-in language model: not with "
                             f"{', '.join(unsupported)} yet")
        check_pipeline(par.pp, m.n_layers, self.data.batch, par.microbatches, par.pp_schedule)

    def _validate_mesh(self, world: int) -> None:
        par = self.parallel
        sp = par.sp_size(world)
        if sp < 1 or par.pp * par.dp * sp * par.tp != world:
            raise ValueError(f"pp ({par.pp}) x dp ({par.dp}) x sp ({par.sp or 'auto'}) x tp ({par.tp}) must equal "
                             f"the number of processes ({world})")
        if par.pp > 1 or par.microbatches > 1:
            self._validate_pipeline()
        if par.tp > 1:
            self._validate_tensor_parallel(sp)
        if par.strategy == AUTO:
            return  # the planner picks a strategy that passes the checks below (train/auto.py)
        layout = self.strategy_settings(world).layout
        if layout.kind == "documents" and self.data.pack_documents and self.data.batch > 1 and self.model.kind != "dit":
            raise ValueError(f"layout 'documents' places tokens by one batch's documents, but --pack-documents "
                             f"gives each of the {self.data.batch} rows its own: use --batch 1 (more rows: --dp) or "
                             f"another layout")
        n = self.sequence_length()
        what = f"seq_len {n}" if self.model.kind != "dit" else f"the {n} patch tokens of --image-size " \
                                                               f"{self.dit.image_size}"
        try:
            layout.check(n)
        except ValueError as e:
            raise ValueError(f"{what} must be a multiple of {layout.granularity()}: {e}") from None


def flat_values(tables: dict[str, Any]) -> dict[str, Any]:
    """{flag: value} of a to_dict() (or of a config written before the tables: already flat)."""
    flat: dict[str, Any] = {}
    for key, value in tables.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update({_flag_of(key, k) or k: v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# -- configuration files and flags -----------------------------------------------------------------
def _flag_of(table: str, key: str) -> str | None:
    """The flag of config key `key` in `table`, or None when the key does not belong there."""
    for flag, spec in FLAGS.items():
        if spec.section == table and (spec.attr == key or flag == key) and key != "options":
            return flag
    return None


def _home_hint(key: str, table: str | None = None) -> str:
    homes = [spec.section for flag, spec in FLAGS.items() if key in (flag, spec.attr)]
    if homes and homes[0] != table:
        return f"; it belongs in [{homes[0]}]"
    return f"; valid keys: {sorted(k for k, s in FLAGS.items() if s.section == table)}" if table else ""


def _coerce(flag: str, value: Any, source: str) -> Any:
    """Check a config-file value against the flag's type (ints are accepted for floats)."""
    want = FLAGS[flag].kind
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {flag} must be {want.__name__}, got {value!r}")
    return value


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


def _parse_file(path: Path) -> Any:
    text = path.read_bytes()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            return yaml.safe_load(text) or {}
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text.decode())
    except Exception as e:  # noqa: BLE001 - tomllib/yaml parse errors have several types
        raise ValueError(f"cannot parse config file {str(path)!r}: {e}") from None


def load_config(name: str) -> TrainConfig:
    """A TOML or YAML config file (its tables: model, dit, data, optim, parallel, output, faults)
    as a TrainConfig, with one-line errors for bad tables, keys and values."""
    path = _config_path(name)
    raw = _parse_file(path)
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table/mapping of keys")
    return TrainConfig.from_tables(raw, str(path))


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
    defaults = TrainConfig()
    for name, spec in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if spec.kind is dict:  # --strategy-option KEY=VALUE, repeatable
            parser.add_argument(flag.removesuffix("s"), dest=name, action="append", metavar="KEY=VALUE", help=spec.help)
            continue
        default = getattr(defaults.parallel.options if spec.option else getattr(defaults, spec.section), spec.attr)
        help_text = f"{spec.help} (default: {default!r})".replace("%", "%%")
        if spec.kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=spec.kind, default=None, metavar=spec.kind.__name__.upper(),
                                choices=list(spec.choices) or None, help=help_text)


def build_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from `seqpar train` arguments (for scripts and tests)."""
    parser = argparse.ArgumentParser(prog="seqpar train")
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config) if getattr(args, "config", None) else TrainConfig()
    given = {}
    for name, spec in FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        given[name] = dict(_parse_option(o) for o in value) if spec.kind is dict else value
    return cfg.replace(**given)
