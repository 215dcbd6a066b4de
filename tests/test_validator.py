"""Validator: rect batching vs single-image letterbox, end-to-end val_dual, perfect predictions, COCO agreement."""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from models.yolo import DetectionModel
from utils import coco
from utils.boxes import scale_boxes
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.data import create_dataloader, generate_shapes, letterbox
from utils.engine.validator import validate
from utils.general import UserError
from utils.loss import DetectionLoss
from utils.nms import non_max_suppression

NAMES = ["circle", "rectangle", "triangle"]
IMGSZ = 96
# long side == IMGSZ, so neither the loader nor the reference resizes: only padding differs
SIZES = [(96, 64), (96, 48), (96, 80), (96, 72), (96, 56)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("val") / "shapes"
    generate_shapes(root, n_train=1, n_val=7, seed=3, nc=len(NAMES), sizes=SIZES)
    yaml_file = root.parent / "data.yaml"
    yaml_file.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {NAMES}\n")
    return root, yaml_file


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DetectionModel("gelan-t.yaml", nc=len(NAMES)).eval()
    m.names = list(NAMES)
    return m


def _loader(root, batch_size=4, rect=True):
    loader, _ = create_dataloader(root / "images" / "val", IMGSZ, batch_size, 32, pad=0.5, rect=rect, workers=0,
                                  names=NAMES, nc=len(NAMES))
    return loader


def test_rect_batches_match_single_image_letterbox(dataset, model):
    root, _ = dataset
    loader = _loader(root, batch_size=7)  # one rect batch holding every aspect ratio
    out = validate(model, loader, names=NAMES, conf_thres=0.002, plots=False, return_predictions=True)
    preds = out.predictions
    assert len(preds) == 7

    # the rect rule, independently: all images are wide -> width imgsz, height = max(h/w) * imgsz, + 0.5 stride pad
    files = sorted((root / "images" / "val").glob("*.jpg"))
    ar_max = max(im.shape[0] / im.shape[1] for im in (cv2.imread(str(f)) for f in files))
    shape = (math.ceil(ar_max * IMGSZ / 32 + 0.5) * 32, math.ceil(IMGSZ / 32 + 0.5) * 32)
    assert next(iter(loader))[0].shape[2:] == shape

    n_compared = 0
    for f in files:
        img0 = cv2.imread(str(f))
        img, _, _ = letterbox(img0, shape, auto=False, scaleup=False)
        x = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float()[None] / 255
        with torch.no_grad():
            ref = non_max_suppression(model(x), 0.002, 0.7, multi_label=True, max_det=300)[0]
        ref[:, :4] = scale_boxes(shape, ref[:, :4], img0.shape[:2])  # gain/pad recomputed, not the loader's
        got = preds[str(f)]
        assert len(ref) > 0
        k = min(len(ref), len(got), 30)
        assert abs(len(ref) - len(got)) <= 1
        torch.testing.assert_close(got[:k, 4], ref[:k, 4], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[:k, :4], ref[:k, :4], atol=1e-2, rtol=1e-4)
        assert torch.equal(got[:k, 5], ref[:k, 5])
        n_compared += k
    assert n_compared >= 7


def test_val_dual_end_to_end(dataset, model, tmp_path):
    import val_dual

    root, yaml_file = dataset
    weights = save_checkpoint(make_checkpoint(model, names=NAMES), tmp_path / "w.pt")
    out = val_dual.main(["--data", str(yaml_file), "--weights", str(weights), "--img", str(IMGSZ), "--batch-size", "4",
                         "--device", "cpu", "--workers", "0", "--project", str(tmp_path / "runs"), "--name", "exp",
                         "--save-txt", "--save-conf"])
    save_dir = tmp_path / "runs" / "exp"
    assert out.save_dir == save_dir
    for name in ("confusion_matrix.png", "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png",
                 "val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch1_labels.jpg", "val_batch1_pred.jpg"):
        assert (save_dir / name).is_file(), name
    for k in ("mp", "mr", "map50", "map", "box", "cls", "dfl", "fitness"):
        assert math.isfinite(getattr(out, k)), k
    assert len(out.maps) == len(NAMES) and len(out.speed) == 3
    assert out.ap_table[0]["cls"] == "all" and out.seen == 7
    lines = [ln.split() for f in (save_dir / "labels").glob("*.txt") for ln in f.read_text().splitlines()]
    assert lines and all(len(ln) == 6 for ln in lines)
    vals = np.array([[float(v) for v in ln[1:5]] for ln in lines])
    assert (vals >= -1e-6).all() and (vals <= 1 + 1e-6).all()

    # a second run increments the folder; missing weights are one clear error
    val_dual.main(["--data", str(yaml_file), "--weights", str(weights), "--img", str(IMGSZ), "--device", "cpu",
                   "--workers", "0", "--project", str(tmp_path / "runs"), "--task", "speed"])
    assert (tmp_path / "runs" / "exp2").is_dir() and not (tmp_path / "runs" / "exp2" / "confusion_matrix.png").exists()
    with pytest.raises(UserError, match="not found"):
        val_dual.main(["--data", str(yaml_file), "--weights", str(tmp_path / "nope.pt")])
    with pytest.raises(UserError, match="not found"):
        val_dual.main(["--data", str(tmp_path / "nope.yaml"), "--weights", str(weights)])


def test_real_validation_losses(dataset, model):
    root, _ = dataset
    out = validate(model, _loader(root), names=NAMES, loss_fn=DetectionLoss(model), plots=False)
    assert out.box > 0 and out.cls > 0 and out.dfl > 0
    assert not model.training
    zero = validate(model, _loader(root), names=NAMES, loss_fn=DetectionLoss(model), compute_loss=False, plots=False)
    assert zero.box == zero.cls == zero.dfl == 0.0


class ReplayModel(nn.Module):
    """Returns prepared [B, 4+nc, A] predictions batch by batch (the loader's order is deterministic)."""

    def __init__(self, outputs):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.outputs = list(outputs)
        self.names = NAMES

    def forward(self, x):
        y = self.outputs.pop(0)
        assert y.shape[0] == x.shape[0]
        return y


def _predictions_from_targets(loader, nc, noise=0.0, fp=0, miss=0.0, seed=0):
    """[B, 4+nc, A] per batch built from the batch's GT (input pixels, xywh), optionally perturbed."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for im, targets, _, _ in loader:
        b, _, h, w = im.shape
        per_img = []
        for i in range(b):
            t = targets[targets[:, 0] == i]
            boxes = t[:, 2:6] * torch.tensor([w, h, w, h])
            cls = t[:, 1].long()
            conf = torch.ones(len(t))
            if noise:
                jitter = noise * torch.randn(boxes.shape, generator=g)
                boxes = torch.cat((boxes[:, :2] + jitter[:, :2] * boxes[:, 2:], boxes[:, 2:] * (1 + jitter[:, 2:])), 1)
                conf = torch.rand(len(t), generator=g) * 0.7 + 0.3
                keep = torch.rand(len(t), generator=g) >= miss
                boxes, cls, conf = boxes[keep], cls[keep], conf[keep]
            if fp:
                fb = torch.rand(fp, 4, generator=g) * torch.tensor([w, h, w / 2, h / 2]) + torch.tensor([0, 0, 4, 4])
                boxes = torch.cat((boxes, fb))
                cls = torch.cat((cls, torch.randint(0, nc, (fp,), generator=g)))
                conf = torch.cat((conf, torch.rand(fp, generator=g) * 0.6))
            scores = torch.zeros(len(boxes), nc)
            scores[torch.arange(len(boxes)), cls] = conf
            per_img.append(torch.cat((boxes, scores), 1).T)
        a = max(max(p.shape[1] for p in per_img), 1)
        y = torch.zeros(b, 4 + nc, a)
        for i, p in enumerate(per_img):
            y[i, :, :p.shape[1]] = p
        outs.append(y)
    return outs


def test_perfect_predictions_score_one(dataset, tmp_path):
    root, _ = dataset
    fake = ReplayModel(_predictions_from_targets(_loader(root), len(NAMES)))
    out = validate(fake, _loader(root), names=NAMES, save_dir=tmp_path, plots=True)
    assert out.map50 == pytest.approx(1.0) and out.map == pytest.approx(1.0)
    assert out.mp == pytest.approx(1.0) and out.mr == pytest.approx(1.0)
    assert np.allclose(out.maps, 1.0)
    cm = out.confusion_matrix
    assert cm[:-1, :-1].trace() == cm.sum() == out.nt.sum()


def test_save_json_agrees_with_pycocotools(dataset, tmp_path):
    pytest.importorskip("pycocotools")
    root, yaml_file = dataset
    gt_json = coco.main(["--data", str(yaml_file), "--split", "val", "--out", str(tmp_path / "gt.json")])
    fake = ReplayModel(_predictions_from_targets(_loader(root), len(NAMES), noise=0.06, fp=6, miss=0.15, seed=1))
    out = validate(fake, _loader(root), names=NAMES, save_dir=tmp_path, plots=False, save_json=True, max_det=100,
                   anno_json=gt_json)
    dets = json.loads((tmp_path / "predictions.json").read_text())
    gt = json.loads(Path(gt_json).read_text())
    img_ids = {im["id"] for im in gt["images"]}
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    assert all(d["image_id"] in img_ids and len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in dets)
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}
    assert 0.2 < out.map_ours < 0.95  # a non-trivial case
    assert out.map == pytest.approx(out.map_ours, abs=0.002)
    assert out.map50 == pytest.approx(out.map50_ours, abs=0.002)

    # 'auto' writes the same GT from the loader's dataset (ids independent of the rect order)
    fake = ReplayModel(_predictions_from_targets(_loader(root), len(NAMES), noise=0.06, fp=6, miss=0.15, seed=1))
    auto = validate(fake, _loader(root), names=NAMES, save_dir=tmp_path / "auto", plots=False, save_json=True,
                    max_det=100, anno_json="auto")
    assert auto.map == pytest.approx(out.map, abs=1e-9)


def test_tta_maps_boxes_back_to_input_pixels():
    from utils.engine.tta import forward_augment

    im = torch.zeros(1, 3, 96, 128)
    im[..., 20:60, 30:90] = 1.0  # one bright box: x 30..90, y 20..60

    def detect_bright(x):  # a "model" that boxes the bright pixels of whatever it is given
        ys, xs = torch.nonzero(x[0, 0] > 0.5, as_tuple=True)
        x1, y1, x2, y2 = xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1
        y = torch.tensor([[(x1 + x2) / 2], [(y1 + y2) / 2], [x2 - x1], [y2 - y1], [1.0]])
        return y[None], None

    y, _ = forward_augment(detect_bright, im, stride=32)
    assert y.shape == (1, 5, 3)
    ref = torch.tensor([60.0, 40.0, 60.0, 40.0])
    for a in range(3):
        torch.testing.assert_close(y[0, :4, a], ref, atol=1.5, rtol=0)


def test_ensemble_concatenates_before_nms(model):
    from utils.engine.backend import Backend
    from utils.engine.validator import Ensemble

    one = Backend(model, device="cpu")
    ens = Ensemble([one, Backend(model, device="cpu")])
    x = torch.rand(2, 3, 64, 96)
    y1, y2 = one(x), ens(x)
    assert y2.shape[2] == 2 * y1.shape[2] and ens.nc == len(NAMES) and ens.stride == 32
    d1 = non_max_suppression(y1, 0.002, 0.7, multi_label=True)
    d2 = non_max_suppression(y2, 0.002, 0.7, multi_label=True)
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b)  # identical members: the duplicates are suppressed


def test_select_device():
    from utils.torch_utils import select_device

    assert select_device("cpu").type == "cpu"
    assert select_device("").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError):
        select_device("gpu please")
    if not torch.cuda.is_available():
        for spec in ("0", "0,1", "cuda:0", "cuda"):
            with pytest.raises(UserError, match="CUDA"):
                select_device(spec)
