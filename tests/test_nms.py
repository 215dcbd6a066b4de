"""NMS against a pure-python greedy reference."""
import pytest
import torch

from utils.nms import non_max_suppression


def iou_py(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference(pred, conf_thres, iou_thres, classes=None, agnostic=False, multi_label=False, max_det=300):
    """pred [4+nc, A] for one image -> list of (x1,y1,x2,y2,conf,cls) tuples, highest conf first."""
    nc = pred.shape[0] - 4
    cands = []
    for a in range(pred.shape[1]):
        xc, yc, w, h = pred[:4, a].tolist()
        box = (xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)
        scores = pred[4:, a].tolist()
        if multi_label:
            pairs = [(s, c) for c, s in enumerate(scores) if s > conf_thres]
        else:
            best = max(range(nc), key=lambda c: scores[c])
            pairs = [(scores[best], best)] if scores[best] > conf_thres else []
        for s, c in pairs:
            if classes is None or c in classes:
                cands.append((*box, s, c))
    cands.sort(key=lambda d: -d[4])
    kept = []
    for d in cands:
        if all(not ((agnostic or k[5] == d[5]) and iou_py(k, d) > iou_thres) for k in kept):
            kept.append(d)
    return kept[:max_det]


def random_pred(bs, nc, n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(bs, 2, n, generator=g) * 100
    wh = torch.rand(bs, 2, n, generator=g) * 40 + 2
    scores = torch.rand(bs, nc, n, generator=g)
    return torch.cat((xy, wh, scores), 1)


@pytest.mark.parametrize("kw", [
    dict(conf_thres=0.25, iou_thres=0.45),
    dict(conf_thres=0.5, iou_thres=0.3, multi_label=True),
    dict(conf_thres=0.3, iou_thres=0.5, agnostic=True),
    dict(conf_thres=0.1, iou_thres=0.6, multi_label=True, agnostic=True),
    dict(conf_thres=0.2, iou_thres=0.45, classes=[0, 2]),
    dict(conf_thres=0.05, iou_thres=0.7, multi_label=True, max_det=7),
])
def test_matches_reference(kw):
    pred = random_pred(3, 4, 120, seed=len(str(kw)))
    out = non_max_suppression(pred, **kw)
    assert len(out) == 3
    for b in range(3):
        ref = reference(pred[b], **kw)
        got = out[b]
        assert got.shape == (len(ref), 6)
        assert torch.allclose(got, torch.tensor(ref, dtype=torch.float32).reshape(-1, 6), atol=1e-4)


def test_eval_tuple_empty_and_max_nms():
    pred = random_pred(2, 3, 50, seed=7)
    direct = non_max_suppression(pred, 0.3, 0.5)
    via_tuple = non_max_suppression((pred, [torch.zeros(1)]), 0.3, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_tuple))
    # nothing above threshold -> empty [0, 6] tensors
    none = non_max_suppression(pred * torch.tensor([1, 1, 1, 1, 0, 0, 0]).view(1, -1, 1), 0.25, 0.45)
    assert all(o.shape == (0, 6) for o in none)
    # max_nms keeps only the top-scoring candidates before suppression
    capped = non_max_suppression(pred, 0.0, 1.0, max_nms=5)
    for b in range(2):
        assert len(capped[b]) == 5
        assert torch.allclose(capped[b][:, 4], pred[b, 4:].amax(0).sort(descending=True).values[:5])


def test_time_limit_warns(caplog):
    pred = random_pred(3, 2, 30, seed=3)
    out = non_max_suppression(pred, 0.2, 0.5, time_limit=0.0)
    assert len(out) == 3 and len(out[0]) > 0 and len(out[1]) == 0
    assert "time limit" in caplog.text


@pytest.mark.parametrize("n", [0, 1, 300, 1500])  # 1500 boxes: torchvision switches to a per-class loop on CPU
def test_vision_ops_equal_torchvision(n):
    import torchvision.ops as tv

    from utils.vision_ops import batched_nms, nms
    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 80], 1)
    scores = torch.rand(n, generator=g)
    cls = torch.randint(0, 7, (n,), generator=g)
    assert torch.equal(nms(boxes, scores, 0.45), tv.nms(boxes, scores, 0.45))
    # same boxes kept per class (the order among equal scores may differ between the two methods)
    a, b = batched_nms(boxes, scores, cls, 0.45), tv.batched_nms(boxes, scores, cls, 0.45)
    assert sorted(a.tolist()) == sorted(b.tolist()) and a.dtype == torch.int64
    assert torch.equal(scores[a], scores[a].sort(descending=True).values)
