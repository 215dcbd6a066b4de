"""Whole detect_dual.py processes on one video, beside ultralytics' `predict` and an older checkout: frames/s,
start-up, steady frames/s and the raw forward they are bounded by.

Why: a user sees the whole process (interpreter start, imports, model load, decode, letterbox, forward, NMS,
drawing, .mp4 encode), not the model's latency. Every variant runs as its own process on the same generated
clip (bundled shapes, default 250 frames of 640x272), in interleaved rounds so load from other jobs on a shared
machine hits all variants alike; medians are reported, with ratios to ultralytics' .pt.

Columns: `whole` = frames / wall time of the process; `CPU s` = user + system seconds of the process (its work,
what a loaded machine shares out); `start-up` = wall time minus the frames at the steady
rate (imports, model load/compile, first-frame warm-up, exit); `steady` = frames/s from the first result to the
last (detect_dual.py prints it per video; the ultralytics driver times the same span); `raw forward` = median
batch-1 forward at the letterboxed shape with all intra-op threads, in a separate process (no decode, no
pre/post-processing); `steady / raw` = per-frame cost of the steady run over that forward (below 1.0 means
frames in flight beat the one-frame latency).

INT8 files (ours and ultralytics') are calibrated on the bundled shapes images (generated, no download).
Ultralytics: give --ultra-python (an interpreter with ultralytics installed, e.g. a venv made with
`python -m venv --system-site-packages`); its yolov9t is built from its YAML (seed weights: speed does not
depend on the weight values; no download), saved once as .pt and run with `YOLO(pt).predict(stream=True,
save=True)` (what `yolo predict` calls). Our model is a seed-initialised checkpoint of --model (nc 80) unless
--weights is given.

Usage:
    python benchmarks/bench_video.py --ultra-python /work/venvs/ultra/bin/python --rounds 3 \
        [--variants pt pt-half onnx openvino-half onnx-int8 openvino-int8] \
        [--ultra-formats pt onnx openvino openvino-int8] [--base /path/to/older/worktree] \
        [--md benchmarks/results/video_vs_ultralytics.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import write_md  # noqa: E402

# our variants: name -> (export key or "pt", --half)
OURS = {"pt": ("pt", False), "pt-half": ("pt", True), "onnx": ("onnx", False), "openvino": ("openvino", False),
        "openvino-half": ("openvino", True), "onnx-int8": ("onnx-int8", False),
        "openvino-int8": ("openvino-int8", False)}
# ultralytics' formats: name -> its export arguments (at the letterboxed shape, as ours)
ULTRA_FORMATS = {"pt": None, "onnx": {"format": "onnx", "simplify": False},
                 "openvino": {"format": "openvino"}, "openvino-int8": {"format": "openvino", "int8": True}}

ULTRA_DRIVER = r'''
import json, os, sys, time
mode, model, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if arg.get("threads"):  # ultralytics runs CPU inference with cpu_count - 1 threads (1 on 2 cores) unless patched
    os.environ["OMP_NUM_THREADS"] = str(arg["threads"])
from ultralytics import YOLO
if arg.get("threads"):
    import ultralytics.utils.torch_utils as tu
    tu.NUM_THREADS = arg["threads"]
if mode == "build":  # yolov9t from its YAML, saved as a .pt (seed weights, nothing downloaded)
    YOLO(arg["yaml"]).save(model)
    sys.exit(0)
if mode == "export":  # one exported file at the letterboxed shape (INT8: calibrated on arg["kw"]["data"])
    print("RESULT " + json.dumps({"path": str(YOLO(model).export(imgsz=arg["shape"], **arg["kw"]))}))
    sys.exit(0)
def tu_threads():
    import ultralytics.utils.torch_utils as tu
    return tu.NUM_THREADS
if mode == "raw":
    import torch
    torch.set_num_threads(arg.get("threads") or tu_threads())
    m = YOLO(model).model.fuse().eval()
    x = torch.rand(1, 3, *arg["shape"])
    with torch.inference_mode():
        for _ in range(3):
            m(x)
        ts = []
        for _ in range(arg["iters"]):
            t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
    ts.sort()
    print("RESULT " + json.dumps({"raw_ms": ts[len(ts) // 2] * 1e3}))
    sys.exit(0)
n, first = 0, None
kw = {"imgsz": arg["imgsz"]} if arg.get("imgsz") else {}  # exported files: their fixed shape
for r in YOLO(model, task="detect").predict(source=arg["source"], device="cpu", save=True, stream=True,
                                            verbose=False, project=arg["project"], name="run", exist_ok=True, **kw):
    n += 1
    if first is None:
        first = time.perf_counter()
end = time.perf_counter()
print("RESULT " + json.dumps({"frames": n, "steady_fps": (n - 1) / (end - first) if n > 1 else 0.0}))
'''


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare(tmp: Path, opt) -> dict:
    """The clip, our checkpoint and its exports at the letterboxed shape, ultralytics' .pt."""
    import torch
    from utils.data.augment import letterbox
    from utils.data.shapes_video import write_shapes_video
    clip = tmp / "clip.mp4"
    write_shapes_video(clip, frames=opt.frames, size=tuple(opt.size), n_objects=4, seed=0)
    w, h = opt.size
    import numpy as np
    shape = letterbox(np.zeros((h, w, 3), np.uint8), opt.imgsz, auto=True, stride=32)[0].shape[:2]
    if opt.weights:
        pt = Path(opt.weights)
    else:
        from models.yolo import DetectionModel
        from utils.checkpoint import make_checkpoint, save_checkpoint
        torch.manual_seed(0)
        model = DetectionModel(f"{opt.model}.yaml", nc=80)
        pt = save_checkpoint(make_checkpoint(model, names=[f"c{i}" for i in range(80)]), tmp / f"{opt.model}.pt")
    files = {"pt": pt}
    data = calibration_yaml(tmp) if any(v.endswith("int8") for v in opt.variants + opt.ultra_formats) else None
    keys = sorted({OURS[v][0] for v in opt.variants} - {"pt"})
    if keys:
        from utils.deploy.export import run as export
        plain = sorted({k for k in keys if not k.endswith("-int8")} | {k[:-5] for k in keys if k.endswith("-int8")})
        if any(k.endswith("-int8") for k in keys):  # fp32 and INT8 files of each format in one export
            files.update(export(pt, include=tuple(plain), imgsz=shape, int8=True, data=data))
        else:
            files.update(export(pt, include=tuple(plain), imgsz=shape))
    out = {"clip": clip, "shape": tuple(shape), "files": files}
    if opt.ultra_python:
        driver = tmp / "ultra_driver.py"
        driver.write_text(ULTRA_DRIVER)
        upt = tmp / "u_yolov9t.pt"
        subprocess.run([opt.ultra_python, str(driver), "build", str(upt), json.dumps({"yaml": "yolov9t.yaml"})],
                       check=True, capture_output=True, cwd=tmp, env=_ultra_env())
        out.update(driver=driver, ultra={"pt": upt})
        for name in opt.ultra_formats:
            kw = ULTRA_FORMATS[name]
            if kw is None:
                continue
            kw = dict(kw, data=str(data)) if kw.get("int8") else kw
            r = subprocess.run([opt.ultra_python, str(driver), "export", str(upt),
                                json.dumps({"shape": list(shape), "kw": kw})],
                               capture_output=True, text=True, cwd=tmp, env=_ultra_env())
            try:
                out["ultra"][name] = Path(_result(r)["path"])
            except RuntimeError as e:  # reported in the table's notes, the rest still runs
                out.setdefault("notes", []).append(f"ultralytics {name} export failed: {e}")
    return out


def calibration_yaml(tmp: Path) -> Path:
    """A data YAML over the bundled shapes images with the 80 class names of the seed models (INT8 calibration
    needs images only; both projects read this layout)."""
    from utils.data import load_data_config
    cfg = load_data_config(ROOT / "data" / "shapes.yaml")
    root = Path(cfg.val[0]).parents[1]  # <root>/images/val
    names = "".join(f"  {i}: c{i}\n" for i in range(80))
    path = tmp / "calib.yaml"
    path.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return path


ULTRA = {"default": {}, "2 threads": {"threads": 2}, "2 threads PASSIVE": {"threads": 2, "passive": True}}


def _ultra_env(passive: bool = False) -> dict:
    """The user's environment (not the OpenMP defaults this package set for itself), offline."""
    from utils.threads import user_environ
    env = dict(user_environ(), YOLO_OFFLINE="1")  # no update checks or downloads
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _children_cpu() -> float:
    import resource
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def run_ours(tree: Path, weights: Path, half: bool, clip: Path, project: Path) -> dict:
    """One detect_dual.py process: wall and CPU seconds, frames, steady frames/s, and the per-image
    pre-process / inference / NMS milliseconds it prints (where the time of a frame goes)."""
    cmd = [sys.executable, str(tree / "detect_dual.py"), "--weights", str(weights), "--source", str(clip),
           "--device", "cpu", "--project", str(project), "--name", "run", "--exist-ok"] + (["--half"] if half else [])
    from utils.threads import user_environ
    c0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=user_environ())
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    m = re.search(r"(\d+) frames, \d+ detections, ([\d.]+) frames/s", r.stderr + r.stdout)
    sp = re.search(r"Speed: ([\d.]+)ms pre-process, ([\d.]+)ms inference, ([\d.]+)ms NMS", r.stderr + r.stdout)
    return {"wall": wall, "cpu": cpu, "frames": int(m.group(1)) if m else None,
            "steady_fps": float(m.group(2)) if m else None,
            "split": tuple(float(v) for v in sp.groups()) if sp else None}


def run_ultra(prep: dict, opt, project: Path, how: dict, fmt: str = "pt") -> dict:
    arg = {"source": str(prep["clip"]), "project": str(project), "threads": how.get("threads"),
           "imgsz": list(prep["shape"]) if fmt != "pt" else None}
    project.parent.mkdir(parents=True, exist_ok=True)
    c0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run([opt.ultra_python, str(prep["driver"]), "predict", str(prep["ultra"][fmt]), json.dumps(arg)],
                       capture_output=True, text=True, cwd=project.parent, env=_ultra_env(how.get("passive")))
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    return {"wall": wall, "cpu": cpu, **_result(r)}


def _result(r: subprocess.CompletedProcess) -> dict:
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"no result: {(r.stderr or r.stdout).strip().splitlines()[-3:]}")


def raw_ours(weights: Path, half: bool, shape: tuple, iters: int) -> float:
    cmd = [sys.executable, __file__, "--_raw", json.dumps({"weights": str(weights), "half": half,
                                                           "shape": list(shape), "iters": iters})]
    return _result(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT))["raw_ms"]  # our defaults


def _raw_worker(cfg: dict) -> None:
    """Median batch-1 forward of our Backend at the letterboxed shape (after warm-up), as detect_dual.py loads it."""
    import torch
    from utils.engine.backend import Backend
    b = Backend(cfg["weights"], "cpu", half=cfg["half"], fuse=True, main_only=True)
    x = torch.rand(1, 3, *cfg["shape"])
    if b.pt:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            b(x)
        ts = []
        for _ in range(cfg["iters"]):
            t = time.perf_counter()
            b(x)
            ts.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"raw_ms": statistics.median(ts) * 1e3}))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gelan-t", help="our model YAML for the seed checkpoint")
    ap.add_argument("--weights", default="", help="our checkpoint instead of a seed one")
    ap.add_argument("--variants", nargs="+", default=["pt"], choices=list(OURS), help="our formats to run")
    ap.add_argument("--ultra-python", default="", help="interpreter with ultralytics (omit: no ultralytics rows)")
    ap.add_argument("--ultra", nargs="+", default=["default", "2 threads"], choices=list(ULTRA),
                    help="ultralytics .pt settings: as installed (cpu_count - 1 threads), 2 threads, 2 threads with "
                         "OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--ultra-formats", nargs="+", default=["pt"], choices=list(ULTRA_FORMATS),
                    help="ultralytics formats (exported at the letterboxed shape; exports run with '2 threads')")
    ap.add_argument("--base", default="", help="also run this older checkout's detect_dual.py on the same files (every variant)")
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 272], metavar=("W", "H"))
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20, help="forwards per raw-forward measurement")
    ap.add_argument("--md", default="", help="write the table to this markdown file")
    ap.add_argument("--_raw", default="", help=argparse.SUPPRESS)
    opt = ap.parse_args(argv)
    if opt._raw:
        _raw_worker(json.loads(opt._raw))
        return []
    load0 = _load()
    with tempfile.TemporaryDirectory(prefix="bench_video_") as td:
        tmp = Path(td)
        prep = prepare(tmp, opt)
        runs: dict[str, list[dict]] = {}
        raws: dict[str, list[float]] = {}
        for rnd in range(opt.rounds):
            order = [("ours", v) for v in opt.variants]
            order += [("base", v) for v in opt.variants if opt.base]
            if opt.ultra_python:
                order += [("ultralytics", f"pt {u}") for u in opt.ultra] if "pt" in opt.ultra_formats else []
                order += [("ultralytics", u) for u in opt.ultra_formats if u != "pt" and u in prep["ultra"]]
            for who, v in order:
                name = f"{who} {v}"
                print(f"round {rnd + 1}/{opt.rounds}: {name} (load {_load():.1f}) ...", file=sys.stderr, flush=True)
                project = tmp / "out" / name.replace(" ", "_")
                if who == "ultralytics" and not v.startswith("pt "):
                    res, raw = run_ultra(prep, opt, project, ULTRA["2 threads"], v), None
                elif who == "ultralytics":
                    how = ULTRA[v[3:]]
                    res = run_ultra(prep, opt, project, how)
                    raw = _result(subprocess.run([opt.ultra_python, str(prep["driver"]), "raw", str(prep["ultra"]["pt"]),
                                                  json.dumps({"shape": list(prep["shape"]), "iters": opt.iters,
                                                              "threads": how.get("threads")})],
                                                 capture_output=True, text=True, cwd=tmp,
                                                 env=_ultra_env(how.get("passive"))))["raw_ms"]
                else:
                    key, half = OURS[v]
                    tree = Path(opt.base).resolve() if who == "base" else ROOT
                    res = run_ours(tree, prep["files"][key], half, prep["clip"], project)
                    raw = raw_ours(prep["files"][key], half, prep["shape"], opt.iters) if who == "ours" else None
                runs.setdefault(name, []).append(res)
                if raw is not None:
                    raws.setdefault(name, []).append(raw)
    rows = summarise(runs, raws, opt.frames)
    text = report(rows, opt, prep["shape"], load0, _load(), prep.get("notes", []))
    print(text)
    if opt.md:
        write_md(opt.md, text + "\n")
    return rows


def summarise(runs: dict, raws: dict, frames: int) -> list[dict]:
    def best(prefix: str) -> float | None:
        fps = [frames / statistics.median(r["wall"] for r in rs) for n, rs in runs.items() if n.startswith(prefix)]
        return max(fps) if fps else None
    ref_pt, ref_any = best("ultralytics pt"), best("ultralytics")  # the fastest ultralytics .pt / any format
    rows = []
    for name, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        steady = [r["steady_fps"] for r in rs if r.get("steady_fps")]
        steady_fps = statistics.median(steady) if steady else None
        raw = statistics.median(raws[name]) if raws.get(name) else None
        rows.append({"variant": name, "wall_s": wall, "fps": frames / wall,
                     "cpu_s": statistics.median(r["cpu"] for r in rs),
                     "x_ultra": (frames / wall) / ref_pt if ref_pt else None,
                     "x_ultra_any": (frames / wall) / ref_any if ref_any else None,
                     "split": _median_split([r.get("split") for r in rs]),
                     "startup_s": wall - frames / steady_fps if steady_fps else None, "steady_fps": steady_fps,
                     "raw_ms": raw, "steady_over_raw": (1e3 / steady_fps) / raw if steady_fps and raw else None,
                     "walls": [round(r["wall"], 1) for r in rs]})
    return rows


def _median_split(splits: list) -> tuple | None:
    splits = [s for s in splits if s]
    return tuple(statistics.median(s[i] for s in splits) for i in range(3)) if splits else None


def report(rows: list[dict], opt, shape: tuple, load0: float, load1: float, notes: list[str] = ()) -> str:
    import torch

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"Whole processes on a generated {opt.size[0]}x{opt.size[1]} clip of {opt.frames} frames (bundled shapes, "
            f"mp4v), input {shape[0]}x{shape[1]}, video saved; {cpu_name()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__} with {torch.get_num_threads()} intra-op threads (every runtime); median of "
            f"{opt.rounds} interleaved rounds; load average {load0:.1f} before, {load1:.1f} after "
            f"(other jobs share the machine).\n\n")
    lines = ["| variant | whole frames/s | x fastest ultralytics .pt | x fastest ultralytics | CPU s | start-up s | "
             "steady frames/s | raw forward ms | steady / raw | pre / inference / NMS ms | process seconds per round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        split = " / ".join(f"{v:.1f}" for v in r["split"]) if r.get("split") else "-"
        lines.append(f"| {r['variant']} | {r['fps']:.1f} | {f(r['x_ultra'], '.2f')} | {f(r['x_ultra_any'], '.2f')} | "
                     f"{r['cpu_s']:.1f} | {f(r['startup_s'], '.1f')} | "
                     f"{f(r['steady_fps'], '.1f')} | {f(r['raw_ms'], '.1f')} | {f(r['steady_over_raw'], '.2f')} | "
                     f"{split} | {', '.join(map(str, r['walls']))} |")
    return head + "\n".join(lines) + "".join(f"\n\n{n}" for n in notes)


if __name__ == "__main__":
    main()
