"""Loss tests against independent float64 re-computations of CIoU, DFL, BCE and the assignment."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from utils.boxes import bbox2dist, bbox_iou, dist2bbox, make_anchors
from utils.loss import DetectionLoss, TaskAlignedAssigner, dfl_loss

REG = 16


def ciou_ref(a, b):
    """Complete IoU from the paper's definition, plain python floats, xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    union = wa * ha + wb * hb - inter
    iou = inter / union
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    v = 4 / math.pi ** 2 * (math.atan(wb / hb) - math.atan(wa / ha)) ** 2
    alpha = v / (1 - iou + v)
    return iou - rho2 / (cw ** 2 + ch ** 2) - alpha * v


def dfl_ref(logits, target):
    """-(wl*log p[l] + wr*log p[l+1]) for one side; logits is a list of 16 floats."""
    m = max(logits)
    logz = m + math.log(sum(math.exp(x - m) for x in logits))
    left = int(math.floor(target))
    wl = left + 1 - target
    return -(wl * (logits[left] - logz) + (1 - wl) * (logits[left + 1] - logz))


def test_bbox_iou_variants_match_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xy = torch.rand(2, 2, generator=g, dtype=torch.float64) * 10
        wh = torch.rand(2, 2, generator=g, dtype=torch.float64) * 8 + 0.5
        a = torch.cat((xy[0], xy[0] + wh[0]))
        b = torch.cat((xy[1], xy[1] + wh[1]))
        got = bbox_iou(a, b, CIoU=True, eps=0).item()
        assert got == pytest.approx(ciou_ref(a.tolist(), b.tolist()), abs=1e-9)
        # xywh input gives the same answer
        got_xywh = bbox_iou(torch.cat(((a[:2] + a[2:]) / 2, a[2:] - a[:2])),
                            torch.cat(((b[:2] + b[2:]) / 2, b[2:] - b[:2])), xywh=True, CIoU=True, eps=0)
        assert got_xywh.item() == pytest.approx(got, abs=1e-9)
    # identical boxes: every variant is 1; disjoint boxes: IoU 0 and GIoU negative
    box = torch.tensor([1.0, 2.0, 4.0, 6.0])
    for kw in ({}, {"CIoU": True}, {"GIoU": True}, {"DIoU": True}):
        assert bbox_iou(box, box, **kw).item() == pytest.approx(1.0, abs=1e-5)
    far = torch.tensor([10.0, 10.0, 12.0, 12.0])
    assert bbox_iou(box, far).item() == 0
    # GIoU: enclosing box (1,2)-(12,12) area 110, union 12+4=16 -> -94/110
    assert bbox_iou(box, far, GIoU=True).item() == pytest.approx(-94 / 110, abs=1e-5)


def test_anchor_and_distance_helpers():
    feats = [torch.zeros(1, 5, 2, 3), torch.zeros(1, 5, 1, 2)]
    pts, st = make_anchors(feats, [8, 16])
    assert pts.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5],
                            [0.5, 0.5], [1.5, 0.5]]
    assert st.view(-1).tolist() == [8] * 6 + [16] * 2
    dist = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    anc = torch.tensor([[5.0, 5.0]])
    assert dist2bbox(dist, anc, xywh=False).tolist() == [[4.0, 3.0, 8.0, 9.0]]
    assert dist2bbox(dist, anc, xywh=True).tolist() == [[6.0, 6.0, 4.0, 6.0]]
    # channel-first layout used by the head: [B, 4, A] with anchors [2, A]
    d = torch.rand(2, 4, 7)
    a = torch.rand(7, 2) * 10
    cf = dist2bbox(d, a.T, xywh=True, dim=1)
    cl = dist2bbox(d.transpose(1, 2), a, xywh=True)
    assert torch.allclose(cf.transpose(1, 2), cl)
    assert torch.allclose(bbox2dist(anc, dist2bbox(dist, anc, xywh=False), REG), dist)
    assert bbox2dist(anc, torch.tensor([[-30.0, 4.0, 40.0, 6.0]]), REG).tolist()[0] == pytest.approx(
        [14.99, 1.0, 14.99, 1.0])


def test_dfl_matches_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, REG, generator=g, dtype=torch.float64)
    target = torch.rand(3, 4, generator=g, dtype=torch.float64) * 14.99
    got = dfl_loss(logits, target).view(-1)
    for n in range(3):
        ref = sum(dfl_ref(logits[n, s].tolist(), target[n, s].item()) for s in range(4)) / 4
        assert got[n].item() == pytest.approx(ref, abs=1e-10)


def test_assigner_hand_case():
    # 4x4 grid of anchors (stride 1): centres 0.5..3.5
    anc = make_anchors([torch.zeros(1, 1, 4, 4)], [1])[0]
    nc = 2
    # GT0 covers anchors (0.5,0.5),(1.5,0.5),(0.5,1.5),(1.5,1.5) -> indices 0,1,4,5
    # GT1 covers the right column pair (2.5..3.5, 0.5..1.5) -> indices 2,3,6,7 and also 1,5 (x from 1.2)
    gt = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [1.2, 0.0, 4.0, 2.0]]])
    labels = torch.tensor([[[0.0], [1.0]]])
    mask = torch.ones(1, 2, 1)
    # predictions: anchor 0 predicts GT0 exactly, 5 nearly, 1 predicts GT1 exactly (so GT1 wins it)
    pd_boxes = torch.tensor([[10.0, 10.0, 11.0, 11.0]]).repeat(16, 1)
    pd_boxes[0] = gt[0, 0]
    pd_boxes[5] = torch.tensor([0.0, 0.0, 2.0, 1.8])
    pd_boxes[1] = gt[0, 1]
    pd_boxes[3] = torch.tensor([1.5, 0.0, 4.0, 2.0])
    scores = torch.full((1, 16, nc), 0.5)
    assigner = TaskAlignedAssigner(topk=2, num_classes=nc)
    t_labels, t_boxes, t_scores, fg, gt_idx = assigner(scores, pd_boxes[None], anc, labels, gt, mask)
    # GT0's top-2: anchors 0 (IoU 1) then 5 (IoU .9) [anchor 1 overlaps GT0 less than GT1];
    # GT1's top-2: anchors 1 (IoU 1) and 3; anchor 1 is also GT0-candidate? no: GT0 top-2 = {0, 5}
    assert fg[0].nonzero().view(-1).tolist() == [0, 1, 3, 5]
    assert gt_idx[0, [0, 5, 1, 3]].tolist() == [0, 0, 1, 1]
    assert t_labels[0, [0, 5, 1, 3]].tolist() == [0, 0, 1, 1]
    assert torch.equal(t_boxes[0, 5], gt[0, 0]) and torch.equal(t_boxes[0, 3], gt[0, 1])
    # soft targets: metric / best metric * best IoU; best IoU = 1 for both GTs
    ciou5 = ciou_ref(gt[0, 0].tolist(), pd_boxes[5].tolist())
    ciou3 = ciou_ref(gt[0, 1].tolist(), pd_boxes[3].tolist())
    assert t_scores[0, 0].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    assert t_scores[0, 1].tolist() == pytest.approx([0.0, 1.0], abs=1e-5)
    assert t_scores[0, 5, 0].item() == pytest.approx(ciou5 ** 6, rel=1e-4)
    assert t_scores[0, 3, 1].item() == pytest.approx(ciou3 ** 6, rel=1e-4)
    assert t_scores[0, ~fg[0]].abs().sum() == 0


def test_assigner_conflict_goes_to_larger_overlap():
    anc = torch.tensor([[1.5, 1.5]])
    gt = torch.tensor([[[0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0]]])
    pd = torch.tensor([[[1.0, 1.0, 2.1, 2.1]]])  # much closer to GT1
    out = TaskAlignedAssigner(topk=10, num_classes=3)(torch.full((1, 1, 3), 0.5), pd, anc,
                                                       torch.tensor([[[0.0], [2.0]]]), gt, torch.ones(1, 2, 1))
    assert out[3].tolist() == [[True]] and out[4].tolist() == [[1]] and out[0].tolist() == [[2]]


def _peaked_logits(dists):
    """Logits [4, 16] whose softmax peaks near the given distances (in bins)."""
    bins = torch.arange(REG, dtype=torch.float64)
    return torch.stack([-2.0 * (bins - d) ** 2 for d in dists])


def test_loss_equals_independent_computation():
    nc, stride = 2, 8.0
    g = torch.Generator().manual_seed(3)
    # one level, 2x2 grid at stride 8 -> 16x16 image, anchors at pixels (4,4),(12,4),(4,12),(12,12)
    feat = torch.randn(2, 4 * REG + nc, 2, 2, generator=g, dtype=torch.float64) * 0.5
    # image 0: GT class 1 box [1,1,7,6] px, only anchor 0 inside; image 1: GT class 0 [9,8,15,15], anchor 3
    gts = {0: (1, [1.0, 1.0, 7.0, 6.0], 0), 1: (0, [9.0, 8.0, 15.0, 15.0], 3)}
    feat[0, :4 * REG, 0, 0] = _peaked_logits([0.35, 0.4, 0.45, 0.2]).reshape(-1)
    feat[1, :4 * REG, 1, 1] = _peaked_logits([0.4, 0.6, 0.3, 0.3]).reshape(-1)
    targets = []
    for b, (c, box, _) in gts.items():
        x1, y1, x2, y2 = box
        targets.append([b, c, (x1 + x2) / 32, (y1 + y2) / 32, (x2 - x1) / 16, (y2 - y1) / 16])
    targets = torch.tensor(targets)
    hyp = {"box": 7.5, "cls": 0.5, "dfl": 1.5}
    loss, items = DetectionLoss(None, hyp, nc=nc, stride=[stride])([feat.float()], targets)

    # ---- independent float64 computation ----
    anchors = [(0.5, 0.5), (1.5, 0.5), (0.5, 1.5), (1.5, 1.5)]  # grid units, row-major
    cls_sum, box_sum, dfl_sum, score_sum = 0.0, 0.0, 0.0, 0.0
    tscores = np.zeros((2, 4, nc))
    per_pos = []
    for b, (c, box, a) in gts.items():
        logits = feat[b, :4 * REG].reshape(4, REG, 4)[:, :, a].tolist()  # [side][bin]
        exp_d = []
        for side in logits:
            m = max(side)
            w = [math.exp(x - m) for x in side]
            exp_d.append(sum(i * wi for i, wi in enumerate(w)) / sum(w))
        ax, ay = anchors[a]
        pred = [ax - exp_d[0], ay - exp_d[1], ax + exp_d[2], ay + exp_d[3]]  # grid units
        gt_grid = [v / stride for v in box]
        ciou = ciou_ref(pred, gt_grid)
        assert 0 < ciou < 1
        tscores[b, a, c] = ciou  # single positive per GT: normalised metric == its IoU
        score_sum += ciou
        ltrb = [ax - gt_grid[0], ay - gt_grid[1], gt_grid[2] - ax, gt_grid[3] - ay]
        per_pos.append((ciou, logits, ltrb))
    for ciou, logits, ltrb in per_pos:
        box_sum += (1 - ciou) * ciou
        dfl_sum += sum(dfl_ref(logits[s], min(max(ltrb[s], 0), 14.99)) for s in range(4)) / 4 * ciou
    cls_logits = feat[:, 4 * REG:].reshape(2, nc, 4).permute(0, 2, 1).numpy()
    for b in range(2):
        for a in range(4):
            for k in range(nc):
                x, t = cls_logits[b, a, k], tscores[b, a, k]
                cls_sum += max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))
    norm = max(score_sum, 1.0)
    ref_items = [7.5 * box_sum / norm, 0.5 * cls_sum / norm, 1.5 * dfl_sum / norm]
    assert items.tolist() == pytest.approx(ref_items, rel=1e-5)
    assert loss.item() == pytest.approx(sum(ref_items) * 2, rel=1e-5)


def test_no_targets_and_empty_images_are_finite():
    torch.manual_seed(0)
    fn = DetectionLoss(None, {}, nc=3, stride=[8, 16, 32])
    feats = [torch.randn(2, 67, s, s, requires_grad=True) for s in (8, 4, 2)]
    loss, items = fn(feats, torch.zeros(0, 6))
    assert torch.isfinite(loss) and items[0] == 0 and items[2] == 0 and items[1] > 0
    loss.backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    # image 1 has no labels while image 0 does
    loss2, items2 = fn(feats, torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3]]))
    assert torch.isfinite(loss2) and items2[0] > 0 and items2[2] > 0
    # a degenerate zero-size box must not produce NaN either
    loss3, _ = fn(feats, torch.tensor([[1, 0, 0.5, 0.5, 0.0, 0.0]]))
    assert torch.isfinite(loss3)


def test_dual_branch_is_main_plus_quarter_aux_and_eval_tuple():
    torch.manual_seed(1)
    hyp = {"box": 7.5, "cls": 0.5, "dfl": 1.5}
    fn = DetectionLoss(None, hyp, nc=2, stride=[8, 16, 32])
    aux = [torch.randn(3, 66, s, s) for s in (8, 4, 2)]
    main = [torch.randn(3, 66, s, s) for s in (8, 4, 2)]
    t = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [2, 0, 0.3, 0.6, 0.2, 0.5], [2, 1, 0.7, 0.2, 0.3, 0.3]])
    l_main, i_main = fn(main, t)
    l_aux, i_aux = fn(aux, t)
    l_dual, i_dual = fn([aux, main], t)
    assert l_dual.item() == pytest.approx(l_main.item() + 0.25 * l_aux.item(), rel=1e-6)
    assert torch.allclose(i_dual, i_main + 0.25 * i_aux, rtol=1e-6)
    # (y, feats) tuple from eval mode
    y = torch.rand(3, 6, 84)
    assert fn((y, main), t)[0].item() == pytest.approx(l_main.item(), rel=1e-6)
    assert fn((y, [aux, main]), t)[0].item() == pytest.approx(l_dual.item(), rel=1e-6)
    # gains come from the hyp dict
    i_scaled = DetectionLoss(None, {"box": 1.0, "cls": 1.0, "dfl": 1.0}, nc=2, stride=[8, 16, 32])(main, t)[1]
    assert torch.allclose(i_scaled * torch.tensor([7.5, 0.5, 1.5]), i_main, rtol=1e-6)


def test_constructor_reads_model_head():
    class Head(nn.Module):
        nc, reg_max = 4, 16
        stride = torch.tensor([8.0, 16.0, 32.0])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Head()

    fn = DetectionLoss(Model(), {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    assert fn.nc == 4 and fn.reg_max == 16 and fn.stride.tolist() == [8, 16, 32]
    with pytest.raises(ValueError):
        DetectionLoss(None, {})


def test_overfits_fixed_targets():
    torch.manual_seed(0)
    nc = 3
    fn = DetectionLoss(None, {}, nc=nc, stride=[8, 16])
    p1 = nn.Parameter(torch.randn(2, 4 * REG + nc, 8, 8) * 0.1)
    p2 = nn.Parameter(torch.randn(2, 4 * REG + nc, 4, 4) * 0.1)
    targets = torch.tensor([[0, 0, 0.3, 0.3, 0.25, 0.3], [0, 2, 0.7, 0.6, 0.4, 0.5],
                            [1, 1, 0.5, 0.5, 0.6, 0.6], [1, 0, 0.2, 0.8, 0.15, 0.15]])
    opt = torch.optim.Adam([p1, p2], lr=0.1)
    first = None
    for _ in range(30):
        loss, _ = fn([p1, p2], targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = fn([p1, p2], targets)[0].item()
    assert final < 0.5 * first


def test_a_loss_step_reads_nothing_back_from_the_device():
    """On a GPU every value read back to Python (float(t), int(t), `if t.any()`, F.one_hot's range check) waits
    for all queued work. Counted here as aten._local_scalar_dense calls, the op behind each of them: one per
    call, the padded target count, read from the targets on the host before they are sent (so no wait on the
    GPU). Positives are found with one nonzero per branch plus the assigner's one (data-dependent sizes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models.yolo import DetectionModel

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = self.nonzero = self.from_python = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            self.reads += "_local_scalar_dense" in name
            self.nonzero += "nonzero" in name
            self.from_python += "lift_fresh" in name and args[0].dim() > 0  # torch.tensor([...]) of a constant
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = DetectionModel("yolov9-t.yaml", nc=3).train()  # dual head: two branches
    feats = model(torch.rand(2, 3, 64, 96))
    targets = torch.tensor([[0, 1, .5, .5, .2, .3], [1, 0, .3, .4, .2, .2], [1, 2, .6, .6, .3, .3]])
    fn = DetectionLoss(model, {})
    ref = fn(feats, targets)[1]  # the first call puts the constants on the device
    with Count() as c:
        items = fn(feats, targets)[1]
    assert torch.equal(items, ref)
    assert c.reads == 1 and c.nonzero == 4 and c.from_python == 0, (c.reads, c.nonzero, c.from_python)
