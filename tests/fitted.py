"""A tiny detector fitted to a few generated images, and the check that two formats detect alike: what every
deployment-format test compares against (the fitted model's boxes score > 0.9, so format differences show)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

from helpers import SHAPE_NAMES

IMGSZ = 64


def _fit_tiny(model: nn.Module, imgs: torch.Tensor, targets: torch.Tensor, steps: int = 40) -> nn.Module:
    """AdamW steps on one batch, then BatchNorm statistics taken from that batch (so eval = fitted behaviour)."""
    from utils.loss import DetectionLoss
    loss_fn = DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    opt = torch.optim.AdamW(model.parameters(), lr=0.003)
    model.train()
    for _ in range(steps):
        loss, _ = loss_fn(model(imgs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative: one pass sets the batch's statistics
        model(imgs)
    return model.eval()


def fitted_checkpoint(d: Path) -> tuple[Path, str, list[str]]:
    """gelan-t fitted on 4 generated 96x96 images with one or two large shapes each (detection scores > 0.9):
    (checkpoint, data YAML whose val split is the training images, the generated image files)."""
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    from utils.data import create_dataloader, generate_shapes, load_data_config
    generate_shapes(d / "ds", n_train=4, n_val=2, seed=5, max_objects=2, empty_prob=0.0, obj_size=(0.35, 0.6),
                    sizes=[(96, 96)])
    data = d / "tiny.yaml"
    # val = the training images: the model is fitted to them (the generated val images are for detection only)
    data.write_text(yaml.safe_dump({"path": str(d / "ds"), "train": "images/train", "val": "images/train",
                                    "names": SHAPE_NAMES}))
    cfg = load_data_config(data)
    loader, _ = create_dataloader(cfg.train, IMGSZ, 4, 32, workers=0, names=cfg.names, nc=cfg.nc)
    imgs, targets, paths, _ = next(iter(loader))
    torch.manual_seed(0)
    model = _fit_tiny(DetectionModel("gelan-t.yaml", nc=len(SHAPE_NAMES)), imgs.float() / 255, targets)
    w = save_checkpoint(make_checkpoint(model, names=SHAPE_NAMES, opt={"data": str(data)}), d / "tiny.pt")
    images = sorted(str(p) for p in (d / "ds" / "images").rglob("*.jpg"))
    return w, str(data), images


def detect(weights, images, half=False, imgsz=IMGSZ):
    from utils.engine.predict.predictor import Predictor
    p = Predictor(str(weights), device="cpu", imgsz=imgsz, conf_thres=0.25, half=half)
    return [p.predict(f) for f in images]

def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def assert_matches(ref, got, min_iou: float, score_tol: float, exact_count: bool, conf: float = 0.25) -> None:
    """Each box of one side scoring clearly above the threshold (conf + score_tol) has a same-class box on the
    other side with IoU >= min_iou and score within score_tol; boxes within score_tol of the threshold may
    appear on one side only."""
    for r, g in zip(ref, got):
        if exact_count:
            assert len(g) == len(r), (r.path, r.summary(), g.summary())
        for a, b in ((r, g), (g, r)):
            for box, score, cls in zip(a.boxes, a.scores, a.class_ids):
                if score < conf + score_tol:
                    continue
                same = b.class_ids == cls
                assert same.any(), (r.path, r.summary(), g.summary())
                overlap = iou(box[None], b.boxes[same])[0]
                k = int(overlap.argmax())
                assert overlap[k] >= min_iou and abs(b.scores[same][k] - score) <= score_tol, (r.path, overlap[k], score)


# tolerances: fp32 formats differ from PyTorch by float reassociation only (~1e-5 in the outputs: exact box
# counts). bf16 keeps 8 significant bits through the backbone (boxes decoded in fp32): measured on this fitted
# model min matched IoU 0.994 and max score change 0.005 (.pt autocast and OpenVINO bf16). INT8 (256 levels per
# activation tensor, per-channel weights): measured min IoU 0.987 and max score change 0.008 (ONNX Runtime and
# NNCF). The checks allow about 3-4x the measured box error (1 - IoU) and score change, for other CPUs' kernels
# and runtime versions; boxes within score_tol of the confidence threshold may appear on one side only.
FP32 = dict(min_iou=0.999, score_tol=1e-3, exact_count=True)
BF16_TOL = dict(min_iou=0.975, score_tol=0.02, exact_count=False)
INT8_TOL = dict(min_iou=0.95, score_tol=0.03, exact_count=False)




def assert_tracks_match(pt: Path, other: Path, data: str, project: Path) -> None:
    """detect_dual.py --track over the fitted training images with the .pt and with `other`: the same tracks
    (class, track id) per image and boxes within 1e-3 (normalised xywh of --save-txt)."""
    import detect_dual
    from utils.engine.predict.predictor import run
    src = Path(data).parent / "ds" / "images" / "train"
    rows = []
    for i, weights in enumerate((pt, other)):
        opt = detect_dual.parse_opt(["--weights", str(weights), "--source", str(src), "--track", "--save-txt",
                                     "--imgsz", str(IMGSZ), "--device", "cpu", "--project", str(project),
                                     "--name", f"track{i}"])
        d = run(opt)
        rows.append([sorted(map(str.split, f.read_text().splitlines())) for f in sorted((d / "labels").glob("*.txt"))])
    assert len(rows[0]) >= 2 and len(rows[1]) == len(rows[0])
    for a, b in zip(*rows):
        assert [(r[0], r[-1]) for r in a] == [(r[0], r[-1]) for r in b]
        np.testing.assert_allclose(np.array([r[1:5] for r in b], float), np.array([r[1:5] for r in a], float),
                                   atol=1e-3)
