from __future__ import annotations

import datetime
import math
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial
from scipy import stats as sps

from bench.analysis import (
    BASELINE_CELL,
    COST_KINDS,
    NOT_RECORDED,
    CellData,
    cost_frame,
    matrix_frame,
    pareto_front_rows,
    precision_note,
    trials_frame,
)
from bench.errors import run_cli
from bench.report import NOTHING, main, summary_items, write_report
from bench.schema import Attr
from bench.space import BASELINE, build_space, params_for_config

SPACE = build_space(max_epochs=30)
DISTS = {p.name: p.distribution for p in SPACE}


FULL_IMAGES = 45_000  # CIFAR-10's 50,000 less the 10% validation split: the claims' budget
CIFAR10 = {"bench.data_classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
           "bench.data_channels": 3, "bench.data_image_size": [32, 32], "bench.data_train_images": 50_000}


def matrix_of(study, **kw) -> pd.DataFrame:
    """The matrix of a study whose data is CIFAR-10 (the claims' dataset)."""
    return matrix_frame(trials_frame(study, SPACE), data_attrs={**CIFAR10, **study.user_attrs}, **kw)


def row(matrix: pd.DataFrame, level: str, budget: int = 5, claim: str | None = None) -> pd.Series:
    """The one row of `level` at `budget` (and `claim`, for a level with several claims)."""
    sel = matrix[(matrix["level"] == level) & (matrix["budget"] == budget)]
    if claim is not None:
        sel = sel[sel["claim_id"] == claim]
    assert len(sel) == 1, sel[["level", "budget", "claim_id"]]
    return sel.iloc[0]


def add_trial(study, cfg=BASELINE, *, test_acc=0.5, state=TrialState.COMPLETE, cell=None, seconds=10.0, curve=None,
              seed=None, images=FULL_IMAGES, stop_reason=None, fail_reason=None, precision=None, speed=None, epochs_run=2,
              hardware=None, pack_size=None):
    params = params_for_config(cfg, SPACE)
    attrs = {Attr.TEST_ACC: test_acc, Attr.VAL_ACC: test_acc, Attr.TRAIN_SECONDS: seconds, Attr.EPOCHS_RUN: epochs_run,
             Attr.VAL_CURVE: curve or [test_acc - 0.1, test_acc], Attr.LOSS_CURVE: [2.0, 1.5], Attr.DEVICE: "cpu",
             Attr.TRAIN_IMAGES: images, Attr.NUM_CLASSES: 10}
    if cell:
        attrs[Attr.CELL] = cell
    if seed is not None:
        attrs[Attr.SEED] = seed
    if precision is not None:
        attrs[Attr.PRECISION] = precision
    if speed is not None:
        attrs[Attr.IMAGES_PER_SEC] = speed
    if hardware is not None:
        attrs[Attr.HARDWARE], attrs[Attr.TORCH] = hardware, "2.14.1"
    if pack_size is not None:
        attrs[Attr.PACK_SIZE] = pack_size
    attrs = {k: v for k, v in attrs.items() if v is not None}  # seconds=None: a process that died recorded none
    if stop_reason:
        attrs[Attr.STOP_REASON] = stop_reason
    if fail_reason:
        attrs[Attr.FAIL_REASON] = fail_reason
    if state != TrialState.COMPLETE:
        attrs.pop(Attr.TEST_ACC)
    study.add_trial(create_trial(params=params, distributions={k: DISTS[k] for k in params},
                                 value=test_acc if state == TrialState.COMPLETE else None,
                                 state=state, user_attrs=attrs))


def add_cell(study, cell, cfg, accs, **kw):
    for seed, acc in enumerate(accs):
        add_trial(study, cfg, test_acc=acc, cell=cell, seed=seed, **kw)


def designed_study(name="designed"):
    study = optuna.create_study(study_name=name, direction="maximize")
    for key, value in CIFAR10.items():
        study.set_user_attr(key, value)
    add_cell(study, BASELINE_CELL, BASELINE, (0.50, 0.52, 0.54))
    add_cell(study, "label smoothing 0.1", BASELINE.replace(label_smoothing=0.1), (0.60, 0.625, 0.64))
    add_cell(study, "BatchNorm", BASELINE.replace(batch_norm=True), (0.60, 0.625, 0.64))
    add_cell(study, "MSE", BASELINE.replace(loss="mse"), (0.30, 0.31, 0.32))
    add_cell(study, "extra conv layers", BASELINE.replace(extra_blocks=1), (0.53, 0.54, 0.555))
    return study


@pytest.mark.parametrize("mean, se, claim, expected", [
    (10.0, 0.5, (0.0, None), "supported"),
    (10.0, 0.5, (None, 0.0), "contradicted"),
    (1.0, 0.5, (2.0, 3.0), "contradicted"),  # raw p 0.14 > 0.05: the row reads inconclusive
    (2.5, 0.1, (2.0, 3.0), "supported"),
    (2.5, 0.0, (2.0, 3.0), None),  # zero width: no test
])
def test_claim_test_direction_and_p_scale(mean, se, claim, expected):
    from bench.stats import Interval, claim_test

    est = Interval(mean, math.nan, math.nan, 5, "paired t", se, 4.0)
    test = claim_test(est, *claim)
    assert (test.direction if test else None) == expected
    if test is not None:  # p <= 0.05 exactly when the 95% interval lies inside (or wholly outside) the range
        half = sps.t.ppf(0.975, 4) * se
        lo, hi = (-math.inf if claim[0] is None else claim[0]), (math.inf if claim[1] is None else claim[1])
        inside = lo <= mean - half and mean + half <= hi
        outside = mean + half < lo or mean - half > hi
        assert (test.p <= 0.05) == (inside or outside)


def test_designed_matrix_gives_known_means_and_verdicts():
    matrix = matrix_of(designed_study())
    assert matrix["method"].iloc[0].startswith("designed")
    ls = row(matrix, "label smoothing 0.1")
    assert ls["n"] == 3 and ls["n_pairs"] == 3 and ls["interval"] == "paired t"
    assert ls["mean_acc"] == pytest.approx(62.1667, abs=1e-3) and ls["diff"] == pytest.approx(10.1667, abs=1e-3)
    assert ls["verdict"] == "supported"  # claim: smoothing helps (> 0); paired diffs 10, 10.5, 10 lie well above 0
    assert row(matrix, "MSE")["diff"] == pytest.approx(-21.0) and row(matrix, "MSE")["verdict"] == "supported"
    assert row(matrix, "extra conv layers")["verdict"] == "contradicted"  # claim >= +10, measured ~+1.2
    assert row(matrix, "StepLR")["n"] == 0 and row(matrix, "StepLR")["verdict"] == "no data"
    assert row(matrix, "StepLR", 20)["cell"] == "StepLR @20 ep"
    bn = row(matrix, "BatchNorm")  # C10 claims BN with Dropout, in the printed block, not BN alone
    assert bn["verdict"] == "not quantified" and bn["budget_epochs"] == 5 and bn["claim_epochs"] == 5
    judged = matrix[matrix["verdict"].isin(["supported", "contradicted", "inconclusive"])]
    assert set(judged["n_tests"]) == {len(judged)} and (judged["p_holm"] >= judged["p_raw"]).all()
    assert (judged["holm_level"] >= 0.95).all() and judged["claim_id"].notna().all()


def test_seeds_of_mixed_precision_are_named_on_their_rows_and_counted_in_the_summary(tmp_path):
    """A study resumed on a machine without bf16 (auto trains fp32 there): the rows that mix arithmetic say which seeds
    ran in which, verdicts and numbers stay those of the same seeds unlabelled, and the summary counts each kind."""
    def study_with(fp32=None, bf16=None):
        study = designed_study()
        for seed in (3, 4):  # two later seeds of label smoothing trained in fp32; the rest did not record it
            add_trial(study, BASELINE.replace(label_smoothing=0.1), test_acc=0.60 + seed / 100,
                      cell="label smoothing 0.1", seed=seed, precision=fp32)
            add_trial(study, BASELINE, test_acc=0.50 + seed / 100, cell=BASELINE_CELL, seed=seed)
        add_cell(study, "Dropout 0.3", BASELINE.replace(dropout=0.3), (0.60, 0.625, 0.64, 0.63, 0.61), precision=bf16)
        return study

    study = study_with(fp32="fp32", bf16="bf16")
    matrix, unlabelled = matrix_of(study), matrix_of(study_with())
    numbers = ["n", "mean_acc", "acc_low", "diff", "diff_low", "diff_high", "p_raw", "p_holm", "verdict"]
    pd.testing.assert_frame_equal(matrix[numbers], unlabelled[numbers])
    assert not unlabelled["note"].fillna("").str.contains("precision").any()
    ls = row(matrix, "label smoothing 0.1")
    assert ls["n"] == 5 and ls["verdict"] == "supported"
    # one recorded precision beside unrecorded seeds: unknown, not called mixed, and every seed named
    assert ("precision not recorded for some seeds (they may mix): fp32 (seeds 3, 4), not recorded (seeds 0, 1, 2); "
            "reference: not recorded (seeds 0, 1, 2, 3, 4)") in ls["note"]
    dropout = row(matrix, "Dropout 0.3")  # every seed bf16 and its reference unrecorded: named the same way
    assert "(they may mix): bf16 (seeds 0, 1, 2, 3, 4); reference: not recorded" in dropout["note"]
    assert "precision" not in row(matrix, "MSE")["note"]  # neither it nor its reference recorded: one kind
    assert "precision" not in row(matrix, BASELINE_CELL)["note"]
    assert not matrix["note"].fillna("").str.contains("trained in mixed precision").any()
    two = CellData({0: 60.0, 1: 61.0, 2: 62.0}, precisions={0: "fp32", 1: "bf16", 2: NOT_RECORDED})
    assert precision_note(two, None) == ("trained in mixed precision: bf16 (seed 1), fp32 (seed 0), "
                                         "not recorded (seed 2)")
    assert precision_note(CellData({0: 60.0}, precisions={0: "bf16"}), CellData({0: 59.0}, precisions={0: "bf16"})) is None
    summary = dict(summary_items(study, trials_frame(study, SPACE)))
    assert summary["precision"] == "bf16 5 trials, fp32 2 trials, not recorded 17 trials"


def test_too_few_seeds_gets_no_verdict():
    study = optuna.create_study(direction="maximize")
    add_cell(study, BASELINE_CELL, BASELINE, (0.50, 0.52))
    add_cell(study, "label smoothing 0.1", BASELINE.replace(label_smoothing=0.1), (0.70, 0.72))
    r = row(matrix_of(study), "label smoothing 0.1")
    assert r["verdict"] == "too few seeds" and r["n_pairs"] == 2 and "needs 3" in r["note"]


def test_reduced_budget_gets_no_verdict_and_inert_levels_say_so():
    study = optuna.create_study(direction="maximize")
    one = BASELINE.replace(epochs=1)
    add_cell(study, BASELINE_CELL, one, (0.30, 0.31, 0.32), images=4500)
    add_cell(study, "BatchNorm", one.replace(batch_norm=True), (0.40, 0.41, 0.42), images=4500)
    add_cell(study, "StepLR", one.replace(scheduler="step"), (0.30, 0.31, 0.32), images=4500)
    add_cell(study, "early stopping", one.replace(early_stopping=3), (0.30, 0.31, 0.32), images=4500)
    matrix = matrix_of(study)
    bn = row(matrix, "BatchNorm")
    assert bn["verdict"] == "not tested at this budget"
    assert "1 epochs on 4,500" in bn["note"] and "5 epochs on 50,000" in bn["note"] and "declared by bench" in bn["note"]
    assert row(matrix, "StepLR")["verdict"] == "inert at this budget" and "after the last of 1" in row(matrix, "StepLR")["note"]
    assert row(matrix, "early stopping")["verdict"] == "inert at this budget"
    assert not matrix["verdict"].isin(["supported", "contradicted", "inconclusive"]).any()


def test_full_budget_with_too_few_images_is_not_tested():
    study = optuna.create_study(direction="maximize")
    add_cell(study, BASELINE_CELL, BASELINE, (0.50, 0.52, 0.54), images=5000)
    add_cell(study, "BatchNorm", BASELINE.replace(batch_norm=True), (0.60, 0.62, 0.64), images=5000)
    assert row(matrix_of(study), "BatchNorm")["verdict"] == "not tested at this budget"


def test_levels_are_compared_with_their_claims_reference_cell():
    study = optuna.create_study(direction="maximize")
    long = BASELINE.replace(epochs=20)
    add_cell(study, BASELINE_CELL, BASELINE, (0.50, 0.52, 0.54))
    add_cell(study, "20 epochs", long, (0.66, 0.685, 0.70))  # about +16 points on every seed: inside the claimed 5-20
    add_cell(study, "Adam lr 1e-3", long.replace(lr=1e-3), (0.765, 0.766, 0.767))
    add_cell(study, "AdamW lr 1e-3", long.replace(optimizer="adamw", lr=1e-3, weight_decay=1e-2), (0.782, 0.7835, 0.785))
    matrix = matrix_of(study)
    adamw = row(matrix, "AdamW lr 1e-3", 20)
    assert adamw["reference"] == "Adam lr 1e-3" and adamw["diff"] == pytest.approx(1.75, abs=1e-3)
    assert adamw["verdict"] == "supported"  # claim: 0 to +3 points over Adam at the same lr
    adam = row(matrix, "Adam lr 1e-3", 20)  # an accuracy claim: 75-78% at 20 epochs
    assert adam["reference"] == "20 epochs" and adam["verdict"] == "supported"
    gain = row(matrix, "20 epochs", 20, "C1-gain")
    assert gain["reference"] == BASELINE_CELL and (gain["budget_epochs"], gain["reference_epochs"]) == (20, 5)
    assert gain["verdict"] == "supported" and "'possible' claim" in gain["note"]
    up_to = row(matrix, "20 epochs", 20, "C1-20")  # 68% mean, claimed up to 75-80%: not supported, maybe not yet refuted
    assert up_to["p_raw"] < 0.05 and up_to["verdict"] in ("contradicted", "inconclusive")


def test_diverged_seeds_are_named_and_stop_the_verdict():
    study = optuna.create_study(direction="maximize")
    add_cell(study, BASELINE_CELL, BASELINE, (0.50, 0.52, 0.54))
    add_cell(study, "label smoothing 0.1", BASELINE.replace(label_smoothing=0.1), (0.60, 0.62))
    for _ in range(2):  # seed 2 diverged, was rerun once, diverged again: an outcome, not a gap
        add_trial(study, BASELINE.replace(label_smoothing=0.1), state=TrialState.PRUNED, cell="label smoothing 0.1",
                  seed=2, stop_reason="diverged")
    r = row(matrix_of(study), "label smoothing 0.1")
    assert r["n"] == 3 and r["n_diverged"] == 1 and "1 of 3 diverged (seed 2)" in r["note"]
    assert r["mean_acc"] == pytest.approx(61.0) and r["n_pairs"] == 2  # the interval covers the seeds that trained
    assert r["verdict"] == "no verdict: diverged" and r["diverged_seeds"] == "2"


def test_search_matrix_is_exploratory_with_fixed_groups():
    study = optuna.create_study(direction="maximize")
    for i, acc in enumerate((0.50, 0.52, 0.54, 0.56)):
        add_trial(study, BASELINE.replace(lr=0.001 * (i + 1)), test_acc=acc)
    for acc in (0.40, 0.42):
        add_trial(study, BASELINE.replace(loss="mse", lr=0.002), test_acc=acc)
    add_trial(study, BASELINE.replace(optimizer="sgd", lr=0.001), test_acc=0.1)
    matrix = matrix_frame(trials_frame(study, SPACE)).set_index("level")
    assert matrix["method"].iloc[0].startswith("search trials: exploratory")
    assert set(matrix["verdict"]) == {"exploratory"} and matrix["diff_low"].isna().all()
    mse = matrix.loc["MSE"]
    assert (mse["n"], mse["n_reference"]) == (2, 5)  # MSE vs every cross-entropy trial, whatever its optimizer
    assert mse["diff"] == pytest.approx(41.0 - (50 + 52 + 54 + 56 + 10) / 5)
    smoothing = matrix.loc["label smoothing 0.1"]
    assert smoothing["n_reference"] == 5  # cross-entropy trials only: MSE trials are not 'smoothing 0'
    adam = matrix.loc["Adam lr 1e-3"]
    assert adam["n"] == 1  # only the Adam trial at lr 1e-3 (2e-3 is nearer 3e-3 on the log scale); never SGD


def test_search_study_where_smoothing_does_nothing_gets_no_verdict(tmp_path):
    """The review's case: 40 search trials, label smoothing without effect; no verdict may appear."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize")
    for _ in range(40):
        loss = str(rng.choice(["ce", "focal", "mse"]))
        cfg = BASELINE.replace(loss=loss, label_smoothing=float(rng.choice([0.0, 0.1])) if loss == "ce" else 0.0,
                               lr=float(10 ** rng.uniform(-3.5, -2)))
        acc = {"ce": 0.60, "focal": 0.55, "mse": 0.40}[loss] + rng.normal(0, 0.02)
        add_trial(study, cfg, test_acc=float(acc))
    matrix = matrix_frame(trials_frame(study, SPACE))
    assert not matrix["verdict"].isin(["supported", "contradicted", "inconclusive"]).any()
    write_report(study, tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "exploratory" in page and ">supported<" not in page and ">contradicted<" not in page


def test_trials_frame_has_every_parameter_and_metric():
    frame = trials_frame(designed_study(), SPACE)
    assert len(frame) == 15
    for col in ("number", "state", "stop_reason", "val_acc", "test_acc", "epochs_run", "train_seconds",
                "images_per_sec", "param_count", "datetime_start", *(p.name for p in SPACE)):
        assert col in frame.columns
    assert frame.loc[6, "batch_norm"] is True or frame.loc[6, "batch_norm"] == True  # noqa: E712



def test_cost_frame_counts_every_attempt_per_tier_and_precision(tmp_path):
    """What the study cost, per budget tier, device and precision: attempts by kind (a diverged seed, stored as PRUNED,
    is not a pruned one; an interrupted or orphaned attempt is not a failure), the finished epochs of an attempt that
    died (from its curve), each trial's share of its pack's time, no running trial; the page, cost.csv and matrix.md
    show the same figures with a total."""
    study = designed_study()  # 15 complete 5-epoch trials, 2 epochs run each, 10 s, precision not recorded
    twenty = BASELINE.replace(epochs=20)
    add_cell(study, "20 epochs", twenty, (0.60, 0.63), precision="fp32", seconds=1800.0, epochs_run=20, speed=600.0,
             hardware="AMD EPYC, 2 threads, no bf16")
    add_trial(study, twenty, cell="20 epochs", seed=2, precision="fp32", seconds=360.0, epochs_run=4, speed=500.0,
              state=TrialState.FAIL, fail_reason="interrupted")  # stopped mid-trial: no hardware recorded
    add_trial(study, twenty, cell="20 epochs", seed=2, precision="fp32", seconds=None, epochs_run=None,
              curve=[0.3, 0.4, 0.5], state=TrialState.FAIL)  # orphaned: its process died after 3 epochs
    add_trial(study, twenty, cell="20 epochs", seed=3, precision="fp32", seconds=720.0, epochs_run=6, pack_size=2,
              state=TrialState.PRUNED, stop_reason="diverged")
    add_trial(study, twenty, cell="20 epochs", seed=4, precision="fp32", seconds=36.0, epochs_run=1,
              state=TrialState.FAIL, stop_reason="failed", fail_reason="RuntimeError: boom")
    add_trial(study, twenty, cell="20 epochs", seed=4, precision="fp32", seconds=None, epochs_run=None,
              curve=[0.1], state=TrialState.FAIL, stop_reason="failed", fail_reason="ValueError: bad config")  # unbuilt
    add_trial(study, twenty, cell="20 epochs", seed=5, precision="fp32", state=TrialState.RUNNING)
    cost = cost_frame(trials_frame(study, SPACE))
    assert cost[["epochs", "device", "precision", *COST_KINDS, "untimed"]].values.tolist() == [
        [5, "cpu", "not recorded", 15, 0, 0, 0, 0, 0], [20, "cpu", "fp32", 2, 0, 1, 2, 2, 1]]
    five, tier20 = cost.iloc[0], cost.iloc[1]
    assert five["images_trained"] == 15 * 2 * FULL_IMAGES and five["device_hours"] == round(150 / 3600, 3)
    assert math.isnan(five["images_per_sec"])  # none recorded: no speed invented
    assert tier20["images_trained"] == (20 + 20 + 4 + 3 + 6 + 1 + 1) * FULL_IMAGES  # every finished epoch of every attempt
    assert tier20["device_hours"] == round((1800 * 2 + 360 + 720 / 2 + 36) / 3600, 3)  # the pack's time shared
    assert tier20["images_per_sec"] == 600.0  # the median of the complete trials only
    assert (five["hardware"], five["torch"]) == ("not recorded", "not recorded")
    assert (tier20["hardware"], tier20["torch"]) == ("AMD EPYC, 2 threads, no bf16; not recorded", "2.14.1; not recorded")
    summary = dict(summary_items(study, trials_frame(study, SPACE)))
    assert (summary["hardware"], summary["torch"]) == ("AMD EPYC, 2 threads, no bf16; not recorded", "2.14.1; not recorded")

    write_report(study, tmp_path)
    assert pd.read_csv(tmp_path / "cost.csv")[["complete", "interrupted", "images_trained"]].values.tolist() == [
        [15, 0, 1_350_000], [2, 2, 2_475_000]]
    md = (tmp_path / "matrix.md").read_text()
    assert "| 20 ep | cpu | fp32 | AMD EPYC, 2 threads, no bf16; not recorded | 2.14.1; not recorded | 2 complete, " \
           "1 diverged, 2 failed, 2 interrupted (1 untimed: the process died) | 2.5 M | 1.2 h | 600 |" in md
    assert "| 5 ep | cpu | not recorded | not recorded | not recorded | 15 complete | 1.4 M | 2.5 min | — |" in md
    [total] = [line for line in md.splitlines() if line.startswith("| all |")]
    assert total.startswith("| all | all | all | AMD EPYC, 2 threads, no bf16; not recorded | 2.14.1; not recorded | "
                            "17 complete, 1 diverged, 2 failed, 2 interrupted (1 untimed: the process died) | 3.8 M | 1.3 h | — | ")
    assert "<h2>What it cost</h2>" in (tmp_path / "index.html").read_text()


def test_cost_rows_run_by_tier_then_first_start():
    """Within a tier, rows read in the order the machines ran them: not alphabetical, not by trial number."""
    from optuna.trial import FrozenTrial

    study = designed_study()  # its 5-epoch trials start now: the tier still comes first
    cfg = BASELINE.replace(epochs=20)
    params = params_for_config(cfg, SPACE)
    for number, (precision, day) in enumerate((("fp32", 30), ("bf16", 29), (None, 28))):
        attrs = {Attr.CELL: "20 epochs", Attr.SEED: number, Attr.TRAIN_SECONDS: 60.0, Attr.EPOCHS_RUN: 20,
                 Attr.TRAIN_IMAGES: FULL_IMAGES, Attr.DEVICE: "cpu", Attr.VAL_CURVE: [0.5], Attr.LOSS_CURVE: [1.0]}
        if precision:
            attrs[Attr.PRECISION] = precision
        study.add_trial(FrozenTrial(
            number=0, trial_id=0, state=TrialState.COMPLETE, value=0.6, values=None, params=params,
            distributions={k: DISTS[k] for k in params}, user_attrs=attrs, system_attrs={}, intermediate_values={},
            datetime_start=datetime.datetime(2026, 11, day, 10), datetime_complete=datetime.datetime(2026, 11, day, 11)))
    cost = cost_frame(trials_frame(study, SPACE))
    assert cost[["epochs", "precision", "first"]].values.tolist() == [
        [5, "not recorded", cost["first"].iloc[0]], [20, "not recorded", "2026-11-28"], [20, "bf16", "2026-11-29"],
        [20, "fp32", "2026-11-30"]]


def test_cost_rows_show_date_ranges_and_readable_units():
    from bench.report import cost_display

    cost = pd.DataFrame({"device": ["cpu", "cuda"], "precision": ["fp32", "bf16"], "hardware": ["x", "NVIDIA H200"],
                         "torch": ["2.14.1", "2.14.1"], "complete": [3, 4], "pruned": [1, 0], "diverged": [0, 0],
                         "failed": [0, 0], "interrupted": [0, 0], "untimed": [0, 0], "images_trained": [999, 2_500_000],
                         "device_hours": [0.5, 2.25], "images_per_sec": [math.nan, 41_234.5],
                         "first": ["2026-11-29", "2026-11-30"], "last": ["2026-11-30", "2026-11-30"]})
    shown = cost_display(cost)
    assert shown["dates"].tolist() == ["2026-11-29 to 2026-11-30", "2026-11-30", "2026-11-29 to 2026-11-30"]
    assert shown["attempts"].tolist() == ["3 complete, 1 pruned", "4 complete", "7 complete, 1 pruned"]
    assert shown["images trained"].tolist() == ["999", "2.5 M", "2.5 M"]
    assert shown["device time"].tolist() == ["30.0 min", "2.2 h", "2.8 h"]
    assert shown["median images/s"].tolist() == ["—", "41,234", "—"]
    assert shown.iloc[-1][["device", "hardware"]].tolist() == ["all", "NVIDIA H200; x"]


def test_cost_of_a_search_is_per_device_and_precision_only():
    study = optuna.create_study(direction="maximize")
    for epochs, state in ((3, TrialState.COMPLETE), (7, TrialState.COMPLETE), (9, TrialState.PRUNED)):
        add_trial(study, BASELINE.replace(epochs=epochs), state=state, speed=1000.0, precision="bf16")
    cost = cost_frame(trials_frame(study, SPACE))
    assert "epochs" not in cost.columns
    assert cost[["device", "precision", "complete", "pruned", "failed"]].values.tolist() == [["cpu", "bf16", 2, 1, 0]]


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
    assert (tmp_path / "trials.csv").read_text().count("\n") == 16
    assert "BatchNorm" in (tmp_path / "matrix.csv").read_text()
    assert "selected from 15 trials (optimistic)" in page and "best cell, selected from 5 cells (optimistic" in page
    assert "Holm" in page and "parameter importance is left out for designed studies" in page


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
    assert sorted(p.name for p in written) == ["cost.csv", "matrix.csv", "trials.csv"]


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


def test_cumulative_path_reads_shared_cells_with_step_to_step_intervals():
    from bench.analysis import cumulative_frame

    study = designed_study()
    long = BASELINE.replace(epochs=20)
    sgd = long.replace(optimizer="sgd", lr=0.01, momentum=0.9)
    add_cell(study, "20 epochs", long, (0.60, 0.63, 0.64))  # step 1 is this matrix cell, not a copy of it
    add_cell(study, "SGD lr 0.01 momentum 0.9", sgd, (0.70, 0.72, 0.75))
    add_cell(study, "cumulative: 03. +full augmentation", sgd.replace(color_jitter=True), (0.71, 0.73, 0.74))
    path = cumulative_frame(trials_frame(study, SPACE))
    assert path["step"].tolist() == [BASELINE_CELL, "01. +20 epochs", "02. +SGD momentum", "03. +full augmentation"]
    assert path["cell"].tolist()[1:3] == ["20 epochs", "SGD lr 0.01 momentum 0.9"]
    assert path["mean_acc"].tolist() == pytest.approx([52.0, 62.3333, 72.3333, 72.6667], abs=1e-3)
    assert path["step_diff"].tolist()[1:] == pytest.approx([10.3333, 10.0, 0.3333], abs=1e-3)
    assert path["n_pairs"].tolist() == [0, 3, 3, 3] and path["step_low"].iloc[1:].notna().all()


def _page_text(path) -> str:
    """The page without its embedded images (base64 can spell anything)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (path / "index.html").read_text())


def scaled_matrix_and_search(tmp_path):
    """The review's case: a 3-seed matrix at epochs scale 0.2 with a diverged seed and a cell of one seed,
    plus an 8-trial search study; neither page may print 'nan'."""
    matrix = optuna.create_study(study_name="scaled", direction="maximize")
    for key, value in (("bench.epochs_scale", 0.2), ("bench.train_subset", 5000), ("bench.train_images", 4500),
                       ("bench.val_images", 500), ("bench.val_is_test", False), ("bench.max_epochs", 30), *CIFAR10.items()):
        matrix.set_user_attr(key, value)
    one = BASELINE.replace(epochs=1)
    add_cell(matrix, BASELINE_CELL, one, (0.30, 0.31, 0.33), images=4500)
    add_cell(matrix, "BatchNorm", one.replace(batch_norm=True), (0.35,), images=4500)
    add_cell(matrix, "StepLR", one.replace(scheduler="step"), (0.30, 0.32, 0.31), images=4500)
    add_cell(matrix, "wider channels", one.replace(width=2.0), (0.36, 0.37), images=4500)
    for _ in range(2):
        add_trial(matrix, one.replace(width=2.0), state=TrialState.PRUNED, cell="wider channels", seed=2,
                  stop_reason="diverged", images=4500)
    add_cell(matrix, "cumulative: 01. +20 epochs", BASELINE.replace(epochs=4), (0.40,), images=4500)
    search = optuna.create_study(study_name="search8", direction="maximize")
    search.set_user_attr("bench.val_is_test", True)
    search.set_user_attr("bench.val_images", 10000)
    for i in range(8):
        add_trial(search, BASELINE.replace(lr=0.001 * (i + 1), batch_norm=bool(i % 2)), test_acc=0.4 + i / 100)
    return matrix, search


def test_pages_never_print_nan(tmp_path):
    for study in scaled_matrix_and_search(tmp_path):
        out = tmp_path / study.study_name
        write_report(study, out)
        page = _page_text(out)
        assert not re.search(r"\bnan\b", page, re.IGNORECASE), re.findall(r".{60}\bnan\b.{20}", page, re.I)[:3]
        assert not re.search(r"\bnan\b", (out / "matrix.csv").read_text(), re.I)  # missing values are empty cells


def test_scaled_matrix_page_shows_the_budget_and_no_verdict(tmp_path):
    matrix_study, _ = scaled_matrix_and_search(tmp_path)
    write_report(matrix_study, tmp_path)
    page = _page_text(tmp_path)
    assert "4,500 train images (--train-subset 5000)" in page and "epochs scaled by 0.2" in page
    assert "rows ran at another budget than their claim" in page
    for word in (">supported<", ">contradicted<", ">inconclusive<"):
        assert word not in page
    assert "inert at this budget" in page and "1 of 3 diverged" in page
    csv = pd.read_csv(tmp_path / "matrix.csv")
    for col in ("budget_epochs", "reference_epochs", "train_images", "claim_epochs", "claim_train_images", "claim_budget_source"):
        assert col in csv.columns
    assert row(csv, "BatchNorm")["train_images"] == 4500


def test_search_page_warns_about_test_set_selection_and_gates_importance(tmp_path):
    _, search = scaled_matrix_and_search(tmp_path)
    write_report(search, tmp_path)
    page = _page_text(tmp_path)
    assert "selection used the test set" in page
    assert "importance needs at least 30 completed trials (this study has 8)" in page
    assert not (tmp_path / "parameter_importance.png").exists()


def test_small_validation_split_is_flagged(tmp_path):
    study = designed_study()
    study.set_user_attr("bench.val_images", 24)
    write_report(study, tmp_path)
    assert "one accuracy on 24 validation images is +-20.0 points" in _page_text(tmp_path)


def test_history_axis_has_whole_trial_numbers():
    from bench.report import plot_history

    study = optuna.create_study(direction="maximize")
    for acc in (0.5, 0.6, 0.55):
        add_trial(study, test_acc=acc)
    fig = plot_history(trials_frame(study, SPACE))
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_markdown_tables_are_made_from_the_csv_the_page_writes(tmp_path):
    from bench.report import markdown_tables

    study = designed_study()
    add_cell(study, "20 epochs", BASELINE.replace(epochs=20), (0.60, 0.63, 0.64))
    write_report(study, tmp_path)
    text = (tmp_path / "matrix.md").read_text()
    assert text == markdown_tables(pd.read_csv(tmp_path / "matrix.csv"), pd.read_csv(tmp_path / "cumulative.csv"),
                                   pd.read_csv(tmp_path / "cost.csv"))
    table = [line for line in text.splitlines() if line.startswith("| label smoothing 0.1 | 5 ep |")]
    assert len(table) == 1 and "supported" in table[0] and "62.17 [" in table[0] and "C6:" in table[0]
    assert "| 01. +20 epochs | 20 epochs | 3 |" in text and "nan" not in text.lower()


def test_search_baseline_interval_never_pools_budgets():
    """Baseline-like trials at 5 and 30 epochs, or on other train images, are not one baseline (the audit's 71.5 [58.6, 84.4])."""
    from bench.analysis import baseline_interval

    study = optuna.create_study(direction="maximize")
    for acc in (0.58, 0.60, 0.59):
        add_trial(study, BASELINE, test_acc=acc)
    for acc in (0.84, 0.85):
        add_trial(study, BASELINE.replace(epochs=30), test_acc=acc)
    add_trial(study, BASELINE.replace(batch_size=64), test_acc=0.70)
    add_trial(study, BASELINE, test_acc=0.40, images=4_500)
    base = baseline_interval(trials_frame(study, SPACE))
    assert base.n == 3 and base.mean == pytest.approx(59.0)
