"""`python -m bench.predict IMAGE ... --study NAME`: classify images with a trial's stored model."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from PIL import Image, UnidentifiedImageError

from bench.checkpoint import CHECKPOINT_NAME, ModelMeta, artifact_dir, load_checkpoint, model_path_for, open_store
from bench.errors import UsageError, run_cli
from bench.storage import default_storage, load_existing_study


def preprocess(path: Path, meta: ModelMeta) -> torch.Tensor:
    """Like the training data: RGB or grayscale, resized to the training size, normalised. (1, C, H, W)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if meta.in_channels == 1 else "RGB")
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"image {path} does not exist; check the path") from None
    except (UnidentifiedImageError, OSError):
        raise UsageError(f"{path} is not a readable image; pass a JPEG, PNG or other image file") from None
    h, w = meta.image_size
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, meta.in_channels).permute(2, 0, 1)
    mean = torch.tensor(meta.mean).view(-1, 1, 1)
    std = torch.tensor(meta.std).view(-1, 1, 1)
    return ((x.float() / 255 - mean) / std).unsqueeze(0)


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().softmax(1)


def choose_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    if number is None:
        try:
            return study.best_trial
        except ValueError:
            raise UsageError(f"study {study.study_name!r} has no completed trial yet; run bench.run first") from None
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not matches:
        raise UsageError(f"study {study.study_name!r} has no trial {number}; it has trials 0-{len(study.trials) - 1}")
    return matches[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__)
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL (default: sqlite:///studies/<study>.db)")
    parser.add_argument("--artifacts", default=None, help="artifact directory (default: beside the study database)")
    parser.add_argument("--trial", type=int, default=None, help="trial number (default: the best trial)")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to list (default: 3)")
    parser.add_argument("--plot", type=Path, default=None, help="save the image(s) titled with the prediction")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def plot_predictions(paths: list[Path], results: list[list[tuple[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(paths))
    rows = math.ceil(len(paths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, top in zip(axes.flat, paths, results, strict=False):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(f"{top[0][0]} ({top[0][1] * 100:.1f}%)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, storage = load_existing_study(args.study, args.storage)
    trial = choose_trial(study, args.trial)
    url = args.storage or default_storage(args.study)
    store = open_store(Path(args.artifacts) if args.artifacts else artifact_dir(url, args.study))
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path_for(trial, storage, store, Path(tmp) / CHECKPOINT_NAME)
        try:
            model, meta = load_checkpoint(path)
        except Exception as exc:
            raise UsageError(f"the stored model of trial {trial.number} cannot be loaded ({type(exc).__name__}); "
                             "retrain it with bench.run") from None
    k = max(1, min(args.top_k, len(meta.classes)))
    results, records = [], []
    for image in args.images:
        probs = predict(model, preprocess(image, meta))[0]
        top = torch.topk(probs, k)
        ranked = [(meta.classes[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        results.append(ranked)
        records.append({"image": str(image), "trial": trial.number,
                        "top": [{"class": c, "probability": p} for c, p in ranked]})
        if not args.json:
            print(f"{image}: (trial {trial.number})")
            print(f"[Top-1] {ranked[0][0]} ({ranked[0][1] * 100:.2f}%)")
            print(f"[Top-{k}] " + ", ".join(f"{c} ({p * 100:.2f}%)" for c, p in ranked))
    if args.json:
        print(json.dumps(records, indent=2))
    if args.plot:
        plot_predictions(list(args.images), results, args.plot)
        if not args.json:
            print(f"saved {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
