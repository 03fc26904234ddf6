"""Sampler and pruner registries: `--sampler` and `--pruner` names to Optuna's objects."""

from __future__ import annotations

import bisect
import copy
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial, TrialState

from bench.registry import lookup
from bench.space import EPOCHS_PARAM, Param, grid_search_space


def reseed(sampler: optuna.samplers.BaseSampler, seed: int, trial_number: int) -> None:
    """Reseed every random state of `sampler` (and of the samplers it holds: TPE's and CMA-ES's start-up sampler)
    from (seed, trial number, the owner's class, the state's name). The owner's class, not its place: TPE's start-up
    RandomSampler then draws what the random arm's RandomSampler draws for the same trial, so in a comparison the
    arms' random start-up trials are the same configs (common random numbers: the arms differ where they search)."""
    states = [sampler]
    for owner in states:
        for key, value in vars(owner).items():
            if isinstance(value, LazyRandomState):
                entropy = np.random.SeedSequence([seed, trial_number, zlib.crc32(type(owner).__name__.encode()),
                                                  zlib.crc32(key.encode())])
                setattr(owner, key, LazyRandomState(int(entropy.generate_state(1)[0])))
            elif isinstance(value, optuna.samplers.BaseSampler):
                states.append(value)


class _TrialSeeded:
    """Mixin: a sampler whose draws for a trial depend on (seed, trial number, the study so far), not on how many draws
    this process made before: a resumed study (a new process, a new sampler) otherwise starts its random stream again
    and asks the configs it already tried (measured: a resumed 8-trial random study of bench.compare repeated 2 of its
    first configs), and a second worker with the same seed asks what the first asked."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)  # type: ignore[call-arg]
        self._bench_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reseed(self, self._bench_seed, trial.number)  # type: ignore[arg-type]
        super().before_trial(study, trial)  # type: ignore[misc]


BELIEF_REFERENCES = 3  # completed trials that reported a running trial's step, to read a final value off it


def believed(trials: Sequence[FrozenTrial], current: int | None = None) -> list[FrozenTrial]:
    """`trials` with each running one (other than trial `current`) taken as complete where its curve so far can be
    placed among completed trials: at the latest step it reported where at least BELIEF_REFERENCES completed trials
    reported too, its rank among their values there (ties count half) read off their final values' quantiles.
    References are the completed trials of the same budget (EPOCHS_PARAM) when there are enough of them, else all:
    on the CIFAR-10 matrix study (each completed trial cut at step 2 and believed from the others), all budgets as
    references believed 20-epoch runs 0.042 too low and 5-epoch ones 0.029 too high on average, the same budget
    0.0002 and 0.0033 too high (mean error 0.032 and 0.018). Running trials with no such step (nothing
    reported yet, or too few references), or whose last value is not finite, stay running: TPE's constant liar keeps
    counting them as bad results. Pruned trials are no references (they have no final value), so a running trial
    below every completed one is believed at their lowest final value, still above every pruned trial.

    Why: in a pack (or beside other workers) the trials that run longest are the ones the pruner keeps, the promising
    ones, and the liar counted exactly those as the worst, steering the next asks away from where the search was
    going. Measured with the search simulator: see README "Packs"."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    references = _References(complete)
    seen = []
    for trial in trials:
        if trial.state == TrialState.RUNNING and trial.intermediate_values and trial.number != current:
            value = references.believe(trial)
            if value is not None:
                trial = copy.copy(trial)  # (a copy for the sampler's eyes: the stored trial stays running)
                trial.state = TrialState.COMPLETE
                trial.values = [value]
        seen.append(trial)
    return seen


class _References:
    """Completed trials' values at each step and final values, per epoch budget, gathered (sorted) once per
    believed() call and only for the steps asked. TPE reads the trials about 25 times per ask; gathering them per
    running trial, with numpy's quantile per trial, made a simulated 75-trial study at K=32 3.5x slower than with no
    belief, and this 1.2x."""

    def __init__(self, complete: list[FrozenTrial]):
        self.by_budget: dict[Any, list[FrozenTrial]] = {}
        for t in complete:
            self.by_budget.setdefault(t.params.get(EPOCHS_PARAM), []).append(t)
        self.complete = complete
        self.sorted: dict[tuple[Any, int], tuple[list[float], list[float]]] = {}

    def at(self, budget: Any, step: int) -> tuple[list[float], list[float]]:
        """(values at `step`, final values), each sorted, of the references of `budget` (None: all) that reported it."""
        key = (budget, step)
        if key not in self.sorted:
            pool = self.complete if budget is None else self.by_budget[budget]
            reported = [t for t in pool if math.isfinite(t.intermediate_values.get(step, math.nan))]
            self.sorted[key] = (sorted(t.intermediate_values[step] for t in reported),
                                sorted(t.value for t in reported))  # type: ignore[misc]
        return self.sorted[key]

    def believe(self, trial: FrozenTrial) -> float | None:
        curve = trial.intermediate_values
        if not math.isfinite(curve[max(curve)]):
            return None  # diverged: it leaves the study as a failure or a pruned trial, not as a result to believe
        budget = trial.params.get(EPOCHS_PARAM)
        pool = budget if len(self.by_budget.get(budget, ())) >= BELIEF_REFERENCES else None
        for step in sorted(curve, reverse=True):
            at_step, finals = self.at(pool, step)
            value = curve[step]
            if len(at_step) >= BELIEF_REFERENCES and math.isfinite(value):
                below, not_above = bisect.bisect_left(at_step, value), bisect.bisect_right(at_step, value)
                rank = (below + not_above) / 2 / len(at_step)  # ties count half
                return _quantile(finals, rank)
        return None


def _quantile(ordered: list[float], q: float) -> float:
    """numpy.quantile's default (linear) on a sorted list, computed as numpy computes it (the same floats), without
    its per-call overhead."""
    h = (len(ordered) - 1) * q
    low = min(math.floor(h), len(ordered) - 1)
    high = min(low + 1, len(ordered) - 1)
    a, b, t = ordered[low], ordered[high], h - low
    return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


class _BelievedStudy:
    """The study as TPE reads it while it samples trial number `current` (None: before the next ask): every attribute
    the study's own, except that its trials come through believed()."""

    def __init__(self, study: optuna.Study, current: int | None = None):
        self._study, self._current = study, current

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Sequence[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        if self._study._is_multi_objective():  # (bench's studies have one objective; a rank has no meaning for two)
            return self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        wanted = None if states is None else tuple(states)
        fetch = None if wanted is None else (*wanted, TrialState.COMPLETE, TrialState.RUNNING)
        trials = believed(self._study._get_trials(deepcopy=deepcopy, states=fetch, use_cache=use_cache),
                          self._current)
        return trials if wanted is None else [t for t in trials if t.state in wanted]


# Optuna's samplers with the mixin, under Optuna's names (reseed keys random states by the owner's class name)
class TPESampler(_TrialSeeded, optuna.samplers.TPESampler):
    """Optuna's TPE reading running trials through believed(): for its start-up count and for its model. A study with
    nothing else running (solo, one worker) samples exactly as Optuna's TPE does."""

    def _sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                         search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return super()._sample_relative(_BelievedStudy(study, trial.number), trial,  # type: ignore[arg-type]
                                        search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return super().sample_independent(_BelievedStudy(study, trial.number), trial,  # type: ignore[arg-type]
                                          param_name, param_distribution)


class RandomSampler(_TrialSeeded, optuna.samplers.RandomSampler):
    pass


class CmaEsSampler(_TrialSeeded, optuna.samplers.CmaEsSampler):
    pass


class QMCSampler(_TrialSeeded, optuna.samplers.QMCSampler):
    pass


class GridSampler(_TrialSeeded, optuna.samplers.GridSampler):
    pass


def _tpe(seed: int, space: tuple[Param, ...]) -> optuna.samplers.BaseSampler:
    # multivariate + group: conditional parameters are modelled jointly with their parents; constant_liar:
    # trials asked while others run (a pack, other workers) see those as bad results, so a pack is not K
    # copies of one guess, unless their curves so far say otherwise (believed())
    return TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10, constant_liar=True)


def _grid(seed: int, space: tuple[Param, ...]) -> optuna.samplers.BaseSampler:
    return GridSampler(grid_search_space(space), seed=seed)


SAMPLERS: dict[str, Callable[[int, tuple[Param, ...]], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda seed, space: RandomSampler(seed=seed),
    "cmaes": lambda seed, space: CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "qmc": lambda seed, space: QMCSampler(seed=seed, warn_independent_sampling=False),
    "grid": _grid,
}

PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda max_epochs: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    "hyperband": lambda max_epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs),
    "none": lambda max_epochs: optuna.pruners.NopPruner(),
}


def create_sampler(name: str, seed: int, space: tuple[Param, ...]) -> optuna.samplers.BaseSampler:
    return lookup(SAMPLERS, "sampler", name)(seed, space)


def create_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    return lookup(PRUNERS, "pruner", name)(max_epochs)


def modelled_results(study: optuna.Study) -> int:
    """The results the study's sampler models when it is next asked: finished trials, and for this module's TPE the
    believed running ones too."""
    view = _BelievedStudy(study) if isinstance(study.sampler, TPESampler) else study
    return len(view._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def startup_trials(sampler: optuna.samplers.BaseSampler) -> int | None:
    """How many trials the sampler draws at random before it models the results; None for samplers that never
    model them (random, QMC, grid): their packs take no followers, so every trial stays random in every knob."""
    if isinstance(sampler, optuna.samplers.RandomSampler | optuna.samplers.QMCSampler | optuna.samplers.GridSampler):
        return None
    return int(getattr(sampler, "_n_startup_trials", 0))
