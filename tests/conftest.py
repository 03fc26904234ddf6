from __future__ import annotations

from pathlib import Path

import pytest

from bench.sample_data import make_image_folder


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "rgb")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
