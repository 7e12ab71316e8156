"""Measured hardware: the `Calibration` of a running world, its JSON file, and its lookups.

A calibration holds what `seqpar plan --calibrate` measures (seqpar.plan.calibrate) on a
real world: per link class ("intra": groups inside a node, "inter": groups spanning nodes)
and collective kind a least-squares alpha-beta fit `t = steps(kind, n) alpha + bytes beta`
(bytes as `CommStats` counts them); the attention kernel's time per block size (causal and
full, forward and backward, through `seqpar.kernels`), with one rank computing alone and
with every rank computing at once, and the LSE merge per element; matmul FLOP/s; how many
ranks compute at full speed at once (`slots`: fewer than the ranks when processes outnumber
cores); the extra cost of a collective between computations (`sync_s`); how much of a P2P
transfer hides under compute (`overlap`); host copy bandwidth. The cost model reads every
hardware number through `seqpar.plan.inputs.Hardware`, which takes them from a calibration
when the cluster has one. No torch import here.
"""
from __future__ import annotations

import json
import math
import os
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..io import atomic_write

__all__ = ["SCHEMA", "LINK_CLASSES", "CALIBRATED_KINDS", "KERNEL_COLUMNS", "ALPHA_STEPS", "Link", "LinkFit",
           "KernelTable", "Calibration", "fit_alpha_beta", "calibrated_peak_flops"]

SCHEMA = "seqpar.calibration/1"
LINK_CLASSES = ("intra", "inter")
CALIBRATED_KINDS = ("p2p", "all_to_all", "all_gather", "reduce_scatter")

#: latency terms of one call on n ranks (a P2P step is one message)
ALPHA_STEPS: dict[str, Callable[[int], int]] = {
    "p2p": lambda n: 1, "all_to_all": lambda n: n - 1, "all_gather": lambda n: n - 1,
    "reduce_scatter": lambda n: n - 1, "all_reduce": lambda n: 2 * (n - 1),
}


@dataclass(frozen=True)
class Link:
    """The link a group's traffic crosses: `bandwidth` (bytes/s per rank and direction) and
    `latency` (s per step), or per collective kind a measured (kind, alpha_s, beta_s_per_byte)."""

    bandwidth: float
    latency: float
    fits: tuple[tuple[str, float, float], ...] = ()

    def alpha_beta(self, kind: str) -> tuple[float, float]:
        for k, alpha, beta in self.fits:
            if k == kind:
                return alpha, beta
        return self.latency, 1.0 / self.bandwidth

    def seconds(self, kind: str, n: int, nbytes: float) -> float:
        """One call of `kind` on n ranks sending `nbytes` per rank."""
        alpha, beta = self.alpha_beta(kind)
        return ALPHA_STEPS[kind](n) * alpha + nbytes * beta


@dataclass(frozen=True, eq=False)
class LinkFit:
    """t = steps(kind, n) alpha_s + bytes beta_s_per_byte, fitted on (group size, bytes, seconds) points."""

    alpha_s: float
    beta_s_per_byte: float
    points: tuple[tuple[int, int, float], ...] = ()

    def predict(self, kind: str, n: int, nbytes: float) -> float:
        return ALPHA_STEPS[kind](n) * self.alpha_s + nbytes * self.beta_s_per_byte


def fit_alpha_beta(kind: str, points: list[tuple[int, int, float]]) -> LinkFit:
    """Least squares of t = a x + b y (x = steps(kind, n), y = bytes) over the points, with
    a, b >= 0 (a negative coefficient is refitted at 0: noise, not physics)."""
    rows = [(ALPHA_STEPS[kind](n), float(nbytes), float(t)) for n, nbytes, t in points]
    if len(rows) < 2:
        raise ValueError(f"{kind}: need at least 2 points to fit alpha and beta, got {len(rows)}")
    sxx, syy, sxy = (sum(r[i] * r[j] for r in rows) for i, j in ((0, 0), (1, 1), (0, 1)))
    sxt, syt = (sum(r[i] * r[2] for r in rows) for i in (0, 1))
    det = sxx * syy - sxy * sxy
    a = (sxt * syy - syt * sxy) / det if det > 0 else -1.0
    b = (syt * sxx - sxt * sxy) / det if det > 0 else -1.0
    if a < 0 or b < 0:  # one-parameter fits, keep the better one
        only_a, only_b = max(sxt / sxx, 0.0), max(syt / syy, 0.0) if syy else 0.0
        err = lambda a_, b_: sum((a_ * x + b_ * y - t) ** 2 for x, y, t in rows)  # noqa: E731
        a, b = (only_a, 0.0) if err(only_a, 0.0) <= err(0.0, only_b) else (0.0, only_b)
    return LinkFit(a, b, tuple((int(n), int(nb), float(t)) for n, nb, t in points))


KERNEL_COLUMNS = ("full_fwd", "full_bwd", "causal_fwd", "causal_bwd")


@dataclass(frozen=True, eq=False)
class KernelTable:
    """Seconds of one kernel call on `heads` query heads (`kv_heads` K/V heads) of `head_dim`,
    batch 1, for square blocks of each size, per column of KERNEL_COLUMNS: `alone` (one rank
    computing, the others idle) and `together` (every rank running the same calls at once:
    shared cores and caches); `merge_s`: seconds per output element (row x head x head_dim)
    of merging a block's result into the running output by log-sum-exp (alone, together)."""

    heads: int
    kv_heads: int
    head_dim: int
    sizes: tuple[int, ...]
    alone: dict[str, tuple[float, ...]]
    together: dict[str, tuple[float, ...]]
    merge_s: tuple[float, float] = (0.0, 0.0)

    def seconds(self, nq: int, nk: int, causal: bool, backward: bool, rows: int, head_dim: int,
                together: bool = False) -> float:
        """One call of nq x nk (causal: nq == nk) on `rows` = batch x query heads. Log-log
        interpolation in the block size (sqrt(nq nk) for rectangles); below the smallest size
        at its time (call overhead); above the largest, full blocks at its FLOP rate and causal
        ones at the full time x (1/2 + c / n), c from the largest size: the masked tiles
        skipped, the diagonal ones (a fixed width c) computed whole."""
        if nq <= 0 or nk <= 0:
            return 0.0
        phase = "bwd" if backward else "fwd"
        mode = self.together if together else self.alone
        table = mode[f"{'causal' if causal else 'full'}_{phase}"]
        size = float(nq) if causal else math.sqrt(float(nq) * nk)
        sizes = self.sizes
        if size >= sizes[-1]:
            big, full = sizes[-1], mode[f"full_{phase}"][-1]
            t = full * (size / big) ** 2
            if causal:
                t *= 0.5 + max(0.0, table[-1] / full - 0.5) * big / size
        elif size <= sizes[0]:
            t = table[0]
        else:
            i = bisect_left(sizes, size)
            x0, x1 = math.log(sizes[i - 1]), math.log(sizes[i])
            y0, y1 = math.log(table[i - 1]), math.log(table[i])
            t = math.exp(y0 + (y1 - y0) * (math.log(size) - x0) / (x1 - x0))
        return t * rows / self.heads * head_dim / self.head_dim

    def contention(self) -> float:
        """Median over sizes and columns of together / alone time."""
        ratios = sorted(t / a for c in KERNEL_COLUMNS for t, a in zip(self.together[c], self.alone[c]))
        return ratios[len(ratios) // 2]


@dataclass(frozen=True, eq=False)
class Calibration:
    """What one world measured (see the module docstring); `to_json` / `from_json` / `load`."""

    world: int
    ranks_per_node: int
    threads: int                        # torch threads per process
    cores: int                          # cores this process may run on
    device: str                         # "cpu" or the GPU's name
    backend: str
    torch_version: str
    date: str
    slots: float                        # ranks computing at full speed at once (<= world)
    overlap: float                      # fraction of the shorter of compute / P2P hidden under the other
    sync_s: float                       # extra seconds a collective / ring step costs between computes
    host_bw: float                      # host copy bytes/s
    links: dict[str, dict[str, LinkFit]] = field(default_factory=dict)
    kernels: dict[str, KernelTable] = field(default_factory=dict)
    matmul_flops: dict[str, tuple[float, float]] = field(default_factory=dict)  # dtype: (alone, together)

    # -- lookups -----------------------------------------------------------------------------
    def link(self, link_class: str) -> Link:
        fits = self.links.get(link_class)
        if not fits:
            raise ValueError(f"the calibration has no {link_class!r} link measurements (measured on {self.world} "
                             f"ranks, {self.ranks_per_node} per node: {sorted(self.links)}); recalibrate on a "
                             f"world whose groups span nodes, or plan with ranks inside one node")
        p2p = fits.get("p2p") or next(iter(fits.values()))
        beta = max(p2p.beta_s_per_byte, 1e-15)
        return Link(1.0 / beta, p2p.alpha_s, tuple((k, f.alpha_s, f.beta_s_per_byte) for k, f in sorted(fits.items())))

    def kernel_table(self, dtype: str) -> KernelTable:
        if dtype not in self.kernels:
            raise ValueError(f"the calibration has no attention kernel timings for {dtype} (measured: "
                             f"{sorted(self.kernels)}); recalibrate with that dtype or plan with --dtype "
                             f"{next(iter(sorted(self.kernels)), '?')}")
        return self.kernels[dtype]

    def matmul_flops_per_s(self, dtype: str, together: bool = True) -> float:
        """Matmul FLOP/s of one rank, while every rank computes (default) or alone."""
        if dtype not in self.matmul_flops:
            raise ValueError(f"the calibration has no matmul timing for {dtype} "
                             f"(measured: {sorted(self.matmul_flops)})")
        return self.matmul_flops[dtype][1 if together else 0]

    def peak_flops_per_process(self, dtype: str) -> float:
        """Matmul FLOP/s one process reaches while every rank of the world computes (threads
        vs cores as they were: 4 single-threaded processes on 2 cores get about half each)."""
        return self.matmul_flops_per_s(dtype, together=True)

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["links"] = {c: {k: {"alpha_s": f.alpha_s, "beta_s_per_byte": f.beta_s_per_byte,
                              "points": [list(p) for p in f.points]} for k, f in fits.items()}
                      for c, fits in self.links.items()}
        d["kernels"] = {dt: {"heads": t.heads, "kv_heads": t.kv_heads, "head_dim": t.head_dim, "sizes": list(t.sizes),
                             "alone": {c: list(v) for c, v in t.alone.items()},
                             "together": {c: list(v) for c, v in t.together.items()}, "merge_s": list(t.merge_s)}
                        for dt, t in self.kernels.items()}
        d["matmul_flops"] = {dt: list(v) for dt, v in self.matmul_flops.items()}
        return {"schema": SCHEMA, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str, source: str = "calibration") -> "Calibration":
        """Parse and validate; any problem is a ValueError naming the source and the field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}: not a calibration file (invalid JSON: {e}); recalibrate with "
                             f"`seqpar plan --calibrate`") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        try:
            with open(path, "rb") as fh:
                text = fh.read().decode("utf-8", errors="replace")
        except OSError as e:
            raise ValueError(f"cannot read calibration file {path}: {e.strerror or e}") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        v = _Validator(source)
        v.obj(data, "the file")
        if data.get("schema") != SCHEMA:
            v.fail("schema", f"is {data.get('schema')!r}, expected {SCHEMA!r} (a file from another seqpar "
                             f"version or not a calibration: recalibrate with `seqpar plan --calibrate`)")
        world, rpn = v.integer(data, "world", 2), v.integer(data, "ranks_per_node", 1)
        links = {}
        for cls_name, fits in v.obj(data.get("links"), "links").items():
            if cls_name not in LINK_CLASSES:
                v.fail(f"links.{cls_name}", f"is not a link class; expected one of {LINK_CLASSES}")
            links[cls_name] = {kind: v.link_fit(f, f"links.{cls_name}.{kind}", kind)
                               for kind, f in v.obj(fits, f"links.{cls_name}").items()}
            missing = [k for k in CALIBRATED_KINDS if k not in links[cls_name]]
            if missing:
                v.fail(f"links.{cls_name}", f"lacks {missing}")
        if not links:
            v.fail("links", "is empty")
        kernels = {dt: v.kernel_table(t, f"kernels.{dt}") for dt, t in v.obj(data.get("kernels"), "kernels").items()}
        if not kernels:
            v.fail("kernels", "is empty")
        matmul = {dt: v.numbers(m, f"matmul_flops.{dt}", True, 2)
                  for dt, m in v.obj(data.get("matmul_flops"), "matmul_flops").items()}
        slots = v.number(data.get("slots"), "slots", positive=True)
        if slots > world + 1e-9:
            v.fail("slots", f"({slots}) exceeds the world size {world}")
        overlap = v.number(data.get("overlap"), "overlap")
        if overlap > 1:
            v.fail("overlap", f"must be in [0, 1], got {overlap}")
        return cls(world, rpn, v.integer(data, "threads", 1), v.integer(data, "cores", 1), v.text(data, "device"),
                   v.text(data, "backend"), v.text(data, "torch_version"), v.text(data, "date"), slots, overlap,
                   v.number(data.get("sync_s"), "sync_s"), v.number(data.get("host_bw"), "host_bw", positive=True),
                   links, kernels, matmul)

    def summary(self) -> str:
        return (f"calibrated {self.date} on {self.world} ranks ({self.ranks_per_node}/node, {self.device}, "
                f"{self.backend}, {self.threads} thread(s) each, {self.cores} cores, {self.slots:.3g} compute "
                f"at full speed, overlap {self.overlap:.2f}, sync {self.sync_s * 1e3:.2g} ms)")


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str):
        raise ValueError(f"{self.source}: {where} {what}")

    def obj(self, x, where: str) -> dict:
        if not isinstance(x, dict):
            self.fail(where, f"must be a JSON object, got {type(x).__name__}")
        return x

    def number(self, x, where: str, positive: bool = False) -> float:
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 if positive
                                                                                              else x >= 0)
        if not ok:
            self.fail(where, f"must be a finite number {'> 0' if positive else '>= 0'}, got {x!r}")
        return float(x)

    def integer(self, data: dict, key: str, low: int) -> int:
        x = data.get(key)
        if not isinstance(x, int) or isinstance(x, bool) or x < low:
            self.fail(key, f"must be an integer >= {low}, got {x!r}")
        return x

    def text(self, data: dict, key: str) -> str:
        if not isinstance(data.get(key), str):
            self.fail(key, f"must be a string, got {data.get(key)!r}")
        return data[key]

    def numbers(self, xs, where: str, positive: bool, count: int | None = None) -> tuple[float, ...]:
        if not isinstance(xs, list) or not xs or (count is not None and len(xs) != count):
            self.fail(where, f"must be a non-empty list{f' of {count}' if count else ''}, got {xs!r}")
        return tuple(self.number(x, f"{where}[{i}]", positive) for i, x in enumerate(xs))

    def link_fit(self, f, where: str, kind: str) -> LinkFit:
        if kind not in CALIBRATED_KINDS:
            self.fail(where, f"is not a measured kind; expected one of {CALIBRATED_KINDS}")
        f = self.obj(f, where)
        points = f.get("points", [])
        if not isinstance(points, list) or any(not isinstance(p, list) or len(p) != 3 for p in points):
            self.fail(f"{where}.points", "must be a list of [group size, bytes, seconds]")
        return LinkFit(self.number(f.get("alpha_s"), f"{where}.alpha_s"),
                       self.number(f.get("beta_s_per_byte"), f"{where}.beta_s_per_byte"),
                       tuple((int(self.number(n, where)), int(self.number(b, where)), self.number(t, where))
                             for n, b, t in points))

    def kernel_table(self, t, where: str) -> KernelTable:
        t = self.obj(t, where)
        sizes = self.numbers(t.get("sizes"), f"{where}.sizes", True)
        if list(sizes) != sorted(set(sizes)):
            self.fail(f"{where}.sizes", f"must be increasing, got {list(sizes)}")
        modes = {}
        for mode in ("alone", "together"):
            cols = self.obj(t.get(mode), f"{where}.{mode}")
            modes[mode] = {c: self.numbers(cols.get(c), f"{where}.{mode}.{c}", True, len(sizes))
                           for c in KERNEL_COLUMNS}
        merge = self.numbers(t.get("merge_s"), f"{where}.merge_s", False, 2)
        return KernelTable(self.integer(t, "heads", 1), self.integer(t, "kv_heads", 1), self.integer(t, "head_dim", 1),
                           tuple(int(s) for s in sizes), modes["alone"], modes["together"], merge)


def calibrated_peak_flops(calibration: Calibration | str | os.PathLike, dtype: str = "float32") -> float:
    """Per-process peak FLOP/s for MFU from a calibration (object or JSON file): the matmul
    rate of one rank measured while every rank of the world ran matmuls at once (so 4
    single-threaded processes on 2 cores get about half a core each). Trainer:
    `peak_tflops = calibrated_peak_flops(path, dtype) / 1e12`."""
    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    return cal.peak_flops_per_process(dtype)
