"""Detection throughput on a video: frames/s end to end (decode + letterbox + forward + NMS), batch 1, CPU.

Why: model latency alone hides what a user of detect_dual.py sees; this runs the real inference path
(LoadSources -> Predictor.predict) on a generated 640x360 clip and splits the per-frame time into
pre-process, inference and NMS. Models are seed-initialised (no trained weights needed), fused like the
Backend fuses a checkpoint; with untrained heads few boxes pass the threshold, so NMS time is a lower bound.
On a shared machine the load average is printed: compare rows of one run only.

--pipeline compares the whole detect_dual.py video path (decode -> infer -> draw -> encode .mp4), frames/s
end to end including model load, for each model: the old sequential path (threaded=False, .pt with its
auxiliary branch), background decode and encode threads always on (threaded I/O), and detect_dual.py's
default (background threads with 2+ usable cores, else inline; dual-head
models without their auxiliary branch), each for .pt and for the exported .onnx run by ONNX Runtime
(ORT_ENABLE_ALL). Modes are interleaved over --rounds and the best round of each is kept, so noise from other
jobs on a shared machine hits all modes alike; the ratio to the sequential path is printed.

Usage:
    python benchmarks/bench_detect.py [--models yolov9-t-MMQA,yolov9-c,yolov9-c-MMQA-P4P5] [--frames 10]
        [--imgsz 640] [--threads N] [--device cpu] [--md benchmarks/results/detect.md]
    python benchmarks/bench_detect.py --pipeline --models yolov9-t,gelan-t --frames 60 --threads 2 --rounds 3
        --md benchmarks/results/detect_pipeline.md
    python benchmarks/bench_detect.py --pipeline --vs-base /tmp/base --models gelan-t,yolov9-t-MMQA --frames 30
        --rounds 2 --md benchmarks/results/detect_vs_base.md   # /tmp/base: git worktree add /tmp/base <commit>
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

from benchmarks.harness import write_md  # noqa: E402

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
    from utils.engine.predict.predictor import Predictor
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


def export_pair(cfg: str, folder: Path, imgsz: tuple[int, int], nc: int) -> tuple[Path, Path]:
    """Seed-initialised checkpoint (.pt) of cfg and its fixed-size ONNX export at imgsz (h, w)."""
    import export
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = DetectionModel(f"{cfg}.yaml", nc=nc)
    pt = save_checkpoint(make_checkpoint(model, names=[f"c{i}" for i in range(nc)]), folder / f"{cfg}.pt")
    onnx = export.run(pt, include=("onnx",), imgsz=imgsz)["onnx"]
    return pt, onnx


def run_detect(weights: Path, video: Path, project: Path, threaded: bool | None, imgsz: tuple[int, int],
               main_only: bool = True, half: bool = False) -> float:
    """Seconds for one detect_dual.py run on the video (annotated .mp4 saved), model load included.

    threaded: False = sequential decode/encode, True = background threads, None = detect_dual.py's default
    (background threads with 2+ usable cores). main_only=False runs dual-head models as loaded (the old path).
    """
    import detect_dual
    from utils.engine.predict.predictor import run
    opt = detect_dual.parse_opt(["--weights", str(weights), "--source", str(video), "--project", str(project),
                                 "--name", "run", "--exist-ok", "--imgsz", *map(str, imgsz), "--device", "cpu"])
    opt.threaded, opt.main_only, opt.half = threaded, main_only, half
    t0 = time.perf_counter()
    run(opt)
    return time.perf_counter() - t0


def bench_pipeline(cfgs: list[str], frames: int, rounds: int, nc: int, tmp: Path) -> list[dict]:
    import logging
    logging.getLogger("yolo").setLevel(logging.WARNING)
    video = make_video(tmp / "clip.mp4", frames)
    shape = (384, 640)  # minimal-padding letterbox of 640x360 at 640 (stride 32); the ONNX export size
    rows = []
    for cfg in cfgs:
        pt, onnx = export_pair(cfg, tmp, shape, nc)
        modes = {"sequential .pt (old)": (pt, False, False), "threaded I/O .pt": (pt, True, True),
                 "default .pt": (pt, None, True), "sequential .onnx": (onnx, False, True),
                 "threaded I/O .onnx": (onnx, True, True), "default .onnx": (onnx, None, True)}
        best = {m: float("inf") for m in modes}
        run_detect(pt, video, tmp / "out", True, shape)  # warm caches (imports, codec, allocator)
        for r in range(rounds):
            for m, (w, th, main) in modes.items():
                print(f"{cfg} round {r + 1}/{rounds}: {m} ...", file=sys.stderr, flush=True)
                best[m] = min(best[m], run_detect(w, video, tmp / "out", th, shape, main))
        base = frames / best["sequential .pt (old)"]
        for m in modes:
            fps = frames / best[m]
            rows.append({"model": cfg, "mode": m, "fps": fps, "ms": best[m] / frames * 1e3, "ratio": fps / base})
    return rows


def bench_vs_base(cfgs: list[str], frames: int, rounds: int, nc: int, tmp: Path, base: Path) -> list[dict]:
    """Whole `python detect_dual.py` processes (start-up, model load, decode, infer, draw, encode .mp4) of the
    checkout at `base` and of this one, with their default settings, on the same clip and weights; trees
    interleaved per round, best round kept."""
    import subprocess
    video = make_video(tmp / "clip.mp4", frames)
    shape = (384, 640)
    trees = {"base": Path(base).resolve(), "new": ROOT}
    rows = []
    for cfg in cfgs:
        pt, onnx = export_pair(cfg, tmp, shape, nc)
        best = {}
        for r in range(rounds):
            for fmt, w in ((".pt", pt), (".onnx", onnx)):
                for tree, root in trees.items():
                    print(f"{cfg} round {r + 1}/{rounds}: {tree} {fmt} ...", file=sys.stderr, flush=True)
                    cmd = [sys.executable, str(root / "detect_dual.py"), "--weights", str(w), "--source", str(video),
                           "--project", str(tmp / tree), "--name", "run", "--exist-ok", "--imgsz", "640",
                           "--device", "cpu"]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, cwd=root, check=True, capture_output=True)
                    dt = time.perf_counter() - t0
                    best[(tree, fmt)] = min(best.get((tree, fmt), float("inf")), dt)
        for fmt in (".pt", ".onnx"):
            b, n = best[("base", fmt)], best[("new", fmt)]
            rows.append({"model": cfg, "mode": f"{fmt}: base {frames / b:.2f} fps, new {frames / n:.2f} fps",
                         "fps": frames / n, "ms": n / frames * 1e3, "ratio": b / n})
    return rows


def pipeline_table(rows: list[dict], ratio: str = "x sequential .pt") -> str:
    out = [f"| model | path | ms/frame | frames/s | {ratio} |", "|---|---|---:|---:|---:|"]
    out += [f"| {r['model']} | {r['mode']} | {r['ms']:.1f} | {r['fps']:.2f} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(out)


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
    ap.add_argument("--pipeline", action="store_true", help="compare the sequential / threaded / ONNX video paths")
    ap.add_argument("--rounds", type=int, default=3, help="--pipeline: interleaved rounds (best kept)")
    ap.add_argument("--vs-base", default="", help="--pipeline: instead compare whole detect_dual.py processes of "
                                                  "this checkout and the one at this path (e.g. a git worktree)")
    opt = ap.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if opt.pipeline:
        with tempfile.TemporaryDirectory(prefix="bench_detect_") as tmp:
            models = [m.strip() for m in opt.models.split(",") if m.strip()]
            rows = (bench_vs_base(models, opt.frames, opt.rounds, opt.nc, Path(tmp), Path(opt.vs_base)) if opt.vs_base
                    else bench_pipeline(models, opt.frames, opt.rounds, opt.nc, Path(tmp)))
        load2 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        what = (f"whole detect_dual.py processes, this checkout vs {opt.vs_base} (x = base time / new time)"
                if opt.vs_base else "detect_dual.py")
        text = (f"{what} on a generated 640x360 clip ({opt.frames} frames, mp4v in and out, input 384x640), "
                f"CPU, torch/ORT threads {torch.get_num_threads()}, {os.cpu_count()} cores, best of {opt.rounds} "
                f"interleaved rounds, model load included; load average {load:.2f} before, {load2:.2f} after\n\n"
                f"{pipeline_table(rows, 'x base' if opt.vs_base else 'x sequential .pt')}")
        print(text)
        if opt.md:
            write_md(opt.md, text + "\n")
        return rows
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
        write_md(opt.md, text + "\n")
    return rows


if __name__ == "__main__":
    main()
