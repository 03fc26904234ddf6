"""What bench stores in an Optuna storage, beside Optuna's own columns: the keys of trial and study user attributes.

Every module that writes or reads a stored study (the runner, the commands, the report, the analysis) reads the keys
from here, so a stored study means the same thing to all of them. This module imports nothing of bench or torch: the
report and the analysis read studies without importing torch.
"""

from __future__ import annotations

from typing import Any


class Attr:
    """User-attribute keys every trial carries (the report reads the same names)."""

    VAL_CURVE = "val_acc_curve"
    LOSS_CURVE = "train_loss_curve"
    VAL_ACC = "val_acc"
    TEST_ACC = "test_acc"
    EPOCHS_RUN = "epochs_run"
    TRAIN_SECONDS = "train_seconds"
    IMAGES_PER_SEC = "images_per_sec"
    PARAM_COUNT = "param_count"
    DEVICE = "device"
    PRECISION = "precision"  # what the trial trained in: fp32, bf16 or fp16 (autocast), --precision auto resolved
    SEED = "seed"
    STOP_REASON = "stop_reason"
    FAIL_REASON = "fail_reason"
    CELL = "cell"  # designed-experiment cell (bench.matrix)
    WORKER = "worker"  # host:pid of the process that ran the trial
    HARDWARE = "hardware"  # the GPU's name, or the CPU's model, threads and bf16 support (bench.hardware.hardware_name)
    TORCH = "torch"  # torch's version
    PACK_SIZE = "pack_size"  # the slots of this trial's pack (1: alone); its share of the pack's time is 1 / pack_size
    PACK_SLOT = "pack_slot"  # this trial's place in its pack
    KEPT_EPOCH = "kept_epoch"  # the epoch whose weights were kept (early stopping restores the best)
    TRAIN_IMAGES = "train_images"  # the budget: images per epoch
    NUM_CLASSES = "num_classes"  # chance accuracy is 1 / num_classes
    RETRY_OF = "retry_of"  # the trial a requeued one repeats (its process died while it ran); a heartbeat retry
    # keeps only IDENTITY: its chain is in Optuna's retry_history
    TEST_CURVE = "test_acc_curve"  # test accuracy after every epoch (bench.record's trials; others keep the final one)
    EPOCH_SECONDS = "epoch_seconds"  # training seconds of every epoch (bench.record's trials)
    SAMPLER_SECONDS = "sampler_seconds"  # time Optuna took to ask this trial (sampling and the pruner's bookkeeping)
    REPLAYED_FROM = "replayed_from"  # the recorded config (its row in the table) that answered a replayed trial
    # What a trial is beyond its parameters: a rerun of a dead attempt keeps these and none of its results
    IDENTITY = (CELL, SEED)


class StudyAttr:
    """Study user-attribute keys. The `StudyMeta` fields (bench.storage) are stored as `PREFIX + field`."""

    PREFIX = "bench."
    VERSION = "bench.version"
    DATASET = "bench.dataset"
    VAL_SPLIT = "bench.val_split"
    TRAIN_SUBSET = "bench.train_subset"
    # the budget the study really ran at (bench.cli.record_budget)
    TRAIN_IMAGES = "bench.train_images"
    VAL_IMAGES = "bench.val_images"
    VAL_IS_TEST = "bench.val_is_test"
    MAX_EPOCHS = "bench.max_epochs"
    # the data a study trained on (claims are checked against it in bench.analysis)
    DATA_CLASSES = "bench.data_classes"
    DATA_CHANNELS = "bench.data_channels"
    DATA_IMAGE_SIZE = "bench.data_image_size"
    DATA_TRAIN_IMAGES = "bench.data_train_images"  # the whole train split, before the validation split or a subset
    # a designed matrix (bench.matrix)
    DESIGN = "bench.design"
    EPOCHS_SCALE = "bench.epochs_scale"
    BUDGETS = "bench.budgets"
    # a comparison of searches (bench.compare): one study per arm and repeat, all in one storage
    COMPARE = "bench.compare"  # the comparison's name
    ARM = "bench.arm"  # sampler[+pruner], e.g. tpe+median
    REPEAT = "bench.repeat"  # 0..R-1: the same in every arm means the same seeds (paired)
    BUDGET_EPOCHS = "bench.budget_epochs"  # training epochs the arm may consume (pruned epochs count)
    # a study answered from a recorded table instead of training (bench.run/compare --replay)
    REPLAY = "bench.replay"  # the table's path and fingerprint


def stopped_from_outside(state: str, stop_reason: object, fail_reason: object) -> bool:
    """A failed trial its config did not cause: interrupted (Ctrl-C, SIGTERM: fail_reason "interrupted") or orphaned
    (its process died, so it recorded no reason). Such a trial is run again; it is neither an outcome nor a cost of the
    search that asked it. `state` is the TrialState's name."""
    return state == "FAIL" and stop_reason != "diverged" and (stop_reason != "failed" or fail_reason == "interrupted")


def trial_stopped_from_outside(trial: Any) -> bool:
    """`stopped_from_outside` for an Optuna trial (FrozenTrial)."""
    attrs = trial.user_attrs
    return stopped_from_outside(trial.state.name, attrs.get(Attr.STOP_REASON), attrs.get(Attr.FAIL_REASON))
