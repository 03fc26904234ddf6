"""`python -m bench.record`: record a table of N configs x S seeds x E epochs, so searches can be replayed from it.

The configs are a space-filling design over the whole search space (scrambled Sobol by default: a model-based
sampler would cluster them where it found good results, and a table must cover the space a replayed search
explores). Every config trains S times (seeds SEED..SEED+S-1) for exactly E epochs, early stopping off, no pruning,
and every epoch records train loss, validation accuracy, test accuracy and seconds. The runs are fixed trials of an
Optuna study (default sqlite:///studies/record-<TABLE name>.db), so a stopped recording resumes with the same
command: finished runs are kept and only the missing ones train. At the end the table is written to --out (bench.table
describes the format); `python -m bench.compare --replay TABLE` and `python -m bench.run --replay TABLE` answer trials
from it. `--from-study NAME` builds a table from the full curves of an existing study instead of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from bench.cli import (
    INTERRUPTED_EXIT,
    add_data_args,
    duration,
    load_data_args,
    pack_size,
    positive_int,
    raise_interrupt,
    record_budget,
    resolve_pack,
    study_meta,
    trial_line,
)
from bench.data import Splits
from bench.errors import UsageError, redact, run_cli
from bench.hardware import precision_name, resolve_device
from bench.locks import RunLock, TrialGate
from bench.objective import TrialSettings, TrialTrainer
from bench.runner import FailureGuard, run_packs
from bench.schema import Attr, StudyAttr
from bench.space import Param, build_space, config_from_params, fixed_budget_space, suggest
from bench.storage import (
    FINISHED,
    STUDIES_DIR,
    fail_orphans,
    load_existing_study,
    open_storage,
    open_study,
    space_signature,
)
from bench.table import (
    RecordedTable,
    active_params,
    code_version,
    config_key,
    data_fingerprint,
    table_from_study,
    table_space,
)

DESIGNS = ("sobol", "random")
MIN_SEEDS = 2  # one seed carries no training noise: a replayed search would see every config as exact


def design_configs(free: tuple[Param, ...], n: int, kind: str, seed: int) -> list[dict[str, Any]]:
    """`n` distinct configs (their active knobs) drawn through bench.space.suggest from an in-memory study.

    Sobol: Optuna's QMCSampler takes its dimensions from the first finished trial, so a probe trial that suggests
    every knob unconditionally goes first (and is not a design point): every later point is one scrambled Sobol point
    over all knobs, of which each config uses its active ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        sampler: optuna.samplers.BaseSampler = (
            optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)
            if kind == "sobol" else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler, direction="maximize")
    if kind == "sobol":
        probe = study.ask()
        suggest(probe, tuple(dataclasses.replace(p, when=None) for p in free))
        study.tell(probe, 0.0)
    configs: dict[str, dict[str, Any]] = {}
    for _ in range(20 * n + 100):  # a small categorical space may hold fewer than n distinct configs
        if len(configs) >= n:
            break
        trial = study.ask()
        params = suggest(trial, free)
        study.tell(trial, 0.0)
        configs.setdefault(config_key(params), params)
    return list(configs.values())


def content_hash(splits: Splits) -> str:
    """sha256 of the split images and labels: two recordings with one hash trained and tested on the same pixels."""
    h = hashlib.sha256()
    for split in (splits.train, splits.val, splits.test):
        for tensor in (split.images, split.labels):
            h.update(tensor.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def data_meta(splits: Splits) -> dict[str, Any]:
    ds = splits.dataset
    return data_fingerprint({
        "source": ds.source, "train_images": len(splits.train), "val_images": len(splits.val),
        "test_images": len(splits.test), "val_is_test": splits.val_is_test, "classes": list(ds.classes),
        "channels": ds.channels, "image_size": list(ds.image_size), "train_images_total": len(ds.train),
    }, content=content_hash(splits))


def _params(t: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, also while it waits (an enqueued trial holds them as fixed_params)."""
    return dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))


def covered(study: optuna.Study, free: tuple[Param, ...], fixed: dict[str, Any],
            states: tuple[TrialState, ...] = (*FINISHED, TrialState.WAITING, TrialState.RUNNING)) -> set[tuple[str, int]]:
    """(config key, seed) of every run in `states`; by default those that finished, wait or run: what a resumed
    recording does not enqueue. Failed runs are not covered: they train again."""
    done = set()
    for t in study.get_trials(deepcopy=False, states=states):
        if Attr.SEED in t.user_attrs:
            values = dataclasses.asdict(config_from_params(_params(t)))
            done.add((config_key(active_params(values, free, fixed)), int(t.user_attrs[Attr.SEED])))
    return done


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else duration(seconds)  # a tiny recording in seconds


def write_table(table: RecordedTable, out: Path) -> str:
    table.save(out)
    seconds = float(table.meta.get("recording_seconds") or 0.0)
    return (f"wrote {out}: {table.describe()}, {table.size_bytes(out) / 1024:.1f} KiB; recording took "
            f"{_duration(seconds)} of wall time ({table.meta.get('trials', '?')} runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("table")
    g.add_argument("--out", required=True, metavar="TABLE", help="the table directory to write")
    g.add_argument("--configs", type=positive_int, default=64, help="configs in the design (default: 64)")
    g.add_argument("--seeds", type=int, default=3, help=f"seeds per config, at least {MIN_SEEDS} (default: 3)")
    g.add_argument("--epochs", type=positive_int, default=20, help="epochs every run trains (default: 20)")
    g.add_argument("--design", choices=DESIGNS, default="sobol",
                   help="how the configs are drawn: scrambled Sobol (space-filling) or random (default: sobol)")
    g.add_argument("--storage", default=None,
                   help="the recording study's storage (default: sqlite:///studies/record-<TABLE name>.db; with "
                        "--from-study: sqlite:///studies/<NAME>.db)")
    g.add_argument("--pack", type=pack_size, default="auto", help="runs trained at once (default: auto)")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    g.add_argument("--from-study", default=None, metavar="NAME",
                   help="build the table from an existing study's full curves instead of training")
    add_data_args(parser)
    return parser


def study_space(study: optuna.Study) -> tuple[Param, ...]:
    """The space a stored study was made with: the search space (or a recording's) at the epoch cap whose signature
    the study holds."""
    signature = study.user_attrs.get(StudyAttr.PREFIX + "space")
    cap = study.user_attrs.get(StudyAttr.MAX_EPOCHS)
    caps = ([int(cap)] if cap else []) + list(range(1, 201))
    for epochs in caps:
        for make in (build_space, fixed_budget_space):
            space = make(epochs)
            if space_signature(space) == signature:
                return space
    raise UsageError(f"study {study.study_name!r} was made with a search space this bench does not declare (signature "
                     f"{signature}); build its table with the bench version that ran it")


def from_study(args: argparse.Namespace, out: Path) -> int:
    study, _ = load_existing_study(args.from_study, args.storage)
    space = study_space(study)
    table = table_from_study(study, space, meta={"code_version": code_version()})
    print(write_table(table, out))
    if table.shape[1] < MIN_SEEDS:
        print(f"note: some configs have fewer than {MIN_SEEDS} seeds; a replay of those sees no training noise")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    if args.from_study:
        return from_study(args, out)
    if args.seeds < MIN_SEEDS:
        raise UsageError(f"--seeds must be {MIN_SEEDS} or more, got {args.seeds}: one seed carries no training noise, "
                         "so a replayed search would take every recorded run as exact")
    name = f"record-{out.resolve().name}"
    storage_url = args.storage or f"sqlite:///{STUDIES_DIR / f'{name}.db'}"
    space = fixed_budget_space(args.epochs)
    free, fixed = table_space(space, args.epochs)
    rows = design_configs(free, args.configs, args.design, args.seed)
    seeds = list(range(args.seed, args.seed + args.seeds))
    dataset, splits = load_data_args(args)
    storage = open_storage(storage_url)
    study, is_new = open_study(name, storage, sampler=optuna.samplers.RandomSampler(seed=args.seed),
                               pruner=optuna.pruners.NopPruner(), meta=study_meta(args, dataset, space))
    design = f"record {args.design} seed={args.seed}"
    if study.user_attrs.get(StudyAttr.DESIGN, design) != design:
        raise UsageError(f"study {name!r} in {redact(storage_url)} was recorded with {study.user_attrs[StudyAttr.DESIGN]!r}, "
                         f"not {design!r}; use the same --design and --seed, or another --out or --storage")
    study.set_user_attr(StudyAttr.DESIGN, design)
    study.set_user_attr(StudyAttr.MAX_EPOCHS, args.epochs)
    record_budget(study, splits)
    device = resolve_device(args.device)
    pack = resolve_pack(args.pack, device)
    gate = TrialGate(storage_url, name)
    run_lock = RunLock(storage_url, name)
    row_of = {config_key(r): i for i, r in enumerate(rows)}
    with gate:
        if run_lock.try_acquire():  # nobody else records into this study: RUNNING trials are orphans
            fail_orphans(study, "found running at start")
        done = covered(study, free, fixed)
        todo = [(row, seed) for row in range(len(rows)) for seed in seeds if (config_key(rows[row]), seed) not in done]
        for row, seed in todo:  # a config's seeds together: one shape, one sub-pack
            study.enqueue_trial(rows[row] | fixed, user_attrs={Attr.SEED: seed})
    total = len(rows) * len(seeds)
    recorded = covered(study, free, fixed, states=FINISHED)
    already = sum((config_key(r), seed) in recorded for r in rows for seed in seeds)
    print(f"recording {name!r} ({redact(storage_url)}): {len(rows)} configs ({args.design}) x {len(seeds)} seeds x "
          f"{args.epochs} epochs = {total} runs, {already} already there; data {dataset.name} "
          f"train={len(splits.train)} val={len(splits.val)} test={len(splits.test)}", flush=True)
    trainer = TrialTrainer(splits, space, TrialSettings(
        device=args.device, precision=args.precision, seed=args.seed, progress=not args.quiet,
        compile_model=args.compile, deterministic=args.deterministic, test_each_epoch=True))
    guard = FailureGuard()
    finished = [already]

    def report(s: optuna.Study, t: FrozenTrial) -> None:
        values = dataclasses.asdict(config_from_params(t.params))
        row = row_of.get(config_key(active_params(values, free, fixed)), "?")
        finished[0] += t.state in FINISHED
        print(f"config {row:>4} seed {t.user_attrs.get(Attr.SEED)} {trial_line(t)} [{finished[0]}/{total}]", flush=True)

    signal.signal(signal.SIGTERM, raise_interrupt)
    started = time.perf_counter()
    try:
        if already < total:  # runs to enqueue, or queued by an earlier run and not yet trained
            run_packs(study, trainer, None, pack=pack, gate=gate, callbacks=[guard, report], guard=guard,
                      enqueued_only=True, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("interrupted: the running runs are recorded as failed (interrupted); rerun the same command to resume "
              "the recording", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        run_lock.release()
    if guard.tripped:
        print(f"error: {guard.limit} runs in a row failed; the last reason: "
              f"{study.trials[-1].user_attrs.get(Attr.FAIL_REASON, 'see above')}; rerun to retry them", file=sys.stderr)
        return 1
    meta = {"data": data_meta(splits), "code_version": code_version(), "device": str(device),
            "torch_version": torch.__version__, "precision": precision_name(args.precision, device),
            "pack_size": pack, "run_epochs": args.epochs,
            "train_images": len(splits.train), "val_split": args.val_split, "train_subset": args.train_subset,
            "image_size": args.image_size, "storage": redact(storage_url),
            "design": {"kind": args.design, "configs": len(rows), "seeds": seeds, "seed": args.seed}}
    table = table_from_study(study, space, rows=rows, seed_columns=seeds, meta=meta)
    if finished[0] > already:
        print(f"trained {finished[0] - already} runs in {_duration(time.perf_counter() - started)}", flush=True)
    print(write_table(table, out))
    missing = total - int((table.seeds >= 0).sum())
    if missing:
        print(f"note: {missing} of {total} runs failed and are missing from the table (their seed columns are empty); "
              "rerun the same command to retry them", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
