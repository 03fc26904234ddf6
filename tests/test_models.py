from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bench.models import build_model, count_parameters, create_model
from bench.space import BASELINE, PRESETS


def test_baseline_is_exactly_tinycnn_on_cifar():
    model = build_model(BASELINE, 3, (32, 32), 10)
    kinds = [type(m) for m in model.modules() if not isinstance(m, nn.Sequential) and m is not model]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten,
                     nn.Linear, nn.ReLU, nn.Linear]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert (linears[0].in_features, linears[0].out_features) == (64 * 8 * 8, 128)
    assert (linears[1].in_features, linears[1].out_features) == (128, 10)
    # 896 + 18,496 + 524,416 + 1,290
    assert count_parameters(model) == 545_098


def test_baseline_on_fashion_mnist_uses_7x7_features():
    model = build_model(BASELINE, 1, (28, 28), 10)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.in_features == 64 * 7 * 7
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_assignment_layout_is_the_printed_block_on_cifar():
    cfg = BASELINE.replace(conv_layout="assignment", batch_norm=True, dropout=0.3)
    model = build_model(cfg, 3, (32, 32), 10)
    assert [type(m) for m in model.features] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
                                                 nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.Flatten]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 64), (64, 128)]
    assert [m.num_features for m in model.features if isinstance(m, nn.BatchNorm2d)] == [32, 64]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3]  # none in the head
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(128 * 8 * 8, 128), (128, 10)]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    plain = build_model(cfg.replace(batch_norm=False, dropout=0.0), 3, (32, 32), 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    # dropout 0 keeps a Dropout(p=0): members differing only in dropout have one layer list and share a pack
    assert [m.p for m in plain.modules() if isinstance(m, nn.Dropout)] == [0.0]
    assert [type(m) for m in plain.features] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d,
                                                 nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.Flatten]


def test_bn_cnn_first_conv_has_896_parameters():
    model = create_model("bn-cnn")
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert sum(p.numel() for p in conv.parameters()) == 896
    assert next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features == 128 * 4 * 4


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_runs(name):
    assert create_model(name)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


FLAGS = list(itertools.product((0, 1, 2), (0.5, 2.0), (False, True), (0.0, 0.3), (False, True), (0, 256)))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 48)])
@pytest.mark.parametrize("extra,width,bn,dropout,residual,hidden", FLAGS[::3])
def test_architecture_flags_over_shapes(shape, extra, width, bn, dropout, residual, hidden):
    cfg = BASELINE.replace(extra_blocks=extra, width=width, batch_norm=bn, dropout=dropout, residual=residual,
                           hidden_units=hidden)
    model = build_model(cfg, shape[0], shape[1:], 7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn
    assert any(isinstance(m, nn.Dropout) for m in model.modules()) == (dropout > 0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (2 + extra) * (3 if residual else 1)
