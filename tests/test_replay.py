"""Recorded tables and replay: the format round-trips, lookups answer the right row, seeds pair across arms, pruned
epochs are charged, and bench.record / bench.run --replay work end to end on a tiny ImageFolder."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from bench.errors import UsageError, run_cli
from bench.record import design_configs
from bench.record import main as record_main
from bench.replay import Lookup, ReplayTrainer, load_table, seed_column
from bench.run import main as run_main
from bench.runner import run_packs
from bench.sample_data import make_image_folder
from bench.schema import Attr, StudyAttr
from bench.space import BASELINE, EPOCHS_PARAM, TrainConfig, fixed_budget_space
from bench.table import RecordedTable, active_params, data_fingerprint, table_from_study, table_space

E = 3
SPACE = fixed_budget_space(E)
FREE, FIXED = table_space(SPACE, E)


def row(cfg: TrainConfig = BASELINE) -> dict:
    return active_params(dataclasses.asdict(cfg), FREE, FIXED)


def make_table(configs: list[dict], seeds: int = 3, seed: int = 0) -> RecordedTable:
    rng = np.random.default_rng(seed)
    shape = (len(configs), seeds, E)
    val = np.clip(np.cumsum(rng.uniform(0.05, 0.2, shape), axis=2), 0, 1)
    meta = {"data": data_fingerprint({"source": "generated", "train_images": 27, "val_images": 9, "test_images": 12,
                                      "val_is_test": False, "classes": ["a", "b", "c"], "channels": 3,
                                      "image_size": [32, 32], "train_images_total": 36}),
            "train_images": 27, "val_split": 0.25, "train_subset": None, "image_size": 32, "run_epochs": E}
    return RecordedTable(train_loss=1 - val, val_acc=val, test_acc=val - 0.01, seconds=rng.uniform(1, 2, shape),
                         seeds=np.tile(np.arange(100, 100 + seeds), (len(configs), 1)), configs=tuple(configs),
                         space=FREE, fixed=FIXED, meta=meta)


CONFIGS = [row(), row(BASELINE.replace(lr=1e-4)), row(BASELINE.replace(lr=1e-2)),
           row(BASELINE.replace(optimizer="adamw", lr=1e-2)),
           row(BASELINE.replace(optimizer="sgd", lr=1e-2, momentum=0.9)), row(BASELINE.replace(batch_norm=True)),
           row(BASELINE.replace(color_jitter=True, jitter_strength=0.3))]


def replay_study(table: RecordedTable, trials: int, *, sampler: str = "tpe", pruner=None, repeat: int = 0,
                 enqueue: list[dict] = ()) -> optuna.Study:
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=repeat) if sampler == "tpe"
                                else optuna.samplers.RandomSampler(seed=repeat),
                                pruner=pruner or optuna.pruners.NopPruner())
    for params in enqueue:
        study.enqueue_trial(params)
    run_packs(study, ReplayTrainer(table, table.space, repeat=repeat), trials, gate=contextlib.nullcontext(),
              say=lambda line: None)
    return study


# --- the format ------------------------------------------------------------------------------


def test_table_round_trips_through_its_directory(tmp_path):
    table = make_table(CONFIGS)
    table.train_loss[1, 2, 2] = table.val_acc[1, 2, 2] = np.nan  # a diverged run's last epoch
    table.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["configs.json", "meta.json", "table.npz"]
    loaded = load_table(tmp_path / "t")
    for name in ("train_loss", "val_acc", "test_acc", "seconds", "seeds"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    assert loaded.configs == table.configs and loaded.space == FREE and loaded.fixed == FIXED
    assert loaded.fingerprint == table.fingerprint and len(loaded.fingerprint) == 12
    assert loaded.epochs == E and loaded.train_images == 27 and loaded.study_meta() == table.study_meta()
    assert EPOCHS_PARAM not in {p.name for p in loaded.space}  # fixed knobs are not searched
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["shape"] == [len(CONFIGS), 3, E] and meta["data"]["hash"]
    configs = json.loads((tmp_path / "t" / "configs.json").read_text())
    assert "momentum" not in configs[0] and configs[4]["momentum"] == 0.9  # active knobs only


def test_missing_or_corrupt_table_is_a_one_line_error(tmp_path):
    with pytest.raises(UsageError, match="no recorded table at"):
        load_table(tmp_path / "nothing")
    make_table(CONFIGS).save(tmp_path / "t")
    configs = json.loads((tmp_path / "t" / "configs.json").read_text())
    configs[0]["lr"] = 0.5
    (tmp_path / "t" / "configs.json").write_text(json.dumps(configs))
    with pytest.raises(UsageError, match="is corrupt .*fingerprint") as info:
        load_table(tmp_path / "t")
    assert len(str(info.value).splitlines()) == 1
    (tmp_path / "t" / "table.npz").write_bytes(b"not an npz")
    with pytest.raises(UsageError, match="is corrupt"):
        load_table(tmp_path / "t")


# --- lookup ----------------------------------------------------------------------------------


def test_lookup_exact_match_and_inactive_knobs_ignored():
    lookup = Lookup(make_table(CONFIGS))
    for i, params in enumerate(CONFIGS):
        assert lookup.row(params) == i
    # momentum is inactive under Adam: a suggestion that carries another momentum is still the baseline's row
    adam = dataclasses.asdict(BASELINE.replace(momentum=0.5))
    assert lookup.row(lookup.params(adam)) == 0
    sgd = dataclasses.asdict(BASELINE.replace(optimizer="sgd", lr=1e-2, momentum=0.5))
    assert lookup.row(lookup.params(sgd)) == 4  # under SGD it counts, but no other row has SGD's active set


def test_lookup_nearest_neighbour_is_log_scaled_and_categorical_first():
    lookup = Lookup(make_table(CONFIGS))
    # lr 6e-3: the baseline's 3e-3 is nearer on a linear scale, 1e-2 on the declared log scale
    assert lookup.row(row(BASELINE.replace(lr=6e-3))) == 2
    assert lookup.row(row(BASELINE.replace(lr=1.2e-3))) == 0 and lookup.row(row(BASELINE.replace(lr=2e-4))) == 1
    # AdamW at lr 1.5e-3: the lr is nearest to the baseline's, but the optimizer mismatch costs more
    assert lookup.row(row(BASELINE.replace(optimizer="adamw", lr=1.5e-3))) == 3
    # jitter + rotation: no row has that active set, so every row is a candidate and each knob active in one config
    # only costs most: the jitter row (rotation's degrees missing) beats the baseline (jitter's strength missing too)
    assert lookup.row(row(BASELINE.replace(color_jitter=True, rotation=True))) == 6


# --- replay ----------------------------------------------------------------------------------


def test_paired_seeds_same_config_same_repeat_same_recorded_seed():
    table = make_table(CONFIGS, seeds=5)
    seeds = {}
    for arm in ("tpe", "random"):  # two arms, both proposing the baseline first in repeats 0..9
        for repeat in range(10):
            study = replay_study(table, 1, sampler=arm, repeat=repeat, enqueue=[CONFIGS[0]])
            [trial] = study.trials
            assert trial.user_attrs[Attr.REPLAYED_FROM] == 0
            seeds.setdefault(repeat, set()).add(trial.user_attrs[Attr.SEED])
    assert all(len(s) == 1 for s in seeds.values())  # paired: each repeat saw one recorded seed in both arms
    assert len({s.pop() for s in seeds.values()}) > 1  # and repeats do not all see the same one
    assert seed_column(3, 0, 5) == seed_column(3, 0, 5) and 0 <= seed_column(3, 7, 5) < 5


def test_a_pruned_trial_is_charged_the_epochs_it_ran():
    class PruneAtOnce(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    table = make_table(CONFIGS)
    study = replay_study(table, 2, pruner=PruneAtOnce(), enqueue=[CONFIGS[1], CONFIGS[2]])
    for t in study.trials:
        a = t.user_attrs
        assert t.state == TrialState.PRUNED and a[Attr.STOP_REASON] == "pruned" and a[Attr.EPOCHS_RUN] == 1
        r, col = a[Attr.REPLAYED_FROM], list(table.seeds[a[Attr.REPLAYED_FROM]]).index(a[Attr.SEED])
        assert a[Attr.TRAIN_SECONDS] == pytest.approx(table.seconds[r, col, 0], abs=1e-3)
        assert a[Attr.VAL_CURVE] == [pytest.approx(table.val_acc[r, col, 0])]


def test_a_recorded_divergence_replays_as_one():
    table = make_table(CONFIGS[:1], seeds=2)
    table.train_loss[0, :, 1:] = np.nan
    [t] = replay_study(table, 1, enqueue=[CONFIGS[0]]).trials
    assert t.state == TrialState.PRUNED and t.user_attrs[Attr.STOP_REASON] == "diverged"
    assert t.user_attrs[Attr.EPOCHS_RUN] == 1


def test_a_replayed_study_runs_end_to_end_on_the_real_runner():
    table = make_table(CONFIGS)
    study = replay_study(table, 25, pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    assert len(study.trials) == 25 and {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in study.trials:
        a = t.user_attrs
        r, col = a[Attr.REPLAYED_FROM], list(table.seeds[a[Attr.REPLAYED_FROM]]).index(a[Attr.SEED])
        assert Attr.SAMPLER_SECONDS in a and a[Attr.DEVICE] == "replay" and a[Attr.TRAIN_IMAGES] == 27
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(table.val_acc[r, col, -1])
            assert a[Attr.TEST_ACC] == pytest.approx(table.test_acc[r, col, -1]) and a[Attr.EPOCHS_RUN] == E
            assert a[Attr.TRAIN_SECONDS] == pytest.approx(table.seconds[r, col].sum(), abs=1e-2)


def test_table_from_a_study_groups_identical_configs_as_seeds():
    study = optuna.create_study(direction="maximize")
    dists = {p.name: p.distribution for p in SPACE}

    def add(cfg: TrainConfig, seed: int, val: list[float], state=TrialState.COMPLETE, **attrs) -> None:
        params = active_params(dataclasses.asdict(cfg), SPACE) | {EPOCHS_PARAM: E}
        user = {Attr.SEED: seed, Attr.LOSS_CURVE: [1 - v for v in val], Attr.VAL_CURVE: val,
                Attr.STOP_REASON: "completed", Attr.TRAIN_SECONDS: 3.0, Attr.TEST_ACC: val[-1] - 0.01, **attrs}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=val[-1] if state == TrialState.COMPLETE else None,
                                                  state=state, user_attrs=user))

    add(BASELINE, 0, [0.3, 0.4, 0.5])
    add(BASELINE.replace(lr=1e-2), 0, [0.2, 0.3, 0.35])
    add(BASELINE, 1, [0.31, 0.42, 0.52])
    add(BASELINE, 2, [0.3, 0.4], state=TrialState.PRUNED, **{Attr.STOP_REASON: "pruned"})  # not a full curve
    table = table_from_study(study, SPACE)
    assert table.shape == (2, 2, E) and table.configs == (row(), row(BASELINE.replace(lr=1e-2)))
    assert table.seeds.tolist() == [[0, 1], [0, -1]] and table.columns(1) == [0]
    np.testing.assert_allclose(table.val_acc[0, 1], [0.31, 0.42, 0.52])
    assert np.isnan(table.test_acc[0, 0, :2]).all() and table.test_acc[0, 0, 2] == pytest.approx(0.49)
    np.testing.assert_allclose(table.seconds[0, 0], [1.0, 1.0, 1.0])  # train seconds spread evenly
    assert table.meta["trials"] == 3


def test_design_is_space_filling_and_a_prefix_of_a_larger_one():
    rows = design_configs(FREE, 16, "sobol", 0)
    assert len(rows) == 16 and design_configs(FREE, 8, "sobol", 0) == rows[:8]
    optimizers = [r["optimizer"] for r in rows]
    assert {optimizers.count(o) for o in set(optimizers)} == {4}  # Sobol balances the 4 optimizers exactly


# --- the commands end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    data = make_image_folder(root / "data")
    storage = f"sqlite:///{root / 'record.db'}"
    args = ["--out", str(root / "table"), "--configs", "2", "--seeds", "2", "--epochs", "2", "--dataset", str(data),
            "--cache-dir", str(root / "cache"), "--train-subset", "12", "--val-split", "0.25", "--device", "cpu",
            "--precision", "fp32", "--storage", storage, "--quiet"]
    return root, args, storage


def test_record_end_to_end_then_resume(recorded, capsys):
    root, args, storage = recorded
    assert run_cli(record_main, args) == 0
    out = capsys.readouterr().out
    assert "2 configs (sobol) x 2 seeds x 2 epochs = 4 runs, 0 already there" in out and "recording took" in out
    study = optuna.load_study(study_name="record-table", storage=storage)
    assert len(study.trials) == 4
    for t in study.trials:
        a = t.user_attrs
        if a[Attr.STOP_REASON] == "completed":
            assert len(a[Attr.TEST_CURVE]) == len(a[Attr.EPOCH_SECONDS]) == len(a[Attr.VAL_CURVE]) == 2
            assert a[Attr.TEST_CURVE][-1] == pytest.approx(a[Attr.TEST_ACC], abs=1e-6)
            assert all(s > 0 for s in a[Attr.EPOCH_SECONDS])
    table = load_table(root / "table")
    assert table.shape == (2, 2, 2) and table.seeds.tolist() == [[0, 1], [0, 1]]
    assert table.train_images == study.user_attrs[StudyAttr.TRAIN_IMAGES] == 9  # 12 images, a quarter for validation
    assert table.meta["torch_version"] != "unknown" and table.meta["data"]["content"]
    assert table.meta["recording_seconds"] > 0 and table.fixed[EPOCHS_PARAM] == 2
    complete = ~np.isnan(table.train_loss).any(axis=2)
    assert np.isfinite(table.test_acc[complete]).all()  # every epoch of every full run has its test accuracy

    assert run_cli(record_main, args) == 0  # resume: nothing left to train, the same table again
    out = capsys.readouterr().out
    assert "4 runs, 4 already there" in out and "trained" not in out
    assert len(optuna.load_study(study_name="record-table", storage=storage).trials) == 4
    assert load_table(root / "table").fingerprint == table.fingerprint



def test_an_interrupted_recording_counts_only_finished_runs_as_there(tmp_path, ctrl_c, capsys):
    """All runs are queued at the start, so a rerun finds the unfinished ones waiting: it trains them and counts only
    finished runs as already there (it said 3 of 4, and its progress ran past the total)."""
    import bench.train

    args = ["--out", str(tmp_path / "table"), "--configs", "2", "--seeds", "2", "--epochs", "2", "--dataset",
            str(make_image_folder(tmp_path / "data")), "--cache-dir", str(tmp_path / "cache"), "--train-subset", "12",
            "--val-split", "0.25", "--device", "cpu", "--precision", "fp32", "--storage",
            f"sqlite:///{tmp_path / 'record.db'}", "--quiet"]
    release = ctrl_c(bench.train, "_train_epoch", 3)  # in the second run
    assert run_cli(record_main, args) == 130
    release()
    capsys.readouterr()
    assert run_cli(record_main, args) == 0
    out = capsys.readouterr().out
    assert "4 runs, 1 already there" in out and "trained 3 runs" in out
    assert [line.rsplit("[", 1)[1] for line in out.splitlines() if line.startswith("config")] == ["2/4]", "3/4]", "4/4]"]
    assert load_table(tmp_path / "table").shape == (2, 2, 2)

def test_record_refuses_one_seed(recorded, capsys):
    _, args, _ = recorded
    one = list(args)
    one[one.index("--seeds") + 1] = "1"
    assert run_cli(record_main, one) == 2
    err = capsys.readouterr().err
    assert "--seeds must be 2 or more" in err and len(err.strip().splitlines()) == 1


def test_run_replays_the_recorded_table(recorded, tmp_path, capsys):
    root, args, _ = recorded
    if not (root / "table" / "meta.json").exists():
        assert run_cli(record_main, args) == 0
    table = load_table(root / "table")
    storage = f"sqlite:///{tmp_path / 'replay.db'}"
    run_args = ["--replay", str(root / "table"), "--trials", "4", "--study-name", "r", "--storage", storage, "--quiet"]
    assert run_cli(run_main, run_args) == 0
    out = capsys.readouterr().out
    assert f"replayed from {root / 'table'} ({table.fingerprint})" in out
    assert out.count("replayed from") == 2  # the header and the summary
    study = optuna.load_study(study_name="r", storage=storage)
    assert study.user_attrs[StudyAttr.REPLAY] == f"{root / 'table'} ({table.fingerprint})"
    assert study.user_attrs[StudyAttr.MAX_EPOCHS] == 2 and study.user_attrs[StudyAttr.TRAIN_IMAGES] == 9
    assert len(study.trials) == 4 and all(Attr.REPLAYED_FROM in t.user_attrs for t in study.trials)
    assert not (tmp_path / "r-artifacts").exists()

    from bench.report import write_report

    write_report(study, tmp_path / "report")
    assert "replayed from a recorded table" in (tmp_path / "report" / "index.html").read_text()

    from bench.record import main as again

    assert run_cli(again, ["--out", str(tmp_path / "fromstudy"), "--from-study", "record-table",
                           "--storage", args[args.index("--storage") + 1]]) == 0
    assert load_table(tmp_path / "fromstudy").fingerprint == table.fingerprint
