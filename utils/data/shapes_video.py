"""A synthetic video of the bundled shapes, so detection and tracking can be tried offline.

    python -m utils.data.shapes_video --video shapes.mp4 [--frames 150 --size 320 240 --objects 4 --seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from utils.data.synthetic import SHAPE_NAMES, _background, _colour, _shape_mask
from utils.general import LOGGER


def write_shapes_video(path: str | Path, frames: int = 150, size: tuple = (320, 240), fps: float = 25.0,
                       n_objects: int = 4, seed: int = 0) -> list[np.ndarray]:
    """A clip of shapes moving over a fixed background, so detection and tracking can be tried offline.

    Objects keep their class, colour and outline, move at constant velocity and bounce off the edges. Returns
    the ground truth of each frame: [n, 6] rows (object id, cls, x1, y1, x2, y2) in pixels.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    background = _background(rng, w, h)
    objects = []
    for oid in range(n_objects):
        cls = int(rng.integers(0, len(SHAPE_NAMES)))
        side = int(rng.uniform(0.2, 0.35) * min(w, h))
        mask = None
        while mask is None:
            mask = _shape_mask(rng, cls, side, side, obj_size=(0.6, 0.68))
        x, y, bw, bh = cv2.boundingRect(mask)
        patch = mask[y:y + bh, x:x + bw] > 0
        pos = np.array([rng.uniform(0, w - bw), rng.uniform(0, h - bh)])
        vel = rng.uniform(1.0, 3.0, 2) * rng.choice([-1, 1], 2) * min(w, h) / 240
        objects.append(dict(id=oid, cls=cls, patch=patch, colour=_colour(rng, cls), pos=pos, vel=vel))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"cannot write a video to {path}")
    truth = []
    try:
        for _ in range(frames):
            img, rows = background.copy(), []
            for o in objects:
                ph, pw = o["patch"].shape
                limit = np.array([w - pw, h - ph], np.float64)
                o["pos"] += o["vel"]
                bounce = (o["pos"] < 0) | (o["pos"] > limit)
                o["vel"][bounce] *= -1
                o["pos"] = o["pos"].clip(0, limit)
                x1, y1 = (int(round(v)) for v in o["pos"])
                img[y1:y1 + ph, x1:x1 + pw][o["patch"]] = o["colour"]
                rows.append([o["id"], o["cls"], x1, y1, x1 + pw, y1 + ph])
            writer.write(img)
            truth.append(np.array(rows, np.float64).reshape(-1, 6))
    finally:
        writer.release()
    return truth


def main(argv: list[str] | None = None) -> Path:
    """Write a clip of moving shapes to try detect_dual.py and --track on a model trained on the bundled data."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--video", required=True, help="output .mp4 path")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    ap.add_argument("--objects", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write_shapes_video(a.video, a.frames, tuple(a.size), n_objects=a.objects, seed=a.seed)
    LOGGER.info(f"Wrote {a.frames} frames of moving shapes to {a.video}")
    return Path(a.video)


if __name__ == "__main__":
    main()
