"""Checks that need CUDA (scripts/gpu-check.sh runs them on a GPU machine); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from bench.data import load_image_folder, make_splits
from bench.models import build_model
from bench.sample_data import make_image_folder
from bench.space import BASELINE
from bench.train import Member, fit_pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 (cuDNN convolutions use it by default) rounds to 10 mantissa bits: solo and pack would differ by more than
    packing explains. The equivalence tests compare fp32 with fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data") / "rgb", per_class=80, test_per_class=20)
    return make_splits(load_image_folder(root, cache_dir=root.parent / "cache"), val_split=0.25, seed=0)


def train(splits, configs, seeds, **kw):
    members = []
    for cfg, seed in zip(configs, seeds, strict=True):
        torch.manual_seed(seed)
        ds = splits.dataset
        members.append(Member(build_model(cfg, ds.channels, ds.image_size, len(ds.classes)), cfg, seed))
    fit_pack(members, splits, device=CUDA, progress=False, **kw)
    return members


CFG = BASELINE.replace(epochs=3, batch_size=32, batch_norm=True, dropout=0.3, color_jitter=True)
OTHERS = [CFG.replace(optimizer="sgd", lr=0.05, momentum=0.9, loss="focal"),
          CFG.replace(optimizer="rmsprop", lr=1e-3, loss="mse", erasing=True, grad_clip=0.5),
          CFG.replace(optimizer="adamw", lr=1e-3, weight_decay=1e-2, label_smoothing=0.1, scheduler="onecycle")]


def test_every_member_trains_in_a_pack_as_alone_on_cuda(splits):
    cfgs, seeds = [OTHERS[0], CFG, OTHERS[1], OTHERS[2]], [1, 3, 2, 4]
    pack = train(splits, cfgs, seeds, precision="fp32", deterministic=True)
    for cfg, seed, mine in zip(cfgs, seeds, pack, strict=True):
        solo = train(splits, [cfg], [seed], precision="fp32", deterministic=True)[0]
        assert mine.result.train_loss == pytest.approx(solo.result.train_loss, abs=1e-3), cfg.optimizer
        assert abs(mine.result.val_acc[-1] - solo.result.val_acc[-1]) <= 0.01, cfg.optimizer


def test_deterministic_runs_repeat_exactly(splits):
    a = train(splits, [CFG, *OTHERS], [0, 1, 2, 3], deterministic=True)
    b = train(splits, [CFG, *OTHERS], [0, 1, 2, 3], deterministic=True)
    for x, y in zip(a, b, strict=True):
        assert x.result.train_loss == y.result.train_loss and x.result.val_acc == y.result.val_acc


def test_bf16_pack_of_64_trains(splits):
    members = train(splits, [CFG.replace(epochs=1)] * 64, list(range(64)), precision="bf16")
    assert all(m.error is None and 0 <= m.result.test_acc <= 1 for m in members)


def test_training_steps_do_not_wait_for_the_device(splits):
    """The step (indexing, augmentation, forward, per-member losses, the vectorised optimizer, clipping, a per-batch lr
    schedule) queues work without one host sync; fit_pack reads the loss every CHECK_EVERY steps, on purpose."""
    from bench.augment import AugmentConfig, BatchAugment
    from bench.train import _Context, _new_slot, _PackState, _train_step

    ds = splits.dataset
    train_split = splits.train.to(CUDA)
    ctx = _Context(train_split, splits.val.to(CUDA), splits.test.to(CUDA),
                   BatchAugment(AugmentConfig(), ds.mean, ds.std, CUDA), splits, CUDA, torch.bfloat16, False,
                   print, False, True)
    members = []
    for cfg, seed in zip([CFG, *OTHERS], [0, 1, 2, 3], strict=True):
        torch.manual_seed(seed)
        members.append(Member(build_model(cfg, ds.channels, ds.image_size, len(ds.classes)), cfg, seed))
    state = _PackState([_new_slot(m, ctx) for m in members], ctx)
    state.new_epoch(len(train_split), CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (start, stop) in enumerate(state.batches[:3]):
            state.set_batch_lr(i)
            _train_step(state, train_split, start, stop, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.loss_sum).all()


def test_the_dropout_keep_buffer_stays_on_the_device_when_a_member_leaves():
    from bench.packed import PackedDropout, compact, pack_models

    cfgs = [CFG.replace(dropout=p) for p in (0.1, 0.2, 0.3)]
    packed = pack_models([build_model(c, 3, (32, 32), 10) for c in cfgs], cfgs).to(CUDA)
    compact(packed, [0, 2])
    assert all(m.keep.device.type == "cuda" for m in packed.modules() if isinstance(m, PackedDropout))
