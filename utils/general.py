"""Small shared helpers: logging, user-facing errors, run folders, box format conversions."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # repository root

logging.basicConfig(format="%(message)s", level=logging.INFO)
LOGGER = logging.getLogger("yolov9mqa")


class UserError(Exception):
    """A mistake in user input (paths, YAML, flags): reported as one line, never as a traceback."""


def debug_enabled() -> bool:
    return os.environ.get("YOLO_DEBUG", "0") not in ("", "0", "false", "False")


def cli(main: Callable) -> Callable:
    """Wrap a script's main so user mistakes end with one clear line and exit code 1.

    Set YOLO_DEBUG=1 (or pass --debug) to see the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if "--debug" in sys.argv:
            sys.argv.remove("--debug")
            os.environ["YOLO_DEBUG"] = "1"
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if debug_enabled():
                raise
            print(f"ERROR: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("Interrupted.", file=sys.stderr)
            sys.exit(130)

    return wrapper


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = False) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem = path.name
        used = {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()
        n = 2
        while f"{stem}{n}" in used:
            n += 1
        path = path.with_name(f"{stem}{n}")
    if mkdir:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a parent is a regular file, read-only or full disk
            raise UserError(f"{path}: cannot create output folder ({e.strerror or e})") from None
    return path


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of divisor that is >= x."""
    divisor = int(divisor)
    return int(np.ceil(x / divisor) * divisor)


def check_img_size(imgsz: int | list, stride: int = 32) -> int | list:
    """Round image size(s) up to a multiple of the model stride, warning if changed."""
    if isinstance(imgsz, (list, tuple)):
        out = [max(make_divisible(x, stride), stride) for x in imgsz]
    else:
        out = max(make_divisible(imgsz, stride), stride)
    if out != imgsz:
        LOGGER.warning(f"WARNING: image size {imgsz} must be a multiple of stride {stride}, using {out}")
    return out


def clean_str(s: str) -> str:
    return re.sub(r"[|@#!¡·$€%&()=?¿^*;:,¨´><+]", "_", s)


# ---- box conversions (work on torch tensors and numpy arrays alike) ----

def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x):
    y = _clone(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    y = _clone(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0):
    """Normalised centre boxes -> pixel corner boxes (optionally shifted by letterbox padding)."""
    y = _clone(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w: float = 640, h: float = 640, clip: bool = False):
    """Pixel corner boxes -> normalised centre boxes."""
    if clip:
        x = clip_boxes(_clone(x), (h, w))
    y = _clone(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes, shape: tuple):
    """Clip xyxy boxes in place to an image of shape (h, w)."""
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, shape[1])
        boxes[..., 1].clamp_(0, shape[0])
        boxes[..., 2].clamp_(0, shape[1])
        boxes[..., 3].clamp_(0, shape[0])
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, shape[1])
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, shape[0])
    return boxes


def scale_boxes(img1_shape: tuple, boxes, img0_shape: tuple, ratio_pad=None):
    """Map xyxy boxes from the letterboxed image (img1_shape h,w) back to the original (img0_shape h,w).

    ratio_pad = ((ratio_h, ratio_w), (pad_w, pad_h)) as recorded by the letterbox; computed if None.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = ((img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2)
        gain_w = gain_h = gain
    else:
        gain_h, gain_w = ratio_pad[0] if isinstance(ratio_pad[0], (list, tuple)) else (ratio_pad[0], ratio_pad[0])
        pad = ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., [0, 2]] /= gain_w
    boxes[..., [1, 3]] /= gain_h
    return clip_boxes(boxes, img0_shape)
