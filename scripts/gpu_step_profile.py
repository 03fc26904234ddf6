"""Where a packed training step's time goes: host (Python, kernel launches) or device (kernels).

For a few shapes of the default space and pack sizes K it times bench's own step (bench.train._step: indexing,
per-member augmentation, forward, per-member losses, backward, the packed optimizer) three ways:
  eager ms/step     wall time of the eager step (fit_pack(cuda_graphs=False))
  device ms/step    the kernels' own time (torch.profiler), and how many kernels one step launches
  graph ms/step     the step captured once as a CUDA graph and replayed, as fit_pack does on CUDA
A step whose eager time is far above its device time is bound by launches, not by the GPU: capturing it (or fusing
its launches) is the lever; one close to its device time needs bigger kernels (more members per launch).

    python scripts/gpu_step_profile.py [--device cuda] [--steps 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.augment import AugmentConfig, BatchAugment  # noqa: E402
from bench.data import load_image_folder, make_splits  # noqa: E402
from bench.hardware import resolve_precision  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.sample_data import make_image_folder  # noqa: E402
from bench.space import BASELINE  # noqa: E402
from bench.train import Member, _Context, _new_slot, _PackState, _step  # noqa: E402

SHAPES = {  # three shapes the 50-trial GPU study of 2026-11-30 trained (H200: 4-42k img/s a trial)
    "baseline bs128": BASELINE,
    "assignment w2 bs64": BASELINE.replace(conv_layout="assignment", width=2.0, batch_size=64, hidden_units=128),
    "stages +2 BN res bs64": BASELINE.replace(extra_blocks=2, batch_norm=True, residual=True, batch_size=64,
                                              hidden_units=512, optimizer="adamw", weight_decay=5e-4),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_state(cfg, k: int, splits, device: torch.device, dtype, graphs: bool) -> tuple[_PackState, _Context]:
    ds = splits.dataset
    ctx = _Context(splits.train.to(device), splits.val.to(device), splits.test.to(device),
                   BatchAugment(AugmentConfig(), ds.mean, ds.std, device), splits, device, dtype, False, print, False,
                   k > 1, graphs=graphs)
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(Member(build_model(cfg, ds.channels, ds.image_size, len(ds.classes)), cfg, seed))
    state = _PackState([_new_slot(m, ctx) for m in members], ctx)
    state.new_epoch(len(ctx.train), device)
    state.packed.train()
    return state, ctx


def step_ms(state, ctx, steps: int, device) -> float:
    """Mean wall ms of bench's own step (eager, or captured and replayed when ctx.graphs) over full batches."""
    batches = [b for b in state.batches if b[1] - b[0] == state.batch_size]
    for i in range(5):  # warm-up (and, with graphs, the capture)
        _step(state, ctx, *batches[i % len(batches)])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        _step(state, ctx, *batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


def device_ms(state, ctx, steps: int, device) -> tuple[float, int]:
    from torch.profiler import ProfilerActivity, profile

    batches = [b for b in state.batches if b[1] - b[0] == state.batch_size]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            _step(state, ctx, *batches[i % len(batches)])
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels)
    return busy_us / steps / 1e3, round(len(kernels) / steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--packs", default="1,2,8")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_precision("auto", device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(Path(tmp) / "rgb", per_class=400, test_per_class=20,
                                 classes=tuple(f"c{i}" for i in range(10)))
        splits = make_splits(load_image_folder(root, cache_dir=Path(tmp) / "cache"), val_split=0.1, seed=0)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"precision {dtype}, {args.steps} steps each")
    print(f"{'shape':24} {'K':>3} {'eager ms':>9} {'device ms':>10} {'kernels':>8} {'graph ms':>10} "
          f"{'eager img/s':>12} {'graph img/s':>12}")
    for name, cfg in SHAPES.items():
        for k in (int(x) for x in args.packs.split(",")):
            state, ctx = build_state(cfg, k, splits, device, dtype, graphs=False)
            eager = step_ms(state, ctx, args.steps, device)
            busy, kernels = device_ms(state, ctx, 10, device) if device.type == "cuda" else (float("nan"), 0)
            del state, ctx
            graph = float("nan")
            if device.type == "cuda":
                state, ctx = build_state(cfg, k, splits, device, dtype, graphs=True)
                graph = step_ms(state, ctx, args.steps, device)
                if state.graph is None:
                    print(f"  ({name}, K={k}: no graph was captured)")
                del state, ctx
                torch.cuda.empty_cache()
            per_step = k * cfg.batch_size
            print(f"{name:24} {k:3d} {eager:9.2f} {busy:10.2f} {kernels:8d} {graph:10.2f} "
                  f"{per_step / eager * 1e3:12,.0f} {per_step / graph * 1e3:12,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
