"""The loss kinds: each one's per-member formula over a pack's [k, B, C] logits beside its solo torch form.

A member's loss is its kind's formula with its own value of the kind's knob (label smoothing, focal gamma), so
summing the members' losses gives every member exactly its own gradient. The solo forms are torch's (or written in
torch over [N, C] logits) and are what tests/test_registries.py checks each formula against; cross-entropy's is also
the kernel a pack whose members share one smoothing trains with (`PackLoss(fused=True)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bench import space
from bench.hardware import pack_runs_per_member
from bench.registry import lookup, registry
from bench.space import TrainConfig


class Scores(NamedTuple):
    """What every formula reads from [k, B, C] logits."""

    log_p: torch.Tensor  # [k, B, C] log-probabilities
    one_hot: torch.Tensor  # [k, B, C] targets
    true: torch.Tensor  # [k, B] log-probability of the true class


def scores(logits: torch.Tensor, target: torch.Tensor) -> Scores:
    log_p = F.log_softmax(logits, -1)
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    true = (log_p * one_hot).sum(-1)  # not gather, whose backward (scatter-add) is nondeterministic on CUDA
    return Scores(log_p, one_hot, true)


@dataclass(frozen=True)
class LossKind:
    """`knob(cfg)`: the member's value of the kind's own hyperparameter (0.0 when it has none). `packed(scores, h)`:
    each member's mean loss [k], with `h` the members' knob values [k]. `solo(logits, target, cfg)`: the per-sample
    loss [N] over [N, C] logits in torch. `fused`: the training loop may use `solo` (one torch kernel) for a pack
    whose members all have this kind and one knob value."""

    name: str
    knob: Callable[[TrainConfig], float]
    packed: Callable[[Scores, torch.Tensor], torch.Tensor]
    solo: Callable[[torch.Tensor, torch.Tensor, TrainConfig], torch.Tensor]
    fused: bool = False


def _ce(s: Scores, smoothing: torch.Tensor) -> torch.Tensor:
    """torch's label smoothing: (1 - e) * nll + e * mean over classes of -log p."""
    eps = smoothing[:, None]
    return ((1 - eps) * -s.true + eps * -s.log_p.mean(-1)).mean(-1)


def _focal(s: Scores, gamma: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2017: cross-entropy down-weighted by (1 - p_true)^gamma."""
    return (-(1 - s.true.exp()).pow(gamma[:, None]) * s.true).mean(-1)


def _mse(s: Scores, _: torch.Tensor) -> torch.Tensor:
    """MSE between softmax probabilities and one-hot targets (the assignment's 'MSE' level)."""
    return (s.log_p.exp() - s.one_hot).square().mean(dim=(-1, -2))


def _focal_solo(logits: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    nll = F.cross_entropy(logits, target, reduction="none")
    return (1 - torch.exp(-nll)).pow(cfg.focal_gamma) * nll


def _mse_solo(logits: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return F.mse_loss(logits.softmax(-1), one_hot, reduction="none").mean(-1)


LOSSES: dict[str, LossKind] = registry("loss kind", space.LOSSES, [
    LossKind("ce", lambda cfg: cfg.label_smoothing, _ce,
             lambda logits, target, cfg: F.cross_entropy(logits, target, reduction="none",
                                                          label_smoothing=cfg.label_smoothing),
             fused=True),
    LossKind("focal", lambda cfg: cfg.focal_gamma, _focal, _focal_solo),
    LossKind("mse", lambda cfg: 0.0, _mse, _mse_solo),
])


def loss_kind(name: str) -> LossKind:
    return lookup(LOSSES, "loss kind", name)


class PackLoss:
    """Each member's own loss; summing them gives every member exactly its own gradient. `fused`: a pack whose
    members share one kind with a fused torch form and one knob value (a pack of one always) uses that kernel;
    off for deterministic runs (cross_entropy's NLL kernel has no deterministic CUDA backward)."""

    def __init__(self, configs: Sequence[TrainConfig], device: torch.device, fused: bool = True):
        kinds = [loss_kind(c.loss) for c in configs]
        self.groups = {kind: torch.tensor([i for i, x in enumerate(kinds) if x is kind], device=device)
                       for kind in dict.fromkeys(kinds)}
        knobs = [kind.knob(c) for kind, c in zip(kinds, configs, strict=True)]
        self.knob = torch.tensor(knobs, device=device)
        first = kinds[0]
        one = fused and first.fused and len(self.groups) == 1 and len(set(knobs)) == 1
        self.fused_config = configs[0] if one else None
        # on CPU each member's loss is its pack-of-one loss, computed alone (bench.hardware.pack_runs_per_member)
        self.alone = ([PackLoss([c], device, fused) for c in configs]
                      if len(configs) > 1 and pack_runs_per_member(device) else None)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.alone is not None:
            return torch.cat([loss(logits[k:k + 1], target[k:k + 1]) for k, loss in enumerate(self.alone)])
        if self.fused_config is not None:  # one kind, one knob value (a pack of one always): torch's kernel
            kind = next(iter(self.groups))
            k, b, c = logits.shape
            per_sample = kind.solo(logits.reshape(k * b, c), target.reshape(-1), self.fused_config)
            return per_sample.view(k, b).mean(1)
        if len(self.groups) == 1:  # one kind: no gather
            return next(iter(self.groups)).packed(scores(logits, target), self.knob)
        losses = logits.new_zeros(logits.shape[0])
        for kind, idx in self.groups.items():  # each member only through its own kind: no NaN from the others
            losses = losses.index_put((idx,), kind.packed(scores(logits[idx], target[idx]), self.knob[idx]))
        return losses


def create_loss(configs: Sequence[TrainConfig], device: torch.device, *, fused: bool = True) -> PackLoss:
    """The loss of a pack of members with `configs` (a solo trial: a pack of one)."""
    return PackLoss(configs, device, fused=fused)
