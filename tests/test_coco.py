"""COCO JSON writers and the pycocotools wrapper."""
import json
import sys

import numpy as np
import pytest
import torch

from utils.coco import (coco80_to_coco91_class, coco_evaluate, detections_to_coco, make_image_ids, save_json,
                        yolo_labels_to_coco_gt)
from utils.general import UserError


def test_coco80_to_coco91():
    ids = coco80_to_coco91_class()
    assert len(ids) == 80 and len(set(ids)) == 80
    assert ids[:12] == list(range(1, 12)) + [13]  # 12 is unused
    assert ids[-1] == 90 and ids[0] == 1
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)
    assert ids == sorted(ids)


def test_image_ids():
    assert make_image_ids(["a/000000000139.jpg", "b/285.png"]) == [139, 285]
    assert make_image_ids(["cat.jpg", "12.jpg"]) == [0, 1]
    assert make_image_ids(["x/1.jpg", "y/1.png"]) == [0, 1]  # duplicate stems


def test_writers_convert_boxes():
    gt = yolo_labels_to_coco_gt(["a.jpg", "b.jpg"], [(200, 100), (50, 40)],
                                [np.array([[1, 0.5, 0.5, 0.2, 0.4]]), np.zeros((0, 5))], names=["x", "y"],
                                class_map=[3, 7])
    assert [c["id"] for c in gt["categories"]] == [3, 7]
    assert gt["images"] == [{"id": 0, "file_name": "a.jpg", "width": 200, "height": 100},
                            {"id": 1, "file_name": "b.jpg", "width": 50, "height": 40}]
    (ann,) = gt["annotations"]
    assert ann["category_id"] == 7 and ann["image_id"] == 0 and ann["iscrowd"] == 0
    assert ann["bbox"] == pytest.approx([80, 30, 40, 40]) and ann["area"] == pytest.approx(1600)
    dets = detections_to_coco(torch.tensor([[10.0, 20.0, 50.0, 80.0, 0.9, 1]]), 5, class_map=[3, 7])
    assert dets == [{"image_id": 5, "category_id": 7, "bbox": pytest.approx([10, 20, 40, 60]),
                     "score": pytest.approx(0.9)}]
    json.dumps(gt), json.dumps(dets)  # plain python types only


def test_evaluate_perfect_and_files(tmp_path):
    pytest.importorskip("pycocotools")
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.4], [1, 0.2, 0.3, 0.1, 0.1]]), np.array([[1, 0.6, 0.6, 0.3, 0.3]])]
    shapes = [(200, 100), (120, 160)]
    gt = yolo_labels_to_coco_gt(["1.jpg", "2.jpg"], shapes, labels, names={0: "a", 1: "b"})
    dets = []
    for img_id, (lab, (w, h)) in zip([1, 2], zip(labels, shapes)):
        xy = lab[:, 1:3] - lab[:, 3:5] / 2
        boxes = np.concatenate((xy, xy + lab[:, 3:5]), 1) * [w, h, w, h]
        detections_to_coco(np.concatenate((boxes, np.full((len(lab), 1), 0.8), lab[:, :1]), 1), img_id, jdict=dets)
    assert coco_evaluate(gt, dets) == pytest.approx((1.0, 1.0))
    # same through files; no detections -> zeros
    g, d = save_json(gt, tmp_path / "gt.json"), save_json(dets, tmp_path / "dt.json")
    assert coco_evaluate(g, d) == pytest.approx((1.0, 1.0))
    assert coco_evaluate(g, []) == (0.0, 0.0)
    with pytest.raises(UserError):
        coco_evaluate(tmp_path / "missing.json", d)


def test_missing_pycocotools_is_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(UserError, match="pip install pycocotools"):
        coco_evaluate({}, [])
