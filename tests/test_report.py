from __future__ import annotations

import math
import re

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from bench.analysis import (
    BASELINE_CELL,
    bootstrap_diff,
    bootstrap_mean,
    matrix_frame,
    pareto_front_rows,
    trials_frame,
    verdict,
)
from bench.errors import run_cli
from bench.objective import Attr
from bench.report import NOTHING, main, write_report
from bench.space import BASELINE, build_space, params_for_config

SPACE = build_space(max_epochs=5)
DISTS = {p.name: p.distribution for p in SPACE}


def add_trial(study, cfg=BASELINE, *, test_acc=0.5, state=TrialState.COMPLETE, cell=None, seconds=10.0, curve=None):
    params = params_for_config(cfg, SPACE)
    attrs = {Attr.TEST_ACC: test_acc, Attr.VAL_ACC: test_acc, Attr.TRAIN_SECONDS: seconds, Attr.EPOCHS_RUN: 2,
             Attr.VAL_CURVE: curve or [test_acc - 0.1, test_acc], Attr.LOSS_CURVE: [2.0, 1.5], Attr.DEVICE: "cpu"}
    if cell:
        attrs[Attr.CELL] = cell
    study.add_trial(create_trial(params=params, distributions={k: DISTS[k] for k in params},
                                 value=test_acc if state == TrialState.COMPLETE else None,
                                 state=state, user_attrs=attrs))


def designed_study(name="designed"):
    study = optuna.create_study(study_name=name, direction="maximize")
    for acc in (0.50, 0.52, 0.54):
        add_trial(study, test_acc=acc, cell=BASELINE_CELL)
    for acc in (0.60, 0.62, 0.64):
        add_trial(study, BASELINE.replace(batch_norm=True), test_acc=acc, cell="BatchNorm")
    for acc in (0.30, 0.31, 0.32):
        add_trial(study, BASELINE.replace(loss="mse"), test_acc=acc, cell="MSE")
    for acc in (0.53, 0.54, 0.55):
        add_trial(study, BASELINE.replace(extra_blocks=1), test_acc=acc, cell="extra conv layers")
    return study


def test_bootstrap_of_known_values():
    ci = bootstrap_mean(np.array([70.0, 70.0, 70.0]))
    assert (ci.mean, ci.low, ci.high) == (70.0, 70.0, 70.0)
    ci = bootstrap_mean(np.array([50.0, 52.0, 54.0]))
    assert ci.mean == 52.0 and 50.0 <= ci.low < 52.0 < ci.high <= 54.0
    assert math.isnan(bootstrap_mean(np.array([1.0])).low)
    d = bootstrap_diff(np.array([60.0, 62.0, 64.0]), np.array([50.0, 52.0, 54.0]))
    assert d.mean == pytest.approx(10.0) and 6.0 <= d.low < 10.0 < d.high <= 14.0


@pytest.mark.parametrize("low, high, claim, expected", [
    (8.0, 12.0, (0.0, None), "supported"),
    (8.0, 12.0, (None, 0.0), "contradicted"),
    (-1.0, 3.0, (2.0, 3.0), "inconclusive"),
    (0.5, 1.5, (10.0, None), "contradicted"),
    (2.1, 2.9, (2.0, 3.0), "supported"),
    (math.nan, math.nan, (0.0, None), "inconclusive"),
])
def test_verdicts(low, high, claim, expected):
    assert verdict(low, high, *claim) == expected


def test_designed_matrix_gives_known_means_and_verdicts():
    matrix = matrix_frame(trials_frame(designed_study(), SPACE)).set_index("level")
    assert matrix["method"].iloc[0].startswith("designed")
    bn = matrix.loc["BatchNorm"]
    assert bn["n"] == 3 and bn["mean_acc"] == pytest.approx(62.0) and bn["diff"] == pytest.approx(10.0)
    assert bn["verdict"] == "supported"  # claim: BN helps (> 0)
    assert matrix.loc["MSE", "diff"] == pytest.approx(-21.0) and matrix.loc["MSE", "verdict"] == "supported"
    assert matrix.loc["extra conv layers", "verdict"] == "contradicted"  # claim >= +10, measured ~+2
    assert matrix.loc["StepLR", "n"] == 0 and matrix.loc["StepLR", "verdict"] == "inconclusive"


def test_search_matrix_compares_trials_with_and_without_a_level():
    study = optuna.create_study(direction="maximize")
    for i, acc in enumerate((0.50, 0.52, 0.54, 0.56)):
        add_trial(study, BASELINE.replace(lr=0.001 * (i + 1)), test_acc=acc)
    for acc in (0.40, 0.42):
        add_trial(study, BASELINE.replace(loss="mse", lr=0.002), test_acc=acc)
    matrix = matrix_frame(trials_frame(study, SPACE)).set_index("level")
    assert matrix["method"].iloc[0].startswith("search")
    mse = matrix.loc["MSE"]
    assert (mse["n"], mse["n_baseline"]) == (2, 4)
    assert mse["diff"] == pytest.approx(41.0 - 53.0)


def test_trials_frame_has_every_parameter_and_metric():
    frame = trials_frame(designed_study(), SPACE)
    assert len(frame) == 12
    for col in ("number", "state", "stop_reason", "val_acc", "test_acc", "epochs_run", "train_seconds",
                "images_per_sec", "param_count", "datetime_start", *(p.name for p in SPACE)):
        assert col in frame.columns
    assert frame.loc[3, "batch_norm"] is True or frame.loc[3, "batch_norm"] == True  # noqa: E712


def test_pareto_front():
    study = optuna.create_study(direction="maximize")
    for acc, sec in ((0.5, 10), (0.6, 20), (0.55, 30), (0.7, 40), (0.4, 5)):
        add_trial(study, test_acc=acc, seconds=sec)
    front = pareto_front_rows(trials_frame(study, SPACE))
    assert sorted(front["train_seconds"].tolist()) == [5, 10, 20, 40]


def test_full_report_is_offline_and_embeds_every_plot(tmp_path):
    study = designed_study()
    written = write_report(study, tmp_path)
    page = (tmp_path / "index.html").read_text()
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) >= 5
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"(src|href)=['\"]?https?://", page) and "http://" not in page and "https://" not in page
    assert (tmp_path / "trials.csv").read_text().count("\n") == 13
    assert "BatchNorm" in (tmp_path / "matrix.csv").read_text()


@pytest.mark.parametrize("kind", ["empty", "failed", "pruned"])
def test_nothing_to_show_yet(tmp_path, kind):
    study = optuna.create_study(direction="maximize")
    for _ in range(3 if kind != "empty" else 0):
        state = TrialState.FAIL if kind == "failed" else TrialState.PRUNED
        add_trial(study, state=state)
    write_report(study, tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert NOTHING in page


def test_hostile_strings_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    study = designed_study(name=evil)
    study.set_user_attr("bench.dataset", f"/data/{evil}")
    write_report(study, tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_csv_format_writes_tables_only(tmp_path):
    study = designed_study()
    written = write_report(study, tmp_path, fmt="csv")
    assert sorted(p.name for p in written) == ["matrix.csv", "trials.csv"]


def test_many_trials(tmp_path):
    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize")
    trials = []
    for i in range(300):
        cfg = BASELINE.replace(lr=float(10 ** rng.uniform(-4, -1)), batch_norm=bool(i % 2), epochs=int(rng.integers(1, 6)))
        params = params_for_config(cfg, SPACE)
        acc = float(rng.uniform(0.3, 0.7))
        pruned = i % 5 == 0
        trials.append(create_trial(
            params=params, distributions={k: DISTS[k] for k in params}, value=None if pruned else acc,
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            user_attrs={Attr.TEST_ACC: acc, Attr.VAL_ACC: acc, Attr.TRAIN_SECONDS: float(rng.uniform(5, 50)),
                        Attr.VAL_CURVE: list(rng.uniform(0.2, 0.7, 3)), Attr.LOSS_CURVE: [2.0, 1.8, 1.6]}))
    study.add_trials(trials)
    write_report(study, tmp_path)
    assert (tmp_path / "learning_curves.png").exists() and (tmp_path / "parameter_importance.png").exists()


def test_cli_missing_study_is_a_usage_error(tmp_path, capsys):
    assert run_cli(main, ["--study", "nope", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no study database" in capsys.readouterr().err
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/x.db")
    assert run_cli(main, ["--study", "nope", "--storage", f"sqlite:///{tmp_path}/x.db"]) == 2
    assert "holds: other" in capsys.readouterr().err


def test_cumulative_path_starts_at_the_baseline_in_declared_order():
    from bench.analysis import cumulative_frame

    study = designed_study()
    for step, accs in (("02. +b", (0.70, 0.72)), ("01. +a", (0.60, 0.62))):
        for acc in accs:
            add_trial(study, BASELINE.replace(epochs=4), test_acc=acc, cell=f"cumulative: {step}")
    path = cumulative_frame(trials_frame(study, SPACE))
    assert path["step"].tolist() == [BASELINE_CELL, "01. +a", "02. +b"]
    assert path["mean_acc"].tolist() == pytest.approx([52.0, 61.0, 71.0])
    assert path["n"].tolist() == [3, 2, 2]
