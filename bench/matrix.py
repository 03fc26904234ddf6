"""`python -m bench.matrix`: the improvement matrix as a designed, seeded experiment.

Cells (all generated from bench.space's MATRIX_LEVELS and CUMULATIVE_PATH): the baseline,
each level changed alone from the baseline, and the cumulative path; every cell repeated
with --seeds K seeds. Cells are enqueued as fixed trials in one Optuna study, so reruns
skip what is finished and the report reads the cells back from the trials.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.analysis import BASELINE_CELL, CUMULATIVE_PREFIX, MAX_ATTEMPTS, attempt_kind, settle
from bench.checkpoint import KEEP_POLICIES, CheckpointSink, artifact_dir, open_store
from bench.errors import UsageError, redact, run_cli
from bench.locks import RunLock, TrialGate, storage_file
from bench.objective import Attr, Objective, TrialSettings
from bench.run import (
    INTERRUPTED_EXIT,
    add_data_args,
    add_study_args,
    load_data_args,
    print_summary,
    raise_interrupt,
    record_budget,
    study_meta,
    trial_line,
)
from bench.space import BASELINE, CUMULATIVE_PATH, MATRIX_LEVELS, Level, TrainConfig, build_space, params_for_config
from bench.study import default_storage, fail_orphans, open_storage, open_study, run_trials
from bench.train import resolve_device


@dataclass(frozen=True)
class Cell:
    name: str
    factor: str
    config: TrainConfig
    seed: int


def scale_epochs(cfg: TrainConfig, scale: float) -> TrainConfig:
    return cfg.replace(epochs=max(1, round(cfg.epochs * scale)))


def design(levels: Sequence[Level] = MATRIX_LEVELS, cumulative: Sequence[tuple[str, Sequence[str]]] = CUMULATIVE_PATH,
           *, seeds: Sequence[int] = (0, 1, 2), epochs_scale: float = 1.0, base: TrainConfig = BASELINE) -> list[Cell]:
    """Every cell x seed, in run order: baseline, one-factor-at-a-time levels, then the cumulative path."""
    by_name = {level.name: level for level in levels}
    groups: list[tuple[str, str, TrainConfig]] = [(BASELINE_CELL, "baseline", base)]
    groups += [(level.name, level.factor, base.replace(**level.changes)) for level in levels]
    changes: dict[str, Any] = {}
    for k, (step, names) in enumerate(cumulative, start=1):
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"cumulative step {step!r} names unknown levels: {missing}")
        for name in names:
            changes |= by_name[name].changes
        groups.append((f"{CUMULATIVE_PREFIX}{k:02d}. {step}", "cumulative", base.replace(**changes)))
    return [Cell(name, factor, scale_epochs(cfg, epochs_scale), seed) for name, factor, cfg in groups for seed in seeds]


def pending(cells: Sequence[Cell], study: optuna.Study) -> list[Cell]:
    """Cells to enqueue: no finished, waiting or running attempt. Interrupted or orphaned attempts are run
    again; a diverged or failed one is run once more, and after that its outcome stands (bench.analysis.settle)."""
    kinds: dict[tuple[Any, Any], list[str]] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        key = (a.get(Attr.CELL), a.get(Attr.SEED))
        kinds.setdefault(key, []).append(attempt_kind(t.state.name, a.get(Attr.STOP_REASON), a.get(Attr.FAIL_REASON)))
    return [c for c in cells if settle(kinds.get((c.name, c.seed), [])) == "todo"]


def describe(cells: Sequence[Cell], train_images: int, done: int) -> list[str]:
    names = list(dict.fromkeys(c.name for c in cells))
    lines = [f"{'cell':<40} {'factor':<13} {'epochs':>6} {'seeds':>5}"]
    for name in names:
        group = [c for c in cells if c.name == name]
        lines.append(f"{name:<40} {group[0].factor:<13} {group[0].config.epochs:>6} {len(group):>5}")
    epoch_images = sum(c.config.epochs for c in cells) * train_images
    lines.append(f"{len(names)} cells, {len(cells)} trials ({done} already finished); "
                 f"estimated compute: {epoch_images:,} training images (epochs x images)")
    return lines


def run_cells(study: optuna.Study, cells: Sequence[Cell], space: tuple, *, objective: Objective, gate: TrialGate,
              fail_left_running: bool) -> int:
    """Enqueue the missing cells and run them; a second round reruns once those that diverged or failed."""
    if fail_left_running:
        with gate:
            fail_orphans(study, "found running at start")
    report = lambda s, t: print(f"{t.user_attrs.get(Attr.CELL, '?'):<40} seed={t.user_attrs.get(Attr.SEED)} {trial_line(t)}", flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, raise_interrupt)
    for _ in range(MAX_ATTEMPTS):
        with gate:  # two matrix processes on one study: the second sees the first's cells and enqueues none twice
            todo = pending(cells, study)
            for cell in todo:
                study.enqueue_trial(params_for_config(cell.config, space), user_attrs={Attr.CELL: cell.name, Attr.SEED: cell.seed})
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if not waiting:
            break
        print(f"{len(todo)} cells enqueued; {waiting} waiting to run", flush=True)
        try:
            run_trials(study, objective, None, gate=gate, callbacks=[report])
        except KeyboardInterrupt:
            print("interrupted: the running cell is recorded as failed (interrupted); rerun the same command to finish "
                  "the matrix", file=sys.stderr)
            print_summary(study)
            return INTERRUPTED_EXIT
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser)
    add_data_args(parser)
    g = parser.add_argument_group("design")
    g.add_argument("--seeds", type=int, default=5,
                   help="repeats of every cell, seeds SEED..SEED+K-1; a verdict needs 3 seed pairs (default: 5)")
    g.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every cell's epochs (0.25 turns 5/20 into 1/5); the report states it (default: 1)")
    g.add_argument("--max-epochs", type=int, default=30, help="cap on any cell's epochs (default: 30)")
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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resolve_device(args.device)
    cells = design(seeds=range(args.seed, args.seed + args.seeds), epochs_scale=args.epochs_scale)
    cells = [Cell(c.name, c.factor, c.config.replace(epochs=min(c.config.epochs, args.max_epochs)), c.seed) for c in cells]
    max_epochs = max(c.config.epochs for c in cells)
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
        print(f"dry run: {len(todo)} trials would be enqueued; nothing was written")
        return 0
    meta = study_meta(args, dataset, space)
    study, is_new = open_study(args.study_name, storage, sampler=optuna.samplers.RandomSampler(seed=args.seed),
                               pruner=optuna.pruners.NopPruner(), meta=meta, force=args.force)
    design_attrs = {"bench.epochs_scale": args.epochs_scale, "bench.max_epochs": args.max_epochs}
    for key, value in design_attrs.items():
        stored = study.user_attrs.get(key, value)
        if stored != value:
            option = key.removeprefix("bench.").replace("_", "-")
            raise UsageError(f"study {args.study_name!r} was run with --{option} {stored}; use the same value or "
                             "another --study-name")
    if is_new:
        study.set_user_attr("bench.design", "matrix")
    for key, value in design_attrs.items():
        study.set_user_attr(key, value)
    record_budget(study, splits)
    run_lock = RunLock(storage_url, args.study_name)
    alone = run_lock.try_acquire()  # alone on this file storage: RUNNING cells were left by a killed run
    try:
        code = run_cells(study, cells, space, objective=Objective(
            splits, space, TrialSettings(device=args.device, precision=args.precision, seed=args.seed,
                                         progress=not args.quiet, compile_model=args.compile,
                                         deterministic=args.deterministic),
            on_model=CheckpointSink(open_store(artifact_dir(storage_url, args.study_name)), storage, args.keep_models,
                                    dataset)), gate=TrialGate(storage_url, args.study_name), fail_left_running=alone)
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
