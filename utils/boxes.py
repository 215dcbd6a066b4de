"""Box geometry, in one place: format conversions, clipping and letterbox undo, IoU/IoA, polygon clipping,
anchor grids and the distance <-> box maps of the head and the loss.

Conversions and clipping work on torch tensors and numpy arrays alike ([..., 4] boxes); IoU matrices use
torchvision.ops, the elementwise IoU variants of the loss live here too.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

Boxes = Union[Tensor, np.ndarray]


# ---- format conversions ----

def _clone(x: Boxes) -> Boxes:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x: Boxes) -> Boxes:
    """Corner boxes -> centre boxes (same units)."""
    y = _clone(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x: Boxes) -> Boxes:
    """Centre boxes -> corner boxes (same units)."""
    y = _clone(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x: Boxes, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Boxes:
    """Normalised centre boxes -> pixel corner boxes (optionally shifted by letterbox padding or a mosaic offset)."""
    y = _clone(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: Boxes, w: float = 640, h: float = 640, clip: bool = False) -> Boxes:
    """Pixel corner boxes -> normalised centre boxes (clipped to the w x h image first if clip)."""
    if clip:
        x = clip_boxes(_clone(x), (h, w))
    y = _clone(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes: Boxes, shape: tuple) -> Boxes:
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


def scale_boxes(img1_shape: tuple, boxes: Boxes, img0_shape: tuple, ratio_pad: tuple | None = None) -> Boxes:
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


# ---- overlap ----

def box_iou(box1: Tensor, box2: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pairwise IoU [N, M] of xyxy boxes, computed in dtype (float64 where COCO's exact ties matter)."""
    from torchvision.ops import box_iou as tv_box_iou  # here, not at import: detection start-up needs no torchvision
    return tv_box_iou(box1.to(dtype), box2.to(dtype))


def box_ioa(boxes: np.ndarray, others: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Pairwise intersection over the area of `others` [N, M] for xyxy numpy boxes: how much of each
    existing box a new box would cover (the copy-paste occlusion rule)."""
    iw = (np.minimum(boxes[:, None, 2], others[None, :, 2]) - np.maximum(boxes[:, None, 0], others[None, :, 0]))
    ih = (np.minimum(boxes[:, None, 3], others[None, :, 3]) - np.maximum(boxes[:, None, 1], others[None, :, 1]))
    area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]) + eps
    return iw.clip(0, None) * ih.clip(0, None) / area[None]


# ---- polygons ----

def clip_polygon(poly: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of a polygon [k, 2] inside [0, width] x [0, height] (Sutherland-Hodgman, one vectorised pass
    per image edge). Exact for any simple polygon, convex or not, because the clip window is convex; where a
    non-convex outline leaves the window twice the result has zero-width bridges along the edge, which change
    neither its pixels nor its bounding box. Returns [m, 2] float64 (m = 0 when nothing is inside)."""
    pts = np.asarray(poly, np.float64).reshape(-1, 2)
    if len(pts) and pts.min() >= 0 and pts[:, 0].max() <= width and pts[:, 1].max() <= height:
        return pts
    for axis, limit, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if not len(pts):
            break
        v = pts[:, axis] - limit
        inside = v <= 0 if keep_below else v >= 0
        if inside.all():
            continue
        nxt_idx = np.r_[1:len(pts), 0]  # each vertex's successor along the closed outline
        nxt, v_nxt = pts[nxt_idx], v[nxt_idx]
        cross = inside != inside[nxt_idx]  # the edge to the next vertex crosses the clip line
        t = v / np.where(cross, v - v_nxt, 1.0)
        crossing = pts + t[:, None] * (nxt - pts)
        pts = np.stack((pts, crossing), 1)[np.stack((inside, cross), 1)]  # vertex (if in), then crossing
    return pts


def polygon_box_in_image(poly: np.ndarray, width: float, height: float) -> np.ndarray:
    """Bounding box (xyxy) of the part of a polygon [k, 2] inside the image: the tight box of a rotated box,
    or of an object outline, cut by the image edge. A zero-area box when nothing is inside."""
    pts = np.asarray(poly, np.float64)
    lo, hi = pts.min(0), pts.max(0)
    if lo[0] >= 0 and lo[1] >= 0 and hi[0] <= width and hi[1] <= height:  # fully inside: nothing to clip
        return np.concatenate([lo, hi])
    pts = clip_polygon(pts, width, height)
    if not len(pts):
        return np.zeros(4)
    box = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
    box[[0, 2]] = box[[0, 2]].clip(0, width)
    box[[1, 3]] = box[[1, 3]].clip(0, height)
    return box


def convex_boxes_in_image(polys: np.ndarray, width: float, height: float) -> np.ndarray:
    """polygon_box_in_image for n convex outlines at once ([n, k, 2] -> [n, 4] xyxy), e.g. warped boxes.

    The part of a convex outline inside the image is convex, and its corners are the outline's vertices inside
    the image, the outline's crossings of the image edges, and the image corners inside the outline; the box of
    those points is the exact box of the visible part. A zero box when nothing is inside.
    """
    a = np.asarray(polys, np.float64)
    n = len(a)
    lim = np.array([width, height], np.float64)
    d = np.roll(a, -1, axis=1) - a  # edge i runs from vertex i to vertex i + 1
    pts, ok = [a], [((a >= 0) & (a <= lim)).all(2)]
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in (0, 1):
            other = 1 - axis
            for line in (0.0, lim[axis]):
                t = (line - a[..., axis]) / d[..., axis]  # inf/nan for an edge parallel to the line: never kept
                p = a + t[..., None] * d
                p[..., axis] = line
                pts.append(p)
                ok.append((t >= 0) & (t <= 1) & (p[..., other] >= 0) & (p[..., other] <= lim[other]))
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    rel = corners[None, None] - a[:, :, None]  # [n, k, 4 corners, 2]
    side = d[:, :, None, 0] * rel[..., 1] - d[:, :, None, 1] * rel[..., 0]  # which side of each edge
    area = (a[..., 0] * np.roll(a[..., 1], -1, 1) - np.roll(a[..., 0], -1, 1) * a[..., 1]).sum(1)
    pts.append(np.broadcast_to(corners, (n, 4, 2)))
    ok.append(((side >= 0).all(1) | (side <= 0).all(1)) & (np.abs(area) > 0)[:, None])  # flat outlines hold none
    pts, ok = np.concatenate(pts, 1), np.concatenate(ok, 1)[..., None]
    box = np.concatenate([np.where(ok, pts, np.inf).min(1), np.where(ok, pts, -np.inf).max(1)], 1)
    box[~ok.any(1)[:, 0]] = 0
    return np.clip(box, 0, np.concatenate([lim, lim]))


# ---- anchors and the head's distance encoding ----

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
        # No int(): under tracing/ONNX export the sizes stay symbolic, so the grid follows the input size.
        # No torch.arange(device=...): a trace records that device as a constant, and a TorchScript file
        # exported on CPU then fails on CUDA. A running sum of ones made from the feature map follows
        # its device (and dtype; exact up to 2048 cells in fp16).
        h, w = feat.shape[-2], feat.shape[-1]
        xs = ref.new_ones(w).cumsum(0) - (1 - offset)
        ys = ref.new_ones(h).cumsum(0) - (1 - offset)
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
