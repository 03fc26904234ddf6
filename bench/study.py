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
from bench.objective import Attr, Objective, finished, mark_interrupted
from bench.packed import SHAPE_FIELDS
from bench.space import Param, grid_search_space
from bench.train import Member, PackLog

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


# --- packs: many trials trained at once --------------------------------------------------


@dataclass
class PackStats:
    """What the runner did, per epoch boundary of every pack: members training against the slots, and sub-packs (one
    per shape signature: the launches of each step). `drained` counts the boundaries after the budget ran out (no
    trial left to ask), where no scheduler could fill a slot."""

    members: list[int] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)
    launches: list[int] = dataclasses.field(default_factory=list)
    signatures: set[tuple] = dataclasses.field(default_factory=set)
    drained: int = 0
    trials: int = 0

    def add(self, log: PackLog) -> None:
        self.members += log.members
        self.launches += log.launches
        self.slots += [log.capacity] * len(log.members)
        self.signatures |= log.signatures
        self.drained += _drained(log.members, log.capacity)

    @property
    def occupancy(self) -> float:
        """Filled slots while trials remained to ask (the final drain, when the budget is spent, left out)."""
        live = len(self.members) - min(self.drained, len(self.members) - 1) if self.members else 0
        return sum(self.members[:live]) / max(1, sum(self.slots[:live]))

    @property
    def overall_occupancy(self) -> float:
        return sum(self.members) / max(1, sum(self.slots))

    @property
    def members_per_launch(self) -> float:
        return sum(self.members) / max(1, sum(self.launches))

    def summary(self) -> str:
        return (f"pack occupancy {self.occupancy:.0%} while trials remained to ask ({self.overall_occupancy:.0%} with the "
                f"final drain), {len(self.signatures)} distinct shapes, {self.members_per_launch:.1f} members per launch, "
                f"{self.trials} trials")


def startup_trials(sampler: optuna.samplers.BaseSampler) -> int | None:
    """How many trials the sampler draws at random before it models the results; None for samplers that never
    model them (random, QMC, grid): their packs take no followers, so every trial stays random in every knob."""
    if isinstance(sampler, optuna.samplers.RandomSampler | optuna.samplers.QMCSampler | optuna.samplers.GridSampler):
        return None
    return int(getattr(sampler, "_n_startup_trials", 0))


def default_per_shape(trials: int, pack: int) -> int:
    """Members one sampled shape may bring into a pack (itself and its followers). Measured with the search
    simulator (bench.perf --simulate-search, 50 trials, TPE + median, 10 paired repeats): see README "Packs"."""
    return max(1, min(pack, trials // 25))


class _Runner:
    """Asks, forms, backfills and tells the trials of one run_packs call (state shared by its callbacks)."""

    def __init__(self, study: optuna.Study, objective: Objective, target: int | None, *, gate: TrialGate,
                 deadline: float | None, callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
                 guard: FailureGuard, per_shape: int, enqueued_only: bool, capacity: int):
        self.study, self.objective, self.target, self.gate = study, objective, target, gate
        self.deadline, self.callbacks, self.guard = deadline, callbacks, guard
        self.per_shape, self.enqueued_only, self.capacity = per_shape, enqueued_only, capacity
        # id(member) -> (trial, member, heartbeat): asked and not yet told. A member waiting for a retry after an out
        # of memory stays here (its heartbeat too, so no other worker takes its trial for dead) and in `retry`.
        self.live: dict[int, tuple[optuna.Trial, Member, contextlib.ExitStack]] = {}
        self.created: list[optuna.Trial] = []  # asked, not yet a member: told FAIL if the run stops there
        self.retry: list[Member] = []
        self.free_slots: list[int] = list(range(capacity))
        self.slot_of: dict[int, int] = {}
        self.stopped = False  # deadline, failure guard, or the sampler asked to stop (a grid is done)
        self.startup = startup_trials(study.sampler)
        self.told = 0

    # -- asking ------------------------------------------------------------------------------

    def ask(self, n: int) -> list[Member]:
        """Up to `n` members for free slots: retries first, then new trials within the budget (under the gate)."""
        members = self.retry[:n]
        self.retry = self.retry[n:]
        for m in members:
            self._take_slot(self.live[id(m)][0], m)
        n -= len(members)
        if n <= 0:
            return members
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = True
        if self.stopped or self.guard.tripped:
            return members
        with self.gate:
            optuna.storages.fail_stale_trials(self.study)  # heartbeats (RDB): a killed worker's trial is retried
            waiting = len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            if self.target is None or self.enqueued_only:
                n = min(n, waiting)
            if self.target is not None:  # failures do not count: a trial that fails frees its place in the budget
                busy = len(self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
                n = min(n, self.target - busy)
            return members + self._form(n)

    def _form(self, size: int) -> list[Member]:
        """`size` trials: waiting ones (a baseline, retries, matrix cells) as they are; then each trial the sampler
        proposes brings up to per_shape - 1 followers, trials asked with its shape parameters fixed (an enqueued
        partial trial, which the sampler completes). While the sampler is still drawing at random (fewer finished
        trials than its start-up count), trials take no followers: they stay random in every knob."""
        members: list[Member] = []
        shape: dict[str, Any] = {}
        followers = 0
        while len(members) < size and not self.guard.tripped:
            waiting = bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            follower = not waiting and followers > 0 and not self.enqueued_only
            if follower:
                self.study.enqueue_trial(shape, skip_if_exists=False)
                followers -= 1
            elif not waiting and self.enqueued_only:
                break
            modelled = self.startup is not None and not follower and not waiting and (
                len(self.study.get_trials(deepcopy=False, states=FINISHED)) >= self.startup)
            trial = self.study.ask()
            self.created.append(trial)
            try:
                member = self.objective.member(trial)
            except Exception as exc:  # a config that cannot be built fails its trial, as optimize(catch=...) did
                self._fail_unbuilt(trial, f"{type(exc).__name__}: {exc}")
                continue
            self.created.remove(trial)
            self._admit(trial, member)
            members.append(member)
            if modelled:
                shape = {name: trial.params[name] for name in SHAPE_FIELDS if name in trial.params}
                followers = self.per_shape - 1
        return members

    def _fail_unbuilt(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(Attr.STOP_REASON, "failed")
        trial.set_user_attr(Attr.FAIL_REASON, reason)
        frozen = self._store(trial, None, TrialState.FAIL)
        self.created.remove(trial)
        for callback in self.callbacks:
            callback(self.study, frozen)

    def _admit(self, trial: optuna.Trial, member: Member) -> None:
        beat = contextlib.ExitStack()  # ask/tell runs no heartbeat of its own: one per member, as optimize would
        beat.enter_context(get_heartbeat_thread(trial._trial_id, self.study._storage))
        self.live[id(member)] = (trial, member, beat)
        self._take_slot(trial, member)

    def _take_slot(self, trial: optuna.Trial, member: Member) -> None:
        slot = self.free_slots.pop(0)
        self.slot_of[id(member)] = slot
        trial.set_user_attr(Attr.PACK_SIZE, self.capacity)
        trial.set_user_attr(Attr.PACK_SLOT, slot)

    # -- telling -----------------------------------------------------------------------------

    def _store(self, trial: optuna.Trial, value: float | None, state: TrialState) -> FrozenTrial:
        try:
            return self.study.tell(trial, value, state=state, skip_if_finished=True)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):
                raise
            # a sampler that is done (GridSampler's last point) calls study.stop(), which only optimize can honour;
            # the trial is stored all the same (Optuna's tell stores it in a finally)
            self.stopped = True
            return self.study._storage.get_trial(trial._trial_id)

    def tell(self, member: Member) -> None:
        """The member left its pack: record it and tell Optuna (its callbacks' errors propagate, as optimize's do)."""
        trial, _, beat = self.live[id(member)]
        try:
            state, value = self.objective.conclude(trial, member)
        except Exception as exc:  # recording the outcome failed (a full disk under the checkpoint): this trial fails
            member.error = exc
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(Attr.STOP_REASON, "failed")
            trial.set_user_attr(Attr.FAIL_REASON, reason)
            state, value = TrialState.FAIL, None
        frozen = self._store(trial, value if state == TrialState.COMPLETE else None, state)
        del self.live[id(member)]
        beat.close()
        if id(member) in self.slot_of:  # (a member waiting for its retry holds no slot)
            self.free_slots.append(self.slot_of.pop(id(member)))
            self.free_slots.sort()
        self.told += 1
        member.model = None  # type: ignore[assignment]  # its weights are stored (checkpoint) or not needed: free them
        for callback in self.callbacks:
            callback(self.study, frozen)

    def tell_all(self, error: Exception | None = None) -> None:
        """Tell every member still live: finished ones with their outcome, the others failed with `error`."""
        for _, member, _ in list(self.live.values()):
            if error is not None and not finished(member):
                member.error = error
            self.retry = [m for m in self.retry if m is not member]
            self.tell(member)

    def out_of_memory(self, message: str, say: Callable[[str], None]) -> None:
        """The pack ran out of memory: members that left keep their outcome; the others start again in packs of half
        the size, or (alone) fail with the message."""
        for _, member, _ in list(self.live.values()):
            if finished(member):
                self.tell(member)
        waiting = {id(m) for m in self.retry}  # from an earlier out of memory, not trained in this pack yet
        unfinished = [m for _, m, _ in self.live.values() if id(m) not in waiting]
        if self.capacity == 1:
            self.objective.out_of_memory(unfinished, message)
            self.tell_all()
            return
        half = self.capacity // 2
        say(f"out of memory with a pack of {self.capacity}: halving it to {half} and retrying its unfinished members")
        for m in unfinished:
            self.objective.rebuild(m)
        self.retry = unfinished + self.retry
        self.capacity = half
        self.free_slots = list(range(half))
        self.slot_of.clear()

    def abort(self, error: BaseException) -> None:
        """The run ends by an exception: every trial it asked is told (interrupted, or failed with the reason)."""
        interrupted = isinstance(error, KeyboardInterrupt)
        if interrupted:
            mark_interrupted([m for _, m, _ in self.live.values()])
            self.tell_all()
        else:
            self.tell_all(RuntimeError(f"the run stopped: {type(error).__name__}: {error}"))
        for trial in list(self.created):  # stopped while being asked: no member yet
            self._fail_unbuilt(trial, "interrupted" if interrupted else f"{type(error).__name__}: {error}")


def run_packs(study: optuna.Study, objective: Objective, target: int | None, *, pack: int, gate: TrialGate,
              timeout: float | None = None, callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
              guard: FailureGuard | None = None, per_shape: int | None = None, enqueued_only: bool = False,
              say: Callable[[str], None] = print) -> PackStats:
    """The one study runner: trials train `pack` at a time (1: solo), until the study holds `target` finished or
    running ones (exactly, across workers: asked under `gate`) or `timeout` seconds have passed (running trials then
    finish). A trial is told the moment it leaves its pack, and its slot is refilled at the next epoch boundary by
    a newly asked trial, so packs stay full under pruning. `target=None` or `enqueued_only`: only WAITING trials
    are taken, never a sampled one (the designed matrix). `per_shape`: members one sampled shape may bring into a
    pack (default_per_shape). Out of memory halves the pack and retries its unfinished members; whatever ends the
    run (Ctrl-C, an error), every trial it asked is told."""
    deadline = None if timeout is None else time.monotonic() + timeout
    callbacks = list(callbacks)
    if guard is None:  # failures never count toward the budget: without a guard, a broken set-up would ask forever
        guard = FailureGuard()
        callbacks.append(guard)
    per_shape = per_shape or default_per_shape(target or pack, pack)
    runner = _Runner(study, objective, target, gate=gate, deadline=deadline, callbacks=callbacks, guard=guard,
                     per_shape=per_shape, enqueued_only=enqueued_only or target is None, capacity=pack)
    stats = PackStats()
    try:
        while not guard.tripped:
            members = runner.ask(runner.capacity)
            if not members:
                break
            message = None
            try:
                log = objective.train(members, capacity=runner.capacity, refill=runner.ask, on_leave=runner.tell)
            except torch.OutOfMemoryError as exc:
                message = f"out of memory: {str(exc).splitlines()[0] if str(exc) else 'device memory'}"
            # outside the except block: the failed pack's frames (and tensors) are gone before anything is retried
            if message is not None:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                runner.out_of_memory(message, say)
            else:
                runner.tell_all()  # members the pack itself failed (an exception in training): each is told
                stats.add(log)
        runner.tell_all(RuntimeError("not retried: the run stopped (failure guard or time limit)"))
    except BaseException as error:
        runner.abort(error)
        raise
    finally:
        stats.trials = runner.told
        gc.collect()
    return stats


def _drained(members: list[int], capacity: int) -> int:
    """Epoch boundaries at the end of a pack's life with free slots nobody could fill (the budget was spent: before
    that, every boundary's free slots were refilled)."""
    n = 0
    for count in reversed(members):
        if count >= capacity:
            break
        n += 1
    return n
