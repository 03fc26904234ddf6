from __future__ import annotations

import pytest
import torch

from bench.augment import (
    AugmentConfig,
    BatchAugment,
    color_jitter,
    random_affine,
    random_crop,
    random_erasing,
    random_flip,
    random_grayscale,
)
from bench.space import BASELINE


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 64, c: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(123))


def test_flip_is_exact_and_per_sample():
    x = batch()
    out = random_flip(x, 0.5, gen())
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert (flipped | kept).all()
    assert 10 < flipped.sum() < 54  # p = 0.5 over 64 samples
    assert torch.equal(random_flip(x, 0.0, gen()), x)


def test_crop_is_a_shifted_window_with_zero_fill():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    out = random_crop(x, 1, gen())
    padded = torch.nn.functional.pad(x[0], (1, 1, 1, 1))
    windows = {(dy, dx): padded[:, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)}
    seen = set()
    for o in out:
        match = [k for k, wdw in windows.items() if torch.equal(o, wdw)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 9  # every offset occurs: offsets are drawn per sample


def test_crop_keeps_shape():
    assert random_crop(batch(8, 1, 28, 28), 3, gen()).shape == (8, 1, 28, 28)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_stays_in_range_and_differs_per_sample(channels):
    x = batch(c=channels)
    out = color_jitter(x, 0.4, gen())
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    ratios = out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    assert ratios.std() > 0.01


def test_color_jitter_zero_strength_is_identity():
    x = batch()
    assert torch.allclose(color_jitter(x, 0.0, gen()), x, atol=1e-6)


def test_affine_identity_when_all_ranges_are_zero():
    x = batch()
    assert torch.allclose(random_affine(x, 0.0, 0.0, 0.0, gen()), x, atol=1e-5)


def test_rotation_draws_an_angle_per_sample():
    x = torch.ones(16, 3, 16, 16)
    out = random_affine(x, 45.0, 0.0, 0.0, gen())
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 + 1e-6
    assert torch.allclose(out[:, :, 6:10, 6:10], x[:, :, 6:10, 6:10], atol=1e-4)  # the centre stays put
    filled = (out < 0.5).flatten(1).sum(1)  # zero-filled corners grow with |angle|
    assert len(set(filled.tolist())) > 4


def test_scale_down_leaves_a_zero_border():
    x = torch.ones(8, 1, 16, 16)
    out = random_affine(x, 0.0, 0.0, 0.5, gen())
    border = torch.cat([out[:, :, 0], out[:, :, -1]], 1).mean(dim=(1, 2))
    assert (border < 1).any() and out.min() >= 0


def test_grayscale_makes_channels_equal_for_picked_samples():
    x = batch()
    out = random_grayscale(x, 0.5, gen())
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 10 < gray.sum() < 54
    assert torch.equal(out[~gray], x[~gray])
    assert torch.equal(random_grayscale(x, 0.0, gen()), x)


def test_erasing_zeroes_one_rectangle_per_picked_sample():
    x = batch() + 1.0  # no zeros in the input
    out = random_erasing(x, 0.5, gen())
    erased = (out == 0).all(dim=1)  # (N, H, W)
    picked = erased.flatten(1).any(1)
    assert 10 < picked.sum() < 54
    for mask in erased[picked]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a solid rectangle
        area = mask.sum().item() / mask.numel()
        assert 0.005 <= area <= 0.5
    assert torch.equal(random_erasing(x, 0.0, gen()), x)


def test_batch_augment_with_nothing_on_is_normalisation():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(AugmentConfig(), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), torch.device("cpu"))
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(aug(images, gen()), expected, atol=1e-5)
    assert torch.allclose(aug.normalize(images), expected, atol=1e-5)


def test_full_pipeline_is_seeded():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(crop_padding=4, flip=True, jitter_strength=0.2, rotation_degrees=15, affine_shear=10,
                        affine_scale=0.2, grayscale_p=0.1, erasing_p=0.2)
    aug = BatchAugment(cfg, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    a, b = aug(images, gen(7)), aug(images, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(images, gen(8)))
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32


def test_a_trial_augments_with_each_knob_under_its_switch():
    assert AugmentConfig.from_train_config(BASELINE.replace(crop=False, flip=False)) == AugmentConfig()
    assert AugmentConfig.from_train_config(BASELINE, dataset_padding=3) == AugmentConfig(crop_padding=3, flip=True)
    on = BASELINE.replace(crop_padding=2, color_jitter=True, rotation=True, affine=True, grayscale=True, erasing=True)
    assert AugmentConfig.from_train_config(on) == AugmentConfig(
        crop_padding=2, flip=True, jitter_strength=on.jitter_strength, rotation_degrees=on.rotation_degrees,
        affine_shear=on.affine_shear, affine_scale=on.affine_scale, grayscale_p=on.grayscale_p, erasing_p=on.erasing_p)
