"""Replay: answer a study's trials from a recorded table (bench.record) instead of training.

`ReplayTrainer` is the trial trainer with one piece swapped, as bench.simulate's `SimulatedTrainer` is: suggesting
(with the sampler's time recorded), reporting each epoch to Optuna, pruning and concluding are the trainer's own; `train`
reads each epoch's train loss, validation accuracy, test accuracy and seconds from the table. A suggested config is
answered by the recorded config with the same active knobs where one exists, else by its nearest neighbour
(`Lookup`), and by the seed column a stable hash of (repeat, row) picks, so every arm of a comparison that proposes
a config in repeat r sees the same recorded noise (paired).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.distributions import FloatDistribution, IntDistribution

from bench.objective import AnsweringTrainer
from bench.schema import Attr
from bench.space import Param
from bench.table import RecordedTable, active_params, config_key, load_table
from bench.train import Member

__all__ = ["ReplayTrainer", "Lookup", "load_table", "seed_column"]

CATEGORICAL_MISMATCH = 1e3  # distance of a categorical (or bool) knob that differs: any numeric distance is smaller
ACTIVE_MISMATCH = 1e6  # distance of a knob active in one config only (used when no recorded config has the same set)


def seed_column(repeat: int, row: int, columns: int) -> int:
    """The seed column (0..columns-1) for `row` in `repeat`: a stable hash, the same in every arm and process."""
    digest = hashlib.sha256(f"replay:{repeat}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % columns


def _scaled(p: Param, value: float) -> float:
    """A numeric knob's value in [0, 1] of its distribution's range (log-scaled knobs in log space)."""
    dist = p.distribution
    assert isinstance(dist, FloatDistribution | IntDistribution)
    low, high, v = float(dist.low), float(dist.high), float(value)
    if dist.log:
        low, high, v = math.log(low), math.log(high), math.log(v)
    return 0.0 if high == low else (v - low) / (high - low)


class Lookup:
    """The recorded row that answers a config.

    Exact: a row with the same active knobs and values. Otherwise the nearest row among those with the SAME set of
    active knobs: Euclidean distance over numeric knobs scaled to [0, 1] by their bounds (log-scaled ones in log
    space), plus CATEGORICAL_MISMATCH for each categorical or bool knob that differs; inactive knobs are never compared
    (momentum under Adam says nothing). When no row has the same active set, every row is a candidate, with
    ACTIVE_MISMATCH for each knob active in one of the two only. Ties go to the lower row."""

    def __init__(self, table: RecordedTable):
        self.space, self.fixed = table.space, table.fixed
        self.numeric_knob = np.array([isinstance(p.distribution, FloatDistribution | IntDistribution) for p in self.space])
        self.exact = {config_key(c): row for row, c in reversed(list(enumerate(table.configs)))}  # first row wins
        vectors = [self._vector(c) for c in table.configs]
        self.active = np.array([v[0] for v in vectors]).reshape(len(vectors), len(self.space))
        self.values = np.array([v[1] for v in vectors]).reshape(len(vectors), len(self.space))
        self.memo: dict[str, int] = {}

    def _vector(self, params: Mapping[str, object]) -> tuple[list[bool], list[float]]:
        """Per knob: active, and its value (scaled if numeric, the choice's index if categorical; NaN inactive)."""
        active, values = [], []
        for p in self.space:
            on = p.name in params
            active.append(on)
            if not on:
                values.append(math.nan)
            elif isinstance(p.distribution, FloatDistribution | IntDistribution):
                values.append(_scaled(p, params[p.name]))  # type: ignore[arg-type]
            else:
                choices = p.distribution.choices  # type: ignore[attr-defined]
                values.append(float(next((i for i, c in enumerate(choices) if _same(c, params[p.name])), -1)))
        return active, values

    def params(self, values: Mapping[str, object]) -> dict[str, object]:
        """The active knobs of a config given by its field values (a TrainConfig's asdict)."""
        return active_params(values, self.space, self.fixed)

    def row(self, params: Mapping[str, object]) -> int:
        key = config_key(params)
        if key in self.exact:
            return self.exact[key]
        if key not in self.memo:
            self.memo[key] = self._nearest(params)
        return self.memo[key]

    def distances(self, params: Mapping[str, object]) -> np.ndarray:
        """Squared distance from `params` to every row (with the active-set penalty)."""
        q_active, q_values = (np.array(x) for x in self._vector(params))
        both = self.active & q_active
        numeric = both & self.numeric_knob
        diff = np.where(numeric, self.values - q_values, 0.0)
        mismatch = (both & ~self.numeric_knob & (self.values != q_values)).sum(1)
        differing = (self.active != q_active).sum(1)
        return (diff ** 2).sum(1) + CATEGORICAL_MISMATCH ** 2 * mismatch + ACTIVE_MISMATCH ** 2 * differing

    def _nearest(self, params: Mapping[str, object]) -> int:
        q_active = np.array(self._vector(params)[0])
        same = (self.active == q_active).all(1)
        d = self.distances(params)
        if same.any():
            d = np.where(same, d, np.inf)
        return int(np.argmin(d))


def _same(a: object, b: object) -> bool:
    """Equal and of one kind: False is not 0.0, 1 is not True (categorical choices mix them)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@dataclass
class ReplayMember(Member):
    """A member answered from the table: its row and seed column."""

    row: int = 0
    column: int = 0


class ReplayTrainer(AnsweringTrainer):
    """The trainer with training replaced by a recorded table; suggesting, reporting, pruning and concluding are the
    trainer's own."""

    def __init__(self, table: RecordedTable, space: Sequence[Param], *, repeat: int, seed: int = 0,
                 grid_only: bool = False):
        super().__init__(space, seed=seed, grid_only=grid_only)
        self.table, self.repeat = table, repeat
        self.lookup = Lookup(table)
        self.train_images = table.train_images

    def member(self, trial: optuna.Trial, asked_seconds: float = 0.0) -> Member:
        cfg = self.suggest_config(trial, asked_seconds)
        cfg = cfg.replace(**self.table.fixed)  # the recording's epochs, early stopping off
        row = self.lookup.row(self.lookup.params(dataclasses.asdict(cfg)))
        columns = self.table.columns(row)
        column = columns[seed_column(self.repeat, row, len(columns))]
        seed = int(self.table.seeds[row, column])
        data = self.table.meta.get("data", {})
        attrs = {Attr.SEED: seed, Attr.REPLAYED_FROM: row, Attr.DEVICE: "replay", Attr.TRAIN_IMAGES: self.table.train_images}
        if data.get("classes"):
            attrs[Attr.NUM_CLASSES] = len(data["classes"])
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        member = ReplayMember(None, cfg, seed, row=row, column=column)  # type: ignore[arg-type]
        return self.attach_reporting(trial, member)

    def answer(self, member: Member, epoch: int) -> tuple[float, float, float]:
        assert isinstance(member, ReplayMember)
        t, at = self.table, (member.row, member.column, epoch - 1)
        seconds = float(t.seconds[at]) if math.isfinite(t.seconds[at]) else 0.0
        return float(t.train_loss[at]), float(t.val_acc[at]), seconds  # a NaN loss: the recorded run diverged there

    def final_test_accuracy(self, member: Member, epoch: int) -> float:
        assert isinstance(member, ReplayMember)
        return float(self.table.test_acc[member.row, member.column, epoch - 1])
