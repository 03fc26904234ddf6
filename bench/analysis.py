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
from optuna.distributions import CategoricalDistribution

from bench.objective import Attr
from bench.space import (
    BASELINE,
    CONFIG_FIELDS,
    FACTORS,
    MATRIX_LEVELS,
    Level,
    Param,
    TrainConfig,
    build_space,
    config_from_params,
    is_active,
)
from bench.stats import MIN_PAIRS, NO_DATA, Interval, mean_interval, paired_diff, welch_diff
from bench.train import inert_techniques

BASELINE_CELL = "baseline"
CUMULATIVE_PREFIX = "cumulative: "
MAX_ATTEMPTS = 2  # a diverged or failed matrix cell is run once more, then its outcome stands
MIN_IMPORTANCE_TRIALS = 10  # fANOVA from fewer completed trials ranks noise
BUDGET_IMAGES_SHARE = 0.9  # a run matches a claim's images from 90% of them (a 10% validation split may be carved)

METRIC_COLUMNS = {  # frame column -> user attribute
    "val_acc": Attr.VAL_ACC, "test_acc": Attr.TEST_ACC, "epochs_run": Attr.EPOCHS_RUN,
    "train_seconds": Attr.TRAIN_SECONDS, "images_per_sec": Attr.IMAGES_PER_SEC, "param_count": Attr.PARAM_COUNT,
    "device": Attr.DEVICE, "seed": Attr.SEED, "cell": Attr.CELL, "fail_reason": Attr.FAIL_REASON,
    "kept_epoch": Attr.KEPT_EPOCH, "train_images": Attr.TRAIN_IMAGES, "num_classes": Attr.NUM_CLASSES,
    "pack_size": Attr.PACK_SIZE, "pack_slot": Attr.PACK_SLOT,
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
    for col in ("val_acc", "test_acc", "train_seconds", "images_per_sec", "train_images", "num_classes"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def csv_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """trials.csv: curves as JSON text so the file stays one row per trial."""
    out = trials.copy()
    for col in ("val_curve", "loss_curve"):
        out[col] = out[col].map(json.dumps)
    return out


# --- claims -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    epochs: int
    reference_epochs: int
    train_images: int
    source: str  # "assignment": named by it; "bench": the assignment names none, bench declares it


@dataclass(frozen=True)
class Claim:
    """One claim of the assignment in numeric form (bench/claims.json)."""

    text: str
    measure: str  # "difference" (points vs the reference cell) or "accuracy" (the level's own mean, %)
    reference: str
    low: float | None
    high: float | None
    budget: Budget

    @property
    def quantified(self) -> bool:
        return self.low is not None or self.high is not None


def load_claims() -> dict[str, Claim]:
    raw = json.loads(resources.files("bench").joinpath("claims.json").read_text())["claims"]
    claims = {}
    for name, c in raw.items():
        b = c["budget"]
        budget = Budget(b["epochs"], b.get("reference_epochs", b["epochs"]), b["train_images"], b["source"])
        claims[name] = Claim(c["text"], c["measure"], c["reference"], c["low"], c["high"], budget)
    return claims


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


# --- designed cells: one outcome per (cell, seed) -------------------------------------------


def attempt_kind(state: str, stop_reason: Any, fail_reason: Any) -> str:
    """How one trial of a designed cell counts: complete, active (waiting/running), diverged, failed, or
    retry (interrupted, orphaned or stopped for reasons outside the config: run again, not an outcome)."""
    if state == "COMPLETE":
        return "complete"
    if state in ("RUNNING", "WAITING"):
        return "active"
    if stop_reason == "diverged":
        return "diverged"
    if state == "FAIL" and stop_reason == "failed" and fail_reason != "interrupted":
        return "failed"
    return "retry"


def settle(kinds: list[str]) -> str:
    """The outcome of one (cell, seed) from its attempts: complete, active, diverged, failed or todo (run it)."""
    for outcome in ("complete", "active"):
        if outcome in kinds:
            return outcome
    bad = [k for k in kinds if k in ("diverged", "failed")]
    if len(bad) >= MAX_ATTEMPTS:
        return "diverged" if all(k == "diverged" for k in bad) else "failed"
    return "todo"


@dataclass(frozen=True)
class CellData:
    """A designed cell's per-seed accuracies (%), diverged seeds counted at chance accuracy."""

    values: dict[int, float]
    seeds: int  # seeds with a settled outcome
    diverged: int
    failed: int
    epochs: int | None
    train_images: int | None
    config: TrainConfig | None


def designed_cells(trials: pd.DataFrame, metric: str = "test_acc") -> dict[str, CellData]:
    cells: dict[str, CellData] = {}
    if "cell" not in trials or trials["cell"].isna().all():
        return cells
    chance = 100 / trials["num_classes"].dropna().max() if trials["num_classes"].notna().any() else math.nan
    names = [p.name for p in build_space()]
    for name, group in trials[trials["cell"].notna()].groupby("cell", sort=False):
        values: dict[int, float] = {}
        diverged = failed = 0
        for seed, attempts in group.groupby("seed"):
            kinds = [attempt_kind(*r) for r in attempts[["state", "stop_reason", "fail_reason"]].itertuples(index=False)]
            outcome = settle(kinds)
            if outcome == "complete":
                values[int(seed)] = float(attempts.loc[attempts["state"] == "COMPLETE", metric].iloc[-1] * 100)
            elif outcome == "diverged":
                diverged += 1
                values[int(seed)] = chance
            elif outcome == "failed":
                failed += 1
        latest = group.sort_values("number").iloc[-1]
        images = group["train_images"].dropna()
        config = config_from_params({k: latest[k] for k in names}) if all(k in group for k in names) else None
        cells[str(name)] = CellData(values, len(values) + failed, diverged, failed, int(latest["epochs"]),
                                    int(images.iloc[-1]) if len(images) else None, config)
    return cells


def compare(level: CellData, reference: CellData) -> Interval:
    """level - reference in points: paired t over shared seeds, Welch where fewer than 2 seeds pair."""
    shared = sorted(set(level.values) & set(reference.values))
    if len(shared) >= 2:
        return paired_diff(np.array([level.values[s] for s in shared]), np.array([reference.values[s] for s in shared]))
    return welch_diff(np.array(list(level.values.values())), np.array(list(reference.values.values())))


def budget_note(claim: Claim, level: CellData, reference: CellData | None) -> str | None:
    """Why the run's budget is not the claim's (None when it is)."""
    b = claim.budget
    ref_epochs = reference.epochs if reference is not None and claim.measure == "difference" else b.reference_epochs
    images = level.train_images
    if level.epochs == b.epochs and ref_epochs == b.reference_epochs and images is not None \
            and images >= BUDGET_IMAGES_SHARE * b.train_images:
        return None
    paired = claim.measure == "difference" and (b.epochs != b.reference_epochs or ref_epochs != level.epochs)
    epochs = f"{level.epochs}" + (f" vs {ref_epochs}" if paired else "")
    claimed = f"{b.epochs}" + (f" vs {b.reference_epochs}" if b.epochs != b.reference_epochs else "")
    shown = "unknown" if images is None else f"{images:,}"
    return (f"ran {epochs} epochs on {shown} train images; the claim is about {claimed} epochs on "
            f"{b.train_images:,} ({'named by the assignment' if b.source == 'assignment' else 'declared by bench'})")


# --- the improvement matrix ------------------------------------------------------------


def _designed_row(level: Level, cells: dict[str, CellData], claim: Claim | None) -> dict[str, Any]:
    data = cells.get(level.name)
    reference_name = claim.reference if claim else BASELINE_CELL
    reference = cells.get(reference_name)
    row: dict[str, Any] = {"reference": reference_name}
    if data is None or not data.values:
        return row | {"n": 0 if data is None else data.seeds, "verdict": "no data",
                      "note": "no finished seed of this cell" if data else "cell not run in this study"}
    acc = mean_interval(np.array(list(data.values.values())))
    diff = compare(data, reference) if reference is not None and reference.values else NO_DATA
    row |= {"n": data.seeds, "n_reference": reference.seeds if reference else 0, "n_pairs": diff.n,
            "n_diverged": data.diverged, "n_failed": data.failed,
            "mean_acc": acc.mean, "acc_low": acc.low, "acc_high": acc.high,
            "diff": diff.mean, "diff_low": diff.low, "diff_high": diff.high, "interval": diff.method,
            "epochs": data.epochs, "reference_epochs": reference.epochs if reference else None,
            "train_images": data.train_images}
    judged = acc if claim is not None and claim.measure == "accuracy" else diff
    inert = inert_techniques(data.config) if data.config is not None else []
    if claim is None:
        status, note = "no claim", ""
    elif inert:
        status, note = "inert at this budget", "; ".join(inert)
    elif (why := budget_note(claim, data, reference)) is not None:
        status, note = "not tested at this budget", why
    elif not claim.quantified:
        status, note = "not quantified", "the assignment gives no number to test"
    elif data.failed:
        status, note = "incomplete", f"{data.failed} of {data.seeds} seeds failed twice"
    elif judged.n < MIN_PAIRS:
        status, note = "too few seeds", f"{judged.n} {'pairs' if judged is diff else 'seeds'}; a verdict needs {MIN_PAIRS}"
    else:
        status, note = verdict(judged.low, judged.high, claim.low, claim.high), ""
    if data.diverged:
        note = f"{data.diverged} of {data.seeds} diverged (counted at chance accuracy)" + (f"; {note}" if note else "")
    return row | {"verdict": status, "note": note}


def _effective_config(level: Level | None) -> TrainConfig:
    return BASELINE if level is None else BASELINE.replace(**level.changes)


def _search_groups(frame: pd.DataFrame, level_cfg: TrainConfig, ref_cfg: TrainConfig, factor: str,
                   space: tuple[Param, ...]) -> tuple[pd.Series, pd.Series]:
    """Search trials carrying the level vs trials at its reference, on every knob of the level's factor.

    A knob both configs share and that is categorical must match in both groups (so SGD trials never
    count as "Adam lr 1e-3", nor MSE trials as the label-smoothing reference); a knob they differ on
    sorts trials by which value is strictly nearer (ties join neither group). Knobs inactive in
    either config (momentum for Adam) are left free.
    """
    lv, rv = level_cfg.__dict__, ref_cfg.__dict__
    is_level = pd.Series(True, index=frame.index)
    is_ref = pd.Series(True, index=frame.index)
    for p in space:
        if p.factor != factor or not (is_active(p, lv) and is_active(p, rv)):
            continue
        col, a, b = frame[p.name], lv[p.name], rv[p.name]
        categorical = isinstance(p.distribution, CategoricalDistribution)
        if a == b and not categorical:
            continue  # a continuous knob the level does not set: free in both groups
        if categorical:
            is_level &= col == a
            is_ref &= col == b
        else:
            v = pd.to_numeric(col, errors="coerce")
            if getattr(p.distribution, "log", False):  # lr: 2e-3 is nearer 3e-3 than 1e-3
                v, a, b = np.log(v), math.log(a), math.log(b)
            to_a, to_b = (v - a).abs(), (v - b).abs()
            is_level &= to_a < to_b
            is_ref &= to_b < to_a
    return is_level, is_ref


SEARCH_METHOD = ("search trials: exploratory. Levels co-vary and TPE chooses each trial from the earlier ones, so "
                 "these are descriptive means with no interval and no verdict; run python -m bench.matrix for verdicts")
DESIGNED_METHOD = "designed ablation (one factor at a time, seed-paired with the reference cell)"


def matrix_frame(trials: pd.DataFrame, *, levels: tuple[Level, ...] = MATRIX_LEVELS,
                 claims: dict[str, Claim] | None = None, metric: str = "test_acc",
                 cells: dict[str, CellData] | None = None) -> pd.DataFrame:
    """The improvement matrix, one row per level: n, mean accuracy, difference from the reference cell
    (95% t-interval), budget, the assignment's claim and a verdict (designed cells only). `cells`: the
    study's designed_cells when the caller already has them."""
    claims = load_claims() if claims is None else claims
    cells = designed_cells(trials, metric) if cells is None else cells
    designed = bool(cells)
    by_name = {level.name: level for level in levels}
    space = build_space()
    done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
    rows = []
    for level in levels:
        claim = claims.get(level.name)
        row: dict[str, Any] = {"factor": level.factor, "level": level.name}
        if designed:
            row |= _designed_row(level, cells, claim)
        else:
            reference = claim.reference if claim else BASELINE_CELL
            ref_cfg = _effective_config(by_name.get(reference))
            is_level, is_ref = _search_groups(done, _effective_config(level), ref_cfg, level.factor, space)
            acc, ref_acc = done.loc[is_level, metric] * 100, done.loc[is_ref, metric] * 100
            row |= {"reference": reference, "n": len(acc), "n_reference": len(ref_acc),
                    "mean_acc": acc.mean() if len(acc) else math.nan,
                    "diff": acc.mean() - ref_acc.mean() if len(acc) and len(ref_acc) else math.nan,
                    "verdict": "exploratory", "note": "confounded: descriptive difference of means, no interval"}
        if claim is not None:
            b = claim.budget
            row |= {"claim": claim.text, "claim_measure": claim.measure, "claim_low": claim.low, "claim_high": claim.high,
                    "claim_epochs": b.epochs, "claim_reference_epochs": b.reference_epochs,
                    "claim_train_images": b.train_images, "claim_budget_source": b.source}
        rows.append(row | {"method": DESIGNED_METHOD if designed else SEARCH_METHOD})
    frame = pd.DataFrame(rows, columns=MATRIX_COLUMNS)
    frame["n"] = frame["n"].fillna(0).astype(int)
    frame["factor"] = pd.Categorical(frame["factor"], categories=FACTORS, ordered=True)
    return frame.sort_values(["factor"], kind="stable").reset_index(drop=True)


MATRIX_COLUMNS = [
    "factor", "level", "reference", "n", "n_reference", "n_pairs", "n_diverged", "n_failed",
    "mean_acc", "acc_low", "acc_high", "diff", "diff_low", "diff_high", "interval", "verdict", "note",
    "epochs", "reference_epochs", "train_images", "claim", "claim_measure", "claim_low", "claim_high",
    "claim_epochs", "claim_reference_epochs", "claim_train_images", "claim_budget_source", "method",
]


def baseline_interval(trials: pd.DataFrame, metric: str = "test_acc",
                      cells: dict[str, CellData] | None = None) -> Interval:
    """Accuracy (in %) of the baseline: the designed baseline cell, else trials with the baseline's settings."""
    cells = designed_cells(trials, metric) if cells is None else cells
    if cells:
        base = cells.get(BASELINE_CELL)
        return mean_interval(np.array(list(base.values.values()))) if base else NO_DATA
    done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
    return mean_interval(done.loc[baseline_rows(done), metric].to_numpy() * 100)


def baseline_rows(trials: pd.DataFrame) -> pd.Series:
    """Trials whose every searched knob but epochs equals the baseline's."""
    names = [p.name for p in build_space() if p.factor != "epochs"]
    base = BASELINE.__dict__
    mask = pd.Series(True, index=trials.index)
    for name in names:
        mask &= trials[name] == base[name]
    return mask


def cumulative_frame(trials: pd.DataFrame, metric: str = "test_acc",
                     cells: dict[str, CellData] | None = None) -> pd.DataFrame:
    """The designed cumulative path from the baseline, step by step, in declared order ('cumulative: k. name')."""
    cells = designed_cells(trials, metric) if cells is None else cells
    steps = sorted(name for name in cells if name.startswith(CUMULATIVE_PREFIX))
    if steps and BASELINE_CELL in cells:
        steps.insert(0, BASELINE_CELL)
    rows = []
    for step in steps:
        data = cells[step]
        ci = mean_interval(np.array(list(data.values.values())))
        rows.append({"step": step.removeprefix(CUMULATIVE_PREFIX), "n": data.seeds, "n_diverged": data.diverged,
                     "epochs": data.epochs, "mean_acc": ci.mean, "acc_low": ci.low, "acc_high": ci.high})
    return pd.DataFrame(rows, columns=["step", "n", "n_diverged", "epochs", "mean_acc", "acc_low", "acc_high"])


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


def param_importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """fANOVA importances with a fixed seed, or empty with the reason (fewer than MIN_IMPORTANCE_TRIALS completed)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}, (f"parameter importance needs at least {MIN_IMPORTANCE_TRIALS} completed trials (this study has "
                    f"{len(complete)}); fewer would rank noise")
    try:  # Optuna scores the parameters every completed trial has (conditional ones drop out)
        scores = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:  # e.g. no parameter common to all completed trials
        return {}, f"parameter importance could not be fitted ({exc})"
    if not scores:
        return {}, "parameter importance: no parameter varies across the completed trials"
    return {k: float(v) for k, v in scores.items()}, ""
