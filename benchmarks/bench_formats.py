"""Deployment formats side by side on CPU: file size, batch-1 latency at two sizes, and mAP50-95 of each format
of the same trained checkpoint (one table per model).

Why: choosing a CPU format is a trade of speed against accuracy; both must come from the same checkpoint and
the same run. Formats: the FP32 .pt (PyTorch eager, main branch only, as detect_dual.py runs it), the .pt under
bf16 autocast (--half on a CPU with native bf16), TorchScript, ONNX Runtime FP32 and INT8 (QDQ), OpenVINO FP32
(f32 precision hint), OpenVINO with the bf16 hint (--half) and OpenVINO INT8 (NNCF). Latency: a fixed-size
export per size, every format timed in interleaved rounds (median of --iters calls per round, the best round
kept), so load from other jobs on a shared machine hits all formats alike; the ratio to the FP32 .pt is
printed. mAP50-95: each format exported at the checkpoint's training size and validated on the data's val split
by val_dual.py's code (run_validation). INT8 is calibrated on --calib-images training images.
--sensitivity adds, per model, the INT8 ONNX mAP50-95 with everything quantized, with only the detect head's
decoding kept in fp32, and with the default fp32 set (decoding and attention softmax/matmuls).
--video N [M]: frames/s of whole detect_dual.py runs on generated clips of N (and M) frames; with two lengths
also the steady-state frames/s (M - N) / (t_M - t_N), which cancels model load/compile and warm-up.
--formats limits the rows (the FP32 .pt is always kept as the reference), --sizes with no value skips the
latency table, --no-map skips the mAP exports (e.g. a quick video/thread comparison).

Usage:
    python benchmarks/bench_formats.py --weights gelan-t=runs/train/a/weights/best.pt,yolov9-t-MMQA=... \
        --data data/shapes.yaml [--sizes 320 640] [--threads 1] [--rounds 3] [--iters 5] [--sensitivity] [--video 30] \
        [--md benchmarks/results/formats.md]
    python benchmarks/bench_formats.py --weights gelan-t=... --sizes --no-map --video 20 200 --threads 2 \
        --formats "pt FP32" "openvino bf16 (--half)"
"""
from __future__ import annotations

import argparse
from importlib.util import find_spec
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import write_md  # noqa: E402

# format -> (export key, half): the export key names the file export.run wrote, half runs bf16 on CPU
FORMATS = {"pt FP32": ("pt", False), "pt bf16 (--half)": ("pt", True), "torchscript FP32": ("torchscript", False),
           "onnx FP32": ("onnx", False), "onnx INT8": ("onnx-int8", False), "openvino FP32": ("openvino", False),
           "openvino bf16 (--half)": ("openvino", True), "openvino INT8": ("openvino-int8", False)}


def export_all(pt: Path, folder: Path, size: int | tuple[int, int], data: str, calib: int) -> dict[str, Path]:
    """Every format of checkpoint `pt` at `size` (square, or (h, w)), written into `folder` (a copy of pt)."""
    from utils.deploy.export import run
    folder.mkdir(parents=True, exist_ok=True)
    w = Path(shutil.copy(pt, folder / "model.pt"))
    include = ("torchscript", "onnx") + (("openvino",) if find_spec("openvino") and find_spec("nncf") else ())
    return {"pt": w, **run(w, include=include, imgsz=size, int8=True, data=data, calib_images=calib)}



ONLY: set[str] = set()  # --formats: the rows to measure (empty: all)


def _formats(files: dict[str, Path]) -> dict[str, tuple[str, bool]]:
    """The formats exported here; bf16 rows only on a CPU with native bf16 (elsewhere they would repeat FP32)."""
    from utils.torch_utils import cpu_bf16_native
    bf16 = cpu_bf16_native()
    return {n: (k, h) for n, (k, h) in FORMATS.items()
            if k in files and (bf16 or not h) and (not ONLY or n in ONLY)}


def _size_mb(p: Path) -> float:
    return (sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size) / 1e6


def latency(files: dict[str, Path], size: int, rounds: int, iters: int) -> dict[str, float]:
    """Best-round median ms of one batch-1 forward (main branch) per format, formats interleaved per round."""
    from utils.engine.backend import Backend
    runners = {}
    for name, (key, half) in _formats(files).items():
        runners[name] = Backend(files[key], half=half, main_only=True)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for b in runners.values():
        for _ in range(2):
            b(x)  # warm-up: allocator, oneDNN primitive caches, OpenVINO's first inference
    best = {n: float("inf") for n in runners}
    for _ in range(rounds):
        for n, b in runners.items():
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                b(x)
                ts.append(time.perf_counter() - t0)
            best[n] = min(best[n], statistics.median(ts) * 1e3)
    return best


def accuracy(files: dict[str, Path], data: str, size: int, tmp: Path) -> dict[str, float]:
    """mAP50-95 of every format on the val split (val_dual.py's validation at the export size)."""
    from utils.engine.validator import run_validation
    out = {}
    for name, (key, half) in _formats(files).items():
        r = run_validation(weights=str(files[key]), data=data, imgsz=size, half=half, batch_size=16, workers=0,
                           plots=False, project=str(tmp / "val"), name="v", exist_ok=True, device="cpu")
        out[name] = r.map
    return out


def sensitivity(files: dict[str, Path], data: str, size: int, calib: int, tmp: Path) -> dict[str, float]:
    """INT8 ONNX mAP50-95 with all nodes quantized, with only the head's decoding in fp32, with the default set."""
    import onnx
    from utils.deploy.quantize import calibration_images, fp32_nodes, quantize_onnx
    from utils.engine.validator import run_validation
    names = [n.name for n in onnx.load(str(files["onnx"])).graph.node]
    keep = fp32_nodes(names)
    head = max(int(n.split("/")[1].split(".")[1]) for n in names if n.startswith("/model."))
    variants = {"all INT8": [], "head decoding fp32": [n for n in keep if n.startswith(f"/model.{head}/")],
                "decoding + attention fp32 (default)": keep}
    images = calibration_images(data, (size, size), 32, calib)
    out = {}
    for name, exclude in variants.items():
        q = quantize_onnx(files["onnx"], tmp / f"sens-{len(out)}.onnx", images, keep_fp32=exclude)
        out[name] = run_validation(weights=str(q), data=data, imgsz=size, batch_size=16, workers=0, plots=False,
                                   project=str(tmp / "val"), name="s", exist_ok=True, device="cpu").map
    return out


def video_fps(pt: Path, folder: Path, data: str, lengths: list[int], rounds: int, tmp: Path) -> dict[str, dict]:
    """Frames/s of whole detect_dual.py runs (model load, decode, infer, NMS, draw, encode .mp4) on generated
    640x360 clips of each length, each format exported at 384x640 (what the .pt letterboxes the clip to);
    formats and lengths interleaved per round, best round kept. Key "steady": (M - N) frames / (t_M - t_N)."""
    from benchmarks.bench_detect import make_video, run_detect
    files = export_all(pt, folder, (384, 640), data, 20)
    videos = {n: make_video(tmp / f"clip{n}.mp4", n) for n in lengths}
    best: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        for name, (key, half) in _formats(files).items():
            for n, video in videos.items():
                print(f"video round {r + 1}/{rounds}: {name}, {n} frames ...", file=sys.stderr, flush=True)
                t = run_detect(files[key], video, tmp / "video", None, (384, 640), True, half)
                best[name, n] = min(best.get((name, n), float("inf")), t)
    out: dict[str, dict] = {str(n): {f: n / best[f, n] for f, m in best if m == n} for n in lengths}
    if len(lengths) >= 2:
        a, b = sorted(lengths)[:2]
        out["steady"] = {f: (b - a) / (best[f, b] - best[f, a]) for f, m in best if m == a}
    return out


def table(model: str, eval_size: int, sizes: list[int], sizes_mb: dict, ms: dict, maps: dict,
          fps: dict | None = None) -> str:
    base = {s: ms[s].get("pt FP32") for s in sizes}
    fps = fps or {}
    vids = [(k, f"{k}-frame clip" if k != "steady" else "steady state (longer - shorter clip)") for k in fps]
    head = ("| format | file MB | " + "".join(f"ms/img {s} | x FP32 .pt {s} | " for s in sizes) +
            "".join(f"{t} frames/s | x FP32 .pt | " for _, t in vids) + f"mAP50-95 ({eval_size} px) |")
    out = [f"### {model}", "", head, "|---|---:|" + "---:|---:|" * (len(sizes) + len(vids)) + "---:|"]
    for name in FORMATS:
        if not any(name in ms[s] for s in sizes) and name not in maps and not any(name in v for v in fps.values()):
            continue
        cells = [f"{sizes_mb[name]:.1f}" if name in sizes_mb else "-"]
        for s in sizes:
            v = ms[s].get(name)
            cells += ["-", "-"] if v is None else [f"{v:.1f}", f"{base[s] / v:.2f}"]
        for k, _ in vids:
            f = fps[k].get(name)
            cells += ["-", "-"] if f is None else [f"{f:.2f}", f"{f / fps[k]['pt FP32']:.2f}"]
        cells.append(f"{maps[name]:.4f}" if name in maps else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="model=checkpoint pairs, comma-separated (trained .pt files)")
    ap.add_argument("--data", default="data/shapes.yaml", help="data YAML: INT8 calibration (train) and mAP (val)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[320, 640],
                    help="latency input sizes (square); no value: no latency")
    ap.add_argument("--eval-size", type=int, default=0, help="mAP image size (0: the checkpoint's training size)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of torch, ONNX Runtime and OpenVINO")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (best kept)")
    ap.add_argument("--iters", type=int, default=5, help="forwards per format per round (median kept)")
    ap.add_argument("--calib-images", type=int, default=200, help="INT8 calibration images (mAP exports)")
    ap.add_argument("--sensitivity", action="store_true", help="also measure INT8 ONNX with fewer fp32 nodes")
    ap.add_argument("--video", type=int, nargs="*", default=[],
                    help="also time whole detect_dual.py runs on clips of these lengths (frames)")
    ap.add_argument("--formats", nargs="+", default=[], choices=list(FORMATS),
                    help="measure only these rows (the FP32 .pt is always kept)")
    ap.add_argument("--no-map", action="store_true", help="skip the mAP50-95 exports and validation")
    ap.add_argument("--md", default="", help="also write the tables to this markdown file")
    opt = ap.parse_args(argv)
    if opt.no_map and opt.sensitivity:
        ap.error("--sensitivity compares with the FP32 mAP: drop --no-map")
    torch.set_num_threads(opt.threads)
    ONLY.clear()
    ONLY.update(set(opt.formats) | {"pt FP32"} if opt.formats else ())
    from utils.checkpoint import load_checkpoint
    from utils.torch_utils import cpu_bf16_native
    load = os.getloadavg()[0]
    parts = []
    with tempfile.TemporaryDirectory(prefix="bench_formats_") as t:
        tmp = Path(t)
        for pair in opt.weights.split(","):
            model, pt = pair.split("=", 1)
            pt = Path(pt)
            eval_size = opt.eval_size or int((load_checkpoint(pt).get("opt") or {}).get("imgsz") or 640)
            print(f"{model}: mAP at {eval_size} px: {not opt.no_map}, latency at {opt.sizes}, video {opt.video} ...",
                  file=sys.stderr, flush=True)
            maps, sizes_mb = {}, {}
            if not opt.no_map:
                at_eval = export_all(pt, tmp / model / str(eval_size), eval_size, opt.data, opt.calib_images)
                sizes_mb = {n: _size_mb(at_eval[k]) for n, (k, _) in FORMATS.items() if k in at_eval}
                maps = accuracy(at_eval, opt.data, eval_size, tmp)
            ms = {}
            for s in opt.sizes:
                files = export_all(pt, tmp / model / f"speed{s}", s, opt.data, 20)  # latency only: 20 images
                print(f"{model}: timing at {s} ...", file=sys.stderr, flush=True)
                ms[s] = latency(files, s, opt.rounds, opt.iters)
                sizes_mb = {n: _size_mb(files[k]) for n, (k, _) in FORMATS.items() if k in files}
            fps = video_fps(pt, tmp / model / "video", opt.data, opt.video, opt.rounds, tmp) if opt.video else None
            parts.append(table(model, eval_size, opt.sizes, sizes_mb, ms, maps, fps))
            if opt.sensitivity:
                sens = sensitivity(at_eval, opt.data, eval_size, opt.calib_images, tmp)
                parts.append(f"\nINT8 ONNX sensitivity, {model} at {eval_size} px (FP32 onnx {maps['onnx FP32']:.4f}): " +
                             "; ".join(f"{k} {v:.4f}" for k, v in sens.items()))
            print("\n\n".join(parts), file=sys.stderr, flush=True)
    text = (f"CPU, batch 1, {opt.threads} intra-op thread(s) for every runtime, {os.cpu_count()} cores shared with "
            f"other jobs (load average {load:.2f} before, {os.getloadavg()[0]:.2f} after); native bf16: "
            f"{cpu_bf16_native()}; latency = best of {opt.rounds} interleaved rounds of the median of {opt.iters} "
            f"forwards (model only: no decode, pre-processing or NMS); mAP50-95 on the val split of {opt.data}; "
            f"INT8 calibrated on {opt.calib_images} training images. File size of the "
            f"{opt.sizes[-1] if opt.sizes else eval_size} px export.\n\n"
            + "\n\n".join(parts) + "\n")
    print(text)
    if opt.md:
        write_md(opt.md, text)
    return text


if __name__ == "__main__":
    main()
