"""What the planner is asked about: the cluster, the model's shape, the run, a candidate.

`PlanInput` = `Cluster` (two-level topology, device speed and memory, optionally a measured
`Calibration`) + `ModelShape` (a Llama-style decoder, sized by `seqpar.model.ModelConfig`) +
sequence length, batch, dtype, mask, ZeRO stage and activation checkpointing (a candidate is
`seqpar.plan.candidate.Config`). `Hardware` (`PlanInput.hardware`) is the one place the cost
model reads hardware numbers from: the cluster's flags, or its calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ..documents import DEFAULT_TILE
from ..model import ModelConfig
from .hardware import Calibration, KernelTable, Link

__all__ = ["GiB", "DTYPE_BYTES", "ModelShape", "MODEL_PRESETS", "Link", "Cluster", "Hardware", "PlanInput"]

GiB = 2 ** 30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """Llama-style decoder: `layers` blocks of GQA attention + SwiGLU MLP, untied embeddings.

    A hashable view of `seqpar.model.ModelConfig` (`.config`), which defines the head size,
    the matmul weights and the FLOPs; the shape must be one seqpar's model can build."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    sinks: bool = False  # a learned sink logit per query head and layer (gpt-oss)

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.config  # noqa: B018 - build (and validate) the model config now

    @cached_property
    def config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, dim=self.hidden, n_layers=self.layers, n_heads=self.heads,
                           n_kv_heads=self.kv_heads, ffn_dim=self.ffn_hidden)

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Matmul weights of one block plus its two RMSNorms (and its sink logits)."""
        return self.config.layer_matmul_params() + 2 * self.hidden + (self.heads if self.sinks else 0)

    def params(self) -> int:
        """All blocks, embedding, LM head and the final norm."""
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden


MODEL_PRESETS = {
    "llama-3b": ModelShape(26, 3200, 32, 32, 8640, 32000),
    "llama-7b": ModelShape(32, 4096, 32, 32, 11008, 32000),
    "llama-13b": ModelShape(40, 5120, 40, 40, 13824, 32000),
    "llama-30b": ModelShape(60, 6656, 52, 52, 17920, 32000),
    "llama3-8b": ModelShape(32, 4096, 32, 8, 14336, 128256),
    "tiny": ModelShape(2, 64, 8, 4, 128, 256),
}


@dataclass(frozen=True)
class Cluster:
    """`world` ranks, `ranks_per_node` consecutive ranks per node; per-rank link bandwidths
    (GB/s = 1e9 B/s) and latencies (us); device peak TFLOP/s x efficiency; memory in GiB;
    host link bandwidth (GB/s) for offloading. With a `calibration` the measured numbers
    replace the link, device speed and host link flags (memory stays).

    Assumptions for reproducing published setups (docs/planner.md, "Against the papers' own
    tables"); their defaults keep the plain model:

    - `attn_efficiency`: fraction of peak the attention (flash) kernels reach (on long calls
      with `attn_half_tokens`), when it differs from the dense layers' `efficiency` (None: the same);
    - `attn_half_tokens`: the attention efficiency depends on each kernel call's length: a
      call of nq query and nk key rows computing p (query, key) pairs runs at
      attn_efficiency x L / (L + attn_half_tokens), L = 2p / (nq + nk) (nk for a full nq x nk
      block, about n / 2 for a causal n x n one): every query and key row costs a fixed
      attn_half_tokens / 2 pairs' time (Q/K/V tile loads, O/lse or dK/dV writes, the merge,
      the launch), so short ring blocks run far below the long-sequence efficiency
      (None: every call at attn_efficiency);
    - `p2p_efficiency`: fraction of the link bandwidth a ring's send/recv pairs reach
      (collectives keep the full bandwidth);
    - `zero_traffic`: count the data-parallel / ZeRO traffic of every step over the world
      (stage 3: weights all-gathered in forward and again in backward, gradients
      reduce-scattered; else one all-reduce of the gradients), prefetched under the dense
      compute, the rest exposed. Off: only the gradient all-reduce, hidden under the dense
      backward (ZeRO then changes memory only);
    - `node_inter_bw`: GB/s of one node's NICs together (None: every rank has its own
      `inter_bw`). Then the ranks of a node share it: a collective spanning nodes gets
      min(inter_bw, node_inter_bw / ranks_per_node) per rank, a ring's P2P gets
      min(inter_bw, node_inter_bw / f), f = the node's ranks sending across nodes at once
      (a contiguous ring over the world: 1)."""

    world: int
    ranks_per_node: int = 8
    intra_bw: float = 150.0
    inter_bw: float = 25.0
    intra_lat: float = 5.0
    inter_lat: float = 20.0
    tflops: float = 312.0
    efficiency: float = 0.5
    memory_gib: float = 80.0
    host_bw: float = 25.0
    calibration: Calibration | None = None
    attn_efficiency: float | None = None
    p2p_efficiency: float = 1.0
    zero_traffic: bool = False
    node_inter_bw: float | None = None
    attn_half_tokens: int | None = None

    def __post_init__(self):
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got {self.world}")
        if self.ranks_per_node < 1:
            raise ValueError(f"ranks per node must be >= 1, got {self.ranks_per_node}")
        if self.world > self.ranks_per_node and self.world % self.ranks_per_node:
            raise ValueError(f"world size {self.world} is not a multiple of ranks per node {self.ranks_per_node}")
        if self.node_inter_bw is not None and not self.node_inter_bw > 0:
            raise ValueError(f"node_inter_bw must be > 0, got {self.node_inter_bw}")
        if self.attn_half_tokens is not None and not self.attn_half_tokens > 0:
            raise ValueError(f"attn_half_tokens must be > 0 tokens (or None: no call-length curve), "
                             f"got {self.attn_half_tokens}")
        for name in ("intra_bw", "inter_bw", "tflops", "memory_gib", "host_bw"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("intra_lat", "inter_lat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("efficiency", "attn_efficiency", "p2p_efficiency"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        """All ranks, as one shared tuple (the group of whole-world strategies)."""
        return tuple(range(self.world))

    @property
    def flops_per_s(self) -> float:
        """Dense (matmul) FLOP/s: peak x efficiency."""
        return self.tflops * 1e12 * self.efficiency

    @property
    def attn_flops_per_s(self) -> float:
        """Attention kernel FLOP/s: peak x attn_efficiency (default: efficiency)."""
        eff = self.efficiency if self.attn_efficiency is None else self.attn_efficiency
        return self.tflops * 1e12 * eff

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def link_class(self, group: tuple[int, ...]) -> str:
        """"inter" as soon as a group's ranks span nodes (nodes hold consecutive ranks), else "intra"."""
        return "inter" if self.node(min(group)) != self.node(max(group)) else "intra"

    def link(self, group: tuple[int, ...]) -> Link:
        """The link a group's traffic crosses (for a ring that is its slowest hop)."""
        return Hardware(self, "float32").link(group)

    def inter_flows(self, group: tuple[int, ...]) -> float:
        """Ranks of one node sending across nodes at once while every rank runs a ring on a
        group shaped like `group` (ring order): ranks_per_node x the share of its hops that
        cross nodes (at least 1)."""
        n = len(group)
        hops = sum(self.node(group[i]) != self.node(group[(i + 1) % n]) for i in range(n))
        return max(1.0, min(self.ranks_per_node, self.world) * hops / n)

    def _flag_link(self, link_class: str, flows: float | None = None) -> Link:
        """Flag link of a class; with `node_inter_bw` inter-node traffic shares the node's NICs
        among `flows` ranks (None: all of the node's ranks, as in a collective)."""
        bw, lat = (self.inter_bw, self.inter_lat) if link_class == "inter" else (self.intra_bw, self.intra_lat)
        if link_class == "inter" and self.node_inter_bw is not None:
            share = min(self.ranks_per_node, self.world) if flows is None else flows
            bw = min(bw, self.node_inter_bw / share)
        fits = () if self.p2p_efficiency == 1.0 else (("p2p", lat * 1e-6, 1.0 / (bw * 1e9 * self.p2p_efficiency)),)
        return Link(bw * 1e9, lat * 1e-6, fits)

    def hardware(self, dtype: str) -> "Hardware":
        return Hardware(self, dtype)


@dataclass(frozen=True, eq=False)
class Hardware:
    """Every hardware number of the cost model, for one cluster and dtype: from the flags, or
    from the cluster's calibration when it has one (then `kernels` times each block).

    - `link(group)`: alpha-beta per collective kind of the link the group crosses;
    - `kernels` / `flops_per_s`, `attn_half_tokens`: attention block time (calibrated table, one
      rank alone and every rank at once, else flops at peak x efficiency, of each call's length
      with the cluster's `attn_half_tokens`); `matmul_flops_per_s`: dense
      layers, every rank computing;
    - `overlap`: fraction of the shorter of (compute, P2P / host copy) hidden under the other;
    - `sync_s`: extra time of each collective call / ring step between computations (waking
      a rank whose core is busy: processes outnumbering cores); 0 without calibration;
    - `host_bw`: host<->device bytes/s.

    Compared and hashed by identity (the memo tables key on it): `PlanInput.hardware` is one
    object per plan input."""

    cluster: Cluster
    dtype: str

    @cached_property
    def _links(self) -> dict:
        return {}

    def link(self, group: tuple[int, ...]) -> Link:
        link_class = self.cluster.link_class(group)
        if link_class not in self._links:
            cal = self.cluster.calibration
            self._links[link_class] = cal.link(link_class) if cal else self.cluster._flag_link(link_class)
        return self._links[link_class]

    def p2p_link(self, group: tuple[int, ...]) -> Link:
        """The link of a ring's sends on `group`: `link(group)`, except that with the cluster's
        `node_inter_bw` the node's NICs are shared only by the ranks crossing nodes at once."""
        cl = self.cluster
        if cl.calibration is not None or cl.node_inter_bw is None or cl.link_class(group) == "intra":
            return self.link(group)
        key = ("p2p", cl.inter_flows(group))
        if key not in self._links:
            self._links[key] = cl._flag_link("inter", key[1])
        return self._links[key]

    @cached_property
    def kernels(self) -> KernelTable | None:
        cal = self.cluster.calibration
        return cal.kernel_table(self.dtype) if cal else None

    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def flops_per_s(self) -> float:
        """Attention kernels on long calls (without a calibrated kernel table)."""
        return self.cluster.attn_flops_per_s

    @property
    def attn_half_tokens(self) -> int | None:
        """The call length at which attention runs at half of `flops_per_s` (None: every call at it)."""
        return self.cluster.attn_half_tokens

    @cached_property
    def matmul_flops_per_s(self) -> float:
        cal = self.cluster.calibration
        return cal.matmul_flops_per_s(self.dtype) if cal else self.cluster.flops_per_s

    @cached_property
    def compute_cores(self) -> float:
        """How many ranks compute at full speed at once: the world (each its own device), or on
        a calibrated machine whose ranks share cores, world x matmul rate together / alone."""
        cal = self.cluster.calibration
        if cal is None:
            return float(self.world)
        together = cal.matmul_flops_per_s(self.dtype, together=True)
        alone = cal.matmul_flops_per_s(self.dtype, together=False)
        return min(float(self.world), max(1.0, self.world * together / alone))

    @property
    def sync_s(self) -> float:
        cal = self.cluster.calibration
        return cal.sync_s if cal else 0.0

    @property
    def overlap(self) -> float:
        cal = self.cluster.calibration
        return cal.overlap if cal else 1.0

    @property
    def host_bw(self) -> float:
        cal = self.cluster.calibration
        return cal.host_bw if cal else self.cluster.host_bw * 1e9

    def combine(self, a: float, b: float) -> float:
        """Time of two activities run together: the longer, plus the part of the shorter not hidden."""
        return max(a, b) + (1.0 - self.overlap) * min(a, b)


@dataclass(frozen=True)
class PlanInput:
    cluster: Cluster
    model: ModelShape
    seq_len: int
    batch: int = 1
    dtype: str = "bfloat16"
    causal: bool = True
    zero: int = 0  # ZeRO stage over the world: 1 shards optimizer states, 2 also grads, 3 also weights
    checkpointing: bool = False  # activation checkpointing: every block recomputed in backward
    mean_doc_len: float | None = None  # packed documents of this mean length (None: one document)
    optimizer_offload: bool = False  # AdamW states (and fp32 master weights) in host memory (ZeRO-Offload)
    window: int | None = None  # causal sliding window of W tokens in every layer (each sees itself and W-1 before)

    def __post_init__(self):
        if self.window is not None and (self.window < 1 or not self.causal):
            raise ValueError(f"window must be >= 1 tokens and the attention causal, got window={self.window}, "
                             f"causal={self.causal}")
        if self.mean_doc_len is not None and not (math.isfinite(self.mean_doc_len) and self.mean_doc_len >= 1):
            raise ValueError(f"mean document length must be a finite number >= 1, got {self.mean_doc_len}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {sorted(DTYPE_BYTES)}")
        if self.seq_len < 1 or self.batch < 1:
            raise ValueError(f"sequence length and batch must be >= 1, got {self.seq_len}, {self.batch}")
        if self.seq_len % self.cluster.world:
            raise ValueError(f"sequence length {self.seq_len} is not divisible by the world size "
                             f"{self.cluster.world}")

    @property
    def world(self) -> int:
        return self.cluster.world

    @cached_property
    def hardware(self) -> Hardware:
        return self.cluster.hardware(self.dtype)

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def acc_itemsize(self) -> int:
        """Gradient accumulators / attention outputs before the cast (kernels.accum_dtype)."""
        return 8 if self.dtype == "float64" else 4

    @property
    def tokens_per_rank(self) -> int:
        return self.seq_len // self.world

    def attention_rows(self, heads: int) -> float:
        """Kernel rows (batch x query heads) of attention work, scaled by `attention_fraction` and
        `window_fraction`: the cost model's attention work per (query, key) block pair."""
        return self.batch * heads * min(self.attention_fraction, self.window_fraction) * self.sink_factor

    @property
    def sink_factor(self) -> float:
        """Learned sinks add one logit column (no value) to every query row's softmax: the work per
        row grows by one of the keys it sees (1.0 without sinks). Their gradients, heads x layers
        numbers, travel with the other parameters' (`ModelShape.params`)."""
        if not self.model.sinks:
            return 1.0
        keys = ((self.seq_len + 1) / 2 if self.causal else self.seq_len) * min(self.attention_fraction,
                                                                               self.window_fraction)
        return 1.0 + 1.0 / max(keys, 1.0)

    @property
    def window_fraction(self) -> float:
        """Fraction of the causal pairs a sliding window of W tokens leaves to compute: tiles of T =
        DEFAULT_TILE query rows skip the key tiles outside the window, so about (W + 2T) x N pairs
        per head are computed instead of N(N+1)/2 (1.0 without a window)."""
        if self.window is None:
            return 1.0
        return min(1.0, (self.window + 2 * DEFAULT_TILE) * self.seq_len / (self.seq_len * (self.seq_len + 1) / 2))

    @property
    def window_pair(self) -> tuple[int, int] | None:
        """The window as seqpar's (left, right) mask bounds: (W - 1, 0)."""
        return None if self.window is None else (self.window - 1, 0)

    @cached_property
    def views(self) -> dict:
        """Memo of seqpar.plan.hybrid.group_view: (sp, tp, batch) -> what that group sees."""
        return {}

    @property
    def attention_fraction(self) -> float:
        """Fraction of the (causal or full) attention pairs that packed documents of mean length L
        keep, taken as equal-length documents: (L+1)/(N+1) causal, L/N full. seqpar skips the
        block pairs whose documents do not meet and splits the others at document boundaries, so
        attention compute scales by this fraction (on a document-balanced layout); communication
        does not (K/V still travel)."""
        if self.mean_doc_len is None or self.mean_doc_len >= self.seq_len:
            return 1.0
        length = self.mean_doc_len
        return (length + 1) / (self.seq_len + 1) if self.causal else length / self.seq_len
