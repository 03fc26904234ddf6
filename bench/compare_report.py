"""`python -m bench.report --compare NAME`: a comparison of searches as CSV tables, plots and one offline HTML page.

Render only: every table and plot consumes the frames of bench.comparison (`analyse`). Self-contained (bench.report
imports this module, so nothing here imports bench.report).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.comparison import (  # noqa: E402
    BOOTSTRAP_RESAMPLES,
    EPOCHS_AXIS,
    MIN_TEST_PAIRS,
    NO_TEST_SAME,
    REFERENCE_ARM,
    SECONDS_AXIS,
    TRIALS_AXIS,
    ComparisonFrames,
    analyse,
)
from bench.errors import UsageError  # noqa: E402
from bench.locks import storage_file  # noqa: E402
from bench.storage import compare_storage, open_storage  # noqa: E402

Figure = matplotlib.figure.Figure
DASH = "\u2014"
CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1300px;color:#222;padding:0 1rem}
table{border-collapse:collapse;font-size:.85rem;margin:1rem 0;max-width:100%}
td,th{border:1px solid #ccc;padding:.25rem .5rem;overflow-wrap:break-word}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.5rem .75rem}
.replay{background:#fde2e2;border:2px solid #c0392b;padding:.6rem .8rem;font-size:1.05rem}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5rem 0}.muted{color:#777}
.better{background:#e3f6e3}.worse{background:#fbe3e3}.reference{background:#eef2fb}
"""
PLOT_NAMES = frozenset({"anytime", "normalised_regret", "mean_rank", "final_ecdf", "anytime_per_trial_and_second"})
CSV_NAMES = ("trials", "anytime", "anytime_repeats", "ranks", "summary", "cost", "ecdf", "problems")


# --- plots: each takes frames and returns a figure, or None when there is nothing to draw ---------


def _colors(arms: list[str]) -> dict[str, tuple[float, float, float]]:
    palette = sns.color_palette("tab10", max(10, len(arms)))
    return {arm: palette[i] for i, arm in enumerate(arms)}


def _n_label(bands: pd.DataFrame, arm: str) -> str:
    return f"{arm} (n={int(bands.loc[bands['arm'] == arm, 'n'].max())})"


def _band_lines(ax: plt.Axes, bands: pd.DataFrame, column: str, colors: dict, scale: float = 100.0) -> None:
    for arm, one in bands.groupby("arm", sort=True):
        # steps: the incumbent holds its value until the next budget point
        ax.plot(one["budget"], one[f"{column}_median"] * scale, color=colors[arm], label=_n_label(bands, arm),
                drawstyle="steps-post")
        ax.fill_between(one["budget"], one[f"{column}_low"] * scale, one[f"{column}_high"] * scale, color=colors[arm],
                        alpha=0.18, linewidth=0, step="post")


def plot_anytime(bands: pd.DataFrame, colors: dict) -> Figure | None:
    if bands.empty or bands["val_median"].isna().all():
        return None
    fig, (ax_val, ax_test) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    _band_lines(ax_val, bands, "val", colors)
    _band_lines(ax_test, bands, "test", colors)
    ax_val.set(xlabel="training epochs consumed (pruned included)", ylabel="incumbent validation accuracy (%)",
               title="Incumbent val acc: median, 95% bootstrap band")
    ax_test.set(xlabel="training epochs consumed (pruned included)", ylabel="test accuracy of the incumbent (%)",
                title="Its test acc (not used for selection)")
    ax_val.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_regret(bands: pd.DataFrame, colors: dict) -> Figure | None:
    if bands.empty or bands["regret_norm_median"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _band_lines(ax, bands, "regret_norm", colors, scale=1.0)
    ax.axhline(0, color="0.5", lw=1)
    ax.set(xlabel="training epochs consumed (pruned included)", ylabel="normalised regret (0 = best seen)",
           title="Normalised regret: median, 95% bootstrap band")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_secondary(bands: dict[str, pd.DataFrame], colors: dict) -> Figure | None:
    trials, seconds = bands.get(TRIALS_AXIS, pd.DataFrame()), bands.get(SECONDS_AXIS, pd.DataFrame())
    if trials.empty or trials["val_median"].isna().all():
        return None
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    _band_lines(ax_t, trials, "val", colors)
    ax_t.set(xlabel="finished trials (complete or pruned)", ylabel="incumbent validation accuracy (%)", title="Per trial")
    if not seconds.empty:
        _band_lines(ax_s, seconds, "val", colors)
    ax_s.set(xlabel="simulated wall time: train + sampler seconds", ylabel="incumbent validation accuracy (%)",
             title="Per second (one worker)")
    ax_t.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_ranks(ranks: pd.DataFrame, colors: dict) -> Figure | None:
    if ranks.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, one in ranks.groupby("arm", sort=True):
        ax.plot(one["budget"], one["mean_rank"], color=colors[arm], label=f"{arm} (n={int(one['n'].max())})")
    ax.set_ylim(int(ranks["n_arms"].max()) + 0.2, 0.8)  # rank 1 (best) at the top
    ax.set(xlabel="training epochs consumed (pruned included)", ylabel="mean rank (1 = best)", title="Mean rank over repeats")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_ecdf(ecdf: pd.DataFrame, colors: dict) -> Figure | None:
    if ecdf.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, one in ecdf.groupby("arm", sort=True):
        x = np.concatenate([[one["val_acc"].min()], one["val_acc"]]) * 100
        y = np.concatenate([[0.0], one["ecdf"]])
        ax.step(x, y, where="post", color=colors[arm], label=f"{arm} (n={int(one['n'].iloc[0])})")
    ax.set(xlabel="final incumbent validation accuracy (%)", ylabel="fraction of repeats at or below",
           title="ECDF of final results (further right is better)")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def build_plots(frames: ComparisonFrames) -> dict[str, Figure]:
    colors = _colors(sorted(frames.studies["arm"].unique()))
    candidates = {
        "anytime": plot_anytime(frames.bands[EPOCHS_AXIS], colors),
        "normalised_regret": plot_regret(frames.bands[EPOCHS_AXIS], colors),
        "mean_rank": plot_ranks(frames.ranks, colors),
        "final_ecdf": plot_ecdf(frames.ecdf, colors),
        "anytime_per_trial_and_second": plot_secondary(frames.bands, colors),
    }
    return {k: v for k, v in candidates.items() if v is not None}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --- HTML -----------------------------------------------------------------------------------


def _pct(v: object) -> str:
    return DASH if v is None or not np.isfinite(float(v)) else f"{float(v) * 100:.2f}"


def _median_iqr(row: pd.Series, name: str) -> str:
    return f"{_pct(row[f'{name}_median'])} [{_pct(row[f'{name}_q1'])}, {_pct(row[f'{name}_q3'])}]"


def _p(v: object) -> str:
    return DASH if v is None or not np.isfinite(float(v)) else f"{float(v):.3g}"


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as the page shows it: percentages, medians with their IQR, every row with its n."""
    if summary.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "budget": [f"{f * 100:.0f}% ({b:.0f} ep)" for f, b in zip(summary["fraction"], summary["budget"], strict=True)],
        "arm": summary["arm"],
        "n repeats": [f"{int(n)}" + (f" ({int(k)} with an incumbent)" if k < n else "")
                      for n, k in zip(summary["n"], summary["n_found"], strict=True)],
        "val acc % median [IQR]": [_median_iqr(r, "val") for _, r in summary.iterrows()],
        "test acc % median [IQR]": [_median_iqr(r, "test") for _, r in summary.iterrows()],
        "vs": summary["reference"],
        "median diff, points (pairs)": [DASH if not np.isfinite(d) else f"{d * 100:+.2f} ({int(k)})"
                                        for d, k in zip(summary["median_diff"].astype(float), summary["n_pairs"].fillna(0), strict=True)],
        "p (Wilcoxon)": summary["p_raw"].map(_p),
        "p (Holm)": summary["p_holm"].map(_p),
        "verdict": summary["verdict"],
    })


def _row_class(verdict: str) -> str:
    return "better" if verdict.startswith("better") else "worse" if verdict.startswith("worse") else (
        "reference" if verdict == "reference" else "")


def _table(frame: pd.DataFrame, classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, (_, row) in enumerate(frame.iterrows()):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(v: object) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return DASH
    if isinstance(v, float):
        return f"{v:,.0f}" if v == int(v) else f"{v:,.2f}"
    return str(v)


def how_to_read(frames: ComparisonFrames) -> str:
    ref = frames.reference
    against = (f"the {REFERENCE_ARM} arm" if ref == REFERENCE_ARM else
               f"{ref}, the arm with the best median (no '{REFERENCE_ARM}' arm here; choosing it by its median favours it, "
               "so 'worse than' verdicts are optimistic for it)")
    return (
        "<p>Every arm ran the same repeats: repeat r uses the same sampler seed, trial seeds, data split and noise in every "
        "arm, so results pair by repeat. The budget is training epochs consumed, pruned trials' epochs included. The "
        "<b>incumbent</b> at a budget is the completed trial with the best validation accuracy among those its study "
        "finished within that budget (pruned trials are never incumbents); its test accuracy is shown beside and was "
        "never used to select anything.</p><p>Curves show the <b>median over repeats</b>; a repeat with no completed "
        "trial yet counts as the worst, so a median appears once half the repeats have one. The <b>band</b> is a 95% "
        f"percentile bootstrap of that median ({BOOTSTRAP_RESAMPLES} seeded resamples of the repeats): it shows how much "
        "the median would move with other repeats, not where single runs fall. <b>Regret</b> = the best validation "
        f"accuracy any trial of this comparison reached ({_pct(frames.best)}%) minus the incumbent's; <b>normalised "
        f"regret</b> divides it by that best minus the worst final incumbent of any arm and repeat ({_pct(frames.worst)}%): "
        "0 is the best seen, 1 the worst final result. <b>Mean rank</b>: per budget and repeat the arms are ranked "
        "(1 = best, ties share the average rank, no incumbent ranks last), then averaged over the repeats where every "
        f"arm ran.</p><p>The table tests each arm against {html.escape(against)}: a paired two-sided Wilcoxon "
        "signed-rank test over repeats of the incumbent's validation accuracy, Holm-corrected across the arms at each "
        "budget point, so the chance of any false 'better'/'worse' verdict at that point is at most 5%. <b>Not "
        "distinguishable</b> means the data do not show a difference at that level, not that the arms are equal: "
        f"more repeats may. Below {MIN_TEST_PAIRS} differing pairs no test can reach p &le; 0.05 (5 pairs: at best "
        f"p = 0.0625), so those rows say 'too few repeats'. '{html.escape(NO_TEST_SAME)}': every pair was identical.</p>")


def overview_items(frames: ComparisonFrames) -> list[tuple[str, str]]:
    studies = frames.studies
    repeats = sorted(studies["repeat"].unique())
    budgets = sorted(studies["budget_epochs"].dropna().unique())
    images = sorted(studies["train_images"].dropna().unique())
    return [
        ("comparison", frames.name),
        ("arms", ", ".join(sorted(studies["arm"].unique()))),
        ("repeats", f"{len(repeats)} ({', '.join(str(r) for r in repeats)})"),
        ("budget per arm and repeat", ", ".join(f"{b:,.0f}" for b in budgets) + " training epochs" if budgets else "not stored"),
        ("train images per epoch", ", ".join(f"{i:,.0f}" for i in images) if images else "not stored"),
        ("trials", f"{len(frames.trials)} in {len(studies)} studies"),
        ("reference arm of the tests", frames.reference or DASH),
    ]


def render_html(frames: ComparisonFrames, plots: dict[str, bytes]) -> str:
    esc = html.escape
    name = esc(frames.name)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bench comparison: {name}</title>"
             f"<style>{CSS}</style></head><body><h1>bench comparison: {name}</h1>"]
    for table in frames.replays:
        parts.append(f"<p class='replay'><b>Replayed from a recorded table ({esc(table)})</b>: trials were answered from "
                     "recorded results instead of training; seconds are the recorded ones.</p>")
    if not frames.problems.empty:
        items = "".join(f"<li>{esc(_who(r))}: {esc(str(r['problem']))}</li>" for _, r in frames.problems.iterrows())
        parts.append(f"<div class='banner'><b>Failed, missing or short repeats</b> (the results below use what there is; "
                     f"every row states its n):<ul>{items}</ul></div>")
    parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in overview_items(frames))
                 + "</table>")
    parts.append("<h2>How to read this page</h2>" + how_to_read(frames))
    parts.append("<h2>Results at 25% and 100% of the budget</h2>")
    shown = summary_display(frames.summary)
    if shown.empty:
        parts.append("<p class='muted'>nothing to show yet: no trial stored.</p>")
    else:
        parts.append(_table(shown, [_row_class(v) for v in frames.summary["verdict"]]))
        parts.append("<p class='muted'>Accuracies in %, median [interquartile range] over the n repeats; the diff is the "
                     "median over paired repeats of (arm - reference) incumbent validation accuracy, in points.</p>")
    parts.append("<h2>Plots</h2>")
    if not plots:
        parts.append("<p class='muted'>nothing to show yet: no completed trial.</p>")
    for key, png in plots.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h3>{esc(key.replace('_', ' '))}</h3><img alt='{esc(key)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Cost per arm</h2>")
    if not frames.cost.empty:
        parts.append(_table(frames.cost) + "<p class='muted'>Summed over the arm's n repeats; train images = epochs x "
                     "images per epoch; seconds are training (or recorded, when replayed) and the sampler's asking time.</p>")
    parts.append("<p class='muted'>Tables: " + ", ".join(f"{n}.csv" for n in CSV_NAMES) + ".</p></body></html>")
    return "\n".join(parts)


def _who(row: pd.Series) -> str:
    return "all studies" if row["arm"] == "*" else f"{row['arm']} repeat {int(row['repeat'])}"


# --- the entry point ------------------------------------------------------------------------


def write_compare_report(storage: str | optuna.storages.BaseStorage, name: str, out_dir: Path | str) -> list[Path]:
    """index.html (offline: plots inline), the plots as PNGs and the CSVs of CSV_NAMES in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = analyse(storage, name)
    tables = {
        "trials": frames.trials,
        "anytime": pd.concat([b.assign(axis=axis) for axis, b in frames.bands.items()], ignore_index=True),
        "anytime_repeats": pd.concat([c.assign(axis=axis) for axis, c in frames.curves.items()], ignore_index=True),
        "ranks": frames.ranks, "summary": frames.summary, "cost": frames.cost, "ecdf": frames.ecdf,
        "problems": frames.problems,
    }
    written = []
    for key in CSV_NAMES:
        path = out / f"{key}.csv"
        tables[key].to_csv(path, index=False)
        written.append(path)
    sns.set_theme(style="whitegrid")
    plots = {key: _png(fig) for key, fig in build_plots(frames).items()}
    for stale in PLOT_NAMES - plots.keys():  # never a plot from an earlier report beside this page
        (out / f"{stale}.png").unlink(missing_ok=True)
    for key, png in plots.items():
        (out / f"{key}.png").write_bytes(png)
        written.append(out / f"{key}.png")
    (out / "index.html").write_text(render_html(frames, plots), encoding="utf-8")
    written.append(out / "index.html")
    return written


def open_compare_storage(name: str, storage_url: str | None) -> optuna.storages.BaseStorage:
    """The storage of comparison `name` (default: bench.compare's, studies/compare-NAME.journal); a missing file is a
    UsageError instead of a new empty database."""
    url = storage_url or compare_storage(name)
    path = storage_file(url)
    if path is not None and not path.exists():
        raise UsageError(f"no comparison database at {path}; run `python -m bench.compare` first or pass --storage")
    return open_storage(url, heartbeat=False)
