"""`python -m bench.matrix`: the improvement matrix as a designed, seeded experiment.

Cells (bench.design, from bench.space's MATRIX_LEVELS and CUMULATIVE_PATH): per budget tier
(--budgets, default 5,20 epochs) the baseline recipe and each level changed alone from it, the
levels whose claims name a budget at that budget only, and the cumulative path; every cell
repeated with --seeds K seeds. Cells are enqueued as fixed trials in one Optuna study, so reruns
skip what is finished and the report reads the cells back from the trials. Long designs run in
pieces: --stop-after MINUTES ends after the running cell; the same command continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.analysis import attempt_kind, settle
from bench.checkpoint import KEEP_POLICIES, CheckpointSink, artifact_dir, open_store
from bench.cli import (
    INTERRUPTED_EXIT,
    add_data_args,
    add_study_args,
    duration,
    load_data_args,
    pack_size,
    print_summary,
    raise_interrupt,
    record_budget,
    resolve_pack,
    study_meta,
    trial_line,
)
from bench.design import Cell, design, parse_budgets, select
from bench.errors import UsageError, redact, run_cli
from bench.hardware import precision_name, resolve_device
from bench.locks import RunLock, TrialGate, storage_file
from bench.objective import TrialSettings, TrialTrainer
from bench.packed import shape_signature
from bench.runner import run_packs
from bench.schema import Attr, StudyAttr
from bench.space import BASELINE, BUDGET_TIERS, build_space, is_active, params_for_config
from bench.storage import FINISHED, default_storage, fail_orphans, open_storage, open_study

# a designed cell may set a knob outside the range the search draws from (RMSprop's default momentum 0 against the
# searched 0.5-0.99); Optuna uses the fixed value and warns once per trial, which here is by design
warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range for distribution")


def pending(cells: Sequence[Cell], study: optuna.Study, *, outcomes: tuple[str, ...] = ("todo",)) -> list[Cell]:
    """Cells to enqueue: no finished, waiting or running attempt. Interrupted or orphaned attempts are run
    again; a diverged or failed one is run once more, and after that its outcome stands (bench.analysis.settle).
    `outcomes=("todo", "active")`: also the cells waiting or running, i.e. every cell with no outcome yet."""
    kinds = _attempts(study)
    return [c for c in cells if settle(kinds.get((c.name, c.seed), [])) in outcomes]


UNSETTLED = ("todo", "active")  # no outcome yet: to run, waiting or running


def describe(cells: Sequence[Cell], train_images: int, done: int) -> list[str]:
    """The design as a table, tier by tier, with each tier's compute (epochs x images)."""
    names = list(dict.fromkeys(c.name for c in cells))
    lines = [f"{'cell':<44} {'factor':<13} {'tier':>4} {'run at':>6} {'seeds':>5}  changes from the baseline recipe"]
    for name in names:
        group = [c for c in cells if c.name == name]
        cfg = group[0].config
        values = dataclasses.asdict(cfg)
        shown = {k: v for k, v in dataclasses.asdict(cfg.replace(epochs=BASELINE.epochs)).items() if v != getattr(BASELINE, k)}
        for p in build_space():  # a changed knob's own settings (StepLR's step and gamma), also where they are defaults
            if p.when and values[p.when[0]] != getattr(BASELINE, p.when[0]) and is_active(p, values):
                shown[p.name] = values[p.name]
        changes = " ".join(f"{k}={v}" for k, v in sorted(shown.items(), key=lambda kv: list(values).index(kv[0]))) or "-"
        lines.append(f"{name:<44} {group[0].factor:<13} {group[0].budget:>4} {cfg.epochs:>6} {len(group):>5}  {changes}")
    for tier in sorted({c.budget for c in cells}):
        in_tier = [c for c in cells if c.budget == tier]
        lines.append(f"tier {tier} epochs: {len({c.name for c in in_tier})} cells, {len(in_tier)} trials, "
                     f"{sum(c.config.epochs for c in in_tier) * train_images:,} training images")
    lines.append(f"{len(names)} cells, {len(cells)} trials ({done} already finished); "
                 f"estimated compute: {sum(c.config.epochs for c in cells) * train_images:,} training images (epochs x images)")
    return lines


class Progress:
    """Overall progress of the design: trials settled, training images done, and the time left at this run's pace."""

    def __init__(self, cells: Sequence[Cell], train_images: int, study: optuna.Study):
        self.cells, self.train_images = list(cells), train_images
        self.started = time.monotonic()
        self.images_at_start = self.done_images(study)[1]

    def done_images(self, study: optuna.Study) -> tuple[int, int]:
        todo = {(c.name, c.seed) for c in pending(self.cells, study, outcomes=UNSETTLED)}
        done = [c for c in self.cells if (c.name, c.seed) not in todo]
        return len(done), sum(c.config.epochs for c in done) * self.train_images

    def line(self, study: optuna.Study) -> str:
        done, images = self.done_images(study)
        total = sum(c.config.epochs for c in self.cells) * self.train_images
        elapsed = time.monotonic() - self.started
        pace = (images - self.images_at_start) / elapsed if elapsed > 0 else 0.0
        left = f", about {duration((total - images) / pace)} left at {pace:,.0f} images/s" if pace > 0 and images < total else ""
        return (f"[matrix] {done} of {len(self.cells)} trials done, {images / 1e6:.1f}M of {total / 1e6:.1f}M "
                f"training images{left}")


def run_cells(study: optuna.Study, cells: Sequence[Cell], space: tuple, *, trainer: TrialTrainer, gate: TrialGate,
              fail_left_running: bool, train_images: int, stop_after: float | None = None, pack: int = 1) -> int:
    """Run the cells a pack at a time (enqueued just before they run, so --only and --stop-after leave nothing
    queued): with `pack` K > 1, up to K waiting trials that share a shape signature (every seed of a cell does) train
    as one packed network, each exactly as alone. A diverged or failed cell is run once more
    (bench.analysis.settle). With `stop_after` (seconds) nothing starts after that time; what runs finishes."""
    if fail_left_running:
        with gate:
            fail_orphans(study, "found running at start")
    progress = Progress(cells, train_images, study)

    def report(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        print(f"{t.user_attrs.get(Attr.CELL, '?'):<44} seed={t.user_attrs.get(Attr.SEED)} {trial_line(t)}", flush=True)
        print(progress.line(s), flush=True)

    signal.signal(signal.SIGTERM, raise_interrupt)
    deadline = None if stop_after is None else time.monotonic() + stop_after
    while True:
        with gate:  # two matrix processes on one study: the second sees the first's cell and does not enqueue it again
            todo = pending(cells, study)
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not todo and not waiting:
                return 0
            stopping = deadline is not None and time.monotonic() >= deadline
            if not stopping and not waiting:
                signature = shape_signature(todo[0].config)
                for cell in [c for c in todo if shape_signature(c.config) == signature][:pack]:
                    study.enqueue_trial(params_for_config(cell.config, space),
                                        user_attrs={Attr.CELL: cell.name, Attr.SEED: cell.seed})
        if stopping:
            left = pending(cells, study, outcomes=UNSETTLED)
            names = {c.name for c in cells}
            done_cells = len(names - {c.name for c in left})
            print(f"stopped after {stop_after / 60:g} min (--stop-after): {done_cells} of {len(names)} cells done "
                  f"({len(cells) - len(left)} of {len(cells)} trials); rerun the same command to continue", flush=True)
            return 0
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            busy = len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
            run_packs(study, trainer, busy + pack, pack=pack, gate=gate, timeout=remaining, callbacks=[report],
                      enqueued_only=True)
        except KeyboardInterrupt:
            print("interrupted: the running cell is recorded as failed (interrupted); rerun the same command to finish "
                  "the matrix", file=sys.stderr)
            print_summary(study)
            return INTERRUPTED_EXIT


def _attempts(study: optuna.Study) -> dict[tuple[Any, Any], list[str]]:
    kinds: dict[tuple[Any, Any], list[str]] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        key = (a.get(Attr.CELL), a.get(Attr.SEED))
        kinds.setdefault(key, []).append(attempt_kind(t.state.name, a.get(Attr.STOP_REASON), a.get(Attr.FAIL_REASON)))
    return kinds


def precision_warning(study: optuna.Study, precision: str) -> str | None:
    """A study resumed on a machine that trains in other arithmetic (auto is bf16 on a CPU with AVX512-BF16, fp32 on
    one without) mixes precisions across cells: said before the first trial, and named on the report's rows."""
    others = Counter(recorded for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if (recorded := t.user_attrs.get(Attr.PRECISION)) not in (None, precision))
    if not others:
        return None
    earlier = ", ".join(f"{p} ({n} trials)" for p, n in sorted(others.items()))
    return (f"note: study {study.study_name!r} has trials trained in {earlier}; this run trains in {precision}, so "
            f"its cells mix precisions (the report names each such row); pass --precision {min(others)} to match")


def minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stop-after takes minutes (a number), got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--stop-after must be more than 0 minutes, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser)
    add_data_args(parser)
    g = parser.add_argument_group("design")
    g.add_argument("--seeds", type=int, default=5,
                   help="repeats of every cell, seeds SEED..SEED+K-1; a verdict needs 3 seed pairs (default: 5)")
    g.add_argument("--budgets", default=",".join(map(str, BUDGET_TIERS)),
                   help="budget tiers in epochs: levels whose claims name no budget run at each, against the baseline "
                        f"recipe at the same epochs (default: {','.join(map(str, BUDGET_TIERS))})")
    g.add_argument("--only", default=None, metavar="NAME[,NAME...]",
                   help="run part of the design: cells, levels (every tier of one) or factors (see --dry-run)")
    g.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every cell's epochs (0.25 turns 5/20 into 1/5); the report states it (default: 1)")
    g.add_argument("--max-epochs", type=int, default=30, help="cap on any cell's epochs (default: 30)")
    g.add_argument("--stop-after", type=minutes, default=None, metavar="MINUTES",
                   help="start no trial after this many minutes; the running one finishes (rerun to continue)")
    g.add_argument("--pack", type=pack_size, default="auto",
                   help="train up to K waiting trials of one shape signature (a cell's seeds) as one packed network, "
                        "each exactly as alone: K, or auto (32 on CUDA, 1 on CPU, where packing measured slower)")
    g.add_argument("--force", action="store_true", help="add to a study made with another dataset or split")
    g.add_argument("--dry-run", action="store_true", help="list the cells and the estimated compute, train nothing")
    g.add_argument("--keep-models", choices=KEEP_POLICIES, default="best", help="(default: best)")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    parser.set_defaults(study_name="matrix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.deterministic:  # cuBLAS reads it when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be 1 or more, got {args.seeds}")
    if args.max_epochs < 1:
        raise UsageError(f"--max-epochs must be 1 or more, got {args.max_epochs}")
    if not 0 < args.epochs_scale <= 10:
        raise UsageError(f"--epochs-scale must be in (0, 10], got {args.epochs_scale}")
    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    seeds = range(args.seed, args.seed + args.seeds)

    def capped(cells: list[Cell]) -> list[Cell]:
        return [dataclasses.replace(c, config=c.config.replace(epochs=min(c.config.epochs, args.max_epochs))) for c in cells]

    cells = capped(design(seeds=seeds, budgets=budgets, epochs_scale=args.epochs_scale))
    try:
        cells = select(cells, args.only)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # the space covers the whole default design, so running it in pieces (--budgets, --only) keeps one study space
    full = capped(design(seeds=seeds, budgets=tuple(sorted(set(BUDGET_TIERS) | set(budgets))), epochs_scale=args.epochs_scale))
    max_epochs = max(c.config.epochs for c in full)
    storage_url = args.storage or default_storage(args.study_name)
    dataset, splits = load_data_args(args)
    space = build_space(max_epochs)
    file = storage_file(storage_url)
    existing: optuna.Study | None = None
    if not (args.dry_run and file is not None and not file.exists()):  # a dry run creates no database file
        storage = open_storage(storage_url)
        try:
            existing = optuna.load_study(study_name=args.study_name, storage=storage)
        except KeyError:
            pass
    todo = pending(cells, existing) if existing is not None else cells
    print(f"matrix study {args.study_name!r} ({redact(storage_url)}), data {dataset.name} train={len(splits.train)}")
    print("\n".join(describe(cells, len(splits.train), len(cells) - len(todo))))
    if args.dry_run:
        print(f"dry run: {len(todo)} trials would run; nothing was written")
        return 0
    meta = study_meta(args, dataset, space)
    study, is_new = open_study(args.study_name, storage, sampler=optuna.samplers.RandomSampler(seed=args.seed),
                               pruner=optuna.pruners.NopPruner(), meta=meta, force=args.force)
    design_attrs = {StudyAttr.EPOCHS_SCALE: args.epochs_scale, StudyAttr.MAX_EPOCHS: args.max_epochs}
    for key, value in design_attrs.items():
        stored = study.user_attrs.get(key, value)
        if stored != value:
            option = key.removeprefix(StudyAttr.PREFIX).replace("_", "-")
            raise UsageError(f"study {args.study_name!r} was run with --{option} {stored}; use the same value or "
                             "another --study-name")
    if is_new:
        study.set_user_attr(StudyAttr.DESIGN, "matrix")
    for key, value in design_attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr(StudyAttr.BUDGETS, sorted(set(study.user_attrs.get(StudyAttr.BUDGETS, [])) | set(budgets)))
    record_budget(study, splits)
    if (warning := precision_warning(study, precision_name(args.precision, device))) is not None:
        print(warning, file=sys.stderr)
    run_lock = RunLock(storage_url, args.study_name)
    alone = run_lock.try_acquire()  # alone on this file storage: RUNNING cells were left by a killed run
    try:
        code = run_cells(study, cells, space, trainer=TrialTrainer(
            splits, space, TrialSettings(device=args.device, precision=args.precision, seed=args.seed,
                                         progress=not args.quiet, compile_model=args.compile,
                                         deterministic=args.deterministic),
            on_model=CheckpointSink(open_store(artifact_dir(storage_url, args.study_name)), storage, args.keep_models,
                                    dataset)), gate=TrialGate(storage_url, args.study_name), fail_left_running=alone,
            train_images=len(splits.train), stop_after=None if args.stop_after is None else args.stop_after * 60,
            pack=resolve_pack(args.pack, device))
    finally:
        run_lock.release()
    if code:
        return code
    print_summary(study)
    print(f"report: python -m bench.report --study {args.study_name}"
          + (f" --storage {redact(storage_url)}" if args.storage else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
