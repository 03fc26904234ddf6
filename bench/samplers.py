"""Sampler and pruner registries: `--sampler` and `--pruner` names to Optuna's objects."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.samplers._lazy_random_state import LazyRandomState

from bench.registry import lookup
from bench.space import Param, grid_search_space


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


# Optuna's samplers with the mixin, under Optuna's names (reseed keys random states by the owner's class name)
class TPESampler(_TrialSeeded, optuna.samplers.TPESampler):
    pass


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
    # copies of one guess
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


def startup_trials(sampler: optuna.samplers.BaseSampler) -> int | None:
    """How many trials the sampler draws at random before it models the results; None for samplers that never
    model them (random, QMC, grid): their packs take no followers, so every trial stays random in every knob."""
    if isinstance(sampler, optuna.samplers.RandomSampler | optuna.samplers.QMCSampler | optuna.samplers.GridSampler):
        return None
    return int(getattr(sampler, "_n_startup_trials", 0))
