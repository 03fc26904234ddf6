"""Datasets as uint8 tensors: decoded once, cached on disk, split with seeds.

A dataset is `(N, C, H, W)` uint8 images plus int64 labels. Training keeps them on the
device and augments per batch (bench.augment), so no per-image work happens per epoch.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from bench.errors import UsageError

CACHE_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


@dataclass(frozen=True)
class Splits:
    """What one trial trains on: train, validation (used for selection) and test."""

    dataset: Dataset
    train: Split
    val: Split
    test: Split
    val_is_test: bool


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bench"


# --- registry ----------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionSpec:
    loader: Callable[[str, bool], tuple[np.ndarray, Sequence[int]]]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int


def _cifar10(root: str, train: bool) -> tuple[np.ndarray, Sequence[int]]:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=train, download=True)
    return ds.data.transpose(0, 3, 1, 2), ds.targets


def _fashion_mnist(root: str, train: bool) -> tuple[np.ndarray, Sequence[int]]:
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(root, train=train, download=True)
    return ds.data.numpy()[:, None], ds.targets.tolist()


DATASETS: dict[str, TorchvisionSpec] = {
    "cifar10": TorchvisionSpec(
        _cifar10, CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), crop_padding=4
    ),
    "fashion-mnist": TorchvisionSpec(
        _fashion_mnist, FASHION_MNIST_CLASSES, (0.2861,), (0.3530,), crop_padding=3
    ),
}


def load_dataset(
    dataset: str, data_dir: str | Path = "data", *, image_size: int = 32, cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """`dataset` is a registry name (cifar10, fashion-mnist) or a path to an ImageFolder tree."""
    if dataset in DATASETS:
        return _load_torchvision(dataset, Path(data_dir), log)
    path = Path(dataset)
    if not path.exists():
        raise UsageError(
            f"dataset {dataset!r} is neither a known name ({', '.join(DATASETS)}) nor an existing directory; "
            "pass --dataset cifar10|fashion-mnist or the path of an ImageFolder tree with train/ and test/"
        )
    return load_image_folder(path, image_size=image_size, cache_dir=cache_dir, log=log)


def _load_torchvision(name: str, data_dir: Path, log: Callable[[str], None]) -> Dataset:
    spec = DATASETS[name]
    try:
        train_x, train_y = spec.loader(str(data_dir), True)
        test_x, test_y = spec.loader(str(data_dir), False)
    except Exception as exc:  # torchvision raises URLError, RuntimeError... when offline
        raise UsageError(
            f"dataset {name!r} not found in {data_dir.resolve()} and the download failed ({type(exc).__name__}); "
            f"copy the torchvision files there, or pass --dataset PATH for a local ImageFolder tree"
        ) from None
    as_split = lambda x, y: Split(torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(y, dtype=torch.int64))  # noqa: E731
    return Dataset(name, name, as_split(train_x, train_y), as_split(test_x, test_y),
                   spec.classes, spec.mean, spec.std, spec.crop_padding)


# --- ImageFolder trees ---------------------------------------------------------------


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {}
    for d in classes:
        found = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not found:
            raise UsageError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        files[d.name] = found
    return files


def _scan_folder(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise UsageError(f"{root} needs train/ and test/ (or val/) folders with one sub-folder per class")
    train = _class_files(train_dir)
    test = _class_files(test_dir)
    if len(train) < 2:
        raise UsageError(f"{train_dir} has {len(train)} class folder(s); a classifier needs at least 2")
    if set(train) != set(test):
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise UsageError(
            f"train and test classes differ in {root} (only in train: {only_train or '-'}; "
            f"only in {test_dir.name}: {only_test or '-'}); give both splits the same class folders"
        )
    classes = tuple(train)
    label = {c: i for i, c in enumerate(classes)}
    labelled = {
        split: [(f, label[c]) for c in classes for f in files[c]] for split, files in (("train", train), ("test", test))
    }
    return classes, labelled


def _fingerprint(root: Path, files: dict[str, list[tuple[Path, int]]], image_size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_VERSION}|{root.resolve()}|{image_size}".encode())
    for split in ("train", "test"):
        for path, lab in files[split]:
            st = path.stat()
            h.update(f"{path.relative_to(root)}|{lab}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UsageError(f"cannot read image {path} ({exc.__class__.__name__}); delete or replace the file") from None


def _decode(files: list[tuple[Path, int]], desc: str) -> list[Image.Image]:
    # Threads: PIL releases the GIL while decoding; 60k CIFAR JPEGs take ~10 s on 2 cores.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(tqdm(pool.map(_open, (p for p, _ in files), chunksize=256), total=len(files),
                         desc=desc, unit="img", leave=False, disable=None))


def _to_tensor(images: list[Image.Image], mode: str, size: tuple[int, int] | None) -> torch.Tensor:
    arrays = []
    for im in images:
        im = im.convert(mode)
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64).div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path) -> dict | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tensors = {k: blob[k] for k in ("train_x", "train_y", "test_x", "test_y")}
        if blob["checksum"] != _checksum(tensors) or blob["version"] != CACHE_VERSION:
            raise ValueError("checksum mismatch")
        return blob
    except Exception as exc:  # any failure means the file cannot be trusted
        print(f"cache {path} is unreadable or corrupt ({type(exc).__name__}); rebuilding it", file=sys.stderr)
        return None


def _write_cache(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a cache behind


def load_image_folder(
    root: Path, *, image_size: int = 32, cache_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> Dataset:
    root = Path(root)
    classes, files = _scan_folder(root)
    key = _fingerprint(root, files, image_size)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = cache / f"{root.resolve().name}-{key}.pt"
    blob = _read_cache(cache_path) if cache_path.exists() else None
    if blob is None:
        blob = _build_folder_blob(root, files, image_size, log)
        try:
            _write_cache(cache_path, blob)
        except OSError as exc:
            log(f"note: could not write the dataset cache {cache_path} ({exc.strerror}); pass --cache-dir DIR")
    train = Split(blob["train_x"], blob["train_y"])
    mean, std = channel_stats(train.images)
    padding = max(1, train.images.shape[-1] // 8)  # 4 for 32 px and 3 for 28 px, as the assignment
    return Dataset(root.name, str(root), train, Split(blob["test_x"], blob["test_y"]), classes, mean, std, padding)


def _build_folder_blob(root: Path, files: dict[str, list[tuple[Path, int]]], image_size: int,
                      log: Callable[[str], None]) -> dict:
    decoded = {split: _decode(files[split], f"decoding {root.name}/{split}") for split in ("train", "test")}
    everything = decoded["train"] + decoded["test"]
    modes = {im.mode for im in everything}
    mode = "L" if modes <= {"L", "1", "I", "I;16", "F"} else "RGB"
    sizes = {im.size for im in everything}
    size = None
    if len(sizes) > 1:
        size = (image_size, image_size)
        log(f"{root}: images have {len(sizes)} different sizes; resizing all to {image_size}x{image_size}")
    tensors = {
        "train_x": _to_tensor(decoded["train"], mode, size),
        "train_y": torch.tensor([lab for _, lab in files["train"]], dtype=torch.int64),
        "test_x": _to_tensor(decoded["test"], mode, size),
        "test_y": torch.tensor([lab for _, lab in files["test"]], dtype=torch.int64),
    }
    return {**tensors, "checksum": _checksum(tensors), "version": CACHE_VERSION, "classes": list(files)}


# --- splits --------------------------------------------------------------------------


def _stratified_take(labels: torch.Tensor, fraction_or_count: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a seeded, per-class-proportional sample of exactly round(count) images (sorted).

    Class shares are apportioned by largest remainder, so the total is exact (rounding each
    class on its own gave 20 images for both 15 and 25 on a 10-class set).
    """
    n = len(labels)
    want = round(fraction_or_count if fraction_or_count >= 1 else fraction_or_count * n)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * want / n
    take = exact.floor().long()
    short = want - int(take.sum())
    if short > 0:  # the largest remainders get one more (ties: the lower class index)
        order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]).item(), i))
        for i in order[:short]:
            take[i] += 1
    picked = []
    for c, k in zip(classes, take.tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(picked).sort().values


def make_splits(dataset: Dataset, *, val_split: float = 0.1, train_subset: int | None = None, seed: int = 0) -> Splits:
    """Seeded, stratified train/validation split (+ optional train subset) of `dataset`."""
    if not 0 <= val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1), got {val_split}")
    g = torch.Generator().manual_seed(seed)
    train = dataset.train
    if train_subset is not None:
        least = 2 * len(dataset.classes)
        if train_subset < least or train_subset > len(train):
            raise UsageError(f"--train-subset must be between {least} (2 images per class) and {len(train)} "
                             f"(the train split's size), got {train_subset}")
        train = train.subset(_stratified_take(train.labels, train_subset, g))
    if val_split == 0:
        return Splits(dataset, train, dataset.test, dataset.test, val_is_test=True)
    val_idx = _stratified_take(train.labels, val_split, g)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    if not keep.any() or len(val_idx) == 0:
        raise UsageError(f"--val-split {val_split} leaves an empty train or validation set; use a value like 0.1")
    return Splits(dataset, train.subset(keep.nonzero().flatten()), train.subset(val_idx), dataset.test, False)
