"""Real images for the DiT: scikit-image's bundled sample photographs, a resumable crop loader,
and PNG grids.

`load_image(name, short_side)`: one `skimage.data` image as float32 RGB in [-1, 1] (gray
images repeated over 3 channels), resized once so its shorter side is `short_side` (cached
per process). `ImageLoader` draws random crops (and horizontal flips) whose image, offsets
and flips depend only on (seed, step), so its state is two integers and a resumed run sees
the same batches; data-parallel rank r takes rows [r*batch, (r+1)*batch) of each global
batch, like `data.SequenceLoader`. Class id = the image's index in `names`.

Validation (`image_loaders`): crops of held-out images (`VAL_IMAGES`, never trained on),
labelled with the null class (= number of training images), so the validation loss measures
unconditional denoising of unseen photographs (the null class is trained by class dropout).
"""
from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .io import atomic_write

__all__ = ["TRAIN_IMAGES", "VAL_IMAGES", "load_image", "ImageLoader", "image_loaders", "image_grid",
           "save_image_grid"]

#: photographs and micrographs bundled with scikit-image (no download), colour and gray
TRAIN_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                "retina", "camera", "moon", "grass")
VAL_IMAGES = ("gravel", "brick", "coins", "cell")


@lru_cache(maxsize=64)
def _load(name: str, short_side: int) -> np.ndarray:
    try:
        import skimage.data
        from skimage.transform import resize
    except ImportError as e:
        raise ImportError("the DiT image data needs scikit-image: pip install 'seqpar[dit]' "
                          "(or scikit-image)") from e

    fn = getattr(skimage.data, name, None)
    if fn is None or name.startswith("_") or not callable(fn):
        raise ValueError(f"{name!r} is not a scikit-image sample image (skimage.data)")
    img = np.asarray(fn())
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif img.dtype == bool:
        img = img.astype(np.float32)
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"skimage.data.{name} has shape {img.shape}: not a gray or RGB image")
    img = img[:, :, :3]
    h, w = img.shape[:2]
    factor = short_side / min(h, w)
    shape = (max(short_side, round(h * factor)), max(short_side, round(w * factor)))
    if shape != (h, w):
        img = resize(img, shape, order=1, anti_aliasing=factor < 1, preserve_range=True)
    out = np.ascontiguousarray(np.clip(img, 0.0, 1.0) * 2.0 - 1.0, dtype=np.float32).transpose(2, 0, 1)
    out.setflags(write=False)
    return out


def load_image(name: str, short_side: int) -> np.ndarray:
    """skimage.data.<name>() as a read-only float32 [3, H, W] array in [-1, 1] whose shorter side is
    `short_side` pixels (bilinear, anti-aliased when shrinking); cached per (name, short_side)."""
    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    return _load(name, int(short_side))


class ImageLoader:
    """Random crops [batch, 3, crop, crop] and class ids [batch] for one data-parallel rank;
    state = (seed, step). short_side (default 2 * crop, at least crop) is the size every image
    is resized to first; labels (default: the image index) are the class ids of `names`."""

    def __init__(self, crop: int, batch: int, *, names: Sequence[str] = TRAIN_IMAGES,
                 labels: Sequence[int] | None = None, dp: int = 1, dp_rank: int = 0, seed: int = 0,
                 short_side: int | None = None, flip: bool = True):
        if crop < 1 or batch < 1:
            raise ValueError(f"crop and batch must be >= 1, got crop={crop}, batch={batch}")
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp - 1}")
        if not names:
            raise ValueError("ImageLoader needs at least one image name")
        short_side = 2 * crop if short_side is None else short_side
        if short_side < crop:
            raise ValueError(f"short_side ({short_side}) must be >= crop ({crop})")
        self.labels = list(range(len(names))) if labels is None else [int(x) for x in labels]
        if len(self.labels) != len(names):
            raise ValueError(f"{len(self.labels)} labels for {len(names)} images")
        self.names, self.crop, self.batch, self.flip = tuple(names), crop, batch, flip
        self.dp, self.dp_rank, self.seed, self.step = dp, dp_rank, seed, 0
        self.images = [load_image(n, short_side) for n in self.names]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def row_offset(self) -> int:
        """Global batch index of this rank's first row (pass to `dit.loss_terms`)."""
        return self.dp_rank * self.batch

    def global_draws(self, step: int) -> dict[str, np.ndarray]:
        """Image index, crop offsets (y, x) and flip of all dp * batch rows of `step` (same on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        g = self.dp * self.batch
        image = rng.integers(0, len(self.images), size=g)
        uy, ux, uf = rng.random(g), rng.random(g), rng.random(g)
        hs = np.array([self.images[i].shape[1] for i in image])
        ws = np.array([self.images[i].shape[2] for i in image])
        return {"image": image, "y": (uy * (hs - self.crop + 1)).astype(np.int64),
                "x": (ux * (ws - self.crop + 1)).astype(np.int64), "flip": (uf < 0.5) & self.flip}

    def batch_at(self, step: int) -> tuple[Tensor, Tensor]:
        """This dp rank's rows of `step`: images float32 [batch, 3, crop, crop] in [-1, 1], class ids int64."""
        draws = self.global_draws(step)
        rows = range(self.row_offset, self.row_offset + self.batch)
        out = np.empty((self.batch, 3, self.crop, self.crop), dtype=np.float32)
        for j, r in enumerate(rows):
            y, x = draws["y"][r], draws["x"][r]
            patch = self.images[draws["image"][r]][:, y:y + self.crop, x:x + self.crop]
            out[j] = patch[:, :, ::-1] if draws["flip"][r] else patch
        labels = torch.tensor([self.labels[draws["image"][r]] for r in rows], dtype=torch.int64)
        return torch.from_numpy(out), labels

    def next(self) -> tuple[Tensor, Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def image_loaders(crop: int, batch: int, *, dp: int = 1, dp_rank: int = 0, seed: int = 0,
                  short_side: int | None = None, train_names: Sequence[str] = TRAIN_IMAGES,
                  val_names: Sequence[str] = VAL_IMAGES) -> tuple[ImageLoader, ImageLoader]:
    """(train, val) loaders: train crops of `train_names` (class id = index); val crops (no flips,
    seed + 1) of the held-out `val_names`, all labelled with the null class len(train_names).
    Validation batch i is `val.batch_at(i)`."""
    if set(train_names) & set(val_names):
        raise ValueError(f"validation images {sorted(set(train_names) & set(val_names))} are also training images")
    common = dict(dp=dp, dp_rank=dp_rank, short_side=short_side)
    train = ImageLoader(crop, batch, names=train_names, seed=seed, **common)
    val = ImageLoader(crop, batch, names=val_names, labels=[len(train_names)] * len(val_names), seed=seed + 1,
                      flip=False, **common)
    return train, val


# -- PNG grids ------------------------------------------------------------------------------------
def image_grid(images: Tensor | np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """[n, C, H, W] images in [-1, 1] (C = 1 or 3) -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3]
    array, tiles row-major on a white background."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images, np.float32)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or len(arr) == 0:
        raise ValueError(f"expected a non-empty [n, 1 or 3, H, W] batch, got shape {arr.shape}")
    n, c, h, w = arr.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    tiles = np.round((np.clip(np.nan_to_num(arr), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=1)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = tile.transpose(1, 2, 0)
    return grid


def save_image_grid(images: Tensor | np.ndarray, path: str | os.PathLike, ncols: int | None = None,
                    pad: int = 2) -> Path:
    """Write `image_grid(images, ncols, pad)` as a PNG (atomically); returns the path."""
    from PIL import Image  # matplotlib's own image dependency

    buf = io.BytesIO()
    Image.fromarray(image_grid(images, ncols, pad), mode="RGB").save(buf, format="PNG")
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path
