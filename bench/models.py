"""Model factory: the assignment's TinyCNN and its improvement-matrix variants.

`build_model(cfg, ...)` reads the architecture fields of a TrainConfig; with the
baseline settings it is exactly the SPEC's TinyCNN. `create_model(name, ...)` builds
a named preset (bench.space.PRESETS) - tests loop over that registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.space import CONV_LAYOUTS, TrainConfig, preset_config

if TYPE_CHECKING:
    from bench.data import Dataset

BASE_CHANNELS = (32, 64, 128, 256, 256)
STAGES, ASSIGNMENT_BLOCK = CONV_LAYOUTS  # TinyCNN's conv-pool stages; the assignment's printed block


class ResidualBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut (ResNet basic block, no downsampling)."""

    def __init__(self, channels: int, batch_norm: bool):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batch_norm else nn.Identity
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), norm(), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), norm(),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _stage(c_in: int, c_out: int, cfg: TrainConfig, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
    if cfg.batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    if cfg.residual:
        layers.append(ResidualBlock(c_out, cfg.batch_norm))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _assignment_block(in_channels: int, cfg: TrainConfig) -> list[nn.Module]:
    """The block the assignment prints with its "improved" model (SPEC C10): Conv(in,32)-BN-ReLU, Conv(32,64)-BN-ReLU,
    MaxPool, Conv(64,128)-ReLU-Dropout(p), MaxPool. BatchNorm and the dropout follow `cfg` (the cell with both is the
    printed block); `width` scales the channels as for the stages."""
    c1, c2, c3 = (max(8, round(base * cfg.width)) for base in BASE_CHANNELS[:3])
    norm = (lambda c: [nn.BatchNorm2d(c)]) if cfg.batch_norm else (lambda c: [])
    return [
        nn.Conv2d(in_channels, c1, 3, padding=1), *norm(c1), nn.ReLU(inplace=True),
        nn.Conv2d(c1, c2, 3, padding=1), *norm(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(feature_dropout(cfg)), nn.MaxPool2d(2),
    ]


def feature_dropout(cfg: TrainConfig) -> float:
    """Dropout inside the conv features: the assignment's block has it after its third conv."""
    return cfg.dropout if cfg.conv_layout == ASSIGNMENT_BLOCK else 0.0


def head_dropout(cfg: TrainConfig) -> float:
    """Dropout in the classifier: the stages layout puts it there; the assignment's block has none in its head."""
    return 0.0 if cfg.conv_layout == ASSIGNMENT_BLOCK else cfg.dropout


def build_model(cfg: TrainConfig, in_channels: int, image_size: tuple[int, int], num_classes: int) -> ConvNet:
    if cfg.conv_layout == ASSIGNMENT_BLOCK:
        return _with_classifier(nn.Sequential(*_assignment_block(in_channels, cfg), nn.Flatten()), cfg, in_channels,
                                image_size, num_classes)
    if cfg.conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"unknown conv_layout {cfg.conv_layout!r}")
    blocks = 2 + cfg.extra_blocks
    if blocks > len(BASE_CHANNELS):
        raise ValueError(f"at most {len(BASE_CHANNELS) - 2} extra blocks are supported, got {cfg.extra_blocks}")
    stages, c_in = [], in_channels
    h, w = image_size
    for base in BASE_CHANNELS[:blocks]:
        c_out = max(8, round(base * cfg.width))
        pool = h >= 2 and w >= 2  # a 28 px input has room for 3 pools, not 5
        stages.append(_stage(c_in, c_out, cfg, pool))
        if pool:
            h, w = h // 2, w // 2
        c_in = c_out
    return _with_classifier(nn.Sequential(*stages, nn.Flatten()), cfg, in_channels, image_size, num_classes)


def _with_classifier(features: nn.Sequential, cfg: TrainConfig, in_channels: int, image_size: tuple[int, int],
                     num_classes: int) -> ConvNet:
    # classifier input computed from the real feature extractor, in eval mode: no dropout draw from the global RNG
    # (the classifier's initial weights come after) and no dummy batch in BatchNorm's running statistics
    with torch.no_grad():
        n_features = features.eval()(torch.zeros(1, in_channels, *image_size)).shape[1]
    features.train()
    p = head_dropout(cfg)
    head: list[nn.Module] = [nn.Dropout(p)] if p else []
    if cfg.hidden_units:
        head += [nn.Linear(n_features, cfg.hidden_units), nn.ReLU(inplace=True)]
        head += [nn.Dropout(p)] if p else []
        head.append(nn.Linear(cfg.hidden_units, num_classes))
    else:
        head.append(nn.Linear(n_features, num_classes))
    return ConvNet(features, nn.Sequential(*head))


def build_seeded_model(cfg: TrainConfig, seed: int, dataset: Dataset) -> ConvNet:
    """The model a trial with this seed starts from: torch's global RNG seeded, then built for the dataset.
    Every path draws initial weights this way, so a pack member starts exactly as the solo trial."""
    torch.manual_seed(seed)
    return build_model(cfg, dataset.channels, dataset.image_size, len(dataset.classes))


def create_model(name: str, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), num_classes: int = 10) -> ConvNet:
    return build_model(preset_config(name), in_channels, image_size, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
