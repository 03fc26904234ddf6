"""A trial's life between the runner and the training loop: suggest -> build the model -> train (reporting each epoch,
so Optuna prunes) -> record what it measured and cost, and the state and value the runner tells Optuna.

`TrialTrainer` is what an Optuna objective does, split at the seams a packed runner needs: `member` (suggest and build),
`train` (any number of members at once), `conclude` (the outcome). bench.runner.run_packs drives it for every study,
solo (a pack of one) or packed."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from bench.data import Splits
from bench.hardware import hardware_name, is_out_of_memory, precision_name, resolve_device
from bench.models import build_seeded_model, count_parameters
from bench.packed import shape_signature
from bench.schema import Attr
from bench.space import Param, TrainConfig, config_from_params, suggest
from bench.train import Diverged, FitResult, Member, PackLog, Refill, fit_pack


@dataclass(frozen=True)
class TrialSettings:
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    grid_only: bool = False
    progress: bool = True
    compile_model: bool = False
    deterministic: bool = False
    test_each_epoch: bool = False  # test accuracy after every epoch, and per-epoch seconds (bench.record's tables)


ModelSink = Callable[[optuna.Trial, torch.nn.Module, TrainConfig, float], None]


class TrialTrainer:
    """Turns asked trials into trained members and their outcomes (bench.runner drives it)."""

    def __init__(self, splits: Splits, space: tuple[Param, ...], settings: TrialSettings,
                 on_model: ModelSink | None = None):
        self.splits = splits
        self.space = space
        self.settings = settings
        self.on_model = on_model
        self.device = resolve_device(settings.device)
        self.precision = precision_name(settings.precision, self.device)  # what every trial of this run trains in
        self.hardware = hardware_name(self.device)

    def member(self, trial: optuna.Trial, asked_seconds: float = 0.0) -> Member:
        """Suggest, then build the model exactly as a solo trial with this seed would (so packing changes nothing).
        `asked_seconds`: what study.ask took; with the suggestions' time it is the trial's sampler cost."""
        cfg = self.suggest_config(trial, asked_seconds)
        seed = int(trial.user_attrs.get(Attr.SEED, self.settings.seed + trial.number))
        ds = self.splits.dataset
        model = self.build_model(cfg, seed)
        for key, value in ((Attr.SEED, seed), (Attr.PARAM_COUNT, count_parameters(model)),
                           (Attr.DEVICE, str(self.device)),
                           (Attr.PRECISION, self.precision),
                           (Attr.WORKER, f"{socket.gethostname()}:{os.getpid()}"),
                           (Attr.HARDWARE, self.hardware), (Attr.TORCH, torch.__version__),
                           (Attr.TRAIN_IMAGES, len(self.splits.train)), (Attr.NUM_CLASSES, len(ds.classes))):
            trial.set_user_attr(key, value)
        return self.attach_reporting(trial, Member(model, cfg, seed, test_each_epoch=self.settings.test_each_epoch))

    def suggest_config(self, trial: optuna.Trial, asked_seconds: float = 0.0) -> TrainConfig:
        """The trial's config from the space, its sampler cost recorded (bench.compare charges it as wall time)."""
        started = time.perf_counter()
        params = suggest(trial, self.space, grid_only=self.settings.grid_only)
        trial.set_user_attr(Attr.SAMPLER_SECONDS, round(asked_seconds + time.perf_counter() - started, 6))
        return config_from_params(params)

    @staticmethod
    def attach_reporting(trial: optuna.Trial, member: Member) -> Member:
        """Each epoch: the curves onto the trial, the value to Optuna, and pruning (raised back into the loop)."""
        # The curves live in the member's result, not the trial: each epoch writes the whole curve of this attempt.

        def report_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
            trial.set_user_attr(Attr.LOSS_CURVE, list(member.result.train_loss))
            trial.set_user_attr(Attr.VAL_CURVE, list(member.result.val_acc))
            trial.report(val_acc, epoch)
            if trial.should_prune():
                member.result.stop_reason = "pruned"
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_acc={val_acc:.4f}")

        member.on_epoch = report_epoch
        return member

    def train(self, members: list[Member], *, capacity: int | None = None, refill: Refill | None = None,
              on_leave: Callable[[Member], None] | None = None) -> PackLog:
        """Train members as one pack of `capacity` slots (bench.train.fit_pack: refilled at epoch boundaries, each
        member handed to `on_leave` as it leaves). Interrupted: every member not yet finished is recorded as such,
        then re-raised; out of memory (also cuDNN's and cuBLAS's allocation failures) is raised as
        torch.OutOfMemoryError for the caller (a smaller pack, or `out_of_memory`); an error of the caller's own
        `refill` or `on_leave` is re-raised as it was (the runner's, not the pack's); any other error fails every
        member still training."""
        training = {id(m): m for m in members}

        def joined(free: int) -> list[Member]:
            try:
                new = list(refill(free)) if refill is not None else []
            except Exception as exc:
                raise _CallerError(exc) from exc
            training.update((id(m), m) for m in new)
            return new

        def left(member: Member) -> None:
            training.pop(id(member), None)  # a member that left is not held here (its model may be on the device)
            try:
                if on_leave is not None:
                    on_leave(member)
            except Exception as exc:
                raise _CallerError(exc) from exc

        message = None
        try:
            return fit_pack(members, self.splits, device=self.device, precision=self.settings.precision,
                            progress=self.settings.progress, compile_model=self.settings.compile_model,
                            deterministic=self.settings.deterministic, capacity=capacity,
                            refill=joined if refill is not None else None, on_leave=left)
        except KeyboardInterrupt:
            mark_interrupted(list(training.values()))
            raise
        except _CallerError as wrapped:
            raise wrapped.error from None
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # the pack itself failed (not one member's callback): every unfinished member fails
            if not is_out_of_memory(exc):
                _fail_unfinished(list(training.values()), exc)
                return PackLog(capacity or len(members))
            message = str(exc).splitlines()[0]
        raise torch.OutOfMemoryError(message)  # outside the handler: the failed pack's frames are not kept alive

    def build_model(self, cfg: TrainConfig, seed: int) -> torch.nn.Module:
        return build_seeded_model(cfg, seed, self.splits.dataset)

    def rebuild(self, member: Member) -> None:
        """Start a member again from its initial weights (after its pack ran out of memory)."""
        member.model = self.build_model(member.cfg, member.seed)
        member.result, member.error = FitResult(), None

    def out_of_memory(self, members: list[Member], message: str) -> None:
        _fail_unfinished(members, _OutOfMemory(message))

    def conclude(self, trial: optuna.Trial, member: Member) -> tuple[TrialState, float | None]:
        """Record what the member measured and cost; the state (and value) to tell Optuna."""
        result, error = member.result, member.error
        if isinstance(error, Diverged):
            self._record(trial, result, "diverged", str(error))
            return TrialState.PRUNED, None
        if isinstance(error, optuna.TrialPruned):
            self._record(trial, result, "pruned")
            return TrialState.PRUNED, None
        if error is not None:
            reason = str(error) if isinstance(error, _Interrupted | _OutOfMemory) else f"{type(error).__name__}: {error}"
            self._record(trial, result, "failed", reason)
            return TrialState.FAIL, None
        self._record(trial, result, result.stop_reason)
        kept_val = result.kept_val_acc  # the restored epoch's: value, test accuracy and checkpoint agree
        if not math.isfinite(kept_val):
            member.error = Diverged("validation accuracy is not finite")
            self._record(trial, result, "diverged", str(member.error))
            return TrialState.PRUNED, None
        if self.on_model is not None:
            self.on_model(trial, member.model, member.cfg, kept_val)
        return TrialState.COMPLETE, kept_val

    @staticmethod
    def _record(trial: optuna.Trial, result: FitResult, stop_reason: str, fail_reason: str | None = None) -> None:
        """Everything a trial cost and measured, however it ended (stopped trials count in compute totals)."""
        attrs = {
            Attr.LOSS_CURVE: list(result.train_loss), Attr.VAL_CURVE: list(result.val_acc),
            Attr.VAL_ACC: result.kept_val_acc if result.epochs_run else None, Attr.EPOCHS_RUN: result.epochs_run,
            Attr.KEPT_EPOCH: result.kept_epoch, Attr.TRAIN_SECONDS: round(result.train_seconds, 3),
            Attr.IMAGES_PER_SEC: round(result.images_per_sec, 1), Attr.STOP_REASON: stop_reason,
        }
        if math.isfinite(result.test_acc):
            attrs[Attr.TEST_ACC] = result.test_acc
        if result.test_curve:  # a recording's trial (TrialSettings.test_each_epoch); others keep the final test only
            attrs[Attr.TEST_CURVE] = list(result.test_curve)
        if result.epoch_seconds:
            attrs[Attr.EPOCH_SECONDS] = [round(s, 4) for s in result.epoch_seconds]
        if fail_reason is not None:
            attrs[Attr.FAIL_REASON] = fail_reason
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


class AnsweringTrainer(TrialTrainer):
    """A trainer whose members are answered epoch by epoch instead of trained (bench.simulate's landscape,
    bench.replay's recorded table). Suggesting, reporting, pruning and concluding stay the trainer's own, and `train`
    keeps bench.train.fit_pack's schedule: a member leaves the moment it is pruned, diverges or finishes, and free
    slots are refilled at epoch boundaries, so the runner sees exactly what a real pack would show it."""

    train_images = 0  # images of one answered epoch (images per second are derived from it; 0: not known)

    def __init__(self, space: Sequence[Param], *, seed: int = 0, grid_only: bool = False):
        self.space = tuple(space)
        self.settings = TrialSettings(device="cpu", seed=seed, progress=False, grid_only=grid_only)
        self.device = torch.device("cpu")
        self.on_model = None  # nothing trained: no weights to keep

    def answer(self, member: Member, epoch: int) -> tuple[float, float, float]:
        """The member's `epoch`: (train loss, validation accuracy, seconds); a non-finite loss means it diverged."""
        raise NotImplementedError

    def final_test_accuracy(self, member: Member, epoch: int) -> float:
        raise NotImplementedError

    def rebuild(self, member: Member) -> None:
        member.result.__init__()  # type: ignore[misc]
        member.error = None

    def train(self, members: list[Member], *, capacity: int | None = None, refill: Refill | None = None,
              on_leave: Callable[[Member], None] | None = None) -> PackLog:
        active = list(members)
        capacity = max(capacity or len(active), len(active))
        log = PackLog(capacity)
        while active:
            shapes = {shape_signature(m.cfg) for m in active}
            log.members.append(len(active))
            log.launches.append(len(shapes))
            log.signatures |= shapes
            leaving = []
            for m in active:
                r, epoch = m.result, m.result.epochs_run + 1
                loss, val, seconds = self.answer(m, epoch)
                if not (math.isfinite(loss) and math.isfinite(val)):
                    m.error = Diverged(f"loss became {loss} in epoch {epoch}")
                    leaving.append(m)
                    continue
                r.train_loss.append(loss)
                r.val_acc.append(val)
                r.epochs_run = r.kept_epoch = epoch
                r.train_seconds += seconds  # a pruned epoch ran before the pruner saw it: it is charged
                r.epoch_seconds.append(seconds)
                r.images_per_sec = self.train_images * epoch / r.train_seconds if r.train_seconds > 0 else 0.0
                try:
                    if m.on_epoch is not None:
                        m.on_epoch(epoch, loss, val)
                except Exception as exc:  # pruned: leaves, as in the loop
                    m.error = exc
                    leaving.append(m)
                    continue
                if epoch >= m.cfg.epochs:
                    r.test_acc = self.final_test_accuracy(m, epoch)
                    leaving.append(m)
            for m in leaving:
                active.remove(m)
                if on_leave is not None:
                    on_leave(m)
            if refill is not None and capacity > len(active):
                active += list(refill(capacity - len(active)))
        return log


class _CallerError(Exception):
    """An error of the runner's refill or on_leave, carried through the training loop unchanged."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Interrupted(Exception):
    """The run was stopped (Ctrl-C, SIGTERM) while this member trained."""


class _OutOfMemory(Exception):
    """The device ran out of memory even for a pack of one."""


def has_outcome(member: Member) -> bool:
    """The member left the pack with its outcome (completed, or stopped by its own callback or divergence)."""
    return member.error is not None or math.isfinite(member.result.test_acc)


def mark_interrupted(members: list[Member]) -> None:
    _fail_unfinished(members, _Interrupted("interrupted"))


def _fail_unfinished(members: list[Member], error: Exception) -> None:
    """Members that left with an outcome keep it; every other one ends with `error`."""
    for member in members:
        if not has_outcome(member):
            member.error = error
