"""Training data loader: epoch-start gap with per-epoch vs persistent workers, and images/s (mosaic).

Why: with per-epoch workers every epoch begins by forking/starting N processes, re-running worker init and
refilling the prefetch queue while the GPU waits; persistent workers (utils/data/loader.py) only refill.
The gap = time from iter(loader) to the first batch, for epochs after the first (the first is start-up
in both cases); close_mosaic() is called half way so the measurement also covers a live state change.
Loader img/s next to training img/s: benchmarks/bench_gpu.py --speed (via bench_data.bench).

    python benchmarks/bench_loader.py [--data data/shapes.yaml] [--images 64] [--imgsz 640] [--workers 2]
        [--epochs 4] [--batch-size 16] [--md benchmarks/results/loader.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.harness import write_md  # noqa: E402
from utils.data import create_dataloader, load_data_config  # noqa: E402


def _subset_list(train, n: int, folder: Path) -> Path:
    """A .txt image list with the first n training images (short epochs, same images)."""
    from utils.data.verify import IMG_FORMATS
    roots = train if isinstance(train, (list, tuple)) else [train]
    files = sorted(str(p) for r in roots for p in Path(r).rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)[:n]
    out = folder / "subset.txt"
    out.write_text("\n".join(files) + "\n")
    return out


def epoch_gaps(source, nc: int, imgsz: int, workers: int, batch_size: int, epochs: int, hyp: dict,
               persistent: bool) -> dict:
    """Seconds from iter(loader) to the first batch per epoch, and each epoch's images/s."""
    loader, ds = create_dataloader(source, imgsz, batch_size, 32, hyp=hyp, augment=True, workers=workers,
                                   shuffle=True, nc=nc, persistent=persistent)
    gaps, rates = [], []
    for e in range(epochs):
        if e == epochs // 2:
            ds.close_mosaic()
        t0 = time.perf_counter()
        it = iter(loader)
        n = len(next(it)[0])
        gaps.append(time.perf_counter() - t0)
        for b in it:
            n += len(b[0])
        rates.append(n / (time.perf_counter() - t0))
    return {"gaps": gaps, "img_s": rates}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml"))
    p.add_argument("--images", type=int, default=64, help="training images per epoch (first N of the split)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--md", default="", help="write the table as markdown")
    opt = p.parse_args(argv)
    data = load_data_config(opt.data)
    hyp = yaml.safe_load(Path(opt.hyp).read_text())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        src = _subset_list(data.train, opt.images, Path(tmp))
        res = {}
        for persistent in (False, True):  # interleave twice so machine noise hits both alike
            for _ in range(2):
                r = epoch_gaps(src, data.nc, opt.imgsz, opt.workers, opt.batch_size, opt.epochs, hyp, persistent)
                best = res.get(persistent)
                if best is None or statistics.mean(r["gaps"][1:]) < statistics.mean(best["gaps"][1:]):
                    res[persistent] = r
    old, new = (statistics.mean(res[k]["gaps"][1:]) for k in (False, True))
    old_r, new_r = (statistics.mean(res[k]["img_s"][1:]) for k in (False, True))
    lines = [f"Training loader at {opt.imgsz} px (mosaic {hyp.get('mosaic')}, close_mosaic half way), "
             f"{opt.images} images/epoch, batch {opt.batch_size}, {opt.workers} workers, {opt.epochs} epochs, "
             f"{os.cpu_count()} CPUs, load average {load:.2f}; best of 2 runs each", "",
             "| workers | epoch-start gap s (epochs 2..) | epoch img/s (epochs 2..) | gaps per epoch s |",
             "|---|---:|---:|---|"]
    for k, name in ((False, "per-epoch (old)"), (True, "persistent")):
        g = res[k]["gaps"]
        lines.append(f"| {name} | {statistics.mean(g[1:]):.3f} | {statistics.mean(res[k]['img_s'][1:]):.1f} | "
                     + ", ".join(f"{x:.3f}" for x in g) + " |")
    lines += ["", f"Epoch-start gap ratio old / persistent: {old / new:.2f}x; epoch img/s ratio "
                  f"persistent / old: {new_r / old_r:.2f}x"]
    text = "\n".join(lines)
    print(text)
    if opt.md:
        write_md(opt.md, text + "\n")
    return {"gap_old": old, "gap_new": new}


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
