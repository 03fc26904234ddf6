"""Extract, then analyse: a study becomes one tidy DataFrame; the matrix statistics read that frame.

Everything the report renders (CSV, HTML tables, plots) consumes these frames, and tests
assert on them rather than on pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution

from bench.design import (
    BASELINE_CELL,
    CUMULATIVE_PREFIX,
    cumulative_steps,
    inert_techniques,
    matrix_rows,
    resolve_reference,
)
from bench.schema import Attr, StudyAttr, stopped_from_outside
from bench.space import (
    BASELINE,
    BUDGET_TIERS,
    CONFIG_FIELDS,
    EPOCHS_PARAM,
    FACTORS,
    MATRIX_LEVELS,
    Level,
    Param,
    TrainConfig,
    build_space,
    config_from_params,
    is_active,
)
from bench.stats import (
    CONFIDENCE,
    MIN_PAIRS,
    NO_DATA,
    Interval,
    claim_bounds,
    claim_test,
    holm,
    holm_levels,
    mean_interval,
    paired_diff,
    seeds_needed,
    welch_diff,
)

__all__ = ["BASELINE_CELL", "CUMULATIVE_PREFIX"]  # re-exported: the report and tests name cells through analysis

MAX_ATTEMPTS = 2  # a diverged or failed matrix cell is run once more, then its outcome stands
# fANOVA on 10 trials of pure noise scored its top parameter 0.15-0.20 depending on its seed (issue 14's audit);
# below 30 completed trials the page says why it shows none, and above it shows the spread over 5 fANOVA seeds
MIN_IMPORTANCE_TRIALS = 30
IMPORTANCE_SEEDS = 5
NOT_RECORDED = "not recorded"  # a trial's precision before bench recorded it (the matrix's trials 0-172: bf16, README)
BUDGET_IMAGES_SHARE = 0.9  # a run matches a claim's images from 90% of them (a 10% validation split may be carved)

METRIC_COLUMNS = {  # frame column -> user attribute
    "val_acc": Attr.VAL_ACC, "test_acc": Attr.TEST_ACC, "epochs_run": Attr.EPOCHS_RUN,
    "train_seconds": Attr.TRAIN_SECONDS, "images_per_sec": Attr.IMAGES_PER_SEC, "param_count": Attr.PARAM_COUNT,
    "device": Attr.DEVICE, "precision": Attr.PRECISION, "seed": Attr.SEED, "cell": Attr.CELL, "fail_reason": Attr.FAIL_REASON,
    "kept_epoch": Attr.KEPT_EPOCH, "train_images": Attr.TRAIN_IMAGES, "num_classes": Attr.NUM_CLASSES,
    "pack_size": Attr.PACK_SIZE, "pack_slot": Attr.PACK_SLOT, "hardware": Attr.HARDWARE, "torch": Attr.TORCH,
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


def recorded_values(values: pd.Series) -> str:
    """The distinct values trials recorded ("a; b"), then "not recorded" when some recorded none."""
    known = sorted(set(values.dropna().astype(str)))
    return "; ".join(known + ([NOT_RECORDED] if values.isna().any() else []))


COST_STATES = ("COMPLETE", "PRUNED", "FAIL")  # a running or waiting trial has recorded no cost yet
COST_KINDS = ("complete", "pruned", "diverged", "failed", "interrupted")


def cost_kind(state: str, stop_reason: Any, fail_reason: Any) -> str:
    """How a finished attempt counts in the cost table: a designed study stores a diverged seed as PRUNED, and an
    interrupted or orphaned attempt (run again) is not a failure of its config."""
    if state == "COMPLETE":
        return "complete"
    if stop_reason == "diverged":
        return "diverged"
    if state == "PRUNED":
        return "pruned"
    return "interrupted" if stopped_from_outside(state, stop_reason, fail_reason) else "failed"


def cost_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """What the study's training cost, read from its trials, one row per budget tier (a designed study's cells; a search
    mixes budgets, so its rows are per device and precision only), device and precision: attempts by kind, images
    trained (epochs run x train images; an attempt whose process died recorded no epochs_run, so its validation curve
    counts its finished epochs), device hours (each attempt's recorded train seconds, evaluation included, a packed
    trial charged its share of the pack: seconds / pack size; an attempt whose process died recorded none and is
    counted in `untimed`; a config that could not be built failed before any training and costs nothing), the median
    speed of the complete trials, the dates, and the hardware and torch versions the trials recorded. A study resumed
    on other machines shows each arithmetic on its own row; rows run by tier, then by their first start."""
    keys = ["device", "precision"]
    frame = trials[trials["state"].isin(COST_STATES)].copy()
    if frame["cell"].notna().any():
        keys.insert(0, EPOCHS_PARAM)
    columns = [*keys, "hardware", "torch", *COST_KINDS, "untimed", "images_trained", "device_hours", "images_per_sec",
               "first", "last"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    for col in keys[-2:]:  # device and precision: group keys, and a missing key would drop its trials
        frame[col] = frame[col].where(frame[col].notna(), NOT_RECORDED)
    frame["kind"] = [cost_kind(*r) for r in zip(frame["state"], frame["stop_reason"], frame["fail_reason"], strict=True)]
    curve_epochs = frame["val_curve"].map(lambda curve: len(curve) if isinstance(curve, list) else 0)
    epochs_run = pd.to_numeric(frame["epochs_run"], errors="coerce").fillna(curve_epochs)
    frame["images_trained"] = (epochs_run * frame["train_images"].fillna(0)).astype("int64")
    frame["device_hours"] = member_seconds(frame).fillna(0) / 3600
    rows = []
    for key, group in frame.groupby(keys, sort=False):
        kinds = group["kind"].value_counts()
        speed = group.loc[group["kind"] == "complete", "images_per_sec"].dropna()
        rows.append(dict(zip(keys, key, strict=True)) | {
            "hardware": recorded_values(group["hardware"]), "torch": recorded_values(group["torch"]),
            **{kind: int(kinds.get(kind, 0)) for kind in COST_KINDS},
            "untimed": int(((group["kind"] == "interrupted") & group["train_seconds"].isna()).sum()),
            "images_trained": int(group["images_trained"].sum()),
            "device_hours": round(float(group["device_hours"].sum()), 3),
            "images_per_sec": round(float(speed.median()), 1) if len(speed) else math.nan,
            "first": min(group["datetime_start"].dropna(), default=pd.NaT),
            "last": max(group["datetime_complete"].dropna(), default=pd.NaT)})
    out = pd.DataFrame(rows, columns=columns)
    order = [EPOCHS_PARAM] if EPOCHS_PARAM in keys else []
    out = out.sort_values([*order, "first", *keys], kind="stable", na_position="last").reset_index(drop=True)
    for col in ("first", "last"):  # dates, not times: the CSV stays readable and the page short
        out[col] = pd.to_datetime(out[col]).dt.strftime("%Y-%m-%d")
    return out


# --- claims -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    epochs: int | None  # None: the claim names none; bench tests it at each budget tier (the row's epochs)
    reference_epochs: int | None
    train_images: int | None  # None: the whole train split of the data the row is judged on
    source: str  # "assignment": named by it; "bench": the assignment names none, bench declares it

    @property
    def source_text(self) -> str:
        return "named by the assignment" if self.source == "assignment" else "declared by bench"

    def at(self, tier: int) -> tuple[int, int]:
        """(epochs, reference epochs) the claim is about when tested at `tier`."""
        epochs = tier if self.epochs is None else self.epochs
        return epochs, epochs if self.reference_epochs is None else self.reference_epochs


@dataclass(frozen=True)
class Claim:
    """One claim of the assignment in numeric form (bench/claims.json)."""

    id: str
    spec: str  # the SPEC claim it encodes (C1-C11)
    level: str
    text: str
    reading: str
    measure: str  # "difference" (points vs the reference cell) or "accuracy" (the level's own mean, %)
    reference: str | None
    low: float | None
    high: float | None
    wording: str  # "possible": a best-case phrasing, read (as every such claim) as a claim about the mean
    budget: Budget
    data: tuple[str, ...] = ("CIFAR-10",)  # the datasets the claim is about (claims.json "datasets")

    @property
    def quantified(self) -> bool:
        return self.low is not None or self.high is not None


@dataclass(frozen=True)
class DataSpec:
    """The data every claim is about (claims.json 'dataset')."""

    name: str
    classes: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    train_images: int


@functools.lru_cache(maxsize=1)
def _claims_file() -> dict:
    return json.loads(resources.files("bench").joinpath("claims.json").read_text())


def load_claims() -> list[Claim]:
    claims = []
    for c in _claims_file()["claims"]:
        b = c["budget"]
        budget = Budget(b["train_epochs"], b.get("reference_epochs", b["train_epochs"]), b["train_images"], b["source"])
        claims.append(Claim(c["id"], c["spec"], c["level"], c["text"], c["reading"], c["measure"], c["reference"],
                            c["low"], c["high"], c["wording"], budget, tuple(c.get("data", ("CIFAR-10",)))))
    return claims


def load_data_specs() -> dict[str, DataSpec]:
    return {name: DataSpec(name, tuple(d["classes"]), d["channels"], tuple(d["image_size"]), d["train_images"])
            for name, d in _claims_file()["datasets"].items()}


@dataclass(frozen=True)
class StudyData:
    """Which of the claims' datasets a study trained on (None: none of them), and how to say what it was."""

    name: str | None
    description: str
    source: str = ""  # where it was read from (the study's --dataset, its last path part): "cifar10-jpeg"

    def problem(self, claim: Claim) -> str | None:
        """Why `claim` cannot be judged on this data (None when it can)."""
        if self.name in claim.data:
            return None
        return f"claim is about {' or '.join(claim.data)}; {self.description}"


def identify_data(attrs: dict[str, Any]) -> StudyData:
    """The study's data as one of claims.json's datasets: a copy counts when its class names, image shape and train
    images match (an ImageFolder tree of CIFAR-10 is CIFAR-10)."""
    try:
        classes, channels = tuple(attrs[StudyAttr.DATA_CLASSES]), int(attrs[StudyAttr.DATA_CHANNELS])
        size, images = tuple(int(x) for x in attrs[StudyAttr.DATA_IMAGE_SIZE]), int(attrs[StudyAttr.DATA_TRAIN_IMAGES])
    except KeyError:
        return StudyData(None, "this study did not record its data (rerun bench.matrix once to record it)")
    except (TypeError, ValueError):
        return StudyData(None, "this study's data attributes are malformed (rerun bench.matrix once to record them)")
    for spec in load_data_specs().values():
        if (classes, channels, size, images) == (spec.classes, spec.channels, spec.image_size, spec.train_images):
            source = Path(str(attrs.get(StudyAttr.DATASET) or "")).name
            return StudyData(spec.name, f"this study's data is {spec.name}", source)
    return StudyData(None, f"this study's data: {len(classes)} classes, {channels}x{size[0]}x{size[1]}, {images:,} train images")


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
    if state == "FAIL" and not stopped_from_outside(state, stop_reason, fail_reason):
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
    """A designed cell's per-seed test accuracies (%) of the seeds that trained; diverged and failed seeds listed apart.
    `budgets`: every (epochs, train images) its settled seeds ran at (more than one: mixed budgets). `unstable_seeds`:
    seeds with a diverged attempt that is not (yet) their outcome (rerun pending, or trained on the rerun).
    `precisions`: the arithmetic each settled seed trained in (bench.hardware.precision_name; NOT_RECORDED before trials
    recorded it)."""

    values: dict[int, float]
    diverged_seeds: tuple[int, ...] = ()
    failed_seeds: tuple[int, ...] = ()
    budgets: frozenset[tuple[int, int | None]] = frozenset()
    config: TrainConfig | None = None
    unstable_seeds: tuple[int, ...] = ()
    precisions: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def seeds(self) -> int:
        return len(self.values) + len(self.diverged_seeds) + len(self.failed_seeds)

    @property
    def diverged(self) -> int:
        return len(self.diverged_seeds)

    @property
    def failed(self) -> int:
        return len(self.failed_seeds)

    @property
    def epochs(self) -> int | None:
        return next(iter(self.budgets))[0] if len(self.budgets) == 1 else None

    @property
    def train_images(self) -> int | None:
        return next(iter(self.budgets))[1] if len(self.budgets) == 1 else None


def designed_cells(trials: pd.DataFrame, metric: str = "test_acc") -> dict[str, CellData]:
    cells: dict[str, CellData] = {}
    if "cell" not in trials or trials["cell"].isna().all():
        return cells
    names = [p.name for p in build_space()]
    for name, group in trials[trials["cell"].notna()].groupby("cell", sort=False):
        values: dict[int, float] = {}
        diverged, failed, unstable, budgets, precisions = [], [], [], set(), {}
        for seed, attempts in group.groupby("seed"):
            kinds = [attempt_kind(*r) for r in attempts[["state", "stop_reason", "fail_reason"]].itertuples(index=False)]
            outcome = settle(kinds)
            if "diverged" in kinds and outcome != "diverged":
                unstable.append(int(seed))  # named, never hidden: it diverged once, whatever its rerun does
            if outcome not in ("complete", "diverged", "failed"):
                continue
            counted = attempts[[k in ("complete", "diverged", "failed") for k in kinds]]
            if outcome == "complete":
                counted = counted[counted["state"] == "COMPLETE"].iloc[-1:]
                value = float(counted[metric].iloc[0] * 100)
                if math.isfinite(value):
                    values[int(seed)] = value
                else:  # a finished trial without its accuracy: data to repair, not a number
                    failed.append(int(seed))
            else:
                (diverged if outcome == "diverged" else failed).append(int(seed))
            for epochs, images in counted[[EPOCHS_PARAM, "train_images"]].itertuples(index=False):
                budgets.add((int(epochs), None if pd.isna(images) else int(images)))
            recorded = counted["precision"].iloc[-1] if "precision" in counted and len(counted) else None
            precisions[int(seed)] = recorded if isinstance(recorded, str) else NOT_RECORDED
        latest = group.sort_values("number").iloc[-1]
        config = config_from_params({k: latest[k] for k in names}) if all(k in group for k in names) else None
        cells[str(name)] = CellData(values, tuple(sorted(diverged)), tuple(sorted(failed)), frozenset(budgets), config,
                                    tuple(sorted(unstable)), precisions)
    return cells


def compare(level: CellData, reference: CellData) -> Interval:
    """level - reference in points: paired t over the seeds both trained, Welch where fewer than 2 seeds pair.
    `n` is the number of pairs used (0 under Welch: none were)."""
    shared = sorted(set(level.values) & set(reference.values))
    if len(shared) >= 2:
        return paired_diff(np.array([level.values[s] for s in shared]), np.array([reference.values[s] for s in shared]))
    welch = welch_diff(np.array(list(level.values.values())), np.array(list(reference.values.values())))
    return dataclasses.replace(welch, n=0)


def _budget_text(budgets: frozenset[tuple[int, int | None]]) -> str:
    return " and ".join(f"{e} epochs on {'unknown' if i is None else f'{i:,}'} images" for e, i in sorted(budgets, key=str))


def claim_images(claim: Claim, data: StudyData) -> int | None:
    """The train images the claim is about: its own, or the whole train split of the data it is judged on."""
    if claim.budget.train_images is not None:
        return claim.budget.train_images
    spec = load_data_specs().get(data.name or claim.data[0])
    return spec.train_images if spec else None


def budget_note(claim: Claim, tier: int, level: CellData, reference: CellData | None, images: int) -> str | None:
    """Why the seeds' budget is not the claim's (None when every seed of the level and of its reference matches)."""
    b = claim.budget
    epochs, ref_epochs = b.at(tier)
    claimed = f"{epochs}" + (f" vs {ref_epochs}" if claim.measure == "difference" and ref_epochs != epochs else "")
    about = f"the claim is about {claimed} epochs on {images:,} images ({b.source_text})"
    checks = [("", level, epochs)] + ([("reference: ", reference, ref_epochs)]
                                      if claim.measure == "difference" and reference is not None else [])
    for who, data, want in checks:
        if len(data.budgets) > 1:
            return f"{who}seeds ran at mixed budgets ({_budget_text(data.budgets)}); {about}"
        for e, seen in data.budgets:
            if e != want or seen is None or seen < BUDGET_IMAGES_SHARE * images:
                return f"{who}ran {_budget_text(data.budgets)}; {about}"
    return None


# --- the improvement matrix ------------------------------------------------------------

BASELINE_LEVEL = Level(FACTORS[0], BASELINE_CELL,  # a level of the first factor, the epochs (bench.space.FACTORS)
                       {}, budgets=(BASELINE.epochs,))
DIVERGED_RULE = ("a t-interval assumes one run-to-run distribution and a diverged run is not from it: the interval "
                 "covers the seeds that trained, and the row gets no verdict")


def _seed_list(seeds: tuple[int, ...]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _divergence_notes(data: CellData) -> list[str]:
    notes = [f"{data.diverged} of {data.seeds} diverged ({_seed_list(data.diverged_seeds)})"] if data.diverged else []
    once = [s for s in data.unstable_seeds if s in data.values]
    pending = [s for s in data.unstable_seeds if s not in data.values]
    if once:
        notes.append(f"{_seed_list(tuple(once))} diverged once, then trained on the rerun")
    if pending:
        notes.append(f"{_seed_list(tuple(pending))} diverged once, rerun pending")
    return notes


def _precision_text(data: CellData) -> str:
    by_precision: dict[str, list[int]] = {}
    for seed, precision in sorted(data.precisions.items()):
        by_precision.setdefault(precision, []).append(seed)
    return ", ".join(f"{p} ({_seed_list(tuple(seeds))})" for p, seeds in sorted(by_precision.items()))


def precision_note(data: CellData, reference: CellData | None) -> str | None:
    """Named, not a verdict blocker: one seed of the 5-epoch baseline trained in fp32 and in bf16 autocast ends 0.1-1.7
    points apart, with no shift measured (+0.11 [-1.23, +1.45] over 5 paired seeds, the README's precision check), but
    a reader should see which numbers mix them. Seeds that recorded no precision beside one recorded precision may or
    may not differ from it (unknown is not different): the note says so rather than calling them mixed."""
    groups = [data] + ([reference] if reference is not None else [])
    seen = {p for d in groups for p in d.precisions.values()}
    if len(seen) <= 1:
        return None
    text = _precision_text(data) + (f"; reference: {_precision_text(reference)}" if reference is not None else "")
    if len(seen - {NOT_RECORDED}) <= 1:
        return f"precision not recorded for some seeds (they may mix): {text}"
    return f"trained in mixed precision: {text}"


def _designed_row(level: Level, tier: int, cell: str, cells: dict[str, CellData], claim: Claim | None,
                  study_data: StudyData, levels: tuple[Level, ...]) -> dict[str, Any]:
    data = cells.get(cell)
    # at the claim's reference epochs ("20 epochs" is compared with the baseline at 5); an accuracy claim, or a level
    # with no claim, shows its difference from the baseline recipe at its own tier
    ref_epochs = claim.budget.at(tier)[1] if claim is not None else tier
    reference_name = resolve_reference(claim.reference if claim is not None and claim.reference else BASELINE_CELL,
                                       ref_epochs, levels)
    reference_name = None if reference_name == cell else reference_name
    reference = cells.get(reference_name) if reference_name else None
    row: dict[str, Any] = {"reference": reference_name, "cell": cell, "budget": tier}
    if data is None or data.seeds == 0:
        return row | {"n": 0, "verdict": "no data",
                      "note": "no finished seed of this cell" if data else "cell not run in this study"}
    acc = mean_interval(np.array(list(data.values.values())))
    diff = compare(data, reference) if reference is not None and reference.values else NO_DATA
    row |= {"n": data.seeds, "n_reference": reference.seeds if reference else 0, "n_pairs": diff.n,
            "n_diverged": data.diverged, "n_failed": data.failed,
            "diverged_seeds": ", ".join(map(str, data.diverged_seeds)),
            "reference_diverged_seeds": ", ".join(map(str, reference.diverged_seeds)) if reference else "",
            "mean_acc": acc.mean, "acc_low": acc.low, "acc_high": acc.high,
            "diff": diff.mean, "diff_low": diff.low, "diff_high": diff.high, "interval": diff.method,
            "budget_epochs": data.epochs, "reference_epochs": reference.epochs if reference else None,
            "train_images": data.train_images}
    judged = acc if claim is not None and claim.measure == "accuracy" else diff
    row["half_width"] = judged.half_width
    notes = _divergence_notes(data)
    if reference is not None and (claim is None or claim.measure == "difference"):
        notes += [f"reference {reference_name}: {note}" for note in _divergence_notes(reference)]
    bad_ref = reference is not None and claim is not None and claim.measure == "difference"
    compared = reference if reference is not None and (claim is None or claim.measure == "difference") else None
    if (mixed := precision_note(data, compared)) is not None:
        notes.append(mixed)
    inert = inert_techniques(data.config) if data.config is not None else []
    test = None
    if claim is None:
        status, why = "no claim", ""
    elif (problem := study_data.problem(claim)) is not None:
        status, why = f"claim is about {' or '.join(claim.data)}", problem
    elif inert:
        status, why = "inert at this budget", "; ".join(inert)
    elif claim.measure == "difference" and (reference is None or not reference.seeds):
        status, why = "no data", f"reference cell {reference_name} not run in this study"
    elif (budget := budget_note(claim, tier, data, reference, claim_images(claim, study_data))) is not None:
        status, why = "not tested at this budget", budget
    elif not claim.quantified:
        status, why = "not quantified", "the assignment gives no number to test"
    elif data.failed or (bad_ref and reference.failed):
        status, why = "incomplete", "a seed failed twice (level or reference)"
    elif data.diverged or data.unstable_seeds or (bad_ref and (reference.diverged or reference.unstable_seeds)):
        status, why = "no verdict: diverged", DIVERGED_RULE
    elif judged.n < MIN_PAIRS or (claim.measure == "difference" and judged.method != "paired t"):
        status, why = "too few seeds", f"{judged.n} {'pairs' if judged is diff else 'seeds'}; a verdict needs {MIN_PAIRS}"
    elif (test := claim_test(judged, claim.low, claim.high)) is None:
        same = "differences" if judged is diff else "values"
        status, why = "no verdict: no spread", f"identical {same} on every seed: an interval of zero width says nothing"
    else:
        status, why = "pending", ""
    if test is not None:
        lo, hi = claim_bounds(claim.low, claim.high)
        gap = min(judged.mean - lo, hi - judged.mean) if lo <= judged.mean <= hi else max(lo - judged.mean, judged.mean - hi)
        # what Holm's level for this row will need is decided with the family (_apply_holm)
        row |= {"p_raw": test.p, "direction": test.direction, "_sd": judged.se * math.sqrt(judged.n), "_gap": gap,
                "_n": judged.n, "_unit": "seed pairs" if judged is diff else "seeds"}
    if claim is not None and claim.wording == "possible" and status not in ("no claim",):
        notes.append("'possible' claim: read on the mean over seeds")
    if claim is not None and claim.measure == "accuracy" and claim.quantified and status == "pending":
        # a level, unlike a difference, moves with the copy of the data: SPEC's JPEG copy of CIFAR-10 (quality about
        # 50) runs a few points under the official release the assignment's numbers come from
        notes.append(f"an absolute level, measured on this study's copy of {study_data.name}"
                     + (f" ({study_data.source})" if study_data.source else "")
                     + ": a re-encoded copy can score a few points under the release the claim quotes")
    if why:
        notes.insert(0, why)
    return row | {"verdict": status, "note": "; ".join(notes)}


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
DESIGNED_METHOD = "designed ablation (one factor at a time, seed-paired with the reference cell at the same budget tier)"


def claims_by_level(claims: list[Claim]) -> dict[str, list[Claim]]:
    out: dict[str, list[Claim]] = {}
    for claim in claims:
        out.setdefault(claim.level, []).append(claim)
    return out


def matrix_frame(trials: pd.DataFrame, *, levels: tuple[Level, ...] = MATRIX_LEVELS,
                 claims: list[Claim] | None = None, metric: str = "test_acc",
                 cells: dict[str, CellData] | None = None, data_attrs: dict[str, Any] | None = None,
                 budgets: tuple[int, ...] = BUDGET_TIERS) -> pd.DataFrame:
    """The improvement matrix, one row per claim of each level at each budget tier (a level without a claim: one
    row): n, mean accuracy, difference from the reference cell (95% t-interval), budget, the assignment's claim and a
    verdict (designed cells only), with Holm's correction across every quantified claim the matrix judges.

    `cells`: the study's designed_cells when the caller already has them; `data_attrs`: the study's user attributes
    (the data the claims are checked against; without them no verdict is given)."""
    claims = load_claims() if claims is None else claims
    cells = designed_cells(trials, metric) if cells is None else cells
    designed = bool(cells)
    by_level = claims_by_level(claims)
    all_levels = ((BASELINE_LEVEL,) if BASELINE_CELL in by_level else ()) + tuple(levels)
    study_data = identify_data(data_attrs or {})
    rows = []
    if designed:
        for r in matrix_rows(budgets, all_levels):
            for claim in by_level.get(r.level.name, [None]):
                if claim is not None and claim.budget.epochs is not None and claim.budget.epochs != r.budget \
                        and r.level.budgets is None:
                    continue  # a claim that names its budget is shown at that tier only
                row = {"factor": r.level.factor, "level": r.level.name}
                row |= _designed_row(r.level, r.budget, r.cell, cells, claim, study_data, tuple(levels))
                rows.append(row | _claim_columns(claim, r.budget, study_data) | {"method": DESIGNED_METHOD})
        _apply_holm(rows)
    else:
        done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
        by_name = {level.name: level for level in levels}
        space = build_space()
        for level in levels:
            for claim in by_level.get(level.name, [None]):
                reference = claim.reference if claim and claim.reference else BASELINE_CELL
                ref_cfg = _effective_config(by_name.get(reference))
                is_level, is_ref = _search_groups(done, _effective_config(level), ref_cfg, level.factor, space)
                acc, ref_acc = done.loc[is_level, metric] * 100, done.loc[is_ref, metric] * 100
                rows.append({"factor": level.factor, "level": level.name, "reference": reference, "n": len(acc),
                             "n_reference": len(ref_acc), "mean_acc": acc.mean() if len(acc) else math.nan,
                             "diff": acc.mean() - ref_acc.mean() if len(acc) and len(ref_acc) else math.nan,
                             "verdict": "exploratory", "note": "confounded: descriptive difference of means, no interval"}
                            | _claim_columns(claim, None, study_data) | {"method": SEARCH_METHOD})
    frame = pd.DataFrame(rows, columns=MATRIX_COLUMNS)
    frame["n"] = frame["n"].fillna(0).astype(int)
    frame["factor"] = pd.Categorical(frame["factor"], categories=FACTORS, ordered=True)
    return frame.sort_values(["factor"], kind="stable").reset_index(drop=True)


def _claim_columns(claim: Claim | None, tier: int | None, study_data: StudyData) -> dict[str, Any]:
    if claim is None:
        return {}
    b = claim.budget
    epochs, ref_epochs = b.at(tier) if tier is not None else (b.epochs, b.reference_epochs)
    return {"claim_id": claim.id, "spec": claim.spec, "claim": claim.text, "claim_reading": claim.reading,
            "claim_wording": claim.wording, "claim_measure": claim.measure, "claim_low": claim.low,
            "claim_high": claim.high, "claim_epochs": epochs,
            "claim_reference_epochs": ref_epochs if claim.measure == "difference" else None,
            "claim_train_images": claim_images(claim, study_data), "claim_budget_source": b.source_text}


def _apply_holm(rows: list[dict[str, Any]]) -> None:
    """Verdicts for the rows that reached a test, at Holm-adjusted levels across all of them."""
    raw = [r.get("p_raw", math.nan) if r["verdict"] == "pending" else math.nan for r in rows]
    adjusted, levels = holm(raw), holm_levels(raw)
    tests = sum(math.isfinite(p) for p in raw)
    for row, p, level in zip(rows, adjusted, levels, strict=True):
        if not math.isfinite(p):
            continue
        row["p_holm"], row["holm_level"], row["n_tests"] = p, level, tests
        needed = seeds_needed(row["_sd"], row["_gap"], confidence=level)
        row["seeds_needed"] = needed
        if needed is None or needed > row["_n"]:
            row["note"] = "; ".join(x for x in (row["note"], (
                f"a {'support' if row['direction'] == 'supported' else 'contradiction'} at this row's {level:.2%} needs "
                + (f"about {needed} {row['_unit']}" if needed else f"more than 1,000 {row['_unit']}")
                + f" at the measured spread (sd {row['_sd']:.2f})")) if x)
        row["verdict"] = row["direction"] if p <= 1 - CONFIDENCE else "inconclusive"
        if row["verdict"] == "inconclusive" and row.get("p_raw", 1) <= 1 - CONFIDENCE:
            row["note"] = "; ".join(x for x in (f"would be {row['direction']} alone at 95% (raw p {row['p_raw']:.3f}); "
                                                f"not after Holm's correction across {tests} claims", row["note"]) if x)


MATRIX_COLUMNS = [
    "factor", "level", "budget", "cell", "reference", "n", "n_reference", "n_pairs", "n_diverged", "n_failed",
    "diverged_seeds", "reference_diverged_seeds",
    "mean_acc", "acc_low", "acc_high", "diff", "diff_low", "diff_high", "interval", "half_width", "verdict", "note",
    "p_raw", "p_holm", "holm_level", "n_tests", "seeds_needed",
    "budget_epochs", "reference_epochs", "train_images", "claim_id", "spec", "claim", "claim_reading", "claim_wording",
    "claim_measure", "claim_low", "claim_high",
    "claim_epochs", "claim_reference_epochs", "claim_train_images", "claim_budget_source", "method",
]


def baseline_interval(trials: pd.DataFrame, metric: str = "test_acc",
                      cells: dict[str, CellData] | None = None) -> Interval:
    """Accuracy (in %) of the baseline: the designed baseline cell, else completed trials with every knob (epochs and
    batch size included) at the baseline's and the study's most common number of train images, so budgets never pool."""
    cells = designed_cells(trials, metric) if cells is None else cells
    if cells:
        base = cells.get(BASELINE_CELL)
        return mean_interval(np.array(list(base.values.values()))) if base else NO_DATA
    done = trials[(trials["state"] == "COMPLETE") & trials[metric].notna()]
    rows = done[baseline_rows(done)]
    if rows.empty:
        return NO_DATA
    images = rows["train_images"].mode(dropna=False)
    rows = rows[rows["train_images"] == images.iloc[0]] if images.notna().any() else rows
    return mean_interval(rows[metric].to_numpy() * 100)


def baseline_rows(trials: pd.DataFrame) -> pd.Series:
    """Trials whose every searched knob (epochs and batch size included) equals the baseline's."""
    base = BASELINE.__dict__
    mask = pd.Series(True, index=trials.index)
    for name in (p.name for p in build_space()):
        mask &= trials[name] == base[name]
    return mask


def cumulative_frame(trials: pd.DataFrame, metric: str = "test_acc",
                     cells: dict[str, CellData] | None = None) -> pd.DataFrame:
    """The designed cumulative path from the baseline, step by step: each step's accuracy and its paired
    difference from the step before (a step shared with a matrix cell reads that cell)."""
    cells = designed_cells(trials, metric) if cells is None else cells
    rows, previous = [], None
    for step in cumulative_steps():
        data = cells.get(step.cell)
        if data is None or not data.values:
            previous = None
            continue
        ci = mean_interval(np.array(list(data.values.values())))
        diff = compare(data, previous) if previous is not None and previous.values else NO_DATA
        rows.append({"step": step.label, "cell": step.cell, "n": data.seeds, "n_diverged": data.diverged,
                     "budget_epochs": data.epochs, "mean_acc": ci.mean, "acc_low": ci.low, "acc_high": ci.high,
                     "step_diff": diff.mean, "step_low": diff.low, "step_high": diff.high, "n_pairs": diff.n})
        previous = data
    if len(rows) == 1 and rows[0]["step"] == BASELINE_CELL:
        rows = []  # the baseline alone is no path
    return pd.DataFrame(rows, columns=["step", "cell", "n", "n_diverged", "budget_epochs", "mean_acc", "acc_low", "acc_high",
                                       "step_diff", "step_low", "step_high", "n_pairs"])


def member_seconds(trials: pd.DataFrame) -> pd.Series:
    """Each trial's share of its train seconds: a packed trial's wall time divided by its pack's size."""
    return trials["train_seconds"] / pd.to_numeric(trials["pack_size"], errors="coerce").fillna(1).clip(lower=1)


def pareto_front_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed trials no other beats on both test accuracy (higher) and its share of train seconds (lower).
    A packed trial is charged its share of the pack's wall time (seconds / pack size)."""
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=["test_acc", "train_seconds"]).copy()
    done["cost_seconds"] = member_seconds(done)
    ordered = done.sort_values(["cost_seconds", "test_acc"], ascending=[True, False])
    front, best = [], -np.inf
    for idx, acc in ordered["test_acc"].items():
        if acc > best:
            front.append(idx)
            best = acc
    return ordered.loc[front]


def param_importances(study: optuna.Study, *, designed: bool = False) -> tuple[dict[str, tuple[float, float, float]], str]:
    """fANOVA importances as (mean, min, max) over IMPORTANCE_SEEDS fitting seeds, or empty with the reason: too few
    completed trials, or a designed study (its knobs change together in cells by design, so the ranking would
    describe the design, not the knobs)."""
    if designed:
        return {}, ("parameter importance is left out for designed studies: knobs change together within cells by design, "
                    "so fANOVA would rank the design; read the matrix instead")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}, (f"parameter importance needs at least {MIN_IMPORTANCE_TRIALS} completed trials (this study has "
                    f"{len(complete)}); fewer would rank noise")
    runs: list[dict[str, float]] = []
    for seed in range(IMPORTANCE_SEEDS):
        try:  # Optuna scores the parameters every completed trial has (conditional ones drop out)
            runs.append(optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)))
        except (RuntimeError, ValueError) as exc:  # e.g. no parameter common to all completed trials
            return {}, f"parameter importance could not be fitted ({exc})"
    names = sorted({k for run in runs for k in run})
    if not names:
        return {}, "parameter importance: no parameter varies across the completed trials"
    scores = {k: [float(run.get(k, 0.0)) for run in runs] for k in names}
    return {k: (float(np.mean(v)), min(v), max(v)) for k, v in scores.items()}, ""
