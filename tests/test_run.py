from __future__ import annotations

import optuna
import pytest
import torch

from bench.errors import run_cli
from bench.hardware import hardware_name, precision_name
from bench.run import main
from bench.schema import Attr
from bench.space import BASELINE, build_space, config_from_params


def run(*args: str) -> int:
    return run_cli(main, [*args, "--quiet"])


@pytest.fixture
def study_args(rgb_folder, cache_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies' / 's.db'}"
    return ["--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--max-epochs", "1",
            "--study-name", "s", "--storage", storage, "--seed", "0", "--val-split", "0.25"], storage


def test_two_trial_study_end_to_end_then_resume(study_args, capsys):
    args, storage = study_args
    assert run(*args, "--trials", "2") == 0
    study = optuna.load_study(study_name="s", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(trials) == 2
    baseline = study.trials[0]
    assert config_from_params(baseline.params) == BASELINE.replace(epochs=1)
    attrs = baseline.user_attrs
    assert len(attrs[Attr.VAL_CURVE]) == len(attrs[Attr.LOSS_CURVE]) == attrs[Attr.EPOCHS_RUN] == 1
    for key in (Attr.TEST_ACC, Attr.TRAIN_SECONDS, Attr.IMAGES_PER_SEC, Attr.PARAM_COUNT, Attr.DEVICE, Attr.SEED):
        assert key in attrs
    assert attrs[Attr.STOP_REASON] == "completed"
    assert attrs[Attr.PRECISION] == precision_name("auto", torch.device("cpu"))
    assert attrs[Attr.HARDWARE] == hardware_name(torch.device("cpu")) and attrs[Attr.TORCH] == torch.__version__
    assert f", {torch.get_num_threads()} threads, " in attrs[Attr.HARDWARE]
    assert attrs[Attr.TRAIN_IMAGES] == 27 and attrs[Attr.NUM_CLASSES] == 3
    out = capsys.readouterr().out
    assert "0 finished trials; adding 2" in out
    assert "one accuracy on the 9 validation images is +-32.7 points" in out  # 36 images, val split 0.25
    assert study.user_attrs["bench.val_images"] == 9 and study.user_attrs["bench.max_epochs"] == 1

    assert run(*args, "--trials", "3") == 0
    out = capsys.readouterr().out
    assert "2 finished trials; adding 1" in out
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 3
    assert study.trials[2].params != study.trials[1].params  # the resumed sampler did not repeat itself

    assert run(*args, "--trials", "2") == 0  # already there: adds nothing
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3


def test_no_baseline_and_random_sampler(study_args):
    args, storage = study_args
    assert run(*args, "--trials", "1", "--no-baseline", "--sampler", "random", "--pruner", "none") == 0
    [trial] = optuna.load_study(study_name="s", storage=storage).trials
    assert config_from_params(trial.params) != BASELINE.replace(epochs=1)


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials must be 1 or more"),
    (["--storage", "not-a-url"], "not a database URL"),
    (["--storage", "postgresql+nodriver://u:secret@127.0.0.1:1/db"], "cannot open storage"),
])
def test_bad_input_is_one_line_and_exit_2(study_args, capsys, extra, message):
    args, _ = study_args
    assert run(*args, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert "secret" not in err


def test_study_with_another_dataset_is_refused_unless_forced(study_args, tmp_path, capsys):
    from bench.sample_data import make_image_folder

    args, storage = study_args
    assert run(*args, "--trials", "1") == 0
    other = make_image_folder(tmp_path / "other")
    changed = [a if a != args[1] else str(other) for a in args]
    assert run(*changed, "--trials", "2") == 2
    assert "--force" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1
    assert run(*changed, "--trials", "2", "--force") == 0


def test_space_signature_changes_with_max_epochs():
    from bench.storage import space_signature

    assert space_signature(build_space(2)) != space_signature(build_space(3))
