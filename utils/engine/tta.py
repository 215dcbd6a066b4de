"""Test-time augmentation: predict on rescaled / mirrored copies and merge all boxes before NMS.

Why here and not in the model: the model stays a plain detector (export-friendly) and every backend
(.pt model, ensemble) gets the same TTA. Predictions use the [B, 4+nc, A] layout (xywh pixels + scores).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_SCALES = (1.0, 0.83, 0.67)
DEFAULT_FLIPS = (None, 3, None)  # 3 = left-right (width axis), 2 = up-down


def scale_image(im: Tensor, ratio: float, stride: int = 32, pad_value: float = 0.447) -> Tensor:
    """Resize a float batch by ratio, then pad right/bottom to a stride multiple (keeps box origin fixed)."""
    if ratio == 1.0:
        return im
    h, w = im.shape[2:]
    nh, nw = max(int(round(h * ratio)), 1), max(int(round(w * ratio)), 1)
    im = F.interpolate(im, size=(nh, nw), mode="bilinear", align_corners=False)
    ph, pw = math.ceil(nh / stride) * stride - nh, math.ceil(nw / stride) * stride - nw
    return F.pad(im, (0, pw, 0, ph), value=pad_value) if (ph or pw) else im


def descale(y: Tensor, ratio: float, flip: int | None, img_hw: tuple[int, int],
            scaled_hw: tuple[int, int] | None = None) -> Tensor:
    """Map predictions [B, 4+nc, A] of an augmented copy back to the un-augmented input's pixels."""
    y = y.clone()
    gy, gx = (scaled_hw[0] / img_hw[0], scaled_hw[1] / img_hw[1]) if scaled_hw else (ratio, ratio)  # exact per axis
    y[:, [0, 2]] /= gx
    y[:, [1, 3]] /= gy
    if flip == 3:
        y[:, 0] = img_hw[1] - y[:, 0]
    elif flip == 2:
        y[:, 1] = img_hw[0] - y[:, 1]
    return y


def forward_augment(forward: Callable[[Tensor], tuple[Tensor, object]], im: Tensor, stride: int = 32,
                    scales: Sequence[float] = DEFAULT_SCALES, flips: Sequence[int | None] = DEFAULT_FLIPS
                    ) -> tuple[Tensor, object]:
    """Run `forward` (im -> (y, feats)) on each (scale, flip) copy and concatenate predictions along anchors.

    Returns (y_merged [B, 4+nc, sum A], feats of the first copy); with the default first copy (scale 1,
    no flip) those feats are the plain forward's, so validation losses stay comparable. NMS afterwards
    removes the duplicates the copies produce.
    """
    h, w = im.shape[2:]
    ys, feats0 = [], None
    for k, (s, f) in enumerate(zip(scales, flips)):
        xi = im.flip(f) if f else im
        xi = scale_image(xi, s, stride)
        yi, fi = forward(xi)
        if k == 0:
            feats0 = fi
        scaled_hw = (max(int(round(h * s)), 1), max(int(round(w * s)), 1))
        ys.append(descale(yi, s, f, (h, w), scaled_hw if s != 1.0 else None))
    return torch.cat(ys, 2), feats0
