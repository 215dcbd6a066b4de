"""The validation metric step at COCO size against pycocotools on the same detections. Not a test.

5,000 images (default), 80 classes, 1-20 ground-truth boxes per image, up to 300 detections per image (jittered
copies of the objects, some with a wrong class, and background boxes; at most 100 per image and class, COCOeval's
cap), scores uniform. Ours: what the validator runs per image (matching at 10 IoU thresholds, the confusion
matrix) and at the end (AP per class); pycocotools: loadRes + evaluate + accumulate + summarize on the same
detections (building its JSON-like input is not timed). Both must give the same mAP50 and mAP50-95.

    python benchmarks/bench_metrics.py [--images 5000] [--max-det 300] [--rounds 1] [--base /old/checkout]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_data(n_img: int, max_det: int, nc: int = 80, seed: int = 0):
    """[(w, h, gt [m, 5] cls x1 y1 x2 y2 px, det [n, 6] x1 y1 x2 y2 conf cls px)] for n_img images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_img):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        m = int(rng.integers(1, 21))
        wh = rng.uniform(0.03, 0.5, (m, 2)) * (w, h)
        xy = rng.uniform(0, 1, (m, 2)) * ((w, h) - wh)
        gt = np.concatenate((rng.integers(0, nc, (m, 1)), xy, xy + wh), 1)
        k = int(rng.integers(max_det // 3, max_det + 1))
        src = rng.integers(0, m, k)
        jitter = rng.normal(0, 0.12, (k, 4)) * np.repeat(wh[src], 2, 1)
        boxes = gt[src, 1:] + jitter
        bg = rng.random(k) < 0.4  # background boxes anywhere
        bw = rng.uniform(8, 200, (k, 2))
        bxy = rng.uniform(0, 1, (k, 2)) * ((w, h) - bw)
        boxes[bg] = np.concatenate((bxy, bxy + bw), 1)[bg]
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # COCOeval ignores negative-area boxes
        cls = np.where(rng.random(k) < 0.7, gt[src, 0], rng.integers(0, nc, k))
        det = np.concatenate((boxes, rng.random((k, 1)), cls[:, None]), 1)
        keep = np.concatenate([np.flatnonzero(det[:, 5] == c)[:100] for c in np.unique(det[:, 5])])  # COCOeval cap
        out.append((w, h, gt.astype(np.float32), det[np.sort(keep)].astype(np.float32)))
    return out


def ours(data, nc: int = 80) -> tuple[float, float, float, float]:
    """(seconds, CPU seconds, mAP50, mAP50-95): per image matching + confusion matrix as the validator does, then AP."""
    import torch
    from utils.engine.validator import _Stats, match_cpu
    from utils.metrics import ConfusionMatrix, ap_per_class
    tensors = [(torch.from_numpy(d).float(), torch.from_numpy(g).float()) for _, _, g, d in data]
    iouv = torch.linspace(0.5, 0.95, 10)
    t0, c0 = time.perf_counter(), time.process_time()
    stats, cm = _Stats(nc), ConfusionMatrix(nc=nc)
    for det, gt in tensors:
        cm.process_batch(det, gt)
        stats.add(match_cpu(det, gt, iouv), det[:, 4], det[:, 5], gt[:, 0])
    res = ap_per_class(*stats.arrays())
    return time.perf_counter() - t0, time.process_time() - c0, res.map50, res.map


def coco(data) -> tuple[float, float, float, float]:
    """(seconds, CPU seconds, mAP50, mAP50-95) from pycocotools on the same boxes (timed from loadRes to summarize)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    images, anns, dets = [], [], []
    for i, (w, h, gt, det) in enumerate(data):
        images.append({"id": i, "width": w, "height": h})
        for c, x1, y1, x2, y2 in gt.tolist():
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for x1, y1, x2, y2, s, c in det.tolist():
            dets.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(80)]}
        gt.createIndex()
        t0, c0 = time.perf_counter(), time.process_time()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - t0, time.process_time() - c0, float(ev.stats[1]), float(ev.stats[0])


def _worker(tree: str, images: int, max_det: int, which: str) -> None:
    sys.path.insert(0, tree)
    data = make_data(images, max_det)
    t, cpu, m50, m = ours(data) if which == "ours" else coco(data)
    print("RESULT " + json.dumps({"s": t, "cpu_s": cpu, "map50": m50, "map": m}))


def run(tree: str, images: int, max_det: int, which: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--_worker", tree, str(images), str(max_det), which],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(r.stderr[-2000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (fresh process each)")
    p.add_argument("--base", default="", help="an older checkout to time side by side")
    p.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    opt = p.parse_args()
    if opt._worker:
        tree, images, max_det, which = opt._worker
        return _worker(tree, int(images), int(max_det), which)
    here = str(Path(__file__).resolve().parents[1])
    sides = [("pycocotools", here, "coco"), ("ours", here, "ours")]
    if opt.base:
        sides.insert(1, ("ours, base", opt.base, "ours"))
    data = make_data(opt.images, opt.max_det)
    n_det = sum(len(d) for *_, d in data)
    print(f"{opt.images} images, {n_det} detections ({n_det / opt.images:.0f}/image), "
          f"{sum(len(g) for _, _, g, _ in data)} objects; {platform.processor() or platform.machine()}")
    times = {name: [] for name, *_ in sides}
    cpus = {name: [] for name, *_ in sides}
    maps = {}
    for _ in range(opt.rounds):
        for name, tree, which in sides:
            r = run(tree, opt.images, opt.max_det, which)
            times[name].append(r["s"])
            cpus[name].append(r["cpu_s"])
            maps[name] = (r["map50"], r["map"])
            print(f"  {name:<12} {r['s']:8.2f} s ({r['cpu_s']:.2f} CPU s)  mAP50 {r['map50']:.6f}  "
                  f"mAP50-95 {r['map']:.6f}", flush=True)
    best = {k: min(v) for k, v in times.items()}
    cpu = {k: min(v) for k, v in cpus.items()}
    print(f"\nload average {os.getloadavg()[0]:.1f}\n")
    print(f"| metric step | wall s (best of {opt.rounds}) | CPU s | pycocotools / this (CPU) | mAP50 | mAP50-95 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in times:
        print(f"| {name} | {best[name]:.2f} | {cpu[name]:.2f} | {cpu['pycocotools'] / cpu[name]:.1f}x | "
              f"{maps[name][0]:.6f} | {maps[name][1]:.6f} |")


if __name__ == "__main__":
    main()
