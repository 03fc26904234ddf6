from __future__ import annotations

import pytest
import torch

from bench.data import load_image_folder, make_splits
from bench.design import inert_techniques
from bench.hardware import resolve_precision
from bench.models import build_model
from bench.schedules import member_schedule
from bench.space import BASELINE, LOSSES, OPTIMIZERS, SCHEDULERS, TrainConfig
from bench.train import Diverged, FitResult, fit

CPU = torch.device("cpu")


@pytest.fixture
def splits(rgb_folder, cache_dir):
    return make_splits(load_image_folder(rgb_folder, cache_dir=cache_dir), val_split=0.25, seed=0)


def train(splits, cfg: TrainConfig, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    ds = splits.dataset
    model = build_model(cfg, ds.channels, ds.image_size, len(ds.classes))
    return fit(model, splits, cfg, device=CPU, seed=seed, progress=False, **kwargs), model


ONE_EPOCH = BASELINE.replace(epochs=1, batch_size=16)
VARIANTS = (
    [{"optimizer": o} for o in OPTIMIZERS]
    + [{"optimizer": "sgd", "nesterov": True}]
    + [{"loss": loss} for loss in LOSSES] + [{"label_smoothing": 0.1}]
    + [{"scheduler": s, "epochs": 2} for s in SCHEDULERS]
    + [{"color_jitter": True}, {"rotation": True}, {"affine": True}, {"grayscale": True}, {"erasing": True},
       {"crop": False, "flip": False}]
    + [{"grad_clip": 1.0}, {"batch_norm": True, "dropout": 0.3, "residual": True, "extra_blocks": 1}]
    + [{"conv_layout": "assignment", "batch_norm": True, "dropout": 0.3}, {"scheduler": "step", "step_size": 1, "epochs": 2}]
)


@pytest.mark.parametrize("changes", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_path_trains(splits, changes):
    result, _ = train(splits, ONE_EPOCH.replace(**changes), precision="fp32")
    assert result.epochs_run == ONE_EPOCH.replace(**changes).epochs
    assert all(0 <= a <= 1 for a in result.val_acc) and 0 <= result.test_acc <= 1
    assert all(loss == loss and loss < 1e3 for loss in result.train_loss)
    assert result.images_per_sec > 0


def test_baseline_learns_the_generated_classes(splits):
    result, _ = train(splits, BASELINE.replace(epochs=8, batch_size=8, lr=1e-3), precision="fp32")
    assert result.train_loss[-1] < result.train_loss[0]
    assert result.test_acc >= 0.8  # the classes differ in brightness: trivially separable


def test_same_seed_same_result_on_cpu(splits):
    cfg = ONE_EPOCH.replace(epochs=2, color_jitter=True, erasing=True)
    a, _ = train(splits, cfg, seed=3, precision="fp32")
    b, _ = train(splits, cfg, seed=3, precision="fp32")
    assert a.train_loss == b.train_loss and a.val_acc == b.val_acc and a.test_acc == b.test_acc


def test_huge_learning_rate_diverges(splits):
    with pytest.raises(Diverged):
        train(splits, ONE_EPOCH.replace(epochs=3, optimizer="sgd", lr=1e6, momentum=0.9), precision="fp32")


def test_patience_running_out_at_the_last_epoch_is_a_finished_run(splits):
    """Stopping 'early' at the last epoch is no early stop: the run is labelled completed."""
    last, _ = train(splits, ONE_EPOCH.replace(epochs=2, early_stopping=1, lr=1e-7), precision="fp32")
    assert last.epochs_run == 2 and last.stop_reason == "completed"


def test_early_stopping_stops_and_reports_it(splits):
    calls = []
    result, _ = train(splits, ONE_EPOCH.replace(epochs=30, early_stopping=1, lr=1e-5), precision="fp32",
                      on_epoch=lambda e, loss, acc: calls.append(e))
    assert result.stop_reason == "early-stopped"
    assert result.epochs_run == len(calls) < 30


def test_bf16_autocast_trains_on_cpu(splits):
    result, _ = train(splits, ONE_EPOCH, precision="bf16")
    assert 0 <= result.test_acc <= 1


def test_precision_resolution():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("auto", CPU) in (None, torch.bfloat16)


def test_early_stopping_value_test_and_weights_come_from_the_restored_epoch(splits):
    cfg = ONE_EPOCH.replace(epochs=4, early_stopping=10, lr=3e-2)  # patience never runs out: all epochs run
    result, model = train(splits, cfg, precision="fp32")
    assert result.epochs_run == 4 and result.stop_reason == "completed"
    best = result.val_acc.index(max(result.val_acc)) + 1
    assert result.kept_epoch == best and result.kept_val_acc == max(result.val_acc)
    from bench.augment import AugmentConfig, BatchAugment
    from bench.train import evaluate

    ds = splits.dataset
    plain = BatchAugment(AugmentConfig(), ds.mean, ds.std, CPU)
    assert evaluate(model, splits.val, plain, CPU, None)[0] == pytest.approx(result.kept_val_acc)  # the restored weights


def test_epoch_callback_can_stop_training_and_the_run_keeps_its_curves_and_cost(splits):
    class Stop(Exception):
        pass

    def stop_at_two(epoch, loss, acc):
        if epoch == 2:
            raise Stop

    partial = FitResult()
    with pytest.raises(Stop):
        train(splits, ONE_EPOCH.replace(epochs=5), on_epoch=stop_at_two, precision="fp32", result=partial)
    assert partial.epochs_run == 2 and len(partial.val_acc) == 2 and partial.kept_val_acc == partial.val_acc[-1]
    assert partial.train_seconds > 0 and partial.images_per_sec > 0


def test_a_diverged_run_records_its_cost(splits):
    partial = FitResult()
    with pytest.raises(Diverged):
        train(splits, ONE_EPOCH.replace(epochs=3, optimizer="sgd", lr=1e6, momentum=0.9), precision="fp32", result=partial)
    assert partial.train_seconds > 0 and partial.images_per_sec > 0


def test_onecycle_keeps_the_searched_momentum():
    cfg = BASELINE.replace(optimizer="sgd", momentum=0.5, scheduler="onecycle", epochs=2)
    optimizer, schedule = member_schedule(cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        schedule.after_batch()
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[0]["momentum"] == 0.5
    assert max(lrs) > lrs[-1]  # the lr still cycles


@pytest.mark.parametrize("changes, inert", [
    ({"scheduler": "step", "epochs": 2}, True), ({"scheduler": "step", "epochs": 3}, False),  # step 2: acts in epoch 3
    ({"scheduler": "step", "step_size": 1, "epochs": 2}, False),
    ({"scheduler": "cosine", "epochs": 1}, True), ({"scheduler": "cosine", "epochs": 2}, False),
    ({"scheduler": "plateau", "epochs": 3}, True), ({"scheduler": "plateau", "epochs": 4}, False),
    ({"scheduler": "onecycle", "epochs": 1}, False),
    ({"early_stopping": 3, "epochs": 4}, True), ({"early_stopping": 3, "epochs": 5}, False),
    ({}, False),
])
def test_inert_techniques(changes, inert):
    assert bool(inert_techniques(BASELINE.replace(**changes))) == inert


def test_onecycle_uses_torchs_lr_from_the_first_step(splits, monkeypatch):
    """Every step's lr equals torch's OneCycleLR sequence, the first included (it starts at max_lr / 25)."""
    from bench.optimizers import PackedOptimizer

    cfg = ONE_EPOCH.replace(epochs=2, scheduler="onecycle", lr=0.01, batch_size=8)
    used, real_step = [], PackedOptimizer.step

    def recording_step(self, closure=None):
        used.append(self.lrs[0])
        return real_step(self, closure)

    monkeypatch.setattr(PackedOptimizer, "step", recording_step)
    train(splits, cfg, precision="fp32")
    steps = len(used)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=cfg.lr, total_steps=steps, cycle_momentum=False)
    expected = []
    for _ in range(steps):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert used[0] == pytest.approx(cfg.lr / 25) and used == pytest.approx(expected)
