"""Trial weights in Optuna's artifact store, with everything needed to rebuild and use the model."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

import bench
from bench.data import Dataset
from bench.errors import UsageError
from bench.locks import storage_file
from bench.models import build_model
from bench.space import CONFIG_FIELDS, TrainConfig, config_from_params

KEEP_POLICIES = ("best", "all", "none")
CHECKPOINT_NAME = "model.pt"


def artifact_dir(storage_url: str, study_name: str) -> Path:
    """Beside the SQLite file for file storages; under ./studies for server storages."""
    path = storage_file(storage_url)
    if path is not None:
        return path.with_name(f"{study_name}-artifacts")
    return Path("studies") / f"{study_name}-artifacts"


def open_store(path: Path) -> FileSystemArtifactStore:
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


@dataclass(frozen=True)
class ModelMeta:
    config: dict[str, Any]
    in_channels: int
    image_size: tuple[int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    version: str = bench.__version__

    @classmethod
    def for_dataset(cls, cfg: TrainConfig, dataset: Dataset) -> ModelMeta:
        return cls(dataclasses.asdict(cfg), dataset.channels, dataset.image_size, dataset.classes, dataset.mean, dataset.std)


def save_checkpoint(path: Path, model: torch.nn.Module, meta: ModelMeta) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": dataclasses.asdict(meta)}, path)


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, ModelMeta]:
    # weights_only: tensors and plain containers only, so a tampered file cannot run code
    blob = torch.load(path, map_location="cpu", weights_only=True)
    raw = blob["meta"]
    meta = ModelMeta(raw["config"], int(raw["in_channels"]), tuple(raw["image_size"]), tuple(raw["classes"]),
                     tuple(raw["mean"]), tuple(raw["std"]), raw.get("version", "unknown"))
    cfg = config_from_params({k: v for k, v in meta.config.items() if k in CONFIG_FIELDS})  # newer fields: ignored
    model = build_model(cfg, meta.in_channels, meta.image_size, len(meta.classes))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta


class CheckpointSink:
    """TrialTrainer hook: stores a finished trial's model under the --keep-models policy."""

    def __init__(self, store: FileSystemArtifactStore, storage: optuna.storages.BaseStorage, policy: str, dataset: Dataset):
        self.store = store
        self.storage = storage
        self.policy = policy
        self.dataset = dataset

    def __call__(self, trial: optuna.Trial, model: torch.nn.Module, cfg: TrainConfig, value: float) -> None:
        if self.policy == "none":
            return
        study = trial.study
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        best_so_far = max((t.value for t in completed if t.value is not None), default=-1.0)
        if self.policy == "best" and value <= best_so_far:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHECKPOINT_NAME
            save_checkpoint(path, model, ModelMeta.for_dataset(cfg, self.dataset))
            upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)
        if self.policy == "best":
            for old in completed:
                for meta in get_all_artifact_meta(old, storage=self.storage):
                    try:
                        self.store.remove(meta.artifact_id)
                    except (ArtifactNotFound, FileNotFoundError):
                        pass


def model_path_for(trial: optuna.trial.FrozenTrial, storage: optuna.storages.BaseStorage,
                   store: FileSystemArtifactStore, dest: Path) -> Path:
    """Download the trial's stored model to `dest`; a UsageError when it has none."""
    metas = [m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == CHECKPOINT_NAME]
    for meta in reversed(metas):
        try:
            download_artifact(artifact_store=store, file_path=str(dest), artifact_id=meta.artifact_id)
            return dest
        except (ArtifactNotFound, FileNotFoundError):
            continue
    raise UsageError(
        f"trial {trial.number} has no stored model (kept only for the best trial by default); "
        "pick another --trial, or rerun with --keep-models all"
    )
