from __future__ import annotations

import optuna
import pytest
import torch

from bench.analysis import BASELINE_CELL, CUMULATIVE_PREFIX
from bench.design import cumulative_steps, design, select
from bench.errors import run_cli
from bench.hardware import precision_name
from bench.matrix import main, pending
from bench.schema import Attr
from bench.space import BASELINE, Level
from tests.test_report import matrix_of, row

LEVELS = (
    Level("optimizer", "sgd", {"optimizer": "sgd", "lr": 0.01}),
    Level("architecture", "bn", {"batch_norm": True}),
    Level("epochs", "long", {"epochs": 20}, budgets=(20,)),
    Level("training", "step", {"scheduler": "step"}, at_budget={5: {"step_size": 2}, 20: {"step_size": 10}}),
)
PATH = (("+long", ("long",)), ("+sgd+bn", ("sgd", "bn")), ("+step", ("step",)))


def test_design_tiers_cells_seeds_and_cumulative_order():
    cells = design(LEVELS, PATH, seeds=(0, 1))
    names = list(dict.fromkeys(c.name for c in cells))
    assert names == [BASELINE_CELL, "sgd", "bn", "step", "long", "sgd @20 ep", "bn @20 ep", "step @20 ep",
                     f"{CUMULATIVE_PREFIX}02. +sgd+bn", f"{CUMULATIVE_PREFIX}03. +step"]  # step 1 is the "long" cell
    assert len(cells) == 20 and {c.seed for c in cells} == {0, 1}
    by = {c.name: c.config for c in cells}
    assert by[BASELINE_CELL] == BASELINE and by["long"] == BASELINE.replace(epochs=20)
    assert by["bn"] == BASELINE.replace(batch_norm=True)  # one factor at a time, at the baseline's 5 epochs
    assert by["bn @20 ep"] == BASELINE.replace(batch_norm=True, epochs=20)  # and against the recipe at 20
    assert (by["step"].step_size, by["step @20 ep"].step_size) == (2, 10)  # tier-dependent settings
    last = by[f"{CUMULATIVE_PREFIX}03. +step"]
    assert (last.epochs, last.optimizer, last.lr, last.batch_norm, last.step_size) == (20, "sgd", 0.01, True, 10)
    assert {c.budget for c in cells if c.name.startswith(CUMULATIVE_PREFIX)} == {20}
    for a, b in zip(cells[::2], cells[1::2], strict=True):
        assert a.config == b.config and a.seed != b.seed  # same everything but the seed
    assert [s.cell for s in cumulative_steps(LEVELS, PATH)] == [BASELINE_CELL, "long", f"{CUMULATIVE_PREFIX}02. +sgd+bn",
                                                                f"{CUMULATIVE_PREFIX}03. +step"]


def test_budget_tiers_and_only_select_part_of_the_design():
    five = design(LEVELS, PATH, seeds=(0,), budgets=(5,))
    assert [c.name for c in five] == [BASELINE_CELL, "sgd", "bn", "step"]  # no 20-epoch cell, no path
    cells = design(LEVELS, PATH, seeds=(0,))
    assert [c.name for c in select(cells, "bn", LEVELS)] == ["bn", "bn @20 ep"]  # a level: every tier of it
    assert [c.name for c in select(cells, "cumulative", LEVELS)][-1] == f"{CUMULATIVE_PREFIX}03. +step"
    with pytest.raises(ValueError, match="no cell, level or factor"):
        select(cells, "nope", LEVELS)


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
    trained_in = precision_name("auto", torch.device("cpu"))  # bf16 on a CPU with AVX512-BF16, else fp32
    assert {t.user_attrs[Attr.PRECISION] for t in study.trials} == {trained_in}
    capsys.readouterr()
    assert run_cli(main, args) == 0  # resume: everything finished, nothing new
    assert len(optuna.load_study(study_name="m", storage=storage).trials) == 6
    assert "precision" not in capsys.readouterr().err
    other = "fp32" if trained_in == "bf16" else "bf16"  # resumed where auto means the other arithmetic
    assert run_cli(main, [*args, "--precision", other]) == 0
    assert (f"has trials trained in {trained_in} (6 trials); this run trains in {other}, so its cells mix precisions"
            in capsys.readouterr().err)
    matrix = matrix_of(study)
    assert row(matrix, "BatchNorm")["n"] == 2 and row(matrix, "MSE")["n"] == 2
    assert matrix["method"].iloc[0].startswith("designed")
    assert study.user_attrs["bench.data_classes"] == ["cat", "dog", "frog"]  # the data the claims are checked against


def test_pending_reruns_failed_cells_only():
    study = optuna.create_study()
    cells = design(LEVELS, PATH, seeds=(0,))
    from bench.schema import Attr

    for state, cell in ((optuna.trial.TrialState.COMPLETE, cells[0]), (optuna.trial.TrialState.FAIL, cells[1])):
        study.add_trial(optuna.trial.create_trial(state=state, value=0.5 if state.name == "COMPLETE" else None,
                                                  user_attrs={Attr.CELL: cell.name, Attr.SEED: cell.seed}))
    todo = pending(cells, study)
    assert cells[0] not in todo and cells[1] in todo and len(todo) == len(cells) - 1


def _small_design(monkeypatch, names=(BASELINE_CELL, "BatchNorm", "MSE")):
    import bench.matrix as matrix_module

    full = matrix_module.design
    monkeypatch.setattr(matrix_module, "design", lambda **kw: [c for c in full(**kw) if c.name in names])


def _matrix_args(rgb_folder, cache_dir, tmp_path, seeds=3):
    storage = f"sqlite:///{tmp_path / 'm.db'}"
    return ["--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--study-name", "m", "--storage", storage,
            "--seeds", str(seeds), "--epochs-scale", "0.2", "--val-split", "0.25", "--quiet", "--keep-models", "none"], storage


def _cells(study):
    from bench.schema import Attr

    done: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        done.setdefault(t.user_attrs[Attr.CELL], []).append(t.user_attrs[Attr.SEED])
    return done


def test_a_killed_matrix_rerun_finishes_with_exactly_n_seeds_per_cell(rgb_folder, cache_dir, tmp_path, monkeypatch,
                                                                       ctrl_c):
    import bench.objective

    _small_design(monkeypatch)
    args, storage = _matrix_args(rgb_folder, cache_dir, tmp_path)
    release = ctrl_c(bench.objective, "fit_pack", 4)
    assert run_cli(main, args) == 130
    study = optuna.load_study(study_name="m", storage=storage)
    study.ask()  # a hard kill (SIGKILL) leaves the next cell RUNNING forever
    states = [t.state.name for t in study.trials]
    assert "RUNNING" in states and "FAIL" in states
    release()
    assert run_cli(main, args) == 0
    study = optuna.load_study(study_name="m", storage=storage)
    assert {cell: sorted(seeds) for cell, seeds in _cells(study).items()} == {
        BASELINE_CELL: [0, 1, 2], "BatchNorm": [0, 1, 2], "MSE": [0, 1, 2]}
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    mse = row(matrix_of(study), "MSE")
    assert mse["n"] == 3 and mse["n_pairs"] == 3


def test_a_diverged_cell_is_rerun_once_then_counted_as_diverged(rgb_folder, cache_dir, tmp_path, monkeypatch):
    import bench.objective
    from bench.train import Diverged, PackLog

    _small_design(monkeypatch)
    args, storage = _matrix_args(rgb_folder, cache_dir, tmp_path, seeds=1)
    real_fit = bench.objective.fit_pack

    def mse_diverges(members, splits, **k):
        if members[0].cfg.loss == "mse":  # as the loop reports it: the member leaves with Diverged
            members[0].error = Diverged("loss became nan in epoch 1")
            k["on_leave"](members[0])
            return PackLog(1)
        return real_fit(members, splits, **k)

    monkeypatch.setattr(bench.objective, "fit_pack", mse_diverges)
    assert run_cli(main, args) == 0
    study = optuna.load_study(study_name="m", storage=storage)
    from bench.schema import Attr

    mse = [t for t in study.trials if t.user_attrs.get(Attr.CELL) == "MSE"]
    assert [t.user_attrs[Attr.STOP_REASON] for t in mse] == ["diverged", "diverged"]  # run, and rerun once
    assert run_cli(main, args) == 0  # settled: a third run adds nothing
    assert len(optuna.load_study(study_name="m", storage=storage).trials) == 4
    mse_row = row(matrix_of(study), "MSE")  # an outcome, named: no seed trained, so no mean and no verdict
    assert mse_row["n"] == 1 and mse_row["n_diverged"] == 1 and mse_row["diverged_seeds"] == "0"
    assert "1 of 1 diverged (seed 0)" in mse_row["note"] and mse_row["verdict"] == "claim is about CIFAR-10"


@pytest.mark.parametrize("extra, message", [
    (["--max-epochs", "0"], "--max-epochs"),
    (["--seeds", "0"], "--seeds"),
    (["--epochs-scale", "0"], "--epochs-scale"),
    (["--train-subset", "4"], "2 images per class"),
])
def test_matrix_bad_input_is_one_line_and_exit_2(rgb_folder, cache_dir, tmp_path, capsys, extra, message):
    args, _ = _matrix_args(rgb_folder, cache_dir, tmp_path)
    assert run_cli(main, [*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) <= 2 and "Traceback" not in err


def test_two_concurrent_matrix_runs_leave_no_duplicate_cell(rgb_folder, cache_dir, tmp_path):
    import subprocess
    import sys

    storage = f"sqlite:///{tmp_path / 'c.db'}"
    cmd = [sys.executable, "-m", "bench.matrix", "--dataset", str(rgb_folder), "--cache-dir", str(cache_dir),
           "--study-name", "c", "--storage", storage, "--seeds", "1", "--epochs-scale", "0.05", "--val-split", "0.25",
           "--quiet", "--keep-models", "none", "--precision", "fp32"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="c", storage=storage)
    cells = _cells(study)
    assert len(cells) == len(design(seeds=(0,))) and all(seeds == [0] for seeds in cells.values())
    assert len(study.trials) == len(cells)  # nothing enqueued or run twice
    ran = [sum("seed=0 trial" in line for line in out.splitlines()) for out in outputs]
    assert sum(ran) == len(cells)


def test_stop_after_ends_after_the_running_trial_and_the_same_command_completes(rgb_folder, cache_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    """--stop-after 2 with every trial (one seed of a cell) taking 70 s on a fake clock: trials start at 0 and 70 s,
    the second finishes past the 2 minutes and is recorded, then the run exits 0 in the middle of a 3-seed level;
    reruns pick up at the next seed and complete the design, nothing twice."""
    import types

    import bench.matrix as matrix_module
    import bench.objective
    from bench.schema import Attr

    _small_design(monkeypatch)
    clock, reads = [0.0], [0]

    def monotonic() -> float:
        reads[0] += 1
        assert reads[0] < 200, "the run never stopped"  # a loop that ignores its deadline fails here, not hangs
        return clock[0]

    monkeypatch.setattr(matrix_module, "time", types.SimpleNamespace(monotonic=monotonic))
    real_fit = bench.objective.fit_pack

    def seventy_seconds(*a, **k):
        clock[0] += 70.0
        return real_fit(*a, **k)

    monkeypatch.setattr(bench.objective, "fit_pack", seventy_seconds)
    args, storage = _matrix_args(rgb_folder, cache_dir, tmp_path)
    args += ["--stop-after", "2"]
    for piece, (trials, cells) in enumerate([(2, 0), (4, 1), (6, 2), (8, 2)], start=1):
        assert run_cli(main, args) == 0
        out = capsys.readouterr().out
        study = optuna.load_study(study_name="m", storage=storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * trials, piece  # the running trial finished
        assert f"{cells} of 3 cells done ({trials} of 9 trials)" in out and "rerun the same command to continue" in out
    assert run_cli(main, args) == 0
    out = capsys.readouterr().out
    assert "[matrix] 9 of 9 trials done" in out and "rerun" not in out
    study = optuna.load_study(study_name="m", storage=storage)
    runs = [(t.user_attrs[Attr.CELL], t.user_attrs[Attr.SEED]) for t in study.trials]
    assert len(runs) == len(set(runs)) == 9  # no (cell, seed) run twice
    assert run_cli(main, args) == 0 and len(optuna.load_study(study_name="m", storage=storage).trials) == 9


def test_matrix_packs_give_the_solo_numbers(rgb_folder, cache_dir, tmp_path, monkeypatch):
    """--pack 2 trains each cell's seeds two at a time as one network: every (cell, seed) ends as it did alone."""
    from bench.schema import Attr

    _small_design(monkeypatch, names=(BASELINE_CELL, "label smoothing 0.1", "Dropout 0.3", "BatchNorm"))
    results = {}
    for pack in ("1", "2"):
        args, storage = _matrix_args(rgb_folder, cache_dir, tmp_path / pack)
        (tmp_path / pack).mkdir()
        assert run_cli(main, [*args, "--pack", pack]) == 0  # --precision auto: bf16 on a CPU that has it
        study = optuna.load_study(study_name="m", storage=storage)
        results[pack] = {(t.user_attrs[Attr.CELL], t.user_attrs[Attr.SEED]):
                         (t.user_attrs[Attr.TEST_ACC], t.user_attrs[Attr.LOSS_CURVE], t.user_attrs[Attr.PACK_SIZE])
                         for t in study.trials}
    assert results["1"].keys() == results["2"].keys() and len(results["1"]) == 12
    assert {size for *_, size in results["1"].values()} == {1} and 2 in {size for *_, size in results["2"].values()}
    for key, (acc, losses, _) in results["1"].items():
        packed_acc, packed_losses, _ = results["2"][key]
        assert packed_acc == acc and packed_losses == losses, key  # bit for bit (bench.hardware.pack_runs_per_member)
