"""Reading training images cheaply: JPEGs decoded at 1/2, 1/4 or 1/8 scale when the target size allows, and a
bounded per-process buffer of decoded, resized images that mosaic and mixup partners are drawn from.

Why: a 640 px mosaic tile keeps a quarter of a 1280x720 frame's pixels and a thirtieth of a 12 MP photo's, yet a
full decode pays for all of them; libjpeg-turbo (inside OpenCV) can skip the fine DCT coefficients instead
(IMREAD_REDUCED_COLOR_2/4/8, EXIF orientation applied as with IMREAD_COLOR). And a mosaic with mixup needs up to
eight images per sample; drawing the partners from images this process decoded recently needs one decode.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image, ImageOps

JPEG_MAGIC = b"\xff\xd8\xff"
REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _pil_read(path: str) -> np.ndarray:
    """Formats cv2 cannot read (some TIFF/WebP variants): PIL, EXIF-rotated, 16-bit scaled to 8-bit, BGR."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64)
                arr = (arr / max(arr.max(), 1) * 255) if arr.max() > 255 else arr
                im = Image.fromarray(arr.astype(np.uint8))
            return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except Exception as e:
        raise OSError(f"{path}: cannot read image ({e})") from None


def imread(path: str) -> np.ndarray:
    """Read any supported image as 3-channel uint8 BGR at full size, EXIF-rotated (gray/RGBA/16-bit converted)."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)  # applies EXIF orientation; gray/alpha/16-bit -> 8-bit BGR
    return img if img is not None else _pil_read(path)


def jpeg_reduction(long_side: int, target: int) -> int:
    """The largest JPEG scale denominator (8, 4, 2; else 1) whose decoded long side, ceil(long_side / f),
    still holds at least `target` pixels, so the final resize never upsamples."""
    for f in (8, 4, 2):
        if -(-long_side // f) >= target:
            return f
    return 1


def read_reduced(path: str, shape: tuple[int, int], target: int) -> np.ndarray:
    """BGR image of displayed size `shape` (h, w), decoded at the smallest JPEG scale that keeps its long side
    >= target (non-JPEG files, and a JPEG whose reduced size does not match `shape`, e.g. edited since the
    dataset scan, are decoded at full size). The caller resizes to the exact target size."""
    f = jpeg_reduction(max(shape), target)
    if f == 1:
        return imread(path)
    buf = np.fromfile(path, np.uint8)
    if buf[:3].tobytes() != JPEG_MAGIC:
        return imread(path)
    img = cv2.imdecode(buf, REDUCED_FLAGS[f])
    if img is None or img.shape[:2] != (-(-shape[0] // f), -(-shape[1] // f)):
        return imread(path)
    return img


class TileBuffer:
    """The last `capacity` decoded, resized training images of one process (first in, first out), keyed by
    dataset index, each with its polygon rows. One per process: worker processes never share it, a persistent
    worker keeps it across epochs, and a fresh process (new worker, spawned or forked) starts empty."""

    def __init__(self, capacity: int):
        self.capacity, self.pid = int(capacity), os.getpid()
        self.keys: list[int] = []  # slot order: deterministic for random.choices
        self.items: dict[int, tuple] = {}
        self._oldest = 0  # the slot the next insertion replaces once full

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.capacity

    def get(self, i: int) -> tuple | None:
        return self.items.get(i)

    def put(self, i: int, item: tuple) -> None:
        if i in self.items:
            self.items[i] = item
        elif not self.full:
            self.keys.append(i)
            self.items[i] = item
        elif self.capacity > 0:
            del self.items[self.keys[self._oldest]]
            self.keys[self._oldest] = i
            self.items[i] = item
            self._oldest = (self._oldest + 1) % self.capacity

    def nbytes(self) -> int:
        return sum(item[0].nbytes for item in self.items.values())
