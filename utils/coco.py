"""COCO-format JSON writers and a pycocotools check, so any YOLO dataset's mAP can be cross-checked."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from utils.data import DataConfig, load_data_config, scan_dataset
from utils.general import UserError

_COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def coco80_to_coco91_class() -> list[int]:
    """Official COCO category id of each of the 80 contiguous YOLO class indices."""
    ids = [i for i in range(1, 91) if i not in _COCO_UNUSED_IDS]
    assert len(ids) == 80
    return ids


def make_image_ids(im_files: Sequence[str | Path]) -> list[int]:
    """Integer image ids: the numeric file stems when they are all numeric and unique (COCO), else 0..n-1."""
    stems = [Path(f).stem for f in im_files]
    if stems and all(s.isnumeric() for s in stems) and len(set(int(s) for s in stems)) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(stems)))


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(predn, image_id: int, class_map: Sequence[int] | None = None,
                       jdict: list | None = None) -> list[dict]:
    """Append one image's detections [n, 6] (x1,y1,x2,y2,conf,cls in original-image pixels) to jdict
    as COCO results {image_id, category_id, bbox [x,y,w,h] top-left, score}; returns jdict."""
    jdict = [] if jdict is None else jdict
    p = _as_np(predn).astype(np.float64).reshape(-1, 6)
    for x1, y1, x2, y2, score, c in p:
        cat = class_map[int(c)] if class_map is not None else int(c)
        jdict.append({"image_id": image_id, "category_id": int(cat),
                      "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                      "score": float(score)})
    return jdict


def yolo_labels_to_coco_gt(im_files: Sequence[str | Path], shapes: Iterable, labels: Iterable,
                           names: Sequence[str] | dict, class_map: Sequence[int] | None = None,
                           image_ids: Sequence[int] | None = None) -> dict:
    """COCO ground-truth dict from YOLO labels.

    shapes: (w, h) per image in pixels; labels: [n, 5] (cls, xc, yc, w, h) normalised per image;
    names: class names (list or {id: name}); class_map: YOLO index -> category id (default identity).
    """
    image_ids = list(image_ids) if image_ids is not None else make_image_ids(im_files)
    name_list = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    cat_ids = [class_map[i] if class_map is not None else i for i in range(len(name_list))]
    gt = {"info": {"description": "converted from YOLO labels"}, "licenses": [],
          "images": [], "annotations": [],
          "categories": [{"id": int(cid), "name": str(n)} for cid, n in zip(cat_ids, name_list)]}
    ann_id = 1
    for f, img_id, (w, h), lab in zip(im_files, image_ids, shapes, labels):
        w, h = float(w), float(h)
        gt["images"].append({"id": img_id, "file_name": Path(f).name, "width": int(w), "height": int(h)})
        for c, xc, yc, bw, bh in _as_np(lab).astype(np.float64).reshape(-1, 5):
            bw_px, bh_px = bw * w, bh * h
            gt["annotations"].append({"id": ann_id, "image_id": img_id, "category_id": int(cat_ids[int(c)]),
                                      "bbox": [(xc - bw / 2) * w, (yc - bh / 2) * h, bw_px, bh_px],
                                      "area": bw_px * bh_px, "iscrowd": 0})
            ann_id += 1
    return gt


def save_json(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def coco_evaluate(gt_json: str | Path | dict, det_json: str | Path | list, verbose: bool = False,
                  img_ids: Sequence[int] | None = None) -> tuple[float, float]:
    """(mAP50-95, mAP50) from pycocotools' COCOeval on a GT file/dict and a detections file/list.

    img_ids restricts the evaluation to those images (a validation subset of a full annotation file).
    Returns 0.0 for metrics COCOeval cannot compute (no detections, or no GT; it reports -1 then).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise UserError("utils/coco.py: pycocotools is not installed; run `pip install pycocotools`") from e

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        if isinstance(gt_json, dict):
            gt = COCO()
            gt.dataset = json.loads(json.dumps(gt_json))  # deep copy, plain python types
            gt.createIndex()
        else:
            if not Path(gt_json).is_file():
                raise UserError(f"utils/coco.py: ground truth JSON not found: {gt_json}")
            gt = COCO(str(gt_json))
        dets = det_json
        if not isinstance(dets, list):
            if not Path(dets).is_file():
                raise UserError(f"utils/coco.py: detections JSON not found: {dets}")
            with open(dets) as f:
                dets = json.load(f)
        if not dets:
            return 0.0, 0.0
        dt = gt.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


# ---- dataset-level helpers (validator, CLI) ----

COCO80_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush"]


def image_id_map(im_files: Sequence[str | Path]) -> dict[str, int]:
    """{file path: image id}, independent of list order (rect batching reorders files): numeric stems
    when all are numeric and unique (COCO), else the index in the sorted path list."""
    files = sorted(str(f) for f in im_files)
    return dict(zip(files, make_image_ids(files)))


def is_coco_data(data: DataConfig) -> bool:
    """True for COCO-style data (80 COCO names, or 'coco' in the YAML path): use the 80->91 id mapping."""
    return list(data.names) == COCO80_NAMES or "coco" in str(data.yaml_file).lower()


def find_annotations(data: DataConfig) -> Path | None:
    """The COCO GT JSON a data YAML provides: `coco_json:` (relative to the dataset root) or the standard
    <path>/annotations/instances_val2017.json; None when absent."""
    root = Path(data.path or ".")
    if data.coco_json:
        p = Path(str(data.coco_json)).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise UserError(f"{data.yaml_file}: coco_json not found: {p}")
        return p
    p = root / "annotations" / "instances_val2017.json"
    return p if p.is_file() else None


def gt_from_data(data_yaml: str | Path, split: str = "val", out: str | Path = "gt.json") -> Path:
    """Write a COCO GT JSON for a YOLO split of a data YAML (same image ids the validator writes)."""
    cfg = load_data_config(data_yaml, need=(split,))
    if not cfg.split(split):
        raise UserError(f"{cfg.yaml_file}: no '{split}' split")
    scan = scan_dataset(cfg.split(split), cfg.nc, f"{split}: ")
    files = list(scan.im_files)
    ids = image_id_map(files)
    class_map = coco80_to_coco91_class() if is_coco_data(cfg) else None
    gt = yolo_labels_to_coco_gt(files, scan.shapes, scan.labels, cfg.names, class_map,
                                image_ids=[ids[str(f)] for f in files])
    return save_json(gt, out)


def main(argv: list[str] | None = None) -> Path:
    """python -m utils.coco --data X.yaml --split val --out gt.json"""
    import argparse

    ap = argparse.ArgumentParser(description="Write a COCO ground-truth JSON from a YOLO dataset split")
    ap.add_argument("--data", default="data/shapes.yaml")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--out", default="gt.json")
    a = ap.parse_args(argv)
    out = gt_from_data(a.data, a.split, a.out)
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
