from __future__ import annotations

import optuna
import pytest

from bench.analysis import BASELINE_CELL, CUMULATIVE_PREFIX, matrix_frame, trials_frame
from bench.errors import run_cli
from bench.matrix import design, main, pending
from bench.space import BASELINE, Level

LEVELS = (
    Level("optimizer", "sgd", {"optimizer": "sgd", "lr": 0.01}),
    Level("architecture", "bn", {"batch_norm": True}),
    Level("epochs", "long", {"epochs": 20}),
)
PATH = (("+long", ("long",)), ("+sgd+bn", ("sgd", "bn")))


def test_design_cells_seeds_and_cumulative_order():
    cells = design(LEVELS, PATH, seeds=(0, 1))
    names = list(dict.fromkeys(c.name for c in cells))
    assert names == [BASELINE_CELL, "sgd", "bn", "long", f"{CUMULATIVE_PREFIX}01. +long", f"{CUMULATIVE_PREFIX}02. +sgd+bn"]
    assert len(cells) == 12 and {c.seed for c in cells} == {0, 1}
    by = {c.name: c.config for c in cells}
    assert by[BASELINE_CELL] == BASELINE
    assert by["bn"] == BASELINE.replace(batch_norm=True)  # one factor at a time
    last = by[f"{CUMULATIVE_PREFIX}02. +sgd+bn"]
    assert (last.epochs, last.optimizer, last.lr, last.batch_norm) == (20, "sgd", 0.01, True)  # keeps earlier steps
    for a, b in zip(cells[::2], cells[1::2], strict=True):
        assert a.config == b.config and a.seed != b.seed  # same everything but the seed


def test_epochs_scale():
    cells = design(LEVELS, PATH, seeds=(0,), epochs_scale=0.2)
    by = {c.name: c.config.epochs for c in cells}
    assert by[BASELINE_CELL] == 1 and by["long"] == 4


def test_unknown_level_in_cumulative_path():
    with pytest.raises(ValueError, match="unknown levels"):
        design(LEVELS, (("+x", ("nope",)),))


def test_run_resume_and_report_rows(rgb_folder, cache_dir, tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--study-name", "m", "--storage", storage,
            "--seeds", "2", "--epochs-scale", "0.2", "--val-split", "0.25", "--quiet", "--keep-models", "none"]
    assert run_cli(main, [*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing was written" in out and "gradient clipping" in out
    assert not (tmp_path / "m.db").exists()

    import bench.matrix as matrix_module

    full = matrix_module.design
    monkeypatch.setattr(matrix_module, "design",
                        lambda **kw: [c for c in full(**kw) if c.name in (BASELINE_CELL, "BatchNorm", "MSE")])
    assert run_cli(main, args) == 0
    study = optuna.load_study(study_name="m", storage=storage)
    assert len(study.trials) == 6
    assert run_cli(main, args) == 0  # resume: everything finished, nothing new
    assert len(optuna.load_study(study_name="m", storage=storage).trials) == 6
    matrix = matrix_frame(trials_frame(study)).set_index("level")
    assert matrix.loc["BatchNorm", "n"] == 2 and matrix.loc["MSE", "n"] == 2
    assert matrix["method"].iloc[0].startswith("designed")


def test_pending_reruns_failed_cells_only():
    study = optuna.create_study()
    cells = design(LEVELS, PATH, seeds=(0,))
    from bench.objective import Attr

    for state, cell in ((optuna.trial.TrialState.COMPLETE, cells[0]), (optuna.trial.TrialState.FAIL, cells[1])):
        study.add_trial(optuna.trial.create_trial(state=state, value=0.5 if state.name == "COMPLETE" else None,
                                                  user_attrs={Attr.CELL: cell.name, Attr.SEED: cell.seed}))
    todo = pending(cells, study)
    assert cells[0] not in todo and cells[1] in todo and len(todo) == len(cells) - 1
