"""The search simulator: how a packed study searches, without training anything.

It runs the real path of a study (bench.runner.run_packs: ask under the budget, pack forming with
followers, backfill at epoch boundaries, report and prune through the trainer's own callback,
tell) with one piece swapped: `SimulatedTrainer.train` draws each member's per-epoch validation
accuracy from a synthetic landscape instead of training. The landscape depends on the architecture
(every shape field, plus a seeded interaction per shape signature, so exploring shapes pays) and on
the free knobs (learning rate per optimizer, loss, augmentation, dropout, schedule), with seeded
per-epoch noise. A 50-trial study takes about a second, so packed and solo searches can be compared
over paired repeats (`python -m bench.perf --simulate-search`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna

from bench.objective import AnsweringTrainer
from bench.packed import shape_signature
from bench.runner import run_packs
from bench.samplers import create_pruner, create_sampler
from bench.schema import Attr
from bench.space import AUGMENTATIONS, BASELINE, TrainConfig, build_space, config_from_params, params_for_config
from bench.stats import paired_diff
from bench.train import Member

CHANCE = 0.1
NOISE_SD = 0.006  # per-epoch validation noise: about the binomial noise of 5,000 validation images at 60%
CURVE_EPOCHS = 4.0  # epochs to reach 1 - 1/e of a run's final accuracy
LR_OPTIMUM = {"adam": 2e-3, "adamw": 2e-3, "rmsprop": 1e-3, "sgd": 3e-2}
WIDTH = {0.5: -0.04, 1.0: 0.0, 1.5: 0.015, 2.0: 0.025}
EXTRA_BLOCKS = {0: 0.0, 1: 0.02, 2: 0.015}
HIDDEN = {0: -0.02, 128: 0.0, 256: 0.005, 512: 0.005}
BATCH = {64: 0.005, 128: 0.0, 256: -0.01}
LOSS = {"ce": 0.0, "focal": -0.005, "mse": -0.02}
SCHEDULER = {"none": 0.0, "step": 0.005, "cosine": 0.01, "onecycle": 0.012, "plateau": 0.004}
# each augmentation's effect, in AUGMENTATIONS' order (crop, flip, colour jitter, rotation, affine, grayscale, erasing)
AUGMENT = dict(zip(AUGMENTATIONS, (0.02, 0.015, 0.003, -0.002, 0.002, -0.003, 0.004), strict=True))


def _unit(*key: object) -> float:
    """A reproducible number in [0, 1) for `key` (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big") / 2**64


def final_accuracy(cfg: TrainConfig, landscape: int) -> float:
    """The accuracy a run of `cfg` tends to, without noise."""
    shape = (0.60 + WIDTH.get(cfg.width, 0.0) + 0.03 * cfg.batch_norm + BATCH.get(cfg.batch_size, 0.0)
             + HIDDEN.get(cfg.hidden_units, 0.0))
    if cfg.conv_layout == "stages":
        shape += EXTRA_BLOCKS.get(cfg.extra_blocks, 0.0) + 0.01 * cfg.residual
    else:
        shape += 0.02
    shape += 0.06 * (_unit("shape", shape_signature(cfg), landscape) - 0.5)  # what no additive model predicts
    log_ratio = math.log10(cfg.lr / LR_OPTIMUM.get(cfg.optimizer, 2e-3))
    if abs(log_ratio) > 1.5:
        return CHANCE  # far off the optimizer's range: the run does not learn
    free = (-0.06 * log_ratio**2 + LOSS.get(cfg.loss, 0.0) + 0.02 * cfg.label_smoothing - 0.1 * cfg.label_smoothing**2
            + 0.04 * cfg.dropout - 0.1 * cfg.dropout**2 + SCHEDULER.get(cfg.scheduler, 0.0)
            + sum(v for k, v in AUGMENT.items() if getattr(cfg, k)))
    return float(min(0.95, max(CHANCE, shape + free)))


def accuracy_at(cfg: TrainConfig, epoch: int, seed: int, landscape: int) -> float:
    final = final_accuracy(cfg, landscape)
    noise = np.random.default_rng([landscape, seed, epoch]).normal(0.0, NOISE_SD)
    return float(min(1.0, max(0.0, CHANCE + (final - CHANCE) * (1 - math.exp(-epoch / CURVE_EPOCHS)) + noise)))


class SimulatedTrainer(AnsweringTrainer):
    """The trainer with training replaced by the landscape; suggesting, reporting, pruning and concluding are the
    trainer's own."""

    def __init__(self, space: tuple, landscape: int, seed: int = 0, grid_only: bool = False):
        super().__init__(space, seed=seed, grid_only=grid_only)
        self.landscape = landscape

    def member(self, trial: optuna.Trial, asked_seconds: float = 0.0) -> Member:
        cfg = self.suggest_config(trial, asked_seconds)
        seed = int(trial.user_attrs.get(Attr.SEED, self.settings.seed + trial.number))
        trial.set_user_attr(Attr.SEED, seed)
        return self.attach_reporting(trial, Member(None, cfg, seed))  # type: ignore[arg-type]

    def answer(self, member: Member, epoch: int) -> tuple[float, float, float]:
        acc = accuracy_at(member.cfg, epoch, member.seed, self.landscape)
        return 1.0 - acc, acc, 0.0

    def final_test_accuracy(self, member: Member, epoch: int) -> float:
        return accuracy_at(member.cfg, epoch, member.seed + 1, self.landscape)


@dataclass(frozen=True)
class SearchRun:
    pack: int
    repeat: int
    distinct_shapes: int
    best_value: float
    best_true: float  # the noiseless accuracy of the trial the study picked
    occupancy: float
    members_per_launch: float
    trials: int


def _study_from_baseline(sampler: str, repeat: int, max_epochs: int,
                         pruner: optuna.pruners.BasePruner | None) -> tuple[optuna.Study, SimulatedTrainer]:
    """An in-memory study on the landscape of `repeat`, its sampler seeded by `repeat` too (repeats are paired across
    pack and batch sizes), starting from the baseline as bench.run's does."""
    space = build_space(max_epochs)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize",
                                sampler=create_sampler(sampler, repeat, space), pruner=pruner)
    study.enqueue_trial(params_for_config(BASELINE, space))
    return study, SimulatedTrainer(space, landscape=repeat, grid_only=sampler == "grid")


def simulate_search(pack: int, trials: int, repeat: int, *, sampler: str = "tpe", pruner: str = "median",
                    max_epochs: int = 30, per_shape: int | None = None) -> SearchRun:
    """One study of `trials` on the landscape of `repeat`, with the sampler seeded by `repeat` too: repeats are
    paired across pack sizes. The study starts from the baseline, as bench.run's does."""
    study, trainer = _study_from_baseline(sampler, repeat, max_epochs, create_pruner(pruner, max_epochs))
    stats = run_packs(study, trainer, trials, pack=pack, gate=contextlib.nullcontext(),  # type: ignore[arg-type]
                      per_shape=per_shape, say=lambda line: None)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    shapes = {shape_signature(config_from_params(t.params)) for t in finished}
    best = study.best_trial
    return SearchRun(pack, repeat, len(shapes), float(best.value),
                     final_accuracy(config_from_params(best.params), repeat), stats.occupancy,
                     stats.members_per_launch, len(finished))


def plain_batch_search(batch: int, trials: int, repeat: int, *, sampler: str = "tpe", max_epochs: int = 30) -> float:
    """The reference for the packed search's cost: the best value of `trials` asked from the sampler in plain batches
    of `batch` (ask `batch`, then tell them all), with no bench runner, no pruning and no followers; each trial's value
    is its last epoch's on the landscape of `repeat`, as a run that is never pruned ends. What Optuna's own sampler
    loses by being asked `batch` at a time, whatever runs the trials."""
    study, trainer = _study_from_baseline(sampler, repeat, max_epochs, None)
    told = 0  # (not len(study.trials): the enqueued baseline is in it before it is asked)
    while told < trials:
        asked = []
        for _ in range(min(batch, trials - told)):
            trial = study.ask()
            member = trainer.member(trial)
            asked.append((trial, accuracy_at(member.cfg, member.cfg.epochs, member.seed, repeat)))
        for trial, value in asked:
            study.tell(trial, value)
        told += len(asked)
    return float(study.best_value)


def _against(values: np.ndarray, reference: np.ndarray, k: int) -> str:
    """The paired difference from the size-1 reference with its 95% interval ("-" for the reference itself)."""
    if k == 1:
        return "-"
    diff = paired_diff(values, reference)
    return f"{diff.mean:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]"


def compare_packs(packs: Sequence[int], repeats: int, trials: int, *, per_shape: int | None = None,
                  sampler: str = "tpe", pruner: str = "median", packed_trials: int | None = None,
                  plain_batches: bool = False) -> list[str]:
    """Lines: per pack size, distinct shapes, best value (and the paired difference from solo, 95% interval), mean
    occupancy and members per launch over `repeats` paired repeats. `packed_trials`: packed studies get that many
    trials while solo keeps `trials` (how many a packed study needs to find what solo finds). `plain_batches`: then
    the same repeats asked of the sampler in plain batches of each size (plain_batch_search), against batches of
    one: the price of asking in parallel, with no packing in it."""
    sizes = sorted(set(packs) | {1})
    packed_trials = trials if packed_trials is None else packed_trials
    budget_of = {k: trials if k == 1 else packed_trials for k in sizes}
    runs = {k: [simulate_search(k, budget_of[k], r, sampler=sampler, pruner=pruner, per_shape=per_shape)
                for r in range(repeats)] for k in sizes}
    solo = runs[1]
    budget = f"{trials} trials" + ("" if packed_trials == trials else f" solo, {packed_trials} packed")
    lines = [f"search simulator: {budget}, {sampler} + {pruner}, {repeats} paired repeats (synthetic landscape)",
             f"{'pack':>5} {'trials':>6} {'shapes':>7} {'of solo':>8} {'best val':>9} {'best - solo [95% CI]':>24} "
             f"{'occupancy':>10} {'per launch':>11}"]
    for k in sizes:
        rs = runs[k]
        shapes = np.mean([r.distinct_shapes for r in rs])
        best = np.array([r.best_value for r in rs])
        ci = _against(best, np.array([r.best_value for r in solo]), k)
        of_solo = shapes / np.mean([r.distinct_shapes for r in solo])
        lines.append(f"{k:>5} {budget_of[k]:>6} {shapes:>7.1f} {of_solo:>8.0%} "
                     f"{best.mean():>9.4f} {ci:>24} {np.mean([r.occupancy for r in rs]):>10.0%} "
                     f"{np.mean([r.members_per_launch for r in rs]):>11.1f}")
    if plain_batches:
        plain = {k: np.array([plain_batch_search(k, budget_of[k], r, sampler=sampler) for r in range(repeats)])
                 for k in sizes}
        lines += [f"reference: the {sampler} sampler asked in plain batches (ask K, tell K; no runner, no pruning, "
                  "no followers; same repeats)",
                  f"{'batch':>5} {'trials':>6} {'best val':>9} {'best - batch 1 [95% CI]':>26}"]
        for k in sizes:
            lines.append(f"{k:>5} {budget_of[k]:>6} {plain[k].mean():>9.4f} {_against(plain[k], plain[1], k):>26}")
    return lines
