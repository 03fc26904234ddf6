"""Sampler and pruner registries: `--sampler` and `--pruner` names to Optuna's objects."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from bench.registry import lookup
from bench.space import Param, grid_search_space


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
    return lookup(SAMPLERS, "sampler", name)(seed, space)


def create_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    return lookup(PRUNERS, "pruner", name)(max_epochs)


def startup_trials(sampler: optuna.samplers.BaseSampler) -> int | None:
    """How many trials the sampler draws at random before it models the results; None for samplers that never
    model them (random, QMC, grid): their packs take no followers, so every trial stays random in every knob."""
    if isinstance(sampler, optuna.samplers.RandomSampler | optuna.samplers.QMCSampler | optuna.samplers.GridSampler):
        return None
    return int(getattr(sampler, "_n_startup_trials", 0))
