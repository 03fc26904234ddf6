"""The improvement matrix as a design: which cells run, at which budget tier, compared with which.

Read by `bench.matrix` (what to run) and `bench.analysis` (what each row compares), so a cell's name,
config and reference are decided here once. Pure data: no torch, no Optuna.

- A level whose claim names its budget (the epochs and optimizer levels) runs at those epochs only.
- Every other level runs at each selected budget tier (BUDGET_TIERS: the baseline's 5 epochs and the 20 the
  assignment moves to), compared with the baseline recipe at the same epochs: "baseline" at 5, "20 epochs"
  (the baseline recipe at 20, which is also the epochs level) at 20.
- The cumulative path adds the levels of each step to all before it; a step whose config equals a cell
  already in the design reuses that cell (+20 epochs is the "20 epochs" cell) instead of training it twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.space import BASELINE, BUDGET_TIERS, CUMULATIVE_PATH, FACTORS, MATRIX_LEVELS, Level, TrainConfig

BASELINE_CELL = "baseline"


@dataclass(frozen=True)
class Cell:
    """One trial of the design: a cell (a config under a name) at one seed."""

    name: str
    factor: str
    config: TrainConfig
    seed: int
    budget: int  # the tier's epochs before --epochs-scale


@dataclass(frozen=True)
class Row:
    """One row of the matrix: a level at one budget tier, and the cell that runs it."""

    level: Level
    budget: int
    cell: str


@dataclass(frozen=True)
class PathStep:
    label: str
    cell: str
    budget: int


def parse_budgets(text: str) -> tuple[int, ...]:
    """'5,20' -> (5, 20); raises ValueError with what is wrong."""
    try:
        budgets = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"--budgets takes comma-separated epochs such as 5,20, got {text!r}") from None
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"--budgets needs one or more epochs of at least 1, got {text!r}")
    return budgets


def tier_reference(budget: int, levels: Sequence[Level] = MATRIX_LEVELS) -> str:
    """The cell holding the baseline recipe at `budget` epochs."""
    if budget == BASELINE.epochs:
        return BASELINE_CELL
    for level in levels:  # "20 epochs" is the baseline recipe at 20
        if level.budgets is not None and budget in level.budgets and level.config(budget) == BASELINE.replace(epochs=budget):
            return level.name
    return f"{BASELINE_CELL} @{budget} ep"


def level_budgets(level: Level, budgets: Iterable[int]) -> tuple[int, ...]:
    """The tiers `level` runs at among the selected `budgets`."""
    budgets = tuple(budgets)
    return tuple(b for b in level.budgets if b in budgets) if level.budgets is not None else budgets


def cell_name(level: Level, budget: int) -> str:
    if level.budgets is not None or budget == BASELINE.epochs:
        return level.name
    return f"{level.name} @{budget} ep"


def resolve_reference(reference: str, budget: int, levels: Sequence[Level] = MATRIX_LEVELS) -> str:
    """A claim's reference (a level name, or 'baseline') as the cell it means at `budget`."""
    if reference == BASELINE_CELL:
        return tier_reference(budget, levels)
    by_name = {level.name: level for level in levels}
    if reference not in by_name:
        raise ValueError(f"unknown reference level {reference!r}")
    return cell_name(by_name[reference], budget)


def matrix_rows(budgets: Sequence[int] = BUDGET_TIERS, levels: Sequence[Level] = MATRIX_LEVELS) -> list[Row]:
    """The matrix rows in report order: factor by factor, each level at its tiers."""
    rows = [Row(level, b, cell_name(level, b)) for level in levels for b in level_budgets(level, budgets)]
    return sorted(rows, key=lambda r: (FACTORS.index(r.level.factor), r.budget))


def _path(levels: Sequence[Level], cumulative: Sequence[tuple[str, Sequence[str]]],
          base: TrainConfig) -> list[tuple[str, TrainConfig]]:
    by_name = {level.name: level for level in levels}
    steps, changes = [], {}
    for label, names in cumulative:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"cumulative step {label!r} names unknown levels: {missing}")
        for name in names:
            changes |= dict(by_name[name].changes)
        cfg = base.replace(**changes)
        for name in names:  # tier-dependent settings at the path's epochs (StepLR at 20: step 10)
            cfg = cfg.replace(**by_name[name].at_budget.get(cfg.epochs, {}))
        steps.append((label, cfg))
    return steps


def design(levels: Sequence[Level] = MATRIX_LEVELS, cumulative: Sequence[tuple[str, Sequence[str]]] = CUMULATIVE_PATH,
           *, seeds: Sequence[int] = (0, 1, 2), budgets: Sequence[int] = BUDGET_TIERS, epochs_scale: float = 1.0,
           base: TrainConfig = BASELINE) -> list[Cell]:
    """Every cell x seed, in run order: tier by tier (baseline recipe, then its levels), then the cumulative path.
    A path step runs when its epochs are a selected tier."""
    groups: dict[str, tuple[str, TrainConfig, int]] = {}
    by_config: dict[TrainConfig, str] = {}

    def add(name: str, factor: str, cfg: TrainConfig, budget: int) -> str:
        if cfg in by_config:
            return by_config[cfg]
        groups[name] = (factor, cfg, budget)
        by_config[cfg] = name
        return name

    by_name = {level.name: level for level in levels}
    for budget in budgets:
        reference = tier_reference(budget, levels)
        add(reference, by_name[reference].factor if reference in by_name else "baseline", base.replace(epochs=budget), budget)
        for level in levels:
            if budget in level_budgets(level, budgets):
                add(cell_name(level, budget), level.factor, level.config(budget, base), budget)
    for k, (label, cfg) in enumerate(_path(levels, cumulative, base), start=1):
        if cfg.epochs in budgets:
            add(path_cell_name(k, label), "cumulative", cfg, cfg.epochs)
    return [Cell(name, factor, scale_epochs(cfg, epochs_scale), seed, budget)
            for name, (factor, cfg, budget) in groups.items() for seed in seeds]


CUMULATIVE_PREFIX = "cumulative: "


def path_cell_name(k: int, label: str) -> str:
    return f"{CUMULATIVE_PREFIX}{k:02d}. {label}"


def cumulative_steps(levels: Sequence[Level] = MATRIX_LEVELS,
                     cumulative: Sequence[tuple[str, Sequence[str]]] = CUMULATIVE_PATH,
                     base: TrainConfig = BASELINE) -> list[PathStep]:
    """The path from the baseline, each step with the cell that holds it (shared cells named as in the design)."""
    names = {c.config: c.name for c in design(levels, cumulative, seeds=(0,), budgets=_all_budgets(levels, cumulative, base),
                                              base=base)}
    steps = [PathStep(BASELINE_CELL, BASELINE_CELL, base.epochs)]
    for k, (label, cfg) in enumerate(_path(levels, cumulative, base), start=1):
        steps.append(PathStep(f"{k:02d}. {label}", names.get(cfg, path_cell_name(k, label)), cfg.epochs))
    return steps


def _all_budgets(levels: Sequence[Level], cumulative: Sequence[tuple[str, Sequence[str]]],
                 base: TrainConfig) -> tuple[int, ...]:
    tiers = set(BUDGET_TIERS) | {b for level in levels for b in (level.budgets or ())}
    tiers |= {cfg.epochs for _, cfg in _path(levels, cumulative, base)} | {base.epochs}
    return tuple(sorted(tiers))


def scale_epochs(cfg: TrainConfig, scale: float) -> TrainConfig:
    return cfg.replace(epochs=max(1, round(cfg.epochs * scale)))


def select(cells: Sequence[Cell], only: str | None, levels: Sequence[Level] = MATRIX_LEVELS) -> list[Cell]:
    """`--only NAME[,NAME...]`: cells by name, level name (every tier of it) or factor ('cumulative', 'baseline')."""
    if not only:
        return list(cells)
    wanted = [part.strip() for part in only.split(",") if part.strip()]
    by_level = {level.name: level for level in levels}
    names = {c.name for c in cells}
    factors = {c.factor for c in cells}
    chosen: set[str] = set()
    for want in wanted:
        if want in by_level:
            chosen |= {c.name for c in cells if c.name == want or c.name.startswith(f"{want} @")}
        elif want in names:
            chosen.add(want)
        elif want in factors:
            chosen |= {c.name for c in cells if c.factor == want}
        else:
            raise ValueError(f"--only {want!r} is no cell, level or factor of this design; see --dry-run for the names")
    return [c for c in cells if c.name in chosen]


# Epochs below which each per-epoch technique cannot change anything. StepLR first decays after
# step_size epochs, which matters from epoch step_size + 1; cosine's first step lands after
# epoch 1; ReduceLROnPlateau (patience 1) lowers the lr after 3 epochs at the earliest and
# that only matters from epoch 4. Early stopping with patience p stops after epoch p+1 at
# the earliest, which cuts training short only when E >= p+2.
def inert_techniques(cfg: TrainConfig) -> list[str]:
    """Why each training technique of `cfg` can have no effect at its epoch budget (empty when all can act)."""
    reasons = []
    first_effect = {"step": cfg.step_size + 1, "cosine": 2, "plateau": 4}
    if cfg.scheduler in first_effect and cfg.epochs < first_effect[cfg.scheduler]:
        reasons.append(f"{cfg.scheduler} scheduler changes the lr only after the last of {cfg.epochs} epoch(s)")
    if cfg.early_stopping and cfg.epochs < cfg.early_stopping + 2:
        reasons.append(f"early stopping (patience {cfg.early_stopping}) cannot stop a {cfg.epochs}-epoch run early")
    return reasons
