"""Studies: storages, sampler and pruner registries, metadata checks, and the run loop."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import get_heartbeat_thread  # ask/tell trials need their own heartbeats
from optuna.trial import FrozenTrial, TrialState

import bench
from bench.errors import UsageError, redact
from bench.locks import TrialGate, storage_file
from bench.objective import Attr, Objective, finished, mark_interrupted, record_interrupted
from bench.packed import SHAPE_FIELDS, shape_signature
from bench.space import Param, grid_search_space
from bench.train import Member

warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats, TPE groups: used on purpose
# run_packs asks trials itself and runs a heartbeat thread for each (get_heartbeat_thread), as optimize does
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDIES_DIR = Path("studies")
MAX_CONSECUTIVE_FAILURES = 3


# --- registries -----------------------------------------------------------------------


def _tpe(seed: int, space: tuple[Param, ...]) -> optuna.samplers.BaseSampler:
    # multivariate + group: conditional parameters are modelled jointly with their parents; constant_liar:
    # trials asked while others run (a pack, other workers) see those as bad results, so a pack is not K
    # copies of one guess
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10, constant_liar=True)


def _grid(seed: int, space: tuple[Param, ...]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GridSampler(grid_search_space(space), seed=seed)


SAMPLERS: dict[str, Callable[[int, tuple[Param, ...]], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda seed, space: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed, space: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "qmc": lambda seed, space: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
    "grid": _grid,
}

PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda max_epochs: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    "hyperband": lambda max_epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs),
    "none": lambda max_epochs: optuna.pruners.NopPruner(),
}


def create_sampler(name: str, seed: int, space: tuple[Param, ...]) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed, space)


def create_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    return PRUNERS[name](max_epochs)


# --- storage --------------------------------------------------------------------------


def default_storage(study_name: str, workers: int = 1) -> str:
    """SQLite for one worker; Optuna's journal file for several (its FAQ: SQLite is not for parallel writers).

    An existing file decides, so a study keeps its storage whatever --workers says next time.
    """
    db, journal = STUDIES_DIR / f"{study_name}.db", STUDIES_DIR / f"{study_name}.journal"
    if journal.exists() or (workers > 1 and not db.exists()):
        return f"journal:///{journal}"
    return f"sqlite:///{db}"


def open_storage(url: str, *, heartbeat: bool = True, heartbeat_seconds: int = 30) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`; bad URLs and unwritable places become UsageErrors.

    `journal:///PATH` is Optuna's journal file storage; anything else is a SQLAlchemy URL.
    """
    shown = redact(url)
    path = storage_file(url)
    if path is not None:
        parent = path.parent if str(path.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create {parent} for the study database ({exc.strerror}); pass --storage with a writable path"
            ) from None
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UsageError(f"{path} is not writable; make {parent} writable or pass --storage sqlite:///OTHER/PATH.db")
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise UsageError(f"--storage {shown!r} is not a database URL; use e.g. sqlite:///studies/NAME.db or postgresql://user:pass@host/db")
    try:
        kwargs: dict[str, Any] = {}
        if heartbeat:
            # a killed worker's trial is failed after the grace period and re-run with its parameters
            kwargs = dict(heartbeat_interval=heartbeat_seconds, grace_period=3 * heartbeat_seconds,
                          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        return _create_rdb(url, kwargs)
    except Exception as exc:
        message = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UsageError(f"cannot open storage {shown}: {message}; check the URL, the server and the credentials") from None


# Two processes opening one new database race in Optuna's schema creation ("table ... already exists",
# "UNIQUE constraint failed: alembic_version"; 3 of 8 paired opens of a new SQLite file failed here).
# The loser finds the schema complete a moment later, so it opens again.
_SCHEMA_RACE = ("already exists", "UNIQUE constraint failed: alembic_version", "duplicate key value")


def _create_rdb(url: str, kwargs: dict[str, Any], attempts: int = 3) -> optuna.storages.RDBStorage:
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not any(s in str(exc) for s in _SCHEMA_RACE):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # wait for writers instead of 'database is locked'
    return {"pool_pre_ping": True}


# --- study metadata ---------------------------------------------------------------------


def space_signature(space: Iterable[Param]) -> str:
    desc = [(p.name, repr(p.distribution), p.when) for p in space]
    return hashlib.sha256(json.dumps(desc, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StudyMeta:
    dataset: str
    space: str
    image_size: int
    val_split: float
    train_subset: int | None

    def as_attrs(self) -> dict[str, Any]:
        return {f"bench.{k}": v for k, v in self.__dict__.items()} | {"bench.version": bench.__version__}


def open_study(name: str, storage: optuna.storages.BaseStorage, *, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner, meta: StudyMeta, force: bool = False) -> tuple[optuna.Study, bool]:
    """Create or resume `name`; refuses a study made with another dataset or space unless `force`."""
    existing = name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    if existing:
        stored = study.user_attrs
        for key, value in meta.as_attrs().items():
            if key in ("bench.version",) or key not in stored or stored[key] == value:
                continue
            if not force:
                raise UsageError(
                    f"study {name!r} was made with {key.removeprefix('bench.')}={stored[key]!r}, not {value!r}; "
                    "use another --study-name, or --force to add to it anyway"
                )
    else:
        for key, value in meta.as_attrs().items():
            study.set_user_attr(key, value)
    return study, not existing


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class FailureGuard:
    """Stops the study when trials keep failing with nothing finishing (a broken set-up, not bad luck)."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_FAILURES):
        self.limit = limit
        self.failures = 0
        self.tripped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= self.limit:
            self.tripped = True
            with contextlib.suppress(RuntimeError):  # outside study.optimize (run_packs) the runner checks `tripped`
                study.stop()


def fail_orphans(study: optuna.Study, reason: str, *, requeue: bool = True) -> list[int]:
    """Fail trials left RUNNING by a dead process and (with `requeue`) enqueue each again with the same parameters.
    A designed matrix does not requeue: it reruns its own cells (bench.matrix.pending) and nothing else."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if requeue:
            keep = {k: v for k, v in t.user_attrs.items() if k in (Attr.CELL, Attr.SEED)}
            study.enqueue_trial(t.params, user_attrs=keep | {"retry_of": t.number})
        failed.append(t.number)
    if failed:
        print(f"trials {failed} were left running by a process that died ({reason}); failed them"
              + (" and queued their parameters again" if requeue else ""))
    return failed


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], target: int | None, *,
               gate: TrialGate, timeout: float | None = None,
               callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
               guard: FailureGuard | None = None, max_trials: int | None = None) -> None:
    """Run trials until the study holds `target` finished ones (exactly, across workers) or time is up.

    With `target=None`, run only the enqueued (WAITING) trials, never a sampled one: the designed matrix.
    `max_trials`: this call runs at most that many. The check and the trial's creation happen under `gate`, so
    concurrent processes never overshoot."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ran = 0

    def gated(trial: optuna.Trial) -> float:
        gate.release()  # the trial now exists in storage: other workers may count it
        return objective(trial)

    callbacks = list(callbacks)
    while (deadline is None or time.monotonic() < deadline) and (max_trials is None or ran < max_trials):
        ran += 1
        gate.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # heartbeats (RDB): a killed worker's trial fails and is retried
            if target is None:
                if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                    return
            elif len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))) >= target:
                return
            study.optimize(gated, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=True)
        finally:
            gate.release()
        if guard is not None and guard.tripped:
            return


# --- packs: many trials trained at once --------------------------------------------------


@dataclass
class PackStats:
    """What the pack runner did: members per pack against the slots it asked for."""

    members: list[int] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)

    @property
    def occupancy(self) -> float:
        return sum(self.members) / max(1, sum(self.slots))


def ask_pack(study: optuna.Study, objective: Objective, size: int, *, pack_aware: bool,
             asked: list[optuna.Trial]) -> list[tuple[optuna.Trial, Member]]:
    """Ask `size` trials for one pack. The first samples everything; with `pack_aware`, each next one is asked
    with the first's shape parameters fixed (an enqueued partial trial, which Optuna completes by sampling the
    rest), so the pack fills with one shape signature. Trials already waiting (the baseline, retries) come first.
    Every trial created is appended to `asked` at once, so an interrupted caller can tell it."""
    pairs: list[tuple[optuna.Trial, Member]] = []
    shape: dict[str, Any] = {}
    while len(pairs) < size:
        if pairs and pack_aware and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.enqueue_trial(shape, skip_if_exists=False)
        trial = study.ask()
        asked.append(trial)
        pairs.append((trial, objective.member(trial)))
        shape = shape or {name: getattr(pairs[0][1].cfg, name) for name in SHAPE_FIELDS}
    return pairs


def _train_group(objective: Objective, group: list[tuple[optuna.Trial, Member]], say: Callable[[str], None]) -> int:
    """Train one pack; on out of memory halve it and retry the members that had not finished. Returns the size
    that fit (the runner asks smaller packs from then on)."""
    members = [m for _, m in group]
    try:
        objective.train(members)
        return len(group)
    except torch.OutOfMemoryError as exc:
        if len(group) == 1:
            objective.out_of_memory(members, exc)
            return 1
        half = len(group) // 2
        say(f"out of memory with a pack of {len(group)}: halving it to {half} and retrying its unfinished members")
        retry = [(t, m) for t, m in group if not finished(m)]
        for i, (trial, member) in enumerate(retry):
            objective.rebuild(member)
            trial.set_user_attr(Attr.PACK_SIZE, half)
            trial.set_user_attr(Attr.PACK_SLOT, i % half)
        sizes = [_train_group(objective, retry[i:i + half], say) for i in range(0, len(retry), half)]
        return min(sizes, default=half)


def run_packs(study: optuna.Study, objective: Objective, target: int, *, pack: int, gate: TrialGate,
              timeout: float | None = None, callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
              guard: FailureGuard | None = None, pack_aware: bool = True, enqueued_only: bool = False,
              say: Callable[[str], None] = print) -> PackStats:
    """Like run_trials, but K trials at a time: ask under the gate (the exact budget holds across workers), group
    by shape signature, train each group as one pack, tell every trial. Interrupted: every trial is told.
    `enqueued_only`: take only WAITING trials, never sample one (the designed matrix)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    stats = PackStats()
    callbacks = list(callbacks)
    while deadline is None or time.monotonic() < deadline:
        created: list[optuna.Trial] = []
        groups: dict[tuple, list[tuple[optuna.Trial, Member]]] = {}
        told: set[int] = set()
        try:
            with gate:
                optuna.storages.fail_stale_trials(study)
                busy = len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
                size = min(pack, target - busy)
                if enqueued_only:
                    size = min(size, len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
                if size <= 0:
                    return stats
                asked = ask_pack(study, objective, size, pack_aware=pack_aware, asked=created)
            for trial, member in asked:
                groups.setdefault(shape_signature(member.cfg), []).append((trial, member))
            with contextlib.ExitStack() as beats:  # ask/tell runs no heartbeat of its own: one per member
                for trial, _ in asked:
                    beats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
                for group in groups.values():
                    for slot, (trial, _) in enumerate(group):
                        trial.set_user_attr(Attr.PACK_SIZE, len(group))
                        trial.set_user_attr(Attr.PACK_SLOT, slot)
                    stats.members.append(len(group))
                    stats.slots.append(size)
                    pack = min(pack, _train_group(objective, group, say))
                    _tell(study, objective, group, callbacks, told)
        except KeyboardInterrupt:
            for group in groups.values():
                mark_interrupted([m for _, m in group])
                _tell(study, objective, group, callbacks, told)
            for trial in created:  # interrupted while being asked: no member yet
                if trial.number not in told:
                    record_interrupted(trial)
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            gc.collect()
        if guard is not None and guard.tripped:
            return stats
    return stats


def _tell(study: optuna.Study, objective: Objective, group: list[tuple[optuna.Trial, Member]],
          callbacks: list[Callable[[optuna.Study, FrozenTrial], None]], told: set[int]) -> None:
    for trial, member in group:
        if trial.number in told:
            continue
        state, value = objective.conclude(trial, member)
        frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
        told.add(trial.number)
        for callback in callbacks:
            callback(study, frozen)
