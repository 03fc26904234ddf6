"""The search simulator: packed studies search (explore shapes, keep packs full) on the real runner's path."""

from __future__ import annotations

import contextlib

import numpy as np
import optuna
import pytest
import torch

from bench.cli import AUTO_PACK_CUDA, resolve_pack
from bench.packed import shape_signature
from bench.runner import run_packs
from bench.samplers import create_pruner, create_sampler
from bench.simulate import SimulatedTrainer, accuracy_at, final_accuracy, plain_batch_search, simulate_search
from bench.space import BASELINE, build_space, config_from_params
from bench.stats import paired_diff

REPEATS, TRIALS = 10, 50


@pytest.fixture(scope="module")
def runs():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {k: [simulate_search(k, TRIALS, r) for r in range(REPEATS)] for k in (1, 8, 32)}


@pytest.mark.parametrize("pack", [8, 32])
def test_packed_studies_explore_shapes_and_keep_their_packs_full(runs, pack):
    """The issue's acceptance (50 trials, TPE + median, 10 paired repeats): distinct shapes at least 60% of the solo
    study's and occupancy at least 75% while trials remain to ask. Before shape-diverse packs, a 50-trial study
    explored 1-2 shapes at K=32."""
    solo, packed = runs[1], runs[pack]
    assert all(r.trials == TRIALS for r in solo + packed)
    shapes = np.mean([r.distinct_shapes for r in packed]) / np.mean([r.distinct_shapes for r in solo])
    assert shapes >= 0.6
    assert np.mean([r.occupancy for r in packed]) >= 0.75


@pytest.fixture(scope="module")
def plain():
    """The sampler asked in plain batches on the same repeats: the reference for what asking in parallel costs."""
    return {k: np.array([plain_batch_search(k, TRIALS, r) for r in range(REPEATS)]) for k in (1, 8)}


def test_a_pack_of_8_finds_what_solo_finds(runs, plain):
    """The issue's acceptance at K=8: best value against solo at equal trials (50), a paired 95% interval that includes
    0 or favours the packed study: +0.0002 [-0.0164, +0.0168] on these 10 repeats (30 repeats: -0.0023 [-0.0107,
    +0.0062]). K trials asked at once are asked with less information than one at a time: TPE asked in plain batches
    of 8 (no runner, so no curves to believe) loses 1.75 points on these repeats, and so did the packed study with
    the constant liar alone (-0.0150 [-0.0264, -0.0037]), before TPE believed its running members' curves."""
    packed = paired_diff(np.array([r.best_value for r in runs[8]]), np.array([r.best_value for r in runs[1]]))
    batched = paired_diff(plain[8], plain[1])
    assert packed.has_interval and batched.has_interval
    assert batched.mean < 0  # the reference is a real penalty: TPE asked 8 at a time finds less
    assert packed.high >= 0 and packed.mean > batched.mean + 0.01


def test_a_pack_of_32_finds_with_75_trials_what_solo_finds_with_50(runs):
    """A pack of 32 asks about 35 of 50 trials before TPE has 10 results, so at equal trials it still finds less
    (-0.0077 [-0.0240, +0.0087] on these repeats, -0.0097 [-0.0179, -0.0016] at 30); it trains them many times
    faster, and with 75 it finds what solo finds with 50: -0.0002 [-0.0166, +0.0162] here (README "Packs";
    `--packed-trials 75`)."""
    more = np.array([simulate_search(32, 75, r).best_value for r in range(REPEATS)])
    packed = paired_diff(more, np.array([r.best_value for r in runs[1]]))
    assert packed.has_interval and packed.high >= 0
    equal = paired_diff(np.array([r.best_value for r in runs[32]]), np.array([r.best_value for r in runs[1]]))
    assert packed.mean > equal.mean


def test_auto_packs_a_sampled_study_no_larger_than_its_trials_search_well_with():
    """--pack auto on CUDA sizes a sampled study's pack by its trials (4 per member): 50 trials get the pack of 8 that
    finds what solo finds (above), not the 32 that finds less at 50; designed runs (no trials) and CPUs as before."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [resolve_pack("auto", cuda, n) for n in (1, 5, 12, 49, 50, 64, 75, 100, 127, 128, 10_000)] == \
        [1, 1, 2, 8, 8, 16, 16, 16, 16, 32, AUTO_PACK_CUDA]
    assert resolve_pack("auto", cuda) == AUTO_PACK_CUDA and resolve_pack("auto", cpu, 50) == 1
    assert resolve_pack(32, cuda, 50) == 32 and resolve_pack(4, cpu, 50) == 4  # a chosen K is kept


def test_plain_batches_change_only_what_the_sampler_knows():
    """Random search ignores what it knows, so its plain batches find exactly what it finds one at a time (the trials'
    draws are seeded per trial); TPE's differ, and every call is deterministic."""
    assert plain_batch_search(8, 20, 3, sampler="random") == plain_batch_search(1, 20, 3, sampler="random")
    assert plain_batch_search(8, 20, 3) == plain_batch_search(8, 20, 3)
    # all 50 asked blind against one at a time: TPE's model pays on average (not on every landscape: repeat 6 is the
    # exception among 0-9)
    blind = [plain_batch_search(50, 50, r) for r in range(5)]
    assert np.mean(blind) < np.mean([plain_batch_search(1, 50, r) for r in range(5)]) - 0.01
    assert blind == [plain_batch_search(100, 50, r) for r in range(5)]  # a batch larger than the study is one batch
    assert plain_batch_search(8, 1, 0) == plain_batch_search(1, 1, 0) == accuracy_at(BASELINE, BASELINE.epochs, 0, 0)


def test_the_simulated_landscape_rewards_shape_and_knobs():
    assert final_accuracy(BASELINE.replace(batch_norm=True, width=2.0), 0) > final_accuracy(BASELINE, 0)
    assert final_accuracy(BASELINE.replace(lr=1.0), 0) == pytest.approx(0.1)  # off the optimizer's range: chance
    curve = [accuracy_at(BASELINE, e, seed=0, landscape=0) for e in range(1, 21)]
    assert curve[-1] > curve[0] and accuracy_at(BASELINE, 3, 0, 0) == accuracy_at(BASELINE, 3, 0, 0)


def _study(sampler: str, seed: int = 0):
    space = build_space(30)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize",
                                sampler=create_sampler(sampler, seed, space), pruner=create_pruner("median", 30))
    return study, SimulatedTrainer(space, landscape=seed)


def _followers(study) -> list[int]:
    """Trials asked as followers: enqueued partial trials (their fixed parameters are shape fields only)."""
    return [t.number for t in study.trials if t.system_attrs.get("fixed_params")]


def test_start_up_trials_stay_random_and_later_ones_bring_followers():
    study, trainer = _study("tpe")
    run_packs(study, trainer, 40, pack=16, per_shape=3, gate=contextlib.nullcontext(), say=lambda line: None)
    followers = _followers(study)
    assert followers and min(followers) >= 10  # TPE's 10 random start-up trials take none
    for number in followers:
        fixed = study.trials[number].system_attrs["fixed_params"]
        assert set(fixed) <= {"batch_size", "conv_layout", "extra_blocks", "width", "batch_norm", "residual",
                              "hidden_units"}
        before = study.trials[number - 1]  # a follower comes right after its leader (or the leader's other follower)
        assert shape_signature(config_from_params(study.trials[number].params)) == shape_signature(
            config_from_params(before.params))


def test_a_random_search_packed_stays_random_in_every_knob():
    study, trainer = _study("random")
    stats = run_packs(study, trainer, 30, pack=8, per_shape=4, gate=contextlib.nullcontext(), say=lambda line: None)
    assert not _followers(study) and stats.trials == 30


# --- the runner when something fails (the simulator trains nothing, so these take a second) ---------------------------


def _states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def test_a_trial_whose_outcome_cannot_be_recorded_fails_alone(monkeypatch):
    study, trainer = _study("random")
    real = SimulatedTrainer.conclude

    def disk_full_on_trial_2(self, trial, member):
        if trial.number == 2:
            raise OSError(28, "No space left on device")
        return real(self, trial, member)

    monkeypatch.setattr(SimulatedTrainer, "conclude", disk_full_on_trial_2)
    run_packs(study, trainer, 8, pack=3, gate=contextlib.nullcontext(), say=lambda line: None)
    assert study.trials[2].state.name == "FAIL" and "No space left" in study.trials[2].user_attrs["fail_reason"]
    counts = _states(study)
    assert "RUNNING" not in counts and counts.get("FAIL") == 1  # its pack-mates went on
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 8  # and the failure's place was asked again


def test_a_config_that_cannot_be_built_fails_its_trial_and_the_pack_goes_on(monkeypatch):
    study, trainer = _study("random")
    real = SimulatedTrainer.member

    def fifth_is_broken(self, trial, asked_seconds=0.0):
        if trial.number == 4:
            raise ValueError("bad config")
        return real(self, trial, asked_seconds)

    monkeypatch.setattr(SimulatedTrainer, "member", fifth_is_broken)
    run_packs(study, trainer, 8, pack=3, gate=contextlib.nullcontext(), say=lambda line: None)
    assert study.trials[4].state.name == "FAIL" and study.trials[4].user_attrs["fail_reason"] == "ValueError: bad config"
    assert _states(study).get("FAIL") == 1 and "RUNNING" not in _states(study)


def test_an_error_that_ends_the_run_leaves_no_trial_running():
    study, trainer = _study("random")

    def broken_callback(study, trial):
        if trial.number == 3:
            raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):  # a callback's error propagates, as optimize's does
        run_packs(study, trainer, 12, pack=4, gate=contextlib.nullcontext(), callbacks=[broken_callback],
                  say=lambda line: None)
    assert "RUNNING" not in _states(study)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all("callback broke" in t.user_attrs["fail_reason"] for t in failed)


def test_the_simulator_gives_packed_studies_their_own_trial_budget(capsys):
    """`--packed-trials`: packed studies get more trials while solo keeps `--trials`, paired as before; bad values
    are refused with exit status 2."""
    from bench.errors import run_cli
    from bench.perf import main

    assert main(["--simulate-search", "--pack", "4", "--repeats", "2", "--trials", "6", "--packed-trials", "9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("search simulator: 6 trials solo, 9 packed")
    assert lines[2].split()[:2] == ["1", "6"] and lines[3].split()[:2] == ["4", "9"]
    assert simulate_search(4, 9, 0).trials == 9
    assert run_cli(main, ["--simulate-search", "--packed-trials", "0"]) == 2
    assert "--packed-trials must be 1 or more" in capsys.readouterr().err
    assert run_cli(main, ["--dataset", "x", "--packed-trials", "9"]) == 2  # not a simulation: refused, not ignored
    assert "add --simulate-search" in capsys.readouterr().err


def test_the_simulator_prints_the_plain_batch_reference(capsys):
    from bench.errors import run_cli
    from bench.perf import main

    assert main(["--simulate-search", "--pack", "4", "--repeats", "2", "--trials", "6", "--plain-batches"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("reference: the tpe sampler asked in plain batches"))
    assert out[at + 2].split()[:2] == ["1", "6"] and out[at + 3].split()[:2] == ["4", "6"]
    assert run_cli(main, ["--dataset", "x", "--plain-batches"]) == 2
    assert "add --simulate-search" in capsys.readouterr().err
