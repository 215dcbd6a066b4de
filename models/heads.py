"""Detection heads: DDetect (one branch) and DualDDetect (auxiliary + main branch, YOLOv9 PGI)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.common import DFL, Conv
from utils.boxes import dist2bbox, make_anchors
from utils.general import make_divisible


def _branches(ch: list[int], nc: int, reg_max: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Box-distribution and class branches for the given input channels."""
    c2 = make_divisible(max(ch[0] // 4, reg_max * 4, 16), 4)
    c3 = max(ch[0], min(nc * 2, 128))
    box = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3, g=4), nn.Conv2d(c2, 4 * reg_max, 1, groups=4))
                        for x in ch)
    cls = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
    return box, cls


def _init_bias(box: nn.ModuleList, cls: nn.ModuleList, strides, nc: int) -> None:
    for a, b, s in zip(box, cls, strides):
        a[-1].bias.data[:] = 1.0
        b[-1].bias.data[:nc] = math.log(5 / nc / (640 / float(s)) ** 2)


class DDetect(nn.Module):
    """Anchor-free decoupled head. Training: raw maps [B, 4*reg_max+nc, h, w] per level.
    Eval: (y [B, 4+nc, A] with xywh in input pixels and sigmoid scores, raw maps)."""

    reg_max = 16
    export = False  # export: return only y
    strides: tuple[float, ...] = ()  # the strides as Python numbers: no tensor read while tracing or exporting

    def __init__(self, nc: int = 80, ch: tuple = ()):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.no = nc + self.reg_max * 4
        self.stride = torch.zeros(self.nl)
        self.cv2, self.cv3 = _branches(list(ch), nc, self.reg_max)
        self.dfl = DFL(self.reg_max)

    def _raw(self, x: list[torch.Tensor], box: nn.ModuleList, cls: nn.ModuleList) -> list[torch.Tensor]:
        return [torch.cat((box[i](x[i]), cls[i](x[i])), 1) for i in range(len(box))]

    def _decode(self, feats: list[torch.Tensor], dfl: DFL) -> torch.Tensor:
        dev = feats[0].device.type
        if torch.is_autocast_enabled(dev):  # bf16/fp16 autocast: pixel coordinates need fp32 (bf16 steps 2-4 px at 640)
            with torch.autocast(dev, enabled=False):
                return self._decode([f.float() for f in feats], dfl)
        b = feats[0].shape[0]
        # Python floats, not self.stride: float() of a tensor element is a data-dependent scalar that
        # torch.export refuses and that splits torch.compile's graph inside the layer loop
        anchors, strides = make_anchors(feats, self.strides or self.stride.tolist(), 0.5)
        flat = torch.cat([f.reshape(b, self.no, -1) for f in feats], 2)
        dist, cls = flat.split((self.reg_max * 4, self.nc), 1)
        boxes = dist2bbox(dfl(dist), anchors.transpose(0, 1).unsqueeze(0), xywh=True, dim=1) * strides.transpose(0, 1)
        return torch.cat((boxes, cls.sigmoid()), 1)

    def forward(self, x: list[torch.Tensor]):
        feats = self._raw(x, self.cv2, self.cv3)
        if self.training:
            return feats
        y = self._decode(feats, self.dfl)
        return y if self.export else (y, feats)

    def bias_init(self) -> None:
        _init_bias(self.cv2, self.cv3, self.stride, self.nc)


class DualDDetect(DDetect):
    """Two DDetect branches: inputs [aux levels..., main levels...]. Training returns [aux, main] raw maps;
    eval decodes only the main branch: (y_main, [aux, main])."""

    def __init__(self, nc: int = 80, ch: tuple = ()):
        nl = len(ch) // 2
        super().__init__(nc, ch[:nl])
        self.cv4, self.cv5 = _branches(list(ch[nl:]), nc, self.reg_max)
        self.dfl2 = DFL(self.reg_max)

    def forward(self, x: list[torch.Tensor]):
        aux = self._raw(x[:self.nl], self.cv2, self.cv3)
        main = self._raw(x[self.nl:], self.cv4, self.cv5)
        if self.training:
            return [aux, main]
        y = self._decode(main, self.dfl2)
        return y if self.export else (y, [aux, main])

    def bias_init(self) -> None:
        super().bias_init()
        _init_bias(self.cv4, self.cv5, self.stride, self.nc)
