"""Non-maximum suppression for decoded YOLO outputs [B, 4+nc, A] (xywh pixels + class scores)."""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import Tensor

from utils.boxes import xywh2xyxy
from utils.general import LOGGER
from utils.vision_ops import batched_nms, nms


def non_max_suppression(prediction, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        classes: Sequence[int] | None = None, agnostic: bool = False,
                        multi_label: bool = False, max_det: int = 300, max_nms: int = 30000,
                        time_limit: float | None = None) -> list[Tensor]:
    """Filter and suppress raw detections, one result per image.

    prediction: tensor [B, 4+nc, A] or the (y, feats) tuple returned in eval mode.
    multi_label: every class whose score exceeds conf_thres yields its own box (used for mAP);
    otherwise only the best class per anchor. Scores must be > conf_thres; a box is suppressed by a
    higher-scoring box of the same class (any class if agnostic) with IoU > iou_thres. At most
    max_nms candidates (highest scores) enter NMS and max_det boxes are kept. time_limit (seconds,
    None = no limit) stops early with a warning, leaving remaining images empty.
    Returns list of [n, 6] tensors (x1, y1, x2, y2, conf, cls), sorted by conf descending.
    """
    if isinstance(prediction, (list, tuple)):  # (y, feats) from eval mode
        prediction = prediction[0]
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"non_max_suppression: thresholds must lie in [0, 1] (conf {conf_thres}, iou {iou_thres})")
    bs = prediction.shape[0]
    nc = prediction.shape[1] - 4
    device = prediction.device
    output = [torch.zeros((0, 6), device=device) for _ in range(bs)]
    class_filter = torch.as_tensor(list(classes), device=device) if classes is not None else None
    start = time.time()

    for b in range(bs):
        x = prediction[b].transpose(0, 1).float()  # [A, 4+nc]
        x = x[x[:, 4:].amax(1) > conf_thres] if nc > 0 else x[:0]
        if not len(x):
            continue
        boxes = xywh2xyxy(x[:, :4])
        scores = x[:, 4:]
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if class_filter is not None:
            det = det[(det[:, 5:6] == class_filter).any(1)]
        if not len(det):
            continue
        if len(det) > max_nms:
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        if agnostic:
            keep = nms(det[:, :4], det[:, 4], iou_thres)
        else:
            keep = batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_thres)
        output[b] = det[keep[:max_det]]
        if time_limit is not None and time.time() - start > time_limit:
            LOGGER.warning(f"WARNING: NMS time limit {time_limit:.3f}s exceeded after {b + 1}/{bs} images")
            break
    return output
