"""The training loop. It knows nothing of Optuna: pruning reaches it through `on_epoch`.

Data stays as uint8 tensors on the training device; each batch is indexed, augmented
and normalised there (bench.augment), so an epoch does no per-image Python work.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.augment import AugmentConfig, BatchAugment
from bench.data import Split, Splits
from bench.errors import UsageError
from bench.space import TrainConfig

EVAL_BATCH = 1024
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


# --- device and precision ---------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA device is available; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_supports_bf16() -> bool:
    # oneDNN's own check: true on CPUs with AVX512-BF16 or AMX (this project's 2-core EPYC has it).
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- factories ---------------------------------------------------------------------------


class FocalLoss(nn.Module):
    """Lin et al. 2017: cross-entropy down-weighted by (1 - p_true)^gamma."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - log_p.exp()).pow(self.gamma) * log_p).mean()


class SoftmaxMSELoss(nn.Module):
    """MSE between softmax probabilities and one-hot targets (the assignment's 'MSE' level)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        return F.mse_loss(logits.softmax(1), one_hot)


def build_loss(cfg: TrainConfig) -> nn.Module:
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma)
    if cfg.loss == "mse":
        return SoftmaxMSELoss()
    raise ValueError(f"unknown loss {cfg.loss!r}")


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


@dataclass
class Schedule:
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
    per_batch: bool = False

    def after_batch(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self, val_acc: float) -> None:
        if self.scheduler is None or self.per_batch:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_acc)
        else:
            self.scheduler.step()


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "none":
        return Schedule(None)
    if cfg.scheduler == "step":  # the assignment's StepLR: decay 10x twice over the run
        return Schedule(sched.StepLR(optimizer, step_size=max(1, math.ceil(cfg.epochs / 3)), gamma=0.1))
    if cfg.scheduler == "cosine":
        return Schedule(sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs))
    if cfg.scheduler == "onecycle":
        # cycle_momentum=False: the searched momentum (or Adam's beta1) stays as suggested; torch's default would
        # cycle it between 0.85 and 0.95 and silently override e.g. an SGD momentum of 0.5
        return Schedule(sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                         cycle_momentum=False), per_batch=True)
    if cfg.scheduler == "plateau":
        return Schedule(sched.ReduceLROnPlateau(optimizer, mode="max", factor=0.3, patience=1))
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}")


# Epochs below which each per-epoch technique cannot change anything. StepLR decays after
# ceil(E/3) epochs, so at E=1 only after the last one; cosine's first step lands after
# epoch 1; ReduceLROnPlateau (patience 1) lowers the lr after 3 epochs at the earliest and
# that only matters from epoch 4. Early stopping with patience p stops after epoch p+1 at
# the earliest, which cuts training short only when E >= p+2.
def inert_techniques(cfg: TrainConfig) -> list[str]:
    """Why each training technique of `cfg` can have no effect at its epoch budget (empty when all can act)."""
    reasons = []
    first_effect = {"step": max(1, math.ceil(cfg.epochs / 3)) + 1, "cosine": 2, "plateau": 4}
    if cfg.scheduler in first_effect and cfg.epochs < first_effect[cfg.scheduler]:
        reasons.append(f"{cfg.scheduler} scheduler changes the lr only after the last of {cfg.epochs} epoch(s)")
    if cfg.early_stopping and cfg.epochs < cfg.early_stopping + 2:
        reasons.append(f"early stopping (patience {cfg.early_stopping}) cannot stop a {cfg.epochs}-epoch run early")
    return reasons


# --- evaluation and training --------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, augment: BatchAugment, device: torch.device,
             dtype: torch.dtype | None) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(split), EVAL_BATCH):
        x = augment.normalize(split.images[start:start + EVAL_BATCH].to(device, non_blocking=True))
        with autocast(device, dtype):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        correct += (logits.argmax(1) == split.labels[start:start + EVAL_BATCH].to(device)).sum()
    return correct.item() / max(1, len(split))


@dataclass
class FitResult:
    """What a run measured. `fit` fills it in place, so after an exception (pruning, divergence,
    interruption) the caller still holds the curves, seconds and images/s up to that point."""

    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: float = float("nan")
    epochs_run: int = 0
    kept_epoch: int = 0  # the epoch whose weights the model ends with (early stopping restores the best)
    train_seconds: float = 0.0
    images_per_sec: float = 0.0
    eval_images_per_sec: float = 0.0
    stop_reason: str = "completed"

    @property
    def kept_val_acc(self) -> float:
        return self.val_acc[self.kept_epoch - 1] if self.kept_epoch else float("nan")


EpochCallback = Callable[[int, float, float], None]


def _place(split: Split, device: torch.device, log: Callable[[str], None]) -> Split:
    """The whole split on the device, unless it would not fit (then it moves per batch)."""
    if device.type != "cuda":
        return split
    free, _ = torch.cuda.mem_get_info(device)
    if split.images.numel() > 0.5 * free:
        log(f"dataset ({split.images.numel() / 2**30:.1f} GiB) too large for {device}: keeping it in host memory")
        return Split(split.images.pin_memory(), split.labels.pin_memory())
    return split.to(device)


def fit(model: nn.Module, splits: Splits, cfg: TrainConfig, *, device: torch.device, precision: str = "auto",
        seed: int = 0, on_epoch: EpochCallback | None = None, progress: bool = True,
        log: Callable[[str], None] = tqdm.write, compile_model: bool = False,
        result: FitResult | None = None) -> FitResult:
    """Train `model` on `splits.train` for `cfg.epochs`, validating after every epoch, then test once.

    `on_epoch(epoch, train_loss, val_acc)` may raise to stop (that is how pruning works).
    Raises Diverged when the loss stops being finite. `result`, when given, is filled in place.
    """
    result = FitResult() if result is None else result
    started = time.perf_counter()
    timing: dict[str, float] = {"train": 0.0, "images": 0, "epoch_start": math.nan}
    try:
        return _fit(model, splits, cfg, device=device, precision=precision, seed=seed, on_epoch=on_epoch,
                    progress=progress, log=log, compile_model=compile_model, result=result, timing=timing)
    finally:  # also on pruning, divergence and interruption: the cost of a stopped run is recorded too
        now = time.perf_counter()
        if math.isfinite(timing["epoch_start"]):  # stopped inside an epoch: its batches so far count
            timing["train"] += now - timing["epoch_start"]
        result.train_seconds = now - started
        result.images_per_sec = timing["images"] / max(timing["train"], 1e-9)


def _fit(model: nn.Module, splits: Splits, cfg: TrainConfig, *, device: torch.device, precision: str,
         seed: int, on_epoch: EpochCallback | None, progress: bool, log: Callable[[str], None], compile_model: bool,
         result: FitResult, timing: dict[str, float]) -> FitResult:
    dtype = resolve_precision(precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model  # shares the parameters; `model` stays saveable
    train, val = _place(splits.train, device, log), _place(splits.val, device, log)
    test = val if splits.val_is_test else _place(splits.test, device, log)
    dataset = splits.dataset
    augment = BatchAugment(AugmentConfig.from_train_config(cfg, dataset.crop_padding), dataset.mean, dataset.std, device)
    plain = BatchAugment(AugmentConfig(), dataset.mean, dataset.std, device)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(cfg, model.parameters())
    n = len(train)
    batches = [(s, min(s + cfg.batch_size, n)) for s in range(0, n, cfg.batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] == 1:
        batches.pop()  # a batch of one breaks BatchNorm; drop that single sample this epoch
    schedule = build_schedule(cfg, optimizer, len(batches))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(seed)  # augmentation draws
    order_gen = torch.Generator().manual_seed(seed)  # batch order, identical on every device
    best_acc, best_epoch, best_state, stale = -1.0, 0, None, 0
    eval_time = 0.0
    eval_images = 0

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = timing["epoch_start"] = time.perf_counter()
        order = torch.randperm(n, generator=order_gen).to(train.images.device)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=not progress)
        for i, (start, stop) in enumerate(bar):
            idx = order[start:stop]
            x = augment(train.images[idx].to(device, non_blocking=True), gen).contiguous(memory_format=torch.channels_last)
            y = train.labels[idx].to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.after_batch()
            loss_sum += loss.detach() * (stop - start)
            timing["images"] += stop - start
            if i % 20 == 19 or i == len(batches) - 1:  # reading the loss syncs the GPU: not every batch
                running = loss_sum.item() / stop
                if not math.isfinite(running):
                    raise Diverged(f"loss became {running} in epoch {epoch}")
                bar.set_postfix(loss=f"{running:.3f}")
        train_loss = loss_sum.item() / batches[-1][1]
        t1 = time.perf_counter()
        val_acc = evaluate(net, val, plain, device, dtype)
        t2 = time.perf_counter()
        timing["train"] += t1 - t0
        timing["epoch_start"] = math.nan
        eval_time += t2 - t1
        eval_images += len(val)
        result.train_loss.append(train_loss)
        result.val_acc.append(val_acc)
        result.epochs_run = result.kept_epoch = epoch
        if progress:
            log(f"[{epoch}/{cfg.epochs}] loss={train_loss:.3f} val_acc={val_acc:.3f}")
        schedule.after_epoch(val_acc)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_acc)
        if cfg.early_stopping:
            if val_acc > best_acc:
                best_acc, best_epoch, stale = val_acc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.early_stopping:
                    result.stop_reason = "early-stopped"
                    break
    if best_state is not None:  # early stopping keeps the best epoch's weights: value, test and checkpoint agree
        model.load_state_dict(best_state)
        result.kept_epoch = best_epoch
    t3 = time.perf_counter()
    result.test_acc = evaluate(net, test, plain, device, dtype)
    eval_time += time.perf_counter() - t3
    eval_images += len(test)
    result.eval_images_per_sec = eval_images / max(eval_time, 1e-9)
    return result
