"""Training metrics: FLOPs / MFU, peak memory, JSON-lines log (and its TensorBoard mirror),
progress bar, loss-curve plot."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterable

import torch

from .io import atomic_write
from .model import ModelConfig

__all__ = ["training_flops_per_token", "default_peak_tflops", "cpu_cores_per_process", "measured_peak_tflops",
            "machine_key", "machine_peak_tflops", "peak_cache_path", "mfu", "peak_memory_mb", "JsonlLog",
           "TensorBoardLog", "scalars", "ProgressBar", "plot_loss_curve", "read_jsonl"]

# dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; fp32 uses half (TF32 rate)
_GPU_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "A10": 125.0, "V100": 125.0}
CPU_PEAK_TFLOPS = 0.1  # per core: one AVX2/AVX-512 core with FMA: ~2 FMA x 8-16 lanes x 2 flops x ~3 GHz


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                             doc_len: float | None = None) -> float:
    """Model FLOPs of one training token (forward + backward): `ModelConfig.flops_per_token`."""
    return cfg.flops_per_token(seq_len, causal, doc_len)


def cpu_cores_per_process(processes: int | None = None, threads: int | None = None) -> float:
    """Cores one of `processes` local processes (default: $LOCAL_WORLD_SIZE, else 1) running
    `threads` torch threads (default: torch.get_num_threads()) gets when all compute:
    min(threads, cores / processes), the cores being those this process may run on."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if processes is None else processes)
    threads = torch.get_num_threads() if threads is None else threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(float(threads), cores / processes)


def default_peak_tflops(device: torch.device, dtype: torch.dtype, processes: int | None = None) -> float:
    """A rough per-process peak for MFU: GPU table by name; on CPU, CPU_PEAK_TFLOPS per core
    times the cores this process gets (`cpu_cores_per_process`: threads vs cores, shared by
    the `processes` local processes). A measured peak is better: `measured_peak_tflops` (all
    ranks at once, inside the world) or `seqpar.plan.calibrated_peak_flops` (a calibration)."""
    if device.type != "cuda":
        return CPU_PEAK_TFLOPS * cpu_cores_per_process(processes)
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in _GPU_PEAKS.items() if k in name), 100.0)
    return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.2, size: int = 0) -> float:
    """Matmul TFLOP/s this process reaches now (square matmuls for about `seconds`, median of
    5 runs). Called on every rank of a world at once (e.g. right after start-up, before
    training), it is the honest per-process peak: processes sharing cores share it."""
    size = size or (2048 if device.type == "cuda" else 256)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    calls = max(1, int(seconds / 5 / max(time.perf_counter() - t0, 1e-9)))
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync()
        runs.append((time.perf_counter() - t0) / calls)
    return 2.0 * size ** 3 / sorted(runs)[2] / 1e12


# -- the machine's peak (MFU's denominator) -------------------------------------------------------
PEAK_CACHE_ENV = "SEQPAR_CACHE_DIR"


def peak_cache_path() -> Path:
    """The per-user cache of machine peaks: $SEQPAR_CACHE_DIR, else $XDG_CACHE_HOME/seqpar, else
    ~/.cache/seqpar; the file machine_peak.json."""
    root = os.environ.get(PEAK_CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqpar"
    return Path(root) / "machine_peak.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a machine peak belongs to: host name, CPU model (or GPU name), cores, torch version, dtype."""
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return f"{socket.gethostname()}|{chip}|{_cores()} cores|torch {torch.__version__}|{str(dtype).split('.')[-1]}"


def _measure_machine(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Matmul TFLOP/s of this process with one torch thread per core (the machine's CPU peak):
    the best of 5 runs of 512x512 matmuls, about `seconds` in all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_cores())
    try:
        rates = [measured_peak_tflops(device, dtype, seconds / 5, size=512) for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    return max(rates)


def machine_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0,
                        cache: str | os.PathLike | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of this machine, where it came from). GPU: the table by device name (one
    device). CPU: matmuls with every core (`_measure_machine`), measured once per `machine_key`
    and kept in the cache file (`peak_cache_path()`): every later run on this machine, with any
    number of processes, divides by the same peak, so MFU ratios are tokens/s ratios."""
    if device.type == "cuda":
        return default_peak_tflops(device, dtype), "GPU table (one device)"
    path = Path(cache) if cache else peak_cache_path()
    key = machine_key(device, dtype)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("tflops"), (int, float)) and entry["tflops"] > 0:
        return float(entry["tflops"]), f"machine peak cached in {path}"
    peak = _measure_machine(device, dtype, seconds)
    known = known if isinstance(known, dict) else {}
    known[key] = {"tflops": peak, "threads": _cores(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        atomic_write(path, json.dumps(known, indent=1) + "\n")
    except OSError:
        return peak, "machine peak measured now (cache not writable)"
    return peak, f"machine peak measured now, cached in {path}"


def mfu(flops_per_token: float, tokens: int, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: world-total model FLOPs / (peak of the machines * elapsed seconds)."""
    return flops_per_token * tokens / (peak_tflops * 1e12 * seconds)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max_memory_allocated, else max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class JsonlLog:
    """Append one JSON object per line; flushed after every record.

    The file is strict JSON (RFC 8259): a non-finite float (a NaN loss, an infinite grad norm)
    is written as null, never as the NaN/Infinity tokens Python's json module would emit.
    """

    def __init__(self, path: str | os.PathLike, keep_until_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None:  # resumed run: drop records the restart will redo
            kept = [r for r in read_jsonl(self.path) if (r.get("step") or 0) <= keep_until_step]
            self.path.write_text("".join(_json_line(r) for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._fh: IO[str] = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(_json_line(record))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record as TensorBoard tags: its keys (`comm` as comm/<kind>),
    without `type`, `step`, flags and nulls."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "type"):
            out[key] = float(value)
    return out


class TensorBoardLog:
    """The scalars of every metrics record (`scalars`) at its step, through
    torch.utils.tensorboard (the `tensorboard` package, in the `data` extra); a resumed run
    purges the events after its checkpoint's step."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install -e '.[data]'") from None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


def _finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (nested in dicts/lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; NaN/Infinity tokens (logs of older versions) read as None."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line, parse_constant=lambda _: None) for line in path.read_text().splitlines()
            if line.strip()]


class ProgressBar:
    """`[#####.....] 50/100 text` redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, stream: IO[str] | None = None, width: int = 30):
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, done: int, text: str = "") -> None:
        filled = int(self.width * done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        line = f"[{bar}] {done}/{self.total} {elapsed:6.1f}s {text}"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _ema(values: Iterable[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam), for a readable noisy curve."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay ** i))
    return out


def plot_loss_curve(records: Iterable[dict[str, Any]], path: str | os.PathLike, title: str = "",
                    ylabel: str = "loss (nats / token)") -> Path:
    """Write train (and validation) loss vs step as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "val" and r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, _ema(losses), color="tab:blue", linewidth=2, label="train loss (EMA 0.9)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
