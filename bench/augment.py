"""Per-batch augmentation on the training device, with per-sample random parameters.

Each op mirrors a torchvision per-image transform of the assignment (same parameter
meaning and ranges), applied to a whole `(N, C, H, W)` float batch at once.
Vectorised torch rather than kornia or torchvision.transforms.v2: v2 draws one set of
parameters per call (per batch, not per sample); kornia samples per sample but adds a
dependency and was slower on this stack. `python -m bench.perf --augment`, all seven ops,
batch 128 of 3x32x32, 2-core EPYC CPU, 50 repeats: this module 9.4 ms/batch, kornia 0.9
12.2 ms, v2 applied image by image 117 ms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.space import TrainConfig, build_space, is_active

_SPACE = {p.name: p for p in build_space()}


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation of one trial: each field is the TrainConfig knob of that name, at its off value (the default
    here) when the knob's switch (its `when` in bench.space) is off. The default is no augmentation."""

    crop_padding: int = 0  # 0 = off
    flip: bool = False
    jitter_strength: float = 0.0  # brightness = contrast = saturation strength; 0 = off
    rotation_degrees: float = 0.0
    affine_shear: float = 0.0
    affine_scale: float = 0.0  # scale drawn from [1 - scale, 1 + scale]
    grayscale_p: float = 0.0
    erasing_p: float = 0.0

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, dataset_padding: int = 4) -> AugmentConfig:
        """`cfg`'s knobs, each where its switch is on; a crop padding of 0 is the dataset's own (4 without one)."""
        cfg = cfg.replace(crop_padding=cfg.crop_padding or dataset_padding or 4)
        knobs = dataclasses.asdict(cfg)
        return cls(**{f.name: knobs[f.name] if is_active(_SPACE[f.name], knobs) else f.default
                      for f in dataclasses.fields(cls)})


def _uniform(n: int, low: float, high: float, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=g) * (high - low) + low


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding) with zero fill: an independent offset per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=g)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=g) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """ColorJitter(brightness=s, contrast=s, saturation=s) with factors drawn from [1-s, 1+s]."""
    n = x.shape[0]
    shape = (n, 1, 1, 1)
    brightness, contrast, saturation = (_uniform(n, max(0.0, 1 - strength), 1 + strength, x, g).view(shape) for _ in range(3))
    x = (x * brightness).clamp_(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp_(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * saturation + gray).clamp_(0, 1)
    return x


def random_affine(x: torch.Tensor, degrees: float, shear: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """RandomRotation(degrees) and RandomAffine(0, shear=shear, scale=(1-scale, 1+scale)) in one warp, zero fill."""
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, x, g) * (math.pi / 180)
    sh = _uniform(n, -shear, shear, x, g) * (math.pi / 180)
    s = _uniform(n, 1 - scale, 1 + scale, x, g)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(sh)
    # forward map = scale * rotation * x-shear; grid_sample needs its inverse (output -> input)
    a, b = cos, cos * tan - sin
    c, d = sin, sin * tan + cos
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / (det * s)[:, None, None]
    theta = torch.cat([inv, torch.zeros(n, 2, 1, device=x.device, dtype=inv.dtype)], 2).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    pick = torch.rand(x.shape[0], device=x.device, generator=g) < p
    return torch.where(pick[:, None, None, None], _gray(x).expand_as(x), x)


def random_erasing(x: torch.Tensor, p: float, g: torch.Generator,
                   scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """RandomErasing(p, scale, ratio, value=0) on normalised images: one rectangle per picked sample."""
    n, _, h, w = x.shape
    area = _uniform(n, *scale, x, g) * h * w
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), x, g)
    eh = torch.sqrt(area * torch.exp(log_r)).round().clamp(1, h)
    ew = torch.sqrt(area / torch.exp(log_r)).round().clamp(1, w)
    top = (torch.rand(n, device=x.device, generator=g) * (h - eh + 1)).floor()
    left = (torch.rand(n, device=x.device, generator=g) * (w - ew + 1)).floor()
    pick = torch.rand(n, device=x.device, generator=g) < p
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & pick[:, None, None]).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


class BatchAugment:
    """uint8 batch -> augmented, normalised float batch, all on the batch's device."""

    def __init__(self, cfg: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.cfg = cfg
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean) / self.std

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        x = images.float().div_(255)
        if cfg.crop_padding:
            x = random_crop(x, cfg.crop_padding, g)
        if cfg.flip:
            x = random_flip(x, 0.5, g)
        if cfg.rotation_degrees or cfg.affine_shear or cfg.affine_scale:
            x = random_affine(x, cfg.rotation_degrees, cfg.affine_shear, cfg.affine_scale, g)
        if cfg.jitter_strength:
            x = color_jitter(x, cfg.jitter_strength, g)
        if cfg.grayscale_p:
            x = random_grayscale(x, cfg.grayscale_p, g)
        x = (x - self.mean) / self.std
        if cfg.erasing_p:
            x = random_erasing(x, cfg.erasing_p, g)
        return x
