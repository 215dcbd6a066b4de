"""Deterministic synthetic detection set ("shapes") so the project trains out of the box, offline.

Why: a default dataset that needs no download lets `train_dual.py` run end to end on a laptop CPU and
gives tests a cheap, known-answer dataset. Generation is pure numpy (seeded per image) + cv2, so two
runs with the same arguments produce byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from utils.general import LOGGER

SHAPE_NAMES = ["circle", "rectangle", "triangle", "star", "cross"]
# Image sizes (w, h): mostly non-square so rect batching and letterbox padding get exercised.
IMAGE_SIZES = [(256, 192), (224, 160), (192, 256), (256, 256), (240, 176), (160, 224), (256, 176)]
# Each class has a preferred hue (OpenCV hue units 0..179) with wide jitter: colour helps but is not decisive.
CLASS_HUES = [0, 30, 60, 105, 140]
GENERATOR_VERSION = 3  # bump when output changes: old generated sets are regenerated
JPEG_QUALITY = 92


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Textured, noisy, fairly muted background (gradient + blurred noise + stripes/blobs)."""
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    tilt = rng.uniform(-60, 60, size=(2, 3)).astype(np.float32)
    sh, sw = max(h // 16, 2), max(w // 16, 2)
    # low-resolution plan: gradient + blotches, upsampled once (cheap and smooth)
    xx = np.linspace(-0.5, 0.5, sw, dtype=np.float32)[None, :, None]
    yy = np.linspace(-0.5, 0.5, sh, dtype=np.float32)[:, None, None]
    small = base + xx * tilt[0] + yy * tilt[1]
    small += rng.standard_normal((sh, sw, 3), dtype=np.float32) * np.float32(rng.uniform(8, 25))
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    # fine texture
    fine = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 1.2)
    img += (fine * np.float32(rng.uniform(5, 15)))[..., None]
    img = np.clip(img, 0, 255, out=img).astype(np.uint8)
    # distractor clutter: thin lines and faint blobs in background-like colours
    for _ in range(int(rng.integers(2, 7))):
        c = tuple(int(v) for v in np.clip(base + rng.normal(0, 30, 3), 0, 255))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p1, p2, c, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _shape_mask(rng: np.random.Generator, cls: int, w: int, h: int,
                obj_size: tuple = (0.16, 0.42)) -> np.ndarray | None:
    """Draw one shape of class `cls` into a binary mask of size (h, w); None if it fell off-image."""
    side = min(w, h)
    s = rng.uniform(*obj_size) * side  # nominal object size as a share of the short side
    aspect = rng.uniform(0.7, 1.45)
    bw, bh = s * np.sqrt(aspect), s / np.sqrt(aspect)
    cx = rng.uniform(bw / 2, w - bw / 2)
    cy = rng.uniform(bh / 2, h - bh / 2)
    angle = np.deg2rad(rng.uniform(-20, 20))
    mask = np.zeros((h, w), np.uint8)

    def poly(points: np.ndarray) -> None:
        ca, sa = np.cos(angle), np.sin(angle)
        rot = np.array([[ca, -sa], [sa, ca]])
        pts = points @ rot.T + np.array([cx, cy])
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)

    if cls == 0:  # circle / ellipse (mild aspect only, stays "round")
        ax = (int(round(s / 2 * rng.uniform(0.85, 1.15))), int(round(s / 2 * rng.uniform(0.85, 1.15))))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), ax, 0, 0, 360, 255, -1)
    elif cls == 1:  # rectangle
        poly(np.array([[-bw / 2, -bh / 2], [bw / 2, -bh / 2], [bw / 2, bh / 2], [-bw / 2, bh / 2]]))
    elif cls == 2:  # triangle (isosceles, apex up-ish)
        poly(np.array([[0, -bh / 2], [bw / 2, bh / 2], [-bw / 2, bh / 2]]))
    elif cls == 3:  # five-pointed star
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * rng.uniform(0.38, 0.5))
        poly(np.stack([np.cos(t) * r * bw, np.sin(t) * r * bh], 1))
    else:  # cross / plus sign
        a = rng.uniform(0.15, 0.22)  # half arm thickness as a fraction of size
        pts = np.array([[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5],
                        [-a, a], [-0.5, a], [-0.5, -a], [-a, -a]])
        poly(pts * np.array([bw, bh]))
    return mask if mask.any() else None


def _colour(rng: np.random.Generator, cls: int) -> tuple:
    hue = (CLASS_HUES[cls] + rng.normal(0, 12)) % 180
    hsv = np.array([[[hue, rng.uniform(170, 255), rng.uniform(170, 255)]]], np.uint8)
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def render_image(rng: np.random.Generator, size: tuple, nc: int = 5, max_objects: int = 6,
                 empty_prob: float = 0.04, obj_size: tuple = (0.16, 0.42)) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (BGR uint8) and its labels [n, 5] (cls, xc, yc, w, h normalised)."""
    w, h = size
    img = _background(rng, w, h)
    n = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    boxes, areas = [], []
    owner = np.zeros((h, w), np.int32)  # 1-based index of the object visible at each pixel (0: background)
    for _ in range(n):
        for _attempt in range(8):
            cls = int(rng.integers(0, nc))
            m = _shape_mask(rng, cls, w, h, obj_size)
            if m is None:
                continue
            x1, y1, bw_, bh_ = cv2.boundingRect(m)
            x2, y2 = x1 + bw_, y1 + bh_
            roi = (slice(y1, y2), slice(x1, x2))
            mb = m[roi] > 0
            # limit occlusion: every earlier object must stay at least 65% visible
            if boxes:
                covered = np.bincount(owner[roi][mb], minlength=len(boxes) + 1)[1:]
                visible = np.bincount(owner.ravel(), minlength=len(boxes) + 1)[1:]
                if ((visible - covered) < 0.65 * np.array(areas)).any():
                    continue
            colour = np.array(_colour(rng, cls), np.float32)
            shade = 1 + np.linspace(-0.15, 0.15, y2 - y1, dtype=np.float32) * rng.choice([-1, 1])  # mild lighting
            layer = np.broadcast_to((colour[None, :] * shade[:, None]).clip(0, 255)[:, None, :], (*mb.shape, 3))
            img[roi][mb] = layer[mb].astype(np.uint8)
            if rng.random() < 0.3:  # dark outline on some objects
                cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(img, cnts, -1, (20, 20, 20), 1)
            owner[roi][mb] = len(boxes) + 1
            areas.append(int(mb.sum()))
            boxes.append([cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
            break
    noise = rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(3, 9))  # luminance noise
    img = cv2.add(img, np.repeat(noise, 3, axis=2), dtype=cv2.CV_8U)  # saturating add
    return img, np.array(boxes, np.float64).reshape(-1, 5)


def generate_shapes(root: str | Path, n_train: int = 500, n_val: int = 100, seed: int = 0,
                    nc: int = 5, max_objects: int = 6, empty_prob: float = 0.04,
                    sizes: list | None = None, obj_size: tuple = (0.16, 0.42)) -> Path:
    """Write a YOLO-layout dataset: root/images/{train,val}/*.jpg and root/labels/{train,val}/*.txt.

    Deterministic: every image uses its own RNG seeded by (seed, split, index), files are written with
    fixed JPEG parameters, so two generations are byte-identical. Written to a temporary folder first and
    renamed, so an interrupted run never leaves a half-made dataset behind.
    """
    root = Path(root)
    if not 1 <= nc <= len(SHAPE_NAMES):
        raise ValueError(f"nc must be in 1..{len(SHAPE_NAMES)}")
    sizes = sizes or IMAGE_SIZES
    t0 = time.time()
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            size = sizes[int(rng.integers(0, len(sizes)))]
            img, labels = render_image(rng, size, nc, max_objects, empty_prob, obj_size)
            stem = f"{split}_{i:05d}"
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
                                                 cv2.IMWRITE_JPEG_OPTIMIZE, 0, cv2.IMWRITE_JPEG_PROGRESSIVE, 0])
            assert ok
            (tmp / "images" / split / f"{stem}.jpg").write_bytes(buf.tobytes())
            rows = "".join(f"{int(c)} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in labels)
            (tmp / "labels" / split / f"{stem}.txt").write_text(rows)
    meta = dict(generator="shapes", version=GENERATOR_VERSION, n_train=n_train, n_val=n_val, seed=seed, nc=nc,
                names=SHAPE_NAMES[:nc], max_objects=max_objects, obj_size=list(obj_size))
    (tmp / "generated.json").write_text(json.dumps(meta, indent=1))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    LOGGER.info(f"Generated synthetic 'shapes' dataset in {root} ({n_train} train, {n_val} val images, "
                f"{time.time() - t0:.1f}s)")
    return root


def shapes_complete(root: str | Path) -> bool:
    """True when a finished generation exists at root (marker written last, before the atomic rename)."""
    root = Path(root)
    try:
        meta = json.loads((root / "generated.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == GENERATOR_VERSION and (root / "images" / "train").is_dir()


def _default_shapes(root: Path) -> Path:
    return generate_shapes(root)


# Whitelist of generators a data YAML may name via `synthetic: <name>` (YAML never contains code).
SYNTHETIC_GENERATORS: dict[str, Callable[[Path], Path]] = {"shapes": _default_shapes}
