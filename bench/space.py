"""The search space, declared once as data.

Every knob of the assignment's improvement matrix is one `Param`: its name (which is
also the field of `TrainConfig` it sets), its Optuna distribution, the condition under
which it is active, and the matrix factor it belongs to. The objective suggests from
this table, the matrix design and the report read their factors and levels from it;
no other module spells a parameter name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

FACTORS: tuple[str, ...] = ("epochs", "optimizer", "loss", "augmentation", "architecture", "training")
EPOCHS_PARAM = "epochs"  # the knob that sets a run's budget (the report and the claims read budgets from it)
EARLY_STOPPING_PARAM = "early_stopping"  # patience; 0 = off (bench.record fixes it off: every run trains every epoch)
_SHAPE = "shape"  # TrainConfig field metadata: the field changes tensor shapes or the graph


def _shape(default: Any) -> Any:
    """A TrainConfig field that changes tensor shapes or the graph: only trials that agree on all of them can share a
    pack (bench.packed). Dropout is not one: every packed head has its dropout layers, with p = 0 for members
    without dropout."""
    return dataclasses.field(default=default, metadata={_SHAPE: True})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run; the defaults are the assignment's baseline."""

    # epochs
    epochs: int = 5
    batch_size: int = _shape(128)
    # optimizer
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    # loss
    loss: str = "ce"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    # augmentation (crop + flip are the baseline's)
    crop: bool = True
    crop_padding: int = 0  # 0 = the dataset's own (4 for CIFAR-10, 3 for Fashion-MNIST)
    flip: bool = True
    color_jitter: bool = False
    jitter_strength: float = 0.2
    rotation: bool = False
    rotation_degrees: float = 15.0
    affine: bool = False
    affine_shear: float = 10.0
    affine_scale: float = 0.2
    grayscale: bool = False
    grayscale_p: float = 0.1
    erasing: bool = False
    erasing_p: float = 0.2
    # architecture
    conv_layout: str = _shape("stages")  # "stages": TinyCNN's conv-pool stages; "assignment": the assignment's printed block
    extra_blocks: int = _shape(0)
    width: float = _shape(1.0)
    batch_norm: bool = _shape(False)
    dropout: float = 0.0
    residual: bool = _shape(False)
    hidden_units: int = _shape(128)
    # training technique
    scheduler: str = "none"
    step_size: int = 2  # StepLR as the assignment's how-to writes it: halve the lr every 2 epochs
    step_gamma: float = 0.5
    early_stopping: int = 0
    grad_clip: float = 0.0

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


BASELINE = TrainConfig()
CONFIG_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# the fields trials must agree on to share a pack (bench.packed.shape_signature), in declaration order
SHAPE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get(_SHAPE))


@dataclass(frozen=True)
class Param:
    """One searchable knob.

    `when` is a condition on an earlier parameter: (name, allowed values). An inactive
    parameter is not suggested and keeps its `TrainConfig` default. `grid` lists the
    values `--sampler grid` enumerates (parameters without one stay at the baseline).
    """

    name: str
    distribution: BaseDistribution
    factor: str
    when: tuple[str, tuple[Any, ...]] | None = None
    grid: tuple[Any, ...] | None = None
    help: str = ""


@dataclass(frozen=True)
class Level:
    """One level of the improvement matrix: a named change to the baseline.

    `budgets`: the epochs it runs at when its claim names them (the epochs and optimizer claims); None: the claim
    names no budget, so it runs at every tier of BUDGET_TIERS. `at_budget`: changes that depend on the tier (the
    assignment writes StepLR one way beside 5 epochs and another beside 20)."""

    factor: str
    name: str
    changes: Mapping[str, Any]
    budgets: tuple[int, ...] | None = None
    at_budget: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def config(self, epochs: int, base: TrainConfig | None = None) -> TrainConfig:
        """The level's training config at a budget tier of `epochs`."""
        base = BASELINE if base is None else base
        return base.replace(**{"epochs": epochs, **self.changes, **self.at_budget.get(epochs, {})})


def _cat(*choices: Any) -> CategoricalDistribution:
    return CategoricalDistribution(choices)


OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw")
LOSSES = ("ce", "focal", "mse")
SCHEDULERS = ("none", "step", "cosine", "onecycle", "plateau")
CONV_LAYOUTS = ("stages", "assignment")
AUGMENTATIONS = ("crop", "flip", "color_jitter", "rotation", "affine", "grayscale", "erasing")


def build_space(max_epochs: int = 30) -> tuple[Param, ...]:
    """The whole improvement matrix as an Optuna search space."""
    on = (True,)
    return (
        Param("epochs", IntDistribution(1, max_epochs), "epochs", grid=tuple(sorted({min(5, max_epochs), max_epochs}))),
        Param("batch_size", _cat(64, 128, 256), "epochs"),
        Param("optimizer", _cat(*OPTIMIZERS), "optimizer", grid=OPTIMIZERS),
        Param("lr", FloatDistribution(1e-4, 1e-1, log=True), "optimizer"),
        Param("momentum", FloatDistribution(0.5, 0.99), "optimizer", when=("optimizer", ("sgd", "rmsprop"))),
        Param("nesterov", _cat(False, True), "optimizer", when=("optimizer", ("sgd",))),
        Param("weight_decay", _cat(0.0, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2), "optimizer"),
        Param("loss", _cat(*LOSSES), "loss", grid=LOSSES),
        Param("label_smoothing", FloatDistribution(0.0, 0.3), "loss", when=("loss", ("ce",))),
        Param("focal_gamma", FloatDistribution(0.5, 5.0), "loss", when=("loss", ("focal",))),
        Param("crop", _cat(False, True), "augmentation", grid=(False, True)),
        Param("crop_padding", IntDistribution(0, 8), "augmentation", when=("crop", on)),
        Param("flip", _cat(False, True), "augmentation", grid=(False, True)),
        Param("color_jitter", _cat(False, True), "augmentation", grid=(False, True)),
        Param("jitter_strength", FloatDistribution(0.05, 0.5), "augmentation", when=("color_jitter", on)),
        Param("rotation", _cat(False, True), "augmentation", grid=(False, True)),
        Param("rotation_degrees", FloatDistribution(5.0, 30.0), "augmentation", when=("rotation", on)),
        Param("affine", _cat(False, True), "augmentation", grid=(False, True)),
        Param("affine_shear", FloatDistribution(0.0, 20.0), "augmentation", when=("affine", on)),
        Param("affine_scale", FloatDistribution(0.0, 0.3), "augmentation", when=("affine", on)),
        Param("grayscale", _cat(False, True), "augmentation", grid=(False, True)),
        Param("grayscale_p", FloatDistribution(0.05, 0.5), "augmentation", when=("grayscale", on)),
        Param("erasing", _cat(False, True), "augmentation", grid=(False, True)),
        Param("erasing_p", FloatDistribution(0.05, 0.5), "augmentation", when=("erasing", on)),
        Param("conv_layout", _cat(*CONV_LAYOUTS), "architecture",
              help="stages: conv-[BN]-ReLU-pool per stage (TinyCNN); assignment: the assignment's printed block, "
                   "conv-BN-ReLU, conv-BN-ReLU, pool, conv-ReLU-Dropout, pool"),
        Param("extra_blocks", IntDistribution(0, 2), "architecture", grid=(0, 1, 2), when=("conv_layout", ("stages",))),
        Param("width", _cat(0.5, 1.0, 1.5, 2.0), "architecture", grid=(1.0, 2.0)),
        Param("batch_norm", _cat(False, True), "architecture", grid=(False, True)),
        Param("dropout", FloatDistribution(0.0, 0.5), "architecture"),
        Param("residual", _cat(False, True), "architecture", grid=(False, True), when=("conv_layout", ("stages",))),
        Param("hidden_units", _cat(0, 128, 256, 512), "architecture"),
        Param("scheduler", _cat(*SCHEDULERS), "training", grid=SCHEDULERS),
        Param("step_size", IntDistribution(1, 10), "training", when=("scheduler", ("step",))),
        Param("step_gamma", FloatDistribution(0.1, 0.9), "training", when=("scheduler", ("step",))),
        Param("early_stopping", IntDistribution(0, 5), "training"),
        Param("grad_clip", _cat(0.0, 0.5, 1.0, 5.0), "training"),
    )


def fixed_budget_space(epochs: int) -> tuple[Param, ...]:
    """The search space with the epochs fixed to `epochs` and early stopping off: every run trains every epoch. The space
    of recorded tables (bench.record) and of compared searches (bench.compare): the budget is what the searches spend,
    not a knob they tune (a pruner's early stops are the only shortened runs)."""
    fixed = {EPOCHS_PARAM: IntDistribution(epochs, epochs),
             EARLY_STOPPING_PARAM: IntDistribution(0, 0)}
    return tuple(dataclasses.replace(p, distribution=fixed[p.name], grid=(fixed[p.name].low,)) if p.name in fixed else p
                 for p in build_space(epochs))


def _check_declaration(space: tuple[Param, ...]) -> None:
    seen: set[str] = set()
    for param in space:
        if param.name not in CONFIG_FIELDS:
            raise ValueError(f"space parameter {param.name!r} is not a TrainConfig field")
        if param.factor not in FACTORS:
            raise ValueError(f"space parameter {param.name!r} has unknown factor {param.factor!r}")
        if param.when is not None and param.when[0] not in seen:
            raise ValueError(f"{param.name!r} depends on {param.when[0]!r}, which must be declared before it")
        seen.add(param.name)


_check_declaration(build_space())


def is_active(param: Param, params: Mapping[str, Any]) -> bool:
    if param.when is None:
        return True
    parent, allowed = param.when
    return parent in params and params[parent] in allowed


def suggest(trial: optuna.Trial, space: tuple[Param, ...], *, grid_only: bool = False) -> dict[str, Any]:
    """Suggest every active parameter; returns only what was suggested."""
    params: dict[str, Any] = {}
    for param in space:
        if not is_active(param, params) or (grid_only and param.grid is None):
            continue
        dist = param.distribution
        if isinstance(dist, FloatDistribution):
            value: Any = trial.suggest_float(param.name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            value = trial.suggest_int(param.name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, CategoricalDistribution):
            value = trial.suggest_categorical(param.name, dist.choices)
        else:  # pragma: no cover - the declaration only uses the three above
            raise TypeError(f"unsupported distribution for {param.name}: {dist!r}")
        params[param.name] = value
    return params


def config_from_params(params: Mapping[str, Any], base: TrainConfig = BASELINE) -> TrainConfig:
    unknown = set(params) - CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown parameters: {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **params)


def params_for_config(config: TrainConfig, space: tuple[Param, ...]) -> dict[str, Any]:
    """The active parameters of `config`, as the objective would suggest them (for enqueueing)."""
    values = dataclasses.asdict(config)
    params: dict[str, Any] = {}
    for param in space:
        if is_active(param, params):
            params[param.name] = values[param.name]
    return params


def grid_search_space(space: tuple[Param, ...]) -> dict[str, list[Any]]:
    return {p.name: list(p.grid) for p in space if p.grid is not None}


# Reference models of the course material, as changes to the baseline. SimpleCNN's
# Normalize(0.5, 0.5) is not reproduced: the harness normalises per dataset.
PRESETS: dict[str, Mapping[str, Any]] = {
    "tinycnn": {},
    "simplecnn": {
        "hidden_units": 512, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
        "batch_size": 64, "epochs": 10, "crop": False, "flip": False,
    },
    "bn-cnn": {"extra_blocks": 1, "batch_norm": True, "hidden_units": 0},
    "improved": {"extra_blocks": 1, "batch_norm": True, "dropout": 0.3},
}


def preset_config(name: str, max_epochs: int | None = None) -> TrainConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    config = config_from_params(PRESETS[name])
    if max_epochs is not None:
        config = config.replace(epochs=min(config.epochs, max_epochs))
    return config


# The assignment's improvement matrix: each level is a change to the baseline.
# bench/claims.json holds the claims in numeric form (each citing the SPEC claim C1-C11 it encodes), the
# reference each level is compared with, and the budget each claim is about. The epochs and optimizer
# claims name 20 epochs, so those levels run at 20 only. The other claims name no budget: they are tested
# at both BUDGET_TIERS, each level against the baseline recipe at the same epochs.
BUDGET_TIERS: tuple[int, ...] = (BASELINE.epochs, 20)  # the baseline's 5; the 20 the assignment moves to first

MATRIX_LEVELS: tuple[Level, ...] = (
    Level("epochs", "20 epochs", {"epochs": 20}, budgets=(20,)),
    Level("optimizer", "Adam lr 1e-3", {"epochs": 20, "lr": 1e-3}, budgets=(20,)),
    Level("optimizer", "SGD lr 0.01 momentum 0.9", {"epochs": 20, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
          budgets=(20,)),
    Level("optimizer", "RMSprop lr 1e-3", {"epochs": 20, "optimizer": "rmsprop", "lr": 1e-3, "momentum": 0.0},
          budgets=(20,)),
    Level("optimizer", "AdamW lr 1e-3", {"epochs": 20, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2},
          budgets=(20,)),
    Level("loss", "label smoothing 0.1", {"label_smoothing": 0.1}),
    Level("loss", "focal loss", {"loss": "focal", "focal_gamma": 2.0}),
    Level("loss", "MSE", {"loss": "mse"}),
    Level("augmentation", "no crop/flip", {"crop": False, "flip": False}),
    Level("augmentation", "+ color jitter", {"color_jitter": True}),
    Level("augmentation", "+ rotation 15", {"rotation": True}),
    Level("augmentation", "+ affine", {"affine": True}),
    Level("augmentation", "+ grayscale 0.1", {"grayscale": True}),
    Level("augmentation", "+ erasing 0.2", {"erasing": True}),
    Level("augmentation", "+ all augmentations", {
        "color_jitter": True, "rotation": True, "affine": True, "grayscale": True, "erasing": True,
    }),
    Level("architecture", "extra conv layers", {"extra_blocks": 1}),
    Level("architecture", "BatchNorm", {"batch_norm": True}),
    Level("architecture", "Dropout 0.3", {"dropout": 0.3}),
    Level("architecture", "residual blocks", {"residual": True}),
    Level("architecture", "wider channels", {"width": 2.0}),
    Level("architecture", "assignment's conv block", {"conv_layout": "assignment", "batch_norm": True, "dropout": 0.3}),
    # SPEC C11: StepLR(opt, step_size=2, gamma=0.5) in the how-to (beside 5 epochs), step_size=10 in the matrix (20)
    Level("training", "StepLR", {"scheduler": "step"},
          at_budget={5: {"step_size": 2, "step_gamma": 0.5}, 20: {"step_size": 10, "step_gamma": 0.5}}),
    Level("training", "cosine", {"scheduler": "cosine"}),
    Level("training", "early stopping", {"early_stopping": 3}),
    Level("training", "gradient clipping", {"grad_clip": 1.0}),
)

# The assignment's cumulative path: each step adds its levels to everything before it.
CUMULATIVE_PATH: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("+20 epochs", ("20 epochs",)),
    ("+SGD momentum", ("SGD lr 0.01 momentum 0.9",)),
    ("+full augmentation", ("+ all augmentations",)),
    ("+BN/Dropout/deeper", ("assignment's conv block",)),
    ("+StepLR", ("StepLR",)),
)
