"""Drawing detections on BGR images with cv2 (boxes, label + confidence tags) and saving box crops."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


# A fixed, distinct palette (hex RGB), cycled by class id so a class keeps its colour across images.
_HEX = ("FF3838", "2C99A8", "FF9D97", "00C2FF", "FF701F", "344593", "FFB21D", "6473FF", "CFD231", "0018EC",
        "48F90A", "8438FF", "92CC17", "520085", "3DDB86", "CB38FF", "1A9334", "FF95C8", "00D4BB", "FF37C7")


def colors(i: int, bgr: bool = True) -> tuple[int, int, int]:
    h = _HEX[int(i) % len(_HEX)]
    r, g, b = (int(h[k:k + 2], 16) for k in (0, 2, 4))
    return (b, g, r) if bgr else (r, g, b)


class Annotator:
    """Draws on a copy-free view of `im` (BGR uint8, modified in place); `.result()` returns it."""

    def __init__(self, im: np.ndarray, line_width: int | None = None):
        if not im.flags.writeable or not im.flags.c_contiguous:
            im = np.ascontiguousarray(im).copy()
        self.im = im
        self.lw = max(int(line_width), 1) if line_width else max(round(sum(im.shape[:2]) / 2 * 0.003), 2)

    def box_label(self, box, label: str = "", color: tuple = (128, 128, 128),
                  txt_color: tuple = (255, 255, 255)) -> None:
        """Rectangle plus a filled tag with the label above the box (inside it when at the top edge)."""
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_AA)
        if not label:
            return
        tf = max(self.lw - 1, 1)  # font thickness
        scale = self.lw / 3
        (w, h), _ = cv2.getTextSize(label, 0, fontScale=scale, thickness=tf)
        outside = p1[1] - h - 3 >= 0
        q2 = (p1[0] + w, p1[1] - h - 3 if outside else p1[1] + h + 3)
        cv2.rectangle(self.im, p1, q2, color, -1, cv2.LINE_AA)
        org = (p1[0], p1[1] - 2 if outside else p1[1] + h + 2)
        cv2.putText(self.im, label, org, 0, scale, txt_color, thickness=tf, lineType=cv2.LINE_AA)

    def result(self) -> np.ndarray:
        return self.im


def box_text(name: str, conf: float, hide_labels: bool = False, hide_conf: bool = False) -> str:
    if hide_labels:
        return ""
    return name if hide_conf else f"{name} {conf:.2f}"


def draw_boxes(im: np.ndarray, boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, names: list[str],
               line_width: int | None = 3, hide_labels: bool = False, hide_conf: bool = False,
               track_ids: np.ndarray | None = None) -> np.ndarray:
    """Draw all boxes (xyxy pixels of `im`) on `im` in place; `names` indexed by class id.

    With track_ids the colour follows the track id (stable per object across frames) and the tag starts
    with 'id:<n>' (shown even with hide_labels, since the id is the point of tracking).
    """
    ann = Annotator(im, line_width)
    tids = [None] * len(boxes) if track_ids is None else track_ids
    for box, conf, c, tid in zip(boxes, scores, class_ids, tids):
        c = int(c)
        name = names[c] if 0 <= c < len(names) else str(c)
        text = box_text(name, float(conf), hide_labels, hide_conf)
        if tid is not None:
            text = f"id:{int(tid)} {text}".rstrip()
        ann.box_label(box, text, colors(c if tid is None else int(tid)))
    return ann.result()


def _free_name(f: Path) -> Path:
    """f, or f with _2, _3, ... appended to the stem when taken."""
    n = 2
    out = f
    while out.exists():
        out = f.with_name(f"{f.stem}_{n}{f.suffix}")
        n += 1
    return out


def save_one_box(xyxy, im: np.ndarray, file: str | Path, gain: float = 1.02, pad: int = 10,
                 square: bool = False, save: bool = True) -> np.ndarray:
    """Crop a box (slightly enlarged: gain, pad pixels) from a BGR image and save it as a new .jpg file
    (numbered if the name is taken, so several crops of one class in one image all survive)."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(4)
    cx, cy, w, h = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]
    if square:
        w = h = max(w, h)
    w, h = w * gain + pad, h * gain + pad
    H, W = im.shape[:2]
    x1, y1 = int(np.clip(cx - w / 2, 0, W)), int(np.clip(cy - h / 2, 0, H))
    x2, y2 = int(np.clip(cx + w / 2, 0, W)), int(np.clip(cy + h / 2, 0, H))
    crop = im[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
    if save and crop.size:
        f = _free_name(Path(file).with_suffix(".jpg"))
        f.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(f), crop)
    return crop
