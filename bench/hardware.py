"""The device a run trains on, its precision and determinism, and what counts as running out of its memory."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch

from bench.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# cuDNN and cuBLAS report a failed workspace allocation as a plain RuntimeError, not torch.OutOfMemoryError
_ALLOCATION_FAILURES = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA out of memory",
                        "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in _ALLOCATION_FAILURES))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA device is available; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_supports_bf16() -> bool:
    # oneDNN's own check: true on CPUs with AVX512-BF16 or AMX. Without them bf16 is emulated and slow: on a 2-core
    # AVX2 EPYC (torch 2.14.1, 4,000 CIFAR-10 images, 1 epoch) bf16 trained 185 images/s against 1,725 in fp32.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def hardware_name(device: torch.device) -> str:
    """What a trial really ran on, for its record ("NVIDIA H200"; "AMD EPYC, 2 threads, no bf16"): --device auto and
    --precision auto resolve per machine, and one study's pieces may run on several (the published matrix's did)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    model = platform.processor() or platform.machine() or "unknown CPU"
    with contextlib.suppress(OSError):  # Linux names the model here; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            model = next((name for line in info if line.startswith("model name")
                          if (name := line.split(":", 1)[-1].strip())), model)
    return f"{model}, {torch.get_num_threads()} threads, {'bf16' if cpu_supports_bf16() else 'no bf16'}"


def precision_name(precision: str, device: torch.device) -> str:
    """The arithmetic a run really trains in, as its --precision name ("auto" resolved on this machine). Trials
    record it because auto means bf16 on a CPU with AVX512-BF16 and fp32 on one without, and one study's pieces may
    run on both (the published matrix's did)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_precision(precision, device)]


def pack_runs_per_member(device: torch.device) -> bool:
    """On CPU a pack runs each member's convolutions, matmuls, loss, gradient norm and optimizer step on its own slice,
    so every member computes exactly what it computes alone (bench.packed, bench.losses, bench.optimizers;
    fused_packs_on_cpu turns it off). Why: CPU kernels split a reduction across threads by the tensor's size, so a
    grouped convolution's weight gradient sums in another order than the member's own convolution; a mixed pack's
    loss formula is not the solo run's torch kernel; and an update with per-member tensors rounds differently from
    the same update with Python numbers (measured with 2 threads on this project's 2-core EPYC, torch 2.14:
    TinyCNN's conv weight gradients differ by up to 2e-5 in fp32 and 6e-2 in bf16 after one step; a 5-epoch CIFAR-10
    cell in a pack of 2 ended 0.4 points of test accuracy away from its solo run). The price: a pack of 2 trains
    1,630 member-images/s member by member against 1,990 with the fused kernels and 2,320 for a solo run (4,000
    CIFAR-10 images, 1 epoch, bf16, medians of 3 interleaved runs on a CPU shared with a matrix run; bench.perf
    --pack 1,2 times both), so packing never paid on CPU and --pack auto is 1 there: a CPU pack is for checking that
    packing computes what the members compute alone. On CUDA the fused kernels are the point of packing and stay."""
    return device.type == "cpu" and not _fused_on_cpu


_fused_on_cpu = False


@contextlib.contextmanager
def fused_packs_on_cpu() -> Iterator[None]:
    """CUDA's fused pack kernels on CPU as well while the block runs (packs built inside it): how the tests check the
    code a GPU runs, and how bench.perf --pack times it beside the per-member path."""
    global _fused_on_cpu
    previous, _fused_on_cpu = _fused_on_cpu, True
    try:
        yield
    finally:
        _fused_on_cpu = previous


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning (fast) or deterministic algorithms (two runs of one seed agree bit for bit on CUDA).
    A CPU run is deterministic either way. CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts (bench.run does)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    # strict: an operation without a deterministic CUDA kernel raises instead of warning, so a run that says it is
    # deterministic is (the loss avoids cross_entropy's NLL kernel, which has none: bench.losses.PackLoss(fused=False))
    torch.use_deterministic_algorithms(deterministic)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
