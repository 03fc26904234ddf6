"""What the commands share: their data, hardware and study options, the study's recorded budget, and the lines they
print about trials. run, matrix, compare and record import these from here, never from each other."""

from __future__ import annotations

import argparse
import signal

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from bench.data import DATASETS, Dataset, Splits, load_dataset, make_splits
from bench.hardware import PRECISIONS
from bench.schema import Attr, StudyAttr
from bench.space import Param
from bench.stats import NOISY_HALF_WIDTH_POINTS, binomial_half_width
from bench.storage import StudyMeta, space_signature

INTERRUPTED_EXIT = 130
# --pack auto on CUDA, at most. The H100 prototype of this packing trained 39k member-images/s at K=1, 250k at
# 8, 474k at 32 and 498k at 64: 32 is within 5% of the best and fills its packs from fewer trials. On CPU packing
# is no faster (bench.perf --pack 1,4 on the 2-core EPYC: see the README), so auto is 1 there.
AUTO_PACK_CUDA = 32
# A sampled study's auto pack leaves at least this many trials per member: a pack asks K trials before any result
# exists. Simulated (bench.perf --simulate-search --pack 1,8,16,32 --trials 50|75|100 --repeats 30, TPE + median,
# best found - solo's at equal trials): with 4 or more trials per member the mean loss stayed under half a point
# (K=8 at 50 trials -0.0023 [-0.0107, +0.0062], K=16 at 75 -0.0026, at 100 -0.0047); K=32 at 50 lost a point
# (-0.0097 [-0.0179, -0.0016]) and K=16 at 50 nearly as much (-0.0077 [-0.0171, +0.0016]), while K=32 at 75 and
# 100 did not (-0.0027, -0.0024). 4 is the conservative reading: no pack it picks lost half a point there.
AUTO_PACK_TRIALS_PER_MEMBER = 4


def resolve_pack(pack: int | str, device: torch.device, trials: int | None = None) -> int:
    """--pack's K. auto: 1 on CPU; on CUDA AUTO_PACK_CUDA, or for a study that samples `trials` trials the largest
    power of two up to it that leaves AUTO_PACK_TRIALS_PER_MEMBER trials per member (50 trials: 8, 75: 16,
    128: 32). Designed runs (the matrix, a recording) pass no trials: their configs do not depend on results."""
    if pack != "auto":
        return int(pack)
    if device.type != "cuda":
        return 1
    if trials is None:
        return AUTO_PACK_CUDA
    fits = max(1, trials // AUTO_PACK_TRIALS_PER_MEMBER)
    return min(AUTO_PACK_CUDA, 1 << (fits.bit_length() - 1))


def duration(seconds: float) -> str:
    """A long run's time in words: minutes, or hours and minutes."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def pack_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that trains (run, matrix, perf)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10",
                   help=f"{' | '.join(DATASETS)} (torchvision, downloaded into --data-dir) or the path of an "
                        "ImageFolder tree with train/ and test/ (or val/) (default: cifar10)")
    g.add_argument("--data-dir", default="data", help="where torchvision datasets live (default: ./data)")
    g.add_argument("--cache-dir", default=None, help="decoded-tensor cache for folder datasets (default: ~/.cache/bench)")
    g.add_argument("--image-size", type=positive_int, default=32, help="side images are resized to when sizes are mixed (default: 32)")
    g.add_argument("--val-split", type=float, default=0.1,
                   help="fraction of train carved out (seeded, stratified) for validation; 0 = use the test set, "
                        "as the assignment does (default: 0.1)")
    g.add_argument("--train-subset", type=positive_int, default=None, help="train on N seeded train images (fast CPU runs)")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with bf16 support, else fp32 (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, sampler and trial seeds (default: 0)")
    g.add_argument("--compile", action="store_true", help="torch.compile each model (compiled once per trial; off by default)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA algorithms: two runs of one seed agree exactly (CPU runs always do); "
                        "bench.perf --deterministic prints what it costs")


def load_data_args(args: argparse.Namespace) -> tuple[Dataset, Splits]:
    """The dataset and its seeded splits, as the shared data options (add_data_args) describe them."""
    dataset = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, cache_dir=args.cache_dir)
    return dataset, make_splits(dataset, val_split=args.val_split, train_subset=args.train_subset, seed=args.seed)


def val_noise_note(splits: Splits) -> str:
    """A warning when one accuracy on the validation split is too noisy to compare trials by ('' otherwise)."""
    n = len(splits.val)
    half = binomial_half_width(n) * 100
    if half <= NOISY_HALF_WIDTH_POINTS:
        return ""
    return (f"note: one accuracy on the {n} validation images is +-{half:.1f} points (95%, binomial), so the best trial "
            "is picked on noise; use a larger --val-split, or bench.matrix (seeded repeats) to compare settings")


def record_budget(study: optuna.Study, splits: Splits) -> None:
    """The study's real budget and what its data is, for the report: images per split, whether validation used the
    test set, and the data's classes, image shape and full train size (claims are checked against these)."""
    ds = splits.dataset
    for key, value in ((StudyAttr.TRAIN_IMAGES, len(splits.train)), (StudyAttr.VAL_IMAGES, len(splits.val)),
                       (StudyAttr.VAL_IS_TEST, splits.val_is_test), (StudyAttr.DATA_CLASSES, list(ds.classes)),
                       (StudyAttr.DATA_CHANNELS, ds.channels), (StudyAttr.DATA_IMAGE_SIZE, list(ds.image_size)),
                       (StudyAttr.DATA_TRAIN_IMAGES, len(ds.train))):
        study.set_user_attr(key, value)


def study_meta(args: argparse.Namespace, dataset: Dataset, space: tuple[Param, ...]) -> StudyMeta:
    """What a study must keep across runs: refused on mismatch unless --force."""
    return StudyMeta(dataset.source, space_signature(space), args.image_size, args.val_split, args.train_subset)


def add_study_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("study")
    g.add_argument("--study-name", default="bench", help="study to create or resume (default: bench)")
    g.add_argument("--storage", default=None,
                   help="any SQLAlchemy URL (postgresql://user:pass@host/db for many machines) or journal:///PATH "
                        "(default: sqlite:///studies/<study-name>.db)")


def trial_line(trial: FrozenTrial) -> str:
    a = trial.user_attrs
    acc = lambda key: f"{a[key]:.4f}" if isinstance(a.get(key), float) else "-"  # noqa: E731
    reason = a.get(Attr.STOP_REASON, trial.state.name.lower())
    line = (f"trial {trial.number:>3} {trial.state.name:<8} val={acc(Attr.VAL_ACC)} test={acc(Attr.TEST_ACC)} "
            f"epochs={a.get(Attr.EPOCHS_RUN, '-')} {a.get(Attr.TRAIN_SECONDS, 0):.1f}s "
            f"{a.get(Attr.IMAGES_PER_SEC, 0):.0f} img/s stop={reason}")
    if trial.state == TrialState.FAIL:
        line += f" ({a.get(Attr.FAIL_REASON, 'see log')})"
    return line


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def print_summary(study: optuna.Study) -> None:
    states = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    print("trials by state: " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        print("no completed trial yet")
        return
    best = study.best_trial
    print(f"best trial {best.number}: val_acc={best.value:.4f} test_acc={best.user_attrs.get(Attr.TEST_ACC, float('nan')):.4f}")
    for key, value in best.params.items():
        print(f"  {key} = {value}")
