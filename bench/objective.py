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
from bench.train import Diverged, fit, resolve_device


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
                           (Attr.DEVICE, str(self.device)), (Attr.WORKER, f"{socket.gethostname()}:{os.getpid()}")):
            trial.set_user_attr(key, value)

        def report_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
            trial.set_user_attr(Attr.LOSS_CURVE, [*trial.user_attrs.get(Attr.LOSS_CURVE, []), train_loss])
            trial.set_user_attr(Attr.VAL_CURVE, [*trial.user_attrs.get(Attr.VAL_CURVE, []), val_acc])
            trial.report(val_acc, epoch)
            if trial.should_prune():
                trial.set_user_attr(Attr.STOP_REASON, "pruned")
                trial.set_user_attr(Attr.EPOCHS_RUN, epoch)
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_acc={val_acc:.4f}")

        try:
            result = fit(model, self.splits, cfg, device=self.device, precision=self.settings.precision,
                         seed=seed, on_epoch=report_epoch, progress=self.settings.progress,
                         compile_model=self.settings.compile_model)
        except Diverged as exc:
            trial.set_user_attr(Attr.STOP_REASON, "diverged")
            trial.set_user_attr(Attr.FAIL_REASON, str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        except torch.OutOfMemoryError as exc:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            trial.set_user_attr(Attr.STOP_REASON, "failed")
            trial.set_user_attr(Attr.FAIL_REASON, f"out of memory: {str(exc).splitlines()[0]}")
            raise
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(Attr.STOP_REASON, "failed")
            trial.set_user_attr(Attr.FAIL_REASON, "interrupted")
            raise
        except Exception as exc:
            trial.set_user_attr(Attr.STOP_REASON, "failed")
            trial.set_user_attr(Attr.FAIL_REASON, f"{type(exc).__name__}: {exc}")
            raise

        kept_val = max(result.val_acc) if result.stop_reason == "early-stopped" else result.val_acc[-1]
        for key, value in (
            (Attr.VAL_ACC, kept_val), (Attr.TEST_ACC, result.test_acc), (Attr.EPOCHS_RUN, result.epochs_run),
            (Attr.TRAIN_SECONDS, round(result.train_seconds, 3)), (Attr.IMAGES_PER_SEC, round(result.images_per_sec, 1)),
            (Attr.STOP_REASON, result.stop_reason),
        ):
            trial.set_user_attr(key, value)
        if not math.isfinite(kept_val):
            raise Diverged("validation accuracy is not finite")
        if self.on_model is not None:
            self.on_model(trial, model, cfg, kept_val)
        return kept_val
