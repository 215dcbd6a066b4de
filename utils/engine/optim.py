"""Optimizer groups, LR schedules and the EMA of model weights used by the trainer."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    decay: float = 5e-4) -> torch.optim.Optimizer:
    """Three groups, in this order: biases (no decay), weights (decay), norm weights (no decay).

    The order fixes what x/lr0, x/lr1, x/lr2 in results.csv mean; warmup raises group 0 (biases) from
    warmup_bias_lr.
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
        opt = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        opt = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"optimizer {name} not supported")
    opt.add_param_group({"params": weights, "weight_decay": decay})
    opt.add_param_group({"params": norms, "weight_decay": 0.0})
    return opt


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
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        msd = unwrap(model).state_dict()
        pairs = [(v, msd[k].detach()) for k, v in self.ema.state_dict().items() if v.dtype.is_floating_point]
        if pairs:  # one fused multi-tensor kernel instead of ~2 launches per tensor (matters on GPU)
            ema_t, model_t = zip(*pairs)
            torch._foreach_lerp_(list(ema_t), list(model_t), 1 - d)  # ema = d * ema + (1 - d) * model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
