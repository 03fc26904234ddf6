"""`python -m bench.perf`: the classic per-image pipeline against the harness, side by side.

(a) classic: torchvision ImageFolder + per-image PIL transforms + DataLoader(num_workers=0), fp32,
    exactly the assignment's loop; (b) harness: bench.train.fit on device-resident uint8 tensors
    with per-batch augmentation. Same model, optimizer, data, seeds and epochs; test set as
    validation after every epoch, as the assignment does.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from bench.data import Dataset, _stratified_take, load_dataset, make_splits
from bench.errors import UsageError, run_cli
from bench.hardware import PRECISIONS, fused_packs_on_cpu, pack_runs_per_member, resolve_device
from bench.models import build_seeded_model
from bench.samplers import PRUNERS, SAMPLERS
from bench.simulate import compare_packs
from bench.space import BASELINE, TrainConfig
from bench.stats import two_sided_p, welch_diff
from bench.train import Member, fit, fit_pack


@dataclass(frozen=True)
class PathResult:
    path: str
    seed: int
    train_images_per_sec: float
    eval_images_per_sec: float
    seconds_per_epoch: float
    trial_seconds: float
    test_acc: float


def run_classic(root: Path, dataset: Dataset, cfg: TrainConfig, *, seed: int, device: torch.device,
                train_subset: int | None, progress: bool) -> PathResult:
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(dataset.mean, dataset.std)
    side = dataset.image_size[0]
    train_tf = transforms.Compose([
        transforms.RandomCrop(side, padding=dataset.crop_padding), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize,
    ])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    train_set = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    test_set = datasets.ImageFolder(str(test_dir), transform=test_tf)
    if train_subset is not None:  # the same seeded, stratified indices the harness takes
        index = _stratified_take(torch.tensor(train_set.targets), train_subset, torch.Generator().manual_seed(seed))
        train_set = Subset(train_set, index.tolist())
    model = build_seeded_model(cfg, seed, dataset).to(device)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    test_loader = DataLoader(test_set, batch_size=256, shuffle=False, num_workers=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    train_time = eval_time = 0.0
    acc = 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in tqdm(train_loader, desc=f"classic epoch {epoch}", leave=False, disable=not progress):
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        t1 = time.perf_counter()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        acc = correct / len(test_set)
        eval_time += time.perf_counter() - t1
        train_time += t1 - t0
    return PathResult("classic", seed, cfg.epochs * len(train_set) / train_time,
                      cfg.epochs * len(test_set) / eval_time, (train_time + eval_time) / cfg.epochs,
                      time.perf_counter() - started, acc)


def run_harness(dataset: Dataset, cfg: TrainConfig, *, seed: int, device: torch.device, precision: str,
                train_subset: int | None, progress: bool) -> PathResult:
    splits = make_splits(dataset, val_split=0, train_subset=train_subset, seed=seed)
    model = build_seeded_model(cfg, seed, dataset)
    started = time.perf_counter()
    result = fit(model, splits, cfg, device=device, precision=precision, seed=seed, progress=progress,
                 log=lambda _: None)
    wall = time.perf_counter() - started
    return PathResult("harness", seed, result.images_per_sec, result.eval_images_per_sec,
                      wall / cfg.epochs, wall, result.test_acc)


@dataclass(frozen=True)
class PackResult:
    members: int
    deterministic: bool
    kernels: str  # "solo", "fused" (CUDA's, one grouped convolution for K members) or "per member" (CPU's default)
    member_images_per_sec: float  # summed over the pack's members: training images per second of training time
    wall_seconds: float
    mean_test_acc: float
    graph_share: float | None = None  # CUDA: the steps replayed from a captured graph (bench.train._step)
    graph_failure: str = ""
    # the last epoch alone (runs of 2 epochs or more): the steady speed, after the first epoch's one-off costs: the CUDA
    # graph capture, and cuDNN's autotuning of each new shape (1-epoch runs on one H200: --deterministic, which skips
    # it, ran 1.9x faster at K=8 and 1.3x at K=32)
    last_epoch_member_images_per_sec: float | None = None


def run_pack(dataset: Dataset, cfg: TrainConfig, members: int, *, device: torch.device, precision: str,
             train_subset: int | None, progress: bool, deterministic: bool = False, fused: bool = False) -> PackResult:
    """K baseline trials (seeds 0..K-1) trained as one pack; K=1 is the solo trial. `fused`: CUDA's fused kernels on a
    CPU too (bench.hardware.fused_packs_on_cpu)."""
    splits = make_splits(dataset, val_split=0, train_subset=train_subset, seed=0)
    pack = [Member(build_seeded_model(cfg, seed, dataset), cfg, seed) for seed in range(members)]
    started = time.perf_counter()
    with fused_packs_on_cpu() if fused else contextlib.nullcontext():
        record = fit_pack(pack, splits, device=device, precision=precision, progress=progress, log=lambda _: None,
                          deterministic=deterministic)
    wall = time.perf_counter() - started
    kernels = "solo" if members == 1 else "per member" if not fused and pack_runs_per_member(device) else "fused"
    steps = record.graph_steps + record.eager_steps
    graph_share = record.graph_steps / steps if device.type == "cuda" and steps else None
    images, seconds = record.epoch_times[-1]  # every member shares one shape: one sub-pack, one entry per epoch
    last = images / max(seconds, 1e-9) if len(record.epoch_times) > 1 else None
    return PackResult(members, deterministic, kernels, sum(m.result.images_per_sec for m in pack), wall,
                      statistics.fmean(m.result.test_acc for m in pack), graph_share,
                      record.graph_failures[0] if record.graph_failures else "", last)


def pack_lines(results: list[PackResult]) -> list[str]:
    base = next((r for r in results if r.members == 1 and not r.deterministic), results[0])
    lines = [f"{'pack K':>6} {'kernels':>10} {'determ.':>7} {'member img/s':>13} {'vs K=1':>7} {'wall s':>7} "
             f"{'mean test acc':>13} {'graph steps':>11} {'last epoch img/s':>16}"]
    for r in results:
        graphs = "-" if r.graph_share is None else f"{r.graph_share:.0%}"
        last = "-" if r.last_epoch_member_images_per_sec is None else f"{r.last_epoch_member_images_per_sec:,.0f}"
        lines.append(f"{r.members:>6} {r.kernels:>10} {'yes' if r.deterministic else 'no':>7} "
                     f"{r.member_images_per_sec:>13,.0f} {r.member_images_per_sec / base.member_images_per_sec:>6.2f}x "
                     f"{r.wall_seconds:>7.1f} {r.mean_test_acc:>13.4f} {graphs:>11} {last:>16}")
    lines += [f"K={r.members}: CUDA graph capture failed, the step ran eager: {r.graph_failure}"
              for r in results if r.graph_failure]
    fast = [r for r in results if not r.deterministic]
    best = max(fast, key=lambda r: r.member_images_per_sec)
    lines.append(f"best K={best.members} ({best.kernels}): {best.member_images_per_sec:,.0f} member-images/s, "
                 f"{best.member_images_per_sec / base.member_images_per_sec:.2f}x the solo trial")
    steady = [r for r in fast if r.last_epoch_member_images_per_sec is not None]
    if steady:
        top = max(steady, key=lambda r: r.last_epoch_member_images_per_sec)
        solo = base.last_epoch_member_images_per_sec
        lines.append(f"best K={top.members} in the last epoch (no first-epoch tuning or capture): "
                     f"{top.last_epoch_member_images_per_sec:,.0f} member-images/s"
                     + (f", {top.last_epoch_member_images_per_sec / solo:.2f}x the solo trial's last epoch" if solo else ""))
    for r in results:
        if r.deterministic:
            twin = next((f for f in fast if f.members == r.members), None)
            if twin is not None:
                lines.append(f"--deterministic at K={r.members} runs at {r.member_images_per_sec / twin.member_images_per_sec:.2f}x "
                             "the speed of the default (cuDNN autotuned)")
        elif r.kernels == "per member":
            twin = next((f for f in fast if f.members == r.members and f.kernels == "fused"), None)
            if twin is not None:
                lines.append(f"member by member (exactly each solo run) at K={r.members} runs at "
                             f"{r.member_images_per_sec / twin.member_images_per_sec:.2f}x the fused kernels' speed")
    return lines


def summarize(results: list[PathResult]) -> list[str]:
    lines = [f"{'path':<8} {'seed':>4} {'train img/s':>12} {'eval img/s':>11} {'s/epoch':>8} {'trial s':>8} {'test acc':>9}"]
    for r in results:
        lines.append(f"{r.path:<8} {r.seed:>4} {r.train_images_per_sec:>12.0f} {r.eval_images_per_sec:>11.0f} "
                     f"{r.seconds_per_epoch:>8.2f} {r.trial_seconds:>8.1f} {r.test_acc:>9.4f}")
    by = {p: [r for r in results if r.path == p] for p in ("classic", "harness")}
    mean = lambda rs, f: statistics.fmean(getattr(r, f) for r in rs)  # noqa: E731
    for path, rs in by.items():
        accs = [r.test_acc for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        lines.append(f"{path}: n={len(rs)} test acc mean={statistics.fmean(accs):.4f} sd={sd:.4f} "
                     f"train img/s={mean(rs, 'train_images_per_sec'):.0f} trial s={mean(rs, 'trial_seconds'):.1f}")
    acc_c = [r.test_acc for r in by["classic"]]
    acc_h = [r.test_acc for r in by["harness"]]
    if len(acc_c) > 1 and len(acc_h) > 1:
        est = welch_diff(acc_h, acc_c)
        p = two_sided_p(est)
        if math.isnan(p):  # no spread in either path: no test exists
            lines.append("Welch t-test harness vs classic: no test (the accuracies do not vary)")
        else:
            lines.append(f"Welch t-test harness vs classic: t={est.mean / est.se:.3f} p={p:.4f} "
                         f"({'no significant difference' if p > 0.05 else 'significant difference'} at 0.05)")
    lines.append(f"trial time ratio harness/classic={mean(by['harness'], 'trial_seconds') / mean(by['classic'], 'trial_seconds'):.3f}")
    speedup = mean(by["harness"], "train_images_per_sec") / mean(by["classic"], "train_images_per_sec")
    delta = (statistics.fmean(acc_h) - statistics.fmean(acc_c)) * 100
    lines.append(f"speedup={speedup:.2f} acc_delta={delta:+.2f}")
    return lines


def augment_benchmark(device: torch.device, batch: int = 128, repeats: int = 50) -> list[str]:
    """ms per batch for the full augmentation stack: bench.augment vs kornia (if installed) vs per-image v2."""
    from torchvision.transforms import v2

    from bench.augment import AugmentConfig, BatchAugment

    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    cfg = AugmentConfig(crop_padding=4, flip=True, jitter_strength=0.2, rotation_degrees=15, affine_shear=10, affine_scale=0.2,
                        grayscale_p=0.1, erasing_p=0.2)
    ours = BatchAugment(cfg, (0.5,) * 3, (0.25,) * 3, device)
    candidates = {"bench.augment (per-sample, batched)": lambda: ours(images, g)}
    try:
        import kornia.augmentation as K

        stack = K.AugmentationSequential(
            K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip(), K.RandomAffine(15, shear=10, scale=(0.8, 1.2), p=1.0),
            K.ColorJitter(0.2, 0.2, 0.2, p=1.0), K.RandomGrayscale(p=0.1), K.Normalize(torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)),
            K.RandomErasing(p=0.2)).to(device)
        candidates["kornia (per-sample, batched)"] = lambda: stack(images.float() / 255)
    except ImportError:
        pass
    per_image = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.RandomRotation(15),
                            v2.RandomAffine(0, shear=10, scale=(0.8, 1.2)), v2.ColorJitter(0.2, 0.2, 0.2),
                            v2.RandomGrayscale(0.1), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.25] * 3), v2.RandomErasing(0.2)])
    candidates["torchvision v2, one image at a time"] = lambda: torch.stack([per_image(im) for im in images])
    lines = [f"augmentation, batch {batch} of 3x32x32 on {device}, {repeats} repeats:"]
    for name, fn in candidates.items():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / repeats * 1e3
        lines.append(f"  {name:<40} {ms:8.2f} ms/batch {batch / ms * 1e3:10.0f} images/s")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/data/cifar10-jpeg", help="ImageFolder tree (default: ../shared/data/cifar10-jpeg)")
    parser.add_argument("--cache-dir", default=None, help="decoded-tensor cache (default: ~/.cache/bench)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--train-subset", type=int, default=None, help="train on N seeded images")
    parser.add_argument("--seeds", type=int, default=1, help="runs per path, seeds 0..K-1 (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="harness precision (default: auto)")
    parser.add_argument("--paths", default="classic,harness", help="which paths to run (default: classic,harness)")
    parser.add_argument("--augment", action="store_true",
                        help="only time the augmentation stack: bench.augment vs kornia (if installed) vs per-image v2")
    parser.add_argument("--pack", default=None,
                        help="also train packs of these sizes (e.g. 1,8,32,64) and print member-images/s for each")
    parser.add_argument("--deterministic", action="store_true",
                        help="with --pack: time each pack again with deterministic CUDA algorithms, and print the cost")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    g = parser.add_argument_group("search simulator (no training: bench.simulate)")
    g.add_argument("--simulate-search", action="store_true",
                   help="compare how studies packed in --pack sizes (default 1,8,32) search against solo: distinct "
                        "shapes, best value (paired 95%% interval against solo), occupancy, members per launch")
    g.add_argument("--repeats", type=int, default=10, help="paired repeats: sampler seed and landscape (default: 10)")
    g.add_argument("--trials", type=int, default=50, help="trials per simulated study (default: 50)")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default="tpe", help="sampler (default: tpe)")
    g.add_argument("--pruner", choices=sorted(PRUNERS), default="median", help="pruner (default: median)")
    g.add_argument("--packed-trials", type=int, default=None, metavar="N",
                   help="trials per packed study, solo keeping --trials (default: the same as --trials)")
    g.add_argument("--pack-per-shape", type=int, default=None, metavar="N",
                   help="members one sampled architecture may bring into a pack (default: bench.run's)")
    g.add_argument("--plain-batches", action="store_true",
                   help="also ask the sampler in plain batches of each size (no runner, no pruning): what asking in "
                        "parallel costs with no packing in it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.simulate_search and (args.packed_trials is not None or args.pack_per_shape is not None
                                     or args.plain_batches):
        raise UsageError("--packed-trials, --pack-per-shape and --plain-batches belong to the search simulator; "
                         "add --simulate-search")
    if args.simulate_search:
        return simulate(args)
    if args.augment:
        print("\n".join(augment_benchmark(resolve_device(args.device))))
        return 0
    root = Path(args.dataset)
    if not (root / "train").is_dir():
        raise UsageError(f"--dataset {root} has no train/ folder; bench.perf compares pipelines on an ImageFolder tree")
    if args.epochs < 1 or args.seeds < 1:
        raise UsageError("--epochs and --seeds must be 1 or more")
    paths = [p for p in args.paths.split(",") if p]
    try:
        sizes = [int(k) for k in args.pack.split(",")] if args.pack else []
    except ValueError:
        raise UsageError(f"--pack takes sizes like 1,8,32,64, got {args.pack!r}") from None
    if any(k < 1 for k in sizes):
        raise UsageError(f"--pack sizes must be 1 or more, got {args.pack}")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    dataset = load_dataset(str(root), cache_dir=args.cache_dir)
    print(f"harness data load (decoded-tensor cache): {time.perf_counter() - t0:.1f}s; device={device}; "
          f"threads={torch.get_num_threads()}; epochs={args.epochs}; train={args.train_subset or len(dataset.train)}")
    cfg = BASELINE.replace(epochs=args.epochs)
    results: list[PathResult] = []
    for seed in range(args.seeds):
        for path in paths:
            if path == "classic":
                r = run_classic(root, dataset, cfg, seed=seed, device=device, train_subset=args.train_subset,
                                progress=not args.quiet)
            else:
                r = run_harness(dataset, cfg, seed=seed, device=device, precision=args.precision,
                                train_subset=args.train_subset, progress=not args.quiet)
            results.append(r)
            print(f"{r.path} seed={seed}: {r.train_images_per_sec:.0f} img/s train, test acc {r.test_acc:.4f}, "
                  f"{r.trial_seconds:.1f}s", flush=True)
    if set(paths) >= {"classic", "harness"}:
        print("\n".join(summarize(results)))
    if args.pack:
        packs = []
        for k in sizes:
            # on CPU a pack of two or more also runs with CUDA's fused kernels, beside its exact per-member default
            variants = [(d, False) for d in ((False, True) if args.deterministic else (False,))]
            if k > 1 and pack_runs_per_member(device):
                variants.append((False, True))
            for deterministic, fused in variants:
                r = run_pack(dataset, cfg, k, device=device, precision=args.precision, train_subset=args.train_subset,
                             progress=not args.quiet, deterministic=deterministic, fused=fused)
                packs.append(r)
                print(f"pack K={k} {r.kernels}{' deterministic' if deterministic else ''}: "
                      f"{r.member_images_per_sec:,.0f} member-images/s, {r.wall_seconds:.1f}s", flush=True)
        print("\n".join(pack_lines(packs)))
    return 0


def simulate(args: argparse.Namespace) -> int:
    try:
        sizes = [int(k) for k in (args.pack or "1,8,32").split(",")]
    except ValueError:
        raise UsageError(f"--pack takes sizes like 1,8,32, got {args.pack!r}") from None
    if any(k < 1 for k in sizes) or args.repeats < 2 or args.trials < 1:
        raise UsageError("--pack sizes and --trials must be 1 or more, --repeats 2 or more (a paired interval)")
    if args.pack_per_shape is not None and args.pack_per_shape < 1:
        raise UsageError(f"--pack-per-shape must be 1 or more, got {args.pack_per_shape}")
    if args.packed_trials is not None and args.packed_trials < 1:
        raise UsageError(f"--packed-trials must be 1 or more, got {args.packed_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    print("\n".join(compare_packs(sizes, args.repeats, args.trials, per_shape=args.pack_per_shape,
                                  sampler=args.sampler, pruner=args.pruner, packed_trials=args.packed_trials,
                                  plain_batches=args.plain_batches)))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
