"""Optimizer groups, LR schedules, the schedule-aware optimizer choice and the EMA of model weights."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    decay: float = 5e-4) -> torch.optim.Optimizer:
    """Three groups, in this order: biases (no decay), weights (decay), norm weights (no decay).

    The order fixes what x/lr0, x/lr1, x/lr2 in results.csv mean; warmup raises group 0 (biases) from
    warmup_bias_lr. foreach: one multi-tensor update per group (torch's CPU default is a Python loop over the
    ~1500 tensors; 25 -> 20 ms per AdamW step for yolov9-t-MMQA on CPU, CUDA already uses it).
    """
    biases, weights, norms = [], [], []
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                biases.append(p)
            elif isinstance(module, norm_types):
                norms.append(p)
            else:
                weights.append(p)
    if name == "Adam":
        opt = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999), foreach=True)
    elif name == "AdamW":
        opt = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0, foreach=True)
    elif name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True, foreach=True)
    else:
        raise ValueError(f"optimizer {name} not supported")
    opt.add_param_group({"params": weights, "weight_decay": decay})
    opt.add_param_group({"params": norms, "weight_decay": 0.0})
    return opt


# --optimizer auto: below this many optimizer steps the run is "short" and gets AdamW (see choose_optimizer).
AUTO_SGD_MIN_STEPS = 10_000
AUTO_ADAMW_LR = 0.002  # from scratch: measured on 37-40 image sets (benchmarks/train_small.py)
AUTO_ADAMW_FINETUNE_LR = 0.0005  # from --weights: measured in benchmarks/train_small.py --finetune
AUTO_ADAMW_BETA1 = 0.9
AUTO_WARMUP_MAX_FRAC = 0.05  # short runs: warmup at most this share of all iterations (upstream floor: 100)


@dataclass(frozen=True)
class OptimizerChoice:
    """What `--optimizer` resolved to; `hyp_updates` are written into hyp (and so hyp.yaml and checkpoints)."""

    name: str
    lr0: float
    momentum: float
    warmup_bias_lr: float
    warmup_max_frac: float  # 0: upstream warmup of max(warmup_epochs * batches, 100) iterations
    steps: int  # optimizer steps the run will make (estimate, before warmup's extra early steps)
    reason: str

    def hyp_updates(self) -> dict:
        upd = {"lr0": self.lr0, "momentum": self.momentum, "warmup_bias_lr": self.warmup_bias_lr}
        if self.warmup_max_frac > 0:
            upd["warmup_max_frac"] = self.warmup_max_frac
        return upd


def optimizer_steps(n_images: int, batch: int, nbs: int, epochs: int) -> int:
    """Optimizer steps of a run: batches per epoch x epochs / gradient accumulation (to nominal batch nbs)."""
    batch = max(int(batch), 1)
    nb = math.ceil(max(int(n_images), 0) / batch)
    accumulate = max(round(nbs / batch), 1)
    return math.ceil(nb * max(int(epochs), 0) / accumulate)


def choose_optimizer(name: str, n_images: int, batch: int, nbs: int, epochs: int, hyp: dict,
                     finetune: bool = False) -> OptimizerChoice:
    """Resolve `--optimizer` ('auto', 'SGD', 'Adam', 'AdamW') for a run of the given size.

    Why: upstream's SGD (lr0 0.01, tuned for hundreds of COCO epochs) hardly moves in the ~100 optimizer
    steps a 40-image, 100-epoch run makes at nominal batch 64, while AdamW at a small lr converges there.
    'auto' picks upstream SGD (hyp values untouched) from AUTO_SGD_MIN_STEPS steps on, AdamW below it
    (lr AUTO_ADAMW_LR, or AUTO_ADAMW_FINETUNE_LR from pretrained weights; beta1 0.9; no bias warmup lr;
    warmup capped to AUTO_WARMUP_MAX_FRAC of the run). An explicit name always keeps the hyp values as
    they are, so `--optimizer SGD` is upstream's recipe and a resumed run (which stores the resolved name
    and values) never decides again.
    """
    steps = optimizer_steps(n_images, batch, nbs, epochs)
    keep = dict(lr0=float(hyp["lr0"]), momentum=float(hyp["momentum"]), warmup_bias_lr=float(hyp["warmup_bias_lr"]),
                warmup_max_frac=0.0, steps=steps)
    if name != "auto":
        if name not in ("SGD", "Adam", "AdamW"):
            raise ValueError(f"optimizer {name} not supported")
        return OptimizerChoice(name=name, reason=f"--optimizer {name}: hyperparameter file values", **keep)
    size = f"{steps} optimizer steps ({n_images} images, batch {batch}, nominal batch {nbs}, {epochs} epochs)"
    if steps >= AUTO_SGD_MIN_STEPS:
        return OptimizerChoice(name="SGD", reason=f"{size} >= {AUTO_SGD_MIN_STEPS}: upstream SGD "
                                                   f"with the hyperparameter file values", **keep)
    lr = AUTO_ADAMW_FINETUNE_LR if finetune else AUTO_ADAMW_LR
    return OptimizerChoice(name="AdamW", lr0=lr, momentum=AUTO_ADAMW_BETA1, warmup_bias_lr=0.0,
                           warmup_max_frac=AUTO_WARMUP_MAX_FRAC, steps=steps,
                           reason=f"{size} < {AUTO_SGD_MIN_STEPS}: short schedule, AdamW lr0 {lr}"
                                  f"{' (fine-tuning --weights)' if finetune else ''}, beta1 {AUTO_ADAMW_BETA1}, "
                                  f"warmup <= {AUTO_WARMUP_MAX_FRAC:.0%} of the run; "
                                  f"--optimizer SGD for upstream's recipe")


def warmup_iterations(hyp: dict, nb: int, epochs: int) -> int:
    """Warmup length in iterations (batches): upstream's max(warmup_epochs * nb, 100), capped to
    hyp['warmup_max_frac'] of all iterations when that key is set (auto's short schedules), since on a
    tiny dataset 100 iterations can be a third of the whole run."""
    nw = max(round(hyp["warmup_epochs"] * nb), 100)
    frac = float(hyp.get("warmup_max_frac", 0.0))
    if frac > 0:
        nw = min(nw, max(round(frac * nb * epochs), 1))
    return nw


def lr_lambda(kind: str, epochs: int, lrf: float):
    """LR multiplier per epoch: 'linear' (default), 'cos', 'flat-cos' (flat for half, then cosine), 'fixed'."""
    if kind == "fixed":
        return lambda e: 1.0
    if kind == "cos":
        return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1
    if kind == "flat-cos":
        half = epochs / 2

        def f(e):
            if e < half:
                return 1.0
            return ((1 - math.cos((e - half) * math.pi / max(epochs - half, 1))) / 2) * (lrf - 1) + 1
        return f
    return lambda e: (1 - e / epochs) * (1.0 - lrf) + lrf


class ModelEMA:
    """Exponential moving average of weights; decay ramps up as 0.9999 * (1 - exp(-updates / 2000))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = copy.deepcopy(unwrap(model)).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))
        self._pairs: tuple[nn.Module, list, list] | None = None  # (source model, EMA tensors, its tensors)
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        ema_t, model_t = self._tensors(unwrap(model))
        if ema_t:  # one fused multi-tensor kernel instead of ~2 launches per tensor (matters on GPU)
            torch._foreach_lerp_(ema_t, model_t, 1 - d)  # ema = d * ema + (1 - d) * model

    def _tensors(self, src: nn.Module) -> tuple[list, list]:
        """The float tensors (parameters and buffers) of the EMA and of `src`, matched by name once per source
        model: reading both state_dicts every step cost 13x the averaging itself (yolov9-t-MMQA on CPU: 26 ms
        vs 2 ms). Valid while `src` keeps its tensors (training updates them in place; the trainer builds the
        EMA after the model's last move)."""
        if self._pairs is None or self._pairs[0] is not src:
            esd = {k: v for k, v in self.ema.state_dict(keep_vars=True).items() if v.dtype.is_floating_point}
            msd = src.state_dict(keep_vars=True)
            self._pairs = (src, list(esd.values()), [msd[k] for k in esd])
        return self._pairs[1], self._pairs[2]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
