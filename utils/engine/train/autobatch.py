"""`--batch-size -1`: the largest training batch that fits a fraction of the GPU's memory.

Peak memory of a training step grows about linearly with the batch (activations) on top of a fixed part
(weights, gradients, optimizer state, cuDNN workspaces). `fit_batch_size` measures a few small batches
through a callable, fits mem = slope * batch + intercept by least squares and solves for the batch that
uses `fraction` of the available memory; it is a pure function so it is tested on CPU with a fake memory
model. `cuda_batch_size` supplies the real measurement (one forward + backward per probed batch, on a copy of
the model, in training's precision and at its largest image size).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, UserError

DEFAULT_BATCH = 16
PROBES = (1, 2, 4, 8, 16)


@dataclass
class AutoBatch:
    """The chosen batch and the numbers behind it (printed for the user)."""

    batch: int
    fraction: float
    total_gib: float  # the memory the fraction applies to
    measured: dict[int, float] = field(default_factory=dict)  # batch -> peak GiB (failed probes absent)
    slope_gib: float = 0.0  # GiB per extra image
    intercept_gib: float = 0.0
    failed_at: int | None = None  # smallest probe that ran out of memory
    note: str = ""

    def summary(self) -> str:
        pts = ", ".join(f"b{b}={m:.2f}G" for b, m in sorted(self.measured.items()))
        s = (f"AutoBatch: batch {self.batch} for {self.fraction:.0%} of {self.total_gib:.1f} GiB available "
             f"(peak memory {pts}; fit {self.slope_gib:.3f} GiB/image + {self.intercept_gib:.2f} GiB")
        s += f"; out of memory at b{self.failed_at}" if self.failed_at else ""
        return s + (f"; {self.note}" if self.note else "") + ")"


def fit_batch_size(measure: Callable[[int], float], total: float, fraction: float = 0.6,
                   probes: Sequence[int] = PROBES, max_batch: int = 1024, default: int = DEFAULT_BATCH,
                   oom: tuple[type[BaseException], ...] = (MemoryError,)) -> AutoBatch:
    """Largest batch whose predicted peak memory stays within fraction * total.

    measure(b) -> peak bytes of one training step at batch b; raising one of `oom` marks b (and larger) as
    not fitting. With fewer than two successful probes the default (or, if even that cannot be measured,
    the largest probe that ran) is returned with a note. The answer never reaches a probe that failed.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    gib = 1024 ** 3
    res = AutoBatch(batch=default, fraction=fraction, total_gib=total / gib)
    for b in sorted(set(int(p) for p in probes)):
        try:
            res.measured[b] = float(measure(b)) / gib
        except oom:
            res.failed_at = b
            break
    if len(res.measured) < 2:
        ok = max(res.measured, default=None)
        res.batch = default if res.failed_at is None else max(ok or 1, 1)
        res.note = "too few successful probes to fit, not extrapolating"
        return res
    b = np.array(sorted(res.measured), float)
    m = np.array([res.measured[int(x)] for x in b])
    slope, intercept = np.polyfit(b, m, 1)
    res.slope_gib, res.intercept_gib = float(slope), float(intercept)
    budget = fraction * total / gib
    if slope <= 0:  # memory did not grow with the batch (noise): nothing to extrapolate from
        res.batch, res.note = int(b[-1]), "memory did not grow with batch size"
    else:
        res.batch = int((budget - intercept) / slope)
    if res.failed_at is not None:
        res.batch = min(res.batch, res.failed_at - 1)
    if res.batch < 1:
        res.batch, res.note = 1, "even batch 1 exceeds the budget by the fit"
    res.batch = min(res.batch, max_batch)
    return res


def cuda_batch_size(model: nn.Module, imgsz: int, device: torch.device, fraction: float = 0.6, amp: bool = True,
                    loss_fn: Callable | None = None, max_batch: int = 1024, cuda: Any = torch.cuda) -> AutoBatch:
    """Measure the peak memory of training steps at a few batches and fit (CUDA; `cuda` is the torch.cuda
    namespace, a stand-in in tests).

    What it measures is what training will run: forward + loss + backward in the precision training uses
    (`amp`: the trainer's decision), on images of size `imgsz` (pass the largest --multi-scale size), in
    channels_last. It probes a deep copy, so the model's weights, BatchNorm statistics and gradients are
    never touched (train-mode probes on random images would drag its running statistics toward noise); the
    copy's weights also stand in for the EMA copy training keeps. The budget is `fraction` of the memory this
    process can have: what the driver reports free plus what the caching allocator already holds (other
    processes and the CUDA context are left out). cuDNN autotuning is off during the probes: its trial
    workspaces would inflate the peaks.
    loss_fn(pred, targets) -> (loss, items) like DetectionLoss; without it the mean of the outputs is used.
    """
    cuda.synchronize(device)
    cuda.empty_cache()
    free, total = cuda.mem_get_info(device)
    available = free + cuda.memory_reserved(device)
    probe = copy.deepcopy(model).train()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False

    def measure(b: int) -> float:
        cuda.synchronize(device)
        cuda.empty_cache()
        cuda.reset_peak_memory_stats(device)
        x = torch.rand(b, 3, imgsz, imgsz, device=device).contiguous(memory_format=torch.channels_last)
        try:
            with torch.autocast(device.type, enabled=amp):
                pred = probe(x)
                if loss_fn is not None:
                    loss = loss_fn(pred, _targets(b, int(getattr(model, "nc", 1)), device))[0]
                else:
                    loss = sum(t.float().mean() for t in _tensors(pred))
            loss.backward()
            cuda.synchronize(device)
            return float(cuda.max_memory_allocated(device))
        finally:
            probe.zero_grad(set_to_none=True)

    try:
        res = fit_batch_size(measure, available, fraction, max_batch=max_batch, oom=(torch.OutOfMemoryError,))
    finally:
        torch.backends.cudnn.benchmark = benchmark
        del probe
        cuda.empty_cache()
    res.note = "; ".join(x for x in (res.note, f"{total / 1024 ** 3:.1f} GiB on the device") if x)
    return res


def _targets(batch: int, nc: int, device, per_image: int = 8):
    """Random training targets [n, 6] (image, class, xc, yc, w, h normalised), so the loss's assignment
    memory is part of the measurement."""
    g = torch.Generator().manual_seed(0)
    n = batch * per_image
    wh = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    img = torch.arange(batch).repeat_interleave(per_image).float()[:, None]
    cls = torch.randint(0, max(nc, 1), (n, 1), generator=g).float()
    return torch.cat([img, cls, xy, wh], 1).to(device)


def _tensors(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "float"):
        yield x


def auto_batch_size(model: nn.Module, imgsz: int, device: torch.device, fraction: float = 0.6,
                    loss_fn: Callable | None = None, world_size: int = 1, amp: bool = True) -> int:
    """What `--batch-size -1` resolves to: measured on CUDA, the default 16 elsewhere (printed either way).
    imgsz: the largest training image size (with --multi-scale, its top size); amp: training's precision."""
    if world_size > 1:
        raise UserError("--batch-size -1 (autobatch) works on a single GPU only; give a batch size under DDP")
    if getattr(device, "type", str(device)) != "cuda":
        LOGGER.warning(f"WARNING: --batch-size -1 (autobatch) needs a CUDA device; using the default batch {DEFAULT_BATCH}")
        return DEFAULT_BATCH
    res = cuda_batch_size(model, imgsz, device, fraction, amp=amp, loss_fn=loss_fn)
    LOGGER.info(res.summary())
    return res.batch
