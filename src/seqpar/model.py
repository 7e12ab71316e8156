"""Models whose attention runs through a SeqParallel context.

`Transformer(cfg, ctx)`: a Llama-style decoder (RMSNorm, RoPE on *global* positions,
GQA, SwiGLU, untied LM head). Every rank holds `seq_local = seq_len / sp` tokens of each
sample (`ctx.shard`), their global positions (`ctx.positions`) and their labels; all
token-wise layers are local, and `ctx.attention` is the only place ranks talk to each
other. Up to float rounding, the sharded model computes exactly what one process computes
on the full sequence.

`DiTBlock(dim, heads, ctx)`: a Diffusion-Transformer block (adaLN-Zero modulation by a
per-sample conditioning vector, non-causal attention over patch tokens).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .chunked import chunked_lm_loss, chunked_mlp, offloaded_checkpoint
from .context import SeqParallel

__all__ = ["ModelConfig", "Transformer", "DiTBlock", "RMSNorm", "Attention", "SwiGLU", "Block",
           "rope_tables", "apply_rope", "IGNORE_INDEX"]

IGNORE_INDEX = -100
#: forward FLOPs per (query, key) pair, head and head_dim channel: QK^T and PV, 2 per multiply-add
ATTENTION_FLOPS_PER_PAIR = 4


@dataclass
class ModelConfig:
    """Shape of the decoder. ffn_dim 0 -> SwiGLU default (8/3 * dim rounded up to a multiple of 32)."""

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    mlp_chunks: int = 1          # FPDT-style chunked MLP (seqpar.chunked), exact, recompute in backward
    loss_chunks: int = 1         # chunked LM head + cross-entropy (seqpar.chunked)
    activation_checkpointing: bool = False
    offload_activations: bool = False  # checkpoint every block, its saved input in host memory (FPDT/ALST)
    chunked_blocks: bool = False  # FPDT's per-chunk block pipeline (ctx.chunked_block; strategy fpdt);
    #                               with offload_activations it keeps only block inputs (host) and recomputes
    window: int = 0              # causal sliding window of W tokens (each token sees itself and W-1 before); 0: none
    local_global: int = 0        # with a window: K local (windowed) layers per global one (Gemma 3); 0: all local

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim or 32 * -(-(8 * self.dim) // (3 * 32))

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_chunks", "loss_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.ffn_dim < 0:
            raise ValueError(f"model ffn_dim must be >= 0 (0 = default), got {self.ffn_dim}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.window < 0 or self.local_global < 0:
            raise ValueError(f"model window and local_global must be >= 0, got {self.window}, {self.local_global}")
        if self.local_global and not self.window:
            raise ValueError(f"local_global={self.local_global} interleaves windowed and global layers: give the "
                             "window too (--window W)")

    def layer_window(self, layer: int) -> int:
        """The causal window of decoder block `layer` (0: global attention): with local_global K,
        every (K+1)-th block is global (Gemma 3's 5 local : 1 global is K = 5)."""
        if not self.window or (self.local_global and (layer + 1) % (self.local_global + 1) == 0):
            return 0
        return self.window

    def to_dict(self) -> dict:
        return asdict(self)

    # -- FLOPs: the one definition, used by metrics (MFU) and the planner (seqpar.plan) --------
    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls: q, k, v, o projections and the SwiGLU MLP."""
        attn_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.dim * (2 * attn_width + 2 * kv_width) + 3 * self.dim * self.ffn_hidden

    def matmul_flops_per_token(self) -> float:
        """Forward FLOPs of one token through every matmul: 2 per weight of the blocks and the
        LM head (embeddings are lookups)."""
        return 2.0 * (self.n_layers * self.layer_matmul_params() + self.dim * self.vocab_size)

    def attention_flops_per_token(self, seq_len: int, causal: bool = True, doc_len: float | None = None) -> float:
        """Forward FLOPs of one token's attention scores and weighted sum over `seq_len` keys
        (ATTENTION_FLOPS_PER_PAIR x head_dim per key and head), halved for a causal mask. With
        packed documents of length `doc_len` a token sees only its own document's keys (the
        skipped blocks are not computed), so min(doc_len, seq_len) replaces seq_len."""
        width = self.n_heads * self.head_dim
        keys = seq_len if doc_len is None else min(float(doc_len), seq_len)
        full = keys * (0.5 if causal else 1.0)
        windows = [self.layer_window(i) for i in range(self.n_layers)]
        # a causal window of W over `keys` tokens: W - W(W-1)/(2 keys) keys per token on average
        seen = [full if not w or w >= keys else w - w * (w - 1) / (2 * keys) for w in windows]
        return ATTENTION_FLOPS_PER_PAIR * width * sum(seen)

    def flops_per_token(self, seq_len: int, causal: bool = True, doc_len: float | None = None) -> float:
        """Model FLOPs of one training token: forward + backward = 3x forward (recompute not counted)."""
        return 3.0 * (self.matmul_flops_per_token() + self.attention_flops_per_token(seq_len, causal, doc_len))



# -- building blocks ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(normed.dtype)).to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [..., seq_local, 1, head_dim/2] for the positions [..., seq_local] of the local tokens
    ([seq_local] global positions, or [batch, seq_local] positions inside each row's documents)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=work, device=positions.device) / head_dim)
    angles = positions.to(work)[..., None] * inv_freq
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x [batch, seq_local, heads, head_dim] (half-split pairs), computed in the tables' dtype."""
    cos, sin = rope
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head (GQA) self-attention whose core is `ctx.attention` over the sharded sequence."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ctx: SeqParallel, causal: bool,
                 bias: bool = False, window: int = 0):
        super().__init__()
        self.ctx, self.causal = ctx, causal
        self.window = (window - 1, 0) if window else None  # W tokens: itself and W-1 before it
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [batch, seq, dim] -> q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads, head_dim]
        (RoPE applied when given tables for these tokens)."""
        b, s = x.shape[:2]
        q = self.wq(x).view(b, s, -1, self.head_dim)  # [b, s, heads (/ tp), head_dim]
        k = self.wk(x).view(b, s, -1, self.head_dim)  # [b, s, kv_heads (/ tp), head_dim]
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, cu_seqlens=None) -> Tensor:
        """x [batch, seq_local, dim] -> [batch, seq_local, dim]; cu_seqlens: packed documents."""
        b, s = x.shape[:2]
        q, k, v = self.project(x, rope)
        with torch.autocast(x.device.type, enabled=False):  # q/k/v keep their (autocast) dtype
            local = {"window": self.window} if self.window else {}  # DiT's (duck-typed) contexts: unchanged call
            out = self.ctx.attention(q, k, v, causal=self.causal, cu_seqlens=cu_seqlens, **local)
        return self.wo(out.reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x)) on [batch, seq_local, dim]."""

    def __init__(self, cfg: ModelConfig, ctx: SeqParallel, window: int = 0):
        super().__init__()
        self.mlp_chunks, self.chunked = cfg.mlp_chunks, cfg.chunked_blocks
        self.recompute_chunks = cfg.chunked_blocks and cfg.offload_activations
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, ctx, causal=True, window=window)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cu_seqlens=None) -> Tensor:
        if self.chunked:
            return self._chunked_forward(x, rope, cu_seqlens)
        x = x + self.attention(self.attention_norm(x), rope, cu_seqlens)
        return x + chunked_mlp(self.mlp, self.mlp_norm(x), self.mlp_chunks)

    def _chunked_forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cu_seqlens=None) -> Tensor:
        """The same block by FPDT's per-chunk pipeline (`SeqParallel.chunked_block`)."""
        attn = self.attention

        def project(piece: Tensor, rows: slice):
            return attn.project(self.attention_norm(piece), _rope_rows(rope, rows))

        def finish(piece: Tensor, attended: Tensor, rows: slice) -> Tensor:
            y = piece + attn.wo(attended.flatten(2))
            return y + self.mlp(self.mlp_norm(y))

        return attn.ctx.chunked_block(x, project, finish, tuple(self.parameters()), heads=attn.n_heads,
                                      kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, causal=attn.causal,
                                      cu_seqlens=cu_seqlens, recompute=self.recompute_chunks, window=attn.window)


def _rope_rows(rope: tuple[Tensor, Tensor], rows: slice) -> tuple[Tensor, Tensor]:
    """The RoPE tables (cos, sin [..., seq_local, 1, head_dim/2]) of the local tokens `rows`."""
    return tuple(t.narrow(t.dim() - 3, rows.start, rows.stop - rows.start) for t in rope)


class Transformer(nn.Module):
    """Llama-style causal LM over a sequence-parallel context."""

    def __init__(self, cfg: ModelConfig, ctx: SeqParallel):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, ctx, cfg.layer_window(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scaled = name.endswith(("wo.weight", "w2.weight"))
            nn.init.normal_(p, 0.0, std / (2 * self.cfg.n_layers) ** 0.5 if scaled else std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: Tensor, positions: Tensor, labels: Tensor | None = None, cu_seqlens=None):
        """tokens/labels [batch, seq_local] (int64); positions [seq_local] (global indices) or, with
        packed documents, positions inside documents ([batch, seq_local] for per-row cu_seqlens);
        cu_seqlens: global document boundaries, passed to every layer's attention.

        Without labels: logits [batch, seq_local, vocab]. With labels: (loss_sum, n_valid), the
        *sum* of token cross-entropies of this rank's tokens (fp32/fp64) and the number of
        labels != IGNORE_INDEX; the caller normalises by the global count (see train.py).
        """
        x = self.tok_embeddings(tokens)
        h = self.norm(self.run_layers(x, positions, cu_seqlens))
        if labels is None:
            return self.output(h)
        return self._loss_sum(h, labels), (labels != IGNORE_INDEX).sum()

    def run_layers(self, x: Tensor, positions: Tensor, cu_seqlens=None, only: range | None = None) -> Tensor:
        """x [batch, seq_local, dim] through every block this module holds (a pipeline stage's
        pruned model holds None for the blocks of other stages: seqpar.pipeline), or the blocks
        of indices `only` (one of a rank's interleaved stages)."""
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if layer is None or (only is not None and i not in only):
                continue
            if self.cfg.offload_activations and torch.is_grad_enabled() and not self.cfg.chunked_blocks:
                x = offloaded_checkpoint(layer, x, rope, cu_seqlens)
            elif self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, cu_seqlens, use_reentrant=False)
            else:
                x = layer(x, rope, cu_seqlens)
        return x

    def _loss_sum(self, h: Tensor, labels: Tensor) -> Tensor:
        """Sum of token cross-entropies (fp32, fp64 for fp64), chunked when loss_chunks > 1; with tensor
        parallelism (seqpar.tensor_parallel) over vocabulary-sharded logits (exact under torch's
        `loss_parallel`, which the trainer enters; all-gathered logits without it)."""
        if getattr(self, "tensor_parallel", False):
            logits = self.output(h)  # DTensor [batch, seq_local, vocab] sharded over vocab (tp)
            logits = logits.flatten(0, 1)  # [batch * seq_local, vocab]
            work = torch.float64 if logits.dtype == torch.float64 else torch.float32
            loss = F.cross_entropy(logits.to(work), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            return loss.full_tensor()
        return chunked_lm_loss(h, self.output.weight, labels, self.cfg.loss_chunks, ignore_index=IGNORE_INDEX,
                               reduction="sum")


# -- vision ------------------------------------------------------------------------------------
def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: x [batch, seq_local, dim] patch tokens, c [batch, dim] conditioning.

    The modulation projection starts at zero, so a fresh block is the identity (DiT's
    adaLN-Zero); attention is non-causal over all patch tokens of the (sharded) sequence.
    """

    def __init__(self, dim: int, heads: int, ctx: SeqParallel, mlp_ratio: float = 4.0, kv_heads: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, kv_heads or heads, ctx, causal=False, bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_a * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))
