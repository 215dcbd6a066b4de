"""YOLOv9 building blocks and the MMQARepNCSPELAN4 block (Mobile MQA inside a CSP-ELAN block).

Attribute names follow upstream YOLOv9 so that state-dict keys (model.<i>.<path>) map one to one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import MultiQueryAttentionLayerWithDownSampling
from models.norm import BN_EPS, BN_MOMENTUM, fuse_conv_bn

__all__ = [
    "Conv", "AConv", "ADown", "RepConvN", "RepNBottleneck", "RepNCSP", "RepNCSPELAN4", "ELAN1", "SPPELAN",
    "CBLinear", "CBFuse", "Silence", "Concat", "DFL", "MultiQueryAttentionLayerWithDownSampling",
    "MMQARepNCSPELAN4", "fuse_conv_bn", "autopad",
]


def autopad(k, p=None, d: int = 1):
    """'Same' padding for odd kernels."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, d: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def fuse(self) -> None:
        self.conv = fuse_conv_bn(self.conv, self.bn)
        del self.bn
        self.forward = self.forward_fuse


class AConv(nn.Module):
    """Down-sampling: 2x2 stride-1 average pool, then a stride-2 3x3 Conv."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv1(F.avg_pool2d(x, 2, 1, 0, False, True))


class ADown(nn.Module):
    """Down-sampling with two halves: strided 3x3 Conv, and 3x3 max pool + 1x1 Conv."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = F.avg_pool2d(x, 2, 1, 0, False, True).chunk(2, 1)
        return torch.cat((self.cv1(x1), self.cv2(F.max_pool2d(x2, 3, 2, 1))), 1)


class RepConvN(nn.Module):
    """3x3 Conv-BN + 1x1 Conv-BN summed, then SiLU; re-parameterisable into a single 3x3 conv."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1, d: int = 1,
                 act=True):
        super().__init__()
        assert k == 3 and p == 1
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x) + self.conv2(x))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge both branches into self.conv (3x3 with bias)."""
        if hasattr(self, "conv"):
            return
        c3 = fuse_conv_bn(self.conv1.conv, self.conv1.bn)
        c1 = fuse_conv_bn(self.conv2.conv, self.conv2.bn)
        c3.weight.add_(F.pad(c1.weight, [1, 1, 1, 1]))
        c3.bias.add_(c1.bias)
        self.conv = c3
        del self.conv1, self.conv2
        self.forward = self.forward_fuse


class RepNBottleneck(nn.Module):
    """RepConvN -> Conv 3x3, with a residual when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k=(3, 3), e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RepConvN(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """CSP block: two 1x1 branches, n RepNBottlenecks on one, concatenated and mixed."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class _ELANBase(nn.Module):
    """Shared forward of the ELAN family: split, two chained stages, concat everything, mix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class ELAN1(_ELANBase):
    def __init__(self, c1: int, c2: int, c3: int, c4: int):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


class RepNCSPELAN4(_ELANBase):
    def __init__(self, c1: int, c2: int, c3: int, c4: int, c5: int = 1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


class MMQARepNCSPELAN4(_ELANBase):
    """RepNCSPELAN4 whose two 3x3 Convs are Mobile MQA layers (value_dim = key_dim, no query stride).

    num_heads / key_dim / kv_strides are this project's extension so YAMLs can choose cheaper attention;
    the defaults give the original block.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, c5: int = 1,
                 num_heads: int = 8, key_dim: int = 48, kv_strides: int = 1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5),
                                 MultiQueryAttentionLayerWithDownSampling(c4, num_heads, key_dim, key_dim, 1, 1, kv_strides))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5),
                                 MultiQueryAttentionLayerWithDownSampling(c4, num_heads, key_dim, key_dim, 1, 1, kv_strides))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


class SPPELAN(nn.Module):
    """SPP-ELAN: 1x1 Conv, three chained 5x5 max pools, concat the four, 1x1 Conv."""

    def __init__(self, c1: int, c2: int, c3: int, k: int = 5):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.MaxPool2d(k, 1, k // 2)
        self.cv3 = nn.MaxPool2d(k, 1, k // 2)
        self.cv4 = nn.MaxPool2d(k, 1, k // 2)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for m in (self.cv2, self.cv3, self.cv4):
            y.append(m(y[-1]))
        return self.cv5(torch.cat(y, 1))


class CBLinear(nn.Module):
    """One 1x1 conv (with bias) whose output is split into pieces for later CBFuse layers."""

    def __init__(self, c1: int, c2s: list[int], k: int = 1, s: int = 1, p=None, g: int = 1):
        super().__init__()
        self.c2s = list(c2s)
        self.conv = nn.Conv2d(c1, sum(self.c2s), k, s, autopad(k, p), groups=g, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    """Nearest-resize selected CBLinear pieces to the last input's size and add them to it."""

    def __init__(self, idx: list[int]):
        super().__init__()
        self.idx = list(idx)

    def forward(self, xs: list) -> torch.Tensor:
        target = xs[-1]
        out = target
        for i, pieces in enumerate(xs[:-1]):
            out = out + F.interpolate(pieces[self.idx[i]], size=target.shape[2:], mode="nearest")
        return out


class Silence(nn.Module):
    """Identity: lets the auxiliary branch read the raw image from layer 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution Focal Loss decoder: expectation over reg_max bins by a fixed 1x1 conv."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape  # [B, 4*c1, A]
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)
