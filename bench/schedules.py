"""The learning-rate schedule kinds, each torch's own scheduler, and how a pack member drives its own.

A member's schedule is torch's scheduler on a stand-in optimizer (`member_schedule`); the pack copies the stand-in's
lr into its per-member lrs (bench.train), so every member follows torch's sequence exactly, whatever shares its pack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler

from bench import space
from bench.registry import lookup, registry
from bench.space import TrainConfig

Scheduler = lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau
PLATEAU_FACTOR = 0.3
PLATEAU_PATIENCE = 1


@dataclass(frozen=True)
class SchedulerKind:
    """`build(cfg, optimizer, steps_per_epoch)`: torch's scheduler (None: a constant lr). `per_batch`: stepped after
    every batch rather than after every epoch."""

    name: str
    build: Callable[[TrainConfig, torch.optim.Optimizer, int], Scheduler | None]
    per_batch: bool = False


def _step(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    # stepped once per epoch, as the assignment's StepLR(opt, step_size, gamma)
    return lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma)


def _onecycle(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    # cycle_momentum=False: the searched momentum (or Adam's beta1) stays as suggested; torch's default would
    # cycle it between 0.85 and 0.95 and silently override e.g. an SGD momentum of 0.5
    return lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                   cycle_momentum=False)


SCHEDULERS: dict[str, SchedulerKind] = registry("scheduler kind", space.SCHEDULERS, [
    SchedulerKind("none", lambda cfg, optimizer, steps: None),
    SchedulerKind("step", _step),
    SchedulerKind("cosine", lambda cfg, optimizer, steps: lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)),
    SchedulerKind("onecycle", _onecycle, per_batch=True),
    SchedulerKind("plateau", lambda cfg, optimizer, steps: lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)),
])


def scheduler_kind(name: str) -> SchedulerKind:
    return lookup(SCHEDULERS, "scheduler kind", name)


@dataclass
class Schedule:
    scheduler: Scheduler | None
    per_batch: bool = False

    def after_batch(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self, val_acc: float) -> None:
        if self.scheduler is None or self.per_batch:
            return
        if isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_acc)
        else:
            self.scheduler.step()


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    kind = scheduler_kind(cfg.scheduler)
    return Schedule(kind.build(cfg, optimizer, steps_per_epoch), per_batch=kind.per_batch)


def member_schedule(cfg: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Schedule]:
    """torch's own scheduler for one member, driving a stand-in optimizer whose lr the pack copies each step."""
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr, momentum=cfg.momentum)
    schedule = build_schedule(cfg, stand_in, steps_per_epoch)
    stand_in.step()  # no gradient, no change; torch warns when a scheduler steps before its optimizer did
    return stand_in, schedule
