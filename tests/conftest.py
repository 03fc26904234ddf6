from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.hardware import fused_packs_on_cpu
from bench.sample_data import make_image_folder


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "rgb")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(params=["per-member", "fused"])
def pack_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways a pack computes: member by member (the CPU's, exact) and CUDA's fused kernels, here run on the CPU."""
    if request.param == "fused":
        with fused_packs_on_cpu():
            yield request.param
    else:
        yield request.param
