"""The training loop. It knows nothing of Optuna: pruning reaches it through `on_epoch`.

One loop trains a pack of K same-shape trials as one packed network (bench.packed); a solo
trial is a pack of one. Data stays as uint8 tensors on the training device; each member's
batch is indexed, augmented and normalised there (bench.augment) with the member's own batch
order and random streams, so a member's result depends only on its config and seed, never on
which trials share its pack. What each optimizer, loss and schedule kind computes lives in their
registries (bench.optimizers, bench.losses, bench.schedules); the device and precision in bench.hardware.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.augment import AugmentConfig, BatchAugment
from bench.data import Split, Splits
from bench.errors import UsageError
from bench.hardware import autocast, configure_determinism, is_out_of_memory, resolve_precision
from bench.losses import create_loss
from bench.models import ConvNet
from bench.optimizers import clip_grad_norm_per_member, create_optimizer
from bench.packed import PackedDropout, compact, grow, pack_models, shape_signature, unpack_member
from bench.schedules import Schedule, member_schedule
from bench.space import TrainConfig

EVAL_BATCH = 1024
PACK_EVAL_BATCH = 256  # images per evaluation step in a pack of any size (each replicated K times)
DROPOUT_STREAM = 7_919  # a member's dropout masks come from seed + this: a stream of its own
CHECK_EVERY = 20  # batches between loss reads: reading syncs the GPU
# Eager steps of a sub-pack's current shape before its step is captured as a CUDA graph: cuDNN's benchmark mode tunes
# each new input shape on its first step (tuning cannot run inside a capture) and the optimizer creates its state.
GRAPH_WARMUP = 2


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


# --- evaluation and training --------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, augment: BatchAugment, device: torch.device,
             dtype: torch.dtype | None, members: int = 1) -> list[float]:
    """Accuracy of each member (a packed model; a solo ConvNet is one member) on `split`."""
    model.eval()
    correct = torch.zeros(members, dtype=torch.int64, device=device)
    # one batch size for every pack of two or more: cuDNN's benchmark mode tunes each new input shape once
    batch = EVAL_BATCH if members == 1 else PACK_EVAL_BATCH
    for start in range(0, len(split), batch):
        x = augment.normalize(split.images[start:start + batch].to(device, non_blocking=True))
        x = x.repeat(1, members, 1, 1) if members > 1 else x
        with autocast(device, dtype):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        logits = logits.view(members, -1, logits.shape[-1])
        correct += (logits.argmax(-1) == split.labels[start:start + batch].to(device)).sum(1)
    return (correct.double() / max(1, len(split))).tolist()


@dataclass
class FitResult:
    """What a run measured. `fit` fills it in place, so after an exception (pruning, divergence,
    interruption) the caller still holds the curves, seconds and images/s up to that point."""

    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: float = float("nan")
    epochs_run: int = 0
    kept_epoch: int = 0  # the epoch whose weights the model ends with (early stopping restores the best)
    train_seconds: float = 0.0
    images_per_sec: float = 0.0
    eval_images_per_sec: float = 0.0
    stop_reason: str = "completed"
    # per epoch, only for members with `test_each_epoch` (bench.record): test accuracy, and seconds (training plus
    # validation, the share of the epoch a replay charges)
    test_curve: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def kept_val_acc(self) -> float:
        return self.val_acc[self.kept_epoch - 1] if self.kept_epoch else float("nan")


EpochCallback = Callable[[int, float, float], None]


@dataclass
class Member:
    """One trial in a pack. `model` is built and seeded by the caller exactly as a solo trial's, and holds the
    trained weights (the kept epoch's) when the member leaves; `error` says why it left early, if it did."""

    model: ConvNet
    cfg: TrainConfig
    seed: int
    on_epoch: EpochCallback | None = None
    result: FitResult = field(default_factory=FitResult)
    error: Exception | None = None
    test_each_epoch: bool = False  # evaluate the test split after every epoch too (a recording; off: tested once)


@dataclass
class _Slot:
    """What the loop keeps for one member while it trains."""

    member: Member
    augment: BatchAugment
    gen: torch.Generator  # augmentation draws
    order_gen: torch.Generator  # batch order, identical on every device
    dropout_gen: torch.Generator
    stand_in: torch.optim.Optimizer
    schedule: Schedule
    started: float
    epoch: int = 0  # epochs this member has finished (members that joined later are behind the others)
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    stale: int = 0
    images: int = 0
    train_time: float = 0.0
    eval_images: int = 0
    eval_time: float = 0.0


def _place(split: Split, device: torch.device, log: Callable[[str], None]) -> Split:
    """The whole split on the device, unless it would not fit (then it moves per batch)."""
    if device.type != "cuda":
        return split
    free, _ = torch.cuda.mem_get_info(device)
    if split.images.numel() > 0.5 * free:
        log(f"dataset ({split.images.numel() / 2**30:.1f} GiB) too large for {device}: keeping it in host memory")
        return Split(split.images.pin_memory(), split.labels.pin_memory())
    return split.to(device)


def fit(model: nn.Module, splits: Splits, cfg: TrainConfig, *, device: torch.device, precision: str = "auto",
        seed: int = 0, on_epoch: EpochCallback | None = None, progress: bool = True,
        log: Callable[[str], None] = tqdm.write, compile_model: bool = False,
        result: FitResult | None = None, deterministic: bool = False) -> FitResult:
    """Train one trial (a pack of one): `cfg.epochs` epochs, validating after each, then test once.

    `on_epoch(epoch, train_loss, val_acc)` may raise to stop (that is how pruning works); that exception, or
    Diverged when the loss stops being finite, is raised here. `result`, when given, is filled in place, so a
    caller still holds the curves and cost of a run that stopped by an exception. `model` ends with the
    trained weights (the restored epoch's under early stopping).
    """
    member = Member(model, cfg, seed, on_epoch, result if result is not None else FitResult())
    fit_pack([member], splits, device=device, precision=precision, progress=progress, log=log,
             compile_model=compile_model, deterministic=deterministic)
    if member.error is not None:
        raise member.error
    return member.result


Refill = Callable[[int], Sequence[Member]]
"""Called at an epoch boundary with the number of free slots; returns the members that take them (maybe fewer)."""


@dataclass(frozen=True)
class _Context:
    """What every sub-pack of one `fit_pack` call shares: the placed data and the numeric settings."""

    train: Split
    val: Split
    test: Split
    plain: BatchAugment
    splits: Splits
    device: torch.device
    dtype: torch.dtype | None
    progress: bool
    log: Callable[[str], None]
    compile_model: bool
    packed_run: bool
    deterministic: bool = False
    graphs: bool = False  # replay each sub-pack's full-batch step as a CUDA graph (see _step)
    # where the steps are counted (graph replays, eager steps, failed captures)
    record: PackLog = field(default_factory=lambda: PackLog(0))


@dataclass
class PackLog:
    """What a `fit_pack` call did at each epoch boundary: members training and sub-packs (launches per step)."""

    capacity: int
    members: list[int] = field(default_factory=list)
    launches: list[int] = field(default_factory=list)
    signatures: set[tuple] = field(default_factory=set)
    graph_steps: int = 0  # steps replayed from a captured CUDA graph
    eager_steps: int = 0
    graph_failures: list[str] = field(default_factory=list)  # why a capture failed (that sub-pack then ran eager)
    # each sub-pack epoch in turn: (member-images trained by the members that finished it, its training seconds); a
    # later epoch's figure is the steady speed, without the first epoch's cuDNN tuning and graph capture
    epoch_times: list[tuple[int, float]] = field(default_factory=list)


def fit_pack(members: Sequence[Member], splits: Splits, *, device: torch.device, precision: str = "auto",
             progress: bool = True, log: Callable[[str], None] = tqdm.write, compile_model: bool = False,
             deterministic: bool = False, capacity: int | None = None, refill: Refill | None = None,
             on_leave: Callable[[Member], None] | None = None, cuda_graphs: bool = True) -> PackLog:
    """Train `members` together in `capacity` slots (default: as many as members). Members that share a shape
    signature train as one packed network (a sub-pack); each sub-pack runs its epoch in turn, so a pack may mix
    shapes. A member leaves when it finishes, stops early, diverges or its callback raises (recorded in
    `member.error`), and `on_leave(member)` is called at once; the others go on unchanged. At each epoch boundary
    free slots are offered to `refill`, and the members it returns join a sub-pack of their shape (or start one)
    at their own epoch 1. Every member's result is filled in place, also when KeyboardInterrupt or out-of-memory
    ends the whole pack (re-raised). On CUDA each sub-pack's full-batch step is captured once as a CUDA graph and
    replayed (`cuda_graphs=False`: every step eager)."""
    members = list(members)
    capacity = max(capacity or len(members), len(members))
    dtype = resolve_precision(precision, device)
    if dtype == torch.float16 and capacity > 1 and precision == "auto":
        dtype = None  # a GPU without bf16: packs train in fp32 rather than share one fp16 loss scale
    if dtype == torch.float16 and capacity > 1:
        # one GradScaler for K members: one member's overflow skips every member's step and shrinks the shared scale
        raise UsageError("--precision fp16 cannot train a pack (one loss scale for all members couples them); "
                         "use --precision bf16 or fp32, or --pack 1")
    if compile_model and capacity > 1:
        # measured (3 members, 3 epochs, CPU): 13 graph breaks on the per-member mask draws and a recompile at every
        # member leaving, last batch and train/eval switch, 30 graphs then the recompile limit: 99 s against 1 s eager
        log("--compile applies to solo trials; packs train eager (compiling a pack recompiled at every change, 99x slower)")
        compile_model = False
    configure_determinism(device, deterministic)
    train, val = _place(splits.train, device, log), _place(splits.val, device, log)
    # graphs need the data on the device (a host-to-device copy cannot be captured) and no loss scaler (fp16 solo:
    # its overflow check reads the device every step)
    graphs = (cuda_graphs and device.type == "cuda" and train.images.device.type == "cuda" and not compile_model
              and dtype != torch.float16)
    record = PackLog(capacity)
    ctx = _Context(train, val, val if splits.val_is_test else _place(splits.test, device, log),
                   BatchAugment(AugmentConfig(), splits.dataset.mean, splits.dataset.std, device), splits, device,
                   dtype, progress, log, compile_model, capacity > 1, deterministic, graphs, record)
    packs: dict[tuple, _PackState] = {}

    def admit(joining: Sequence[Member]) -> None:
        groups: dict[tuple, list[Member]] = {}
        for m in joining:
            groups.setdefault(shape_signature(m.cfg), []).append(m)
        for signature, group in groups.items():
            record.signatures.add(signature)
            slots = [_new_slot(m, ctx) for m in group]
            if signature in packs:
                packs[signature].grow(slots)
            else:
                packs[signature] = _PackState(slots, ctx)

    def leave(state: _PackState, gone: Sequence[int], partial_seconds: float = 0.0, partial_images: int = 0) -> None:
        left = [state.slots[k].member for k in gone]
        state.leave(gone, partial_seconds, partial_images)
        for m in left:
            if on_leave is not None:
                on_leave(m)

    admit(members)
    try:
        while packs:
            record.members.append(sum(len(p.slots) for p in packs.values()))
            record.launches.append(len(packs))
            for state in list(packs.values()):
                _train_epoch(state, ctx, leave)
            for state in list(packs.values()):
                if state.slots:
                    _validate_epoch(state, ctx, leave)
            for signature in [sig for sig, state in packs.items() if not state.slots]:
                del packs[signature]
            free = capacity - sum(len(p.slots) for p in packs.values())
            if refill is not None and free > 0:
                joining = list(refill(free))
                if len(joining) > free:
                    raise ValueError(f"refill returned {len(joining)} members for {free} free slots")
                admit(joining)
    finally:
        now = time.perf_counter()
        for state in packs.values():  # an exception ended the pack: what each member spent so far counts
            for slot in state.slots:
                if math.isfinite(state.epoch_start):
                    slot.train_time += now - state.epoch_start
                _close(slot, now)
    return record


def _new_slot(m: Member, ctx: _Context) -> _Slot:
    ds, device = ctx.splits.dataset, ctx.device
    stand_in, schedule = member_schedule(m.cfg, len(_batches(len(ctx.train), m.cfg.batch_size)))
    return _Slot(m, BatchAugment(AugmentConfig.from_train_config(m.cfg, ds.crop_padding), ds.mean, ds.std, device),
                 torch.Generator(device=device).manual_seed(m.seed), torch.Generator().manual_seed(m.seed),
                 torch.Generator(device=device).manual_seed(m.seed + DROPOUT_STREAM), stand_in, schedule,
                 time.perf_counter())


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] == 1:
        batches.pop()  # a batch of one breaks BatchNorm; drop that single sample this epoch
    return batches


def _build_pack(slots: Sequence[_Slot], device: torch.device) -> nn.Module:
    packed = pack_models([s.member.model for s in slots], [s.member.cfg for s in slots])
    packed = packed.to(device, memory_format=torch.channels_last)
    packed.set_dropout_generators([s.dropout_gen for s in slots])
    return packed


class _PackState:
    """One sub-pack: the packed network of one shape signature, its optimizer and per-member slots; `leave` compacts
    it to the members that remain, `grow` appends members that join."""

    def __init__(self, slots: list[_Slot], ctx: _Context):
        self.slots, self.device, self.deterministic = slots, ctx.device, ctx.deterministic
        self.batch_size = slots[0].member.cfg.batch_size
        self.batches = _batches(len(ctx.train), self.batch_size)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_failed = False  # a capture failed once: this sub-pack trains eagerly from then on
        self.warm = 0  # eager full-batch steps since the pack last changed shape
        # one side stream for the warm-up steps and the capture: state a stream creates lazily (cuBLAS's workspace)
        # then exists before the capture, not inside it
        self.side = torch.cuda.Stream(ctx.device) if ctx.graphs else None
        self.packed = _build_pack(slots, ctx.device)
        self.optimizer = create_optimizer(self.packed.parameters(), [s.member.cfg for s in slots], ctx.device,
                                          static=ctx.graphs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=ctx.dtype == torch.float16 and ctx.device.type == "cuda")
        # shares the parameters (solo trials only: fit_pack turns compiling off for packs)
        self.net = torch.compile(self.packed) if ctx.compile_model else self.packed
        self.epoch_start = math.nan
        self.epoch_seconds = 0.0  # the last epoch's training time (per-epoch seconds of test_each_epoch members)
        self._rebuild()
        self.update_lrs()  # a schedule's own first lr (OneCycle starts at max_lr / 25, not at the optimizer's lr)

    def _rebuild(self) -> None:
        self.graph, self.warm = None, 0  # members joined or left: new tensors, new shapes; capture again
        cfgs = [s.member.cfg for s in self.slots]
        self.loss_fn = create_loss(cfgs, self.device, fused=not self.deterministic)
        self.clip = torch.tensor([c.grad_clip for c in cfgs], device=self.device)
        self.any_clip = any(c.grad_clip for c in cfgs)
        self.per_batch = any(s.schedule.per_batch for s in self.slots)

    def new_epoch(self, n: int, data_device: torch.device) -> None:
        self.orders = torch.stack([torch.randperm(n, generator=s.order_gen) for s in self.slots]).to(data_device)
        if getattr(self, "loss_sum", None) is not None and len(self.loss_sum) == len(self.slots):
            self.loss_sum.zero_()  # in place: a captured step adds to this storage
        else:
            self.loss_sum = torch.zeros(len(self.slots), device=self.device)
        if self.per_batch:
            # the epoch's per-batch lrs, stepped on the host up front and copied to the device once: a step then
            # reads its row without a host-to-device copy (one per batch before, with any OneCycle member)
            rows = []
            for _ in self.batches:
                rows.append([s.stand_in.param_groups[0]["lr"] for s in self.slots])
                for s in self.slots:
                    s.schedule.after_batch()
            self.lr_rows = rows
            self.lr_table = torch.tensor(rows, dtype=torch.float32, device=self.device)

    def set_batch_lr(self, i: int) -> None:
        if self.per_batch:
            self.optimizer.set_lr(self.lr_rows[i], self.lr_table[i])

    def update_lrs(self) -> None:
        self.optimizer.set_lr([s.stand_in.param_groups[0]["lr"] for s in self.slots])

    def leave(self, gone: Sequence[int], partial_seconds: float, partial_images: int) -> None:
        """Members `gone` leave now (mid-epoch when diverged: their partial epoch counts)."""
        now = time.perf_counter()
        for k in gone:
            slot = self.slots[k]
            slot.train_time += partial_seconds
            slot.images += partial_images
            _close(slot, now)
        keep = [k for k in range(len(self.slots)) if k not in set(gone)]
        if not keep:
            self.slots = []
            return
        swapped = compact(self.packed, keep)
        self.optimizer.compact(keep, swapped)
        if hasattr(self, "orders"):
            self.orders = self.orders[torch.tensor(keep, device=self.orders.device)]
            self.loss_sum = self.loss_sum[torch.tensor(keep, device=self.device)]
        if self.per_batch and hasattr(self, "lr_rows"):
            self.lr_rows = [[row[k] for k in keep] for row in self.lr_rows]
            self.lr_table = self.lr_table[:, torch.tensor(keep, device=self.device)]
        self.slots = [self.slots[k] for k in keep]
        self._rebuild()

    def grow(self, joining: list[_Slot]) -> None:
        """Members `joining` take free slots at an epoch boundary, at their own first epoch."""
        swapped = grow(self.packed, _build_pack(joining, self.device))
        self.optimizer.grow([s.member.cfg for s in joining], swapped)
        self.slots = self.slots + joining
        self._rebuild()
        self.update_lrs()


def _train_epoch(state: _PackState, ctx: _Context, leave: Callable[..., None]) -> None:
    """One epoch of every member of the sub-pack; a member whose loss stops being finite leaves mid-epoch."""
    state.packed.train()
    state.epoch_start = time.perf_counter()
    state.new_epoch(len(ctx.train), ctx.train.images.device)
    batches = state.batches
    label = f"epoch {max(s.epoch for s in state.slots) + 1}"
    bar = tqdm(batches, desc=label + (f" (pack of {len(state.slots)})" if ctx.packed_run else ""), unit="batch",
               leave=False, disable=not ctx.progress)
    for i, (start, stop) in enumerate(bar):
        state.set_batch_lr(i)
        _step(state, ctx, start, stop)
        if i % CHECK_EVERY == CHECK_EVERY - 1 or i == len(batches) - 1:
            running = (state.loss_sum / stop).tolist()
            bad = [k for k, loss in enumerate(running) if not math.isfinite(loss)]
            for k in bad:
                slot = state.slots[k]
                slot.member.error = Diverged(f"loss became {running[k]} in epoch {slot.epoch + 1}")
            if bad:
                leave(state, bad, time.perf_counter() - state.epoch_start, stop)
                if not state.slots:
                    break
            bar.set_postfix(loss=f"{sum(x for x in running if math.isfinite(x)) / max(1, len(running) - len(bad)):.3f}")
    elapsed = time.perf_counter() - state.epoch_start
    state.epoch_start = math.nan
    state.epoch_seconds = elapsed
    ctx.record.epoch_times.append((len(state.slots) * batches[-1][1], elapsed))
    for slot in state.slots:
        slot.train_time += elapsed
        slot.images += batches[-1][1]
    if state.slots:
        state.train_loss = (state.loss_sum / batches[-1][1]).tolist()


def _validate_epoch(state: _PackState, ctx: _Context, leave: Callable[..., None]) -> None:
    """Validate every member, record its epoch, and let finished, early-stopped and pruned members leave."""
    t_eval = time.perf_counter()
    val_acc = evaluate(state.net, ctx.val, ctx.plain, ctx.device, ctx.dtype, len(state.slots))
    t_eval = time.perf_counter() - t_eval
    for slot in state.slots:  # the pack evaluates every member in one pass: each counts the shared time
        slot.eval_images += len(ctx.val)
        slot.eval_time += t_eval
    if any(slot.member.test_each_epoch for slot in state.slots):  # before the callbacks: a pruned epoch has its own
        test_acc = val_acc if ctx.test is ctx.val else evaluate(state.net, ctx.test, ctx.plain, ctx.device, ctx.dtype,
                                                                 len(state.slots))
        for k, slot in enumerate(state.slots):
            if slot.member.test_each_epoch:
                slot.member.result.test_curve.append(test_acc[k])
                slot.member.result.epoch_seconds.append(state.epoch_seconds + t_eval)
    leaving = [k for k, slot in enumerate(state.slots)
               if _end_epoch(slot, state.train_loss[k], val_acc[k], ctx, state.packed, k)]
    state.update_lrs()
    for k in leaving:  # finished, early-stopped or pruned: the weights it keeps, then its test accuracy
        _finish(state.slots[k], state.packed, k, ctx)
    if leaving:
        leave(state, leaving)


def _step(state: _PackState, ctx: _Context, start: int, stop: int) -> None:
    """One training step, eager or as a replayed CUDA graph.

    Why graphs: a pack's eager step is bound by the host's kernel launches, not by the GPU. Measured on one H200
    (torch 2.11, bf16, 50 steps each; scripts/gpu_step_profile.py), eager against replayed, ms per step: baseline
    bs 128 K=1 3.61 / 0.53, K=8 7.40 / 2.43, K=32 17.4 / 8.4; stages + 2 blocks, BatchNorm, residual bs 64 K=1
    16.1 / 2.05; the kernels alone took 0.47, 2.35, 8.65 and 1.77 ms. The graph reads the batch's indices and the
    lrs from buffers that keep their storage (`state.index`, the static optimizer); the members' generators are
    registered with it, so every replay draws new augmentations and dropout masks. A last, shorter batch runs eager."""
    record = ctx.record
    full = stop - start == state.batch_size
    if state.graph is not None and full:
        state.index.copy_(state.orders[:, start:stop])
        state.graph.replay()
        state.optimizer.count_host_step()
        record.graph_steps += 1
        return
    if not ctx.graphs or state.graph_failed or not full:
        record.eager_steps += 1
        _train_step(state, ctx.train, state.orders[:, start:stop], stop - start, ctx.dtype)
        return
    main = torch.cuda.current_stream(state.device)
    if state.warm < GRAPH_WARMUP:  # on the side stream, as torch's whole-network capture recipe warms up
        state.side.wait_stream(main)
        with torch.cuda.stream(state.side):
            _train_step(state, ctx.train, state.orders[:, start:stop], stop - start, ctx.dtype)
        main.wait_stream(state.side)
        state.warm += 1
        record.eager_steps += 1
        return
    state.index = state.orders[:, start:stop].clone()
    state.side.wait_stream(main)
    steps = list(state.optimizer.steps)
    graph = torch.cuda.CUDAGraph()
    drawn = [s.gen for s in state.slots]
    if any(any(m.p_list) for m in state.packed.modules() if isinstance(m, PackedDropout)):
        drawn += [s.dropout_gen for s in state.slots]  # each registered generator costs launches at every replay
    for gen in drawn:  # each replay advances these as the eager step would
        graph.register_generator_state(gen)
    try:
        # by hand, not `torch.cuda.graph`: that one also runs gc.collect() and empty_cache() at every capture, and a
        # study captures again whenever a pack's members change
        with torch.cuda.stream(state.side):
            graph.capture_begin()
            try:
                _train_step(state, ctx.train, state.index, stop - start, ctx.dtype)  # recorded; nothing runs
            finally:
                graph.capture_end()
        main.wait_stream(state.side)
    except Exception as e:
        cause = _first_cause(e)
        if is_out_of_memory(e) or is_out_of_memory(cause):
            raise cause from None  # the runner halves the pack, as for an eager step
        reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:160]}"
        del graph
        torch.cuda.synchronize(state.device)
        _recover_from_capture(state, steps)
        state.graph_failed = True
        record.graph_failures.append(reason)
        ctx.log(f"a CUDA graph of the training step could not be captured ({reason}); this pack trains eagerly")
        record.eager_steps += 1
        _train_step(state, ctx.train, state.orders[:, start:stop], stop - start, ctx.dtype)
        return
    state.graph = graph
    graph.replay()  # the capture recorded this batch's step; the replay runs it
    record.graph_steps += 1


def _first_cause(e: BaseException) -> BaseException:
    """The error that broke a capture: capture_end's own ("operation failed due to a previous error during capture")
    hides it in the exception's context."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return e


def _recover_from_capture(state: _PackState, steps: list[int]) -> None:
    """Undo what a failed capture left behind, so the step can run eagerly: the host's step count it advanced for a
    step that never ran, the gradients it set to None, and the generators, which a failed capture can leave in
    capture mode (their next eager draw raises): each member gets new generators in the same states."""
    state.optimizer.pack.steps = steps
    state.optimizer.zero_grad(set_to_none=True)

    def fresh(gen: torch.Generator) -> torch.Generator:
        new = torch.Generator(device=gen.device)
        try:
            new.set_state(gen.get_state())
        except RuntimeError:  # its state is unreadable too: the member's stream restarts from its seed
            new.manual_seed(gen.initial_seed())
        return new

    for slot in state.slots:
        slot.gen, slot.dropout_gen = fresh(slot.gen), fresh(slot.dropout_gen)
    state.packed.set_dropout_generators([s.dropout_gen for s in state.slots])


def _train_step(state: _PackState, train: Split, idx: torch.Tensor, batch: int, dtype: torch.dtype | None) -> None:
    """The step itself, on the batch whose per-member image indices are `idx` [K, B] (B = `batch`)."""
    device, k = state.device, len(state.slots)
    images = train.images[idx]  # [K, B, C, H, W] uint8
    xs = [s.augment(images[j].to(device, non_blocking=True), s.gen) for j, s in enumerate(state.slots)]
    x = (xs[0] if k == 1 else torch.cat(xs, 1)).contiguous(memory_format=torch.channels_last)  # [B, K*C, H, W]
    y = train.labels[idx].to(device, non_blocking=True)
    with autocast(device, dtype):
        logits = state.net(x)
    losses = state.loss_fn(logits.float(), y)
    state.optimizer.zero_grad(set_to_none=True)
    scaler = state.scaler
    scaler.scale(losses.sum()).backward()
    if state.any_clip:
        scaler.unscale_(state.optimizer)
        clip_grad_norm_per_member(state.packed.parameters(), state.clip, k)
    scaler.step(state.optimizer)
    scaler.update()
    state.loss_sum += losses.detach() * batch


def _end_epoch(slot: _Slot, train_loss: float, val_acc: float, ctx: _Context, packed: nn.Module, k: int) -> bool:
    """Record the epoch for one member; True when it leaves the pack now."""
    m, result = slot.member, slot.member.result
    slot.epoch += 1
    epoch = slot.epoch
    result.train_loss.append(train_loss)
    result.val_acc.append(val_acc)
    result.epochs_run = result.kept_epoch = epoch
    if ctx.progress:
        ctx.log(f"{f'seed {m.seed}: ' if ctx.packed_run else ''}[{epoch}/{m.cfg.epochs}] loss={train_loss:.3f} "
                f"val_acc={val_acc:.3f}")
    slot.schedule.after_epoch(val_acc)
    try:
        if m.on_epoch is not None:
            m.on_epoch(epoch, train_loss, val_acc)
    except Exception as exc:  # pruning (or any callback error): this member leaves, the others go on
        m.error = exc
        return True
    if m.cfg.early_stopping:
        if val_acc > slot.best_acc:
            slot.best_acc, slot.best_epoch, slot.stale = val_acc, epoch, 0
            slot.best_state = copy.deepcopy(unpack_member(packed, k, m.model).state_dict())
        else:
            slot.stale += 1
            if slot.stale >= m.cfg.early_stopping and epoch < m.cfg.epochs:  # at the last epoch it simply finished
                result.stop_reason = "early-stopped"
                return True
    return epoch >= m.cfg.epochs


def _finish(slot: _Slot, packed: nn.Module, k: int, ctx: _Context) -> None:
    """A member's final weights (its best epoch's under early stopping) and test accuracy."""
    m = slot.member
    model = unpack_member(packed, k, m.model)
    if m.error is not None:
        return  # pruned: no test accuracy, as a solo trial
    if slot.best_state is not None:  # early stopping keeps the best epoch's weights: value, test and checkpoint agree
        model.load_state_dict(slot.best_state)
        m.result.kept_epoch = slot.best_epoch
    model.to(ctx.device, memory_format=torch.channels_last)
    t0 = time.perf_counter()
    m.result.test_acc = evaluate(model, ctx.test, ctx.plain, ctx.device, ctx.dtype)[0]
    slot.eval_time += time.perf_counter() - t0
    slot.eval_images += len(ctx.test)


def _close(slot: _Slot, now: float) -> None:
    r = slot.member.result
    r.train_seconds = now - slot.started
    r.images_per_sec = slot.images / max(slot.train_time, 1e-9)
    r.eval_images_per_sec = slot.eval_images / max(slot.eval_time, 1e-9)
