"""Matching, AP, P/R/F1 and confusion matrix on hand-computed cases, and agreement with COCOeval."""
import numpy as np
import pytest
import torch

from utils.coco import coco_evaluate, detections_to_coco, yolo_labels_to_coco_gt
from utils.boxes import box_iou, xywhn2xyxy
from utils.metrics import ConfusionMatrix, ap_per_class, fitness, match_predictions

IOUV = torch.linspace(0.5, 0.95, 10)


def test_box_iou():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert box_iou(a, b)[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0])


def test_match_predictions_duplicates_and_thresholds():
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0], [1, 20.0, 20.0, 30.0, 30.0]])
    det = torch.tensor([
        [0.0, 0.0, 10.0, 10.0, 0.8, 0],  # exact -> TP at every threshold
        [0.0, 0.0, 10.0, 10.0, 0.9, 0],  # duplicate with a higher score: this one matches first
        [20.0, 20.0, 30.0, 28.3, 0.7, 1],  # IoU 0.83 -> TP up to 0.8
        [20.0, 20.0, 30.0, 30.0, 0.6, 0],  # right box, wrong class -> FP
    ])
    tp = match_predictions(det, labels, IOUV)
    assert tp[1].all() and not tp[0].any()
    assert tp[2].tolist() == [t <= 0.83 for t in IOUV.tolist()]
    assert not tp[3].any()
    # greedy by score: a higher-scored worse box takes the GT; the better lower-scored box is FP
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]])
    det = torch.tensor([[0.0, 0.0, 10.0, 6.2, 0.9, 0], [0.0, 0.0, 10.0, 10.0, 0.5, 0]])
    tp = match_predictions(det, labels, IOUV)
    assert tp[0].tolist() == [t <= 0.62 for t in IOUV.tolist()]
    assert tp[1].tolist() == [t > 0.62 for t in IOUV.tolist()]
    assert match_predictions(det[:0], labels, IOUV).shape == (0, 10)
    assert not match_predictions(det, labels[:0], IOUV).any()


def test_perfect_predictions_give_one():
    tp = np.ones((6, 10), bool)
    res = ap_per_class(tp, np.linspace(0.9, 0.4, 6), np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 2]))
    assert np.allclose(res.ap, 1.0)
    assert res.map50 == pytest.approx(1.0) and res.map == pytest.approx(1.0)
    assert res.mp == pytest.approx(1.0) and res.mr == pytest.approx(1.0)
    assert fitness(res) == pytest.approx(1.0)
    assert fitness(np.array([0.3, 0.4, 0.5, 0.2])) == pytest.approx(0.1 * 0.5 + 0.9 * 0.2)


def test_hand_computed_pr_curve():
    # one class, 3 GT, detections by score: TP FP TP FP TP
    # recall 1/3 1/3 2/3 2/3 1; precision 1 .5 2/3 .5 .6; envelope 1 2/3 2/3 .6 .6
    # 101 recall points: 0..0.33 -> 1 (34), 0.34..0.66 -> 2/3 (33), 0.67..1 -> 0.6 (34)
    tp = np.array([1, 0, 1, 0, 1], bool)[:, None].repeat(10, 1)
    tp[:, 5:] = False  # at high IoU nothing matches
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    res = ap_per_class(tp, conf, np.zeros(5), np.zeros(3))
    expected50 = (34 * 1 + 33 * (2 / 3) + 34 * 0.6) / 101
    assert res.ap[0, 0] == pytest.approx(expected50, abs=1e-12)
    assert res.ap[0, 5:].tolist() == [0.0] * 5
    assert res.map == pytest.approx(expected50 / 2, abs=1e-12)
    # order of the inputs must not matter (sorted by score internally)
    perm = np.array([3, 0, 4, 2, 1])
    assert ap_per_class(tp[perm], conf[perm], np.zeros(5), np.zeros(3)).ap[0, 0] == pytest.approx(expected50)
    # recall capped below 1: 1 TP out of 4 GT -> precision 1 on recall 0..0.25 (26 points), 0 after
    res = ap_per_class(np.ones((1, 10), bool), np.array([0.5]), np.zeros(1), np.zeros(4))
    assert res.ap[0, 0] == pytest.approx(26 / 101)


def test_missing_and_absent_classes():
    # class 0: one perfect TP; class 1 has GT but no prediction -> AP 0; class 2 only predicted -> ignored
    tp = np.array([[True] * 10, [False] * 10])
    res = ap_per_class(tp, np.array([0.9, 0.8]), np.array([0, 2]), np.array([0, 1]))
    assert res.ap_class.tolist() == [0, 1]
    assert res.ap50.tolist() == pytest.approx([1.0, 0.0])
    assert res.map50 == pytest.approx(0.5)
    maps = res.maps(3)
    assert maps.tolist() == pytest.approx([1.0, 0.0, 0.5])
    # no ground truth at all
    empty = ap_per_class(np.zeros((2, 10), bool), np.array([0.5, 0.4]), np.array([0, 1]), np.zeros(0))
    assert empty.ap.shape == (0, 10) and empty.map == 0.0 and empty.mp == 0.0
    # no predictions at all
    none = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([0, 0, 1]))
    assert none.ap.tolist() == [[0.0] * 10] * 2 and none.mr == 0.0


def test_precision_recall_at_best_f1():
    # class 0: 2 GT; detections TP(0.9) TP(0.8) FP(0.3). Best F1 (=1) for conf in (0.3, 0.8].
    tp = np.array([[1], [1], [0]], bool).repeat(10, 1)
    res = ap_per_class(tp, np.array([0.9, 0.8, 0.3]), np.zeros(3), np.zeros(2))
    assert res.p[0] == pytest.approx(1.0) and res.r[0] == pytest.approx(1.0)
    assert 0.3 < res.conf_best <= 0.8


def test_confusion_matrix(tmp_path):
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0], [1, 20.0, 20.0, 30.0, 30.0], [1, 50.0, 50.0, 60.0, 60.0]])
    det = torch.tensor([
        [0.0, 0.0, 10.0, 10.0, 0.9, 0],  # correct class 0
        [20.0, 20.0, 30.0, 29.0, 0.8, 0],  # class 1 object predicted as 0
        [80.0, 80.0, 90.0, 90.0, 0.7, 1],  # background predicted as 1
        [0.0, 0.0, 10.0, 10.0, 0.1, 1],  # below conf: ignored
    ])
    cm.process_batch(det, labels)  # GT 3 (class 1 at 50..60) missed -> background row
    cm.process_batch(None, torch.tensor([[0, 0.0, 0.0, 5.0, 5.0]]))
    cm.process_batch(torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.5, 0]]), torch.zeros(0, 5))
    expected = np.array([[1, 1, 1],
                         [0, 0, 1],
                         [1, 1, 0]])
    assert cm.matrix.tolist() == expected.tolist()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [2, 1]
    out = cm.plot(normalize=True, save_dir=tmp_path, names=["a", "b"])
    assert out.is_file() and out.stat().st_size > 0


def test_plots_written(tmp_path):
    rng = np.random.default_rng(0)
    tp = rng.random((40, 10)) < 0.5
    ap_per_class(tp, rng.random(40), rng.integers(0, 3, 40), rng.integers(0, 3, 30), plot=True,
                 save_dir=tmp_path, names={0: "x", 1: "y", 2: "z"})
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        assert (tmp_path / f).stat().st_size > 0


def _random_dataset(seed, n_img=10, nc=3):
    rng = np.random.default_rng(seed)
    files, shapes, labels, preds = [], [], [], []
    for i in range(n_img):
        w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        n = int(rng.integers(0, 7)) if i else 0  # image 0 has no objects
        xy = rng.uniform(0.15, 0.85, (n, 2))
        wh = rng.uniform(0.05, 0.3, (n, 2))
        lab = np.concatenate((rng.integers(0, nc, (n, 1)), xy, wh), 1)
        gt_px = xywhn2xyxy(lab[:, 1:], w, h)
        dets = []
        for (c, *_), box in zip(lab, gt_px):  # jittered copies (sometimes duplicated / wrong class)
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.08, 4) * np.r_[box[2] - box[0], box[3] - box[1]].repeat(2)
                cls = c if rng.random() < 0.85 else rng.integers(0, nc)
                jb = box + jitter
                jb[2:] = np.maximum(jb[2:], jb[:2] + 1)  # COCOeval ignores negative-area boxes
                dets.append([*jb, rng.random(), cls])
        for _ in range(int(rng.integers(0, 15))):  # random false positives
            x1, y1 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            dets.append([x1, y1, x1 + rng.uniform(5, 100), y1 + rng.uniform(5, 100), rng.random() * 0.7,
                         rng.integers(0, nc)])
        files.append(f"img_{i}.jpg")
        shapes.append((w, h))
        labels.append(lab)
        preds.append(np.array(dets, dtype=np.float64).reshape(-1, 6))
    return files, shapes, labels, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pycocotools(seed):
    pytest.importorskip("pycocotools")
    nc = 3
    files, shapes, labels, preds = _random_dataset(seed, nc=nc)
    stats, jdict = [], []
    gt = yolo_labels_to_coco_gt(files, shapes, labels, names=["a", "b", "c"])
    for img_id, ((w, h), lab, p) in enumerate(zip(shapes, labels, preds)):
        assert len(p) <= 100  # COCOeval keeps at most 100 per image and class
        lab_px = torch.from_numpy(np.concatenate((lab[:, :1], xywhn2xyxy(lab[:, 1:], w, h)), 1))
        det = torch.from_numpy(p)
        tp = match_predictions(det, lab_px, IOUV)
        stats.append((tp.numpy(), p[:, 4], p[:, 5], lab[:, 0]))
        detections_to_coco(det, img_id, jdict=jdict)
    tp, conf, pcls, tcls = (np.concatenate(x, 0) for x in zip(*stats))
    res = ap_per_class(tp, conf, pcls, tcls)
    map5095, map50 = coco_evaluate(gt, jdict)
    assert res.map50 == pytest.approx(map50, abs=1e-6)  # brief allows 0.002; we match exactly
    assert res.map == pytest.approx(map5095, abs=1e-6)
    assert 0.05 < res.map < 0.95  # a non-trivial case


def test_class_without_predictions_has_precision_zero():
    """Upstream's ap_per_class starts precision at zeros and skips classes without predictions: P 0, not 1."""
    tp = np.array([[True] * 10])
    res = ap_per_class(tp, np.array([0.9]), np.array([0]), np.array([0, 1]))
    assert res.p.tolist() == pytest.approx([1.0, 0.0]) and res.r.tolist() == pytest.approx([1.0, 0.0])
    assert res.mp == pytest.approx(0.5) and res.map50 == pytest.approx(0.5)
    none = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([0, 0, 1]))
    assert none.p.tolist() == [0.0, 0.0] and none.mp == 0.0
