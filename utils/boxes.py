"""Box geometry shared by the detection head and the loss: anchor grids, distance <-> box, IoU variants."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def make_anchors(feats: Sequence[Tensor], strides: Sequence[float] | Tensor,
                 offset: float = 0.5) -> tuple[Tensor, Tensor]:
    """Anchor centres of every cell of every level, in grid units of that level.

    Returns (anchor_points [A, 2] as (x, y), stride_tensor [A, 1]); A = sum(h*w), levels in order,
    cells row-major (y outer, x inner) to match `feat.flatten(2)`. Multiply the points by the
    stride tensor to get input-image pixels.
    """
    assert len(feats) == len(strides), "make_anchors: one stride per feature map"
    ref = feats[0]
    points, stride_list = [], []
    for feat, s in zip(feats, strides):
        # no int(): under tracing/ONNX export the sizes stay symbolic, so the grid follows the input size
        h, w = feat.shape[-2], feat.shape[-1]
        xs = torch.arange(w, device=ref.device, dtype=ref.dtype) + offset
        ys = torch.arange(h, device=ref.device, dtype=ref.dtype) + offset
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=-1)
        points.append(pts)
        stride_list.append(torch.full_like(pts[:, :1], float(s)))
    return torch.cat(points, 0), torch.cat(stride_list, 0)


def dist2bbox(distance: Tensor, anchor_points: Tensor, xywh: bool = True, dim: int = -1) -> Tensor:
    """(left, top, right, bottom) distances from anchor points -> boxes (xywh or xyxy).

    `dim` is the axis holding the 4 distances (and the 2 point coordinates); the two tensors must
    broadcast, e.g. distance [B, 4, A] with anchor_points [2, A] and dim=1, or [..., A, 4] with [A, 2].
    """
    lt, rb = distance.chunk(2, dim)
    top_left = anchor_points - lt
    bottom_right = anchor_points + rb
    if xywh:
        return torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), dim)
    return torch.cat((top_left, bottom_right), dim)


def bbox2dist(anchor_points: Tensor, bbox_xyxy: Tensor, reg_max: int) -> Tensor:
    """xyxy boxes -> (l, t, r, b) distances from the anchor points, clamped for a reg_max-bin DFL.

    `reg_max` is the number of bins (16): distances are clamped to [0, reg_max - 1 - 0.01] so the
    right-hand interpolation bin (floor + 1) is always a valid index.
    """
    top_left, bottom_right = bbox_xyxy.chunk(2, -1)
    dist = torch.cat((anchor_points - top_left, bottom_right - anchor_points), -1)
    return dist.clamp(0, reg_max - 1 - 0.01)


def bbox_iou(box1: Tensor, box2: Tensor, xywh: bool = False, CIoU: bool = False, GIoU: bool = False,
             DIoU: bool = False, eps: float = 1e-7) -> Tensor:
    """Elementwise IoU (or GIoU / DIoU / CIoU) of broadcastable box tensors [..., 4].

    Returns the broadcast shape without the last axis. For CIoU the aspect-ratio trade-off
    factor alpha is treated as a constant in the gradient, as in the CIoU paper.
    """
    if xywh:
        (cx1, cy1, w1, h1), (cx2, cy2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
        ax1, ax2, ay1, ay2 = cx1 - w1 / 2, cx1 + w1 / 2, cy1 - h1 / 2, cy1 + h1 / 2
        bx1, bx2, by1, by2 = cx2 - w2 / 2, cx2 + w2 / 2, cy2 - h2 / 2, cy2 + h2 / 2
    else:
        ax1, ay1, ax2, ay2 = box1.unbind(-1)
        bx1, by1, bx2, by2 = box2.unbind(-1)
        w1, h1 = ax2 - ax1, (ay2 - ay1).clamp(min=eps)
        w2, h2 = bx2 - bx1, (by2 - by1).clamp(min=eps)

    inter_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    inter_h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (CIoU or GIoU or DIoU):
        return iou

    enc_w = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)  # smallest enclosing box
    enc_h = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    if GIoU:
        enc_area = enc_w * enc_h + eps
        return iou - (enc_area - union) / enc_area
    diag2 = enc_w ** 2 + enc_h ** 2 + eps  # squared diagonal of the enclosing box
    centre2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4  # squared centre distance
    if DIoU:
        return iou - centre2 / diag2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diag2 + v * alpha)
