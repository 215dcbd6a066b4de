"""Memory layout on CPU: NCHW (contiguous) vs NHWC (channels_last) for training steps and inference.

Why: oneDNN's CPU convolutions work in NHWC; an NCHW model pays a layout reorder around every
convolution. The trainer and the shared model loader therefore use channels_last on CPU as on CUDA;
this benchmark is the measurement behind that choice. Both layouts run in one process, interleaved
repeat by repeat, so load on a shared machine hits both alike; the ratio is what to read.

Usage:
    python benchmarks/bench_layout.py [--models yolov9-t-MMQA,gelan-t] [--repeats 5]
        [--md benchmarks/results/layout.md]
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import random_targets, write_md  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.loss import DetectionLoss  # noqa: E402

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def _train_step(model, loss_fn, x, targets) -> None:
    loss, _ = loss_fn(model(x), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _infer(model, x) -> None:
    with torch.no_grad():
        model(x)


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def measure(cfg: str, mode: str, batch: int, imgsz: int, repeats: int, iters: int) -> dict:
    """Median seconds per call for each layout; the same weights and input in both."""
    torch.manual_seed(0)
    base = DetectionModel(f"models/detect/{cfg}.yaml", nc=5)
    x0 = torch.rand(batch, 3, imgsz, imgsz)
    calls = {}
    for name, fmt in LAYOUTS.items():
        m, x = copy.deepcopy(base).to(memory_format=fmt), x0.contiguous(memory_format=fmt)
        if mode == "train":
            m.train()
            calls[name] = functools.partial(_train_step, m, DetectionLoss(m), x, random_targets(batch, 5))
        else:
            calls[name] = functools.partial(_infer, m.fuse().eval(), x)
    for fn in calls.values():  # warm-up: oneDNN primitive caches, allocator
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(_time(fn, iters))
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="yolov9-t-MMQA,gelan-t,gelan-s")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--md", default="")
    a = ap.parse_args(argv)
    cases = [("train", 16, 128, 2), ("infer", 1, 320, 5), ("infer", 1, 640, 2), ("infer", 8, 128, 5)]
    rows = ["| model | mode | batch x px | NCHW ms | NHWC ms | NCHW / NHWC |", "|---|---|---|---|---|---|"]
    for cfg in a.models.split(","):
        for mode, batch, imgsz, iters in cases:
            r = measure(cfg, mode, batch, imgsz, a.repeats, iters)
            row = (f"| {cfg} | {mode} | {batch} x {imgsz} | {r['NCHW'] * 1e3:.1f} | {r['NHWC'] * 1e3:.1f} | "
                   f"{r['NCHW'] / r['NHWC']:.2f}x |")
            rows.append(row)
            print(row, flush=True)
    text = (f"# CPU memory layout: NCHW vs channels_last (NHWC)\n\n{torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, median of {a.repeats} interleaved repeats; train = forward + DetectionLoss + "
            f"backward, infer = fused eval forward.\n\n" + "\n".join(rows) + "\n")
    if a.md:
        print(f"wrote {write_md(a.md, text)}")


if __name__ == "__main__":
    main()
