from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bench.hardware import fused_packs_on_cpu
from bench.sample_data import make_image_folder


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # workers share the cores: each with torch's default (one thread a core) would oversubscribe them;
        # bench.run's worker subprocesses size their own threads
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


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


@pytest.fixture
def ctrl_c(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str, int], Callable[[], None]]:
    """ctrl_c(owner, "name", n): `owner.name` raises KeyboardInterrupt, as Ctrl-C would, on its n-th call (the calls
    before run as usual). Returns a function that puts the real one back, for the rerun."""

    def interrupt(owner: object, name: str, on_call: int) -> Callable[[], None]:
        real, calls = getattr(owner, name), []

        def interrupted(*args: object, **kwargs: object) -> object:
            calls.append(1)
            if len(calls) == on_call:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, interrupted)
        return lambda: monkeypatch.setattr(owner, name, real)

    return interrupt
