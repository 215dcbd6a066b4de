"""Detection throughput on a video: frames/s end to end (decode + letterbox + forward + NMS), batch 1, CPU.

Why: model latency alone hides what a user of detect_dual.py sees; this runs the real inference path
(LoadSources -> Predictor.predict) on a generated 640x360 clip and splits the per-frame time into
pre-process, inference and NMS. Models are seed-initialised (no trained weights needed), fused like the
Backend fuses a checkpoint; with untrained heads few boxes pass the threshold, so NMS time is a lower bound.
On a shared machine the load average is printed: compare rows of one run only.

Usage:
    python benchmarks/bench_detect.py [--models yolov9-t-MMQA,yolov9-c,yolov9-c-MMQA-P4P5] [--frames 10]
        [--imgsz 640] [--threads N] [--device cpu] [--md benchmarks/results/detect.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_MODELS = ["yolov9-t-MMQA", "yolov9-c", "yolov9-c-MMQA-P4P5"]


def make_video(path: Path, frames: int, w: int = 640, h: int = 360, fps: float = 25.0) -> Path:
    """A moving-shapes clip, written frame by frame (mp4v)."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    rng = np.random.default_rng(0)
    bg = rng.integers(40, 120, (h, w, 3), dtype=np.uint8)
    for i in range(frames):
        im = bg.copy()
        cv2.circle(im, (40 + 20 * i % (w - 80), h // 2), 30, (0, 200, 255), -1)
        cv2.rectangle(im, (w - 120 - 10 * i % 200, 60), (w - 40 - 10 * i % 200, 140), (255, 80, 0), -1)
        vw.write(im)
    vw.release()
    return path


def bench_model(cfg: str, video: Path, imgsz: int, device: str, nc: int) -> dict:
    from models.yolo import DetectionModel
    from utils.engine.predictor import Predictor
    from utils.engine.sources import LoadSources
    torch.manual_seed(0)
    model = DetectionModel(f"{cfg}.yaml", nc=nc).eval().fuse()
    params = sum(p.numel() for p in model.parameters())
    pred = Predictor(model, device=device, imgsz=imgsz)
    pred.warmup()
    first = next(iter(LoadSources(video)))
    pred.predict(first.im0)  # first real frame also warms allocator caches
    pred.dt, pred.seen = [0.0, 0.0, 0.0], 0
    shape = None
    t0 = time.perf_counter()
    for f in LoadSources(video):
        shape = pred.predict(f.im0).input_shape
    wall = time.perf_counter() - t0
    pre, inf, nms = pred.speed()
    return {"model": cfg, "params_m": params / 1e6, "frames": pred.seen, "shape": f"{shape[0]}x{shape[1]}",
            "pre_ms": pre, "inf_ms": inf, "nms_ms": nms, "frame_ms": wall / max(pred.seen, 1) * 1e3,
            "fps": pred.seen / wall}


def table(rows: list[dict]) -> str:
    head = "| model | params (M) | frames | input | pre-process ms | inference ms | NMS ms | ms/frame (incl. decode) | FPS |"
    out = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['params_m']:.2f} | {r['frames']} | {r['shape']} | {r['pre_ms']:.1f} | "
                   f"{r['inf_ms']:.1f} | {r['nms_ms']:.1f} | {r['frame_ms']:.1f} | {r['fps']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated YAML names")
    ap.add_argument("--frames", type=int, default=10, help="frames in the generated 640x360 clip")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--nc", type=int, default=80, help="classes of the seed-initialised models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave default)")
    ap.add_argument("--md", type=str, default="", help="also write the table to this markdown file")
    opt = ap.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_detect_") as tmp:
        video = make_video(Path(tmp) / "clip.mp4", opt.frames)
        for cfg in [m.strip() for m in opt.models.split(",") if m.strip()]:
            print(f"benchmarking {cfg} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(cfg, video, opt.imgsz, opt.device, opt.nc))
    text = (f"Detection on a 640x360 clip, batch 1, device {opt.device}, imgsz {opt.imgsz}, "
            f"torch threads {torch.get_num_threads()}, load average {load:.2f}\n\n{table(rows)}")
    print(text)
    if opt.md:
        Path(opt.md).parent.mkdir(parents=True, exist_ok=True)
        Path(opt.md).write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
