"""Checks that need CUDA (scripts/gpu-check.sh runs them on a GPU machine); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from bench.data import load_image_folder, make_splits
from bench.fixtures import make_image_folder
from bench.models import build_model
from bench.space import BASELINE
from bench.train import Member, fit_pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


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


def test_a_member_trains_in_a_pack_as_alone_on_cuda(splits):
    solo = train(splits, [CFG], [3], precision="fp32", deterministic=True)[0]
    pack = train(splits, [OTHERS[0], CFG, OTHERS[1], OTHERS[2]], [1, 3, 2, 4], precision="fp32", deterministic=True)
    assert pack[1].result.train_loss == pytest.approx(solo.result.train_loss, abs=1e-3)
    assert abs(pack[1].result.val_acc[-1] - solo.result.val_acc[-1]) <= 0.01


def test_deterministic_runs_repeat_exactly(splits):
    a = train(splits, [CFG, *OTHERS], [0, 1, 2, 3], deterministic=True)
    b = train(splits, [CFG, *OTHERS], [0, 1, 2, 3], deterministic=True)
    for x, y in zip(a, b, strict=True):
        assert x.result.train_loss == y.result.train_loss and x.result.val_acc == y.result.val_acc


def test_bf16_pack_of_64_trains(splits):
    members = train(splits, [CFG.replace(epochs=1)] * 64, list(range(64)), precision="bf16")
    assert all(m.error is None and 0 <= m.result.test_acc <= 1 for m in members)
