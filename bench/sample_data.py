"""`python -m bench.sample_data DIR`: write a small, learnable ImageFolder tree (smoke runs, demos)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bench.errors import UsageError, run_cli


def make_image_folder(root: Path, *, size: tuple[int, int] = (32, 32), mode: str = "RGB", per_class: int = 12,
                      test_per_class: int = 4, classes: Sequence[str] = ("cat", "dog", "frog"),
                      ext: str = ".png", seed: int = 0) -> Path:
    """Each class has its own mean brightness plus noise, so a model can learn it in an epoch or two."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split, n in (("train", per_class), ("test", test_per_class)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = 40 + 170 * k / max(1, len(classes) - 1)
                shape = (h, w) if mode == "L" else (h, w, 3)
                arr = np.clip(rng.normal(base, 25, shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode).save(d / f"{i:04d}{ext}")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sample_data", description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args(argv)
    if args.per_class < 1:
        raise UsageError(f"--per-class must be 1 or more, got {args.per_class}")
    try:
        make_image_folder(args.root, per_class=args.per_class, test_per_class=max(2, args.per_class // 4))
    except OSError as exc:
        raise UsageError(f"cannot write the sample dataset to {args.root} ({exc.strerror or exc}); "
                         "pass a directory you can write to") from None
    print(f"wrote {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
