from __future__ import annotations

import dataclasses
import math

import optuna
import pytest

from bench.samplers import PRUNERS, SAMPLERS, create_pruner, create_sampler
from bench.space import (
    BASELINE,
    FACTORS,
    MATRIX_LEVELS,
    PRESETS,
    TrainConfig,
    build_space,
    config_from_params,
    is_active,
    params_for_config,
    preset_config,
    suggest,
)


def test_every_param_is_a_config_field_with_a_factor():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    space = build_space()
    assert {p.name for p in space} <= fields
    assert {p.factor for p in space} == set(FACTORS)


def test_baseline_is_the_assignment_recipe():
    assert (BASELINE.epochs, BASELINE.batch_size, BASELINE.optimizer, BASELINE.lr, BASELINE.loss) == (5, 128, "adam", 3e-3, "ce")
    assert BASELINE.crop and BASELINE.flip and not BASELINE.color_jitter


def test_conditions_follow_their_parent():
    space = build_space()
    for _ in range(30):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=_))
        params = suggest(study.ask(), space)
        assert ("momentum" in params) == (params["optimizer"] in ("sgd", "rmsprop"))
        assert ("nesterov" in params) == (params["optimizer"] == "sgd")
        assert ("label_smoothing" in params) == (params["loss"] == "ce")
        assert ("focal_gamma" in params) == (params["loss"] == "focal")
        assert ("jitter_strength" in params) == params["color_jitter"]
        assert ("erasing_p" in params) == params["erasing"]
        config_from_params(params)  # always a valid config


def test_enqueued_baseline_round_trips_through_suggest():
    space = build_space(max_epochs=2)
    study = optuna.create_study()
    cfg = BASELINE.replace(epochs=2)
    study.enqueue_trial(params_for_config(cfg, space))
    params = suggest(study.ask(), space)
    assert config_from_params(params) == cfg


def test_epochs_bounded_by_max_epochs():
    space = build_space(max_epochs=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        assert 1 <= suggest(study.ask(), space)["epochs"] <= 3


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid_configs(name):
    cfg = preset_config(name)
    space = build_space()
    active = params_for_config(cfg, space)
    assert all(is_active(p, active) for p in space if p.name in active)


def test_matrix_levels_change_known_fields_only():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for level in MATRIX_LEVELS:
        assert level.factor in FACTORS
        assert set(level.changes) <= fields
        assert BASELINE.replace(**level.changes) != BASELINE


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="unknown parameters"):
        config_from_params({"learning_rate": 0.1})


@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_every_sampler_and_pruner_drives_the_space(sampler_name, pruner_name):
    space = build_space(max_epochs=3)
    study = optuna.create_study(direction="maximize", sampler=create_sampler(sampler_name, 0, space),
                                pruner=create_pruner(pruner_name, 3))
    study.enqueue_trial(params_for_config(BASELINE.replace(epochs=3), space))

    def objective(trial):
        cfg = config_from_params(suggest(trial, space, grid_only=sampler_name == "grid"))
        for epoch in range(1, cfg.epochs + 1):
            trial.report(cfg.lr * epoch, epoch)
        return cfg.lr

    study.optimize(objective, n_trials=4)
    assert len(study.trials) == 4
    assert config_from_params(study.trials[0].params) == BASELINE.replace(epochs=3)


@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
def test_a_resumed_study_asks_what_an_unbroken_one_would(sampler_name, tmp_path):
    """A resume is a new process with a new sampler: it must go on with the configs an unbroken run asks next, not
    start its random stream again (which asked the first configs a second time)."""
    space = build_space(max_epochs=3)
    grid_only = sampler_name == "grid"

    def objective(trial):
        cfg = config_from_params(suggest(trial, space, grid_only=grid_only))
        return -abs(math.log10(cfg.lr) + 2.5) + 0.1 * cfg.width + 0.05 * cfg.batch_norm

    def run(storage, pieces):
        for trials in pieces:  # each piece: a fresh sampler, as a rerun of the same command builds
            study = optuna.create_study(study_name="s", storage=storage, direction="maximize", load_if_exists=True,
                                        sampler=create_sampler(sampler_name, 7, space))
            study.optimize(objective, n_trials=trials)
        return [t.params for t in study.trials]

    unbroken = run(f"sqlite:///{tmp_path / 'unbroken.db'}", [12])
    resumed = run(f"sqlite:///{tmp_path / 'resumed.db'}", [5, 4, 3])
    assert resumed == unbroken
    assert len({tuple(sorted(p.items())) for p in unbroken}) == 12  # and no config was asked twice


def test_the_arms_of_a_comparison_share_their_random_start_up_trials():
    """Common random numbers: with one seed, TPE's random start-up trials are the random sampler's trials, config for
    config, so a comparison of the two differs only where TPE models its results."""
    space = build_space(max_epochs=3)

    def params(sampler_name):
        study = optuna.create_study(direction="maximize", sampler=create_sampler(sampler_name, 3, space))
        study.optimize(lambda trial: config_from_params(suggest(trial, space)).lr, n_trials=12)
        return [t.params for t in study.trials]

    tpe, random = params("tpe"), params("random")
    assert tpe[:10] == random[:10] and tpe[10:] != random[10:]  # TPE models from its 11th trial on
