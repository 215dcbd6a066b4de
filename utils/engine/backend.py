"""One inference loader for validation, detection and export checks: .pt (this project), .torchscript, .onnx."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from utils.checkpoint import load_model
from utils.general import UserError


class Backend:
    """Callable model wrapper: float images [B,3,H,W] in 0..1 -> predictions [B, 4+nc, A] (main branch)."""

    def __init__(self, weights: str | Path | nn.Module, device: str | torch.device = "cpu", half: bool = False,
                 fuse: bool = True):
        self.device = torch.device(device)
        self.half = bool(half) and self.device.type == "cuda"
        self.model: nn.Module | None = None
        if isinstance(weights, nn.Module):
            self.model = weights
            self.weights = None
        else:
            self.weights = Path(weights)
            suffix = self.weights.suffix.lower()
            if suffix == ".pt":
                self.model = load_model(self.weights, self.device, fuse=fuse)
            else:
                raise UserError(f"{weights}: unsupported weights format '{suffix}' (use .pt, .torchscript or .onnx)")
        if self.model is not None:
            self.model.to(self.device).eval()
            if self.half:
                self.model.half()
            self.stride = int(max(self.model.stride))
            self.names = list(getattr(self.model, "names", [str(i) for i in range(self.model.nc)]))
            self.nc = self.model.nc
        self.pt = self.model is not None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    @torch.no_grad()
    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        out = self.model(im.to(self.device, self.dtype))
        return out[0] if isinstance(out, (tuple, list)) else out

    def warmup(self, imgsz: tuple = (1, 3, 64, 64)) -> None:
        self(torch.zeros(*imgsz))
