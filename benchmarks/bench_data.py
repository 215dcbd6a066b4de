"""Training-loader throughput (images/s) with mosaic at 640 and 320 px, for 0/1/2 workers; with --polygons,
the per-image cost of polygon-aware augmentation next to box-only labels of the same objects. Not a test.

    python benchmarks/bench_data.py [--data data/shapes.yaml] [--batches 10] [--batch-size 16]
    python benchmarks/bench_data.py --polygons [--sizes 640 320] [--md benchmarks/results/bench_data_polygons.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from utils.data import YOLODataset, create_dataloader, load_data_config  # noqa: E402
from utils.general import LOGGER, ROOT, cli  # noqa: E402


def bench(train, nc: int, imgsz: int, workers: int, batch_size: int, batches: int, hyp: dict) -> float:
    loader, _ = create_dataloader(train, imgsz, batch_size, 32, hyp=hyp, augment=True, workers=workers,
                                  shuffle=True, nc=nc, prefix="")
    it = iter(loader)
    next(it)  # warm-up: worker start, first reads
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            imgs = next(it)[0]
        except StopIteration:
            it = iter(loader)
            imgs = next(it)[0]
        n += imgs.shape[0]
    return n / (time.perf_counter() - t0)


def make_polygon_sets(root: Path, n: int = 24, objects: int = 7, vertices: int = 24,
                      seed: int = 0) -> tuple[Path, Path]:
    """The same objects twice: as COCO-like polygon rows and as their box rows (images shared by hard link)."""
    rng = np.random.default_rng(seed)
    for kind in ("poly", "box"):
        (root / kind / "images").mkdir(parents=True)
        (root / kind / "labels").mkdir(parents=True)
    for i in range(n):
        w, h = 640, int(rng.integers(400, 640))
        img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        cv2.imwrite(str(root / "poly" / "images" / f"{i}.jpg"), img)
        (root / "box" / "images" / f"{i}.jpg").hardlink_to(root / "poly" / "images" / f"{i}.jpg")
        prow, brow = [], []
        for _ in range(objects):
            r = rng.uniform(0.04, 0.25)
            c = rng.uniform(r, 1 - r, 2)
            ang = np.sort(rng.uniform(0, 2 * np.pi, vertices))
            rad = r * rng.uniform(0.5, 1.0, vertices)
            pts = (c + rad[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)).clip(0, 1)
            cls = int(rng.integers(0, 5))
            prow.append(f"{cls} " + " ".join(f"{v:.5f}" for v in pts.ravel()))
            (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
            brow.append(f"{cls} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
        (root / "poly" / "labels" / f"{i}.txt").write_text("\n".join(prow) + "\n")
        (root / "box" / "labels" / f"{i}.txt").write_text("\n".join(brow) + "\n")
    return root / "box" / "images", root / "poly" / "images"


def bench_polygons(sizes: list[int], hyp: dict, items: int, rounds: int, md: str | None) -> None:
    """Per-image __getitem__ time (mosaic on, images cached in RAM so decoding does not hide the geometry),
    box-only vs polygon labels of the same objects, modes interleaved round by round on one machine."""
    torch.set_num_threads(1)
    modes = {"box-only": ("box", hyp.get("copy_paste", 0)), "polygons, no copy-paste": ("poly", 0.0),
             f"polygons, copy_paste {hyp.get('copy_paste', 0)}": ("poly", hyp.get("copy_paste", 0))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = dict(zip(("box", "poly"), make_polygon_sets(Path(tmp))))
        LOGGER.setLevel("WARNING")
        for sz in sizes:
            ds = {name: YOLODataset(sets[kind], imgsz=sz, augment=True, hyp={**hyp, "copy_paste": cp}, nc=5,
                                    cache="ram") for name, (kind, cp) in modes.items()}
            times: dict[str, list[float]] = {name: [] for name in modes}
            for r in range(rounds + 1):  # round 0 is a warm-up
                for name, d in ds.items():
                    random.seed(r)
                    np.random.seed(r)
                    t0 = time.perf_counter()
                    n_obj = sum(len(d[k % len(d)][1]) for k in range(items))
                    if r:
                        times[name].append((time.perf_counter() - t0) / items * 1e3)
                        times[name + "#obj"] = [n_obj / items]
            poly = ds["polygons, no copy-paste"]
            t0 = time.perf_counter()
            for k in range(len(poly)):
                poly.segments(k)
            reread_ms = (time.perf_counter() - t0) / len(poly) * 1e3
            base = statistics.median(times["box-only"])
            for name in modes:
                ms = statistics.median(times[name])
                rows.append((sz, name, ms, ms / base, times[name + "#obj"][0]))
            rows.append((sz, "(re-reading one polygon label file)", reread_ms, reread_ms / base, float("nan")))
    head = (f"| imgsz | labels | ms / image | x box-only | objects / image |\n|---|---|---|---|---|")
    lines = [f"| {sz} | {name} | {ms:.2f} | {ratio:.2f} | {'' if obj != obj else f'{obj:.1f}'} |"
             for sz, name, ms, ratio, obj in rows]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"YOLODataset.__getitem__ with mosaic (mosaic {hyp.get('mosaic')}, mixup {hyp.get('mixup')}, scale "
            f"{hyp.get('scale')}), RAM-cached images, 24 images with 7 objects each (24-vertex polygons, or their "
            f"boxes), median of {rounds} interleaved rounds of {items} items, 1 torch thread; "
            f"{platform.machine()}, {os.cpu_count()} CPUs (shared, 1-min load {load:.1f} at the end), torch "
            f"{torch.__version__}, OpenCV {cv2.__version__}. Polygon rows cost the label-file re-read per tile, "
            f"the outline warp and clip, and copy-paste (which also adds objects).")
    print(f"\n{note}\n\n{head}\n" + "\n".join(lines))
    if md:
        Path(md).write_text(f"# Polygon-aware augmentation cost\n\n{note}\n\n{head}\n" + "\n".join(lines) + "\n")
        print(f"\nwrote {md}")


@cli
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml"))
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="+", default=[640, 320])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--polygons", action="store_true", help="polygon-aware vs box-only augmentation cost per image")
    p.add_argument("--items", type=int, default=24, help="--polygons: items per round")
    p.add_argument("--rounds", type=int, default=5, help="--polygons: interleaved timing rounds")
    p.add_argument("--md", default=None, help="--polygons: also write the table to this markdown file")
    opt = p.parse_args()
    hyp = yaml.safe_load(Path(opt.hyp).read_text())
    if opt.polygons:
        return bench_polygons(opt.sizes, hyp, opt.items, opt.rounds, opt.md)
    data = load_data_config(opt.data)
    rows = []
    for sz in opt.sizes:
        for nw in opt.workers:
            rows.append((sz, nw, bench(data.train, data.nc, sz, nw, opt.batch_size, opt.batches, hyp)))
    print(f"\n{'imgsz':>6} {'workers':>8} {'images/s':>10}   (mosaic {hyp.get('mosaic')}, mixup {hyp.get('mixup')}, "
          f"batch {opt.batch_size})")
    for sz, nw, ips in rows:
        print(f"{sz:>6} {nw:>8} {ips:>10.1f}")


if __name__ == "__main__":
    main()
