"""The Optuna objective: suggest -> build model -> train (reporting each epoch) -> return the metric."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from bench.data import Splits
from bench.models import build_model, count_parameters
from bench.space import Param, TrainConfig, config_from_params, suggest
from bench.train import Diverged, FitResult, fit, resolve_device


class Attr:
    """User-attribute keys every trial carries (the report reads the same names)."""

    VAL_CURVE = "val_acc_curve"
    LOSS_CURVE = "train_loss_curve"
    VAL_ACC = "val_acc"
    TEST_ACC = "test_acc"
    EPOCHS_RUN = "epochs_run"
    TRAIN_SECONDS = "train_seconds"
    IMAGES_PER_SEC = "images_per_sec"
    PARAM_COUNT = "param_count"
    DEVICE = "device"
    SEED = "seed"
    STOP_REASON = "stop_reason"
    FAIL_REASON = "fail_reason"
    CELL = "cell"  # designed-experiment cell (bench.matrix)
    WORKER = "worker"  # host:pid of the process that ran the trial
    KEPT_EPOCH = "kept_epoch"  # the epoch whose weights were kept (early stopping restores the best)
    TRAIN_IMAGES = "train_images"  # the budget: images per epoch
    NUM_CLASSES = "num_classes"  # chance accuracy is 1 / num_classes


@dataclass(frozen=True)
class TrialSettings:
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    grid_only: bool = False
    progress: bool = True
    compile_model: bool = False


ModelSink = Callable[[optuna.Trial, torch.nn.Module, TrainConfig, float], None]


class Objective:
    def __init__(self, splits: Splits, space: tuple[Param, ...], settings: TrialSettings,
                 on_model: ModelSink | None = None):
        self.splits = splits
        self.space = space
        self.settings = settings
        self.on_model = on_model
        self.device = resolve_device(settings.device)

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.space, grid_only=self.settings.grid_only)
        cfg = config_from_params(params)
        seed = int(trial.user_attrs.get(Attr.SEED, self.settings.seed + trial.number))
        torch.manual_seed(seed)
        ds = self.splits.dataset
        model = build_model(cfg, ds.channels, ds.image_size, len(ds.classes))
        for key, value in ((Attr.SEED, seed), (Attr.PARAM_COUNT, count_parameters(model)),
                           (Attr.DEVICE, str(self.device)), (Attr.WORKER, f"{socket.gethostname()}:{os.getpid()}"),
                           (Attr.TRAIN_IMAGES, len(self.splits.train)), (Attr.NUM_CLASSES, len(ds.classes))):
            trial.set_user_attr(key, value)
        # The curves live here, not in the trial: a retried trial (heartbeat retry) inherits the dead
        # attempt's user attributes, and appending to those would glue two runs together.
        result = FitResult()

        def report_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
            trial.set_user_attr(Attr.LOSS_CURVE, list(result.train_loss))
            trial.set_user_attr(Attr.VAL_CURVE, list(result.val_acc))
            trial.report(val_acc, epoch)
            if trial.should_prune():
                result.stop_reason = "pruned"
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_acc={val_acc:.4f}")

        try:
            fit(model, self.splits, cfg, device=self.device, precision=self.settings.precision, seed=seed,
                on_epoch=report_epoch, progress=self.settings.progress, compile_model=self.settings.compile_model,
                result=result)
        except Diverged as exc:
            self._record(trial, result, "diverged", str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        except torch.OutOfMemoryError as exc:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._record(trial, result, "failed", f"out of memory: {str(exc).splitlines()[0]}")
            raise
        except optuna.TrialPruned:
            self._record(trial, result, "pruned")
            raise
        except KeyboardInterrupt:
            self._record(trial, result, "failed", "interrupted")
            raise
        except Exception as exc:
            self._record(trial, result, "failed", f"{type(exc).__name__}: {exc}")
            raise

        self._record(trial, result, result.stop_reason)
        kept_val = result.kept_val_acc  # the restored epoch's: value, test accuracy and checkpoint agree
        if not math.isfinite(kept_val):
            raise Diverged("validation accuracy is not finite")
        if self.on_model is not None:
            self.on_model(trial, model, cfg, kept_val)
        return kept_val

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
        if fail_reason is not None:
            attrs[Attr.FAIL_REASON] = fail_reason
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
