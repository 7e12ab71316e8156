"""`seqpar.init` and the SeqParallel context every model layer talks to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .attention import Settings, StrategyConfig, get_strategy
from .comm import Comm, CommStats
from .kernels import BlockKernel, check_kernel_name, default_scale, get_kernel
from .layout import TokenLayout
from .mesh import Mesh

__all__ = ["SeqParallel", "init", "resolve"]

_DTYPES = tuple(sorted({t for t in vars(torch).values() if isinstance(t, torch.dtype)}, key=str))  # code: index
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_MAX_SIGNATURES = 256  # validated signatures kept per context (cleared when full, identically on every rank)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_code(t: Tensor) -> tuple[int, ...]:
    """(ndim, size 0..3), missing sizes -1: a fixed-width code of a tensor's shape."""
    sizes = list(t.shape[:4])
    return (t.dim(), *sizes, *[-1] * (4 - len(sizes)))


@dataclass(frozen=True)
class _Signature:
    """What every rank's attention call must agree on, as 19 integers (`code`)."""

    code: tuple[int, ...]  # q, k, v shape codes (5 each), q/k/v dtype codes, causal

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> "_Signature":
        dtypes = tuple(_DTYPES.index(t.dtype) for t in (q, k, v))
        return cls((*_shape_code(q), *_shape_code(k), *_shape_code(v), *dtypes, int(causal)))

    def shape(self, i: int) -> tuple[int, ...]:
        """Shape of tensor i (0: q, 1: k, 2: v), its first 4 sizes when it has more dims."""
        ndim, *sizes = self.code[5 * i:5 * i + 5]
        return tuple(sizes[:min(ndim, 4)])

    def dtypes(self) -> list[str]:
        return [_dtype_name(_DTYPES[c]) for c in self.code[15:18]]

    def fields(self) -> dict[str, Any]:
        """Named values for error messages (sizes -1 where a tensor has fewer dims)."""
        q, k = self.code[1:5], self.code[6:10]
        return {"batch": q[0], "seq_local": q[1], "heads": q[2], "head_dim": q[3], "kv_heads": k[2],
                "dtype": "/".join(dict.fromkeys(self.dtypes())), "causal": bool(self.code[18])}

    def error(self, layout: TokenLayout, size: int) -> str | None:
        """Why this call is invalid on `size` ranks holding `layout` shards, or None."""
        q, k, v = (self.shape(i) for i in range(3))
        dims = [self.code[5 * i] for i in range(3)]
        if dims != [4, 4, 4]:
            return ("attention expects q/k/v as [batch, seq_local, heads, head_dim]; got "
                    + ", ".join(f"{n} of {d} dims {s}" for n, d, s in zip("qkv", dims, (q, k, v))))
        if k != v or q[:2] != k[:2] or q[3] != k[3]:
            return (f"incompatible shapes q{q} k{k} v{v}: k and v must match, and share batch, seq_local and "
                    "head_dim with q")
        if k[2] < 1 or q[2] % k[2]:
            return f"heads ({q[2]}) must be a multiple of kv_heads ({k[2]})"
        names = self.dtypes()
        if len(set(names)) > 1:
            return f"q/k/v dtypes differ: {', '.join(names)}"
        if _DTYPES[self.code[15]] not in _FLOATS:
            return (f"attention needs floating-point q/k/v ({', '.join(map(_dtype_name, _FLOATS))}); "
                    f"got {names[0]}")
        return layout.error(q[1] * size)


def _verdict(rows: list[_Signature], layout: TokenLayout) -> str | None:
    """The error every rank raises for the signatures of all ranks (rank order), or None."""
    if all(r == rows[0] for r in rows):
        return rows[0].error(layout, len(rows))
    fields = [r.fields() for r in rows]
    diff = {n: [f[n] for f in fields] for n in fields[0] if len({f[n] for f in fields}) > 1}
    if not diff:  # differing in something else (k/v shapes, dims)
        diff = {"q/k/v shapes": [tuple(r.shape(i) for i in range(3)) for r in rows]}
    text = "; ".join(f"{n} = {', '.join(map(str, vals))}" for n, vals in diff.items())
    if "seq_local" in diff:
        total = sum(diff["seq_local"])
        text += f" ({total} tokens in all" + (f"; {layout.error(total)})" if layout.error(total) else ")")
    return f"ranks 0..{len(rows) - 1} of the sequence-parallel group called attention with mismatched inputs: {text}"


class SeqParallel:
    """Sequence-parallel context over one process group (the sequence-parallel group).

    Attributes: `size`/`rank` in that group, `layout` (which tokens this rank holds),
    `strategy` (the attention method), `stats` (communication bytes), `kernel`,
    `check_inputs` and `input_checks` (cross-rank input-check collectives run so far).
    """

    def __init__(self, strategy: str, cfg: StrategyConfig, group: dist.ProcessGroup | None = None,
                 kernel: str | BlockKernel = "auto", check_inputs: bool = True,
                 stats: CommStats | None = None):
        self.mesh = Mesh(group)
        self.group = self.mesh.group
        self.size, self.rank = self.mesh.size, self.mesh.rank
        cls = get_strategy(strategy)
        self.settings: Settings = cls.resolve(cfg, self.size)
        self.stats = stats if stats is not None else CommStats()
        self.comm = Comm(self.group, self.stats)
        check_kernel_name(kernel)
        self.kernel_name = kernel
        self.check_inputs = check_inputs
        self.input_checks = 0  # cross-rank input-check collectives run so far
        self._validated: set[_Signature] = set()
        self._kernels: dict[tuple, BlockKernel] = {}
        self.strategy = cls(self.settings, self.mesh, self.comm, self.stats)
        self.layout = self.settings.layout

    # -- layout ----------------------------------------------------------------------------

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

    # -- attention ---------------------------------------------------------------------------
    def kernel_for(self, device: torch.device, dtype: torch.dtype) -> BlockKernel:
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
        out, lse = self.strategy.attention(q, k, v, causal, default_scale(q.shape[-1], scale), return_lse,
                                           self.kernel_for(q.device, q.dtype))
        return (out, lse) if return_lse else out

    def _validate(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
        """Raise the same ValueError on every rank unless all ranks pass valid, matching inputs.

        One all-gather of a 19-integer signature per new signature (check_inputs, size > 1):
        every rank then decides on the same gathered data. A signature validated once is
        trusted afterwards, so a rank that later diverges to another signature the group
        validated before is not caught; without check_inputs only this rank's inputs are checked."""
        sig = _Signature.of(q, k, v, causal)
        if sig in self._validated:
            return
        cross_rank = self.check_inputs and self.size > 1
        error = _verdict(self._gather(sig, q.device) if cross_rank else [sig] * self.size, self.layout)
        if error:
            raise ValueError(error)
        if cross_rank or self.size == 1:
            if len(self._validated) >= _MAX_SIGNATURES:
                self._validated.clear()
            self._validated.add(sig)

    def _gather(self, sig: _Signature, device: torch.device) -> list[_Signature]:
        """Every rank's signature, in rank order (one all-gather; on `device` for NCCL)."""
        device = device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        mine = torch.tensor(sig.code, dtype=torch.int64, device=device)
        rows = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(rows, mine, group=self.group)
        self.input_checks += 1
        return [_Signature(tuple(r.tolist())) for r in rows]

    # -- communication accounting ------------------------------------------------------------
    def comm_stats(self) -> dict[str, dict[str, float]]:
        """Bytes sent/received, calls and seconds per collective kind since the last reset."""
        return self.stats.snapshot()

    def reset_comm_stats(self) -> None:
        self.stats.reset()

    def describe(self) -> dict[str, Any]:
        return {**self.strategy.describe(), "size": self.size, "rank": self.rank, "kernel": str(self.kernel_name)}

    def as_module(self) -> "torch.nn.Module":
        """This context's attention as an `nn.Module` (see `seqpar.modules.SequenceParallelAttention`)."""
        from .modules import SequenceParallelAttention
        return SequenceParallelAttention(self)

    def __repr__(self) -> str:
        return f"SeqParallel({self.describe()})"


def init(strategy: str, *, group: dist.ProcessGroup | None = None, kernel: str | BlockKernel = "auto",
         check_inputs: bool = True, stats: CommStats | None = None, **options: Any) -> SeqParallel:
    """Build a sequence-parallel context from an initialised torch.distributed.

    strategy: local | ring | ulysses | usp | allgather | wallfacer | lss | fpdt
    options (each strategy takes only those it uses, and defaults what is not given):
      layout: contiguous | zigzag | striped (default: zigzag for ring, usp, allgather,
      wallfacer, lss; contiguous for ulysses, fpdt, local); ulysses / ring: USP degrees
      (ulysses x ring = group size); team_size: WallFacer C (default 2 when 4 divides the
      group size; `teams` is its deprecated alias); chunks / offload: FPDT;
      placement: USP / WallFacer topology; ranks_per_node: WallFacer.
    group: the sequence-parallel group (default WORLD); kernel: block kernel name or "auto";
    check_inputs: verify that every rank passes valid, matching q/k/v (one tiny all-gather the
    first time each shape/dtype/mask signature is seen; every rank raises the same error).
    Collective: every rank of `group` must call it with the same arguments.
    """
    cfg = StrategyConfig.from_kwargs(**options)
    return SeqParallel(strategy, cfg, group=group, kernel=kernel, check_inputs=check_inputs, stats=stats)


def resolve(strategy: str, size: int, **options: Any) -> Settings:
    """The settings `seqpar.init(strategy, **options)` would use on a group of `size` ranks,
    or the ValueError it would raise — without a process group (planner, trainer, CLI)."""
    return get_strategy(strategy).resolve(StrategyConfig.from_kwargs(**options), size)
