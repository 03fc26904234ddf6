from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from bench.checkpoint import CheckpointSink, artifact_dir, load_checkpoint, model_path_for, open_store
from bench.data import load_image_folder, make_splits
from bench.errors import run_cli
from bench.objective import TrialSettings, TrialTrainer
from bench.predict import main as predict_main
from bench.predict import preprocess
from bench.run import main as run_main
from bench.runner import run_packs
from bench.sample_data import make_image_folder
from bench.space import build_space


def test_round_trip_gives_the_in_memory_logits(rgb_folder, cache_dir, tmp_path):
    storage_url = f"sqlite:///{tmp_path / 'rt.db'}"
    storage = optuna.storages.RDBStorage(storage_url)
    dataset = load_image_folder(rgb_folder, cache_dir=cache_dir)
    splits = make_splits(dataset, val_split=0.25, seed=0)
    store = open_store(artifact_dir(storage_url, "rt"))
    sink = CheckpointSink(store, storage, "all", dataset)
    kept = {}

    def capture(trial, model, cfg, value):
        kept["model"] = copy.deepcopy(model).cpu().float().eval()
        sink(trial, model, cfg, value)

    study = optuna.create_study(study_name="rt", storage=storage, direction="maximize")
    study.enqueue_trial({"epochs": 1})
    trainer = TrialTrainer(splits, build_space(1), TrialSettings(progress=False, precision="fp32"), on_model=capture)
    run_packs(study, trainer, 1)
    path = model_path_for(study.trials[0], storage, store, tmp_path / "model.pt")
    model, meta = load_checkpoint(path)
    assert meta.classes == ("cat", "dog", "frog") and meta.image_size == (32, 32)
    image = next((rgb_folder / "test" / "dog").glob("*.png"))
    x = preprocess(image, meta)
    with torch.inference_mode():
        assert torch.allclose(model(x), kept["model"](x), atol=1e-5)


@pytest.fixture
def gray_study(tmp_path):
    root = make_image_folder(tmp_path / "gray", size=(28, 28), mode="L")
    storage = f"sqlite:///{tmp_path / 'g.db'}"
    args = ["--dataset", str(root), "--cache-dir", str(tmp_path / "cache"), "--max-epochs", "1", "--study-name", "g",
            "--storage", storage, "--quiet", "--val-split", "0.25"]
    return args, storage, root


def test_grayscale_model_predicts_an_odd_size_rgb_image(gray_study, tmp_path, capsys):
    args, storage, _ = gray_study
    assert run_cli(run_main, [*args, "--trials", "1"]) == 0
    odd = tmp_path / "odd.jpg"
    Image.fromarray(np.full((50, 40, 3), 200, np.uint8)).save(odd)
    capsys.readouterr()
    plot = tmp_path / "out" / "pred.png"
    assert run_cli(predict_main, [str(odd), str(odd), "--study", "g", "--storage", storage, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.count("[Top-1] ") == 2 and out.count("[Top-3] ") == 2
    assert plot.exists() and plot.stat().st_size > 1000
    assert run_cli(predict_main, [str(odd), "--study", "g", "--storage", storage, "--json", "--top-k", "2"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    probs = [t["probability"] for t in record["top"]]
    assert len(probs) == 2 and probs[0] >= probs[1] and sum(probs) <= 1.0 + 1e-6


def test_keep_best_holds_one_model(gray_study, tmp_path):
    args, storage, _ = gray_study
    assert run_cli(run_main, [*args, "--trials", "3", "--sampler", "random"]) == 0
    files = [p for p in artifact_dir(storage, "g").rglob("*") if p.is_file()]
    assert len(files) == 1


def test_predict_errors(gray_study, tmp_path, capsys):
    args, storage, root = gray_study
    image = next((root / "test" / "cat").glob("*.png"))
    assert run_cli(predict_main, [str(image), "--study", "g", "--storage", storage]) == 2  # no study yet
    assert run_cli(run_main, [*args, "--trials", "1", "--keep-models", "none"]) == 0
    capsys.readouterr()
    cases = [
        ([str(image), "--study", "g", "--storage", storage], "has no stored model"),
        ([str(image), "--study", "g", "--storage", storage, "--trial", "7"], "has no trial 7"),
    ]
    for argv, message in cases:
        assert run_cli(predict_main, argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert run_cli(run_main, [*args, "--trials", "2", "--keep-models", "all"]) == 0
    bad = tmp_path / "bad.jpg"
    bad.write_text("no pixels here")
    for argv, message in (([str(bad)], "not a readable image"), ([str(tmp_path / "missing.png")], "does not exist")):
        capsys.readouterr()
        assert run_cli(predict_main, [*argv, "--study", "g", "--storage", storage, "--trial", "1"]) == 2
        assert message in capsys.readouterr().err


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"state_dict": {}, "meta": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):  # noqa: B017 - weights_only raises UnpicklingError
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
