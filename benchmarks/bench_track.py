"""Tracking overhead: ByteTracker cost per frame next to detection cost per frame, measured interleaved.

Why: `--track` should add little to detection. Each frame of a generated 640x360 clip is first detected
(Predictor.predict: letterbox + forward + NMS) and then the tracking step `--track` adds
(SequenceTracker.step: Kalman predict/update, two-stage assignment, Result subset) is run on a synthetic
scene with a known number of objects, because an untrained detector's boxes say nothing about the object
counts a real video has. Both are timed on the same frames in one loop, so machine load hits them equally;
the ratio tracker/detection is printed per object count. Models are seed-initialised (no weights needed).

Usage:
    python benchmarks/bench_track.py [--model yolov9-t-MMQA] [--imgsz 640] [--frames 30]
        [--objects 10,50,200] [--threads 1] [--device cpu] [--md benchmarks/results/bench_track.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_detect import make_video  # noqa: E402
from benchmarks.harness import write_md  # noqa: E402

W, H = 640, 360


def synthetic_scene(n_obj: int, frames: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per frame (boxes xyxy, scores, classes): n_obj boxes moving at constant velocity (bouncing off the
    borders), 2 % jitter, 5 % missed, 10 % low-score, plus n_obj / 10 random false positives."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(15, 60, (n_obj, 2))
    pos = rng.uniform(0, 1, (n_obj, 2)) * (np.array([W, H]) - size)
    vel = rng.normal(0, 3, (n_obj, 2))
    cls = rng.integers(0, 3, n_obj)
    out = []
    for _ in range(frames):
        pos += vel
        hit = (pos < 0) | (pos + size > [W, H])
        vel[hit] *= -1
        pos = np.clip(pos, 0, np.array([W, H]) - size)
        keep = rng.random(n_obj) > 0.05
        k = int(keep.sum())
        c = pos[keep] + size[keep] / 2 + rng.normal(0, 0.02, (k, 2)) * size[keep]
        wh = size[keep] * (1 + rng.normal(0, 0.03, (k, 2)))
        boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
        scores = np.where(rng.random(k) < 0.1, rng.uniform(0.15, 0.45, k), rng.uniform(0.6, 0.95, k))
        n_fp = max(n_obj // 10, 1)
        fp_wh = rng.uniform(15, 60, (n_fp, 2))
        fp_xy = rng.uniform(0, 1, (n_fp, 2)) * (np.array([W, H]) - fp_wh)
        boxes = np.concatenate([boxes, np.concatenate([fp_xy, fp_xy + fp_wh], 1)])
        scores = np.concatenate([scores, rng.uniform(0.1, 0.7, n_fp)])
        classes = np.concatenate([cls[keep], rng.integers(0, 3, n_fp)])
        out.append((boxes.astype(np.float32), scores.astype(np.float32), classes))
    return out


def bench(model_cfg: str, imgsz: int, frames: int, objects: list[int], device: str, nc: int) -> list[dict]:
    from models.yolo import DetectionModel
    from utils.engine.predict.predictor import Predictor, Result
    from utils.engine.sources import LoadSources
    from utils.engine.track.sequence import SequenceTracker
    torch.manual_seed(0)
    pred = Predictor(DetectionModel(f"{model_cfg}.yaml", nc=nc).eval().fuse(), device=device, imgsz=imgsz)
    pred.warmup()
    scenes = {n: synthetic_scene(n, frames, seed=n) for n in objects}
    seqs = {n: SequenceTracker(None) for n in objects}
    det_ms: list[float] = []
    trk_ms: dict[int, list[float]] = {n: [] for n in objects}
    tracked: dict[int, int] = {n: 0 for n in objects}
    with tempfile.TemporaryDirectory(prefix="bench_track_") as tmp:
        video = make_video(Path(tmp) / "clip.mp4", frames, W, H)
        for i, f in enumerate(LoadSources(video)):
            t0 = time.perf_counter()
            r = pred.predict(f.im0, path=f.path)
            det_ms.append((time.perf_counter() - t0) * 1e3)
            for n in objects:
                boxes, scores, cls = scenes[n][i]
                fake = Result(boxes, scores, cls, ["x"] * len(boxes), (H, W), r.input_shape, f.path)
                t0 = time.perf_counter()
                out = seqs[n].step(f, fake)
                trk_ms[n].append((time.perf_counter() - t0) * 1e3)
                tracked[n] += len(out)
    skip = min(2, len(det_ms) - 1)  # first frames: allocator / tracker start-up
    det = float(np.median(det_ms[skip:]))
    rows = []
    for n in objects:
        trk = float(np.median(trk_ms[n][skip:]))
        rows.append({"objects": n, "dets_per_frame": float(np.mean([len(s[1]) for s in scenes[n]])),
                     "tracked_per_frame": tracked[n] / len(det_ms), "tracker_ms": trk,
                     "tracker_p90_ms": float(np.percentile(trk_ms[n][skip:], 90)), "detect_ms": det,
                     "ratio": trk / det})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| objects | detections/frame | tracked/frame | tracker ms (median) | tracker ms (p90) | "
           "detection ms (median) | tracker / detection |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['objects']} | {r['dets_per_frame']:.1f} | {r['tracked_per_frame']:.1f} | "
                   f"{r['tracker_ms']:.2f} | {r['tracker_p90_ms']:.2f} | {r['detect_ms']:.1f} | {r['ratio']:.1%} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov9-t-MMQA", help="model YAML name for the detection side")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--objects", default="10,50,200", help="comma-separated object counts of the synthetic scenes")
    ap.add_argument("--nc", type=int, default=80)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave default)")
    ap.add_argument("--md", type=str, default="", help="also write the result to this markdown file")
    opt = ap.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    objects = [int(v) for v in opt.objects.split(",") if v.strip()]
    rows = bench(opt.model, opt.imgsz, opt.frames, objects, opt.device, opt.nc)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    text = (f"# Tracking overhead: ByteTracker step vs detection, per frame\n\n"
            f"{opt.model} (seed-initialised, fused) at imgsz {opt.imgsz} on a generated {W}x{H} clip, {opt.frames} "
            f"frames, device {opt.device}, torch {torch.__version__}, {platform.machine()}, torch threads "
            f"{torch.get_num_threads()}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end "
            f"(shared machine). Tracker: default data/trackers/bytetrack.yaml settings, fed synthetic scenes "
            f"(see the script); both timed on the same frames in one loop, first 2 frames skipped.\n\n{table(rows)}\n")
    print(text)
    if opt.md:
        write_md(opt.md, text)
    return rows


if __name__ == "__main__":
    main()
