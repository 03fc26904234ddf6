"""bench.comparison (the extract and the statistics of a comparison of searches) and bench.compare_report, on studies
made directly in SQLite storages: no training."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from bench.compare_report import write_compare_report
from bench.comparison import (
    MIN_TEST_PAIRS,
    anytime,
    anytime_bands,
    compare_arms,
    comparison_trials,
    cost_table,
    incomplete_repeats,
    load_comparison,
    mean_ranks,
    median_band,
    ranks,
    summary_table,
    wilcoxon_test,
)
from bench.errors import UsageError
from bench.schema import Attr, StudyAttr

C, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
INTERRUPTED = "interrupted"  # a FAIL stopped from outside (Ctrl-C): bench.compare reruns it and does not charge it
X = FloatDistribution(0.0, 1.0)


def add_study(storage: optuna.storages.BaseStorage, name: str, arm: str, repeat: int,
              trials: list[tuple[TrialState, float, float | None, int]], *, budget: int = 100, replay: str | None = None,
              images: int = 1000) -> None:
    """One compare study; each trial is (state, val acc, test acc, epochs run)."""
    study = optuna.create_study(study_name=f"{name}.{arm}.r{repeat}", storage=storage, direction="maximize")
    attrs = {StudyAttr.COMPARE: name, StudyAttr.ARM: arm, StudyAttr.REPEAT: repeat, StudyAttr.BUDGET_EPOCHS: budget,
             StudyAttr.TRAIN_IMAGES: images}
    if replay:
        attrs[StudyAttr.REPLAY] = replay
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for i, (state, val, test, epochs) in enumerate(trials):
        user = {Attr.EPOCHS_RUN: epochs, Attr.VAL_ACC: val, Attr.TRAIN_SECONDS: 2.0 * epochs, Attr.SAMPLER_SECONDS: 0.5}
        if state in (F, INTERRUPTED):
            user |= {Attr.STOP_REASON: "failed",
                     Attr.FAIL_REASON: "interrupted" if state == INTERRUPTED else "RuntimeError: the config failed"}
            state = F
        if test is not None:
            user[Attr.TEST_ACC] = test
        study.add_trial(create_trial(
            state=state, value=val if state == C else None, params={"x": i / 100}, distributions={"x": X},
            user_attrs=user, intermediate_values={e: val for e in range(epochs)} if state != F else {}))


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'compare.db'}")


@pytest.fixture(autouse=True)
def quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_frame_counts_pruned_epochs_and_the_incumbent_ignores_pruned_trials(storage):
    add_study(storage, "cmp", "tpe+median", 0, [(P, 0.9, None, 3), (C, 0.5, 0.45, 10), (P, 0.95, 0.9, 2),
                                                (C, 0.6, 0.58, 10), (F, math.nan, None, 4),
                                                (INTERRUPTED, math.nan, None, 6)])
    add_study(storage, "other", "tpe", 0, [(C, 0.99, 0.99, 10)])  # another comparison in the same storage
    trials = comparison_trials(storage, "cmp")
    assert list(trials["number"]) == [0, 1, 2, 3, 4, 5]
    assert list(trials["cum_epochs"]) == [3, 13, 15, 25, 29, 29]  # pruned and failed epochs count, interrupted ones not
    assert list(trials["cum_trials"]) == [1, 2, 3, 4, 4, 4]  # a failed trial does not use up the trial count
    assert trials["cum_seconds"].iloc[-1] == pytest.approx(2.0 * 35 + 0.5 * 6)  # the time it took is spent, though
    study = load_comparison(storage, "cmp")[1].iloc[0]
    assert (study["n_fail"], study["n_interrupted"], study["epochs_consumed"]) == (1, 1, 29)
    assert not trials["replayed"].any() and set(trials["arm"]) == {"tpe+median"}
    curves = anytime(trials, "cum_epochs", [2, 3, 12, 13, 14, 15, 25, 100])
    assert curves["val_acc"].iloc[:2].isna().all()  # before the first complete trial: NaN, even after a pruned 0.9
    np.testing.assert_allclose(curves["val_acc"].to_numpy(), [np.nan, np.nan, np.nan, 0.5, 0.5, 0.5, 0.6, 0.6])
    np.testing.assert_allclose(curves["test_acc"].to_numpy(), [np.nan, np.nan, np.nan, 0.45, 0.45, 0.45, 0.58, 0.58])
    by_trials = anytime(trials, "cum_trials", [1, 2, 4])
    np.testing.assert_allclose(by_trials["val_acc"].to_numpy(), [np.nan, 0.5, 0.6])
    # regret: the best complete val acc (0.6, never the pruned 0.95) minus the incumbent; normalised by best - worst
    assert curves["regret"].iloc[-1] == pytest.approx(0.0)
    assert curves["regret_norm"].isna().all()  # one study: best == worst final, no normalisation


def test_a_missing_comparison_names_the_stored_ones(storage):
    add_study(storage, "alpha", "tpe", 0, [(C, 0.5, 0.5, 5)])
    add_study(storage, "beta", "tpe", 0, [(C, 0.5, 0.5, 5)])
    with pytest.raises(UsageError, match="alpha, beta"):
        comparison_trials(storage, "gamma")


def test_regret_and_bands_are_transforms_of_the_raw_values(storage):
    for r, (a, b) in enumerate([(0.6, 0.5), (0.7, 0.4), (0.8, 0.55)]):
        add_study(storage, "cmp", "tpe", r, [(C, a, a, 50)])
        add_study(storage, "cmp", "random", r, [(C, b, b, 50)])
    trials = comparison_trials(storage, "cmp")
    curves = anytime(trials, "cum_epochs", [25, 50, 100])
    final = curves[curves["budget"] == 100]
    assert final["regret"].max() == pytest.approx(0.8 - 0.4)
    np.testing.assert_allclose(final["regret_norm"], (0.8 - final["val_acc"]) / (0.8 - 0.4))
    bands = anytime_bands(curves)
    row = bands[(bands["arm"] == "tpe") & (bands["budget"] == 100)].iloc[0]
    assert row["n"] == 3 and row["val_median"] == pytest.approx(0.7)
    assert row["val_low"] <= row["val_median"] <= row["val_high"]
    assert row["regret_median"] == pytest.approx(0.1)
    assert row["regret_norm_low"] == pytest.approx((0.8 - row["val_high"]) / 0.4)
    assert bands[bands["budget"] == 25]["val_median"].isna().all()  # no incumbent yet anywhere


def test_median_band_counts_no_incumbent_as_worst_and_is_seeded():
    x = np.array([[np.nan, 0.5], [np.nan, 0.6], [0.7, 0.7]])
    out = median_band(x)
    assert math.isnan(out[0, 0]) and out[0, 1] == pytest.approx(0.6)  # 2 of 3 repeats without one: no median
    np.testing.assert_array_equal(median_band(x), out)
    assert np.isnan(median_band(np.array([[0.5]]))[1:]).all()  # one repeat: no band


def test_ranks_share_ties_and_put_no_incumbent_last():
    curves = pd.DataFrame({
        "arm": ["a", "b", "c", "a", "b", "c"], "repeat": [0, 0, 0, 1, 1, 1], "budget": [10.0] * 6,
        "val_acc": [0.5, 0.5, np.nan, 0.9, 0.8, 0.7]})
    ranked = ranks(curves).set_index(["repeat", "arm"])["rank"]
    assert ranked[(0, "a")] == ranked[(0, "b")] == 1.5 and ranked[(0, "c")] == 3.0
    assert list(ranked.loc[1]) == [1.0, 2.0, 3.0]
    mean = mean_ranks(ranks(curves)).set_index("arm")
    assert mean.loc["a", "mean_rank"] == pytest.approx(1.25) and mean.loc["c", "mean_rank"] == 3.0
    assert (mean["n"] == 2).all()
    # a repeat where one arm has no study is left out (ranks need every arm)
    partial = pd.concat([curves, pd.DataFrame({"arm": ["a"], "repeat": [2], "budget": [10.0], "val_acc": [0.1]})])
    assert set(ranks(partial)["repeat"]) == {0, 1}


def test_one_clearly_better_arm_and_one_like_random():
    rng = np.random.default_rng(3)
    base = rng.normal(0.6, 0.03, 10)  # the repeat's shared difficulty (paired)
    values = {"random": base + rng.normal(0, 0.01, 10), "tpe": base + 0.05 + rng.normal(0, 0.01, 10),
              "qmc": base + rng.normal(0, 0.01, 10)}
    table = compare_arms(values).set_index("arm")
    assert table.loc["tpe", "verdict"] == "better than random" and table.loc["tpe", "p_holm"] <= 0.05
    assert table.loc["tpe", "n_pairs"] == 10
    assert table.loc["qmc", "verdict"] == "not distinguishable"
    assert table.loc["random", "verdict"] == "reference"
    worse = compare_arms({"random": values["random"], "bad": values["random"] - 0.05}).set_index("arm")
    assert worse.loc["bad", "verdict"] == "worse than random"


def test_without_random_the_reference_is_the_best_median():
    table = compare_arms({"tpe": [0.7] * 6, "cmaes": [0.6] * 6})
    assert set(table["reference"]) == {"tpe"}


def test_ties_zero_differences_and_too_few_repeats():
    same = wilcoxon_test(np.full(10, 0.5), np.full(10, 0.5))
    assert same.p == 1.0 and same.n_nonzero == 0
    assert compare_arms({"random": [0.5] * 10, "tpe": [0.5] * 10}).set_index("arm").loc["tpe", "verdict"].startswith(
        "not distinguishable")
    few = compare_arms({"random": [0.5] * 5, "tpe": [0.9] * 5}).set_index("arm").loc["tpe"]
    assert few["verdict"] == "too few repeats (5) for a test" and math.isnan(few["p_holm"])
    assert MIN_TEST_PAIRS == 6
    # zero differences are dropped: 6 equal pairs and 5 positive ones leave too few
    assert wilcoxon_test(np.r_[np.full(6, 0.5), np.full(5, 0.6)], np.full(11, 0.5)).reason.startswith("too few")
    tied = wilcoxon_test(np.array([0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.6, 0.6]), np.full(8, 0.5))  # tied |differences|
    assert tied.p == pytest.approx(2 / 2**8)  # every difference positive: the permutation test's smallest p
    missing = wilcoxon_test(np.array([0.6, np.nan, 0.7]), np.array([0.5, 0.5, np.nan]))
    assert missing.n_pairs == 1


def test_a_null_comparison_is_not_distinguishable_at_the_stated_rate():
    """300 comparisons of 3 arms x 10 repeats from one distribution (with a shared repeat effect): the family-wise rate
    of any 'better'/'worse' verdict must stay at 5% (plus 3 binomial standard errors)."""
    rng = np.random.default_rng(20240516)
    runs, repeats = 300, 10
    false = 0
    for _ in range(runs):
        base = rng.normal(0.6, 0.05, repeats)
        values = {arm: base + rng.normal(0, 0.02, repeats) for arm in ("random", "tpe", "cmaes")}
        verdicts = compare_arms(values)["verdict"]
        false += bool(verdicts.str.startswith(("better", "worse")).any())
    assert false / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_summary_at_a_quarter_and_the_whole_budget(storage):
    rng = np.random.default_rng(7)
    for r in range(10):
        base = 0.5 + rng.normal(0, 0.02)
        add_study(storage, "cmp", "random", r, [(C, base, base - 0.01, 20), (C, base + 0.01, base, 20)])
        add_study(storage, "cmp", "tpe+median", r, [(P, 0.1, None, 5), (C, base + 0.1, base + 0.09, 20),
                                                    (C, base + 0.2 + rng.normal(0, 0.01), base + 0.2, 40)])
    trials = comparison_trials(storage, "cmp")
    summary = summary_table(trials).set_index(["fraction", "arm"])
    assert set(summary.index.get_level_values("fraction")) == {0.25, 1.0}
    quarter, whole = summary.loc[0.25], summary.loc[1.0]
    assert whole.loc["tpe+median", "budget"] == 100 and quarter.loc["tpe+median", "budget"] == 25
    assert (summary["n"] == 10).all()
    # at 25 epochs: random's first trial (20 ep) counts, tpe+median's first complete one ends at 25 (pruned 5 + 20)
    assert quarter.loc["tpe+median", "n_found"] == 10
    assert whole.loc["tpe+median", "verdict"] == "better than random"
    assert whole.loc["tpe+median", "val_median"] > whole.loc["tpe+median", "val_q1"]
    assert whole.loc["random", "verdict"] == "reference"


def test_missing_and_failed_repeats_are_named(storage):
    for r in range(3):
        add_study(storage, "cmp", "random", r, [(C, 0.5, 0.5, 50), (C, 0.55, 0.5, 50)])
    add_study(storage, "cmp", "tpe", 0, [(C, 0.6, 0.6, 50), (C, 0.65, 0.6, 50)])
    add_study(storage, "cmp", "tpe", 1, [(C, 0.6, 0.6, 10), (F, math.nan, None, 1)])  # crashed early
    trials, studies = load_comparison(storage, "cmp")
    problems = incomplete_repeats(studies, trials)
    named = {(a, r): p for a, r, p in problems.itertuples(index=False)}
    assert named[("tpe", 2)] == "missing: no study"
    assert "failed" in named[("tpe", 1)]
    assert ("random", 0) not in named
    assert any("stopped short" in p for p in problems["problem"])
    cost = cost_table(trials, studies).set_index("arm")
    assert cost.loc["tpe", "failed"] == 1 and cost.loc["tpe", "n"] == 2
    assert cost.loc["random", "train_images"] == 3 * 100 * 1000


def test_the_report_is_written_and_marks_a_replay(storage, tmp_path):
    for r in range(6):
        add_study(storage, "cmp", "random", r, [(C, 0.5 + r / 100, 0.5, 40), (P, 0.3, None, 10), (C, 0.52, 0.5, 40)],
                  replay="tables/cifar.csv@abc123")
        add_study(storage, "cmp", "cmaes", r, [(C, 0.55 + r / 100, 0.5, 40), (C, 0.6, 0.58, 40)], replay="tables/cifar.csv@abc123")
    add_study(storage, "cmp", "cmaes", 6, [(C, 0.6, 0.6, 40)], replay="tables/cifar.csv@abc123")  # random's repeat 6 is missing
    out = tmp_path / "report"
    written = write_compare_report(storage, "cmp", out)
    for name in ("index.html", "trials.csv", "anytime.csv", "ranks.csv", "summary.csv", "cost.csv"):
        assert out / name in written and (out / name).exists()
    page = (out / "index.html").read_text()
    assert "Replayed from a recorded table (tables/cifar.csv@abc123)" in page
    assert "random repeat 6: missing: no study" in page
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 * 3 + 6 * 2 + 1 and trials["replayed"].all()
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["fraction"]) == {0.25, 1.0} and {"n", "p_holm", "verdict"} <= set(summary.columns)
    assert summary.set_index(["fraction", "arm"]).loc[(1.0, "cmaes"), "n"] == 7
    anytime_csv = pd.read_csv(out / "anytime.csv")
    assert {"cum_epochs", "cum_trials", "cum_seconds"} == set(anytime_csv["axis"]) and "n" in anytime_csv
    ranks_csv = pd.read_csv(out / "ranks.csv")
    assert set(ranks_csv["n"]) == {6}  # repeat 6 has no random study: left out of the ranks
    cost = pd.read_csv(out / "cost.csv").set_index("arm")
    assert cost.loc["random", "pruned"] == 6 and cost.loc["random", "epochs_consumed"] == 6 * 90


def test_the_report_command_writes_a_comparison_and_refuses_a_missing_one(tmp_path, capsys):
    from bench.report import main

    url = f"sqlite:///{tmp_path / 'c.db'}"
    storage = optuna.storages.RDBStorage(url)
    for r in range(2):
        for arm in ("random", "tpe"):
            add_study(storage, "cmp", arm, r, [(C, 0.5 + r / 10, 0.5, 100)])
    out = tmp_path / "out"
    assert main(["--compare", "cmp", "--storage", url, "--out", str(out)]) == 0
    assert (out / "index.html").exists() and (out / "summary.csv").exists()
    with pytest.raises(UsageError, match="no comparison 'nope'.*cmp"):
        main(["--compare", "nope", "--storage", url, "--out", str(out)])
    with pytest.raises(UsageError, match="no comparison database"):
        main(["--compare", "cmp", "--storage", f"sqlite:///{tmp_path / 'absent.db'}"])
    with pytest.raises(SystemExit):
        main(["--compare", "cmp", "--study", "x"])


def test_a_replay_that_ranks_the_arms_as_the_live_runs_agrees(storage):
    from bench.comparison import agreement, analyse

    rng = np.random.default_rng(3)
    for name, shift in (("live", 0.0), ("replay", 0.002)):  # the replay: the same arms, a little noise of its own
        for repeat in range(6):
            for arm, level in (("random", 0.5), ("tpe", 0.6), ("cmaes", 0.7)):
                vals = level + shift + rng.normal(0, 0.01, 5)
                add_study(storage, name, arm, repeat, [(C, float(v), float(v), 20) for v in vals], budget=100)
    live = analyse(storage, "live")
    table, tau = agreement(live, analyse(storage, "replay"))
    assert set(table["arm"]) == {"random", "tpe", "cmaes"} and tau == pytest.approx(1.0)
    assert table["bands_overlap"].all() and (table["n_live"] == 6).all()
    reversed_ranks = {"random": 0.7, "tpe": 0.6, "cmaes": 0.5}
    for repeat in range(6):
        for arm, level in reversed_ranks.items():
            add_study(storage, "upside", arm, repeat, [(C, level, level, 20)] * 5, budget=100)
    table, tau = agreement(live, analyse(storage, "upside"))
    assert tau == pytest.approx(-1.0) and not table["bands_overlap"].any()
