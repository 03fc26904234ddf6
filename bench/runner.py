"""The one study runner: trials asked from a study, trained in packs (a pack of one: solo) and told as they leave."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import get_heartbeat_thread  # ask/tell trials need their own heartbeats
from optuna.trial import FrozenTrial, TrialState

from bench.locks import TrialGate
from bench.objective import TrialTrainer, has_outcome, mark_interrupted
from bench.samplers import modelled_results, startup_trials
from bench.schema import Attr
from bench.space import SHAPE_FIELDS
from bench.storage import FINISHED
from bench.train import Member, PackLog

warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats, TPE groups: used on purpose
# run_packs asks trials itself and runs a heartbeat thread for each (get_heartbeat_thread), as optimize does
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

MAX_CONSECUTIVE_FAILURES = 3


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
    graph_steps: int = 0
    eager_steps: int = 0
    graph_failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, log: PackLog) -> None:
        self.members += log.members
        self.launches += log.launches
        self.slots += [log.capacity] * len(log.members)
        self.signatures |= log.signatures
        self.drained += _drained(log.members, log.capacity)
        self.graph_steps += log.graph_steps
        self.eager_steps += log.eager_steps
        self.graph_failures += log.graph_failures

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
        graphs = ""
        if self.graph_steps or self.graph_failures:  # CUDA: how much of the training ran as replayed graphs
            share = self.graph_steps / max(1, self.graph_steps + self.eager_steps)
            failed = f" ({len(self.graph_failures)} failed captures: {self.graph_failures[0]})" if self.graph_failures else ""
            graphs = f", {share:.0%} of steps replayed as CUDA graphs{failed}"
        return (f"pack occupancy {self.occupancy:.0%} while trials remained to ask ({self.overall_occupancy:.0%} with the "
                f"final drain), {len(self.signatures)} distinct shapes, {self.members_per_launch:.1f} members per launch, "
                f"{self.trials} trials{graphs}")


def default_per_shape(trials: int, pack: int) -> int:
    """Members one sampled shape may bring into a pack (itself and its followers). Measured with the search
    simulator (bench.perf --simulate-search, 50 trials, TPE + median, 10 paired repeats): see README "Packs"."""
    return max(1, min(pack, trials // 25))


class _Runner:
    """Asks, forms, backfills and tells the trials of one run_packs call (state shared by its callbacks)."""

    def __init__(self, study: optuna.Study, trainer: TrialTrainer, target: int | None, *,
                 gate: TrialGate | contextlib.AbstractContextManager,
                 deadline: float | None, callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
                 guard: FailureGuard, per_shape: int, enqueued_only: bool, capacity: int,
                 stop: Callable[[], bool] | None = None):
        self.study, self.trainer, self.target, self.gate, self.stop = study, trainer, target, gate, stop
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
        if self.stop is not None and self.stop():
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
        partial trial, which the sampler completes). While the sampler is still drawing at random (fewer results than
        its start-up count: finished trials and believed running ones, samplers.modelled_results), trials take no
        followers: they stay random in every knob."""
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
                modelled_results(self.study) >= self.startup)
            started = time.perf_counter()
            trial = self.study.ask()
            self.created.append(trial)
            try:
                member = self.trainer.member(trial, time.perf_counter() - started)
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
            state, value = self.trainer.conclude(trial, member)
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
            if error is not None and not has_outcome(member):
                member.error = error
            self.retry = [m for m in self.retry if m is not member]
            self.tell(member)

    def out_of_memory(self, message: str, say: Callable[[str], None]) -> None:
        """The pack ran out of memory: members that left keep their outcome; the others start again in packs of half
        the size, or (alone) fail with the message."""
        for _, member, _ in list(self.live.values()):
            if has_outcome(member):
                self.tell(member)
        waiting = {id(m) for m in self.retry}  # from an earlier out of memory, not trained in this pack yet
        unfinished = [m for _, m, _ in self.live.values() if id(m) not in waiting]
        if self.capacity == 1:
            self.trainer.out_of_memory(unfinished, message)
            self.tell_all()
            return
        half = self.capacity // 2
        say(f"out of memory with a pack of {self.capacity}: halving it to {half} and retrying its unfinished members")
        for m in unfinished:
            self.trainer.rebuild(m)
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


def run_packs(study: optuna.Study, trainer: TrialTrainer, target: int | None, *, pack: int = 1,
              gate: TrialGate | contextlib.AbstractContextManager | None = None,
              timeout: float | None = None, callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
              guard: FailureGuard | None = None, per_shape: int | None = None, enqueued_only: bool = False,
              say: Callable[[str], None] = print, stop: Callable[[], bool] | None = None) -> PackStats:
    """The one study runner: trials train `pack` at a time (1: solo), until the study holds `target` finished or
    running ones (exactly, across workers: asked under `gate`) or `timeout` seconds have passed (running trials then
    finish). A trial is told the moment it leaves its pack, and its slot is refilled at the next epoch boundary by
    a newly asked trial, so packs stay full under pruning. `target=None` or `enqueued_only`: only WAITING trials
    are taken, never a sampled one (the designed matrix). `per_shape`: members one sampled shape may bring into a
    pack (default_per_shape). `stop`: once it returns true no new trial is asked (running ones finish): a budget
    that is not a trial count, such as bench.compare's epochs. Out of memory halves the pack and retries its
    unfinished members; whatever ends the run (Ctrl-C, an error), every trial it asked is told."""
    deadline = None if timeout is None else time.monotonic() + timeout
    gate = contextlib.nullcontext() if gate is None else gate  # one process on its own study: nothing to share
    callbacks = list(callbacks)
    if guard is None:  # failures never count toward the budget: without a guard, a broken set-up would ask forever
        guard = FailureGuard()
        callbacks.append(guard)
    per_shape = per_shape or default_per_shape(target or pack, pack)
    runner = _Runner(study, trainer, target, gate=gate, deadline=deadline, callbacks=callbacks, guard=guard,
                     per_shape=per_shape, enqueued_only=enqueued_only or target is None, capacity=pack,
                     stop=stop)
    stats = PackStats()
    try:
        while not guard.tripped:
            members = runner.ask(runner.capacity)
            if not members:
                break
            message = None
            try:
                log = trainer.train(members, capacity=runner.capacity, refill=runner.ask, on_leave=runner.tell)
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
