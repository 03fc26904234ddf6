"""Checks that need CUDA (scripts/gpu-check.sh runs them on a GPU machine); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from bench.data import load_image_folder, make_splits
from bench.models import build_model
from bench.sample_data import make_image_folder
from bench.space import BASELINE
from bench.train import GRAPH_WARMUP, Member, fit_pack

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


def test_replayed_cuda_graphs_train_as_the_eager_step(splits, monkeypatch):
    """fit_pack captures each sub-pack's full-batch step once and replays it: every member of a mixed pack (four
    optimizers, a per-batch OneCycle lr, clipping, dropout, BatchNorm, erasing) ends as the eager step leaves it. One
    capture in epoch 1, one more after a member leaves (3 epochs against 2); every other full batch is a replay."""
    counts = {"capture_begin": 0, "replay": 0}
    for name in counts:
        real = getattr(torch.cuda.CUDAGraph, name)
        monkeypatch.setattr(torch.cuda.CUDAGraph, name,
                            lambda self, *a, _real=real, _name=name, **kw: (counts.__setitem__(_name, counts[_name] + 1),
                                                                           _real(self, *a, **kw))[1])
    cfgs = [CFG, OTHERS[0], OTHERS[1].replace(epochs=2), OTHERS[2]]
    graphed = train(splits, cfgs, [0, 1, 2, 3], precision="fp32", deterministic=True, cuda_graphs=True)
    seen = dict(counts)
    eager = train(splits, cfgs, [0, 1, 2, 3], precision="fp32", deterministic=True, cuda_graphs=False)
    assert counts == seen  # the eager run neither captures nor replays
    full = len(splits.train) // CFG.batch_size  # full batches per epoch (the last, shorter one runs eager)
    assert len(splits.train) % CFG.batch_size and full > GRAPH_WARMUP
    assert seen == {"capture_begin": 2, "replay": 3 * full - 2 * GRAPH_WARMUP}
    for cfg, g, e in zip(cfgs, graphed, eager, strict=True):
        assert g.error is None and e.error is None
        assert g.result.train_loss == pytest.approx(e.result.train_loss, abs=1e-5), cfg.optimizer
        assert max(abs(a - b) for a, b in zip(g.result.val_acc, e.result.val_acc, strict=True)) <= 0.01, cfg.optimizer


def test_a_failed_capture_leaves_the_pack_training_eagerly(splits, monkeypatch):
    """A step that cannot be captured (here: it reads a value back, a host sync, only while capturing) is recorded
    with its first cause and the pack goes on eagerly, its members as the all-eager run leaves them."""
    import bench.train as train_module

    real_step = train_module._train_step

    def step_that_syncs_in_a_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.zeros(1, device=CUDA).item()
        return real_step(*args, **kwargs)

    cfgs = [CFG, OTHERS[0]]
    members = []
    for cfg, seed in zip(cfgs, [0, 1], strict=True):
        torch.manual_seed(seed)
        ds = splits.dataset
        members.append(Member(build_model(cfg, ds.channels, ds.image_size, len(ds.classes)), cfg, seed))
    monkeypatch.setattr(train_module, "_train_step", step_that_syncs_in_a_capture)
    record = fit_pack(members, splits, device=CUDA, precision="fp32", progress=False, deterministic=True)
    monkeypatch.setattr(train_module, "_train_step", real_step)
    eager = train(splits, cfgs, [0, 1], precision="fp32", deterministic=True, cuda_graphs=False)
    assert len(record.graph_failures) == 1 and record.graph_steps == 0
    assert "operation failed due to a previous error" not in record.graph_failures[0]
    for m, e in zip(members, eager, strict=True):
        assert m.error is None
        assert m.result.train_loss == pytest.approx(e.result.train_loss, abs=1e-5)


def test_bf16_pack_of_64_trains_from_a_captured_graph(splits):
    """bf16 with cuDNN's benchmark mode (the default: not deterministic), as bench.perf and bench.run train."""
    members = []
    for seed in range(64):
        torch.manual_seed(seed)
        ds = splits.dataset
        members.append(Member(build_model(CFG, ds.channels, ds.image_size, len(ds.classes)), CFG.replace(epochs=1), seed))
    record = fit_pack(members, splits, device=CUDA, precision="bf16", progress=False)
    assert all(m.error is None and 0 <= m.result.test_acc <= 1 for m in members)
    assert record.graph_failures == [] and record.graph_steps > 0


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
            _train_step(state, train_split, state.orders[:, start:stop], stop - start, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.loss_sum).all()


def test_the_dropout_keep_buffer_stays_on_the_device_when_a_member_leaves():
    from bench.packed import PackedDropout, compact, pack_models

    cfgs = [CFG.replace(dropout=p) for p in (0.1, 0.2, 0.3)]
    packed = pack_models([build_model(c, 3, (32, 32), 10) for c in cfgs], cfgs).to(CUDA)
    compact(packed, [0, 2])
    assert all(m.keep.device.type == "cuda" for m in packed.modules() if isinstance(m, PackedDropout))
