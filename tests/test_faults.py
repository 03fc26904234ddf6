"""Training faults and bad input: one-line errors, exit status 2, nothing stored changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import bench.objective
from bench.errors import run_cli
from bench.run import main
from bench.runner import run_packs
from bench.schema import Attr


@pytest.fixture
def base_args(rgb_folder, cache_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies' / 'f.db'}"
    return ["--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--max-epochs", "1", "--study-name", "f",
            "--storage", storage, "--val-split", "0.25", "--quiet"], storage


def run(*args: str) -> int:
    return run_cli(main, list(args))


def test_a_diverging_trial_is_pruned_as_diverged_and_the_study_goes_on(base_args, monkeypatch):
    args, storage = base_args
    real = bench.objective.suggest

    def huge_lr_first(trial, space, grid_only=False):
        params = real(trial, space, grid_only=grid_only)
        if trial.number == 0:
            params |= {"optimizer": "sgd", "lr": 1e6, "momentum": 0.9}
        return params

    monkeypatch.setattr(bench.objective, "suggest", huge_lr_first)
    assert run(*args, "--trials", "2", "--max-epochs", "3", "--pruner", "none") == 0
    study = optuna.load_study(study_name="f", storage=storage)
    first = study.trials[0]
    assert first.state == TrialState.PRUNED and first.user_attrs[Attr.STOP_REASON] == "diverged"
    assert study.trials[1].state == TrialState.COMPLETE


def test_an_exception_is_recorded_and_all_failing_stops_with_a_clear_error(base_args, monkeypatch, capsys):
    args, storage = base_args

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bench.objective, "fit_pack", broken)
    assert run(*args, "--trials", "5") == 1
    err = capsys.readouterr().err
    assert "3 trials in a row failed" in err and "disk on fire" in err
    study = optuna.load_study(study_name="f", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert study.trials[0].user_attrs[Attr.FAIL_REASON] == "RuntimeError: disk on fire"


def test_out_of_memory_fails_the_trial_with_its_reason(base_args, monkeypatch):
    args, storage = base_args
    calls = []

    def oom_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_fit(*a, **k)

    real_fit = bench.objective.fit_pack
    monkeypatch.setattr(bench.objective, "fit_pack", oom_once)
    assert run(*args, "--trials", "1") == 0
    study = optuna.load_study(study_name="f", storage=storage)
    first, second = study.trials
    assert first.state == TrialState.FAIL
    assert first.user_attrs[Attr.FAIL_REASON].startswith("out of memory: CUDA out of memory")
    assert second.state == TrialState.COMPLETE


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case, message", [
    ("unknown-name", "neither a known name"),
    ("empty-dir", "needs train/ and test/"),
    ("class-mismatch", "train and test classes differ"),
    ("corrupt-image", "cannot read image"),
    ("zero-trials", "--trials must be 1 or more"),
    ("negative-trials", "--trials must be 1 or more"),
    ("malformed-url", "not a database URL"),
    ("unreachable-url", "cannot open storage"),
    ("other-dataset", "--force"),
    ("other-space", "--force"),
    ("bad-device", "is not a device"),
    ("fp16-pack", "fp16 cannot train a pack"),
])
def test_bad_input_leaves_the_stored_study_untouched(base_args, tmp_path, capsys, case, message):
    from bench.sample_data import make_image_folder

    args, storage = base_args
    assert run(*args, "--trials", "1") == 0
    db = Path(storage.removeprefix("sqlite:///"))
    before = _digest(db)
    capsys.readouterr()
    dataset_at = args.index("--dataset") + 1
    bad = list(args)
    extra = ["--trials", "2"]
    if case == "unknown-name":
        bad[dataset_at] = "imagenet"
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        bad[dataset_at] = str(tmp_path / "empty")
    elif case in ("class-mismatch", "corrupt-image", "other-dataset"):
        root = make_image_folder(tmp_path / case)
        if case == "class-mismatch":
            (root / "test" / "dog").rename(root / "test" / "wolf")
        if case == "corrupt-image":
            (root / "test" / "dog" / "0001.png").write_bytes(b"\x89PNG broken")
        bad[dataset_at] = str(root)
    elif case in ("zero-trials", "negative-trials"):
        extra = ["--trials", "0" if case == "zero-trials" else "-3"]
    elif case == "malformed-url":
        bad[bad.index("--storage") + 1] = "studies/f.db"
    elif case == "unreachable-url":
        bad[bad.index("--storage") + 1] = "postgresql://user:hunter2@127.0.0.1:9/none"
    elif case == "other-space":
        extra += ["--max-epochs", "4"]
    elif case == "bad-device":
        extra += ["--device", "gpu"]
    elif case == "fp16-pack":
        extra += ["--pack", "4", "--precision", "fp16"]
    assert run(*bad, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "hunter2" not in err
    assert _digest(db) == before


def test_unwritable_studies_directory(rgb_folder, cache_dir, tmp_path, capsys):
    blocker = tmp_path / "studies"
    blocker.write_text("a file where the studies directory should be")
    args = ["--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--study-name", "x", "--quiet",
            "--storage", f"sqlite:///{blocker / 'x.db'}", "--trials", "1"]
    assert run(*args) == 2
    assert "cannot create" in capsys.readouterr().err


def test_sample_data_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    from bench.sample_data import main as sample_data

    blocker = tmp_path / "data"
    blocker.write_text("a file where the dataset should go")
    assert run_cli(sample_data, [str(blocker / "tiny")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write the sample dataset") and len(err.splitlines()) == 1
    assert run_cli(sample_data, [str(tmp_path / "ok"), "--per-class", "0"]) == 2
    assert "--per-class must be 1 or more" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_studies_directory(rgb_folder, cache_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    args = ["--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--study-name", "x", "--quiet",
            "--storage", f"sqlite:///{ro / 'x.db'}", "--trials", "1"]
    assert run(*args) == 2
    assert "not writable" in capsys.readouterr().err


def _trainer(rgb_folder, cache_dir):
    from bench.data import load_image_folder, make_splits
    from bench.objective import TrialSettings, TrialTrainer
    from bench.space import build_space

    splits = make_splits(load_image_folder(rgb_folder, cache_dir=cache_dir), val_split=0.25, seed=0)
    return TrialTrainer(splits, build_space(3), TrialSettings(device="cpu", precision="fp32", progress=False))


def test_a_pruned_trial_records_what_it_cost_and_measured(rgb_folder, cache_dir):
    from bench.space import BASELINE, build_space, params_for_config

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.1))  # prunes at once
    study.enqueue_trial(params_for_config(BASELINE.replace(epochs=3, batch_size=64), build_space(3)))
    run_packs(study, _trainer(rgb_folder, cache_dir), 1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED and t.user_attrs[Attr.STOP_REASON] == "pruned"
    a = t.user_attrs
    assert a[Attr.EPOCHS_RUN] == 1 and a[Attr.TRAIN_SECONDS] > 0 and a[Attr.IMAGES_PER_SEC] > 0
    assert a[Attr.VAL_ACC] == a[Attr.VAL_CURVE][-1] and len(a[Attr.LOSS_CURVE]) == 1


def test_a_retried_trial_starts_with_fresh_curves(rgb_folder, cache_dir):
    from bench.space import BASELINE, build_space, params_for_config

    study = optuna.create_study(direction="maximize")
    # a queued trial's stored curves (no retry path copies them now) must not leak into its own
    dead = {Attr.VAL_CURVE: [0.1, 0.2, 0.3], Attr.LOSS_CURVE: [9.0, 8.0, 7.0], Attr.RETRY_OF: 0}
    study.enqueue_trial(params_for_config(BASELINE.replace(epochs=2, batch_size=64), build_space(3)), user_attrs=dead)
    run_packs(study, _trainer(rgb_folder, cache_dir), 1)
    a = study.trials[0].user_attrs
    assert len(a[Attr.VAL_CURVE]) == 2 and len(a[Attr.LOSS_CURVE]) == 2 and 9.0 not in a[Attr.LOSS_CURVE]
    assert a[Attr.KEPT_EPOCH] == 2 and study.trials[0].value == a[Attr.VAL_CURVE][-1]


def test_a_heartbeat_retry_keeps_the_trials_identity_and_none_of_the_dead_attempts_results(tmp_path):
    """Optuna's retry copies every user attribute; bench's keeps the cell and seed, so a retry that dies before its first
    epoch neither shows the dead attempt's curve nor counts its epochs and seconds again in what the study cost, and
    one that completes carries no stale test accuracy."""
    from bench.analysis import cost_frame, trials_frame
    from bench.space import BASELINE, build_space, params_for_config, suggest
    from bench.storage import RetryDeadTrial, open_storage

    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'h.db'}").get_heartbeat_stale_trial_callback(), RetryDeadTrial)
    space = build_space(3)
    study = optuna.create_study(direction="maximize")
    dead = {Attr.CELL: "baseline", Attr.SEED: 7, Attr.VAL_CURVE: [0.1, 0.2, 0.3], Attr.LOSS_CURVE: [9.0, 8.0, 7.0],
            Attr.EPOCHS_RUN: 3, Attr.TRAIN_SECONDS: 36.0, Attr.TEST_ACC: 0.3, Attr.STOP_REASON: "completed",
            Attr.TRAIN_IMAGES: 1000}  # killed while its result was being stored
    study.enqueue_trial(params_for_config(BASELINE.replace(epochs=3), space), user_attrs=dead)
    trial = study.ask()
    suggest(trial, space)
    study.tell(trial, state=TrialState.FAIL)  # as the heartbeat fails it
    RetryDeadTrial(max_retry=2)(study, study.trials[0])
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.params == study.trials[0].params and len(retry.params) > 5
    assert retry.user_attrs == {Attr.CELL: "baseline", Attr.SEED: 7} and retry.system_attrs["failed_trial"] == 0
    study.tell(study.ask(), state=TrialState.FAIL)  # the retry's worker dies before its first epoch
    frame = trials_frame(study, space)
    assert frame["val_curve"].tolist() == [[0.1, 0.2, 0.3], []] and frame["test_acc"].isna().tolist() == [False, True]
    cost = cost_frame(frame)
    assert cost["images_trained"].tolist() == [3 * 1000] and cost["device_hours"].tolist() == [0.01]
