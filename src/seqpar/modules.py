"""`nn.Module` seams: a strategy as a module, and the Ulysses wrapper of any local attention.

    attn = seqpar.init("usp", ulysses=2).as_module()      # any strategy (yunchang's LongContextAttention)
    out = attn(q, k, v, causal=True)                     # [batch, seq_local, heads, head_dim]

    dist_attn = UlyssesAttention(my_local_attention)     # DeepSpeed's DistributedAttention seam
    out = dist_attn(q, k, v, *extra_args)                # my_local_attention sees the whole sequence
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist
from torch import Tensor, nn

from .attention.ulysses import gather_heads, scatter_heads
from .comm import Comm, CommStats
from .context import SequenceParallelAttention
from .layout import TokenLayout
from .mesh import Mesh

__all__ = ["SequenceParallelAttention", "UlyssesAttention"]


class UlyssesAttention(nn.Module):
    """Ulysses around any local attention: all-to-all (scatter heads, gather the sequence),
    `local_attention(q, k, v, *args, **kwargs) -> out` on [b, seq, heads/P, d] tensors,
    and the inverse all-to-all. Differentiable; K/V heads are replicated when
    kv_heads < P (their gradients summed back).

    Tokens are sharded contiguously (`layout`: rank r holds [r*N/P, (r+1)*N/P)), so the
    local attention sees the sequence in order and applies its own masks.
    """

    def __init__(self, local_attention: Callable[..., Tensor], group: dist.ProcessGroup | None = None,
                 stats: CommStats | None = None):
        super().__init__()
        self.local_attention = local_attention
        mesh = Mesh(group)
        self.stats = stats if stats is not None else CommStats()
        self.comm = Comm(mesh.group, self.stats)
        self.layout = TokenLayout("contiguous", outer=1, inner=mesh.size)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> out [b, s_local, h, d]."""
        if self.comm.size == 1:
            return self.local_attention(q, k, v, *args, **kwargs)
        qh, kh, vh = scatter_heads(q, k, v, self.comm)
        return gather_heads(self.local_attention(qh, kh, vh, *args, **kwargs), self.comm)
