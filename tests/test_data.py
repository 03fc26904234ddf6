from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.data import load_dataset, load_image_folder, make_splits
from bench.errors import UsageError
from bench.sample_data import make_image_folder


def test_rgb_folder_loads_as_uint8_tensors(rgb_folder, cache_dir):
    ds = load_image_folder(rgb_folder, cache_dir=cache_dir)
    assert ds.train.images.shape == (36, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (12, 3, 32, 32)
    assert ds.classes == ("cat", "dog", "frog")
    assert torch.bincount(ds.train.labels).tolist() == [12, 12, 12]
    assert len(ds.mean) == 3 and all(0 < s < 1 for s in ds.std)
    assert ds.crop_padding == 4


def test_grayscale_folder_has_one_channel(tmp_path, cache_dir):
    ds = load_image_folder(make_image_folder(tmp_path / "g", size=(28, 28), mode="L"), cache_dir=cache_dir)
    assert ds.channels == 1 and ds.image_size == (28, 28) and ds.crop_padding == 3


def test_uniform_odd_size_is_kept(tmp_path, cache_dir):
    ds = load_image_folder(make_image_folder(tmp_path / "o", size=(48, 64)), cache_dir=cache_dir)
    assert ds.image_size == (64, 48)


def test_mixed_sizes_are_resized_and_said(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "m", size=(32, 32))
    make_image_folder(root, size=(40, 20), per_class=2, test_per_class=1, seed=1, ext=".jpg")
    said = []
    ds = load_image_folder(root, image_size=24, cache_dir=cache_dir, log=said.append)
    assert ds.image_size == (24, 24)
    assert any("resizing" in s for s in said)


def test_second_load_uses_the_cache_and_a_corrupt_cache_is_rebuilt(rgb_folder, cache_dir, capsys):
    first = load_image_folder(rgb_folder, cache_dir=cache_dir)
    [cache_file] = cache_dir.glob("*.pt")
    stamp = cache_file.stat().st_mtime_ns
    load_image_folder(rgb_folder, cache_dir=cache_dir)
    assert cache_file.stat().st_mtime_ns == stamp  # reused, not rewritten
    data = bytearray(cache_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache_file.write_bytes(bytes(data))
    again = load_image_folder(rgb_folder, cache_dir=cache_dir)
    assert "corrupt" in capsys.readouterr().err
    assert torch.equal(again.train.images, first.train.images)


def test_cache_goes_stale_when_the_files_change(rgb_folder, cache_dir):
    load_image_folder(rgb_folder, cache_dir=cache_dir)
    make_image_folder(rgb_folder, per_class=13, test_per_class=4, seed=5)
    ds = load_image_folder(rgb_folder, cache_dir=cache_dir)
    assert len(ds.train) == 39
    assert len(list(cache_dir.glob("*.pt"))) == 2


def test_val_folder_is_accepted_as_test(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "v")
    (root / "test").rename(root / "val")
    assert len(load_image_folder(root, cache_dir=cache_dir).test) == 12


@pytest.mark.parametrize("breakage, message", [
    ("mismatch", "train and test classes differ"),
    ("empty", "holds no images"),
    ("corrupt", "cannot read image"),
    ("no-test", "needs train/ and test/"),
    ("one-class", "at least 2"),
])
def test_folder_errors_name_the_path(tmp_path, cache_dir, breakage, message):
    root = make_image_folder(tmp_path / "bad")
    if breakage == "mismatch":
        (root / "test" / "frog").rename(root / "test" / "toad")
    elif breakage == "empty":
        (root / "train" / "owl").mkdir()
    elif breakage == "corrupt":
        (root / "train" / "dog" / "0003.png").write_bytes(b"not an image at all")
    elif breakage == "no-test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in (root / "test").iterdir():
            d.rmdir()
        (root / "test").rmdir()
    elif breakage == "one-class":
        root = make_image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(UsageError, match=message) as info:
        load_image_folder(root, cache_dir=cache_dir)
    assert str(root) in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_name_and_offline_download_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="neither a known name"):
        load_dataset(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(UsageError, match=r"cifar10.*--dataset PATH"):
        load_dataset("cifar10", tmp_path / "empty-data-dir")


def test_splits_are_seeded_stratified_and_disjoint(rgb_folder, cache_dir):
    ds = load_image_folder(rgb_folder, cache_dir=cache_dir)
    a = make_splits(ds, val_split=0.25, seed=1)
    b = make_splits(ds, val_split=0.25, seed=1)
    c = make_splits(ds, val_split=0.25, seed=2)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.bincount(a.val.labels).tolist() == [3, 3, 3]
    assert len(a.train) + len(a.val) == len(ds.train)
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val.images)
    assert not a.val_is_test


def test_val_split_zero_uses_the_test_set_and_subset_is_stratified(rgb_folder, cache_dir):
    ds = load_image_folder(rgb_folder, cache_dir=cache_dir)
    s = make_splits(ds, val_split=0, train_subset=9, seed=0)
    assert s.val_is_test and s.val is ds.test
    assert torch.bincount(s.train.labels).tolist() == [3, 3, 3]
    with pytest.raises(UsageError, match="--train-subset"):
        make_splits(ds, train_subset=1000)


def test_stored_path_is_recorded(rgb_folder, cache_dir):
    assert Path(load_image_folder(rgb_folder, cache_dir=cache_dir).source) == rgb_folder


@pytest.mark.parametrize("n", [6, 15, 25, 36])
def test_train_subset_gives_exactly_n_stratified_images(rgb_folder, cache_dir, n):
    ds = load_image_folder(rgb_folder, cache_dir=cache_dir)  # 3 classes x 12 train images
    s = make_splits(ds, val_split=0, train_subset=n, seed=0)
    assert len(s.train) == n
    counts = torch.bincount(s.train.labels, minlength=3).tolist()
    assert max(counts) - min(counts) <= 1


def test_train_subset_below_two_per_class_is_a_usage_error(rgb_folder, cache_dir):
    ds = load_image_folder(rgb_folder, cache_dir=cache_dir)
    with pytest.raises(UsageError, match="between 6 \\(2 images per class\\)"):
        make_splits(ds, train_subset=4)
