"""Training-loader throughput (images/s) with mosaic at 640 and 320 px, for 0/1/2 workers. Not a test.

    python benchmarks/bench_data.py [--data data/shapes.yaml] [--batches 10] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from utils.data import create_dataloader, load_data_config  # noqa: E402
from utils.general import ROOT, cli  # noqa: E402


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


@cli
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml"))
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="+", default=[640, 320])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    opt = p.parse_args()
    data = load_data_config(opt.data)
    hyp = yaml.safe_load(Path(opt.hyp).read_text())
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
