"""Packed models: K same-shape networks trained as one, each member with its own weights.

As HFTA (Wang et al., MLSys 2021) fuses same-shape training jobs: a convolution becomes one
grouped convolution (groups=K) over the members' stacked channels, BatchNorm runs over K x C
channels (each member's own statistics), a linear layer is one batched matmul, and dropout
draws each member's mask from that member's own generator. Every packed tensor is
member-major (`t.view(K, -1)[k]` is member k's), which the vectorised optimizer, per-member
gradient clipping and compaction (a member leaving) all rely on.

Member k of `pack_models(models)` starts from `models[k]`'s weights, so a member starts exactly
as the solo trial with that seed; `unpack_member(packed, k, model)` copies its weights back out.
A pack of one is the solo trial: bench.train has one training loop. On CPU the convolutions and matmuls run member by
member on the same packed tensors (bench.hardware.pack_runs_per_member), so a member's numbers are its solo run's, bit
for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.hardware import pack_runs_per_member
from bench.models import ConvNet, ResidualBlock, feature_dropout, head_dropout
from bench.space import SHAPE_FIELDS, TrainConfig


def shape_signature(cfg: TrainConfig) -> tuple:
    """The values of the shape fields bench.space declares: only trials that agree on all of them share a pack."""
    return tuple(getattr(cfg, name) for name in SHAPE_FIELDS)


class PackedConv2d(nn.Module):
    """K Conv2d(c_in, c_out) as one grouped convolution over [B, K*c_in, H, W] (on CPU: K convolutions)."""

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        self.out_per_member, self.padding = first.out_channels, first.padding
        self.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]))
        self.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members = self.weight.shape[0] // self.out_per_member
        if members == 1 or not pack_runs_per_member(x.device):
            return F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=members)
        c_in, c_out = x.shape[1] // members, self.out_per_member
        outs = [F.conv2d(x.narrow(1, k * c_in, c_in),
                         self.weight.narrow(0, k * c_out, c_out), self.bias.narrow(0, k * c_out, c_out),
                         padding=self.padding) for k in range(members)]
        return torch.cat(outs, 1)


def packed_batch_norm(norms: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    """BatchNorm over K*C channels: per-channel statistics are exactly each member's own."""
    first = norms[0]
    # in the members' dtype and device, as every other packed layer (which concatenates their tensors): a float64 pack
    # would otherwise get a float32 BatchNorm and fail on mixed dtypes
    bn = nn.BatchNorm2d(sum(n.num_features for n in norms), eps=first.eps, momentum=first.momentum,
                        device=first.running_mean.device, dtype=first.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(torch.cat([getattr(n, name) for n in norms]))
        bn.num_batches_tracked.copy_(norms[0].num_batches_tracked)
    return bn


class PackedResidual(nn.Module):
    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class PackedFlatten(nn.Module):
    """[B, K*C, H, W] -> [K, B, C*H*W]: each member's features in its solo flatten order."""

    def __init__(self, channels_per_member: int):
        super().__init__()
        self.channels = channels_per_member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, kc, h, w = x.shape
        return x.reshape(b, kc // self.channels, self.channels * h * w).transpose(0, 1)


class PackedLinear(nn.Module):
    """K Linear(f_in, f_out) as one batched matmul over [K, B, f_in] (on CPU: K matmuls)."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([lin.weight.detach().t() for lin in linears]).contiguous())  # [K, in, out]
        self.bias = nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]))  # [K, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 or not pack_runs_per_member(x.device):
            return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # autocast picks the dtype
        return torch.cat([torch.baddbmm(self.bias[k:k + 1].unsqueeze(1), x[k:k + 1], self.weight[k:k + 1])
                          for k in range(x.shape[0])])


class PackedDropout(nn.Module):
    """Inverted dropout with a probability and a mask generator per member (p = 0: the member has none)."""

    def __init__(self, p: Sequence[float]):
        super().__init__()
        self.set_p(p)
        self.generators: list[torch.Generator] = []

    def set_p(self, p: Sequence[float]) -> None:
        self.p_list = list(p)
        device = self.keep.device if hasattr(self, "keep") else None  # stays on the weights' device when members change
        keep = 1 - torch.tensor(self.p_list, dtype=torch.float32, device=device)[:, None, None]
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.p_list):  # a Python check: no device sync per step
            return x
        keep = self.keep
        u = torch.stack([torch.rand(x.shape[1:], device=x.device, generator=g) for g in self.generators])
        return x * ((u < keep).to(x.dtype) / keep)


class PackedFeatureDropout(PackedDropout):
    """Dropout on conv features [B, K*C, H, W]: member k's mask covers its own [B, C, H, W] channels and comes from
    its own generator, drawn in the same shape as alone (so a member's masks do not depend on its pack)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.p_list):
            return x
        b, kc, h, w = x.shape
        k = len(self.p_list)
        keep = self.keep.view(1, k, 1, 1, 1)
        u = torch.stack([torch.rand((b, kc // k, h, w), device=x.device, generator=g) for g in self.generators], 1)
        return x * ((u < keep).to(x.dtype) / keep).view(b, kc, h, w)


class PackedConvNet(ConvNet):
    """ConvNet of packed layers: [B, K*C_in, H, W] -> logits [K, B, classes]."""

    @property
    def members(self) -> int:
        return next(m for m in self.modules() if isinstance(m, PackedLinear)).weight.shape[0]

    def set_dropout_generators(self, generators: Sequence[torch.Generator]) -> None:
        for m in self.modules():
            if isinstance(m, PackedDropout):
                m.generators = list(generators)


def _pack_module(mods: Sequence[nn.Module], dropout: Sequence[float], features: bool) -> nn.Module:
    first = mods[0]
    if isinstance(first, nn.Conv2d):
        return PackedConv2d(mods)  # type: ignore[arg-type]
    if isinstance(first, nn.BatchNorm2d):
        return packed_batch_norm(mods)  # type: ignore[arg-type]
    if isinstance(first, nn.Linear):
        return PackedLinear(mods)  # type: ignore[arg-type]
    if isinstance(first, ResidualBlock):
        return PackedResidual(_pack_sequential([m.body for m in mods], dropout, features))  # type: ignore[attr-defined]
    if isinstance(first, nn.Dropout):
        return PackedFeatureDropout(dropout) if features else PackedDropout(dropout)
    if isinstance(first, nn.Sequential):
        return _pack_sequential(mods, dropout, features)
    if isinstance(first, nn.ReLU | nn.MaxPool2d | nn.Identity):
        return first
    raise TypeError(f"no packed form of {type(first).__name__}")


def _pack_sequential(seqs: Sequence[nn.Module], dropout: Sequence[float], features: bool) -> nn.Sequential:
    lengths = {len(s) for s in seqs}  # type: ignore[arg-type]
    if len(lengths) != 1:
        raise ValueError("members of a pack must share their architecture (shape_signature)")
    return nn.Sequential(*(_pack_module(group, dropout, features) for group in zip(*seqs, strict=True)))


def _head_with_dropout(model: ConvNet) -> nn.Sequential:
    """The member's classifier with its dropout layers present even at p = 0, so every member has one head shape."""
    if any(isinstance(layer, nn.Dropout) for layer in model.classifier):
        return model.classifier
    layers: list[nn.Module] = [nn.Dropout(0.0)]
    for layer in model.classifier:
        layers.append(layer)
        if isinstance(layer, nn.ReLU):
            layers.append(nn.Dropout(0.0))
    return nn.Sequential(*layers)


def pack_models(models: Sequence[ConvNet], configs: Sequence[TrainConfig]) -> PackedConvNet:
    signatures = {shape_signature(c) for c in configs}
    if len(signatures) != 1:
        raise ValueError(f"a pack needs one shape signature, got {len(signatures)}")
    features = _pack_sequential([m.features[:-1] for m in models], [feature_dropout(c) for c in configs],
                                features=True)  # all but the Flatten
    last_conv = [m for m in models[0].features.modules() if isinstance(m, nn.Conv2d)][-1]
    features.append(PackedFlatten(last_conv.out_channels))
    heads = [_head_with_dropout(m) for m in models]
    return PackedConvNet(features, _pack_sequential(heads, [head_dropout(c) for c in configs], features=False))


def _weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What a layer learns or tracks: its parameters and, for BatchNorm, the running statistics."""
    tensors = list(module.parameters(recurse=False))
    if isinstance(module, nn.BatchNorm2d):
        tensors += [module.running_mean, module.running_var]
    return tensors


def _paired_modules(packed: PackedConvNet, model: ConvNet) -> list[tuple[nn.Module, nn.Module]]:
    """(packed, solo) layers that hold weights, in the same order on both sides."""
    packed_side = [m for m in packed.modules() if isinstance(m, PackedConv2d | PackedLinear | nn.BatchNorm2d)]
    solo_side = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d)]
    if len(packed_side) != len(solo_side):
        raise ValueError("the solo model does not match the pack's architecture")
    return list(zip(packed_side, solo_side, strict=True))


def member_slice(t: torch.Tensor, members: int, k: int) -> torch.Tensor:
    """Member k's rows of a member-major tensor (a view; works for channels-last weights too)."""
    rows = t.shape[0] // members
    return t.narrow(0, k * rows, rows)


def _is_linear_weight(module: nn.Module, t: torch.Tensor) -> bool:
    return isinstance(module, PackedLinear) and t.dim() == 3  # stored [K, in, out], solo [out, in]


@torch.no_grad()
def unpack_member(packed: PackedConvNet, k: int, model: ConvNet) -> ConvNet:
    """Copy member k's weights (and BatchNorm statistics) into `model`, a solo network of its config."""
    members = packed.members
    for pm, sm in _paired_modules(packed, model):
        for pt, st in zip(_weight_tensors(pm), _weight_tensors(sm), strict=True):
            part = member_slice(pt, members, k)
            st.copy_(part.squeeze(0).t() if _is_linear_weight(pm, pt) else part.reshape(st.shape))
    return model


def compact_tensor(t: torch.Tensor, members: int, keep: Sequence[int]) -> torch.Tensor:
    """Member rows `keep` of a member-major tensor, keeping its memory format (channels-last conv weights)."""
    rows = t.shape[0] // members
    index = (torch.tensor(list(keep), device=t.device)[:, None] * rows + torch.arange(rows, device=t.device)).flatten()
    out = t.index_select(0, index)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@torch.no_grad()
def compact(packed: PackedConvNet, keep: Sequence[int]) -> dict[nn.Parameter, nn.Parameter]:
    """Keep only members `keep` (in that order); returns old -> new parameters for the optimizer."""
    members = packed.members
    swapped = {}
    for module in packed.modules():
        if isinstance(module, PackedDropout):
            module.set_p([module.p_list[i] for i in keep])
            module.generators = [module.generators[i] for i in keep] if module.generators else []
        for name, param in list(module.named_parameters(recurse=False)):
            new = nn.Parameter(compact_tensor(param.data, members, keep))
            setattr(module, name, new)
            swapped[param] = new
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean = compact_tensor(module.running_mean, members, keep)
            module.running_var = compact_tensor(module.running_var, members, keep)
            module.num_features = module.running_mean.shape[0]
    return swapped


@torch.no_grad()
def grow(packed: PackedConvNet, joining: PackedConvNet) -> dict[nn.Parameter, nn.Parameter]:
    """Append the members of `joining` (a pack of the same shape signature, on the same device) after the members of
    `packed`: compaction's inverse, so a slot freed in a pack is refilled without rebuilding it. Returns old -> new
    parameters for the optimizer (bench.optimizers.PackedOptimizer.grow)."""
    swapped = {}
    for module, other in zip(packed.modules(), joining.modules(), strict=True):
        if type(module) is not type(other):
            raise ValueError("the joining members do not share the pack's architecture (shape_signature)")
        if isinstance(module, PackedDropout):
            module.set_p(module.p_list + other.p_list)
            module.generators = module.generators + other.generators
        for name, param in list(module.named_parameters(recurse=False)):
            joined = torch.cat([param.data, getattr(other, name).data])
            if param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last):
                joined = joined.contiguous(memory_format=torch.channels_last)
            new = nn.Parameter(joined)
            setattr(module, name, new)
            swapped[param] = new
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean = torch.cat([module.running_mean, other.running_mean])
            module.running_var = torch.cat([module.running_var, other.running_var])
            module.num_features = module.running_mean.shape[0]
    return swapped
