"""The kind registries: one entry per choice bench.space declares, each kind's packed form equal to its solo form."""

from __future__ import annotations

import pytest
import torch

from bench import space
from bench.data import load_image_folder, make_splits
from bench.losses import LOSSES, PackLoss, create_loss
from bench.models import build_model
from bench.optimizers import OPTIMIZERS, PackedOptimizer, create_optimizer, solo_optimizer
from bench.registry import registry
from bench.schedules import SCHEDULERS, build_schedule
from bench.space import BASELINE, TrainConfig
from bench.train import Member, fit_pack

CPU = torch.device("cpu")


def test_each_registry_has_exactly_the_choices_space_declares_in_its_order():
    assert tuple(OPTIMIZERS) == space.OPTIMIZERS
    assert tuple(LOSSES) == space.LOSSES
    assert tuple(SCHEDULERS) == space.SCHEDULERS
    assert all(name == kind.name for table in (OPTIMIZERS, LOSSES, SCHEDULERS) for name, kind in table.items())


def test_a_registry_refuses_a_missing_or_an_undeclared_kind():
    kinds = [LOSSES[name] for name in space.LOSSES]
    with pytest.raises(ValueError, match="does not match"):
        registry("loss kind", space.LOSSES, kinds[:-1])
    with pytest.raises(ValueError, match="does not match"):
        registry("loss kind", space.LOSSES[:-1], kinds)
    with pytest.raises(ValueError, match="does not match"):
        registry("loss kind", space.LOSSES, kinds + kinds[:1])


def test_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        PackedOptimizer([torch.nn.Parameter(torch.zeros(2))], [BASELINE.replace(optimizer="lion")], CPU)
    with pytest.raises(ValueError, match="unknown loss kind 'hinge'"):
        PackLoss([BASELINE.replace(loss="hinge")], CPU)
    with pytest.raises(ValueError, match="unknown scheduler kind 'cyclic'"):
        build_schedule(BASELINE.replace(scheduler="cyclic"), torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 4)


# --- optimizers ------------------------------------------------------------------------------------

TORCH_CLASS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}


def optimizer_variants(name: str) -> list[TrainConfig]:
    """Three members of one kind with different lr, weight decay, momentum and Nesterov (momentum 0: no Nesterov)."""
    base = BASELINE.replace(optimizer=name, lr=0.05 if name == "sgd" else 1e-3)
    return [base.replace(momentum=0.9, nesterov=True),
            base.replace(lr=base.lr * 3, weight_decay=1e-2, momentum=0.5),
            base.replace(lr=base.lr / 2, weight_decay=1e-4, momentum=0.0, nesterov=True)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_solo_form_is_torchs_optimizer_with_the_configs_settings(name):
    assert set(TORCH_CLASS) == set(OPTIMIZERS)
    kind = OPTIMIZERS[name]
    for cfg in optimizer_variants(name):
        opt = solo_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg)
        assert type(opt) is TORCH_CLASS[name]
        assert opt.defaults["lr"] == cfg.lr and opt.defaults["weight_decay"] == cfg.weight_decay
        if kind.momentum:
            assert opt.defaults["momentum"] == cfg.momentum
        if kind.nesterov:
            assert opt.defaults["nesterov"] == (cfg.nesterov and cfg.momentum > 0)


@pytest.mark.parametrize("members", [1, 3], ids=["solo", "pack-of-3"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_members_packed_update_is_torchs_solo_optimizer(name, members, pack_kernels):
    """Every kind: a pack of `members` of that kind (a pack of one: the shared-number path; three differing members:
    each as a pack of one on the CPU, or with fused kernels the per-member tensor path a GPU runs) steps each member
    as torch's optimizer steps it alone."""
    rows, steps = 3, 8
    for start in range(0, 3, members):  # the solo case runs each variant as its own pack of one
        cfgs = optimizer_variants(name)[start:start + members]
        k = len(cfgs)
        gen = torch.Generator().manual_seed(start)
        packed = torch.nn.Parameter(torch.randn(k * rows, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last))
        bias = torch.nn.Parameter(torch.randn(k * rows, generator=gen))
        solos = [[torch.nn.Parameter(p.detach()[i * rows:(i + 1) * rows].clone()) for p in (packed, bias)] for i in range(k)]
        ours = create_optimizer([packed, bias], cfgs, CPU)
        theirs = [solo_optimizer(ps, c) for c, ps in zip(cfgs, solos, strict=True)]
        for _ in range(steps):
            grads = [torch.randn(k * rows, 4, 3, 3, generator=gen), torch.randn(k * rows, generator=gen)]
            packed.grad, bias.grad = grads[0].clone(), grads[1].clone()
            ours.step()
            for i, (ps, opt) in enumerate(zip(solos, theirs, strict=True)):
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g[i * rows:(i + 1) * rows].clone()
                opt.step()
        for i, cfg in enumerate(cfgs):
            for p, solo in zip((packed, bias), solos[i], strict=True):
                assert torch.allclose(p.detach()[i * rows:(i + 1) * rows], solo.detach(), atol=1e-6), cfg


# --- losses ----------------------------------------------------------------------------------------


def loss_variants(name: str) -> list[TrainConfig]:
    """Three members of one loss kind with different values of its knobs."""
    return [BASELINE.replace(loss=name, label_smoothing=s, focal_gamma=g) for s, g in ((0.0, 2.0), (0.1, 0.5), (0.25, 4.0))]


def packed_and_solo(cfgs: list[TrainConfig], fused: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(len(cfgs))
    k, b, c = len(cfgs), 16, 10
    logits = (torch.randn(k, b, c, generator=gen) * 3).requires_grad_()
    target = torch.randint(0, c, (k, b), generator=gen)
    losses = create_loss(cfgs, CPU, fused=fused)(logits, target)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    solo_losses, solo_grads = [], []
    for i, cfg in enumerate(cfgs):
        x = logits.detach()[i].clone().requires_grad_()
        loss = LOSSES[cfg.loss].solo(x, target[i], cfg).mean()
        solo_losses.append(loss.detach())
        solo_grads.append(torch.autograd.grad(loss, x)[0])
    return losses.detach(), torch.stack(solo_losses), grad, torch.stack(solo_grads)


@pytest.mark.parametrize("fused", [False, True], ids=["per-member", "fused"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_each_members_packed_loss_and_gradient_are_the_solo_forms(name, fused, pack_kernels):
    cfgs = loss_variants(name)
    for members in ([cfgs[0]], cfgs):  # alone (the fused kernel where the kind has one), and members that differ
        losses, solo, grad, solo_grad = packed_and_solo(members, fused)
        assert torch.allclose(losses, solo, atol=1e-6), name
        assert torch.allclose(grad, solo_grad, atol=1e-6), name


def test_a_pack_mixing_every_loss_kind_gives_each_member_its_solo_loss(pack_kernels):
    cfgs = [c for name in LOSSES for c in loss_variants(name)[:2]]
    losses, solo, grad, solo_grad = packed_and_solo(cfgs, fused=True)
    assert torch.allclose(losses, solo, atol=1e-6) and torch.allclose(grad, solo_grad, atol=1e-6)


# --- schedules -------------------------------------------------------------------------------------

# each kind as torch's documentation drives it: (scheduler on an optimizer, steps per epoch), stepped per batch or
# per epoch (ReduceLROnPlateau with the epoch's validation accuracy)
TORCH_SCHEDULE = {
    "none": (None, False),
    "step": (lambda opt, cfg, n: torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.step_gamma), False),
    "cosine": (lambda opt, cfg, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs), False),
    "onecycle": (lambda opt, cfg, n: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * n,
                                                                         cycle_momentum=False), True),
    "plateau": (lambda opt, cfg, n: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1),
                False),
}


def torch_lrs(cfg: TrainConfig, steps_per_epoch: int, val_acc: list[float]) -> list[float]:
    """The lr of every training step of `cfg` under torch's own scheduler."""
    make, per_batch = TORCH_SCHEDULE[cfg.scheduler]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = make(opt, cfg, steps_per_epoch) if make else None
    lrs = []
    for epoch in range(cfg.epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None and per_batch:
                sched.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_acc[epoch])
        elif sched is not None and not per_batch:
            sched.step()
    return lrs


def test_every_scheduler_kind_in_one_pack_follows_torchs_own_sequence(rgb_folder, cache_dir, monkeypatch):
    """One member per kind trains in one pack; the lr each member's update used at every step is the one torch's
    scheduler gives it (per batch for OneCycle, per epoch for the others, the plateau from the member's own
    validation accuracy)."""
    assert set(TORCH_SCHEDULE) == set(SCHEDULERS)
    assert {name for name, kind in SCHEDULERS.items() if kind.per_batch} == {n for n, (_, b) in TORCH_SCHEDULE.items() if b}
    splits = make_splits(load_image_folder(rgb_folder, cache_dir=cache_dir), val_split=0.25, seed=0)
    base = BASELINE.replace(epochs=4, batch_size=8, lr=0.01, step_size=1)
    cfgs = [base.replace(scheduler=name, lr=1e-7 if name == "plateau" else base.lr) for name in SCHEDULERS]
    used, real_step = [], PackedOptimizer.step

    def recording_step(self, closure=None):
        used.append(list(self.lrs))
        return real_step(self, closure)

    monkeypatch.setattr(PackedOptimizer, "step", recording_step)
    members = []
    for seed, cfg in enumerate(cfgs):
        torch.manual_seed(seed)
        ds = splits.dataset
        members.append(Member(build_model(cfg, ds.channels, ds.image_size, len(ds.classes)), cfg, seed))
    fit_pack(members, splits, device=CPU, precision="fp32", progress=False)
    steps_per_epoch = len(used) // base.epochs
    assert steps_per_epoch > 1 and len(used) == base.epochs * steps_per_epoch
    for k, (cfg, m) in enumerate(zip(cfgs, members, strict=True)):
        mine = [row[k] for row in used]
        assert mine == pytest.approx(torch_lrs(cfg, steps_per_epoch, m.result.val_acc), rel=1e-6), cfg.scheduler
        assert (len(set(mine)) > 1) == (cfg.scheduler != "none"), cfg.scheduler  # every kind but none changes the lr
