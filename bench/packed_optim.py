"""Vectorised optimizer updates for packed models: every member keeps its own optimizer and settings.

torch's optimizers take one lr, weight decay and momentum per parameter group, and a packed
parameter holds K members, so the updates are written here with per-member [K] tensors broadcast
over the member-major parameters. The arithmetic is torch's (Adam, AdamW, SGD with momentum and
Nesterov, RMSprop with momentum), checked step by step against torch.optim in tests/test_packed.py.
Adam and AdamW share one update (AdamW decays the weights instead of the gradient), so a pack with
mixed optimizers runs at most three update families and picks each member's with a mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from bench.packed import compact_tensor
from bench.space import TrainConfig

ADAM_BETAS = (0.9, 0.999)  # torch's defaults, as the solo trials always used
ADAM_EPS = 1e-8
RMSPROP_ALPHA = 0.99
RMSPROP_EPS = 1e-8
FAMILIES = {"adam": "adam", "adamw": "adam", "sgd": "sgd", "rmsprop": "rmsprop"}


class PackedOptimizer(torch.optim.Optimizer):
    """One optimizer for K members; hyperparameters are [K] tensors (lr is set by each member's schedule)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], configs: Sequence[TrainConfig], device: torch.device):
        super().__init__(list(params), {})
        unknown = {c.optimizer for c in configs} - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown optimizer {sorted(unknown)}")
        self.device = device
        self.configs = list(configs)
        # Adam's bias correction counts each member's own steps: a member that joined later (backfill) is at its own
        # step t. `steps` on the host decides the path; `steps_tensor` is counted on the device, so no step syncs.
        self.steps = [0] * len(self.configs)
        self._build()

    def _build(self) -> None:
        cfgs = self.configs
        t = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        self.wds = [c.weight_decay for c in cfgs]
        self.moms = [c.momentum if c.optimizer in ("sgd", "rmsprop") else 0.0 for c in cfgs]
        self.weight_decay, self.momentum = t(self.wds), t(self.moms)
        self.shared = {"weight_decay": _shared(self.wds), "momentum": _shared(self.moms)}
        self.nesterov = torch.tensor([c.optimizer == "sgd" and c.nesterov and c.momentum > 0 for c in cfgs], device=self.device)
        self.decoupled = torch.tensor([c.optimizer == "adamw" for c in cfgs], device=self.device)
        families = [FAMILIES[c.optimizer] for c in cfgs]
        self.families = {f: torch.tensor([x == f for x in families], device=self.device) for f in dict.fromkeys(families)}
        # Python-side facts, so the update skips terms no member uses and never reads a tensor back (no device sync)
        self.any_decay = any(c.weight_decay for c in cfgs)
        self.any_nesterov = any(c.optimizer == "sgd" and c.nesterov and c.momentum > 0 for c in cfgs)
        self.all_decoupled = all(c.optimizer == "adamw" for c in cfgs)
        self.any_decoupled = any(c.optimizer == "adamw" for c in cfgs)
        self.steps_tensor = torch.tensor(self.steps, dtype=torch.float32, device=self.device)
        self.set_lr([c.lr for c in cfgs])

    @property
    def members(self) -> int:
        return len(self.configs)

    def set_lr(self, lrs: Sequence[float], on_device: torch.Tensor | None = None) -> None:
        """Each member's lr. `on_device`: the same values already on the device (a row of the epoch's lr table), so a
        per-batch schedule costs no host-to-device copy per step."""
        self.lrs = list(lrs)
        self.shared["lr"] = _shared(self.lrs)
        if self.shared["lr"] is None:
            self.lr = on_device if on_device is not None else torch.tensor(self.lrs, dtype=torch.float32, device=self.device)

    def _hp(self, name: str, shape: tuple[int, ...]) -> float | torch.Tensor:
        """One hyperparameter: a Python number when every member shares it (a pack of one always does: then the
        update is torch's own in-place arithmetic), else the [K] tensor shaped to broadcast over the parameter."""
        value = self.shared[name]
        return getattr(self, name).view(shape) if value is None else value

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        self.steps = [t + 1 for t in self.steps]
        self.steps_tensor.add_(1)
        k = self.members
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape = (k,) + (1,) * p.dim()
                view = (k, p.shape[0] // k, *p.shape[1:])  # splits the outermost dim: valid for channels-last too
                pv, g = p.view(view), p.grad.view(view)
                hp = {"lr": self._hp("lr", shape), "wd": self._hp("weight_decay", shape), "mom": self._hp("momentum", shape)}
                state = self.state[p]
                if len(self.families) == 1:  # the usual pack: one family, updated in place
                    family = next(iter(self.families))
                    getattr(self, f"_{family}")(pv, g, state, shape, hp, pv)
                    continue
                delta = None
                for family, mask in self.families.items():
                    d = torch.zeros_like(pv)
                    getattr(self, f"_{family}")(pv, g, state, shape, hp, d)
                    delta = d if delta is None else torch.where(mask.view(shape), d, delta)
                pv.add_(delta)

    @staticmethod
    def _apply(out: torch.Tensor, update: torch.Tensor, coef: float | torch.Tensor) -> None:
        """out += coef * update (coef a number or a per-member tensor)."""
        if isinstance(coef, float):
            out.add_(update, alpha=coef)
        else:
            out.addcmul_(update, coef)

    def _with_l2(self, p: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor) -> torch.Tensor:
        if not self.any_decay:
            return g
        return g.add(p, alpha=wd) if isinstance(wd, float) else g + wd * p

    def _adam(self, p: torch.Tensor, g: torch.Tensor, state: dict, shape: tuple[int, ...], hp: dict,
              out: torch.Tensor) -> None:
        """Adam (L2 in the gradient) and AdamW (decoupled decay); `out` is the parameter itself or a delta buffer."""
        b1, b2 = ADAM_BETAS
        lr, wd = hp["lr"], hp["wd"]
        if self.any_decay and not self.all_decoupled:
            l2 = wd if not self.any_decoupled else torch.where(self.decoupled.view(shape), 0.0, self.weight_decay.view(shape))
            g = self._with_l2(p, g, l2)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if len(set(self.steps)) == 1:  # every member at the same step (no member joined later): Python numbers
            t = self.steps[0]
            bias1: float | torch.Tensor = 1 - b1**t
            denom = v.sqrt().div_((1 - b2**t) ** 0.5).add_(ADAM_EPS)
        else:  # a member joined later (backfill): its own step count, corrections computed on the device
            t_k = self.steps_tensor.view(shape)
            bias1 = 1 - b1**t_k
            denom = v.sqrt().div_((1 - b2**t_k).sqrt()).add_(ADAM_EPS)
        if self.any_decoupled and self.any_decay:  # AdamW: p <- p - lr * wd * p, before the Adam step (torch's order)
            decay = lr * wd if self.all_decoupled else torch.where(self.decoupled.view(shape), lr * wd, 0.0)
            self._apply(out, p, -decay)
        if isinstance(lr, float) and isinstance(bias1, float):
            out.addcdiv_(m, denom, value=-lr / bias1)
        else:
            out.addcmul_(m / denom, lr / bias1, value=-1.0)

    def _sgd(self, p: torch.Tensor, g: torch.Tensor, state: dict, shape: tuple[int, ...], hp: dict,
             out: torch.Tensor) -> None:
        lr, mom = hp["lr"], hp["mom"]
        g = self._with_l2(p, g, hp["wd"])
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = g.clone()  # torch starts the buffer at the first gradient
        else:
            state["momentum_buffer"].mul_(mom).add_(g)
        buf = state["momentum_buffer"]  # momentum 0: buf == g
        if self.any_nesterov:
            buf = torch.where(self.nesterov.view(shape), g + mom * buf, buf)
        self._apply(out, buf, -lr)

    def _rmsprop(self, p: torch.Tensor, g: torch.Tensor, state: dict, shape: tuple[int, ...], hp: dict,
                 out: torch.Tensor) -> None:
        lr, mom = hp["lr"], hp["mom"]
        g = self._with_l2(p, g, hp["wd"])
        if "square_avg" not in state:
            state["square_avg"], state["rms_buffer"] = torch.zeros_like(p), torch.zeros_like(p)
        sq = state["square_avg"].mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
        buf = state["rms_buffer"].mul_(mom).addcdiv_(g, sq.sqrt().add_(RMSPROP_EPS))  # momentum 0: g / avg
        self._apply(out, buf, -lr)

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
        lrs = [self.lrs[i] for i in keep]
        self.configs = [self.configs[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]
        self._build()
        self.set_lr(lrs)

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
        lrs = self.lrs + [c.lr for c in configs]
        self.configs += list(configs)
        self.steps += [0] * new
        self._build()
        self.set_lr(lrs)
        assert self.members == k + new


def _shared(values: Sequence[float]) -> float | None:
    """The value every member shares, or None when they differ (decided when the values are set, not per step)."""
    return float(values[0]) if len(set(values)) == 1 else None


@torch.no_grad()
def clip_grad_norm_per_member(params: Iterable[torch.nn.Parameter], max_norm: torch.Tensor, members: int) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for each member on its own; max_norm [K], 0 = no clipping. Returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros(members, device=max_norm.device)
    for g in grads:
        view = g.view(members, g.shape[0] // members, *g.shape[1:])
        squares += view.float().square().sum(dim=tuple(range(1, view.dim())))
    norms = squares.sqrt()
    coef = torch.where(max_norm > 0, (max_norm / (norms + 1e-6)).clamp(max=1.0), 1.0)
    for g in grads:
        shape = (members,) + (1,) * g.dim()
        g.view(members, g.shape[0] // members, *g.shape[1:]).mul_(coef.view(shape).to(g.dtype))
    return norms
