"""The statistics of a comparison of searches (`python -m bench.compare`): stored studies in, tidy frames out.

One study per arm (sampler[+pruner]) and repeat, all in one storage, found by their study attributes. Everything the
compare report shows is a frame made here (the CSVs, the HTML and the plots only consume them), so the tests assert on
frames, not pixels. No torch and no plotting here.

Definitions (the report's "how to read" says the same):

- Budget: training epochs consumed, pruned and failed trials' epochs included (`cum_epochs`, in trial-number order).
- Incumbent at budget b: the COMPLETE trial with the best value among those its study finished within b (Optuna's
  rule: pruned trials are never candidates; a tie keeps the earlier trial). A trial that ends past b does not count at
  b, so an arm cannot borrow epochs beyond the budget. Before the first COMPLETE trial there is no incumbent (NaN).
- Median over repeats: a repeat without an incumbent yet counts as the worst value, so the median exists once at least
  half the repeats have one. Its band: the 2.5% and 97.5% percentiles of the median of 1,000 seeded bootstrap
  resamples of the repeats (inverted-CDF percentiles, no interpolation).
- Regret: the best validation accuracy of any COMPLETE trial anywhere in the comparison minus the incumbent's;
  normalised regret divides it by (that best - the worst final incumbent of any arm and repeat), so 0 is the best seen
  and 1 the worst final result (NaN when the two coincide). Raw accuracies are always kept beside it.
- Ranks: per budget point and repeat, arms ranked by incumbent val acc (1 = best, ties share the average rank, no
  incumbent ranks last), over the repeats in which every arm has a study; then the mean rank per arm.
- Test: at 25% and 100% of the budget, a paired two-sided Wilcoxon signed-rank test of each arm's incumbent val acc
  against the reference arm's (pairs by repeat; zero differences dropped; exact without ties, exact sign-flip
  permutation with ties), Holm-corrected across the arms at that budget point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
from scipy import stats as sstats

from bench.errors import UsageError
from bench.schema import Attr, StudyAttr, trial_stopped_from_outside
from bench.stats import CONFIDENCE, holm

REFERENCE_ARM = "random"
# an axis is the trials frame's column it reads: epochs consumed, finished trials, simulated wall time
EPOCHS_AXIS, TRIALS_AXIS, SECONDS_AXIS = "cum_epochs", "cum_trials", "cum_seconds"
AXES = (EPOCHS_AXIS, TRIALS_AXIS, SECONDS_AXIS)
GRID_POINTS = 40
SUMMARY_FRACTIONS = (0.25, 1.0)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
ALPHA = 1 - CONFIDENCE
# with n nonzero pairs the smallest exact two-sided p is 2 / 2**n: 0.0625 at n=5, so p <= 0.05 needs n >= 6
MIN_TEST_PAIRS = next(n for n in range(1, 64) if 2.0 ** (1 - n) <= ALPHA)
PERMUTATIONS = 2**16  # sign flips: exact enumeration up to 16 pairs, a seeded random subset beyond
FINISHED_STATES = ("COMPLETE", "PRUNED")  # bench.run's rule: failed trials do not use up the trial count
NO_TEST_SAME = "not distinguishable (all pairs equal: no test)"

TRIAL_COLUMNS = ["arm", "repeat", "study", "number", "state", "epochs_run", "cum_epochs", "cum_trials", "val_acc",
                 "test_acc", "train_seconds", "sampler_seconds", "cum_seconds", "replayed", "budget_epochs",
                 "train_images"]
STUDY_COLUMNS = ["arm", "repeat", "study", "budget_epochs", "train_images", "replay", "n_trials", "n_complete",
                 "n_pruned", "n_fail", "n_interrupted", "n_unfinished", "epochs_consumed"]


# --- the extract --------------------------------------------------------------------------------


def _open(storage: str | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    if isinstance(storage, str):
        from bench.storage import open_storage  # only for a URL: a storage object needs nothing opened

        return open_storage(storage, heartbeat=False)
    return storage


def _summaries(storage: optuna.storages.BaseStorage, name: str) -> list[optuna.study.StudySummary]:
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    mine = [s for s in summaries if s.user_attrs.get(StudyAttr.COMPARE) == name]
    if not mine:
        stored = sorted({str(s.user_attrs[StudyAttr.COMPARE]) for s in summaries if StudyAttr.COMPARE in s.user_attrs})
        raise UsageError(f"no comparison {name!r} in this storage (it holds: {', '.join(stored) or 'no comparisons'}); "
                         "check --compare and --storage")
    return sorted(mine, key=lambda s: (str(s.user_attrs.get(StudyAttr.ARM)), int(s.user_attrs.get(StudyAttr.REPEAT, -1))))


def _num(attrs: Mapping[str, Any], key: str) -> float:
    v = attrs.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def load_comparison(storage: str | optuna.storages.BaseStorage, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, studies) of the comparison `name`: `comparison_trials`'s frame and one row per study (STUDY_COLUMNS)."""
    storage = _open(storage)
    rows, study_rows = [], []
    for summary in _summaries(storage, name):
        attrs = summary.user_attrs
        arm, repeat = str(attrs.get(StudyAttr.ARM)), int(attrs.get(StudyAttr.REPEAT, -1))
        replay = attrs.get(StudyAttr.REPLAY)
        budget, images = _num(attrs, StudyAttr.BUDGET_EPOCHS), _num(attrs, StudyAttr.TRAIN_IMAGES)
        trials = sorted(storage.get_all_trials(summary._study_id, deepcopy=False), key=lambda t: t.number)
        cum_epochs = cum_seconds = 0.0
        cum_trials = 0
        states: list[str] = []
        interrupted = 0
        for t in trials:
            ua = t.user_attrs
            state = t.state.name
            outside = trial_stopped_from_outside(t)
            interrupted += outside
            states.append(state)
            epochs = _num(ua, Attr.EPOCHS_RUN)
            train_s, sampler_s = _num(ua, Attr.TRAIN_SECONDS), _num(ua, Attr.SAMPLER_SECONDS)
            cum_epochs += 0.0 if math.isnan(epochs) or outside else epochs
            cum_seconds += (0.0 if math.isnan(train_s) else train_s) + (0.0 if math.isnan(sampler_s) else sampler_s)
            cum_trials += state in FINISHED_STATES
            val = float(t.value) if state == "COMPLETE" and t.value is not None else _num(ua, Attr.VAL_ACC)
            rows.append({
                "arm": arm, "repeat": repeat, "study": summary.study_name, "number": t.number, "state": state,
                "epochs_run": epochs, "cum_epochs": cum_epochs, "cum_trials": cum_trials, "val_acc": val,
                "test_acc": _num(ua, Attr.TEST_ACC), "train_seconds": train_s, "sampler_seconds": sampler_s,
                "cum_seconds": cum_seconds, "replayed": replay is not None or Attr.REPLAYED_FROM in ua,
                "budget_epochs": budget, "train_images": images,
            })
        study_rows.append({
            "arm": arm, "repeat": repeat, "study": summary.study_name, "budget_epochs": budget, "train_images": images,
            "replay": None if replay is None else str(replay), "n_trials": len(trials),
            "n_complete": states.count("COMPLETE"), "n_pruned": states.count("PRUNED"), "n_fail": states.count("FAIL") - interrupted,
            "n_interrupted": interrupted, "n_unfinished": sum(s in ("RUNNING", "WAITING") for s in states), "epochs_consumed": cum_epochs,
        })
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS), pd.DataFrame(study_rows, columns=STUDY_COLUMNS)


def comparison_trials(storage: str | optuna.storages.BaseStorage, name: str) -> pd.DataFrame:
    """One row per stored trial of the comparison (TRIAL_COLUMNS), in (arm, repeat, number) order.

    cum_epochs / cum_seconds / cum_trials accumulate within the trial's study in trial-number order: epochs of every
    trial (pruned and failed included; not those stopped from outside, interrupted or orphaned, which bench.compare runs
    again and does not charge to the search's budget), simulated wall time (train + sampler seconds), finished (complete or pruned)
    trials. val_acc is a COMPLETE trial's value, else its stored last validation accuracy.
    """
    return load_comparison(storage, name)[0]


# --- problems: what the design (every arm x every repeat seen) lacks --------------------------------


def incomplete_repeats(studies: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """(arm, repeat, problem) for every arm x repeat that is missing, has no, failed or unfinished trials, or stopped
    short of its budget (room was left for another trial as long as the longest one of the comparison); one row each,
    its problems joined by '; '."""
    arms, repeats = sorted(set(studies["arm"])), sorted(set(studies["repeat"]))
    longest = float(trials["epochs_run"].max()) if len(trials) and trials["epochs_run"].notna().any() else 0.0
    rows = []
    for arm in arms:
        for repeat in repeats:
            here = studies[(studies["arm"] == arm) & (studies["repeat"] == repeat)]
            if here.empty:
                rows.append((arm, repeat, "missing: no study"))
                continue
            s, found = here.iloc[0], []
            if s["n_trials"] == 0:
                found.append("no trials")
            if s["n_fail"]:
                found.append(f"{int(s['n_fail'])} failed trials")
            if s["n_unfinished"]:
                found.append(f"{int(s['n_unfinished'])} unfinished trials (interrupted or still running)")
            if s["n_trials"] and np.isfinite(s["budget_epochs"]) and s["epochs_consumed"] < s["budget_epochs"] - longest:
                found.append(f"stopped short: {s['epochs_consumed']:.0f} of {s['budget_epochs']:.0f} budget epochs")
            if found:
                rows.append((arm, repeat, "; ".join(found)))
    if studies["budget_epochs"].nunique() > 1:
        budgets = ", ".join(f"{b:.0f}" for b in sorted(studies["budget_epochs"].unique()))
        rows.append(("*", -1, f"budgets differ between studies: {budgets} (the largest is the grid's 100%)"))
    return pd.DataFrame(rows, columns=["arm", "repeat", "problem"])


# --- anytime curves ----------------------------------------------------------------------------


def budget_epochs(trials: pd.DataFrame) -> float:
    """The comparison's epoch budget (the largest stored; the consumed epochs when none is stored)."""
    stored = trials["budget_epochs"].dropna()
    if len(stored):
        return float(stored.max())
    return float(trials["cum_epochs"].max()) if len(trials) else 0.0


def default_points(trials: pd.DataFrame, axis: str = EPOCHS_AXIS) -> np.ndarray:
    """GRID_POINTS evenly spaced budget points up to the budget (epochs; 25% is one of them), every trial count up to
    the most finished trials, or evenly spaced seconds up to the longest simulated wall time."""
    if axis == EPOCHS_AXIS:
        top = budget_epochs(trials)
    elif axis == TRIALS_AXIS:
        top = float(trials[TRIALS_AXIS].max()) if len(trials) else 0.0
        return np.arange(1, int(top) + 1, dtype=float)
    else:
        top = float(trials[SECONDS_AXIS].max()) if len(trials) else 0.0
    if not top > 0:
        return np.array([], dtype=float)
    return np.linspace(top / GRID_POINTS, top, GRID_POINTS)


def _incumbents(study: pd.DataFrame, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axis value after each trial and the incumbent's (val, test) after it (NaN before the first COMPLETE trial)."""
    study = study.sort_values("number")
    xs = study[x].to_numpy(float)
    val, test = np.full(len(study), np.nan), np.full(len(study), np.nan)
    best, best_test = -math.inf, math.nan
    for i, (state, v, t) in enumerate(zip(study["state"], study["val_acc"], study["test_acc"], strict=True)):
        if state == "COMPLETE" and np.isfinite(v) and v > best:  # strict: a tie keeps the earlier trial, as Optuna
            best, best_test = float(v), float(t)
        if best > -math.inf:
            val[i], test[i] = best, best_test
    return xs, val, test


def best_seen(trials: pd.DataFrame) -> float:
    done = trials[(trials["state"] == "COMPLETE")]["val_acc"].dropna()
    return float(done.max()) if len(done) else math.nan


def anytime(trials: pd.DataFrame, axis: str = EPOCHS_AXIS, points: Sequence[float] | np.ndarray | None = None,
            *, best: float | None = None, worst: float | None = None) -> pd.DataFrame:
    """The incumbent of every arm x repeat at each budget point: arm, repeat, budget, val_acc, test_acc, regret,
    regret_norm (NaN before the first COMPLETE trial). `best` / `worst` fix regret's normalisation (default: the best
    COMPLETE val acc of the comparison and the worst final incumbent, the incumbent at 100% of the epoch budget)."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    grid = default_points(trials, axis) if points is None else np.asarray(points, dtype=float)
    rows = []
    for (arm, repeat), study in trials.groupby(["arm", "repeat"], sort=True):
        xs, val, test = _incumbents(study, axis)
        idx = np.searchsorted(xs, grid, side="right") - 1  # the last trial finished within each budget point
        ok = idx >= 0
        take = np.where(ok, idx, 0)
        v = np.where(ok, val[take], np.nan) if len(xs) else np.full(len(grid), np.nan)
        t = np.where(ok, test[take], np.nan) if len(xs) else np.full(len(grid), np.nan)
        rows.append(pd.DataFrame({"arm": arm, "repeat": int(repeat), "budget": grid, "val_acc": v, "test_acc": t}))
    columns = ["arm", "repeat", "budget", "val_acc", "test_acc", "regret", "regret_norm"]
    if not rows:
        return pd.DataFrame(columns=columns)
    curves = pd.concat(rows, ignore_index=True)
    best = best_seen(trials) if best is None else best
    worst = worst_final(trials) if worst is None else worst
    curves["regret"] = best - curves["val_acc"]
    span = best - worst
    curves["regret_norm"] = curves["regret"] / span if np.isfinite(span) and span > 0 else np.nan
    return curves[columns]


def final_incumbents(trials: pd.DataFrame) -> pd.DataFrame:
    """arm, repeat, val_acc, test_acc of the incumbent at 100% of the epoch budget."""
    return anytime(trials, EPOCHS_AXIS, [budget_epochs(trials)], best=math.nan, worst=math.nan)[["arm", "repeat", "val_acc", "test_acc"]]


def worst_final(trials: pd.DataFrame) -> float:
    finals = final_incumbents(trials)["val_acc"].dropna() if len(trials) else pd.Series(dtype=float)
    return float(finals.min()) if len(finals) else math.nan


def median_band(values: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Median over repeats (rows) for each column, with its bootstrap 95% band: an array (3, columns) of median, low,
    high. NaN counts as the worst value (no incumbent yet); a median or bound that lands on one is NaN; no band below
    2 repeats."""
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n, cols = x.shape
    out = np.full((3, cols), np.nan)
    if n == 0:
        return out
    filled = np.where(np.isnan(x), -np.inf, x)
    with np.errstate(invalid="ignore"):
        out[0] = np.median(filled, axis=0)
        if n >= 2:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, n, size=(resamples, n))
            medians = np.median(filled[idx], axis=1)  # (resamples, cols)
            out[1:] = np.quantile(medians, [ALPHA / 2, 1 - ALPHA / 2], axis=0, method="inverted_cdf")
    out[~np.isfinite(out)] = np.nan
    return out


def anytime_bands(curves: pd.DataFrame) -> pd.DataFrame:
    """Per arm and budget point: n (repeats), n_found (repeats with an incumbent), the median of val_acc and test_acc
    with their bootstrap 95% bands (`_low`, `_high`), and regret / regret_norm as the same transform of the val acc
    median and band as `anytime` applied to each repeat (regret falls as accuracy rises, so the band's ends swap)."""
    rows = []
    for arm, one in curves.groupby("arm", sort=True):
        wide_val = one.pivot(index="repeat", columns="budget", values="val_acc")
        wide_test = one.pivot(index="repeat", columns="budget", values="test_acc").reindex_like(wide_val)
        v, t = median_band(wide_val.to_numpy()), median_band(wide_test.to_numpy())
        rows.append(pd.DataFrame({
            "arm": arm, "budget": wide_val.columns.to_numpy(float), "n": len(wide_val),
            "n_found": wide_val.notna().sum().to_numpy(),
            "val_median": v[0], "val_low": v[1], "val_high": v[2], "test_median": t[0], "test_low": t[1], "test_high": t[2],
        }))
    columns = ["arm", "budget", "n", "n_found", "val_median", "val_low", "val_high", "test_median", "test_low", "test_high",
               "regret_median", "regret_low", "regret_high", "regret_norm_median", "regret_norm_low", "regret_norm_high"]
    if not rows:
        return pd.DataFrame(columns=columns)
    bands = pd.concat(rows, ignore_index=True)
    # the curves' own normalisation: regret = best - val and regret_norm = regret / span on every row
    best = _first_finite(curves["val_acc"] + curves["regret"])
    span = _first_finite(curves["regret"] / curves["regret_norm"].where(curves["regret_norm"] != 0))
    bands["regret_median"], bands["regret_low"], bands["regret_high"] = (
        best - bands["val_median"], best - bands["val_high"], best - bands["val_low"])
    for part in ("median", "low", "high"):
        bands[f"regret_norm_{part}"] = bands[f"regret_{part}"] / span
    return bands[columns]


def _first_finite(x: pd.Series) -> float:
    x = x.replace([np.inf, -np.inf], np.nan).dropna()
    return float(x.iloc[0]) if len(x) else math.nan


# --- ranks ---------------------------------------------------------------------------------------


def ranks(curves: pd.DataFrame) -> pd.DataFrame:
    """arm, repeat, budget, rank: per budget point and repeat, 1 = the best incumbent val acc, ties share the average
    rank, no incumbent ranks last (tied with other arms without one). Only repeats in which every arm has a study."""
    if curves.empty:
        return pd.DataFrame(columns=["arm", "repeat", "budget", "rank"])
    arms = curves["arm"].nunique()
    whole = curves.groupby("repeat")["arm"].nunique()
    blocks = curves[curves["repeat"].isin(whole[whole == arms].index)].copy()
    blocks["rank"] = blocks.groupby(["budget", "repeat"])["val_acc"].rank(ascending=False, method="average", na_option="bottom")
    return blocks[["arm", "repeat", "budget", "rank"]].reset_index(drop=True)


def mean_ranks(ranked: pd.DataFrame) -> pd.DataFrame:
    """arm, budget, mean_rank, n (repeats averaged), n_arms."""
    if ranked.empty:
        return pd.DataFrame(columns=["arm", "budget", "mean_rank", "n", "n_arms"])
    out = ranked.groupby(["arm", "budget"], sort=True)["rank"].agg(mean_rank="mean", n="count").reset_index()
    out["n_arms"] = ranked["arm"].nunique()
    return out


# --- paired tests against the reference arm ------------------------------------------------------


@dataclass(frozen=True)
class PairedTest:
    """One arm's paired Wilcoxon signed-rank test against the reference (p NaN: no test, `reason` says why)."""

    n_pairs: int  # pairs where both arms have a value
    n_nonzero: int  # of them, pairs that differ (the test's sample size)
    median_diff: float  # median of (arm - reference) over the pairs
    p: float
    reason: str = ""


def wilcoxon_test(a: np.ndarray, b: np.ndarray, *, seed: int = BOOTSTRAP_SEED) -> PairedTest:
    """Two-sided paired Wilcoxon signed-rank test of a vs b (pairs with a NaN dropped, zero differences dropped).

    Exact null distribution without ties; with ties the exact (sign-flip) permutation distribution of the tie-corrected
    statistic, since the tabulated one assumes distinct ranks. No test below MIN_TEST_PAIRS differing pairs: p <= 0.05
    is impossible there, so 'not distinguishable' would only restate the sample size.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    median = float(np.median(d)) if n else math.nan
    nonzero = d[d != 0]
    k = len(nonzero)
    if n == 0:
        return PairedTest(0, 0, median, math.nan, "no pairs")
    if k == 0:
        return PairedTest(n, 0, median, 1.0, "all pairs equal")
    if k < MIN_TEST_PAIRS:
        return PairedTest(n, k, median, math.nan, f"too few repeats ({k}) for a test")
    ties = len(np.unique(np.abs(nonzero))) < k
    if ties:
        method: Any = sstats.PermutationMethod(n_resamples=PERMUTATIONS, rng=np.random.default_rng(seed))
    else:
        method = "exact" if k <= 50 else "approx"
    p = float(sstats.wilcoxon(nonzero, alternative="two-sided", method=method).pvalue)
    return PairedTest(n, k, median, min(1.0, p))


def compare_arms(values: Mapping[str, Sequence[float] | np.ndarray], reference: str | None = None) -> pd.DataFrame:
    """Every arm's paired test against `reference`, Holm-corrected across the arms, with a verdict.

    `values[arm][i]` is that arm's result in repeat i (the same i is the same seeds in every arm; NaN: none). Without
    `reference`: REFERENCE_ARM when it is an arm, else the arm with the best median. Columns: arm, reference, n,
    n_pairs, n_nonzero, median_diff (arm - reference), p_raw, p_holm, verdict. Arrays in, so a simulation can call it
    thousands of times without a storage.
    """
    arrays = {arm: np.asarray(v, dtype=float) for arm, v in values.items()}
    if reference is None:
        if REFERENCE_ARM in arrays:
            reference = REFERENCE_ARM
        else:
            medians = {arm: float(np.nanmedian(v)) if np.isfinite(v).any() else -math.inf for arm, v in arrays.items()}
            reference = max(medians, key=lambda arm: medians[arm])
    ref = arrays[reference]
    others = [arm for arm in arrays if arm != reference]
    tests = {arm: wilcoxon_test(arrays[arm], ref) for arm in others}
    adjusted = dict(zip(others, holm([tests[arm].p if not tests[arm].reason else math.nan for arm in others]), strict=True))
    rows = [{"arm": reference, "reference": reference, "n": int(np.isfinite(ref).sum()), "n_pairs": math.nan,
             "n_nonzero": math.nan, "median_diff": math.nan, "p_raw": math.nan, "p_holm": math.nan, "verdict": "reference"}]
    for arm in others:
        t = tests[arm]
        p_raw = t.p if not t.reason else math.nan
        rows.append({"arm": arm, "reference": reference, "n": int(np.isfinite(arrays[arm]).sum()), "n_pairs": t.n_pairs,
                     "n_nonzero": t.n_nonzero, "median_diff": t.median_diff, "p_raw": p_raw, "p_holm": adjusted[arm],
                     "verdict": _verdict(t, adjusted[arm], reference)})
    return pd.DataFrame(rows)


def _verdict(t: PairedTest, p_holm: float, reference: str) -> str:
    if t.reason == "all pairs equal":
        return NO_TEST_SAME
    if t.reason:
        return t.reason if t.reason.startswith("too few") else f"no test ({t.reason})"
    if p_holm <= ALPHA:
        return f"better than {reference}" if t.median_diff > 0 else f"worse than {reference}"
    return "not distinguishable"


# --- the summary, ECDF and cost tables ----------------------------------------------------------------


def summary_table(trials: pd.DataFrame, fractions: Sequence[float] = SUMMARY_FRACTIONS, reference: str | None = None) -> pd.DataFrame:
    """Per budget fraction and arm: n (repeats), median [q1, q3] of the incumbent's val and test acc, and the paired
    test against the reference arm (Holm across the arms within each fraction). Repeats where an arm has no incumbent
    yet leave the test's pairs (n_pairs says how many remain) and count as the worst value in the median."""
    budget = budget_epochs(trials)
    points = [f * budget for f in fractions]
    curves = anytime(trials, EPOCHS_AXIS, points, best=math.nan, worst=math.nan)
    repeats = sorted(trials["repeat"].unique()) if len(trials) else []
    arms = sorted(trials["arm"].unique()) if len(trials) else []
    out = []
    for fraction, point in zip(fractions, points, strict=True):
        at = curves[np.isclose(curves["budget"], point)]
        val = at.pivot(index="repeat", columns="arm", values="val_acc").reindex(index=repeats, columns=arms)
        tests = compare_arms({arm: val[arm].to_numpy() for arm in arms}, reference).set_index("arm")
        for arm in arms:
            present = at[at["arm"] == arm]
            row = {"fraction": fraction, "budget": point, "arm": arm, "n": len(present),
                   "n_found": int(present["val_acc"].notna().sum())}
            for name in ("val", "test"):
                q = _quartiles(present[f"{name}_acc"].to_numpy(float))
                row |= {f"{name}_median": q[1], f"{name}_q1": q[0], f"{name}_q3": q[2]}
            row |= tests.loc[arm].drop("n").to_dict()
            out.append(row)
    return pd.DataFrame(out)


def _quartiles(x: np.ndarray) -> np.ndarray:
    """q1, median, q3 with no incumbent counted as the worst value (NaN where one lands on it)."""
    if len(x) == 0:
        return np.full(3, np.nan)
    with np.errstate(invalid="ignore"):
        q = np.quantile(np.where(np.isnan(x), -np.inf, x), [0.25, 0.5, 0.75], method="inverted_cdf")
    return np.where(np.isfinite(q), q, np.nan)


def ecdf(finals: pd.DataFrame) -> pd.DataFrame:
    """arm, val_acc, ecdf, n: the empirical CDF of each arm's final incumbents (repeats without one left out, n counts
    all repeats, so the curve tops out below 1 when some found nothing)."""
    rows = []
    for arm, one in finals.groupby("arm", sort=True):
        v = np.sort(one["val_acc"].dropna().to_numpy(float))
        rows.append(pd.DataFrame({"arm": arm, "val_acc": v, "ecdf": np.arange(1, len(v) + 1) / len(one), "n": len(one)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["arm", "val_acc", "ecdf", "n"])


def cost_table(trials: pd.DataFrame, studies: pd.DataFrame) -> pd.DataFrame:
    """Per arm, summed over its repeats: n (studies), epochs, train images (epochs x each study's images per epoch),
    train and sampler seconds, trials by state, and the median epochs per repeat beside the budget."""
    rows = []
    for arm, one in studies.groupby("arm", sort=True):
        t = trials[trials["arm"] == arm]
        images = (t["epochs_run"].fillna(0) * t["train_images"]).sum(min_count=1)
        rows.append({
            "arm": arm, "n": len(one), "epochs_consumed": float(t["epochs_run"].fillna(0).sum()),
            "epochs_per_repeat": float(one["epochs_consumed"].median()), "budget_epochs": float(one["budget_epochs"].max()),
            "train_images": float(images), "train_seconds": float(t["train_seconds"].fillna(0).sum()),
            "sampler_seconds": float(t["sampler_seconds"].fillna(0).sum()),
            "trials": int(one["n_trials"].sum()), "complete": int(one["n_complete"].sum()), "pruned": int(one["n_pruned"].sum()),
            "failed": int(one["n_fail"].sum()), "interrupted": int(one["n_interrupted"].sum()),
            "unfinished": int(one["n_unfinished"].sum()),
        })
    return pd.DataFrame(rows)


# --- everything at once ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonFrames:
    """Every frame the compare report shows."""

    name: str
    trials: pd.DataFrame
    studies: pd.DataFrame
    problems: pd.DataFrame
    curves: dict[str, pd.DataFrame]  # axis -> anytime() per arm x repeat
    bands: dict[str, pd.DataFrame]  # axis -> anytime_bands()
    ranks: pd.DataFrame  # mean_ranks() on the epochs axis
    summary: pd.DataFrame
    finals: pd.DataFrame
    ecdf: pd.DataFrame
    cost: pd.DataFrame
    best: float  # regret's zero: the best COMPLETE val acc anywhere
    worst: float  # regret_norm's one: the worst final incumbent

    @property
    def replays(self) -> list[str]:
        return sorted({r for r in self.studies["replay"] if isinstance(r, str)})

    @property
    def reference(self) -> str:
        refs = self.summary["reference"].dropna() if "reference" in self.summary else []
        return str(refs.iloc[0]) if len(refs) else ""


def analyse(storage: str | optuna.storages.BaseStorage, name: str) -> ComparisonFrames:
    trials, studies = load_comparison(storage, name)
    best, worst = best_seen(trials), worst_final(trials)
    curves = {axis: anytime(trials, axis, best=best, worst=worst) for axis in AXES}
    bands = {axis: anytime_bands(c) for axis, c in curves.items()}
    finals = final_incumbents(trials)
    return ComparisonFrames(
        name=name, trials=trials, studies=studies, problems=incomplete_repeats(studies, trials), curves=curves, bands=bands,
        ranks=mean_ranks(ranks(curves[EPOCHS_AXIS])), summary=summary_table(trials), finals=finals, ecdf=ecdf(finals),
        cost=cost_table(trials, studies), best=best, worst=worst)


# --- does a replay rank the arms as the live runs do? -----------------------------------------------


def agreement(live: ComparisonFrames, replay: ComparisonFrames) -> tuple[pd.DataFrame, float]:
    """Per arm at the final budget point of each comparison: the median incumbent val acc with its bootstrap band
    and the mean rank, live beside replayed; `bands_overlap` says whether the two bands share a value (the replay
    agrees within their bands). Kendall's tau between the arms' mean ranks (NaN with fewer than 2 shared arms)."""
    rows = []
    for label, frames in (("live", live), ("replay", replay)):
        bands = frames.bands[EPOCHS_AXIS]
        final = bands[bands["budget"] == bands.groupby("arm")["budget"].transform("max")].set_index("arm")
        ranked = frames.ranks[frames.ranks["budget"] == frames.ranks.groupby("arm")["budget"].transform("max")].set_index("arm")
        for arm in final.index:
            rows.append({"arm": arm, "side": label, "n": int(final.loc[arm, "n"]),
                         "val_median": final.loc[arm, "val_median"], "val_low": final.loc[arm, "val_low"],
                         "val_high": final.loc[arm, "val_high"],
                         "mean_rank": ranked.loc[arm, "mean_rank"] if arm in ranked.index else math.nan})
    long = pd.DataFrame(rows, columns=["arm", "side", "n", "val_median", "val_low", "val_high", "mean_rank"])
    wide = long.pivot(index="arm", columns="side").dropna(how="any")
    wide.columns = [f"{column}_{side}" for column, side in wide.columns]
    wide = wide.reset_index()
    wide["bands_overlap"] = (wide["val_low_live"] <= wide["val_high_replay"]) & (wide["val_low_replay"] <= wide["val_high_live"])
    tau = math.nan
    if len(wide) >= 2:
        tau = float(sstats.kendalltau(wide["mean_rank_live"], wide["mean_rank_replay"]).statistic)
    return wide, tau
