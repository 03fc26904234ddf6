"""Storages and stored studies: opening any Optuna storage, the metadata a study must keep across runs, loading an
existing study, and the trials a dead process left behind. No torch here: the report and predict read studies."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import bench
from bench.errors import UsageError, redact
from bench.locks import storage_file
from bench.schema import Attr, StudyAttr, trial_stopped_from_outside
from bench.space import Param

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDIES_DIR = Path("studies")


# --- storage --------------------------------------------------------------------------


def default_storage(study_name: str, workers: int = 1) -> str:
    """SQLite for one worker; Optuna's journal file for several (its FAQ: SQLite is not for parallel writers).

    An existing file decides, so a study keeps its storage whatever --workers says next time.
    """
    db, journal = STUDIES_DIR / f"{study_name}.db", STUDIES_DIR / f"{study_name}.journal"
    if journal.exists() or (workers > 1 and not db.exists()):
        return f"journal:///{journal}"
    return f"sqlite:///{db}"


def compare_storage(name: str) -> str:
    """bench.compare's default storage: Optuna's journal file. A comparison writes thousands of small trials (a replay
    stores 1,200 in seconds); SQLite's per-row writes took 0.12 s per stored trial on the 2-core CPU (4 arms x 10
    repeats x 30 replayed trials: 3 min against 34 s in a journal file, which optuna-dashboard also reads)."""
    return f"journal:///{STUDIES_DIR / f'compare-{name}.journal'}"


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
                          heartbeat_stale_trial_callback=RetryDeadTrial(max_retry=2))
        return _create_rdb(url, kwargs)
    except Exception as exc:
        message = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UsageError(f"cannot open storage {shown}: {message}; check the URL, the server and the credentials") from None


def identity(trial: FrozenTrial) -> dict[str, Any]:
    """What a rerun of `trial` keeps of its user attributes: its cell and seed, none of the dead attempt's results."""
    return {k: v for k, v in trial.user_attrs.items() if k in Attr.IDENTITY}


class RetryDeadTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's heartbeat retry, but the retry inherits only the trial's identity: Optuna's copies every user
    attribute, so a retry that died before its first epoch still showed the dead attempt's curve, epochs and seconds,
    and the report counted that work twice. Nor does it inherit the dead attempt's reported values."""

    def __init__(self, max_retry: int | None = None) -> None:
        super().__init__(max_retry=max_retry, inherit_intermediate_values=False)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = identity(trial)
        super().__call__(study, trial)


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


def load_existing_study(name: str, storage_url: str | None) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    url = storage_url or default_storage(name)
    path = storage_file(url)
    if path is not None and not path.exists():
        raise UsageError(f"no study database at {path}; run `python -m bench.run --study-name {name}` first or pass --storage")
    storage = open_storage(url, heartbeat=False)
    try:
        return optuna.load_study(study_name=name, storage=storage), storage
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        raise UsageError(f"study {name!r} not found in {redact(url)} (it holds: {names or 'no studies'}); check --study") from None


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
        return {StudyAttr.PREFIX + k: v for k, v in self.__dict__.items()} | {StudyAttr.VERSION: bench.__version__}


def open_study(name: str, storage: optuna.storages.BaseStorage, *, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner, meta: StudyMeta, force: bool = False) -> tuple[optuna.Study, bool]:
    """Create or resume `name`; refuses a study made with another dataset or space unless `force`."""
    existing = name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    if existing:
        stored = study.user_attrs
        for key, value in meta.as_attrs().items():
            if key in (StudyAttr.VERSION,) or key not in stored or stored[key] == value:
                continue
            if not force:
                raise UsageError(
                    f"study {name!r} was made with {key.removeprefix(StudyAttr.PREFIX)}={stored[key]!r}, not {value!r}; "
                    "use another --study-name, or --force to add to it anyway"
                )
    else:
        for key, value in meta.as_attrs().items():
            study.set_user_attr(key, value)
    return study, not existing


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fail_orphans(study: optuna.Study, reason: str) -> list[int]:
    """Fail trials left RUNNING by a dead process. Their reruns are requeue_stopped's (bench.run, bench.compare); a
    designed matrix reruns its own cells (bench.matrix.pending) and nothing else."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        failed.append(t.number)
    if failed:
        print(f"trials {failed} were left running by a process that died ({reason}); failed them")
    return failed


def stopped_without_rerun(study: optuna.Study) -> list[FrozenTrial]:
    """Trials stopped from outside (interrupted or orphaned) whose rerun is not queued: neither by requeue_stopped
    (user attribute retry_of) nor by Optuna's heartbeat callback (system attribute retry_history: every attempt of
    the chain a retry continues; failed_trial names only the chain's first)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(Attr.RETRY_OF) for t in trials}
    retried |= {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in retried and trial_stopped_from_outside(t)]


def requeue_stopped(study: optuna.Study, limit: int | None = None) -> list[int]:
    """Enqueue again, once, the parameters (and seed) of every trial stopped from outside without its rerun queued:
    the search chose them and never saw their result. `limit`: at most that many, oldest first (the places left in
    a trial budget; the others wait for a later run with room). Returns the numbers of the trials requeued."""
    again = stopped_without_rerun(study)[:limit]
    for t in again:
        study.enqueue_trial(t.params, user_attrs=identity(t) | {Attr.RETRY_OF: t.number})
    if again:
        print(f"{study.study_name}: trials {[t.number for t in again]} were interrupted or orphaned; queued their "
              "parameters again")
    return [t.number for t in again]
