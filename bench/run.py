"""`python -m bench.run`: search TinyCNN variants into a resumable Optuna study."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from bench.checkpoint import KEEP_POLICIES, CheckpointSink, artifact_dir, open_store
from bench.data import DATASETS, Dataset, Splits, load_dataset, make_splits
from bench.errors import UsageError, redact, run_cli
from bench.locks import RunLock, TrialGate
from bench.objective import Attr, DataAttr, Objective, TrialSettings
from bench.space import PRESETS, Param, build_space, params_for_config, preset_config
from bench.stats import NOISY_HALF_WIDTH_POINTS, binomial_half_width
from bench.study import (
    PRUNERS,
    SAMPLERS,
    FailureGuard,
    StudyMeta,
    count_finished,
    create_pruner,
    create_sampler,
    default_storage,
    fail_orphans,
    open_storage,
    open_study,
    run_packs,
    space_signature,
)
from bench.train import PRECISIONS, resolve_device

INTERRUPTED_EXIT = 130
# --pack auto on CUDA. The H100 prototype of this packing trained 39k member-images/s at K=1, 250k at 8,
# 474k at 32 and 498k at 64: 32 is within 5% of the best and fills its packs from fewer trials. On CPU packing
# is no faster (bench.perf --pack 1,4 on the 2-core EPYC: see the README), so auto is 1 there.
AUTO_PACK_CUDA = 32


def pack_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def resolve_pack(pack: int | str, device: torch.device) -> int:
    return (AUTO_PACK_CUDA if device.type == "cuda" else 1) if pack == "auto" else int(pack)


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
    g.add_argument("--compile", action="store_true", help="torch.compile each model (compiled once per trial; off by default)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA algorithms: two runs of one seed agree exactly (CPU runs always do); "
                        "bench.perf --deterministic prints what it costs")


def load_data_args(args: argparse.Namespace) -> tuple[Dataset, Splits]:
    """The dataset and its seeded splits, as the shared data options (add_data_args) describe them."""
    dataset = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, cache_dir=args.cache_dir)
    return dataset, make_splits(dataset, val_split=args.val_split, train_subset=args.train_subset, seed=args.seed)


def val_noise_note(splits: Splits) -> str:
    """A warning when one accuracy on the validation split is too noisy to compare trials by ('' otherwise)."""
    n = len(splits.val)
    half = binomial_half_width(n) * 100
    if half <= NOISY_HALF_WIDTH_POINTS:
        return ""
    return (f"note: one accuracy on the {n} validation images is +-{half:.1f} points (95%, binomial), so the best trial "
            "is picked on noise; use a larger --val-split, or bench.matrix (seeded repeats) to compare settings")


def record_budget(study: optuna.Study, splits: Splits) -> None:
    """The study's real budget and what its data is, for the report: images per split, whether validation used the
    test set, and the data's classes, image shape and full train size (claims are checked against these)."""
    ds = splits.dataset
    for key, value in (("bench.train_images", len(splits.train)), ("bench.val_images", len(splits.val)),
                       ("bench.val_is_test", splits.val_is_test), (DataAttr.CLASSES, list(ds.classes)),
                       (DataAttr.CHANNELS, ds.channels), (DataAttr.IMAGE_SIZE, list(ds.image_size)),
                       (DataAttr.TRAIN_IMAGES, len(ds.train))):
        study.set_user_attr(key, value)


def study_meta(args: argparse.Namespace, dataset: Dataset, space: tuple[Param, ...]) -> StudyMeta:
    """What a study must keep across runs: refused on mismatch unless --force."""
    return StudyMeta(dataset.source, space_signature(space), args.image_size, args.val_split, args.train_subset)


def add_study_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("study")
    g.add_argument("--study-name", default="bench", help="study to create or resume (default: bench)")
    g.add_argument("--storage", default=None,
                   help="any SQLAlchemy URL (postgresql://user:pass@host/db for many machines) or journal:///PATH "
                        "(default: sqlite:///studies/<study-name>.db)")


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
    g.add_argument("--pack", type=pack_size, default="auto",
                   help=f"trials trained at once, one packed network per shape signature: K, or auto ({AUTO_PACK_CUDA} "
                        "on CUDA, 1 on CPU) (default: auto)")
    g.add_argument("--pack-per-shape", type=positive_int, default=None, metavar="N",
                   help="members one sampled architecture may bring into a pack, itself included (default: trials / 25, "
                        "at least 1: a 50-trial study explores as many shapes packed as solo; see README 'Packs')")
    g = parser.add_argument_group("parallel runs")
    g.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine sharing the study (default: 1); with more than one, the "
                        "default storage is the journal file studies/<study-name>.journal")
    g.add_argument("--devices", default=None, help="comma-separated devices, one per worker in turn (cuda:0,cuda:1)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's choice; "
                                                         "--workers splits the cores)")
    g.add_argument("--heartbeat", type=int, default=30,
                   help="seconds between trial heartbeats on database storages; a trial silent for 3 beats is failed "
                        "and retried (default: 30)")
    g.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.deterministic:  # cuBLAS reads it when CUDA starts; children (workers) inherit it
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.trials < 1:
        raise UsageError(f"--trials must be 1 or more, got {args.trials}")
    if args.workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {args.workers}")
    for device in (args.devices or args.device).split(","):
        if resolve_pack(args.pack, resolve_device(device)) > 1 and args.precision == "fp16":
            raise UsageError("--precision fp16 cannot train a pack (one loss scale for all members couples them); "
                             "use --precision bf16 or fp32, or --pack 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    storage_url = args.storage or default_storage(args.study_name, args.workers)
    dataset, splits = load_data_args(args)
    storage = open_storage(storage_url, heartbeat_seconds=args.heartbeat)
    space = build_space(args.max_epochs)
    meta = study_meta(args, dataset, space)
    existing_trials = 0
    try:
        existing_trials = len(optuna.load_study(study_name=args.study_name, storage=storage).trials)
    except KeyError:
        pass
    # Reseed past the trials the study already holds (and per worker), so random start-up
    # draws never repeat earlier parameters.
    sampler = create_sampler(args.sampler, args.seed + existing_trials + 1000 * (args.worker_id or 0), space)
    study, is_new = open_study(args.study_name, storage, sampler=sampler,
                               pruner=create_pruner(args.pruner, args.max_epochs), meta=meta, force=args.force)
    run_lock = RunLock(storage_url, args.study_name)
    if args.worker_id is None:  # the coordinating process
        if run_lock.try_acquire():  # nobody else runs this file storage: RUNNING trials are orphans
            fail_orphans(study, "found running at start")
        finished = count_finished(study)
        to_add = max(0, args.trials - finished)
        print(f"study {args.study_name!r} ({redact(storage_url)}): {finished} finished trials; adding {to_add} "
              f"to reach {args.trials}. data: {dataset.name} train={len(splits.train)} val={len(splits.val)}"
              f"{' (test set)' if splits.val_is_test else ''} test={len(splits.test)} {dataset.channels}x"
              f"{dataset.image_size[0]}x{dataset.image_size[1]}", flush=True)
        if note := val_noise_note(splits):
            print(note, flush=True)
        if splits.val_is_test:
            print("note: --val-split 0 selects, prunes and early-stops on the test set, so its test accuracy is "
                  "optimistic; the report says so", flush=True)
        record_budget(study, splits)
        study.set_user_attr("bench.max_epochs", args.max_epochs)
        if to_add == 0:
            return 0
        if is_new and not args.no_baseline:
            study.enqueue_trial(params_for_config(preset_config(args.preset, args.max_epochs), space))
        if args.workers > 1:
            return spawn_workers(argv, args, storage_url, study)
    settings = TrialSettings(device=args.device, precision=args.precision, seed=args.seed,
                             grid_only=args.sampler == "grid", progress=not args.quiet, compile_model=args.compile,
                             deterministic=args.deterministic)
    store = open_store(Path(args.artifacts) if args.artifacts else artifact_dir(storage_url, args.study_name))
    objective = Objective(splits, space, settings, on_model=CheckpointSink(store, storage, args.keep_models, dataset))
    guard = FailureGuard()
    prefix = "" if args.worker_id is None else f"[worker {args.worker_id}] "
    signal.signal(signal.SIGTERM, raise_interrupt)
    pack = resolve_pack(args.pack, objective.device)
    callbacks = [guard, lambda s, t: print(prefix + trial_line(t), flush=True)]
    gate = TrialGate(storage_url, args.study_name)
    try:
        if pack > 1:
            print(f"{prefix}training up to {pack} trials at once in packs (one packed network per shape)", flush=True)
        stats = run_packs(study, objective, args.trials, pack=pack, gate=gate, timeout=args.timeout,
                          callbacks=callbacks, guard=guard, per_shape=args.pack_per_shape,
                          say=lambda line: print(prefix + line, flush=True))
    except KeyboardInterrupt:
        print(f"{prefix}interrupted: the running trial is recorded as failed (interrupted); rerun the same "
              "command to resume", file=sys.stderr)
        if args.worker_id is None:
            print_summary(study)
        return INTERRUPTED_EXIT
    if pack > 1 and stats.members:
        print(f"{prefix}{stats.summary()} (packs of up to {pack})", flush=True)
    if args.worker_id is None:
        print_summary(study)
    if guard.tripped:
        print(f"error: {prefix}{guard.limit} trials in a row failed; the last reason: "
              f"{study.trials[-1].user_attrs.get(Attr.FAIL_REASON, 'see above')}", file=sys.stderr)
        return 1
    return 0


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def spawn_workers(argv: list[str], args: argparse.Namespace, storage_url: str, study: optuna.Study) -> int:
    """Run `args.workers` processes of this command on one study; one device each when --devices is given."""
    devices = args.devices.split(",") if args.devices else [args.device]
    on_cpu = all(resolve_device(d).type == "cpu" for d in devices)  # also rejects unknown devices up front
    threads = max(1, (os.cpu_count() or 1) // args.workers) if on_cpu else 0
    procs = []
    for i in range(args.workers):
        device = devices[i % len(devices)]
        extra = ["--workers", "1", "--worker-id", str(i), "--device", device, "--storage", storage_url,
                 "--no-baseline", "--quiet", *(["--threads", str(threads)] if threads else [])]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.run", *argv, *extra], env=env))
        print(f"worker {i}: pid {procs[-1].pid}, device {device}" + (f", {threads} CPU threads" if threads else ""),
              flush=True)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        print("interrupted: running trials are recorded as failed (interrupted); rerun the same command to resume",
              file=sys.stderr)
        print_summary(study)
        return INTERRUPTED_EXIT
    print_summary(study)
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        print(f"error: workers {failed} exited with status {[codes[i] for i in failed]}; rerun to finish the study",
              file=sys.stderr)
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
