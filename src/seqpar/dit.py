"""A Diffusion Transformer (DiT) over patch tokens, sequence-parallel like the LM.

`DiT(cfg, ctx)`: images are patchified on the *full* image on every rank (`DiT.patchify`),
each rank keeps its tokens (`ctx.shard(tokens, dim=1)`), and `DiT.forward` embeds them
with a fixed 2-D sin-cos position embedding indexed by each token's *global* patch index
(`ctx.positions`, so any layout works, zigzag included), runs adaLN-Zero `DiTBlock`s whose
non-causal `ctx.attention` is the only cross-rank step, and predicts every local token's
p*p*C pixel values. Conditioning: sinusoidal timestep embedding + MLP, plus a class
embedding with a null class (`cfg.num_classes`) for classifier-free guidance.

Objective (`loss_terms`): rectified flow, x_t = (1 - t) x0 + t noise, target v = noise - x0.
Noise, t and the class-dropout draw of global batch row i come from a generator seeded by
(generator_seed, row_offset + i) over the full image, so every sequence-parallel rank draws
the same values, and data-parallel ranks (row_offset = dp_rank * batch) draw what one
process draws for the whole global batch. `sample` integrates the flow with Euler steps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .context import SeqParallel
from .model import ATTENTION_FLOPS_PER_PAIR, DiTBlock, _modulate

__all__ = ["DiTConfig", "DIT_PRESETS", "DiT", "loss_terms", "flow_draws", "noise_seed", "sample", "sampling_flops",
           "SampleProgress", "sincos_2d", "timestep_embedding"]

FREQ_DIM = 256            # sinusoidal timestep features (DiT)
T_SCALE = 1000.0          # t in [0, 1] is embedded as t * 1000 (DiT's timestep range)


@dataclass
class DiTConfig:
    """Shape of the DiT; square images of image_size pixels cut into patch_size patches."""

    image_size: int = 256
    patch_size: int = 2
    channels: int = 3
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout: float = 0.1     # training rows given the null class (classifier-free guidance)
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every DiT option is checked here (ValueError with the offending value)."""
        for name in ("image_size", "patch_size", "channels", "dim", "n_layers", "n_heads", "n_kv_heads",
                     "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"dit {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.dim % 4:
            raise ValueError(f"dim ({self.dim}) must be a multiple of 4 for the 2-D sin-cos position embedding")
        if not self.mlp_ratio > 0 or int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be > 0 (with dim * mlp_ratio >= 1), got {self.mlp_ratio}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        """A named preset (`DIT_PRESETS`) with some fields replaced."""
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose from {sorted(DIT_PRESETS)}")
        return replace(DIT_PRESETS[name], **overrides)

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        """Pixel values per patch token (p * p * C)."""
        return self.patch_size ** 2 * self.channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- FLOPs -----------------------------------------------------------------------------
    def matmul_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward matmul FLOPs of one token (2 per weight): patch embedding, blocks, output layer,
        plus the per-image conditioning (timestep MLP, adaLN projections) spread over its tokens."""
        n = seq_len or self.num_tokens
        kv = self.n_kv_heads * (self.dim // self.n_heads)
        block = self.dim * (2 * self.dim + 2 * kv) + 2 * self.dim * self.mlp_hidden
        per_token = self.patch_dim * self.dim + self.n_layers * block + self.dim * self.patch_dim
        per_image = FREQ_DIM * self.dim + self.dim ** 2 + self.n_layers * 6 * self.dim ** 2 + 2 * self.dim ** 2
        return 2.0 * (per_token + per_image / n)

    def attention_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward attention FLOPs of one token over all seq_len patch tokens (non-causal)."""
        return ATTENTION_FLOPS_PER_PAIR * (seq_len or self.num_tokens) * self.dim * self.n_layers

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs of one patch token (matmuls + attention): what sampling and validation cost."""
        return self.matmul_flops_per_token(seq_len) + self.attention_flops_per_token(seq_len)

    def flops_per_token(self, seq_len: int | None = None, causal: bool = False) -> float:
        """Training FLOPs of one patch token (forward + backward = 3x forward). seq_len defaults
        to the image's token count; `causal` is accepted for `ModelConfig` compatibility and
        ignored: DiT attention is never causal."""
        return 3.0 * self.forward_flops_per_token(seq_len)


#: "test": 16x16 pixels, 64 tokens (seconds on CPU); "default": `seqpar train --model dit`,
#: 64x64 pixels in 2x2 patches = 1,024 tokens (a run of minutes on a 2-core CPU); "16k":
#: `--image-size 256`, 16,384 tokens per image, the long-sequence configuration.
DIT_PRESETS = {
    "test": DiTConfig(image_size=16, patch_size=2, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_ratio=2.0,
                      num_classes=4, class_dropout=0.25),
    "default": DiTConfig(image_size=64, patch_size=2, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_ratio=4.0,
                         num_classes=10, class_dropout=0.1),
    "16k": DiTConfig(image_size=256, patch_size=2, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_ratio=4.0,
                     num_classes=10, class_dropout=0.1),
}


# -- embeddings ----------------------------------------------------------------------------------
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sincos(pos: Tensor, dim: int) -> Tensor:
    """[n] positions -> [n, dim]: sin of dim/2 frequencies 1/10000^(i/(dim/2)), then cos (MAE/DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=pos.dtype, device=pos.device) / (dim / 2))
    angles = pos[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(positions: Tensor, grid: int, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2-D sin-cos embedding [n, dim] of the patch tokens with *global* row-major indices
    `positions` on a grid x grid image: the first dim/2 channels encode the column, the rest the row."""
    work = _work_dtype(dtype)
    rows, cols = (positions // grid).to(work), (positions % grid).to(work)
    return torch.cat([_sincos(cols, dim // 2), _sincos(rows, dim // 2)], dim=1).to(dtype)


def timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal features [batch, dim] of t [batch] (cos then sin), in fp32 (fp64 for fp64)."""
    work = _work_dtype(t.dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=work, device=t.device) / half)
    args = t.to(work)[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map to each token's p*p*C pixels (both zero-init)."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


# -- the model -------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Class-conditional DiT over a sequence-parallel context (see module docstring)."""

    def __init__(self, cfg: DiTConfig, ctx: SeqParallel):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)   # = DiT's stride-p Conv2d on patchified pixels
        self.t_embedder = nn.Sequential(nn.Linear(FREQ_DIM, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: the null class
        self.layers = nn.ModuleList(DiTBlock(cfg.dim, cfg.n_heads, ctx, cfg.mlp_ratio, cfg.n_kv_heads)
                                    for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg.dim, cfg.patch_dim)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, zero biases, N(0, 0.02) timestep MLP and
        class embedding, and zero adaLN modulations and output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for module in [*(b.adaLN_modulation[1] for b in self.layers), self.final_layer.adaLN_modulation[1],
                       self.final_layer.linear]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- pixels <-> tokens (full images; shard the tokens afterwards) -----------------------
    def patchify(self, images: Tensor) -> Tensor:
        """[batch, C, H, W] -> [batch, (H/p)(W/p), p*p*C] in row-major patch order, (py, px, c) inside."""
        b, c, h, w = images.shape
        p = self.cfg.patch_size
        if c != self.cfg.channels or h % p or w % p:
            raise ValueError(f"images of shape {tuple(images.shape)} do not fit {self.cfg.channels} channels "
                             f"in {p}x{p} patches")
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: Tensor, image_size: int | None = None) -> Tensor:
        """Inverse of `patchify` for square images: [batch, N, p*p*C] -> [batch, C, H, W]."""
        p, c = self.cfg.patch_size, self.cfg.channels
        g = (image_size or self.cfg.image_size) // p
        if tokens.shape[1] != g * g:
            raise ValueError(f"{tokens.shape[1]} tokens are not a {g}x{g} patch grid (image_size {g * p})")
        x = tokens.reshape(tokens.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(tokens.shape[0], c, g * p, g * p)

    # -- forward on this rank's tokens -------------------------------------------------------
    def forward(self, tokens: Tensor, t: Tensor, class_ids: Tensor, grid: int | None = None) -> Tensor:
        """tokens [batch, N/P, p*p*C]: this rank's shard of the patchified (noisy) images; t [batch]
        in [0, 1]; class_ids [batch] (num_classes = the null class); grid: patches per side
        (default cfg.grid). Returns the predicted velocity of the same tokens, [batch, N/P, p*p*C]."""
        grid = grid or self.cfg.grid
        n = grid * grid
        if tokens.shape[1] * self.ctx.size != n:
            raise ValueError(f"{tokens.shape[1]} local tokens x {self.ctx.size} ranks != {n} patches "
                             f"({grid}x{grid}): pass ctx.shard(model.patchify(images), dim=1)")
        pos = self.ctx.positions(n, tokens.device)
        x = self.x_embedder(tokens) + sincos_2d(pos, grid, self.cfg.dim, self.x_embedder.weight.dtype)
        w = self.t_embedder[0].weight
        c = self.t_embedder(timestep_embedding(t * T_SCALE).to(w.dtype)) + self.y_embedder(class_ids)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, c, use_reentrant=False)
            else:
                x = layer(x, c)
        return self.final_layer(x, c)


# -- rectified flow ---------------------------------------------------------------------------------
_TRAIN_STREAM, _SAMPLE_STREAM = 0x7F10, 0x5A3F
_SPLITS = {"train": 0, "val": 1}


def noise_seed(seed: int, index: int, split: str = "train") -> tuple[int, int, int]:
    """The `generator_seed` of training step `index` or validation batch `index` (disjoint streams)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return (int(seed), _SPLITS[split], int(index))


def _row_seed(generator_seed: int | Sequence[int], row: int, stream: int = _TRAIN_STREAM) -> int:
    """A 63-bit seed for one batch row; the word count is hashed too, so (a, b) and (a, b, 0) differ
    (numpy's SeedSequence alone treats trailing zero words as absent)."""
    words = [generator_seed] if isinstance(generator_seed, (int, np.integer)) else list(generator_seed)
    if any(int(w) < 0 for w in words) or row < 0:
        raise ValueError(f"generator_seed words and rows must be >= 0, got {words} and row {row}")
    entropy = [stream, len(words), *(int(w) for w in words), int(row)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def flow_draws(generator_seed: int | Sequence[int], rows: range, shape: tuple[int, int, int],
               t_dist: str = "logit_normal") -> tuple[Tensor, Tensor, Tensor]:
    """(t [n], u [n], noise [n, C, H, W]) in fp32 for global batch rows `rows`: row i's values come
    from a CPU generator seeded by (generator_seed, i) alone, so they are the same on every rank and
    for any data-parallel split. t ~ sigmoid(N(0, 1)) (logit-normal, SD3) or U(0, 1); u ~ U(0, 1)
    decides class dropout (u < class_dropout)."""
    if t_dist not in ("logit_normal", "uniform"):
        raise ValueError(f"t_dist must be 'logit_normal' or 'uniform', got {t_dist!r}")
    ts, us, noises = [], [], []
    for row in rows:
        gen = torch.Generator().manual_seed(_row_seed(generator_seed, row))
        z = torch.randn(1, generator=gen)
        ts.append(torch.sigmoid(z) if t_dist == "logit_normal" else torch.rand(1, generator=gen))
        us.append(torch.rand(1, generator=gen))
        noises.append(torch.randn(shape, generator=gen))
    return torch.cat(ts), torch.cat(us), torch.stack(noises)


def _param(model: nn.Module) -> Tensor:
    return next(model.parameters())


def loss_terms(model: DiT, ctx: SeqParallel, images: Tensor, class_ids: Tensor,
               generator_seed: int | Sequence[int], row_offset: int = 0,
               t_dist: str = "logit_normal") -> tuple[Tensor, Tensor]:
    """Rectified-flow loss of this rank's tokens: (loss_sum, count) = the SUM of squared errors
    between predicted and target velocity (noise - x0) over this rank's token values (fp32, fp64
    for fp64 models) and the number of those values, for the trainer's global normalisation.

    images [batch, C, H, W] in [-1, 1] (full images, the same on every sequence-parallel rank),
    class_ids [batch]; generator_seed: non-negative int(s), e.g. `noise_seed(seed, step)` for a training
    step and `noise_seed(seed, i, "val")` for validation batch i; row_offset: the global batch index
    of row 0 (dp_rank * batch, `ImageLoader.row_offset`).
    In training mode rows whose class-dropout draw is below cfg.class_dropout get the null class.
    """
    p = _param(model)
    x0 = images.to(device=p.device, dtype=p.dtype)
    t, u, noise = flow_draws(generator_seed, range(row_offset, row_offset + len(x0)), tuple(x0.shape[1:]), t_dist)
    t, u, noise = t.to(device=p.device, dtype=p.dtype), u.to(p.device), noise.to(device=p.device, dtype=p.dtype)
    labels = class_ids.to(p.device).long()
    if model.training and model.cfg.class_dropout > 0:
        labels = torch.where(u < model.cfg.class_dropout, torch.full_like(labels, model.null_class), labels)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * noise
    tokens = ctx.shard(model.patchify(x_t), dim=1)
    target = ctx.shard(model.patchify(noise - x0), dim=1)
    pred = model(tokens, t, labels, grid=x0.shape[-1] // model.cfg.patch_size)
    work = _work_dtype(pred.dtype)
    err = (pred.to(work) - target.to(work)).pow(2)
    return err.sum(), torch.tensor(err.numel(), device=err.device)


def sampling_flops(cfg: DiTConfig, images: int, steps: int, guidance: float = 1.0) -> float:
    """FLOPs of `sample`: one forward of every image per Euler step (two with guidance != 1)."""
    return images * steps * (1 if guidance == 1.0 else 2) * cfg.num_tokens * cfg.forward_flops_per_token()


SampleProgress = Callable[[int, int], None]   # (forwards done, forwards in all)


def _sample_noise(n: int, cfg: DiTConfig, size: int, seed: int) -> Tensor:
    """[n, C, size, size] fp32 noise; row i from (seed, i) alone, whatever the batching."""
    gens = [torch.Generator().manual_seed(_row_seed(seed, i, _SAMPLE_STREAM)) for i in range(n)]
    return torch.stack([torch.randn((cfg.channels, size, size), generator=g) for g in gens])


def _euler(model: DiT, x: Tensor, labels: Tensor, times: list[float], grid: int, guidance: float,
           progress: Callable[[], None]) -> Tensor:
    """Integrate one batch of local tokens x [b, N/P, p*p*C] along `times` (Euler steps)."""
    p = _param(model)
    if guidance != 1.0:
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = torch.full((len(labels),), t_now, device=p.device, dtype=p.dtype)
        v = model(x if guidance == 1.0 else torch.cat([x, x]), t, labels, grid=grid)
        if guidance != 1.0:
            v_class, v_null = v.chunk(2)
            v = v_null + guidance * (v_class - v_null)
        x = x + (t_next - t_now) * v
        progress()
    return x


@torch.no_grad()
def sample(model: DiT, ctx: SeqParallel, class_ids: Tensor | Sequence[int], steps: int, seed: int,
           image_size: int | None = None, guidance: float = 1.0, batch_size: int = 0,
           progress: SampleProgress | None = None) -> Tensor:
    """Generate images by integrating dx/dt = v(x, t) from noise at t = 1 to t = 0 with `steps`
    Euler steps; guidance > 1 applies classifier-free guidance (v_null + g (v_class - v_null)).

    The images go through the model `batch_size` at a time (0: all at once; each forward is
    [batch_size, N/P, p*p*C] tokens, so the result does not depend on the batching); after every
    forward `progress(done, total)` is called with the forwards done and in all (ceil(n /
    batch_size) * steps). The noise of row i is drawn from (seed, i) on the full image, the same
    on every rank; each rank advances its own tokens and the full images are gathered with
    `ctx.unshard` at the end (collective). Returns [n, C, image_size, image_size] in [-1, 1]
    (the model's dtype), on every rank.
    """
    if steps < 1 or batch_size < 0:
        raise ValueError(f"need steps >= 1 and batch_size >= 0, got {steps} and {batch_size}")
    cfg, p = model.cfg, _param(model)
    size = image_size or cfg.image_size
    if size % cfg.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of patch_size {cfg.patch_size}")
    labels = torch.as_tensor(class_ids, dtype=torch.long, device=p.device).reshape(-1)
    n = len(labels)
    if n == 0:
        raise ValueError("sample needs at least one class id")
    batch_size = min(batch_size or n, n)
    noise = _sample_noise(n, cfg, size, seed)
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    total, done = math.ceil(n / batch_size) * steps, [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    out = []
    for lo in range(0, n, batch_size):
        x = ctx.shard(model.patchify(noise[lo:lo + batch_size].to(device=p.device, dtype=p.dtype)), dim=1)
        out.append(_euler(model, x, labels[lo:lo + batch_size], times, size // cfg.patch_size, guidance, tick))
    return model.unpatchify(ctx.unshard(torch.cat(out), dim=1), size).clamp(-1.0, 1.0)
