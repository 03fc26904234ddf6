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

from bench.checkpoint import KEEP_POLICIES, CheckpointSink, artifact_dir, open_store
from bench.cli import (
    AUTO_PACK_CUDA,
    AUTO_PACK_TRIALS_PER_MEMBER,
    INTERRUPTED_EXIT,
    add_data_args,
    add_study_args,
    load_data_args,
    pack_size,
    positive_int,
    print_summary,
    raise_interrupt,
    record_budget,
    resolve_pack,
    study_meta,
    trial_line,
    val_noise_note,
)
from bench.errors import UsageError, redact, run_cli
from bench.hardware import resolve_device
from bench.locks import RunLock, TrialGate
from bench.objective import TrialSettings, TrialTrainer
from bench.replay import ReplayTrainer, load_table
from bench.runner import FailureGuard, run_packs
from bench.samplers import PRUNERS, SAMPLERS, create_pruner, create_sampler
from bench.schema import Attr, StudyAttr
from bench.space import PRESETS, build_space, params_for_config, preset_config
from bench.storage import count_finished, default_storage, fail_orphans, open_storage, open_study, requeue_stopped


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
    g.add_argument("--replay", default=None, metavar="TABLE",
                   help="answer trials from a recorded table (bench.record) instead of training: no data is loaded, "
                        "the space and the epochs are the table's (--max-epochs does not apply)")
    g.add_argument("--pack", type=pack_size, default="auto",
                   help=f"trials trained at once, one packed network per shape signature: K, or auto (1 on CPU; on CUDA a "
                        f"power of two up to {AUTO_PACK_CUDA} leaving {AUTO_PACK_TRIALS_PER_MEMBER} trials per member "
                        "across --workers: 8 for 50 trials) (default: auto)")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.deterministic:  # cuBLAS reads it when CUDA starts; children (workers) inherit it
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.trials < 1:
        raise UsageError(f"--trials must be 1 or more, got {args.trials}")
    if args.workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {args.workers}")
    table = load_table(Path(args.replay)) if args.replay else None
    if table is not None and args.workers > 1:
        raise UsageError("--replay answers a trial in milliseconds: run it with one worker (drop --workers)")
    for device in [] if table is not None else (args.devices or args.device).split(","):
        if worker_pack(args, device) > 1 and args.precision == "fp16":
            raise UsageError("--precision fp16 cannot train a pack (one loss scale for all members couples them); "
                             "use --precision bf16 or fp32, or --pack 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    storage_url = args.storage or default_storage(args.study_name, args.workers)
    replay = None if table is None else f"{args.replay} ({table.fingerprint})"
    if table is None:
        dataset, splits = load_data_args(args)
        space, max_epochs = build_space(args.max_epochs), args.max_epochs
        meta = study_meta(args, dataset, space)
    else:  # the table's space (its fixed knobs left out) and epochs; its data's identity, never its images
        space, max_epochs, meta = table.space, table.epochs, table.study_meta()
    storage = open_storage(storage_url, heartbeat_seconds=args.heartbeat)
    # one seed for every process: the samplers reseed per trial number (bench.samplers), so a resumed study or a
    # second worker goes on with new draws instead of repeating the first ones
    sampler = create_sampler(args.sampler, args.seed, space)
    study, is_new = open_study(args.study_name, storage, sampler=sampler,
                               pruner=create_pruner(args.pruner, max_epochs), meta=meta, force=args.force)
    run_lock = RunLock(storage_url, args.study_name)
    gate = TrialGate(storage_url, args.study_name)
    if args.worker_id is None:  # the coordinating process
        if run_lock.try_acquire():  # nobody else runs this file storage: RUNNING trials are orphans
            fail_orphans(study, "found running at start")
        finished = count_finished(study)
        to_add = max(0, args.trials - finished)
        if to_add and not is_new:
            with gate:  # once across every process on the study: a trial stopped from outside (interrupted, or an
                requeue_stopped(study, limit=to_add)  # orphan failed above) runs again, within the budget
        head = f"study {args.study_name!r} ({redact(storage_url)}): {finished} finished trials; adding {to_add} to reach {args.trials}. "
        if table is not None:
            print(head + f"replayed from {replay}: {table.describe()}, {table.train_images} train images "
                  f"(nothing trains)", flush=True)
            for key, value in table.budget_attrs().items():
                study.set_user_attr(key, value)
            study.set_user_attr(StudyAttr.REPLAY, replay)
        else:
            print(head + f"data: {dataset.name} train={len(splits.train)} val={len(splits.val)}"
                  f"{' (test set)' if splits.val_is_test else ''} test={len(splits.test)} {dataset.channels}x"
                  f"{dataset.image_size[0]}x{dataset.image_size[1]}", flush=True)
            if note := val_noise_note(splits):
                print(note, flush=True)
            if splits.val_is_test:
                print("note: --val-split 0 selects, prunes and early-stops on the test set, so its test accuracy is "
                      "optimistic; the report says so", flush=True)
            record_budget(study, splits)
        study.set_user_attr(StudyAttr.MAX_EPOCHS, max_epochs)
        if to_add == 0:
            return 0
        if is_new and not args.no_baseline:
            study.enqueue_trial(params_for_config(preset_config(args.preset, max_epochs), space))
        if args.workers > 1:
            return spawn_workers(argv, args, storage_url, study)
    settings = TrialSettings(device=args.device, precision=args.precision, seed=args.seed,
                             grid_only=args.sampler == "grid", progress=not args.quiet, compile_model=args.compile,
                             deterministic=args.deterministic)
    trainer: TrialTrainer
    if table is not None:  # the --seed picks the recorded seed of each config too (bench.replay.seed_column)
        trainer = ReplayTrainer(table, space, repeat=args.seed, seed=args.seed, grid_only=settings.grid_only)
    else:
        store = open_store(Path(args.artifacts) if args.artifacts else artifact_dir(storage_url, args.study_name))
        trainer = TrialTrainer(splits, space, settings, on_model=CheckpointSink(store, storage, args.keep_models, dataset))
    guard = FailureGuard()
    prefix = "" if args.worker_id is None else f"[worker {args.worker_id}] "
    signal.signal(signal.SIGTERM, raise_interrupt)
    pack = resolve_pack(args.pack, trainer.device, args.trials)
    callbacks = [guard, lambda s, t: print(prefix + trial_line(t), flush=True)]
    try:
        if pack > 1:
            why = (f"; auto: a member per {AUTO_PACK_TRIALS_PER_MEMBER} trials, at most {AUTO_PACK_CUDA}"
                   if args.pack == "auto" else "")
            print(f"{prefix}training up to {pack} trials at once in packs (one packed network per shape{why})",
                  flush=True)
        stats = run_packs(study, trainer, args.trials, pack=pack, gate=gate, timeout=args.timeout,
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
        if replay is not None:
            print(f"replayed from {replay}: every trial was answered from the recorded table, nothing trained")
    if guard.tripped:
        print(f"error: {prefix}{guard.limit} trials in a row failed; the last reason: "
              f"{study.trials[-1].user_attrs.get(Attr.FAIL_REASON, 'see above')}", file=sys.stderr)
        return 1
    return 0


def worker_pack(args: argparse.Namespace, device: str) -> int:
    """The pack one of `args.workers` workers trains on `device`. auto leaves its trials per member across all the
    workers' packs: trials / workers for each (a worker alone would size its pack by the whole study)."""
    return resolve_pack(args.pack, resolve_device(device), args.trials // args.workers)


def spawn_workers(argv: list[str], args: argparse.Namespace, storage_url: str, study: optuna.Study) -> int:
    """Run `args.workers` processes of this command on one study; one device each when --devices is given."""
    devices = args.devices.split(",") if args.devices else [args.device]
    on_cpu = all(resolve_device(d).type == "cpu" for d in devices)  # also rejects unknown devices up front
    threads = max(1, (os.cpu_count() or 1) // args.workers) if on_cpu else 0
    procs = []
    for i in range(args.workers):
        device = devices[i % len(devices)]
        pack = worker_pack(args, device)
        extra = ["--workers", "1", "--worker-id", str(i), "--device", device, "--storage", storage_url,
                 "--no-baseline", "--quiet", "--pack", str(pack), *(["--threads", str(threads)] if threads else [])]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.run", *argv, *extra], env=env))
        print(f"worker {i}: pid {procs[-1].pid}, device {device}, pack {pack}"
              + (f", {threads} CPU threads" if threads else ""), flush=True)
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
