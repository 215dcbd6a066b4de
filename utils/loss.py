"""YOLOv9 training loss: task-aligned assignment, CIoU box loss, distribution focal loss, BCE classes.

One assignment per head branch; for dual heads the auxiliary branch terms are weighted 0.25.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.boxes import bbox2dist, bbox_iou, dist2bbox, make_anchors, xywh2xyxy

__all__ = ["TaskAlignedAssigner", "DetectionLoss", "dfl_loss", "make_anchors", "dist2bbox", "bbox2dist"]


class TaskAlignedAssigner(nn.Module):
    """Assign ground truth boxes to anchors by the task-alignment metric score^alpha * CIoU^beta.

    For every GT the `topk` anchors with the highest metric among anchors whose centre lies inside
    the GT become candidates; an anchor claimed by several GTs keeps the one it overlaps most.
    Soft class targets are the metric normalised so each GT's best anchor gets that GT's best IoU.
    """

    def __init__(self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0,
                 eps: float = 1e-9):
        super().__init__()
        self.topk, self.num_classes, self.alpha, self.beta, self.eps = topk, num_classes, alpha, beta, eps

    @torch.no_grad()
    def forward(self, pd_scores: Tensor, pd_bboxes: Tensor, anc_points: Tensor, gt_labels: Tensor,
                gt_bboxes: Tensor, mask_gt: Tensor):
        """pd_scores [B,A,C] (sigmoid), pd_bboxes [B,A,4] xyxy, anc_points [A,2], gt_labels [B,n,1],
        gt_bboxes [B,n,4] xyxy, mask_gt [B,n,1] (1 = real GT, 0 = padding); all boxes in the same units.

        Returns target_labels [B,A], target_bboxes [B,A,4], target_scores [B,A,C], fg_mask [B,A] bool,
        target_gt_idx [B,A].
        """
        bs, n_anchors, nc = pd_scores.shape
        n_max = gt_bboxes.shape[1]
        device = pd_scores.device
        if n_max == 0:
            return (torch.full((bs, n_anchors), nc, dtype=torch.long, device=device),
                    torch.zeros_like(pd_bboxes), torch.zeros_like(pd_scores),
                    torch.zeros((bs, n_anchors), dtype=torch.bool, device=device),
                    torch.zeros((bs, n_anchors), dtype=torch.long, device=device))

        labels = gt_labels.long().squeeze(-1).clamp(0, nc - 1)  # [B,n]
        valid = mask_gt.squeeze(-1).bool()  # [B,n]

        # anchor centre strictly inside the GT box
        lt = anc_points[None, None] - gt_bboxes[:, :, None, :2]
        rb = gt_bboxes[:, :, None, 2:] - anc_points[None, None]
        inside = torch.cat((lt, rb), -1).amin(-1) > self.eps  # [B,n,A]

        inside &= valid[:, :, None]

        # alignment metric for (GT, anchor) pairs with the anchor inside the GT (others never count)
        score = torch.gather(pd_scores.transpose(1, 2), 1, labels[:, :, None].expand(-1, -1, n_anchors))
        overlaps = torch.zeros(inside.shape, dtype=pd_bboxes.dtype, device=device)  # [B,n,A]
        b_idx, g_idx, a_idx = inside.nonzero(as_tuple=True)
        overlaps[b_idx, g_idx, a_idx] = bbox_iou(gt_bboxes[b_idx, g_idx], pd_bboxes[b_idx, a_idx],
                                                 xywh=False, CIoU=True).clamp(min=0).to(overlaps.dtype)
        metric = score.pow(self.alpha) * overlaps.pow(self.beta)

        # top-k candidates per GT among inside anchors
        k = min(self.topk, n_anchors)
        top_idx = torch.topk(metric * inside, k, dim=-1, largest=True).indices  # [B,n,k]
        in_topk = torch.zeros_like(metric, dtype=torch.bool).scatter_(-1, top_idx, True)
        mask_pos = in_topk & inside  # [B,n,A]

        # an anchor claimed by several GTs keeps the candidate GT it overlaps most
        fg_mask = mask_pos.any(1)  # [B,A]
        target_gt_idx = overlaps.masked_fill(~mask_pos, -1.0).argmax(1)  # [B,A]
        # one-hot by comparison: F.one_hot checks its indices' range on the host (two GPU syncs per call)
        gt_range = torch.arange(n_max, device=device)[None, :, None]
        mask_pos = (gt_range == target_gt_idx[:, None, :]) & fg_mask[:, None, :]

        # gather targets
        batch_off = torch.arange(bs, device=device)[:, None] * n_max
        flat_idx = target_gt_idx + batch_off
        target_labels = labels.reshape(-1)[flat_idx]  # [B,A]
        target_bboxes = gt_bboxes.reshape(-1, 4)[flat_idx]  # [B,A,4]
        target_scores = torch.zeros_like(pd_scores).scatter_(-1, target_labels[..., None], 1.0) * fg_mask[..., None]

        # normalised alignment metric as soft class target
        metric = metric * mask_pos
        best_metric = metric.amax(-1, keepdim=True)  # [B,n,1]
        best_iou = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (metric * best_iou / (best_metric + self.eps)).amax(1)  # [B,A]
        target_scores = target_scores * norm[..., None]
        return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx


def dfl_loss(pred_dist: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each continuous target,
    weighted by linear interpolation. pred_dist [N, 4, reg_max] logits, target [N, 4] in bins.
    Returns [N, 1] (mean over the 4 sides)."""
    n_bins = pred_dist.shape[-1]
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = 1 - w_left
    logits = pred_dist.reshape(-1, n_bins)
    ce_left = F.cross_entropy(logits, left.reshape(-1), reduction="none").view(left.shape)
    ce_right = F.cross_entropy(logits, right.reshape(-1).clamp(max=n_bins - 1), reduction="none").view(left.shape)
    return (ce_left * w_left + ce_right * w_right).mean(-1, keepdim=True)


def local_score_sum(s: Tensor) -> Tensor:
    """The loss normaliser of one process: the batch's target-score sum, at least 1."""
    return s.clamp(min=1.0)


class DetectionLoss:
    """Callable loss: `loss, items = loss_fn(feats, targets)`.

    feats: list of per-level raw maps [B, 4*reg_max + nc, h, w], or [aux_maps, main_maps] for dual heads.
    targets: [N, 6] = (img_idx, cls, xc, yc, w, h) normalised to the network input.
    loss: scalar = (box*gain_box + cls*gain_cls + dfl*gain_dfl) * batch_size; items: detached [box, cls, dfl]
    (already multiplied by the gains).
    Construct from a model (`model.head.nc/.reg_max/.stride`) or, for tests, from nc/stride/reg_max.
    """

    aux_weight = 0.25

    def __init__(self, model: nn.Module | None = None, hyp: dict | None = None, nc: int | None = None,
                 stride: Sequence[float] | Tensor | None = None, reg_max: int = 16, topk: int = 10):
        hyp = hyp or {}
        if model is not None:
            model = getattr(model, "module", model)  # unwrap DDP / DataParallel
            head = model.head
            nc, reg_max, stride = int(head.nc), int(head.reg_max), head.stride
        if nc is None or stride is None:
            raise ValueError("DetectionLoss needs a model or both nc and stride")
        self.nc, self.reg_max = int(nc), int(reg_max)
        self.stride = torch.as_tensor(stride, dtype=torch.float32).flatten().cpu()
        # Python floats, read once here: a stride tensor on the GPU read with float() per level and step
        # would wait for the GPU (a host-device sync) every time
        self.strides = tuple(float(s) for s in self.stride.tolist())
        self.no = self.nc + 4 * self.reg_max
        self.gains = (float(hyp.get("box", 7.5)), float(hyp.get("cls", 0.5)), float(hyp.get("dfl", 1.5)))
        self._gains = torch.tensor(self.gains)
        self.assigner = TaskAlignedAssigner(topk=topk, num_classes=self.nc, alpha=0.5, beta=6.0)
        self.bins = torch.arange(self.reg_max, dtype=torch.float32)
        self._on_device: dict[tuple, Tensor] = {}  # (name, device, dtype) -> constant kept where it is used
        # normaliser of the three terms from the batch's target-score sum; the trainer swaps in the
        # global-batch version under DDP (utils.engine.distributed.global_score_sum)
        self.score_sum_fn: Callable[[Tensor], Tensor] = local_score_sum

    # ---- helpers ----
    def _const(self, name: str, value: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """`value` on `device` as `dtype`, copied there once (not rebuilt and sent every step)."""
        key = (name, device, dtype)
        t = self._on_device.get(key)
        if t is None:
            t = self._on_device[key] = value.to(device, dtype)
        return t

    def _split(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Concatenate levels -> (pred_dist [B,A,4*reg_max], pred_logits [B,A,nc]) in float32."""
        bs = feats[0].shape[0]
        flat = torch.cat([f.reshape(bs, self.no, -1) for f in feats], 2).float()
        dist, logits = flat.split((4 * self.reg_max, self.nc), 1)
        return dist.permute(0, 2, 1).contiguous(), logits.permute(0, 2, 1).contiguous()

    def decode(self, anchor_points: Tensor, pred_dist: Tensor) -> Tensor:
        """Expected distance per side (softmax over bins, weights 0..reg_max-1) -> xyxy in grid units."""
        b, a, _ = pred_dist.shape
        prob = pred_dist.view(b, a, 4, self.reg_max).softmax(-1)
        dist = prob @ self._const("bins", self.bins, prob.device, prob.dtype)
        return dist2bbox(dist, anchor_points, xywh=False)

    def _targets(self, targets: Tensor, bs: int, img_w: float, img_h: float,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """[N,6] normalised -> gt_labels [B,n,1], gt_bboxes [B,n,4] xyxy pixels, mask_gt [B,n,1] on `device`.

        Built on the host (the loader's targets are there; the padded size n is read from them without waiting
        for the GPU) and sent with one asynchronous copy from page-locked memory."""
        t = targets.detach().to("cpu", torch.float32)
        n_max = int(torch.bincount(t[:, 0].long(), minlength=bs).max()) if len(t) else 0
        out = torch.zeros((bs, n_max, 6), pin_memory=device.type == "cuda")
        if n_max:
            img_idx = t[:, 0].long()
            counts = torch.bincount(img_idx, minlength=bs)
            order = torch.argsort(img_idx, stable=True)
            t, idx_sorted = t[order], img_idx[order]
            slot = torch.arange(len(t)) - (torch.cumsum(counts, 0) - counts)[idx_sorted]
            xywh = t[:, 2:6].clone()
            xywh[:, 0::2] *= img_w
            xywh[:, 1::2] *= img_h
            out[idx_sorted, slot, 0] = t[:, 1]
            out[idx_sorted, slot, 1:5] = xywh2xyxy(xywh)
            out[idx_sorted, slot, 5] = 1.0
        out = out.to(device, non_blocking=True)
        return out[..., :1], out[..., 1:5], out[..., 5:]

    def _branch(self, feats: Sequence[Tensor], gt: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Un-gained [box, cls, dfl] for one head branch; gt = (labels, boxes, mask) from `_targets`."""
        feats = [f.float() for f in feats]  # autocast (bf16/fp16) outputs: anchors and boxes in fp32
        device = feats[0].device
        pred_dist, pred_logits = self._split(feats)
        anchor_points, stride_tensor = make_anchors(feats, self.strides, 0.5)
        anchor_points, stride_tensor = anchor_points.float(), stride_tensor.float()

        gt_labels, gt_bboxes, mask_gt = gt
        pred_bboxes = self.decode(anchor_points, pred_dist)  # grid units, xyxy
        _, target_bboxes, target_scores, fg_mask, _ = self.assigner(
            pred_logits.detach().sigmoid(), pred_bboxes.detach() * stride_tensor, anchor_points * stride_tensor,
            gt_labels, gt_bboxes, mask_gt)
        target_bboxes = target_bboxes / stride_tensor
        score_sum = self.score_sum_fn(target_scores.sum())

        loss = torch.zeros(3, device=device)
        loss[1] = F.binary_cross_entropy_with_logits(pred_logits, target_scores, reduction="sum") / score_sum
        fg = fg_mask.nonzero(as_tuple=True)  # one host read of the positives; indexing with it reads no more
        if len(fg[0]):
            weight = target_scores.sum(-1)[fg].unsqueeze(-1)  # [P,1]
            iou = bbox_iou(pred_bboxes[fg], target_bboxes[fg], xywh=False, CIoU=True)
            loss[0] = ((1.0 - iou).unsqueeze(-1) * weight).sum() / score_sum
            target_ltrb = bbox2dist(anchor_points[fg[1]], target_bboxes[fg], self.reg_max)
            pd = pred_dist[fg].view(-1, 4, self.reg_max)
            loss[2] = (dfl_loss(pd, target_ltrb) * weight).sum() / score_sum
        else:  # keep every prediction in the graph so DDP / unused-parameter checks stay happy
            loss[0] = loss[0] + pred_dist.sum() * 0.0
            loss[2] = loss[2] + pred_dist.sum() * 0.0
        return loss

    def __call__(self, feats, targets: Tensor) -> tuple[Tensor, Tensor]:
        """targets may live on the host (cheapest: the trainer passes the loader's) or on the device."""
        if isinstance(feats[0], Tensor) and feats[0].dim() == 3:
            feats = feats[1]  # (y, feats) from eval mode
        dual = isinstance(feats[0], (list, tuple))  # dual head: [aux, main]
        main = feats[1] if dual else feats
        bs, (h, w), device = main[0].shape[0], main[0].shape[2:], main[0].device
        # both branches see the same input, so one set of padded targets serves them
        gt = self._targets(targets, bs, float(w) * self.strides[0], float(h) * self.strides[0], device)
        loss = self._branch(main, gt)
        if dual:
            loss = loss + self.aux_weight * self._branch(feats[0], gt)
        loss = loss * self._const("gains", self._gains, loss.device, loss.dtype)
        return loss.sum() * bs, loss.detach()
