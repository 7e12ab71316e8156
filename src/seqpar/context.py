"""`seqpar.init` and the SeqParallel context every model layer talks to."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .attention import StrategyConfig, get_strategy
from .comm import Comm, CommStats
from .kernels import BlockKernel, default_scale, get_kernel
from .layout import LAYOUTS
from .mesh import Mesh

__all__ = ["SeqParallel", "init"]

_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}


class SeqParallel:
    """Sequence-parallel context over one process group (the sequence-parallel group).

    Attributes: `size`/`rank` in that group, `layout` (which tokens this rank holds),
    `strategy` (the attention method), `stats` (communication bytes), `kernel`.
    """

    def __init__(self, strategy: str, cfg: StrategyConfig, group: dist.ProcessGroup | None = None,
                 kernel: str | BlockKernel = "auto", check_inputs: bool = True,
                 stats: CommStats | None = None):
        if cfg.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {cfg.layout!r}; choose from {LAYOUTS}")
        self.mesh = Mesh(group)
        self.group = self.mesh.group
        self.size, self.rank = self.mesh.size, self.mesh.rank
        self.stats = stats if stats is not None else CommStats()
        self.comm = Comm(self.group, self.stats)
        self.kernel_name = kernel
        self.check_inputs = check_inputs
        self._kernels: dict[tuple, BlockKernel] = {}
        self._device, self._dtype = torch.device("cpu"), torch.float32  # of the latest attention call
        self.strategy = get_strategy(strategy)(self, cfg)

    # -- layout ----------------------------------------------------------------------------
    @property
    def layout(self):
        return self.strategy.layout

    @property
    def layout_rank(self) -> int:
        """This rank's index in the token layout (differs from `rank` under topology-aware placement)."""
        return self.strategy.layout_ranks()[self.rank]

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's shard of a full-sequence tensor (tokens, labels, activations)."""
        return self.layout.shard(x, self.layout_rank, dim)

    def unshard(self, x: Tensor, dim: int = 1) -> Tensor:
        """Inverse of `shard`: gather every rank's shard and restore global order (not differentiable)."""
        gathered = self.comm.all_gather(x.detach().contiguous(), dim=dim)
        order = self.strategy.layout_ranks()
        if order != sorted(order):  # put shards in layout-rank order first
            pieces = gathered.chunk(self.size, dim=dim)
            gathered = torch.cat([pieces[order.index(r)] for r in range(self.size)], dim=dim)
        return self.layout.unpermute(gathered, dim)

    def positions(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Global positions [seq_len / size] of the local tokens, for RoPE / position embeddings."""
        return self.layout.local_indices(seq_len, self.layout_rank).to(device or "cpu")

    def local_seq_len(self, seq_len: int) -> int:
        self.layout.check(seq_len)
        return seq_len // self.size

    # -- attention ---------------------------------------------------------------------------
    @property
    def kernel(self) -> BlockKernel:
        return self._kernel_for(self._device, self._dtype)

    def _kernel_for(self, device: torch.device, dtype: torch.dtype) -> BlockKernel:
        key = (device.type, dtype)
        if key not in self._kernels:
            self._kernels[key] = get_kernel(self.kernel_name, device, dtype)
        return self._kernels[key]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                  return_lse: bool = False):
        """Exact attention over the full (sharded) sequence.

        q [batch, seq_local, heads, head_dim], k/v [batch, seq_local, kv_heads, head_dim].
        Returns out [batch, seq_local, heads, head_dim], plus lse [batch, heads, seq_local]
        (fp32, fp64 for fp64 inputs) when return_lse.
        """
        self._validate(q, k, v, causal)
        self._device, self._dtype = q.device, q.dtype
        out, lse = self.strategy.attention(q, k, v, causal, default_scale(q.shape[-1], scale), return_lse)
        return (out, lse) if return_lse else out

    def _validate(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError("attention expects q/k/v as [batch, seq_local, heads, head_dim]; got "
                             f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
        if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}: "
                             "k and v must match, and share batch, seq_local and head_dim with q")
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        self.layout.check(q.shape[1] * self.size)
        if self.check_inputs and self.size > 1:
            self._check_same_everywhere(q, k, causal)

    def _check_same_everywhere(self, q: Tensor, k: Tensor, causal: bool) -> None:
        """One tiny all-reduce: every rank must call attention with the same shapes/dtype/mask."""
        sig = torch.tensor(list(q.shape) + [k.shape[2], _DTYPE_CODES.get(q.dtype, 0), int(causal)],
                           dtype=torch.int64)
        device = q.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        both = torch.cat([sig, -sig]).to(device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        hi, lo = both[: sig.numel()].cpu(), -both[sig.numel():].cpu()
        if not torch.equal(hi, lo):
            names = ["batch", "seq_local", "heads", "head_dim", "kv_heads", "dtype", "causal"]
            diff = {n: (int(a), int(b)) for n, a, b in zip(names, lo, hi) if a != b}
            raise ValueError(f"ranks of the sequence-parallel group called attention with mismatched "
                             f"inputs (min, max over ranks): {diff}")

    # -- communication accounting ------------------------------------------------------------
    def comm_stats(self) -> dict[str, dict[str, float]]:
        """Bytes sent/received, calls and seconds per collective kind since the last reset."""
        return self.stats.snapshot()

    def reset_comm_stats(self) -> None:
        self.stats.reset()

    def describe(self) -> dict[str, Any]:
        return {**self.strategy.describe(), "size": self.size, "rank": self.rank, "kernel": str(self.kernel_name)}

    def __repr__(self) -> str:
        return f"SeqParallel({self.describe()})"


def init(strategy: str, *, ulysses: int = 1, ring: int | None = None, teams: int = 1,
         layout: str = "contiguous", group: dist.ProcessGroup | None = None, chunks: int = 1,
         offload: bool = False, kernel: str | BlockKernel = "auto", check_inputs: bool = True,
         stats: CommStats | None = None, **options: Any) -> SeqParallel:
    """Build a sequence-parallel context from an initialised torch.distributed.

    strategy: local | ring | ulysses | usp | allgather | wallfacer | lss | fpdt
    ulysses / ring: USP degrees (ulysses x ring = group size); teams: WallFacer team size C;
    layout: contiguous | zigzag | striped; chunks / offload: FPDT; group: the
    sequence-parallel group (default WORLD); kernel: block kernel name or "auto";
    check_inputs: verify every rank passes matching shapes (one tiny all-reduce per call);
    options: strategy-specific extras (e.g. WallFacer's placement, ranks_per_node).
    Collective: every rank of `group` must call it with the same arguments.
    """
    cfg = StrategyConfig(ulysses=ulysses, ring=ring, teams=teams, layout=layout, chunks=chunks,
                         offload=offload, options=dict(options))
    return SeqParallel(strategy, cfg, group=group, kernel=kernel, check_inputs=check_inputs, stats=stats)
