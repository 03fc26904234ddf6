"""The optimizer kinds, each torch's solo optimizer beside its vectorised update for packed models.

torch's optimizers take one lr, weight decay and momentum per parameter group, and a packed parameter holds K
members, so the packed updates are written here with per-member [K] tensors broadcast over the member-major
parameters. The arithmetic is torch's (Adam, AdamW, SGD with momentum and Nesterov, RMSprop with momentum), checked
step by step against each kind's solo torch optimizer in tests/test_registries.py and tests/test_packed.py. Adam
and AdamW share one update family (AdamW decays the weights instead of the gradient), so a pack with mixed
optimizers runs at most three update families and picks each member's with a mask. A solo trial is a pack of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bench import space
from bench.hardware import pack_runs_per_member
from bench.packed import compact_tensor
from bench.registry import lookup, registry
from bench.space import TrainConfig

ADAM_BETAS = (0.9, 0.999)  # torch's defaults, as the solo trials always used
ADAM_EPS = 1e-8
RMSPROP_ALPHA = 0.99
RMSPROP_EPS = 1e-8

Number = float | torch.Tensor  # a value every member shares, or a per-member tensor shaped to broadcast


class Hyper(NamedTuple):
    """One parameter's hyperparameters in an update: each a Python number when every member shares it (a pack of one
    always does: then the update is torch's own in-place arithmetic), else the [K] tensor shaped to broadcast."""

    lr: Number
    decay: Number
    momentum: Number


# an update family: (the members' hyperparameters and flags, member view of the parameter, of its gradient, state,
# broadcast shape, Hyper, out);
# `out` is the parameter itself (updated in place) or a zero delta buffer the family adds its update to
# A family creates its state entries on its first step and afterwards changes them in place only: a CPU pack hands
# each member views of the pack's state (PackedOptimizer.step), so a reassigned entry would be lost there.
Update = Callable[["Members", torch.Tensor, torch.Tensor, dict, tuple[int, ...], Hyper, torch.Tensor], None]


@dataclass(frozen=True)
class OptimizerKind:
    """`solo(params, cfg)`: torch's optimizer for one trial. `update`: the packed update family. `momentum`: the kind
    uses cfg.momentum. `nesterov`: it honours cfg.nesterov. `decoupled_decay`: weight decay acts on the weights
    (AdamW), not through the gradient (L2)."""

    name: str
    solo: Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]
    update: Update
    momentum: bool = False
    nesterov: bool = False
    decoupled_decay: bool = False

    def member_momentum(self, cfg: TrainConfig) -> float:
        return cfg.momentum if self.momentum else 0.0

    def member_nesterov(self, cfg: TrainConfig) -> bool:
        return self.nesterov and cfg.nesterov and cfg.momentum > 0


def _apply(out: torch.Tensor, update: torch.Tensor, coef: Number) -> None:
    """out += coef * update (coef a number or a per-member tensor)."""
    if isinstance(coef, float):
        out.add_(update, alpha=coef)
    else:
        out.addcmul_(update, coef)


def _with_l2(opt: Members, p: torch.Tensor, g: torch.Tensor, wd: Number) -> torch.Tensor:
    if not opt.any_decay:
        return g
    return g.add(p, alpha=wd) if isinstance(wd, float) else g + wd * p


def _adam(opt: Members, p: torch.Tensor, g: torch.Tensor, state: dict, shape: tuple[int, ...], hp: Hyper,
          out: torch.Tensor) -> None:
    """Adam (L2 in the gradient) and AdamW (decoupled decay)."""
    b1, b2 = ADAM_BETAS
    lr, wd = hp.lr, hp.decay
    if opt.any_decay and not opt.all_decoupled:
        l2 = wd if not opt.any_decoupled else torch.where(opt.decoupled.view(shape), 0.0, opt.decay.tensor.view(shape))
        g = _with_l2(opt, p, g, l2)
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if len(set(opt.steps)) == 1 and not opt.static:  # every member at the same step (none joined later): numbers
        t = opt.steps[0]
        bias1: Number = 1 - b1**t
        denom = v.sqrt().div_((1 - b2**t) ** 0.5).add_(ADAM_EPS)
    else:  # a member joined later (backfill): its own step count, corrections computed on the device
        t_k = opt.steps_tensor.view(shape)
        bias1 = 1 - b1**t_k
        denom = v.sqrt().div_((1 - b2**t_k).sqrt()).add_(ADAM_EPS)
    if opt.any_decoupled and opt.any_decay:  # AdamW: p <- p - lr * wd * p, before the Adam step (torch's order)
        decay = lr * wd if opt.all_decoupled else torch.where(opt.decoupled.view(shape), lr * wd, 0.0)
        _apply(out, p, -decay)
    if isinstance(lr, float) and isinstance(bias1, float):
        out.addcdiv_(m, denom, value=-lr / bias1)
    else:
        out.addcmul_(m / denom, lr / bias1, value=-1.0)


def _sgd(opt: Members, p: torch.Tensor, g: torch.Tensor, state: dict, shape: tuple[int, ...], hp: Hyper,
         out: torch.Tensor) -> None:
    lr, mom = hp.lr, hp.momentum
    g = _with_l2(opt, p, g, hp.decay)
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = g.clone()  # torch starts the buffer at the first gradient
    else:
        state["momentum_buffer"].mul_(mom).add_(g)
    buf = state["momentum_buffer"]  # momentum 0: buf == g
    if opt.any_nesterov:
        buf = torch.where(opt.nesterov.view(shape), g + mom * buf, buf)
    _apply(out, buf, -lr)


def _rmsprop(opt: Members, p: torch.Tensor, g: torch.Tensor, state: dict, shape: tuple[int, ...], hp: Hyper,
             out: torch.Tensor) -> None:
    lr, mom = hp.lr, hp.momentum
    g = _with_l2(opt, p, g, hp.decay)
    if "square_avg" not in state:
        state["square_avg"], state["rms_buffer"] = torch.zeros_like(p), torch.zeros_like(p)
    sq = state["square_avg"].mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
    buf = state["rms_buffer"].mul_(mom).addcdiv_(g, sq.sqrt().add_(RMSPROP_EPS))  # momentum 0: g / avg
    _apply(out, buf, -lr)


OPTIMIZERS: dict[str, OptimizerKind] = registry("optimizer kind", space.OPTIMIZERS, [
    OptimizerKind("adam", lambda params, cfg: torch.optim.Adam(
        params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay), _adam),
    OptimizerKind("adamw", lambda params, cfg: torch.optim.AdamW(
        params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay), _adam, decoupled_decay=True),
    OptimizerKind("sgd", lambda params, cfg: torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay), _sgd, momentum=True, nesterov=True),
    OptimizerKind("rmsprop", lambda params, cfg: torch.optim.RMSprop(
        params, lr=cfg.lr, alpha=RMSPROP_ALPHA, eps=RMSPROP_EPS, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        _rmsprop, momentum=True),
])


def optimizer_kind(name: str) -> OptimizerKind:
    return lookup(OPTIMIZERS, "optimizer kind", name)


def solo_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch's own optimizer for one trial: the reference the packed update reproduces."""
    return optimizer_kind(cfg.optimizer).solo(params, cfg)


@dataclass
class PerMember:
    """One hyperparameter across a pack's members: the Python value every member shares (None when they differ) and
    the [K] tensor (kept always, or only when they differ)."""

    values: list[float]
    shared: float | None
    tensor: torch.Tensor | None

    @classmethod
    def of(cls, values: Sequence[float], device: torch.device, on_device: torch.Tensor | None = None,
           always_tensor: bool = True) -> PerMember:
        shared = _shared(values)
        tensor = None
        if always_tensor or shared is None:
            tensor = on_device if on_device is not None else torch.tensor(values, dtype=torch.float32, device=device)
        return cls(list(values), shared, tensor)

    def at(self, shape: tuple[int, ...]) -> Number:
        return self.tensor.view(shape) if self.shared is None else self.shared


class Members:
    """A pack's members as an update family reads them: per-member hyperparameters, the Python-side facts that let an
    update skip terms no member uses (so it never reads a tensor back: no device sync), and each member's own step
    count (Adam's bias correction: a member that joined later, by backfill, is at its own step t; `steps` on the host
    decides the path, `steps_tensor` counts on the device).

    `static`: every quantity that changes between steps (the lrs, Adam's step count) is read from a device tensor
    that keeps its storage, never baked in as a Python number, so one captured CUDA graph of the step stays right
    for every later step (bench.train replays it)."""

    def __init__(self, configs: Sequence[TrainConfig], steps: Sequence[int], device: torch.device,
                 static: bool = False):
        kinds = [optimizer_kind(c.optimizer) for c in configs]
        flags = lambda values: torch.tensor(values, device=device)  # noqa: E731
        self.configs, self.steps, self.device = list(configs), list(steps), device
        self.decay = PerMember.of([c.weight_decay for c in configs], device)
        self.momentum = PerMember.of([kind.member_momentum(c) for kind, c in zip(kinds, configs, strict=True)], device)
        nesterov = [kind.member_nesterov(c) for kind, c in zip(kinds, configs, strict=True)]
        decoupled = [kind.decoupled_decay for kind in kinds]
        self.nesterov, self.decoupled = flags(nesterov), flags(decoupled)
        updates = [kind.update for kind in kinds]
        self.families = {u: flags([x is u for x in updates]) for u in dict.fromkeys(updates)}
        self.any_decay = any(c.weight_decay for c in configs)
        self.any_nesterov = any(nesterov)
        self.all_decoupled, self.any_decoupled = all(decoupled), any(decoupled)
        self.steps_tensor = torch.tensor(self.steps, dtype=torch.float32, device=device)
        self.static = static
        self.lr_buffer = torch.zeros(len(self.configs), dtype=torch.float32, device=device) if static else None
        self.set_lr([c.lr for c in configs])

    def set_lr(self, lrs: Sequence[float], on_device: torch.Tensor | None = None) -> None:
        if self.lr_buffer is None:
            self.lr = PerMember.of(lrs, self.device, on_device, always_tensor=False)
            return
        # copied into the one buffer a captured step reads (a row of the epoch's lr table: a device-to-device copy)
        self.lr_buffer.copy_(on_device if on_device is not None else torch.tensor(lrs, dtype=torch.float32))
        self.lr = PerMember(list(lrs), None, self.lr_buffer)

    def count_step(self) -> None:
        self.count_host_step()
        self.steps_tensor.add_(1)

    def count_host_step(self) -> None:
        """The host's count only: a replayed CUDA graph has already advanced `steps_tensor` on the device."""
        self.steps = [t + 1 for t in self.steps]

    def update(self, pv: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        """One step of parameter view `pv` [k, rows, ...] with gradient `g`, in place."""
        shape = (len(self.configs),) + (1,) * (pv.dim() - 1)
        hp = Hyper(self.lr.at(shape), self.decay.at(shape), self.momentum.at(shape))
        if len(self.families) == 1:  # the usual pack: one family, updated in place
            next(iter(self.families))(self, pv, g, state, shape, hp, pv)
            return
        delta = None
        for update, mask in self.families.items():
            d = torch.zeros_like(pv)
            update(self, pv, g, state, shape, hp, d)
            delta = d if delta is None else torch.where(mask.view(shape), d, delta)
        pv.add_(delta)


class PackedOptimizer(torch.optim.Optimizer):
    """One optimizer for K members; hyperparameters are per member (lr is set by each member's schedule). On CPU a pack
    updates each member as a pack of one, on its own slice (bench.hardware.pack_runs_per_member): the vectorised
    update with per-member tensors rounds differently from the same update with Python numbers (addcmul against
    add with alpha). `static` (Members): the update a captured CUDA graph replays (bench.train, on CUDA)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], configs: Sequence[TrainConfig], device: torch.device,
                 static: bool = False):
        super().__init__(list(params), {})
        for c in configs:
            optimizer_kind(c.optimizer)  # an unknown kind raises here, not at the first step
        self.device = device
        self.static = static
        self._build(configs, [0] * len(configs), [c.lr for c in configs])

    def _build(self, configs: Sequence[TrainConfig], steps: Sequence[int], lrs: Sequence[float]) -> None:
        self.pack = Members(configs, steps, self.device, static=self.static)
        alone = len(configs) > 1 and pack_runs_per_member(self.device)
        self.alone = [Members([c], [t], self.device) for c, t in zip(configs, steps, strict=True)] if alone else None
        self.set_lr(lrs)

    @property
    def configs(self) -> list[TrainConfig]:
        return self.pack.configs

    @property
    def steps(self) -> list[int]:
        return self.pack.steps

    @property
    def members(self) -> int:
        return len(self.pack.configs)

    @property
    def lrs(self) -> list[float]:
        return self.pack.lr.values

    def set_lr(self, lrs: Sequence[float], on_device: torch.Tensor | None = None) -> None:
        """Each member's lr. `on_device`: the same values already on the device (a row of the epoch's lr table), so a
        per-batch schedule costs no host-to-device copy per step."""
        self.pack.set_lr(lrs, on_device)
        for member, lr in zip(self.alone or (), lrs, strict=False):
            member.set_lr([lr])

    def count_host_step(self) -> None:
        """A replayed CUDA graph of the step ran: advance the host's step counts to match the device's."""
        for members in (self.pack, *(self.alone or ())):
            members.count_host_step()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for members in (self.pack, *(self.alone or ())):
            members.count_step()
        k = self.members
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                view = (k, p.shape[0] // k, *p.shape[1:])  # splits the outermost dim: valid for channels-last too
                pv, g, state = p.view(view), p.grad.view(view), self.state[p]
                if self.alone is None:
                    self.pack.update(pv, g, state)
                    continue
                mine = [{name: t.narrow(0, j, 1) for name, t in state.items()} for j in range(k)]
                for j, member in enumerate(self.alone):
                    member.update(pv.narrow(0, j, 1), g.narrow(0, j, 1), mine[j])
                # state a member created this step (its first, or the first of its kind in this pack) joins the pack's,
                # member-major; members of other kinds get zeros there, which they never read
                for name in {name for m in mine for name in m} - state.keys():
                    state[name] = torch.cat([m.get(name, torch.zeros_like(pv.narrow(0, j, 1))) for j, m in enumerate(mine)])

    def compact(self, keep: Sequence[int], swapped: dict[torch.nn.Parameter, torch.nn.Parameter]) -> None:
        """Keep members `keep`: parameters are the compacted model's, state rows follow (bench.packed.compact)."""
        k = self.members
        for group in self.param_groups:
            group["params"] = [swapped.get(p, p) for p in group["params"]]
        new_state = {}
        for old, new in swapped.items():  # state tensors are kept in the member view (K, rows, ...) of their parameter
            if old in self.state:
                rows = old.shape[0] // k
                new_state[new] = {name: compact_tensor(t.reshape(k * rows, *old.shape[1:]), k, keep).view(len(keep), rows, *old.shape[1:])
                                  for name, t in self.state[old].items()}
        self.state.clear()
        self.state.update(new_state)
        self._build([self.configs[i] for i in keep], [self.steps[i] for i in keep], [self.lrs[i] for i in keep])

    def grow(self, configs: Sequence[TrainConfig], swapped: dict[torch.nn.Parameter, torch.nn.Parameter]) -> None:
        """Members with `configs` joined at the end (bench.packed.grow): they start as a fresh torch optimizer would,
        with zero moments and their own step count at 0 (SGD's momentum buffer from zero gives torch's first step)."""
        k, new = self.members, len(configs)
        for group in self.param_groups:
            group["params"] = [swapped.get(p, p) for p in group["params"]]
        new_state = {}
        for old, grown in swapped.items():
            if old in self.state:
                new_state[grown] = {name: torch.cat([t, t.new_zeros((new, *t.shape[1:]))])
                                    for name, t in self.state[old].items()}
        self.state.clear()
        self.state.update(new_state)
        self._build(self.configs + list(configs), self.steps + [0] * new, self.lrs + [c.lr for c in configs])
        assert self.members == k + new


def create_optimizer(params: Iterable[torch.nn.Parameter], configs: Sequence[TrainConfig],
                     device: torch.device, static: bool = False) -> PackedOptimizer:
    """The optimizer of a pack of members with `configs` (a solo trial: a pack of one); `static` for a step that is
    captured as a CUDA graph and replayed."""
    return PackedOptimizer(params, configs, device, static)


def _shared(values: Sequence[float]) -> float | None:
    """The value every member shares, or None when they differ (decided when the values are set, not per step)."""
    return float(values[0]) if len(set(values)) == 1 else None


@torch.no_grad()
def clip_grad_norm_per_member(params: Iterable[torch.nn.Parameter], max_norm: torch.Tensor, members: int) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for each member on its own; max_norm [K], 0 = no clipping. Returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros(members, device=max_norm.device)
    alone = members > 1 and pack_runs_per_member(max_norm.device)  # each member's sum in its solo order
    for g in grads:
        view = g.view(members, g.shape[0] // members, *g.shape[1:])
        if alone:
            squares += torch.stack([view[k].float().square().sum() for k in range(members)])
        else:
            squares += view.float().square().sum(dim=tuple(range(1, view.dim())))
    norms = squares.sqrt()
    coef = torch.where(max_norm > 0, (max_norm / (norms + 1e-6)).clamp(max=1.0), 1.0)
    for g in grads:
        shape = (members,) + (1,) * g.dim()
        g.view(members, g.shape[0] // members, *g.shape[1:]).mul_(coef.view(shape).to(g.dtype))
    return norms
