"""`python -m bench.report --study NAME`: a study as CSV tables, PNG plots and one offline HTML page.

Render only: every table and plot here consumes the frames of bench.analysis.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from bench.analysis import (  # noqa: E402
    COST_KINDS,
    IMPORTANCE_SEEDS,
    NOT_RECORDED,
    CellData,
    baseline_interval,
    baseline_rows,
    cost_frame,
    csv_frame,
    cumulative_frame,
    designed_cells,
    matrix_frame,
    member_seconds,
    param_importances,
    pareto_front_rows,
    recorded_values,
    trials_frame,
)
from bench.compare_report import open_compare_storage, write_compare_report  # noqa: E402
from bench.comparison import agreement, analyse  # noqa: E402
from bench.errors import run_cli  # noqa: E402
from bench.schema import StudyAttr  # noqa: E402
from bench.space import BASELINE, BUDGET_TIERS, EPOCHS_PARAM, FACTORS, build_space  # noqa: E402
from bench.stats import MIN_PAIRS, NOISY_HALF_WIDTH_POINTS, binomial_half_width, mean_interval  # noqa: E402
from bench.storage import load_existing_study  # noqa: E402

NOTHING = "nothing to show yet"
DEFAULT_PARALLEL = [p.name for p in build_space() if p.when is None][:3]  # without importances: the first knobs
Figure = matplotlib.figure.Figure


# --- plots: each takes frames and returns a figure, or None when there is nothing to draw ---------


def _done(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["state"] == "COMPLETE"].dropna(subset=["val_acc"])


def plot_history(trials: pd.DataFrame) -> Figure | None:
    done = _done(trials).sort_values("number")
    if done.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(done["number"], done["val_acc"] * 100, s=14, alpha=0.7, label="trial (val acc)")
    ax.step(done["number"], done["val_acc"].cummax() * 100, where="post", color="C3", label="running best")
    ax.set(xlabel="trial", ylabel="validation accuracy (%)", title="Optimization history")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trial numbers, never 2.5
    ax.legend(loc="lower right")
    return fig


def plot_learning_curves(trials: pd.DataFrame) -> Figure | None:
    has = trials[trials["val_curve"].map(len) > 0]
    if has.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for pruned, color, alpha in ((True, "0.6", 0.25), (False, "C0", 0.6)):
        sel = has[(has["state"] == "PRUNED") == pruned]
        lines = [np.column_stack([np.arange(1, len(c) + 1), np.asarray(c) * 100]) for c in sel["val_curve"]]
        if lines:  # one LineCollection: 1,000 curves draw in well under a second
            ax.add_collection(LineCollection(lines, colors=color, alpha=alpha, linewidths=1,
                                             label="pruned" if pruned else "completed"))
    ax.autoscale()
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Learning curves (pruned trials dimmed)")
    ax.legend(loc="lower right")
    return fig


def plot_matrix(matrix: pd.DataFrame) -> Figure | None:
    """Designed differences with their intervals; exploratory (search) rows have no interval and are not drawn."""
    rows = matrix[matrix["n"] > 0].dropna(subset=["diff", "diff_low", "diff_high"])
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    colors = [sns.color_palette("tab10")[FACTORS.index(f)] for f in rows["factor"]]
    err = np.vstack([(rows["diff"] - rows["diff_low"]).fillna(0), (rows["diff_high"] - rows["diff"]).fillna(0)])
    ax.errorbar(rows["diff"], y, xerr=err, fmt="none", ecolor="0.3", capsize=3)
    ax.scatter(rows["diff"], y, c=colors, zorder=3)
    ax.axvline(0, color="0.5", lw=1)
    ax.set_yticks(y, [f"{f}: {lv}" for f, lv in zip(rows["factor"], rows["level"], strict=True)])
    ax.set(xlabel="test accuracy difference from the reference cell (points, 95% paired t-interval)",
           title="Improvement matrix")
    fig.tight_layout()
    return fig


def plot_importance(importances: dict[str, tuple[float, float, float]]) -> Figure | None:
    if not importances:
        return None
    items = sorted(importances.items(), key=lambda kv: kv[1][0])[-15:]
    means = np.array([v[0] for _, v in items])
    err = np.vstack([means - [v[1] for _, v in items], [v[2] for _, v in items] - means])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
    ax.barh([k for k, _ in items], means, xerr=err, color="C2", ecolor="0.3", capsize=2)
    ax.set(xlabel=f"importance (fANOVA: mean, bars span {IMPORTANCE_SEEDS} fitting seeds)", title="Parameter importance")
    fig.tight_layout()
    return fig


def plot_parallel(trials: pd.DataFrame, importances: dict[str, tuple[float, float, float]], top: int = 10) -> Figure | None:
    done = _done(trials).nlargest(top, "val_acc")
    names = [k for k in sorted(importances, key=lambda k: importances[k][0], reverse=True)][:6] or DEFAULT_PARALLEL
    if len(done) < 2:
        return None
    cols = {}
    for name in names:
        codes = pd.Series(pd.factorize(done[name].astype(str))[0], index=done.index, dtype=float)
        values = pd.to_numeric(done[name], errors="coerce")
        v = codes if values.isna().any() or done[name].dtype == object else values.astype(float)
        span = v.max() - v.min()
        cols[name] = (v - v.min()) / span if span else v * 0 + 0.5
    cols["val_acc"] = (done["val_acc"] - done["val_acc"].min()) / max(1e-12, np.ptp(done["val_acc"]))
    frame = pd.DataFrame(cols)
    fig, ax = plt.subplots(figsize=(8, 4))
    cmap = plt.get_cmap("viridis")
    for _, row in frame.iterrows():
        ax.plot(range(len(frame.columns)), row.to_numpy(), color=cmap(row["val_acc"]), alpha=0.8)
    ax.set_xticks(range(len(frame.columns)), frame.columns, rotation=30, ha="right")
    ax.set(ylabel="scaled value", title=f"Parallel coordinates of the top {len(done)} trials (colour: val acc)")
    fig.tight_layout()
    return fig


def plot_pareto(trials: pd.DataFrame) -> Figure | None:
    done = _done(trials).dropna(subset=["test_acc", "train_seconds"])
    if done.empty:
        return None
    front = pareto_front_rows(done)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(member_seconds(done), done["test_acc"] * 100, s=14, alpha=0.6, label="trial (one run each)")
    ax.step(front["cost_seconds"], front["test_acc"] * 100, where="post", color="C3", marker="o",
            label="Pareto front of single runs")
    ax.set(xlabel="train seconds (a packed trial: its share of the pack)", ylabel="test accuracy (%)",
           title="Accuracy vs compute (single runs: each point is one seed)")
    ax.legend(loc="lower right")
    return fig


def plot_baseline_and_best(trials: pd.DataFrame) -> Figure | None:
    done = _done(trials)
    if done.empty:
        return None
    picks = {"best": done.loc[done["val_acc"].idxmax()]}
    base = done[baseline_rows(done)]
    if not base.empty:
        picks["baseline"] = base.sort_values("number").iloc[0]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, row in picks.items():
        name = f"{label} (trial {row['number']})"
        ax_loss.plot(np.arange(1, len(row["loss_curve"]) + 1), row["loss_curve"], marker="o", label=name)
        ax_acc.plot(np.arange(1, len(row["val_curve"]) + 1), np.asarray(row["val_curve"]) * 100, marker="o", label=name)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Train loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    return fig


def plot_cumulative(path: pd.DataFrame) -> Figure | None:
    if path.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(path))
    ax.plot(x, path["mean_acc"], color="C0", alpha=0.5)
    err = np.vstack([(path["mean_acc"] - path["acc_low"]).fillna(0), (path["acc_high"] - path["mean_acc"]).fillna(0)])
    ax.errorbar(x, path["mean_acc"], yerr=err, fmt="o", color="C0", capsize=3)
    ax.set_xticks(x, path["step"], rotation=25, ha="right")
    ax.set(ylabel="test accuracy (%, 95% CI)", title="Cumulative path: each step keeps the previous ones")
    fig.tight_layout()
    return fig


# --- HTML ---------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1300px;color:#222;padding:0 1rem}
table{border-collapse:collapse;font-size:.85rem;margin:1rem 0;max-width:100%}
td,th{border:1px solid #ccc;padding:.25rem .5rem;overflow-wrap:break-word}
table.summary td{overflow-wrap:anywhere}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.5rem .75rem}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5rem 0}.muted{color:#777}
.supported{background:#e3f6e3}.contradicted{background:#fbe3e3}.inconclusive{background:#fff7dc}
"""


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


DASH = "\u2014"


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _fmt(v: object, digits: int = 2) -> str:
    if _missing(v):
        return DASH
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(frame: pd.DataFrame, row_class: Callable[[pd.Series], str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cls = f' class="{row_class(row)}"' if row_class else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def ci_text(mean: float, low: float, high: float, n: int, *, signed: bool = False) -> str:
    """'62.10 [60.2, 64.0]', or the mean with the reason it has no interval; a dash when there is no number."""
    if mean is None or not np.isfinite(mean):
        return f"{DASH} (no data)" if not n else DASH
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{m} ({'one seed' if n == 1 else 'no interval'})"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{m} [{fmt.format(low)}, {fmt.format(high)}]"


def _count(v: object) -> int:
    return 0 if _missing(v) else int(v)


def _n_text(n: int, diverged: object) -> str:
    """'5', or '5 (2 diverged)'."""
    return f"{n}" + (f" ({_count(diverged)} diverged)" if _count(diverged) else "")


def _budget_text(epochs: object, reference_epochs: object, images: object) -> str:
    """'20 vs 5 ep, 50,000 img' for a run or a claim (the reference's epochs only when they differ)."""
    if _missing(epochs):
        return DASH
    vs = f" vs {int(reference_epochs)}" if not _missing(reference_epochs) and reference_epochs != epochs else ""
    return f"{int(epochs)}{vs} ep, " + ("?" if _missing(images) else f"{int(images):,}") + " img"


def matrix_display(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix as the page shows it: intervals as text, never 'nan'."""
    designed = matrix["method"].iloc[0].startswith("designed") if len(matrix) else False
    n = matrix["n"].map(_count)
    n_text = [_n_text(k, d) for k, d in zip(n, matrix["n_diverged"], strict=True)]
    if designed:
        acc = [ci_text(m, lo, hi, k) for m, lo, hi, k in zip(matrix["mean_acc"], matrix["acc_low"], matrix["acc_high"], n, strict=True)]
        diff = [ci_text(m, lo, hi, _count(k), signed=True)
                for m, lo, hi, k in zip(matrix["diff"], matrix["diff_low"], matrix["diff_high"], matrix["n_pairs"], strict=True)]
    else:
        acc = [_fmt(m) for m in matrix["mean_acc"]]
        diff = [DASH if not np.isfinite(d) else f"{d:+.2f} (confounded)" for d in matrix["diff"].astype(float)]
    claim = [DASH if not isinstance(c, str) else f"{i}: {c}" + (f" (read: {r})" if isinstance(r, str) else "")
             for i, c, r in zip(matrix["claim_id"], matrix["claim"], matrix["claim_reading"], strict=True)]
    columns = {"factor": matrix["factor"].astype(str), "level": matrix["level"]}
    if designed:
        columns["tier"] = [DASH if _missing(b) else f"{int(b)} ep" for b in matrix["budget"].astype(float)]
    columns |= {
        "vs": matrix["reference"].fillna(DASH), "n": n_text,
        "test acc % [95% CI]" if designed else "mean test acc %": acc,
        "diff, points [95% CI]" if designed else "diff, points": diff,
    }
    if designed:
        columns["resolves +-"] = [DASH if _missing(h) else f"{h:.1f}" for h in matrix["half_width"].astype(float)]
        runs = zip(matrix["budget_epochs"].astype(float), matrix["reference_epochs"].astype(float),
                   matrix["train_images"].astype(float), strict=True)
        columns["budget run"] = [_budget_text(*r) for r in runs]
    columns["claim (assignment)"] = claim
    columns["claim budget"] = [DASH if _missing(e) else _budget_text(e, r, i) + f" ({src})" for e, r, i, src in zip(
        matrix["claim_epochs"].astype(float), matrix["claim_reference_epochs"].astype(float),
        matrix["claim_train_images"].astype(float), matrix["claim_budget_source"], strict=True)]
    columns["verdict"] = matrix["verdict"]
    columns["note"] = matrix["note"].fillna("")
    return pd.DataFrame(columns)


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cost_display(cost: pd.DataFrame) -> pd.DataFrame:
    """The cost frame as people read it, with a total row: attempts in words, images and device time in readable units,
    date ranges."""
    if cost.empty:
        return pd.DataFrame()

    def attempts(counts: dict[str, int], untimed: int) -> str:
        parts = [f"{counts['complete']} complete"] + [f"{counts[k]} {k}" for k in COST_KINDS[1:] if counts[k]]
        return ", ".join(parts) + (f" ({untimed} untimed: the process died)" if untimed else "")  # interrupted ones

    def images(n: float) -> str:
        return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{int(n):,}"

    def hours(h: float) -> str:
        return f"{h:.1f} h" if h >= 1 else f"{h * 60:.1f} min"

    def dates(first: object, last: object) -> str:
        if _missing(first) or _missing(last):
            return DASH
        return str(first) if first == last else f"{first} to {last}"

    def shown(r: pd.Series | dict, head: dict[str, str], speed: str) -> dict[str, str]:
        return head | {
            "attempts": attempts({k: _count(r[k]) for k in COST_KINDS}, _count(r["untimed"])),
            "images trained": images(r["images_trained"]), "device time": hours(r["device_hours"]),
            "median images/s": speed, "dates": dates(r["first"], r["last"])}

    tiered = EPOCHS_PARAM in cost.columns
    rows = [shown(r, ({"tier": f"{int(r[EPOCHS_PARAM])} ep"} if tiered else {}) | {
        "device": r["device"], "precision": r["precision"], "hardware": r["hardware"], "torch": r["torch"]},
        DASH if _missing(r["images_per_sec"]) else f"{r['images_per_sec']:,.0f}") for _, r in cost.iterrows()]
    if len(cost) > 1:
        every = {col: "; ".join(sorted({v for text in cost[col] for v in str(text).split("; ")})) for col in ("hardware", "torch")}
        total = {k: cost[k].sum() for k in (*COST_KINDS, "untimed", "images_trained", "device_hours")}
        total |= {"first": cost["first"].dropna().min(), "last": cost["last"].dropna().max()}
        rows.append(shown(total, ({"tier": "all"} if tiered else {}) | {"device": "all", "precision": "all"} | every, DASH))
    return pd.DataFrame(rows)


def markdown_tables(matrix: pd.DataFrame, cumulative: pd.DataFrame | None = None, cost: pd.DataFrame | None = None) -> str:
    """The README's tables, from the frames as matrix.csv, cumulative.csv and cost.csv hold them (read back or fresh:
    the same text), so the published page, its CSVs and the README cannot drift apart."""
    lines = ["| level | tier | vs | n | test acc % [95% CI] | diff, points [95% CI] | claim | verdict, or why none |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in matrix.iterrows():
        n, pairs = _count(r["n"]), _count(r["n_pairs"])
        acc = ci_text(r["mean_acc"], r["acc_low"], r["acc_high"], n)
        diff = ci_text(r["diff"], r["diff_low"], r["diff_high"], pairs, signed=True) if not _missing(r["reference"]) else DASH
        claim = DASH if _missing(r["claim_id"]) else f"{r['claim_id']}: {r['claim_reading']}"
        verdict = r["verdict"] if _missing(r["note"]) else f"{r['verdict']}: {r['note']}"  # a verdict's caveats too
        n_text = _n_text(n, r["n_diverged"])
        budget = DASH if _missing(r["budget"]) else f"{int(r['budget'])} ep"
        lines.append("| " + " | ".join(_md(x) for x in (r["level"], budget, DASH if _missing(r["reference"]) else r["reference"],
                                                          n_text, acc, diff, claim, verdict)) + " |")
    if cumulative is not None and len(cumulative):
        lines += ["", "| cumulative step | cell | n | test acc % [95% CI] | change from the step before [95% paired CI] |",
                  "|---|---|---|---|---|"]
        for _, r in cumulative.iterrows():
            lines.append("| " + " | ".join(_md(x) for x in (
                r["step"], r["cell"], _count(r["n"]), ci_text(r["mean_acc"], r["acc_low"], r["acc_high"], _count(r["n"])),
                ci_text(r["step_diff"], r["step_low"], r["step_high"], _count(r["n_pairs"]), signed=True))) + " |")
    if cost is not None and len(cost):
        shown = cost_display(cost)
        lines += ["", "| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
        lines += ["| " + " | ".join(_md(x) for x in r) + " |" for r in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def budget_text(attrs: dict) -> str:
    """The study's real budget: images per split, epoch cap, and a matrix's epoch scale."""
    parts = []
    if StudyAttr.TRAIN_IMAGES in attrs:
        parts.append(f"{attrs[StudyAttr.TRAIN_IMAGES]:,} train images"
                     + (f" (--train-subset {attrs[StudyAttr.TRAIN_SUBSET]})" if attrs.get(StudyAttr.TRAIN_SUBSET) else ""))
    if StudyAttr.VAL_IMAGES in attrs:
        parts.append(f"{attrs[StudyAttr.VAL_IMAGES]:,} validation images" + (" (the test set)" if attrs.get(StudyAttr.VAL_IS_TEST) else ""))
    if StudyAttr.EPOCHS_SCALE in attrs:
        parts.append(f"epochs scaled by {attrs[StudyAttr.EPOCHS_SCALE]}")
    if StudyAttr.MAX_EPOCHS in attrs:
        parts.append(f"epoch cap {attrs[StudyAttr.MAX_EPOCHS]}")
    return ", ".join(parts) or "not recorded (study made by an older bench)"


def precision_counts(trials: pd.DataFrame) -> str:
    """How many trials trained in each arithmetic ("bf16 120 trials, fp32 8"): pieces of one study may run on machines
    where --precision auto resolves differently."""
    counts = trials["precision"].where(trials["precision"].notna(), NOT_RECORDED).value_counts()
    return ", ".join(f"{name} {n} trial{'s' if n != 1 else ''}" for name, n in sorted(counts.items())) or DASH


def summary_items(study: optuna.Study, trials: pd.DataFrame, cells: dict[str, CellData] | None = None) -> list[tuple[str, str]]:
    attrs = study.user_attrs
    states = trials["state"].value_counts().to_dict()
    done = _done(trials)
    items = [
        ("study", study.study_name),
        ("dataset", str(attrs.get(StudyAttr.DATASET, "unknown"))),
        ("device", ", ".join(sorted(set(trials["device"].dropna().astype(str)))) or DASH),
        ("precision", precision_counts(trials)),
        ("hardware", recorded_values(trials["hardware"]) or DASH),
        ("torch", recorded_values(trials["torch"]) or DASH),
        ("trials by state", ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"),
        ("total device time", f"{member_seconds(trials).fillna(0).sum() / 60:.1f} min (all trials, pruned and failed "
                              "included; a packed trial charged its share of the pack)"),
        ("budget", budget_text(attrs)),
    ]
    if attrs.get(StudyAttr.VAL_IS_TEST) or attrs.get(StudyAttr.VAL_SPLIT) == 0:
        items.append(("warning", "selection used the test set (--val-split 0): the best trial, pruning and early stopping "
                                 "saw the test accuracy, so it is optimistic; use --val-split 0.1 for an honest test number"))
    val_images = attrs.get(StudyAttr.VAL_IMAGES)
    if val_images and (half := binomial_half_width(int(val_images)) * 100) > NOISY_HALF_WIDTH_POINTS:
        items.append(("validation noise", f"one accuracy on {val_images} validation images is +-{half:.1f} points (95%, "
                                          "binomial): trials closer than that are not ranked; use a larger --val-split "
                                          "or bench.matrix"))
    if cells:  # only cells whose every seed trained, with enough of them for an interval
        whole = {name: c for name, c in cells.items() if len(c.values) >= MIN_PAIRS and not c.diverged
                 and not c.failed and not c.unstable_seeds}
        if whole:
            name, best = max(whole.items(), key=lambda kv: float(np.mean(list(kv[1].values.values()))))
            ci = mean_interval(np.array(list(best.values.values())))
            items.insert(0, (f"best cell, selected from {len(whole)} cells (optimistic; mean over its seeds)",
                             f"{name}: test {ci_text(ci.mean, ci.low, ci.high, ci.n)} %, {ci.n} seeds"))
    if not done.empty:
        best = done.loc[done["val_acc"].idxmax()]
        items.append((f"best trial, selected from {len(done)} trials (optimistic)",
                      f"#{best['number']}: val {best['val_acc'] * 100:.2f}%, test "
                      + (f"{best['test_acc'] * 100:.2f}%" if np.isfinite(best["test_acc"]) else DASH)
                      + ": the highest of many noisy runs, so above what this config averages"))
        params = study.trials[int(best["number"])].params
        items.append(("best parameters", ", ".join(f"{k}={v}" for k, v in params.items())))
    base = baseline_interval(trials, cells=cells)
    if np.isfinite(base.mean):
        items.append(("baseline test accuracy, % [95% CI]", ci_text(base.mean, base.low, base.high, base.n) + f", n={base.n}"))
    return items


def _changes(row: pd.Series, names: list[str]) -> str:
    base = BASELINE.__dict__
    changed = [f"{n}={row[n]}" for n in names if row[n] != base[n]]
    return ", ".join(changed) or "(baseline)"


def render_html(study: optuna.Study, trials: pd.DataFrame, matrix: pd.DataFrame, cumulative: pd.DataFrame,
                plots: dict[str, bytes], importance_note: str = "", cells: dict[str, CellData] | None = None,
                cost: pd.DataFrame | None = None) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bench report: {esc(study.study_name)}</title>"
             f"<style>{CSS}</style></head><body><h1>bench report: {esc(study.study_name)}</h1>"]
    if replay := study.user_attrs.get(StudyAttr.REPLAY):  # no trial here trained: every number was read from a table
        parts.append(f"<p class='banner'><b>replayed from a recorded table: {esc(str(replay))}</b>. Every trial was "
                     "answered from the table's recorded runs (bench.record), not trained.</p>")
    parts.append("<h2>Summary</h2><table class='summary'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                                     for k, v in summary_items(study, trials, cells)) + "</table>")
    parts.append("<h2>Improvement matrix</h2>")
    if (matrix["n"] > 0).any():
        designed = matrix["method"].iloc[0].startswith("designed")
        off_budget = int((matrix["verdict"] == "not tested at this budget").sum())
        if off_budget:
            parts.append(f"<p class='banner'>Budget: {esc(budget_text(study.user_attrs))}. {off_budget} rows ran at another "
                         "budget than their claim (see 'budget run' and 'claim budget') and get no verdict; these are "
                         "not the assignment's numbers.</p>")
        if designed:
            tests = matrix["n_tests"].dropna()
            holm_text = (f"{int(tests.iloc[0])} claims reached a test, so each was judged at its Holm-adjusted level "
                         f"(from {matrix['holm_level'].max() * 100:.2f}% down to 95%; 'p_raw', 'p_holm' and 'holm_level' in "
                         "matrix.csv): the chance of any false verdict on this page is at most 5%."
                         if len(tests) else "No claim reached a test here.")
            parts.append(f"<p class='muted'>Method: {esc(matrix['method'].iloc[0])}. Test accuracy in %, mean over seeds "
                         "with its 95% t-interval; 'diff' is the level minus its reference cell ('vs') at the same budget "
                         "tier, 95% paired t-interval over the seeds both trained; 'resolves +-' is the interval's "
                         "half-width, the smallest difference the row can tell from none. Verdict: supported when the "
                         "interval lies inside the claim, contradicted when wholly outside, else inconclusive; given "
                         f"only with at least {MIN_PAIRS} seed pairs, on the data the claim is about (CIFAR-10; focal "
                         "loss's also Fashion-MNIST), at the claim's budget (named by the assignment, or declared by "
                         "bench where it names none: each such claim is tested at every budget tier of the study), for "
                         "a claim with numbers, with no seed diverged (even once) or failed in the "
                         "level or its reference (diverged seeds are named, never dropped silently), and with some "
                         f"spread between seeds. {esc(holm_text)} 'Possible' claims ('can reach', 'up to') are read "
                         "on the mean over seeds, as every other claim.</p>")
        else:
            parts.append(f"<p class='banner'>{esc(matrix['method'].iloc[0][0].upper() + matrix['method'].iloc[0][1:])}."
                         "</p>")
        parts.append(_table(matrix_display(matrix), lambda r: r["verdict"].replace(" ", "-")))
    else:
        parts.append(f"<p class='muted'>{NOTHING}: no completed trial matches a matrix level.</p>")
    if not cumulative.empty:
        shown = cumulative.assign(**{
            "test acc % [95% CI]": [ci_text(m, lo, hi, n) for m, lo, hi, n in zip(
                cumulative["mean_acc"], cumulative["acc_low"], cumulative["acc_high"], cumulative["n"], strict=True)],
            "change from the step before, points [95% paired CI]": [ci_text(m, lo, hi, _count(n), signed=True) for m, lo, hi, n in zip(
                cumulative["step_diff"], cumulative["step_low"], cumulative["step_high"], cumulative["n_pairs"], strict=True)]})
        parts.append("<h2>Cumulative path</h2>" + _table(shown[["step", "cell", "n", "n_diverged", "budget_epochs", "test acc % [95% CI]",
                                                              "change from the step before, points [95% paired CI]"]]))
    if cost is not None and not cost.empty:
        parts.append("<h2>What it cost</h2>" + _table(cost_display(cost)) + "<p class='muted'>Attempts: interrupted ones "
                     "(stopped, or their process died) are run again, not outcomes; a designed study's diverged seeds are "
                     "outcomes. Images trained: epochs run x train images, an interrupted attempt's finished epochs "
                     "included. Device time: every attempt's recorded train seconds, evaluation included, a packed "
                     "trial charged its share of the pack; an attempt whose process died recorded none (untimed). "
                     "cost.csv has the numbers.</p>")
    parts.append("<h2>Plots</h2>")
    if not plots:
        parts.append(f"<p class='muted'>{NOTHING}: no completed trial yet.</p>")
    if importance_note:
        parts.append(f"<p class='muted'>{esc(importance_note)}.</p>")
    for name, png in plots.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h3>{esc(name.replace('_', ' '))}</h3><img alt='{esc(name)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Top 10 trials</h2>")
    done = _done(trials)
    if done.empty:
        parts.append(f"<p class='muted'>{NOTHING}.</p>")
    else:
        names = [p.name for p in build_space()]
        top = done.nlargest(10, "val_acc")
        top = top[["number", "val_acc", "test_acc", "epochs_run", "train_seconds"]].assign(
            changes_from_baseline=[_changes(r, names) for _, r in top.iterrows()])
        parts.append(_table(top) + "<p class='muted'>Every parameter of every trial: trials.csv.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- the command --------------------------------------------------------------------------


def build_plots(study: optuna.Study, trials: pd.DataFrame, matrix: pd.DataFrame, cumulative: pd.DataFrame,
                importances: dict[str, float]) -> dict[str, Figure]:
    candidates = {
        "optimization_history": plot_history(trials),
        "learning_curves": plot_learning_curves(trials),
        "improvement_matrix": plot_matrix(matrix),
        "cumulative_path": plot_cumulative(cumulative),
        "parameter_importance": plot_importance(importances),
        "parallel_coordinates": plot_parallel(trials, importances),
        "accuracy_vs_compute": plot_pareto(trials),
        "baseline_and_best_curves": plot_baseline_and_best(trials),
    }
    return {k: v for k, v in candidates.items() if v is not None}


def write_report(study: optuna.Study, out: Path, *, fmt: str = "html") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(study)
    cells = designed_cells(trials)  # once: the matrix, the cumulative path and the summary all read it
    budgets = tuple(sorted(study.user_attrs.get(StudyAttr.BUDGETS) or BUDGET_TIERS))  # the tiers the study was run at
    matrix = matrix_frame(trials, cells=cells, data_attrs=study.user_attrs, budgets=budgets)
    written = [out / "trials.csv", out / "matrix.csv"]
    csv_frame(trials).to_csv(written[0], index=False)
    matrix.to_csv(written[1], index=False)
    cumulative = cumulative_frame(trials, cells=cells)
    if not cumulative.empty:
        cumulative.to_csv(out / "cumulative.csv", index=False)
        written.append(out / "cumulative.csv")
    else:
        (out / "cumulative.csv").unlink(missing_ok=True)  # never a stale path from an earlier report
    cost = cost_frame(trials)
    cost.to_csv(out / "cost.csv", index=False)
    written.append(out / "cost.csv")
    if fmt == "csv":
        return written
    if fmt == "markdown":
        written.append(write_markdown(out))
        return written
    sns.set_theme(style="whitegrid")
    importances, importance_note = param_importances(study, designed=bool(cells))
    plots = {name: _png(fig) for name, fig in build_plots(study, trials, matrix, cumulative, importances).items()}
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
        written.append(out / f"{name}.png")
    (out / "index.html").write_text(render_html(study, trials, matrix, cumulative, plots, importance_note, cells, cost),
                                    encoding="utf-8")
    written += [out / "index.html", write_markdown(out)]
    return written


def write_markdown(out: Path) -> Path:
    """matrix.md from the matrix.csv (and cumulative.csv, cost.csv) in `out`, as the README shows them."""
    cumulative, cost = out / "cumulative.csv", out / "cost.csv"
    text = markdown_tables(pd.read_csv(out / "matrix.csv"), pd.read_csv(cumulative) if cumulative.exists() else None,
                           pd.read_csv(cost) if cost.exists() else None)
    (out / "matrix.md").write_text(text, encoding="utf-8")
    return out / "matrix.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="study name")
    parser.add_argument("--against", metavar="NAME", help="with --compare: a replay of the same arms (in the same storage) to "
                        "check against: each arm's final median within the other's band, Kendall's tau of the ranks")
    which.add_argument("--compare", metavar="NAME", help="a comparison of searches (bench.compare) instead of a study: "
                       "anytime curves, ranks and paired tests per arm (default --storage journal:///studies/compare-NAME.journal, "
                       "--out reports/compare-NAME; --format does not apply: the page and its CSVs are written)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL (default: sqlite:///studies/<study>.db)")
    parser.add_argument("--out", default=None, help="output directory (default: reports/<study>)")
    parser.add_argument("--format", choices=("html", "csv", "markdown"), default="html",
                        help="html: everything; csv: the CSV tables only; markdown: the CSV tables and matrix.md, the "
                             "README's tables made from matrix.csv (default: html)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    if args.compare:
        out = Path(args.out) if args.out else Path("reports") / re.sub(r"[^\w.-]", "_", f"compare-{args.compare}")
        storage = open_compare_storage(args.compare, args.storage)
        written = write_compare_report(storage, args.compare, out)
        print(f"wrote {len(written)} files to {out} in {time.perf_counter() - started:.1f}s: open {out / 'index.html'}")
        if args.against:
            table, tau = agreement(analyse(storage, args.compare), analyse(storage, args.against))
            table.to_csv(out / "agreement.csv", index=False)
            print(f"{args.compare} (live) against {args.against} (replay), final budget: median val acc [95% band], mean rank")
            for r in table.itertuples(index=False):
                print(f"  {r.arm:<18} live {r.val_median_live:.4f} [{r.val_low_live:.4f}, {r.val_high_live:.4f}] rank "
                      f"{r.mean_rank_live:.2f} | replay {r.val_median_replay:.4f} [{r.val_low_replay:.4f}, "
                      f"{r.val_high_replay:.4f}] rank {r.mean_rank_replay:.2f} | bands overlap: {'yes' if r.bands_overlap else 'NO'}")
            why = "" if math.isfinite(tau) else (": undefined, fewer than 2 arms in both" if len(table) < 2 else
                                                 ": undefined, the arms tie in rank on one side")
            print(f"Kendall's tau between the arms' mean ranks: {tau:.2f} ({len(table)} arms){why}")
        return 0
    study, _ = load_existing_study(args.study, args.storage)
    out = Path(args.out) if args.out else Path("reports") / re.sub(r"[^\w.-]", "_", args.study)
    written = write_report(study, out, fmt=args.format)
    print(f"wrote {len(written)} files to {out} in {time.perf_counter() - started:.1f}s"
          + (f": open {out / 'index.html'}" if args.format == "html" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
