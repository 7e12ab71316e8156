"""`seqpar.init` and the SeqParallel context every model layer talks to."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from .attention import Settings, StrategyOptions, get_strategy
from .attention.fpdt_block import BlockFunctions
from .comm import Comm, CommStats
from .documents import DEFAULT_TILE, DocMask, Documents, check_cu_seqlens, check_window, document_positions
from .inputcheck import InputChecker, local_code
from .kernels import BlockKernel, CountingKernel, FlopStats, SoftcapKernel, check_kernel_name, default_scale, get_kernel
from .layout import DOCUMENTS, TokenLayout
from .mesh import Mesh
from .ops import attention_op, register_context

__all__ = ["SeqParallel", "SequenceParallelAttention", "init", "resolve"]

class SeqParallel:
    """Sequence-parallel context over one process group (the sequence-parallel group).

    Attributes: `size`/`rank` in that group, `layout` (which tokens this rank holds),
    `strategy` (the attention method), `stats` (communication bytes), `kernel`,
    `check_inputs` and `input_checks` (cross-rank input-check collectives run so far).
    """

    def __init__(self, strategy: str, options: StrategyOptions, group: dist.ProcessGroup | None = None,
                 kernel: str | BlockKernel = "auto", check_inputs: bool = True,
                 stats: CommStats | None = None):
        self.mesh = Mesh(group)
        self.group = self.mesh.group
        self.size, self.rank = self.mesh.size, self.mesh.rank
        cls = get_strategy(strategy)
        self.settings: Settings = cls.resolve(options, self.size)
        self.stats = stats if stats is not None else CommStats()
        self.comm = Comm(self.group, self.stats)
        check_kernel_name(kernel)
        self.kernel_name = kernel
        self._inputs = InputChecker(self.group, self.size, check_inputs)
        self._kernels: dict[tuple, BlockKernel] = {}
        self.flops = FlopStats()
        self._masks: dict[tuple, DocMask] = {}  # the latest document masks (their sub-block caches)
        self.strategy = cls(self.settings, self.mesh, self.comm, self.stats)
        self.layout = self.settings.layout
        self.handle = register_context(self)  # names this context in torch.ops.seqpar.attention

    # -- layout ----------------------------------------------------------------------------

    @property
    def layout_rank(self) -> int:
        """This rank's index in the token layout (differs from `rank` under topology-aware placement)."""
        return self.strategy.layout_ranks()[self.rank]

    def layout_for(self, seq_len: int, cu_seqlens=None) -> TokenLayout:
        """The token layout of one batch: the documents layout needs its cu_seqlens (one tensor, or
        a list of equal ones); the other layouts ignore them."""
        if self.layout.kind != DOCUMENTS or cu_seqlens is None:
            return self.layout
        batch = len(cu_seqlens) if isinstance(cu_seqlens, (list, tuple)) else 1
        rows = check_cu_seqlens(cu_seqlens, seq_len, batch)
        if len(set(rows)) > 1:
            raise ValueError("the 'documents' layout needs the same cu_seqlens for every batch row")
        return self.layout.with_documents(rows[0])

    def shard(self, x: Tensor, dim: int = 1, cu_seqlens=None) -> Tensor:
        """This rank's shard of a full-sequence tensor (tokens, labels, activations)."""
        return self.layout_for(x.shape[dim], cu_seqlens).shard(x, self.layout_rank, dim)

    def unshard(self, x: Tensor, dim: int = 1, cu_seqlens=None) -> Tensor:
        """Inverse of `shard`: gather every rank's shard and restore global order (not differentiable)."""
        gathered = self.comm.all_gather(x.detach().contiguous(), dim=dim)
        order = self.strategy.layout_ranks()
        if order != sorted(order):  # put shards in layout-rank order first
            pieces = gathered.chunk(self.size, dim=dim)
            gathered = torch.cat([pieces[order.index(r)] for r in range(self.size)], dim=dim)
        return self.layout_for(gathered.shape[dim], cu_seqlens).unpermute(gathered, dim)

    def positions(self, seq_len: int, device: torch.device | str | None = None, cu_seqlens=None) -> Tensor:
        """Positions [seq_len / size] of the local tokens, for RoPE / position embeddings: global
        ones, or with `cu_seqlens` (global document boundaries) positions inside each token's own
        document — [batch, seq_len / size] when cu_seqlens is a list (one tensor per batch row)."""
        pos = self.layout_for(seq_len, cu_seqlens).local_indices(seq_len, self.layout_rank)
        if cu_seqlens is not None:
            batch = len(cu_seqlens) if isinstance(cu_seqlens, (list, tuple)) else 1
            rows = [document_positions(pos, cu) for cu in check_cu_seqlens(cu_seqlens, seq_len, batch)]
            pos = torch.stack(rows) if isinstance(cu_seqlens, (list, tuple)) else rows[0]
        return pos.to(device or "cpu")

    # -- attention ---------------------------------------------------------------------------
    def kernel_for(self, device: torch.device, dtype: torch.dtype) -> BlockKernel:
        """The block kernel for (device, dtype), counting its work in `self.flops`."""
        key = (device.type, dtype)
        if key not in self._kernels:
            self._kernels[key] = CountingKernel(get_kernel(self.kernel_name, device, dtype), self.flops)
        return self._kernels[key]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                  return_lse: bool = False, cu_seqlens=None, window=None, sinks: Tensor | None = None,
                  softcap: float | None = None):
        """Exact attention over the full (sharded) sequence.

        q [batch, seq_local, heads, head_dim], k/v [batch, seq_local, kv_heads, head_dim].
        cu_seqlens: packed documents — a 1-D integer tensor [0, l1, l1+l2, ..., seq_len] of global
        boundaries (the same on every rank) for every batch row, or a list of them, one per row;
        a token then attends only to its own document (causally when causal).
        window: (left, right) sliding window as in flash-attn — key j is visible from query i iff
        (left < 0 or j >= i - left) and (right < 0 or j <= i + right), -1 unbounded (global
        positions; with documents also inside the document); tiles no query sees are skipped.
        sinks: [heads] learnable attention-sink logits (gpt-oss): one extra column in each
        softmax denominator carrying no value; its gradient is this rank's part (summed over the
        ranks by the gradient sync, like every parameter's).
        softcap: c > 0, scores become c * tanh(scores / c) before masking (Gemma 2).
        Returns out [batch, seq_local, heads, head_dim], plus lse [batch, heads, seq_local]
        (fp32, fp64 for fp64 inputs; including the sinks) when return_lse.
        """
        window = check_window(window)
        _check_sinks(sinks, q)
        softcap = None if softcap is None else _check_softcap(softcap)
        scale = default_scale(q.shape[-1], scale)
        plain = window is None and sinks is None and softcap is None
        if plain and torch.compiler.is_compiling():  # one opaque op in the compiled graph (seqpar.ops)
            out, lse = attention_op(q, k, v, self.handle, causal, scale, return_lse, cu_seqlens)
        else:  # (windows, sinks and soft-capping are not in the op yet: dynamo traces into them)
            out, lse = self.attention_impl(q, k, v, causal, scale, return_lse, cu_seqlens, window, sinks, softcap)
        return (out, lse) if return_lse else out

    def attention_impl(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, need_lse: bool,
                       cu_seqlens=None, window=None, sinks: Tensor | None = None,
                       softcap: float | None = None) -> tuple[Tensor, Tensor | None]:
        """`attention` in eager mode (and inside the compiled graph's op): check the inputs, build
        the mask (documents, window), run the strategy, merge the sinks. Returns out and lse (None
        unless need_lse or sinks)."""
        local = local_code(window, softcap, sinks is not None)
        rows = self._inputs.validate(q, k, v, causal, self.layout, cu_seqlens, local)
        if self.layout.kind == DOCUMENTS and (rows is None or len(set(rows)) > 1):
            raise ValueError("the 'documents' layout needs cu_seqlens, the same for every batch row")
        mask = self._mask(rows, causal, window, q.shape[1] * self.size)
        kernel = self.kernel_for(q.device, q.dtype)
        if softcap is not None:
            kernel = SoftcapKernel(kernel, softcap)
        extra = {} if sinks is None else {"sinks": sinks}
        out, lse = self.strategy.attention(q, k, v, causal, scale, need_lse or sinks is not None, kernel, mask,
                                           **extra)
        if sinks is not None and torch.is_grad_enabled() and sinks.requires_grad:
            out = _SinkGrad.apply(out, lse, sinks)
        return out, lse

    def chunked_block(self, x: Tensor, project, finish, params, *, heads: int, kv_heads: int, head_dim: int,
                      causal: bool = True, scale: float | None = None, cu_seqlens=None,
                      recompute: bool = False, window=None) -> Tensor:
        """A whole transformer block by FPDT's per-chunk pipeline (strategy 'fpdt' only): the
        projections, attention and MLP of one sequence chunk at a time, forward and backward.

        x [batch, seq_local, dim]; project(x_piece, rows) -> q [b, c, heads, head_dim],
        k, v [b, c, kv_heads, head_dim]; finish(x_piece, attn_piece [b, c, heads, head_dim], rows)
        -> the block's output piece [b, c, dim]; both position-wise, `rows` the piece's slice of
        the local sequence; params: the parameters they use. Returns the block output like x.
        recompute: keep only x (host memory with offload) for backward, which runs the chunk loop
        again, attention included (checkpointing inside the pipeline; exact either way).
        window: (left, right) sliding window as in `attention` (chunks it leaves out are skipped).
        The inputs are checked across ranks as for `attention` (q/k/v as projected)."""
        if not hasattr(self.strategy, "chunked_block"):
            raise ValueError(f"chunked blocks are FPDT's pipeline: they need strategy 'fpdt', this context "
                             f"runs {self.settings.strategy!r}")
        if x.dim() != 3:
            raise ValueError(f"chunked_block takes x [batch, seq_local, dim], got shape {tuple(x.shape)}")
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        b, s = x.shape[:2]
        q = x.new_zeros((), dtype=dtype).expand(b, s, heads, head_dim)  # shapes for the checks, no memory
        kv = x.new_zeros((), dtype=dtype).expand(b, s, kv_heads, head_dim)
        window = check_window(window)
        rows = self._inputs.validate(q, kv, kv, causal, self.layout, cu_seqlens, local_code(window, None, False))
        mask = self._mask(rows, causal, window, s * self.size)
        fns = BlockFunctions(project, finish, tuple(params), heads, kv_heads, head_dim)
        return self.strategy.chunked_block(x, fns, causal, default_scale(head_dim, scale),
                                           self.kernel_for(x.device, dtype), mask, recompute)

    def _mask(self, rows: tuple[tuple[int, ...], ...] | None, causal: bool, window=None,
              seq_len: int = 0) -> DocMask | None:
        """The DocMask of these boundaries and window (reused while they repeat, e.g. across
        layers); None without documents and window."""
        if rows is None and window is None:
            return None
        key = (rows, causal, window, None if rows else seq_len)
        if key not in self._masks:
            if len(self._masks) >= 8:
                self._masks.pop(next(iter(self._masks)))
            tile = self.settings.tile or DEFAULT_TILE
            if rows is None:
                self._masks[key] = DocMask.whole(seq_len, causal, window, tile)
            else:
                self._masks[key] = DocMask(Documents.from_rows(rows), causal, self.layout.with_documents(rows[0]),
                                           window, tile)
        return self._masks[key]

    @property
    def check_inputs(self) -> bool:
        """Whether attention checks every rank's inputs across the group (once per new signature)."""
        return self._inputs.cross_rank

    @check_inputs.setter
    def check_inputs(self, value: bool) -> None:
        self._inputs.cross_rank = bool(value)

    @property
    def input_checks(self) -> int:
        """Cross-rank input-check collectives run so far."""
        return self._inputs.collectives

    # -- communication accounting ------------------------------------------------------------
    def comm_stats(self) -> dict[str, dict[str, float]]:
        """Bytes sent/received, calls and seconds per collective kind since the last reset."""
        return self.stats.snapshot()

    def reset_comm_stats(self) -> None:
        self.stats.reset()

    def flop_stats(self) -> dict[str, int]:
        """Attention work this rank's kernels computed since the last reset (see `FlopStats`)."""
        return self.flops.snapshot()

    def reset_flop_stats(self) -> None:
        self.flops.reset()

    def describe(self) -> dict[str, Any]:
        return {**self.strategy.describe(), "size": self.size, "rank": self.rank, "kernel": str(self.kernel_name)}

    def as_module(self) -> "SequenceParallelAttention":
        """This context's attention as an `nn.Module`."""
        return SequenceParallelAttention(self)

    def __repr__(self) -> str:
        return f"SeqParallel({self.describe()})"


def _check_sinks(sinks: Tensor | None, q: Tensor) -> None:
    if sinks is not None and (not isinstance(sinks, Tensor) or tuple(sinks.shape) != (q.shape[2],)
                              or not sinks.is_floating_point()):
        raise ValueError(f"sinks must be a floating-point tensor [heads] = [{q.shape[2]}] (one logit per query "
                         f"head), got {tuple(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__}")


def _check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
        raise ValueError(f"softcap must be a positive finite number (or None for no soft-capping), got {softcap!r}")
    return float(softcap)


class _SinkGrad(torch.autograd.Function):
    """out unchanged; backward adds the sinks' gradient of this rank's rows: the sink of head h
    takes p_sink = exp(sink_h - lse) of every row, so dsink_h = -sum_rows p_sink * (dO . O)."""

    @staticmethod
    def forward(ctx, out, lse, sinks):
        ctx.save_for_backward(out, lse, sinks)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        out, lse, sinks = ctx.saved_tensors
        p_sink = torch.exp(sinks.detach().to(lse.dtype).view(1, -1, 1) - lse)  # [b, h, s]
        delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(1, 2)  # [b, h, s]
        return dout, None, -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


class SequenceParallelAttention(nn.Module):
    """A SeqParallel context's exact attention: forward(q, k, v, causal, scale) -> out."""

    def __init__(self, ctx: SeqParallel):
        super().__init__()
        self.ctx = ctx

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                cu_seqlens=None) -> Tensor:
        """q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> out [b, s_local, h, d]; cu_seqlens:
        global document boundaries (see `SeqParallel.attention`)."""
        return self.ctx.attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.ctx.strategy.describe().items())


def init(strategy: str, *, group: dist.ProcessGroup | DeviceMesh | None = None, kernel: str | BlockKernel = "auto",
         check_inputs: bool = True, stats: CommStats | None = None, **options: Any) -> SeqParallel:
    """Build a sequence-parallel context from an initialised torch.distributed.

    strategy: a registered name (`seqpar.STRATEGIES`: local, ring, ulysses, usp, allgather,
      wallfacer, lss, fpdt and any registered from outside).
    options: the schema `seqpar.StrategyOptions` (each strategy takes only those it uses and
      defaults what is not given): layout: contiguous | zigzag | striped | documents (default:
      zigzag for ring, usp (ring > 1), allgather, wallfacer, lss; contiguous for ulysses, fpdt,
      local); ulysses / ring: USP degrees (ulysses x ring = group size); team_size: WallFacer C
      (default 2 when 4 divides the group size); chunks / offload: FPDT; placement: USP /
      WallFacer topology; ranks_per_node: WallFacer; plus the options of a strategy registered
      from outside.
    group: the sequence-parallel group (default WORLD), or a torch DeviceMesh: its "sp" dimension
      (e.g. `seqpar.ParallelDims(...).device_mesh`), or the mesh itself when it is 1-D;
      kernel: block kernel name or "auto";
    check_inputs: verify that every rank passes valid, matching q/k/v (one tiny all-gather the
    first time each shape/dtype/mask signature is seen; every rank raises the same error).
    Collective: every rank of `group` must call it with the same arguments.
    """
    if isinstance(group, DeviceMesh):
        group = _sp_group_of(group)
    return SeqParallel(strategy, StrategyOptions.from_kwargs(**options), group=group, kernel=kernel,
                       check_inputs=check_inputs, stats=stats)


def _sp_group_of(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The sequence-parallel group of a DeviceMesh: its "sp" dimension, or the mesh when 1-D."""
    names = mesh.mesh_dim_names or ()
    if "sp" in names:
        return mesh.get_group("sp")
    if mesh.ndim == 1:
        return mesh.get_group()
    raise ValueError(f"seqpar.init(group=DeviceMesh{tuple(mesh.shape)}): name its sequence-parallel dimension "
                     f"'sp' (mesh_dim_names={names}) or pass that dimension's group")


def resolve(strategy: str, size: int, **options: Any) -> Settings:
    """The settings `seqpar.init(strategy, **options)` would use on a group of `size` ranks,
    or the ValueError it would raise — without a process group (planner, trainer, CLI)."""
    return get_strategy(strategy).resolve(StrategyOptions.from_kwargs(**options), size)
