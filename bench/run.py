"""`python -m bench.run`: search TinyCNN variants into a resumable Optuna study."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.checkpoint import KEEP_POLICIES, CheckpointSink, artifact_dir, open_store
from bench.data import DATASETS, load_dataset, make_splits
from bench.errors import UsageError, redact, run_cli
from bench.objective import Attr, Objective, TrialSettings
from bench.space import PRESETS, build_space, params_for_config, preset_config
from bench.study import (
    FINISHED,
    PRUNERS,
    SAMPLERS,
    FailureGuard,
    StudyMeta,
    count_finished,
    create_pruner,
    create_sampler,
    default_storage,
    open_storage,
    open_study,
    space_signature,
)
from bench.train import PRECISIONS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that trains (run, matrix, perf)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10",
                   help=f"{' | '.join(DATASETS)} (torchvision, downloaded into --data-dir) or the path of an "
                        "ImageFolder tree with train/ and test/ (or val/) (default: cifar10)")
    g.add_argument("--data-dir", default="data", help="where torchvision datasets live (default: ./data)")
    g.add_argument("--cache-dir", default=None, help="decoded-tensor cache for folder datasets (default: ~/.cache/bench)")
    g.add_argument("--image-size", type=positive_int, default=32, help="side images are resized to when sizes are mixed (default: 32)")
    g.add_argument("--val-split", type=float, default=0.1,
                   help="fraction of train carved out (seeded, stratified) for validation; 0 = use the test set, "
                        "as the assignment does (default: 0.1)")
    g.add_argument("--train-subset", type=positive_int, default=None, help="train on N seeded train images (fast CPU runs)")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with bf16 support, else fp32 (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, sampler and trial seeds (default: 0)")


def add_study_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("study")
    g.add_argument("--study-name", default="bench", help="study to create or resume (default: bench)")
    g.add_argument("--storage", default=None,
                   help="any SQLAlchemy URL (default: sqlite:///studies/<study-name>.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--trials", type=int, default=50, help="finished trials the study should hold at the end (default: 50)")
    add_study_args(parser)
    add_data_args(parser)
    g = parser.add_argument_group("search")
    g.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="(default: tpe)")
    g.add_argument("--pruner", choices=PRUNERS, default="median", help="(default: median)")
    g.add_argument("--max-epochs", type=positive_int, default=30, help="upper bound of the epochs parameter (default: 30)")
    g.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    g.add_argument("--preset", choices=PRESETS, default="tinycnn", help="the enqueued first trial (default: tinycnn, the baseline)")
    g.add_argument("--no-baseline", action="store_true", help="do not enqueue the baseline as trial 0 of a new study")
    g.add_argument("--force", action="store_true", help="add to a study made with another dataset or space")
    g.add_argument("--keep-models", choices=KEEP_POLICIES, default="best",
                   help="store trial weights in the study's artifact store: best (only the current best), all, none "
                        "(default: best)")
    g.add_argument("--artifacts", default=None, help="artifact directory (default: studies/<study-name>-artifacts)")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    return parser


def trial_line(trial: FrozenTrial) -> str:
    a = trial.user_attrs
    acc = lambda key: f"{a[key]:.4f}" if isinstance(a.get(key), float) else "-"  # noqa: E731
    reason = a.get(Attr.STOP_REASON, trial.state.name.lower())
    line = (f"trial {trial.number:>3} {trial.state.name:<8} val={acc(Attr.VAL_ACC)} test={acc(Attr.TEST_ACC)} "
            f"epochs={a.get(Attr.EPOCHS_RUN, '-')} {a.get(Attr.TRAIN_SECONDS, 0):.1f}s "
            f"{a.get(Attr.IMAGES_PER_SEC, 0):.0f} img/s stop={reason}")
    if trial.state == TrialState.FAIL:
        line += f" ({a.get(Attr.FAIL_REASON, 'see log')})"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trials < 1:
        raise UsageError(f"--trials must be 1 or more, got {args.trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_url = args.storage or default_storage(args.study_name)
    storage = open_storage(storage_url)  # before the data: a bad URL should fail fast
    dataset = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, cache_dir=args.cache_dir)
    splits = make_splits(dataset, val_split=args.val_split, train_subset=args.train_subset, seed=args.seed)
    space = build_space(args.max_epochs)
    meta = StudyMeta(dataset.source, space_signature(space), args.image_size, args.val_split, args.train_subset)
    existing_trials = 0
    try:
        probe = optuna.load_study(study_name=args.study_name, storage=storage)
        existing_trials = len(probe.trials)
    except KeyError:
        pass
    # Resumed studies reseed the sampler past the trials it already made, so random start-up
    # draws do not repeat the first run's parameters.
    sampler = create_sampler(args.sampler, args.seed + existing_trials, space)
    study, is_new = open_study(args.study_name, storage, sampler=sampler,
                               pruner=create_pruner(args.pruner, args.max_epochs), meta=meta, force=args.force)
    finished = count_finished(study)
    to_add = max(0, args.trials - finished)
    print(f"study {args.study_name!r} ({redact(storage_url)}): {finished} finished trials; adding {to_add} "
          f"to reach {args.trials}. data: {dataset.name} train={len(splits.train)} val={len(splits.val)}"
          f"{' (test set)' if splits.val_is_test else ''} test={len(splits.test)} {dataset.channels}x"
          f"{dataset.image_size[0]}x{dataset.image_size[1]}")
    if to_add == 0:
        return 0
    if is_new and not args.no_baseline:
        study.enqueue_trial(params_for_config(preset_config(args.preset, args.max_epochs), space))
    settings = TrialSettings(device=args.device, precision=args.precision, seed=args.seed,
                             grid_only=args.sampler == "grid", progress=not args.quiet)
    store = open_store(Path(args.artifacts) if args.artifacts else artifact_dir(storage_url, args.study_name))
    objective = Objective(splits, space, settings, on_model=CheckpointSink(store, storage, args.keep_models, dataset))
    guard = FailureGuard()
    study.optimize(
        objective, timeout=args.timeout, catch=(Exception,), gc_after_trial=True,
        callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=FINISHED), guard,
                   lambda s, t: print(trial_line(t), flush=True)],
    )
    print_summary(study)
    if guard.tripped:
        print(f"error: {guard.limit} trials in a row failed; the last reason: "
              f"{study.trials[-1].user_attrs.get(Attr.FAIL_REASON, 'see above')}", file=sys.stderr)
        return 1
    return 0


def print_summary(study: optuna.Study) -> None:
    states = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    print("trials by state: " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        print("no completed trial yet")
        return
    best = study.best_trial
    print(f"best trial {best.number}: val_acc={best.value:.4f} test_acc={best.user_attrs.get(Attr.TEST_ACC, float('nan')):.4f}")
    for key, value in best.params.items():
        print(f"  {key} = {value}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
