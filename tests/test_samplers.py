"""TPE with believed running trials: a running trial whose curve so far ranks it among completed ones is modelled at
that rank; without the evidence it stays the constant liar's bad result; with nothing running TPE is Optuna's."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from bench.samplers import BELIEF_REFERENCES, _TrialSeeded, believed, create_sampler, modelled_results
from bench.space import EPOCHS_PARAM, build_space

X = FloatDistribution(0.0, 1.0)


def _study(sampler=None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize", sampler=sampler)


def _complete(study: optuna.Study, x: float, curve: list[float], final: float) -> None:
    study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={"x": X}, value=final,
                                              intermediate_values=dict(enumerate(curve, 1))))


def _running(study: optuna.Study, x: float, curve: list[float]) -> optuna.Trial:
    study.enqueue_trial({"x": x})
    trial = study.ask({"x": X})
    for step, value in enumerate(curve, 1):
        trial.report(value, step)
    return trial


def test_a_running_trial_is_believed_at_its_rank_among_completed_ones_at_its_step():
    study = _study()
    for i, (at_2, final) in enumerate([(0.40, 0.60), (0.45, 0.65), (0.50, 0.70), (0.55, 0.75)]):
        _complete(study, i / 10, [0.3, at_2, at_2 + 0.05], final)
    top = _running(study, 0.9, [0.3, 0.56])  # above all four at step 2
    middle = _running(study, 0.8, [0.3, 0.47])  # above two of four
    bottom = _running(study, 0.7, [0.3, 0.10])
    seen = {t.number: t for t in believed(study.get_trials(deepcopy=False))}
    assert seen[top.number].state == TrialState.COMPLETE and seen[top.number].value == pytest.approx(0.75)
    assert seen[middle.number].value == pytest.approx(np.quantile([0.60, 0.65, 0.70, 0.75], 0.5))
    assert seen[bottom.number].value == pytest.approx(0.60)
    # only the sampler's view changes: the stored trials still run
    assert all(study.trials[t.number].state == TrialState.RUNNING for t in (top, middle, bottom))
    # the trial being sampled is never believed (the liar leaves it out too)
    assert believed(study.get_trials(deepcopy=False), current=top.number)[top.number].state == TrialState.RUNNING


def test_without_evidence_a_running_trial_stays_running():
    study = _study()
    for i in range(BELIEF_REFERENCES):
        _complete(study, i / 10, [0.3, 0.4], 0.6 + i / 100)
    fresh = study.ask({"x": X})  # nothing reported yet
    diverged = _running(study, 0.8, [0.3, math.nan])
    seen = {t.number: t.state for t in believed(study.get_trials(deepcopy=False))}
    assert seen[fresh.number] == seen[diverged.number] == TrialState.RUNNING
    # with one reference fewer than asked for at every step, no step is evidence either
    study2 = _study()
    for i in range(BELIEF_REFERENCES - 1):
        _complete(study2, i / 10, [0.3, 0.4], 0.6)
    lone = _running(study2, 0.9, [0.3, 0.9])
    assert believed(study2.get_trials(deepcopy=False))[lone.number].state == TrialState.RUNNING


def test_a_trial_ahead_of_every_completed_one_is_believed_at_its_latest_step_with_references():
    study = _study()
    for i, final in enumerate([0.60, 0.70, 0.80]):
        _complete(study, i / 10, [0.3 + i / 10, 0.4 + i / 10], final)
    ahead = _running(study, 0.9, [0.35, 0.65, 0.66])  # step 3: no reference; step 2: above all three
    assert believed(study.get_trials(deepcopy=False))[ahead.number].value == pytest.approx(0.80)


def test_ties_count_half_and_references_share_the_running_trial_s_budget():
    epochs = EPOCHS_PARAM
    study = _study()
    for i, (budget, at_1, final) in enumerate([(5, 0.5, 0.55), (5, 0.5, 0.60), (5, 0.5, 0.65),
                                               (20, 0.1, 0.80), (20, 0.2, 0.85), (20, 0.3, 0.90)]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": i / 10, epochs: budget}, distributions={"x": X, epochs: IntDistribution(1, 30)},
            value=final, intermediate_values={1: at_1}))
    study.enqueue_trial({"x": 0.9, epochs: 5})
    tied = study.ask({"x": X, epochs: IntDistribution(1, 30)})
    tied.report(0.5, 1)  # equal to every 5-epoch reference: their median, not their lowest
    study.enqueue_trial({"x": 0.8, epochs: 20})
    long = study.ask({"x": X, epochs: IntDistribution(1, 30)})
    long.report(0.25, 1)  # above two of the three 20-epoch runs (all budgets together it would be below three of six)
    seen = believed(study.get_trials(deepcopy=False))
    assert seen[tied.number].value == pytest.approx(0.60)
    assert seen[long.number].value == pytest.approx(np.quantile([0.80, 0.85, 0.90], 2 / 3))


def test_believed_trials_end_tpe_s_random_start_up():
    """TPE draws its first 10 trials at random: 9 finished trials and one believed running one are 10 results, so the
    next trial is modelled (it differs from the draw of the random sampler with the same seed, which start-up trials
    equal); with the running trial's curve removed it is a start-up draw again."""
    space = build_space(10)

    def next_params(believable: bool) -> dict:
        study = _study(create_sampler("tpe", 0, space))
        for i in range(9):
            _complete(study, i / 10, [0.2 + i / 50, 0.3 + i / 50], 0.5 + i / 50)
        _running(study, 0.95, [0.5, 0.6] if believable else [])
        assert modelled_results(study) == (10 if believable else 9)
        return study.ask({"x": X}).params

    random_study = _study(create_sampler("random", 0, space))
    for i in range(10):
        random_study.enqueue_trial({"x": i / 10})
        random_study.ask({"x": X})
    random_draw = random_study.ask({"x": X}).params
    assert next_params(believable=False) == random_draw
    assert next_params(believable=True) != random_draw


def test_tpe_s_model_sees_the_believed_trial_in_both_of_its_paths(monkeypatch):
    """What TPE splits into good and bad trials, for the parameter it samples jointly (x: every earlier trial has it)
    and for the one it samples on its own (y: new in this trial): the believed trial is a complete one in both."""
    splits: list[list] = []
    real = optuna.samplers._tpe.sampler._split_trials

    def spy(study, trials, *args, **kwargs):
        splits.append(list(trials))
        return real(study, trials, *args, **kwargs)

    monkeypatch.setattr(optuna.samplers._tpe.sampler, "_split_trials", spy)
    study = _study(create_sampler("tpe", 0, build_space(10)))
    for i in range(10):
        _complete(study, i / 10, [0.2 + i / 50], 0.5 + i / 50)
    running = _running(study, 0.95, [0.5])  # above all ten at step 1
    study.ask({"x": X, "y": FloatDistribution(0.0, 1.0)})
    assert len(splits) == 2  # one per path: relative (x), independent (y)
    for trials in splits:
        (seen,) = [t for t in trials if t.number == running.number]
        assert seen.state == TrialState.COMPLETE and seen.value == pytest.approx(0.68)


class TPESampler(_TrialSeeded, optuna.samplers.TPESampler):
    """Optuna's TPE, seeded per trial as bench's is (same class name: reseed keys its random states by it)."""


def test_with_nothing_running_tpe_samples_as_optuna_s_own():
    """Solo studies (one worker, no pack) see no running trial but the one being sampled: believing changes nothing."""

    def search(sampler) -> list[dict]:
        study = _study(sampler)
        for _ in range(16):
            trial = study.ask()
            x = trial.suggest_float("x", 0.0, 1.0)
            trial.report(x / 2, 1)
            if trial.number % 3 == 0:
                trial.suggest_float("y", 0.0, 1.0)  # a parameter some trials have: sampled on its own
            study.tell(trial, 1 - (x - 0.7) ** 2)
        return [t.params for t in study.trials]

    settings = dict(seed=3, multivariate=True, group=True, n_startup_trials=10, constant_liar=True)
    assert search(create_sampler("tpe", 3, build_space(10))) == search(TPESampler(**settings))
