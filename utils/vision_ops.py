"""torchvision's compiled NMS kernel, loaded without importing torchvision's Python package.

Why: `import torchvision` imports torch._dynamo (through torchvision.ops.roi_align), about 1.3 s of every
detect_dual.py start on a 2-core machine (40% of `import torch` itself), for one kernel. torchvision ships that
kernel in its extension library, which registers it as torch.ops.torchvision.nms when loaded; this module loads
the library directly, and imports torchvision.ops instead wherever that fails (another build layout) or
torchvision is already imported.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import Tensor

_nms = None


def _load_extension() -> None:
    """torch.ops.load_library on torchvision's extension (named _C_stable or _C, with the interpreter's suffix)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return
    from importlib.machinery import EXTENSION_SUFFIXES
    folder = Path(spec.origin).parent
    for stem in ("_C_stable", "_C"):
        for suffix in EXTENSION_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                torch.ops.load_library(str(folder / f"{stem}{suffix}"))
                return


def _kernel():
    global _nms
    if _nms is None:
        if "torchvision" not in sys.modules:
            try:
                _load_extension()
                _nms = torch.ops.torchvision.nms
            except (ImportError, OSError, RuntimeError, AttributeError):
                _nms = None
        if _nms is None:
            from torchvision.ops import nms
            _nms = nms
    return _nms


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the xyxy boxes kept by greedy NMS, by decreasing score (torchvision.ops.nms)."""
    return _kernel()(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category of `idxs`: the boxes of each category are shifted clear of all others (by
    category x (largest coordinate + 1)), so one NMS call never lets two categories suppress each other."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
