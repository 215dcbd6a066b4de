"""Validation throughput: images/s end to end, and ms per image of pre-process, inference, NMS and metrics.

Runs the real validator (rect batches, pad 0.5, conf 0.001, multi-label NMS) on the bundled shapes val split
with the default yolov9-t-MMQA model (random init unless --weights). A random-init model gives few boxes,
so an extra row times NMS + metrics on dense synthetic predictions (as a trained model at conf 0.001 gives).
Not a test.

    python benchmarks/bench_val.py [--imgsz 320 640] [--images 64] [--batch-size 16] [--device cpu]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.yolo import DetectionModel  # noqa: E402
from utils.data import create_dataloader, load_data_config  # noqa: E402
from utils.data.verify import collect_image_files  # noqa: E402
from utils.engine.backend import Backend  # noqa: E402
from utils.engine.validator import validate  # noqa: E402
from utils.general import LOGGER, ROOT, cli  # noqa: E402
from utils.metrics import ap_per_class, match_predictions  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.torch_utils import select_device, time_sync  # noqa: E402


def dense_nms_and_metrics(nc: int, imgsz: int, n_img: int = 16,
                          anchors: int | None = None) -> tuple[float, float, float]:
    """(NMS ms/img, metrics ms/img, detections/img) on random dense predictions with ~10 GT per image."""
    g = torch.Generator().manual_seed(0)
    a = anchors or sum((imgsz // s) ** 2 for s in (8, 16, 32))
    xy = torch.rand(n_img, 2, a, generator=g) * imgsz
    wh = torch.rand(n_img, 2, a, generator=g) * imgsz / 4 + 4
    scores = torch.rand(n_img, nc, a, generator=g) ** 6  # mostly low, a long tail of high scores
    y = torch.cat((xy, wh, scores), 1)
    t0 = time_sync()
    dets = non_max_suppression(y, 0.001, 0.7, multi_label=True, max_det=300)
    t1 = time_sync()
    iouv = torch.linspace(0.5, 0.95, 10)
    stats = []
    for d in dets:
        gt_xy = torch.rand(10, 2, generator=g) * imgsz * 0.8
        gt = torch.cat((torch.randint(0, nc, (10, 1), generator=g).float(), gt_xy, gt_xy + 40), 1)
        stats.append((match_predictions(d, gt, iouv), d[:, 4], d[:, 5], gt[:, 0]))
    cat = [torch.cat(x, 0).numpy() for x in zip(*stats)]
    ap_per_class(*cat)
    t2 = time.time()
    return (t1 - t0) / n_img * 1e3, (t2 - t1) / n_img * 1e3, sum(len(d) for d in dets) / n_img


@cli
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"))
    p.add_argument("--cfg", default="yolov9-t-MMQA.yaml", help="model YAML (random init) unless --weights")
    p.add_argument("--weights", default="", help="a .pt checkpoint instead of a random-init model")
    p.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    p.add_argument("--images", type=int, default=64, help="first N val images (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="")
    opt = p.parse_args()

    device = select_device(opt.device)
    data = load_data_config(opt.data)
    files, _ = collect_image_files(data.val)
    files = files[:opt.images] if opt.images else files
    if opt.weights:
        model = Backend(opt.weights, device=device)
    else:
        torch.manual_seed(0)
        m = DetectionModel(opt.cfg, nc=data.nc)
        m.names = data.names
        model = Backend(m.fuse(), device=device)
    LOGGER.setLevel(logging.ERROR)  # keep the validator's table out of the benchmark output
    rows = []
    for sz in opt.imgsz:
        loader, _ = create_dataloader(files, sz, opt.batch_size, model.stride, pad=0.5, rect=True, workers=0,
                                      names=data.names, nc=data.nc)
        model.warmup((1, 3, sz, sz))
        t0 = time.perf_counter()
        r = validate(model, loader, names=data.names, plots=False, training=False)
        wall = time.perf_counter() - t0
        rows.append((f"val {sz}", r.seen / wall, *r.speed, r.metrics_ms))
        nms_ms, met_ms, ndet = dense_nms_and_metrics(data.nc, sz)
        rows.append((f"dense {sz} ({ndet:.0f} det/img)", float("nan"), float("nan"), float("nan"), nms_ms, met_ms))
    LOGGER.setLevel(logging.INFO)
    name = Path(opt.weights).name if opt.weights else f"{opt.cfg} (random init)"
    print(f"\n{name} on {device}, {len(files)} images of {Path(data['yaml_file']).name}, batch {opt.batch_size}")
    print(f"{'run':<28}{'images/s':>10}{'pre ms':>9}{'infer ms':>10}{'NMS ms':>9}{'metrics ms':>12}")
    for name, ips, pre, inf, nms, met in rows:
        cells = [f"{v:>{w}.1f}" if v == v else f"{'-':>{w}}" for v, w in ((ips, 10), (pre, 9), (inf, 10), (nms, 9))]
        print(f"{name:<28}{''.join(cells)}{met:>12.2f}")


if __name__ == "__main__":
    main()
