"""Detection metrics: COCO-style matching and AP, P/R/F1 at the best confidence, confusion matrix.

AP follows pycocotools' COCOeval exactly (greedy score-ordered matching, precision envelope,
101 recall points). COCOeval also keeps only the top maxDets=100 detections per image *and
category*; results agree with COCOeval only when the detections given here obey the same cap
(the validator's per-image max_det <= 100 guarantees it). COCOeval also ignores unmatched
detections with negative area (x2 < x1); model outputs never have them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from utils.boxes import box_iou

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's iouThrs


def match_predictions(det: Tensor, labels: Tensor, iouv: Tensor) -> Tensor:
    """Mark each detection TP/FP at each IoU threshold, the way COCOeval matches.

    Detections are visited by descending score (stable); each takes the unmatched GT of its own
    class with the highest IoU >= threshold. det [n, 6] (x1,y1,x2,y2,conf,cls), labels [m, 5]
    (cls,x1,y1,x2,y2). Returns bool [n, len(iouv)] in det's original row order.
    """
    n, nt = det.shape[0], len(iouv)
    correct = np.zeros((n, nt), dtype=bool)
    if n == 0 or labels.shape[0] == 0:
        return torch.from_numpy(correct).to(det.device)
    iou = box_iou(labels[:, 1:], det[:, :4], torch.float64).cpu().numpy()  # [m, n], float64 like COCO
    same_cls = (labels[:, :1].cpu() == det[:, 5].cpu()[None]).numpy()
    iou = np.where(same_cls, iou, -1.0)
    order = np.argsort(-det[:, 4].detach().cpu().double().numpy(), kind="mergesort")
    thresholds = iouv.detach().cpu().double().numpy()
    if thresholds.shape == IOU_THRESHOLDS.shape and np.allclose(thresholds, IOU_THRESHOLDS, atol=1e-6):
        thresholds = IOU_THRESHOLDS  # float32 copies of COCO's thresholds -> COCO's exact float64 values
    best_iou = iou.max(0)  # detections below a threshold everywhere are plain FPs
    for ti, t in enumerate(thresholds):
        taken = np.zeros(labels.shape[0], dtype=bool)
        floor = min(t, 1 - 1e-10)
        for d in order[best_iou[order] >= floor]:
            cand = np.where(taken, -1.0, iou[:, d])
            g = int(np.argmax(cand))
            if cand[g] >= floor:
                taken[g] = True
                correct[d, ti] = True
    return torch.from_numpy(correct).to(det.device)


def _moving_average(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """Box-filter smoothing with edge padding (window = 2*frac of the length, odd)."""
    half = int(round(len(y) * frac))
    if half < 1:
        return y
    padded = np.concatenate((np.full(half, y[0]), y, np.full(half, y[-1])))
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.convolve(padded, kernel, mode="valid")


def coco_ap(tp_sorted: np.ndarray, n_gt: int) -> tuple[float, np.ndarray]:
    """AP from TP flags (1-D, detections already sorted by descending score) as COCOeval computes it.

    Returns (ap, precision sampled at the 101 recall thresholds).
    """
    tp_cum = np.cumsum(tp_sorted).astype(np.float64)
    fp_cum = np.cumsum(~tp_sorted).astype(np.float64)
    q = np.zeros(len(RECALL_THRESHOLDS))
    if len(tp_sorted) == 0 or n_gt == 0:
        return 0.0, q
    recall = tp_cum / n_gt
    precision = tp_cum / (tp_cum + fp_cum + np.spacing(1))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # monotone non-increasing
    idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    valid = idx < len(envelope)
    q[valid] = envelope[idx[valid]]
    return float(q.mean()), q


@dataclass
class APResult:
    """Output of ap_per_class; per-class arrays are aligned with ap_class (classes present in GT)."""

    p: np.ndarray  # precision per class at the best mean-F1 confidence
    r: np.ndarray
    f1: np.ndarray
    ap: np.ndarray  # [n_classes_present, n_iou]
    ap_class: np.ndarray  # class ids
    tp: np.ndarray = field(default_factory=lambda: np.zeros(0))  # TP count at best conf (IoU 0.5)
    fp: np.ndarray = field(default_factory=lambda: np.zeros(0))
    conf_best: float = 0.0

    @property
    def ap50(self) -> np.ndarray:
        return self.ap[:, 0] if self.ap.size else np.zeros(0)

    @property
    def ap5095(self) -> np.ndarray:
        return self.ap.mean(1) if self.ap.size else np.zeros(0)

    @property
    def mp(self) -> float:
        return float(self.p.mean()) if self.p.size else 0.0

    @property
    def mr(self) -> float:
        return float(self.r.mean()) if self.r.size else 0.0

    @property
    def map50(self) -> float:
        return float(self.ap50.mean()) if self.ap.size else 0.0

    @property
    def map(self) -> float:
        return float(self.ap.mean()) if self.ap.size else 0.0

    def mean_results(self) -> tuple[float, float, float, float]:
        """(mP, mR, mAP50, mAP50-95)."""
        return self.mp, self.mr, self.map50, self.map

    def class_result(self, i: int) -> tuple[float, float, float, float]:
        """(P, R, AP50, AP50-95) of the i-th present class."""
        return float(self.p[i]), float(self.r[i]), float(self.ap50[i]), float(self.ap5095[i])

    def maps(self, nc: int) -> np.ndarray:
        """mAP50-95 per class id (length nc); classes absent from GT get the overall mAP."""
        out = np.full(nc, self.map)
        for i, c in enumerate(self.ap_class):
            if 0 <= int(c) < nc:
                out[int(c)] = self.ap5095[i]
        return out


def ap_per_class(tp, conf, pred_cls, target_cls, plot: bool = False, save_dir: str | Path | None = None,
                 names: Sequence[str] | dict = (), eps: float = 1e-16) -> APResult:
    """Per-class AP at each IoU threshold (COCO method), plus P/R/F1 at the conf maximising mean F1.

    tp [N, T] bool (from match_predictions), conf [N], pred_cls [N], target_cls [M] over the whole
    dataset. Classes present in target_cls are reported (those without predictions get AP 0);
    classes that only appear in predictions are ignored. With plot=True writes PR/F1/P/R curves.
    """
    tp, conf, pred_cls, target_cls = (np.asarray(_np(a)) for a in (tp, conf, pred_cls, target_cls))
    tp = tp.astype(bool)
    if tp.ndim == 1:
        tp = tp[:, None]
    conf = conf.astype(np.float64)
    order = np.argsort(-conf, kind="mergesort")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, n_gt = np.unique(target_cls, return_counts=True)
    nc, nt = len(classes), tp.shape[1]
    px = np.linspace(0, 1, 1000)  # confidence grid for the P/R/F1 curves
    ap = np.zeros((nc, nt))
    # a class with no predictions keeps precision 0 (as upstream's ap_per_class); above a class's top score
    # precision is 1 (nothing predicted there yet, as upstream's interpolation with left=1)
    p_curve, r_curve = np.zeros((nc, len(px))), np.zeros((nc, len(px)))
    pr_curve = np.zeros((nc, len(RECALL_THRESHOLDS)))  # IoU 0.5 precision at 101 recall points
    for ci, (c, npos) in enumerate(zip(classes, n_gt)):
        sel = pred_cls == c
        tpc, confc = tp[sel], conf[sel]
        for t in range(nt):
            ap[ci, t], q = coco_ap(tpc[:, t], int(npos))
            if t == 0:
                pr_curve[ci] = q
        if len(confc):
            tp_cum = np.cumsum(tpc[:, 0]).astype(np.float64)
            k = np.searchsorted(-confc, -px, side="right")  # number of detections with conf >= px
            has = k > 0
            kk = np.maximum(k - 1, 0)
            p_curve[ci] = np.where(has, tp_cum[kk] / np.maximum(k, 1), 1.0)
            r_curve[ci] = np.where(has, tp_cum[kk] / npos, 0.0)

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(_moving_average(f1_curve.mean(0), 0.05).argmax()) if nc else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_best = np.round(r * n_gt)
    fp_best = np.round(tp_best / (p + eps) - tp_best)

    if plot and nc:
        from utils import plots
        label_names = [_name(names, int(c)) for c in classes]
        save_dir = Path(save_dir or ".")
        plots.plot_pr_curve(RECALL_THRESHOLDS, pr_curve, ap[:, 0], save_dir / "PR_curve.png", label_names)
        plots.plot_mc_curve(px, f1_curve, save_dir / "F1_curve.png", label_names, ylabel="F1")
        plots.plot_mc_curve(px, p_curve, save_dir / "P_curve.png", label_names, ylabel="Precision")
        plots.plot_mc_curve(px, r_curve, save_dir / "R_curve.png", label_names, ylabel="Recall")
    return APResult(p=p, r=r, f1=f1, ap=ap, ap_class=classes.astype(int), tp=tp_best, fp=fp_best,
                    conf_best=float(px[best]))


def _np(a):
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return a


def _name(names, c: int) -> str:
    if isinstance(names, dict):
        return str(names.get(c, c))
    return str(names[c]) if c < len(names) else str(c)


class ConfusionMatrix:
    """(nc+1) x (nc+1) counts; rows = predicted class, columns = true class; last index = background."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def process_batch(self, detections: Tensor | None, labels: Tensor) -> None:
        """detections [n, 6] (x1,y1,x2,y2,conf,cls) of one image, labels [m, 5] (cls,x1,y1,x2,y2).

        Detections above `conf` are paired one-to-one with GTs by descending IoU (> iou_thres,
        any class, so class confusions are counted); leftovers count against background.
        """
        bg = self.nc
        gt_cls = labels[:, 0].long().cpu().numpy() if labels is not None and len(labels) else np.zeros(0, int)
        if detections is None or len(detections) == 0:
            np.add.at(self.matrix, (bg, gt_cls), 1)
            return
        detections = detections[detections[:, 4] > self.conf]
        det_cls = detections[:, 5].long().cpu().numpy()
        if len(gt_cls) == 0:
            np.add.at(self.matrix, (det_cls, bg), 1)
            return
        iou = box_iou(labels[:, 1:], detections[:, :4]).cpu().numpy()  # [m, n]
        gi, di = np.nonzero(iou > self.iou_thres)
        pairs = sorted(zip(iou[gi, di], gi, di), key=lambda x: -x[0])
        gt_match, det_used = {}, set()
        for _, g, d in pairs:
            if g in gt_match or d in det_used:
                continue
            gt_match[g] = d
            det_used.add(d)
        for g, c in enumerate(gt_cls):
            if g in gt_match:
                self.matrix[det_cls[gt_match[g]], c] += 1
            else:
                self.matrix[bg, c] += 1
        for d, c in enumerate(det_cls):
            if d not in det_used:
                self.matrix[c, bg] += 1

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """True positives and false positives per class (background excluded)."""
        tp = np.diag(self.matrix)[:-1]
        fp = self.matrix.sum(1)[:-1] - tp
        return tp, fp

    def plot(self, normalize: bool = True, save_dir: str | Path = "", names: Sequence[str] | dict = ()) -> Path:
        """Write confusion_matrix.png (columns normalised to 1 when normalize) into save_dir."""
        from utils import plots
        labels = [_name(names, i) for i in range(self.nc)] + ["background"]
        out = Path(save_dir) / "confusion_matrix.png"
        plots.plot_confusion_matrix(self.matrix, labels, out, normalize=normalize)
        return out


def fitness(metrics) -> float | np.ndarray:
    """0.1 * mAP50 + 0.9 * mAP50-95; accepts an APResult or an array [..., >=4] of (P, R, mAP50, mAP50-95)."""
    if hasattr(metrics, "map50") and hasattr(metrics, "map"):
        return 0.1 * metrics.map50 + 0.9 * metrics.map
    x = np.asarray(metrics, dtype=np.float64)
    return (x[..., :4] * np.array([0.0, 0.0, 0.1, 0.9])).sum(-1)
