"""Recorded tables: every epoch of N configs x S seeds, stored as plain arrays so a search can be replayed.

The format follows syne-tune's blackboxes and HPOBench's tabular benchmarks: arrays, the search space as data, and
metadata that says what was measured where. A table is a directory:

- `table.npz`: float arrays `train_loss`, `val_acc`, `test_acc`, `seconds`, each [configs, seeds, epochs] (NaN
  where a run stopped or diverged, and for a seed a config lacks), and int `seeds` [configs, seeds] (-1: none);
- `configs.json`: one dict per config (row order) with its ACTIVE knobs only;
- `meta.json`: the space (each Param's name, `optuna.distributions.distribution_to_json`, factor, condition and
  grid), the knobs the recording fixed (the epochs, early stopping off), the fingerprint, and where and how it was
  recorded (data fingerprint, code version, device, torch version, pack size, budget, recording time).

No torch here: reading a table needs none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import FrozenTrial, TrialState

import bench
from bench.errors import UsageError
from bench.schema import Attr, StudyAttr
from bench.space import (
    EARLY_STOPPING_PARAM,
    EPOCHS_PARAM,
    Param,
    TrainConfig,
    config_from_params,
    is_active,
)
from bench.storage import StudyMeta, space_signature

TABLE_FORMAT = 1
CURVES = ("train_loss", "val_acc", "test_acc", "seconds")  # the [configs, seeds, epochs] arrays
ARRAYS_FILE, CONFIGS_FILE, META_FILE = "table.npz", "configs.json", "meta.json"
NO_SEED = -1  # a seed column this config lacks (its trial failed, or fewer seeds ran for it)


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value; a table is compared by fingerprint
class RecordedTable:
    train_loss: np.ndarray
    val_acc: np.ndarray
    test_acc: np.ndarray
    seconds: np.ndarray
    seeds: np.ndarray
    configs: tuple[dict[str, Any], ...]
    space: tuple[Param, ...]  # the free knobs (fixed ones excluded): what a replayed study searches
    fixed: dict[str, Any]  # knobs the recording held constant (the epochs, early stopping off)
    meta: dict[str, Any]

    @property
    def epochs(self) -> int:
        return int(self.train_loss.shape[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, s, e = self.train_loss.shape
        return int(c), int(s), int(e)

    @property
    def train_images(self) -> int:
        return int(self.meta.get("train_images") or 0)

    @cached_property
    def fingerprint(self) -> str:
        """A short sha256 of the arrays and the configs: the same table gives the same fingerprint anywhere."""
        h = hashlib.sha256()
        for name in (*CURVES, "seeds"):
            arr = np.ascontiguousarray(getattr(self, name))
            if arr.dtype.kind == "f":
                arr = np.where(np.isnan(arr), np.nan, arr)  # one NaN bit pattern, whatever produced it
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr.tobytes())
        h.update(json.dumps(list(self.configs), sort_keys=True).encode())
        return h.hexdigest()[:12]

    def config(self, row: int) -> TrainConfig:
        """The training config of a row: its active knobs on top of the fixed ones (and the baseline's defaults)."""
        return config_from_params({**self.fixed, **self.configs[row]})

    def columns(self, row: int) -> list[int]:
        """The seed columns this row has (all S for a complete recording)."""
        return [int(j) for j in np.flatnonzero(self.seeds[row] != NO_SEED)]

    def study_meta(self) -> StudyMeta:
        """What a replayed study keeps across runs (bench.storage.open_study refuses another table's data or space)."""
        data = self.meta.get("data", {})
        return StudyMeta(str(data.get("source", "unknown")), space_signature(self.space),
                         int(self.meta.get("image_size") or 0), float(self.meta.get("val_split") or 0.0),
                         self.meta.get("train_subset"))

    def budget_attrs(self) -> dict[str, Any]:
        """The study attributes bench.cli.record_budget writes from live data, here from the recording's metadata."""
        data = self.meta.get("data", {})
        attrs = {StudyAttr.TRAIN_IMAGES: self.meta.get("train_images"), StudyAttr.VAL_IMAGES: data.get("val_images"),
                 StudyAttr.VAL_IS_TEST: data.get("val_is_test"), StudyAttr.DATA_CLASSES: data.get("classes"),
                 StudyAttr.DATA_CHANNELS: data.get("channels"), StudyAttr.DATA_IMAGE_SIZE: data.get("image_size"),
                 StudyAttr.DATA_TRAIN_IMAGES: data.get("train_images_total"), StudyAttr.MAX_EPOCHS: self.epochs}
        return {k: v for k, v in attrs.items() if v is not None}

    def describe(self) -> str:
        c, s, e = self.shape
        return f"{c} configs x {s} seeds x {e} epochs (fingerprint {self.fingerprint})"

    def save(self, path: Path) -> None:
        """Write the table directory (each file replaced whole: a crash never leaves half a file)."""
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": TABLE_FORMAT, "fingerprint": self.fingerprint,
                "shape": list(self.shape),  # [configs, seeds, epochs]
                "space": [param_to_json(p) for p in self.space], "fixed": self.fixed, **self.meta}
        arrays = {name: np.asarray(getattr(self, name), dtype=np.float64) for name in CURVES}
        _replace(path / ARRAYS_FILE, lambda f: np.savez_compressed(f, **arrays, seeds=self.seeds.astype(np.int64)))
        _replace(path / CONFIGS_FILE, lambda f: f.write(json.dumps(list(self.configs), indent=1).encode()))
        _replace(path / META_FILE, lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))

    def size_bytes(self, path: Path) -> int:
        return sum((path / name).stat().st_size for name in (ARRAYS_FILE, CONFIGS_FILE, META_FILE))


def _replace(target: Path, write: Any) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, target)


# --- the space as data ------------------------------------------------------------------------


def param_to_json(p: Param) -> dict[str, Any]:
    # distribution_to_json's string parsed, so meta.json reads as one JSON document
    return {"name": p.name, "distribution": json.loads(distribution_to_json(p.distribution)), "factor": p.factor,
            "when": None if p.when is None else [p.when[0], list(p.when[1])],
            "grid": None if p.grid is None else list(p.grid), "help": p.help}


def param_from_json(d: Mapping[str, Any]) -> Param:
    when = d.get("when")
    grid = d.get("grid")
    return Param(str(d["name"]), json_to_distribution(json.dumps(d["distribution"])), str(d["factor"]),
                 when=None if when is None else (str(when[0]), tuple(when[1])),
                 grid=None if grid is None else tuple(grid), help=str(d.get("help", "")))


def single_value(dist: BaseDistribution) -> tuple[bool, Any]:
    """(True, value) when the distribution allows one value only: a knob the recording fixed."""
    if isinstance(dist, CategoricalDistribution) and len(dist.choices) == 1:
        return True, dist.choices[0]
    if isinstance(dist, FloatDistribution | IntDistribution) and dist.low == dist.high:
        return True, dist.low
    return False, None


def fixed_knobs(space: Sequence[Param]) -> dict[str, Any]:
    return {p.name: value for p in space for one, value in [single_value(p.distribution)] if one}


def active_params(values: Mapping[str, Any], space: Sequence[Param], fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The knobs of `space` that are active for a config with these field values, as the objective suggests them.
    Fixed knobs take part in conditions but are not returned."""
    seen: dict[str, Any] = dict(fixed or {})
    out: dict[str, Any] = {}
    for p in space:
        if is_active(p, seen):
            seen[p.name] = out[p.name] = values[p.name]
    return out


def config_key(params: Mapping[str, Any]) -> str:
    """One string per set of active knob values (JSON keeps bools, ints and floats apart, and floats exactly)."""
    return json.dumps(sorted(params.items()))


# --- reading ----------------------------------------------------------------------------------


def load_table(path: Path) -> RecordedTable:
    """Read a table directory; a missing or corrupt one is a one-line UsageError."""
    path = Path(path)
    missing = [name for name in (ARRAYS_FILE, CONFIGS_FILE, META_FILE) if not (path / name).is_file()]
    if missing:
        raise UsageError(f"no recorded table at {path} (missing {', '.join(missing)}); record one with "
                         f"`python -m bench.record --out {path}`")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        configs = json.loads((path / CONFIGS_FILE).read_text(encoding="utf-8"))
        with np.load(path / ARRAYS_FILE, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name], dtype=np.float64) for name in CURVES}
            seeds = np.asarray(npz["seeds"], dtype=np.int64)
        if meta.get("format") != TABLE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this bench reads {TABLE_FORMAT}")
        space = tuple(param_from_json(d) for d in meta.pop("space"))
        fixed = dict(meta.pop("fixed"))
        stored = meta.pop("fingerprint")
        meta.pop("format"), meta.pop("shape", None)
        table = RecordedTable(**arrays, seeds=seeds, configs=tuple(dict(c) for c in configs), space=space,
                              fixed=fixed, meta=meta)
        check(table)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"recorded table {path} is corrupt ({reason}); record it again with "
                         f"`python -m bench.record --out {path}`") from None
    if table.fingerprint != stored:
        raise UsageError(f"recorded table {path} is corrupt (its fingerprint is {table.fingerprint}, meta.json says "
                         f"{stored}); record it again with `python -m bench.record --out {path}`")
    return table


def check(table: RecordedTable) -> None:
    """The shapes agree and every config names knobs of the space: ValueError otherwise."""
    shape = table.train_loss.shape
    if len(shape) != 3 or 0 in shape:
        raise ValueError(f"train_loss has shape {shape}, not [configs, seeds, epochs]")
    for name in CURVES:
        if getattr(table, name).shape != shape:
            raise ValueError(f"{name} has shape {getattr(table, name).shape}, train_loss {shape}")
    if table.seeds.shape != shape[:2]:
        raise ValueError(f"seeds has shape {table.seeds.shape}, not {shape[:2]}")
    if len(table.configs) != shape[0]:
        raise ValueError(f"{len(table.configs)} configs for {shape[0]} rows")
    names = {p.name for p in table.space}
    for row, params in enumerate(table.configs):
        if not set(params) <= names:
            raise ValueError(f"config {row} has knobs outside the space: {sorted(set(params) - names)}")
        if not table.columns(row):
            raise ValueError(f"config {row} has no seed")


# --- building from a study --------------------------------------------------------------------


def table_space(space: Sequence[Param], epochs: int) -> tuple[tuple[Param, ...], dict[str, Any]]:
    """The free knobs of a table recorded from `space` at `epochs`, and the fixed ones: the epochs, early stopping off
    (a table's curve is the whole run's) and every knob whose distribution allows one value."""
    fixed = {**fixed_knobs(space), EPOCHS_PARAM: epochs, EARLY_STOPPING_PARAM: 0}
    return tuple(p for p in space if p.name not in fixed), fixed


def _trial_config(t: FrozenTrial) -> TrainConfig | None:
    try:
        return config_from_params(t.params)
    except (ValueError, TypeError):
        return None


def _full_run(t: FrozenTrial, cfg: TrainConfig, epochs: int) -> bool:
    """The trial ran every epoch of `epochs` (or diverged on the way: its curve ends in NaN, still a full record)."""
    a = t.user_attrs
    if cfg.epochs != epochs or cfg.early_stopping:
        return False
    loss, val = a.get(Attr.LOSS_CURVE) or [], a.get(Attr.VAL_CURVE) or []
    if a.get(Attr.STOP_REASON) == "diverged":
        return t.state == TrialState.PRUNED and len(loss) == len(val) <= epochs
    return t.state == TrialState.COMPLETE and len(loss) == len(val) == epochs


def recorded_seconds(trials: Sequence[FrozenTrial]) -> float:
    """Wall time the trials took: the union of their start-to-end spans (packed trials overlap; resumed runs leave
    gaps that are not counted)."""
    spans = sorted((t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials
                   if t.datetime_start is not None and t.datetime_complete is not None)
    total, end = 0.0, -math.inf
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def table_from_study(study: optuna.Study, space: Sequence[Param], *, rows: Sequence[Mapping[str, Any]] | None = None,
                     seed_columns: Sequence[int] | None = None, meta: Mapping[str, Any] | None = None) -> RecordedTable:
    """A table from the finished trials of any study whose trials hold full curves.

    The epochs: the space's fixed epochs, else the most any trial ran; trials at other epochs, with early stopping
    on, pruned or failed are left out (their curves are not a whole run). Trials with identical active knobs are one
    config with several seeds. Test accuracy per epoch comes from `Attr.TEST_CURVE` (bench.record), else only the
    last epoch has one (`Attr.TEST_ACC`); seconds per epoch from `Attr.EPOCH_SECONDS`, else the trial's train seconds
    spread evenly. `rows`: the configs (active knobs) in table order, others left out (bench.record's design);
    `seed_columns`: the seeds in column order. `meta` overrides what is read from the study."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    configs = [(t, cfg) for t in trials if (cfg := _trial_config(t)) is not None]
    fixed_epochs = fixed_knobs(space).get(EPOCHS_PARAM)
    epochs = int(fixed_epochs) if fixed_epochs is not None else max(
        (cfg.epochs for t, cfg in configs if _full_run(t, cfg, cfg.epochs)), default=0)
    if not epochs:
        raise UsageError(f"study {study.study_name!r} has no trial with a full curve (every epoch, early stopping off) "
                         "to build a table from")
    free, fixed = table_space(space, epochs)
    groups: dict[str, list[FrozenTrial]] = {}
    params_of: dict[str, dict[str, Any]] = {}
    for t, cfg in configs:
        if not _full_run(t, cfg, epochs):
            continue
        params = active_params(dataclasses.asdict(cfg), free, fixed)
        key = config_key(params)
        groups.setdefault(key, []).append(t)
        params_of.setdefault(key, params)
    if rows is not None:
        keys = [k for k in dict.fromkeys(config_key(r) for r in rows) if k in groups]
    else:
        keys = list(groups)  # first appearance (trial number)
    if not keys:
        raise UsageError(f"study {study.study_name!r} has no trial with a full {epochs}-epoch curve to build a table from")
    seeds_of: dict[str, list[tuple[int, FrozenTrial]]] = {}
    for key in keys:
        seen: dict[int, FrozenTrial] = {}
        for t in sorted(groups[key], key=lambda t: t.number):
            seed = int(t.user_attrs.get(Attr.SEED, t.number))
            if seed_columns is None or seed in seed_columns:
                seen.setdefault(seed, t)  # one trial per seed: a repeat of a seed adds no information
        seeds_of[key] = sorted(seen.items())
    keys = [k for k in keys if seeds_of[k]]
    width = len(seed_columns) if seed_columns is not None else max(len(v) for v in seeds_of.values())
    shape = (len(keys), width, epochs)
    arrays = {name: np.full(shape, np.nan) for name in CURVES}
    seeds = np.full(shape[:2], NO_SEED, dtype=np.int64)
    used: list[FrozenTrial] = []
    for row, key in enumerate(keys):
        for j, (seed, t) in enumerate(seeds_of[key]):
            col = list(seed_columns).index(seed) if seed_columns is not None else j
            seeds[row, col] = seed
            _fill(arrays, row, col, t, epochs)
            used.append(t)
    info = _study_meta(study, used, epochs)
    info.update(meta or {})
    return RecordedTable(**arrays, seeds=seeds, configs=tuple(params_of[k] for k in keys), space=free, fixed=fixed,
                         meta=info)


def _curve(values: Any, n: int) -> list[float] | None:
    if not isinstance(values, list) or len(values) != n:
        return None
    return [float("nan") if v is None else float(v) for v in values]


def _fill(arrays: dict[str, np.ndarray], row: int, col: int, t: FrozenTrial, epochs: int) -> None:
    """One trial's curves into its cell; epochs it did not run (it diverged) stay NaN."""
    a = t.user_attrs
    ran = len(a[Attr.LOSS_CURVE])
    arrays["train_loss"][row, col, :ran] = _curve(a[Attr.LOSS_CURVE], ran)
    arrays["val_acc"][row, col, :ran] = _curve(a[Attr.VAL_CURVE], ran)
    test = _curve(a.get(Attr.TEST_CURVE), ran)
    if test is not None:
        arrays["test_acc"][row, col, :ran] = test
    elif ran == epochs and isinstance(a.get(Attr.TEST_ACC), int | float):
        arrays["test_acc"][row, col, epochs - 1] = float(a[Attr.TEST_ACC])
    seconds = _curve(a.get(Attr.EPOCH_SECONDS), ran)
    if seconds is None and ran:  # a study without per-epoch seconds: its train seconds, spread evenly
        seconds = [float(a.get(Attr.TRAIN_SECONDS) or 0.0) / ran] * ran
    if seconds is not None:
        arrays["seconds"][row, col, :ran] = seconds


def _study_meta(study: optuna.Study, used: Sequence[FrozenTrial], epochs: int) -> dict[str, Any]:
    s = study.user_attrs
    devices = sorted({str(t.user_attrs[Attr.DEVICE]) for t in used if Attr.DEVICE in t.user_attrs})
    packs = [int(t.user_attrs[Attr.PACK_SIZE]) for t in used if Attr.PACK_SIZE in t.user_attrs]
    data = {"source": s.get(StudyAttr.DATASET, "unknown"), "train_images": s.get(StudyAttr.TRAIN_IMAGES),
            "val_images": s.get(StudyAttr.VAL_IMAGES), "test_images": None, "val_is_test": s.get(StudyAttr.VAL_IS_TEST),
            "classes": s.get(StudyAttr.DATA_CLASSES), "channels": s.get(StudyAttr.DATA_CHANNELS),
            "image_size": s.get(StudyAttr.DATA_IMAGE_SIZE), "train_images_total": s.get(StudyAttr.DATA_TRAIN_IMAGES)}
    return {
        "data": data_fingerprint(data),
        "code_version": str(s.get(StudyAttr.VERSION, "unknown")),
        "device": ", ".join(devices) or "unknown",
        "torch_version": "unknown",
        "pack_size": max(packs, default=1),
        "run_epochs": epochs,  # every run's epochs (also the arrays' last axis)
        "train_images": s.get(StudyAttr.TRAIN_IMAGES),
        "val_split": s.get(StudyAttr.VAL_SPLIT),
        "train_subset": s.get(StudyAttr.TRAIN_SUBSET),
        "image_size": s.get(StudyAttr.PREFIX + "image_size"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recording_seconds": round(recorded_seconds(used), 1),
        "study": study.study_name,
        "trials": len(used),
    }


def data_fingerprint(data: Mapping[str, Any], content: str | None = None) -> dict[str, Any]:
    """The data description with a hash of it (and of the images themselves when `content` is given): two tables
    with one hash were recorded on the same data and split. With the content hashed, the source's path is left out of
    the hash: the same images under another directory are the same data."""
    described = {k: v for k, v in data.items() if k != "hash"}
    if content is not None:
        described["content"] = content
    hashed = {k: v for k, v in described.items() if not (content is not None and k == "source")}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**described, "hash": digest}


def code_version() -> str:
    """bench's version and the git commit it runs from ('+dirty' with uncommitted changes), else 'unknown'."""
    root = Path(bench.__file__).resolve().parent.parent
    env = os.environ | {"GIT_OPTIONAL_LOCKS": "0"}  # read only: `git status` must not refresh the index
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True, env=env).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{bench.__version__} ({commit + ('+dirty' if dirty else '') if commit else 'unknown'})"
