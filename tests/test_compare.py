"""bench.compare: arms x paired repeats as studies in one storage, an epoch budget, resume, and replay."""

from __future__ import annotations

import optuna
import pytest

import bench.compare
import bench.train
from bench.compare import Arm, default_evaluations, epochs_consumed, main, parse_arms
from bench.comparison import analyse
from bench.errors import UsageError, run_cli
from bench.schema import Attr, StudyAttr
from tests.test_replay import CONFIGS, make_table


@pytest.fixture(autouse=True)
def quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _studies(storage: str) -> dict[str, optuna.Study]:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    return {n: optuna.load_study(study_name=n, storage=storage) for n in names}


def test_arms_parse_and_bad_ones_are_refused():
    assert parse_arms("tpe,random+median, cmaes+hyperband") == [Arm("tpe"), Arm("random", "median"), Arm("cmaes", "hyperband")]
    assert Arm("random", "median").name == "random+median" and Arm("tpe").name == "tpe"
    for bad in ("tpe,tpe", "grid", "tpe+sometimes", "annealing"):
        with pytest.raises(UsageError):
            parse_arms(bad)
    assert default_evaluations(1) == 60 and default_evaluations(30) == 240  # ceil(20 + 40 sqrt(d))


def test_a_replayed_comparison_is_paired_within_budget_and_resumes(tmp_path, capsys):
    make_table(CONFIGS, seeds=3).save(tmp_path / "table")
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    args = ["--name", "c", "--storage", storage, "--arms", "random,random+median,tpe", "--repeats", "3", "--trials", "4",
            "--replay", str(tmp_path / "table")]
    assert run_cli(main, args) == 0
    studies = _studies(storage)
    assert len(studies) == 9
    for name, study in studies.items():
        a = study.user_attrs
        assert a[StudyAttr.COMPARE] == "c" and a[StudyAttr.BUDGET_EPOCHS] == 12 and str(tmp_path) in a[StudyAttr.REPLAY]
        assert name == f"c.{a[StudyAttr.ARM]}.r{a[StudyAttr.REPEAT]}"
        consumed = epochs_consumed(study)
        assert 12 <= consumed < 12 + 3  # stops asking at the budget; the last trial may run past it
        assert all(Attr.SAMPLER_SECONDS in t.user_attrs for t in study.trials)
    for r in range(3):  # paired: the same sampler seed in every arm, so random and random+median start alike
        first = [studies[f"c.{arm}.r{r}"].trials[0].params for arm in ("random", "random+median")]
        assert first[0] == first[1]
    assert studies["c.random.r0"].trials[0].params != studies["c.random.r1"].trials[0].params
    frames = analyse(storage, "c")
    assert frames.trials["replayed"].all() and set(frames.summary["arm"]) == {"random", "random+median", "tpe"}
    before = {n: len(s.trials) for n, s in studies.items()}
    assert run_cli(main, args) == 0  # done: nothing more to run
    assert {n: len(s.trials) for n, s in _studies(storage).items()} == before


def test_a_live_comparison_trains_resumes_after_an_interrupt_and_refuses_bad_input(rgb_folder, cache_dir, tmp_path,
                                                                                  ctrl_c, capsys):
    storage = f"sqlite:///{tmp_path / 'live.db'}"
    args = ["--name", "live", "--storage", storage, "--arms", "random,tpe+median", "--repeats", "2", "--trials", "2",
            "--max-epochs", "1", "--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--val-split", "0.25",
            "--device", "cpu", "--precision", "fp32", "--quiet"]
    release = ctrl_c(bench.compare, "run_packs", 3)
    assert run_cli(main, args) == 130
    assert "rerun the same command" in capsys.readouterr().err
    release()
    assert run_cli(main, args) == 0
    studies = _studies(storage)
    assert len(studies) == 4 and all(epochs_consumed(s) >= 2 for s in studies.values())
    assert all(t.user_attrs[Attr.EPOCHS_RUN] == 1 for s in studies.values() for t in s.trials)  # epochs fixed, not searched
    out = capsys.readouterr().out
    assert "random r1 trial" in out and "bench.report --compare live" in out
    assert run_cli(main, [*args, "--arms", "tpe+sometimes"]) == 2



def test_an_interrupted_trial_runs_again_and_is_not_charged(rgb_folder, cache_dir, tmp_path, ctrl_c, capsys):
    """Ctrl-C in the middle of a trial: the rerun trains that trial's config again (the search chose it and never
    saw its result), its lost epochs are not charged to the budget, and no config is asked twice otherwise."""
    storage = f"sqlite:///{tmp_path / 'live.db'}"
    args = ["--name", "live", "--storage", storage, "--arms", "random", "--repeats", "1", "--trials", "3",
            "--max-epochs", "2", "--dataset", str(rgb_folder), "--cache-dir", str(cache_dir), "--val-split", "0.25",
            "--device", "cpu", "--precision", "fp32", "--quiet"]
    release = ctrl_c(bench.train, "_train_epoch", 4)  # in the second trial's second epoch
    assert run_cli(main, args) == 130
    study = _studies(storage)["live.random.r0"]
    stopped = study.trials[1]
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs[Attr.FAIL_REASON] == "interrupted"
    assert stopped.user_attrs[Attr.EPOCHS_RUN] == 1 and epochs_consumed(study) == 2  # its epoch is not charged
    release()
    assert run_cli(main, args) == 0
    assert "trials [1] were interrupted or orphaned; queued their parameters again" in capsys.readouterr().out
    study = _studies(storage)["live.random.r0"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and epochs_consumed(study) == 6  # the budget: 6 epochs the search chose to spend
    assert [t.params for t in complete if t.user_attrs.get(Attr.RETRY_OF) == 1] == [stopped.params]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3
    summary = analyse(storage, "live").studies.iloc[0]
    assert (summary["n_fail"], summary["n_interrupted"], summary["epochs_consumed"]) == (0, 1, 6)
    assert run_cli(main, args) == 0  # done: nothing is queued twice
    assert len(_studies(storage)["live.random.r0"].trials) == len(study.trials)

def test_a_study_another_process_runs_is_left_to_it(tmp_path, capsys):
    from bench.locks import RunLock

    make_table(CONFIGS, seeds=2).save(tmp_path / "table")
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    held = RunLock(storage, "c.tpe.r0")
    assert held.try_acquire()  # as another compare process running that study would hold it
    try:
        args = ["--name", "c", "--storage", storage, "--arms", "random,tpe", "--repeats", "1", "--trials", "3",
                "--replay", str(tmp_path / "table")]
        assert run_cli(main, args) == 0
        assert "c.tpe.r0: another process is running it; skipped" in capsys.readouterr().out
        studies = _studies(storage)
        assert not studies["c.tpe.r0"].trials and epochs_consumed(studies["c.random.r0"]) >= 9
    finally:
        held.release()
    assert run_cli(main, args) == 0  # that process gone: the study is run
    assert epochs_consumed(_studies(storage)["c.tpe.r0"]) >= 9


def test_a_spent_budget_still_reruns_what_was_stopped_from_outside_once(tmp_path):
    """Trials interrupted (or orphaned) after the others spent the budget run again: the study is not settled until
    their reruns ran, a rerun is queued once, with its seed, and a retry by Optuna's heartbeat callback counts."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from bench.compare import settled
    from bench.storage import RetryDeadTrial, requeue_stopped

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")

    def add(state, epochs, x, **attrs):
        study.add_trial(create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, params={"x": x},
                                     distributions={"x": FloatDistribution(0, 1)},
                                     user_attrs={Attr.EPOCHS_RUN: epochs, Attr.SEED: int(10 * x)} | attrs))

    add(TrialState.COMPLETE, 3, 0.1)
    add(TrialState.COMPLETE, 3, 0.2)
    add(TrialState.FAIL, 2, 0.3, stop_reason="failed", fail_reason="interrupted")
    add(TrialState.FAIL, 1, 0.4, stop_reason="failed", fail_reason="RuntimeError: the config failed")  # its own fault
    assert epochs_consumed(study) == 7 and not settled(study, 6)
    assert requeue_stopped(study) == [2] and requeue_stopped(study) == []
    rerun = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs[Attr.SEED], t.user_attrs[Attr.RETRY_OF]) for t in rerun] == [
        ({"x": 0.3}, 3, 2)]
    assert not settled(study, 6)  # the rerun waits
    study.tell(study.ask(), 0.6)  # the rerun ran
    assert settled(study, 6)
    add(TrialState.FAIL, 0, 0.5)  # an orphan: failed with no reason
    RetryDeadTrial(max_retry=2)(study, study.trials[-1])  # the heartbeat retries it
    assert requeue_stopped(study) == []  # already retried: not queued twice
    study.tell(study.ask(), state=TrialState.FAIL)  # the retry's worker dies too
    RetryDeadTrial(max_retry=2)(study, study.trials[-1])  # the second retry: Optuna's failed_trial names the first
    study.tell(study.ask(), 0.7)
    assert [t.state for t in study.trials[-3:]] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert requeue_stopped(study) == [] and settled(study, 6)  # every attempt of the chain has its rerun


def test_reruns_of_stopped_trials_stay_within_the_places_left(tmp_path):
    """bench.run resumes with `limit` = the trial budget's places left: the oldest stopped trials are queued, the
    others wait for a run with room (a queued trial past the budget would sit WAITING for ever)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from bench.storage import requeue_stopped

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    for x in (0.1, 0.2, 0.3):
        study.add_trial(create_trial(state=TrialState.FAIL, params={"x": x}, distributions={"x": FloatDistribution(0, 1)},
                                     user_attrs={"stop_reason": "failed", "fail_reason": "interrupted"}))
    assert requeue_stopped(study, limit=1) == [0]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    assert requeue_stopped(study, limit=0) == []
    assert requeue_stopped(study, limit=5) == [1, 2]
