"""Mobile MQA (MobileNetV4, arXiv 2404.10518): multi-query attention with optional spatial down-sampling.

All query heads share one key head and one value head. Tokens are the pixels of a feature map; the query
map may be average-pooled (query strides) and the key/value maps reduced by a strided depthwise conv
(kv strides) so that attention cost can be traded for resolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.norm import BN_EPS, BN_MOMENTUM, fuse_conv_bn


def _strided_dw(c: int, k: int, s: int) -> nn.Sequential:
    """Depthwise conv + BN (no activation) that shrinks the key/value map by s."""
    return nn.Sequential(
        nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False),
        nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM),
    )


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t with row-major strides on every dim, size-1 dims included.

    `.contiguous()` leaves a size-1 dim's stride as it was (e.g. 1 for a 1x1 key map); CUDA's
    memory-efficient SDPA checks the alignment of every stride and then finds no kernel (seen on an H200:
    'cutlassF: no kernel found to launch!' for a single key/value token).
    """
    want, acc = [], 1
    for n in reversed(t.shape):
        want.append(acc)
        acc *= n
    return t if tuple(reversed(want)) == t.stride() else t.clone(memory_format=torch.contiguous_format)


class MultiQueryAttentionLayerWithDownSampling(nn.Module):
    """Mobile MQA. Input and output are [B, C, H, W] for any H, W and batch size.

    key_dim and value_dim are per head. Two numerically equal paths: SDPA (fused kernel, no
    [B, h, L, P] matrix) for training/inference, and explicit matmuls (`explicit = True`) that
    ONNX/TorchScript export can trace. Note: with dropout > 0 in training, PyTorch's CPU SDPA falls
    back to its math kernel, which does materialise the matrix (measured); keep dropout 0 at high
    resolution.
    """

    explicit_default = False  # set True (e.g. by export) to force the explicit path in every instance

    def __init__(self, in_channels: int, num_heads: int, key_dim: int, value_dim: int,
                 query_h_strides: int, query_w_strides: int, kv_strides: int,
                 dw_kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        c = in_channels
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.query_strides = (int(query_h_strides), int(query_w_strides))
        self.kv_strides = int(kv_strides)
        self.dw_kernel_size = dw_kernel_size
        self.dropout = dropout
        self.scale = 1.0 / math.sqrt(key_dim)
        self.explicit: bool | None = None  # None: follow explicit_default / export detection

        self.query_norm = (nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)
                           if max(self.query_strides) > 1 else nn.Identity())
        self.query_proj = nn.Conv2d(c, num_heads * key_dim, 1, bias=False)
        self.key_down = _strided_dw(c, dw_kernel_size, self.kv_strides) if self.kv_strides > 1 else nn.Identity()
        self.key_proj = nn.Conv2d(c, key_dim, 1, bias=False)
        self.value_down = _strided_dw(c, dw_kernel_size, self.kv_strides) if self.kv_strides > 1 else nn.Identity()
        self.value_proj = nn.Conv2d(c, value_dim, 1, bias=False)
        self.output_proj = nn.Conv2d(num_heads * value_dim, c, 1, bias=False)

    # ---- shapes of the token grids, shared by forward and the FLOP count ----
    def query_grid(self, h: int, w: int) -> tuple[int, int]:
        qh, qw = self.query_strides
        # floor like AvgPool2d, but never below one token (a 1x1 map with stride 2 keeps its pixel)
        return max(h // qh, 1), max(w // qw, 1)

    def kv_grid(self, h: int, w: int) -> tuple[int, int]:
        s, k = self.kv_strides, self.dw_kernel_size
        if s == 1:
            return h, w
        p = k // 2
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def attention_flops(self, h: int, w: int) -> int:
        """Multiply-adds x2 of the two attention matmuls (QK^T and AV) for one image of an HxW map."""
        hq, wq = self.query_grid(h, w)
        hk, wk = self.kv_grid(h, w)
        return 2 * self.num_heads * (hq * wq) * (hk * wk) * (self.key_dim + self.value_dim)

    def _pool_query(self, x: torch.Tensor) -> torch.Tensor:
        qh, qw = self.query_strides
        if qh == 1 and qw == 1:
            return x
        h, w = x.shape[-2:]
        # maps smaller than the window: ceil mode averages what exists instead of failing
        x = F.avg_pool2d(x, (qh, qw), (qh, qw), ceil_mode=bool(h < qh or w < qw))
        return self.query_norm(x)

    def _use_explicit(self) -> bool:
        if self.explicit is not None:
            return self.explicit
        if self.explicit_default or torch.jit.is_scripting() or torch.jit.is_tracing():
            return True
        return bool(torch.onnx.is_in_onnx_export())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        nh, kd, vd = self.num_heads, self.key_dim, self.value_dim

        q = self.query_proj(self._pool_query(x))                  # [B, h*k, Hq, Wq]
        hq, wq = q.shape[-2:]
        L = hq * wq
        # channel index = head*k + j  ->  [B, h, k, L] -> [B, h, L, k]; contiguous for the fused kernel
        q = q.reshape(b, nh, kd, L).transpose(2, 3).contiguous()
        k = self.key_proj(self.key_down(x)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()      # [B,1,P,k]
        v = self.value_proj(self.value_down(x)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # [B,1,P,v]
        p_drop = self.dropout if self.training else 0.0

        if self._use_explicit():
            # q scaled before the product (as SDPA does): in fp16 (an exported --half graph) q @ k^T unscaled can
            # pass 65504 and become inf where the scaled logits are far inside the range
            attn = torch.matmul(q * self.scale, k.transpose(-1, -2))   # [B, h, L, P]
            attn = attn.softmax(dim=-1)
            if p_drop > 0:
                attn = F.dropout(attn, p_drop)
            out = torch.matmul(attn, v)                                 # [B, h, L, v]
        else:
            # one shared K/V head: fold the heads into the query length -> [B, 1, h*L, k]
            out = F.scaled_dot_product_attention(_packed(q.reshape(b, 1, nh * L, kd)), _packed(k), _packed(v),
                                                 dropout_p=p_drop, scale=self.scale)
            out = out.reshape(b, nh, L, vd)                             # [B, h, L, v]

        out = out.transpose(2, 3).reshape(b, nh * vd, hq, wq)           # channel = head*v + j
        # only query pooling changes the grid; decided from the static strides while tracing so an exported
        # graph keeps the resize for every input size (bilinear to the same size is the identity)
        if max(self.query_strides) > 1 and (torch.jit.is_tracing() or (hq, wq) != (h, w)):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return self.output_proj(out)                                     # [B, C, H, W]

    def fuse(self) -> None:
        """Fold the depthwise-conv BatchNorms of the key/value paths into their convs."""
        for name in ("key_down", "value_down"):
            seq = getattr(self, name)
            if isinstance(seq, nn.Sequential) and len(seq) == 2:
                setattr(self, name, fuse_conv_bn(seq[0], seq[1]))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"query_strides={self.query_strides}, kv_strides={self.kv_strides}")
