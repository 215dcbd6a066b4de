"""Image + box augmentations (numpy/cv2): letterbox, mosaic, copy-paste, mixup, random perspective, HSV.

Boxes travel as pixel xyxy arrays [n, 5] = (cls, x1, y1, x2, y2) through geometric transforms so that
every transform maps box corners exactly as it maps pixels. Polygon labels travel beside them (one pixel
[k, 2] outline or None per box) through mosaic and copy-paste, and random perspective takes each box from
its warped, clipped outline. Randomness comes from `random`/`np.random` (seeded per DataLoader worker), so
runs are reproducible for a given seed.
"""
from __future__ import annotations

import math
import random

import cv2
import numpy as np

from utils.boxes import box_ioa, clip_polygon, convex_boxes_in_image, polygon_box_in_image, xywhn2xyxy


def letterbox(img: np.ndarray, new_shape: int | tuple = 640, color: tuple = (114, 114, 114), auto: bool = False,
              scaleup: bool = True, stride: int = 32) -> tuple[np.ndarray, tuple, tuple]:
    """Resize keeping aspect ratio, then pad to new_shape (h, w) (or only to a stride multiple if auto).

    Returns (img, ratio (rw, rh), pad (left, top)). The ratios are the exact per-axis scale after integer
    rounding, and the pad is the integer offset actually used, so boxes map back without drift.
    """
    h0, w0 = img.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:  # only shrink (val mode keeps small images crisp)
        r = min(r, 1.0)
    w, h = max(int(round(w0 * r)), 1), max(int(round(h0 * r)), 1)
    dw, dh = new_shape[1] - w, new_shape[0] - h
    if auto:
        dw, dh = dw % stride, dh % stride
    if (w, h) != (w0, h0):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA)
    left, top = dw // 2, dh // 2
    if dw or dh:
        img = cv2.copyMakeBorder(img, top, dh - top, left, dw - left, cv2.BORDER_CONSTANT, value=color)
    return img, (w / w0, h / h0), (float(left), float(top))


def preprocess_image(im0: np.ndarray, imgsz: int | tuple, stride: int = 32, auto: bool = True) -> tuple[np.ndarray, tuple]:
    """Inference preprocessing (detection and INT8 calibration): letterbox (shared with validation) + BGR->RGB
    + HWC->CHW, contiguous uint8.

    Returns (img [3,h,w], ratio_pad ((rh, rw), (padw, padh))) as `scale_boxes` expects.
    """
    img, (rw, rh), pad = letterbox(im0, imgsz, auto=auto, stride=stride)
    img = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))
    return img, ((rh, rw), pad)


def augment_hsv(img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> None:
    """Random hue/saturation/value gains, in place on a BGR uint8 image: one 3-channel lookup table applied in
    place on the HSV image (no split/merge copies)."""
    if not (hgain or sgain or vgain):
        return
    r = np.random.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    x = np.arange(256, dtype=np.float32)
    lut = np.empty((256, 1, 3), np.uint8)
    lut[:, 0, 0] = (x * r[0]) % 180
    lut[:, 0, 1] = np.clip(x * r[1], 0, 255)
    lut[:, 0, 2] = np.clip(x * r[2], 0, 255)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    cv2.LUT(hsv, lut, dst=hsv)
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Keep boxes (xyxy, shape [4, n]) that stay > wh_thr px, not sliver-like, and keep > area_thr of their
    (scale-adjusted) area after a transform; cut-off remnants would be misleading targets."""
    w1, h1 = before[2] - before[0], before[3] - before[1]
    w2, h2 = after[2] - after[0], after[3] - after[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def perspective_matrix(img_shape: tuple, width: int, height: int, degrees: float = 10, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10, perspective: float = 0.0) -> tuple[np.ndarray, float]:
    """Draw random_perspective's 3x3 matrix (input pixels -> output pixels) and its scale factor.

    The draws (perspective x/y, angle, scale, shear x/y, translate x/y) come from `random` in this order.
    """
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -img_shape[1] / 2, -img_shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = random.uniform(-perspective, perspective), random.uniform(-perspective, perspective)
    rot = np.eye(3)
    angle = random.uniform(-degrees, degrees)
    s = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)
    shr = np.eye(3)
    shr[0, 1] = math.tan(math.radians(random.uniform(-shear, shear)))
    shr[1, 0] = math.tan(math.radians(random.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * width
    move[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * height
    return move @ shr @ rot @ persp @ centre, s  # right to left: centre first


def warp_points(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Map points [k, 2] through a 3x3 matrix (with the perspective division when the last row is not 0 0 1)."""
    xy = np.ones((len(pts), 3))
    xy[:, :2] = pts
    xy = xy @ m.T
    return xy[:, :2] / xy[:, 2:3] if (m[2, 0] or m[2, 1]) else xy[:, :2]


def box_polygon(box: np.ndarray) -> np.ndarray:
    """The outline [4, 2] of an xyxy box (x1y1, x2y1, x2y2, x1y2)."""
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)


def random_perspective(img: np.ndarray, labels: np.ndarray, degrees: float = 10, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10, perspective: float = 0.0,
                       border: tuple = (0, 0), segments: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective of image and xyxy boxes [n, 5].

    border (top, left) < 0 crops the output (used to cut the 2x mosaic canvas back to imgsz).
    Box-only labels: box corners are mapped through the same matrix and the box of the visible part of that
    quadrilateral kept (area_thr 0.10). With polygons (`segments`: one pixel [k, 2] outline or None per label,
    as upstream YOLOv9 does when any exist), each object's outline is mapped, clipped to the output and its
    tight box kept (area_thr 0.01, so objects with 1% of their area left survive); box rows use their corners.
    Upstream samples each outline at 1000 points and keeps those inside; clipping the outline exactly gives
    the box those samples approach (theirs falls short of a cut edge by up to one sample spacing).
    """
    height = img.shape[0] + border[0] * 2
    width = img.shape[1] + border[1] * 2
    m, s = perspective_matrix(img.shape, width, height, degrees, translate, scale, shear, perspective)

    if border[0] or border[1] or not np.allclose(m, np.eye(3)):
        if perspective:
            img = cv2.warpPerspective(img, m, dsize=(width, height), borderValue=(114, 114, 114))
        else:
            img = cv2.warpAffine(img, m[:2], dsize=(width, height), borderValue=(114, 114, 114))

    n = len(labels)
    use_segments = segments is not None and any(x is not None for x in segments)
    if n and use_segments:
        polys = [box_polygon(lb[1:5]) if sg is None else sg for lb, sg in zip(labels, segments)]
        sizes = np.cumsum([len(q) for q in polys])[:-1]
        warped = np.split(warp_points(np.concatenate(polys, 0), m), sizes)
        new = np.stack([polygon_box_in_image(q, width, height) if len(q) else np.zeros(4) for q in warped], 0)
        keep = box_candidates(labels[:, 1:5].T * s, new.T, area_thr=0.01)
        labels = np.concatenate([labels[keep, :1], new[keep]], 1)
    elif n:
        corners = np.ones((n * 4, 3))
        corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
        corners = corners @ m.T
        corners = corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]
        quads = corners.reshape(n, 4, 2)[:, [0, 3, 1, 2]]  # x1y1, x2y1, x2y2, x1y2: polygon order
        new = convex_boxes_in_image(quads, width, height)
        keep = box_candidates(labels[:, 1:5].T * s, new.T, area_thr=0.10)
        labels = np.concatenate([labels[keep, :1], new[keep]], 1)
    return img, labels


def mosaic4(items: list[tuple], imgsz: int) -> tuple[np.ndarray, np.ndarray, list | None]:
    """Place 4 (img, labels xywhn [n,5][, segments]) around a random centre on a 2*imgsz canvas.

    segments (optional per item): one normalised [k, 2] polygon or None per label row. Returns the canvas,
    labels as pixel xyxy [n, 5] clipped to the canvas (a tile is only ever cut at the canvas edge, so clipping
    is exact) and, when any item carried a polygon, the polygons moved like their boxes and clipped to the
    canvas (pixel [k, 2], None for box rows; else None). Crop back with random_perspective(border=-imgsz//2).
    """
    s = imgsz
    xc = int(random.uniform(s * 0.5, s * 1.5))
    yc = int(random.uniform(s * 0.5, s * 1.5))
    canvas = np.full((s * 2, s * 2, items[0][0].shape[2]), 114, dtype=np.uint8)
    out, segs_out = [], []
    for i, item in enumerate(items):
        img, lb = item[0], item[1]
        segs = item[2] if len(item) > 2 and item[2] else None
        h, w = img.shape[:2]
        if i == 0:  # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
            x1b, y1b = 0, 0
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y1b + (y2a - y1a), x1b:x1b + (x2a - x1a)]
        padw, padh = x1a - x1b, y1a - y1b
        if len(lb):
            xy = np.empty((len(lb), 5), np.float64)
            xy[:, 0] = lb[:, 0]
            xy[:, 1:] = xywhn2xyxy(lb[:, 1:5], w, h, padw, padh)
            out.append(xy)
            segs_out += [None] * len(lb) if segs is None else _outlines_on_canvas(segs, w, h, padw, padh, 2 * s)
    labels = np.concatenate(out, 0) if out else np.zeros((0, 5))
    labels[:, 1:] = labels[:, 1:].clip(0, 2 * s)
    return canvas, labels, (segs_out if any(sg is not None for sg in segs_out) else None)


def _outlines_on_canvas(segs: list, w: int, h: int, padw: int, padh: int, size: int) -> list:
    """One tile's normalised outlines (None for box rows) in canvas pixels, moved with the tile and cut at the
    canvas edge like their boxes; only outlines that cross the edge are clipped (one vectorised inside test)."""
    keep = [k for k, sg in enumerate(segs) if sg is not None]
    out: list = [None] * len(segs)
    if not keep:
        return out
    lens = [len(segs[k]) for k in keep]
    pts = np.concatenate([segs[k] for k in keep], 0) * [w, h] + [padw, padh]
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    inside = (np.minimum.reduceat(pts, starts, 0) >= 0).all(1) & (np.maximum.reduceat(pts, starts, 0) <= size).all(1)
    for k, a, n, ok in zip(keep, starts, lens, inside):
        q = pts[a:a + n]
        out[k] = q if ok else clip_polygon(q, size, size).clip(0, size)  # clip(): -1e-15 residue at cuts
    return out


def copy_paste(img: np.ndarray, labels: np.ndarray, segments: list, p: float) -> tuple[np.ndarray, np.ndarray, list]:
    """Segment copy-paste (Ghiasi et al. 2021) as upstream YOLOv9 applies it to the whole mosaic canvas.

    Each polygon object's mirror image (x -> W - x across the full width) is a candidate when it would cover
    less than 30% of every box already there (IoA < 0.30); round(p * candidates) of them, drawn at random, are
    pasted: their mirrored outlines are filled into a mask and those pixels taken from the flipped image.
    labels [n, 5] cls x1 y1 x2 y2 and segments (pixel [k, 2] outline or None per label) get the pasted
    objects appended; returns (img, labels, segments), the inputs untouched.
    """
    cand = np.array([i for i, sg in enumerate(segments) if sg is not None and len(sg) >= 3], int)
    if not p or not len(cand):
        return img, labels, segments
    w = img.shape[1]
    boxes = labels[:, 1:5]
    mirror = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    cand = cand[(box_ioa(mirror[cand], boxes) < 0.30).all(1)]
    k = round(p * len(cand))
    if k == 0:
        return img, labels, segments
    new_labels, new_segments, outlines = [], [], []
    for j in random.sample(cand.tolist(), k):
        poly = segments[j].copy()
        poly[:, 0] = w - poly[:, 0]
        outlines.append(np.round(poly).astype(np.int32))
        new_labels.append([labels[j, 0], *mirror[j]])
        new_segments.append(poly)
    # only the region the pasted outlines cover is masked and mirrored (not the whole canvas)
    pts = np.concatenate(outlines, 0)
    x1, y1 = np.maximum(pts.min(0), 0)
    x2, y2 = np.minimum(pts.max(0) + 1, [w, img.shape[0]])
    out = img.copy()
    if x2 > x1 and y2 > y1:
        mask = np.zeros((y2 - y1, x2 - x1), np.uint8)
        for q in outlines:  # one call each: overlapping outlines given together would cancel out
            cv2.fillPoly(mask, [(q - [x1, y1]).astype(np.int32)], 255)
        mirrored = cv2.flip(img[y1:y2, w - x2:w - x1], 1)  # what the flipped canvas holds in the region
        cv2.copyTo(mirrored, mask, out[y1:y2, x1:x2])  # writes through the view (tested against the definition)
    return out, np.concatenate([labels, np.array(new_labels, labels.dtype)], 0), list(segments) + new_segments


def mixup(img: np.ndarray, labels: np.ndarray, img2: np.ndarray, labels2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images (ratio ~ Beta(32, 32), rounded in one uint8 pass) and keep both label sets."""
    r = np.random.beta(32.0, 32.0)
    img = cv2.addWeighted(img, r, img2, 1 - r, 0.0)
    return img, np.concatenate((labels, labels2), 0)


def random_imgsz(imgsz: int, stride: int = 32, low: float = 0.5, high: float = 1.5) -> int:
    """Multi-scale training: a random size in [low, high] * imgsz, rounded down to a stride multiple."""
    size = random.uniform(imgsz * low, imgsz * high + stride)
    return max(int(size // stride * stride), stride)


def max_random_imgsz(imgsz: int, stride: int = 32, high: float = 1.5) -> int:
    """The largest size `random_imgsz` can return (what memory planning for --multi-scale must allow for): the
    largest stride multiple strictly below the top of its uniform draw."""
    return max((math.ceil((imgsz * high + stride) / stride) - 1) * stride, stride)
