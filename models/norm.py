"""BatchNorm settings shared by every block and the Conv+BN fusion used when deploying.

A leaf module: models/common.py and models/attention.py both import it, neither imports the other's
internals, so there is no import cycle inside models/.
"""
from __future__ import annotations

import torch
import torch.nn as nn

BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # YOLOv9's BatchNorm settings, used everywhere in the model


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return one Conv2d (with bias) equal to conv followed by bn in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).requires_grad_(False).to(conv.weight.device)
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((b - bn.running_mean) * scale + bn.bias)
    return fused
