"""Extract, then analyse: a study becomes one tidy DataFrame; the matrix statistics read that frame.

Everything the report renders (CSV, HTML tables, plots) consumes these frames, and tests
assert on them rather than on pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import optuna
import pandas as pd

from bench.objective import Attr
from bench.space import BASELINE, CONFIG_FIELDS, FACTORS, MATRIX_LEVELS, Level, Param, build_space, config_from_params

BASELINE_CELL = "baseline"
CUMULATIVE_PREFIX = "cumulative: "
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

METRIC_COLUMNS = {  # frame column -> user attribute
    "val_acc": Attr.VAL_ACC, "test_acc": Attr.TEST_ACC, "epochs_run": Attr.EPOCHS_RUN,
    "train_seconds": Attr.TRAIN_SECONDS, "images_per_sec": Attr.IMAGES_PER_SEC, "param_count": Attr.PARAM_COUNT,
    "device": Attr.DEVICE, "seed": Attr.SEED, "cell": Attr.CELL, "fail_reason": Attr.FAIL_REASON,
}


def trials_frame(study: optuna.Study, space: tuple[Param, ...] | None = None) -> pd.DataFrame:
    """One row per trial: state, why it stopped, every parameter (effective value), metrics, curves."""
    space = space or build_space()
    names = [p.name for p in space]
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        known = {k: v for k, v in t.params.items() if k in CONFIG_FIELDS}
        effective = config_from_params(known).__dict__
        stop = a.get(Attr.STOP_REASON) or ("pruned" if t.state.name == "PRUNED" else t.state.name.lower())
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "stop_reason": stop}
        row |= {name: effective[name] for name in names}
        row |= {col: a.get(key) for col, key in METRIC_COLUMNS.items()}
        row |= {
            "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
            "val_curve": list(a.get(Attr.VAL_CURVE, [])), "loss_curve": list(a.get(Attr.LOSS_CURVE, [])),
        }
        rows.append(row)
    columns = ["number", "state", "stop_reason", *names, *METRIC_COLUMNS, "datetime_start", "datetime_complete",
               "val_curve", "loss_curve"]
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("val_acc", "test_acc", "train_seconds", "images_per_sec"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def csv_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """trials.csv: curves as JSON text so the file stays one row per trial."""
    out = trials.copy()
    for col in ("val_curve", "loss_curve"):
        out[col] = out[col].map(json.dumps)
    return out


# --- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def bootstrap_mean(values: np.ndarray, *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """Mean with a percentile-bootstrap 95% interval (NaN interval below 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return Interval(math.nan, math.nan, math.nan)
    if len(values) < 2:
        return Interval(float(values.mean()), math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values))).mean(1)
    alpha = (1 - CONFIDENCE) / 2
    return Interval(float(values.mean()), *map(float, np.quantile(means, [alpha, 1 - alpha])))


def bootstrap_diff(a: np.ndarray, b: np.ndarray, *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """mean(a) - mean(b) with a 95% interval, each group resampled independently."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return Interval(math.nan, math.nan, math.nan)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    d = rng.choice(a, size=(resamples, len(a))).mean(1) - rng.choice(b, size=(resamples, len(b))).mean(1)
    alpha = (1 - CONFIDENCE) / 2
    return Interval(diff, *map(float, np.quantile(d, [alpha, 1 - alpha])))


def load_claims() -> dict[str, dict[str, Any]]:
    text = resources.files("bench").joinpath("claims.json").read_text()
    return json.loads(text)["claims"]


def verdict(low: float, high: float, claim_low: float | None, claim_high: float | None) -> str:
    """supported: the interval lies inside the claim; contradicted: wholly outside; else inconclusive."""
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    lo = -math.inf if claim_low is None else claim_low
    hi = math.inf if claim_high is None else claim_high
    if low >= lo and high <= hi:
        return "supported"
    if high < lo or low > hi:
        return "contradicted"
    return "inconclusive"


# --- the improvement matrix ------------------------------------------------------------


def _closer_to_level(values: pd.Series, level_value: Any, base_value: Any) -> pd.Series:
    if isinstance(level_value, bool | str) or isinstance(base_value, bool | str):
        return values == level_value
    v = pd.to_numeric(values, errors="coerce")
    return (v - level_value).abs() < (v - base_value).abs()


def _search_groups(frame: pd.DataFrame, level: Level) -> tuple[pd.Series, pd.Series]:
    """Trials that carry the level's change vs trials at the baseline on the same knobs."""
    base = BASELINE.__dict__
    is_level = pd.Series(True, index=frame.index)
    is_base = pd.Series(True, index=frame.index)
    for name, value in level.changes.items():
        if value == base[name]:
            continue
        near = _closer_to_level(frame[name], value, base[name])
        is_level &= near
        is_base &= ~near
    return is_level, is_base


def matrix_frame(trials: pd.DataFrame, *, levels: tuple[Level, ...] = MATRIX_LEVELS,
                 claims: dict[str, dict[str, Any]] | None = None, metric: str = "test_acc") -> pd.DataFrame:
    """The improvement matrix: per factor and level, n, mean accuracy (95% CI), difference from baseline (95% CI),
    the assignment's claim and a verdict. Uses designed cells when the study has them, else search trials."""
    claims = load_claims() if claims is None else claims
    done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
    designed = done["cell"].notna().any() if "cell" in done else False
    method = "designed ablation (one factor at a time)" if designed else "search trials (marginal estimate, confounded)"
    if designed:
        baseline_acc = done.loc[done["cell"] == BASELINE_CELL, metric].to_numpy()
    rows = []
    for level in levels:
        if designed:
            acc = done.loc[done["cell"] == level.name, metric].to_numpy()
            base_acc = baseline_acc
        else:
            is_level, is_base = _search_groups(done, level)
            acc, base_acc = done.loc[is_level, metric].to_numpy(), done.loc[is_base, metric].to_numpy()
        level_ci = bootstrap_mean(acc * 100)
        diff = bootstrap_diff(acc * 100, base_acc * 100)
        claim = claims.get(level.name, {})
        rows.append({
            "factor": level.factor, "level": level.name, "n": len(acc), "n_baseline": len(base_acc),
            "mean_acc": level_ci.mean, "acc_low": level_ci.low, "acc_high": level_ci.high,
            "diff": diff.mean, "diff_low": diff.low, "diff_high": diff.high,
            "claim": claim.get("text", ""), "claim_low": claim.get("low"), "claim_high": claim.get("high"),
            "verdict": verdict(diff.low, diff.high, claim.get("low"), claim.get("high")) if claim else "no claim",
            "method": method,
        })
    frame = pd.DataFrame(rows)
    frame["factor"] = pd.Categorical(frame["factor"], categories=FACTORS, ordered=True)
    return frame.sort_values(["factor"], kind="stable").reset_index(drop=True)


def baseline_interval(trials: pd.DataFrame, metric: str = "test_acc") -> Interval:
    """Accuracy (in %) of the baseline: the designed baseline cell, else trials with the baseline's settings."""
    done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
    if done["cell"].notna().any():
        return bootstrap_mean(done.loc[done["cell"] == BASELINE_CELL, metric].to_numpy() * 100)
    return bootstrap_mean(done.loc[baseline_rows(done), metric].to_numpy() * 100)


def baseline_rows(trials: pd.DataFrame) -> pd.Series:
    """Trials whose every searched knob but epochs equals the baseline's."""
    names = [p.name for p in build_space() if p.factor != "epochs"]
    base = BASELINE.__dict__
    mask = pd.Series(True, index=trials.index)
    for name in names:
        mask &= trials[name] == base[name]
    return mask


def cumulative_frame(trials: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """The designed cumulative path from the baseline, step by step, in declared order ('cumulative: k. name')."""
    done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
    cells = done["cell"].dropna()
    steps = sorted({c for c in cells if c.startswith(CUMULATIVE_PREFIX)})
    if steps and (cells == BASELINE_CELL).any():
        steps.insert(0, BASELINE_CELL)
    rows = []
    for step in steps:
        ci = bootstrap_mean(done.loc[done["cell"] == step, metric].to_numpy() * 100)
        rows.append({"step": step.removeprefix(CUMULATIVE_PREFIX), "n": int((done["cell"] == step).sum()),
                     "mean_acc": ci.mean, "acc_low": ci.low, "acc_high": ci.high})
    return pd.DataFrame(rows, columns=["step", "n", "mean_acc", "acc_low", "acc_high"])


def pareto_front_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed trials no other beats on both test accuracy (higher) and train seconds (lower)."""
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=["test_acc", "train_seconds"])
    ordered = done.sort_values(["train_seconds", "test_acc"], ascending=[True, False])
    front, best = [], -np.inf
    for idx, acc in ordered["test_acc"].items():
        if acc > best:
            front.append(idx)
            best = acc
    return ordered.loc[front]


def param_importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances with a fixed seed; empty when there is too little to fit."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3:
        return {}
    try:  # Optuna scores the parameters every completed trial has (conditional ones drop out)
        scores = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # e.g. no parameter common to all completed trials
        return {}
    return {k: float(v) for k, v in scores.items()}
