"""`python -m bench.compare`: which search should I use for this space and budget? Arms compared with paired repeats.

Every arm (a sampler, optionally with a pruner: tpe, random+median, cmaes+hyperband ...) runs R repeats, each an
ordinary Optuna study in one storage (optuna-dashboard compares them side by side). Repeat r uses the same sampler
seed, trial seeds and data split in every arm, so the arms differ only by how they search (paired). The budget is
training epochs consumed, pruned epochs included (a pruner's savings buy more trials); trials and seconds are
recorded beside it. `--replay TABLE` answers trials from a recorded table (bench.record) instead of training: a
4-arm, 10-repeat comparison then takes seconds. `python -m bench.report --compare NAME` turns it into curves,
ranks and tests.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.cli import (
    INTERRUPTED_EXIT,
    add_data_args,
    load_data_args,
    pack_size,
    positive_int,
    raise_interrupt,
    record_budget,
    resolve_pack,
    study_meta,
    trial_line,
)
from bench.errors import UsageError, redact, run_cli
from bench.hardware import resolve_device
from bench.locks import RunLock, storage_file
from bench.objective import TrialSettings, TrialTrainer
from bench.replay import ReplayTrainer, load_table
from bench.runner import FailureGuard, run_packs
from bench.samplers import PRUNERS, SAMPLERS, create_pruner, create_sampler
from bench.schema import Attr, StudyAttr, trial_stopped_from_outside
from bench.space import fixed_budget_space
from bench.storage import compare_storage, fail_orphans, open_storage, open_study, requeue_stopped, stopped_without_rerun

COMPARABLE_SAMPLERS = tuple(s for s in SAMPLERS if s != "grid")  # a grid is a design, not a search to rank
REPEAT_SEED_STRIDE = 10_000  # trial seeds of repeat r: seed + r * stride + trial number (distinct across repeats)


@dataclass(frozen=True)
class Arm:
    sampler: str
    pruner: str = "none"

    @property
    def name(self) -> str:
        return self.sampler if self.pruner == "none" else f"{self.sampler}+{self.pruner}"


def parse_arms(text: str) -> list[Arm]:
    arms = []
    for part in (p.strip() for p in text.split(",")):
        sampler, _, pruner = part.partition("+")
        if sampler not in COMPARABLE_SAMPLERS or (pruner and pruner not in PRUNERS):
            raise UsageError(f"--arms: {part!r} is not an arm; write SAMPLER[+PRUNER] with a sampler from "
                             f"{', '.join(COMPARABLE_SAMPLERS)} and a pruner from {', '.join(PRUNERS)} (e.g. tpe+median)")
        arms.append(Arm(sampler, pruner or "none"))
    if len({a.name for a in arms}) != len(arms):
        raise UsageError(f"--arms {text!r} names an arm twice; list each once")
    return arms


def default_evaluations(dimensions: int) -> int:
    """CARP-S's budget for a d-dimensional space: ceil(20 + 40 sqrt(d)) full-budget evaluations."""
    return math.ceil(20 + 40 * math.sqrt(dimensions))


def study_name(name: str, arm: Arm, repeat: int) -> str:
    return f"{name}.{arm.name}.r{repeat}"


def epochs_consumed(study: optuna.Study) -> int:
    """Training epochs the study's trials used: finished ones as recorded, running ones as reported so far; not those
    stopped from outside (interrupted, orphaned): the search did not choose to stop them, and they run again."""
    total = 0
    for t in study.get_trials(deepcopy=False):
        if trial_stopped_from_outside(t):
            continue
        run = t.user_attrs.get(Attr.EPOCHS_RUN)
        total += int(run) if run is not None and t.state != TrialState.RUNNING else len(t.intermediate_values)
    return total


def waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def settled(study: optuna.Study, budget: int) -> bool:
    """Nothing left to run: the budget is spent, and no trial waits, runs (perhaps an orphan), or was stopped from
    outside without its rerun queued."""
    if epochs_consumed(study) >= budget and not waiting(study) and not stopped_without_rerun(study):
        return not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("comparison")
    g.add_argument("--name", default="compare", help="the comparison: its studies are NAME.ARM.rREPEAT (default: compare)")
    g.add_argument("--storage", default=None, help="journal:///PATH or any SQLAlchemy URL (default: journal:///studies/compare-NAME.journal)")
    g.add_argument("--arms", default="tpe,random", help="comma-separated SAMPLER[+PRUNER] (default: tpe,random)")
    g.add_argument("--repeats", type=positive_int, default=10, help="paired repeats of every arm (default: 10)")
    g.add_argument("--trials", type=positive_int, default=None,
                   help="the budget as N full-budget trials (N x --max-epochs training epochs; default: "
                        "ceil(20 + 40 sqrt(d)) for the space's d knobs)")
    g.add_argument("--budget-epochs", type=positive_int, default=None, help="the budget in training epochs (overrides --trials)")
    g.add_argument("--max-epochs", type=positive_int, default=30,
                   help="epochs of a full-budget trial (live runs: fixed, not searched; early stopping off) (default: 30)")
    g.add_argument("--replay", default=None, metavar="TABLE",
                   help="answer trials from a recorded table (bench.record) instead of training")
    g.add_argument("--pack", type=pack_size, default="auto", help="trials trained at once (live runs; default: auto)")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    add_data_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arms = parse_arms(args.arms)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_url = args.storage or compare_storage(args.name)
    if args.replay:
        table = load_table(Path(args.replay))
        space = table.space
        max_epochs = table.epochs
        meta = table.study_meta()
        train_images = table.train_images
        replay = f"{args.replay} ({table.fingerprint})"
        device = resolve_device("cpu")
    else:
        space = fixed_budget_space(args.max_epochs)
        max_epochs = args.max_epochs
        dataset, splits = load_data_args(args)
        meta = study_meta(args, dataset, space)
        train_images = len(splits.train)
        replay = None
        device = resolve_device(args.device)
    evaluations = args.trials or default_evaluations(sum(not p.distribution.single() for p in space))
    budget = args.budget_epochs or evaluations * max_epochs
    pack = 1 if args.replay else resolve_pack(args.pack, device, budget // max_epochs)  # (full-budget trials)
    storage = open_storage(storage_url)
    print(f"comparison {args.name!r} ({redact(storage_url)}): {len(arms)} arms x {args.repeats} repeats, "
          f"budget {budget} training epochs each ({budget / max_epochs:g} full-budget trials of {max_epochs} epochs)"
          + (f", replayed from {replay}" if replay else f", {train_images:,} train images"), flush=True)
    signal.signal(signal.SIGTERM, raise_interrupt)
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for arm in arms:
            name = study_name(args.name, arm, repeat)
            study, _ = open_study(name, storage, sampler=create_sampler(arm.sampler, args.seed + repeat, space),
                                  pruner=create_pruner(arm.pruner, max_epochs), meta=meta)
            for key, value in ((StudyAttr.COMPARE, args.name), (StudyAttr.ARM, arm.name), (StudyAttr.REPEAT, repeat),
                               (StudyAttr.BUDGET_EPOCHS, budget), (StudyAttr.MAX_EPOCHS, max_epochs),
                               (StudyAttr.TRAIN_IMAGES, train_images)):
                study.set_user_attr(key, value)
            if replay:
                study.set_user_attr(StudyAttr.REPLAY, replay)
            else:
                record_budget(study, splits)
            if settled(study, budget):
                continue
            lock = RunLock(storage_url, name)  # held while this process runs the study (released when it is done)
            if storage_file(storage_url) is not None:
                if not lock.try_acquire():
                    print(f"{name}: another process is running it; skipped (rerun to finish it after that one)", flush=True)
                    continue
                fail_orphans(study, "found running at start")  # nobody else runs it: they are orphans
            # on a server database Optuna's heartbeats fail orphans; either way, the configs the search chose and
            # never saw run again, even where the budget is spent without them
            requeue_stopped(study)
            seed = args.seed + repeat * REPEAT_SEED_STRIDE
            if replay:
                trainer: TrialTrainer = ReplayTrainer(table, space, repeat=repeat, seed=seed)
            else:
                trainer = TrialTrainer(splits, space, TrialSettings(
                    device=args.device, precision=args.precision, seed=seed, progress=not args.quiet,
                    compile_model=args.compile, deterministic=args.deterministic))
            guard = FailureGuard()
            callbacks = [guard]
            if not replay:  # a live trial takes minutes: say each; a replayed study takes a fraction of a second
                callbacks.append(lambda s, t, prefix=f"{arm.name} r{repeat} ": print(prefix + trial_line(t), flush=True))
            # A replayed study runs in memory and is stored at the end in one batch: answering a trial takes
            # microseconds, but its ~25 single-row writes to SQLite took 0.36 s (4 arms x 10 repeats x 30 trials
            # replayed in 7 min 18 s on the 2-core CPU). It is stored whole or not at all, so a rerun redoes it.
            work = study
            if replay and not study.trials:
                work = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize",
                                           sampler=create_sampler(arm.sampler, args.seed + repeat, space),
                                           pruner=create_pruner(arm.pruner, max_epochs))
            try:
                run_packs(work, trainer, budget, pack=pack, callbacks=callbacks, guard=guard,
                          stop=lambda s=work: epochs_consumed(s) >= budget and not waiting(s), say=lambda line: print(line, flush=True))
                if work is not study:
                    study.add_trials(work.get_trials(deepcopy=False))
            except KeyboardInterrupt:
                print("interrupted: the running trials are recorded as failed (interrupted); rerun the same command "
                      "to resume the comparison", file=sys.stderr)
                return INTERRUPTED_EXIT
            finally:
                lock.release()
            print(study_line(arm, repeat, study), flush=True)
            if guard.tripped:
                print(f"error: {guard.limit} trials in a row failed in {name}; the last reason: "
                      f"{study.trials[-1].user_attrs.get(Attr.FAIL_REASON, 'see above')}", file=sys.stderr)
                return 1
    print(f"done in {time.perf_counter() - started:.1f}s; see the comparison with: python -m bench.report --compare "
          f"{args.name}" + (f" --storage {redact(storage_url)}" if args.storage else ""))
    return 0


def study_line(arm: Arm, repeat: int, study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best: FrozenTrial | None = max(complete, key=lambda t: t.value) if complete else None
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                         TrialState.FAIL)}
    text = (f"{arm.name:<18} repeat {repeat:>2}: {len(trials)} trials ({', '.join(f'{v} {k}' for k, v in states.items())}), "
            f"{epochs_consumed(study)} epochs")
    if best is not None:
        text += f", best val {best.value:.4f} (test {best.user_attrs.get(Attr.TEST_ACC, float('nan')):.4f})"
    return text


if __name__ == "__main__":
    sys.exit(run_cli(main))
