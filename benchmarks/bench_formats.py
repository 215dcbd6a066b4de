"""Deployment formats side by side on the CPU this runs on: file size, batch-1 latency, whole-video frames/s and
mAP50-95 of each format of the same trained checkpoint, and which format to use here.

Why: choosing a CPU format is a trade of speed against accuracy, and the fastest format depends on the CPU (AMX,
AVX512-BF16/VNNI, AVX2 only, ARM); both numbers must come from the same checkpoint and the same run. The rows
come from the format registry (utils/deploy/formats): the FP32 .pt (and its bf16 autocast, --half), then for
every format that runs on this machine its FP32 file, its --half run where the runtime computes in bf16 on this
CPU, its fp16 file where --half at export writes one (LiteRT, ExecuTorch, NCNN: timed as this CPU runs it), and
its INT8 copy where the format has one. A format whose packages are missing is skipped with a note; a format that
cannot run here (Core ML: macOS/iOS) is exported for its file size only.
Latency: one export per size, every row timed in interleaved rounds (median of --iters calls per round, the best
round kept), so load from other jobs on a shared machine hits all rows alike; the ratio to the FP32 .pt is
printed. --clock cpu times the process CPU time of each call instead of the wall clock: with one thread it is
the compute time even on a machine whose other jobs keep the cores busy (with more threads it adds them up).
mAP50-95: each format exported at the checkpoint's training size, all files validated on the same val images
(utils.engine.validator.validate_files, as export.py's accuracy check). INT8 calibrates on --calib-images images.

Modes:
  --recommend: the formats timed on this machine with all its cores at one size, INT8 accuracy-checked, and the
    fastest format that keeps accuracy named with the commands that export and run it (docs/deployment.md).
  --sensitivity: INT8 mAP50-95 of ONNX Runtime and OpenVINO with each node group (utils.deploy.quantize.
    node_groups: the head's decoding split into DFL / scores / boxes, the attention, each layer with --layers)
    quantized or kept in fp32: what decides which nodes stay float.
  --static-shape H W: a dynamic export run on fixed HxW frames, dynamic vs compiled for that shape
    (Runner.set_input_shape), with the load/compile times (startup) measured separately.
  --video N [M]: frames/s of whole detect_dual.py runs on generated clips of N (and M) frames; with two lengths
    also the steady-state frames/s (M - N) / (t_M - t_N), which cancels model load/compile and warm-up.

Usage:
    python benchmarks/bench_formats.py --weights runs/train/exp/weights/best.pt --recommend
    python benchmarks/bench_formats.py --weights gelan-t=<best.pt>,yolov9-t-MMQA=<best.pt> --data data/shapes.yaml \
        [--sizes 320 640] [--threads 1] [--rounds 3] [--iters 5] [--video 30] [--md benchmarks/results/formats.md]
    python benchmarks/bench_formats.py --weights gelan-t=<best.pt> --sizes 640 --no-map --threads 1 --clock cpu \
        --formats "openvino bf16 (--half)" "onnx INT8" "openvino INT8"
    python benchmarks/bench_formats.py --weights gelan-t=<best.pt> --sizes --sensitivity --layers
    python benchmarks/bench_formats.py --weights gelan-t=<best.pt> --sizes --no-map --static-shape 384 640
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import write_md  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One measured configuration: `key` names the file export.run wrote ('pt', 'onnx', 'onnx-int8', 'litert-fp16':
    exported with --half), half runs it with --half (bf16 on a CPU that has it); runs False: the file is only
    written here, for its size (Core ML)."""
    name: str
    key: str
    half: bool = False
    runs: bool = True

    @property
    def fp16_file(self) -> bool:
        return self.key.endswith("-fp16")


ONLY: set[str] = set()  # --formats: the rows to measure (empty: all)
NOTES: list[str] = []  # formats skipped and why, printed under the tables


def registry_rows() -> list[Row]:
    """Every row the registry offers, in table order (filtered later by what was exported and what runs)."""
    from utils.deploy import formats
    rows = [Row("pt FP32", "pt"), Row("pt bf16 (--half)", "pt", True)]
    for f in formats.all_formats():
        runs = f.runs_here and f.load is not None
        rows.append(Row(f"{f.name} FP32", f.name, runs=runs))
        if runs and not f.half_file:  # --half at run time (bf16 where the runtime has it); else a file of its own
            rows.append(Row(f"{f.name} bf16 (--half)", f.name, True))
        if f.half_file:
            rows.append(Row(f"{f.name} fp16 (--half)", f"{f.name}-fp16", True, runs=runs))
        if f.export_int8 is not None:
            rows.append(Row(f"{f.name} INT8", f"{f.name}-int8", runs=runs))
    return rows


def _note(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def exportable(int8: bool, size_only: bool = False) -> list:
    """Formats this machine can write and run, each with whether its INT8 copy can be made; the others noted.
    size_only: also the formats that can be written but not run here (their file size is all that is measured)."""
    from utils.deploy import formats
    out = []
    for f in formats.all_formats():
        runs = f.runs_here and f.load is not None
        if not runs:
            _note(f"{f.name}: not run here ({f.title} runs on {f.runs_on}): file size only")
            if size_only and f.missing("export"):
                _note(f"{f.name}: no file size, needs {', '.join(f.missing('export'))}")
            elif size_only:
                out.append((f, False))
            continue
        missing = sorted(set(f.missing("export") + f.missing("run")))
        if missing:
            _note(f"{f.name}: skipped, needs {', '.join(missing)} (pip install {' '.join(missing)})")
            continue
        q = int8 and f.export_int8 is not None
        if q and f.missing("export", int8=True):
            _note(f"{f.name} INT8: skipped, needs {', '.join(f.missing('export', int8=True))}")
            q = False
        out.append((f, q))
    return out


def export_all(pt: Path, folder: Path, size: int | tuple[int, int], data: str | None, calib: int,
               dynamic: bool = False, size_only: bool = False) -> dict[str, Path]:
    """Every runnable format of checkpoint `pt` at `size` (square, or (h, w)), written into `folder` (a copy of
    pt), one export.run call per format so that one converter's failure costs only its rows (noted); a format
    whose --half writes another file gets that too, under '<name>-fp16' (its own folder: same file name);
    size_only adds the formats that cannot run here."""
    from utils.deploy.export import run
    from utils.general import UserError
    folder.mkdir(parents=True, exist_ok=True)
    w = Path(shutil.copy(pt, folder / "model.pt"))
    (folder / "fp16").mkdir(exist_ok=True)
    w16 = Path(shutil.copy(pt, folder / "fp16" / "model.pt"))
    out: dict[str, Path] = {"pt": w}
    for f, int8 in exportable(int8=data is not None, size_only=size_only):
        try:
            out.update(run(w, include=(f.name,), imgsz=size, int8=int8, data=data, calib_images=calib,
                           dynamic=dynamic))
            if f.half_file:
                out[f"{f.name}-fp16"] = run(w16, include=(f.name,), imgsz=size, half=True, dynamic=dynamic)[f.name]
        except UserError as e:
            _note(f"{f.name}: export failed ({e})")
    return out


@functools.lru_cache(maxsize=None)
def _bf16_runs(path: Path) -> bool:
    """Whether --half makes this file compute in bf16 here (the .pt on a bf16 CPU, OpenVINO's bf16 hint...);
    elsewhere a --half row would repeat the FP32 row (the runner's one-line note about it is not shown)."""
    from utils.engine.backend import Backend
    from utils.general import LOGGER
    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)
    try:
        return Backend(path, half=True, main_only=True).precision == "bf16"
    finally:
        LOGGER.setLevel(level)


def rows_for(files: dict[str, Path]) -> list[Row]:
    """The registry's rows that this export produced and that differ from each other on this CPU."""
    return [r for r in registry_rows() if r.runs and r.key in files
            and (not ONLY or r.name in ONLY or r.name == "pt FP32")
            and (not r.half or r.fp16_file or _bf16_runs(files[r.key]))]


def _call_times(b, x, iters: int) -> tuple[float, float]:
    """(wall ms, process CPU ms): medians of `iters` forwards."""
    ws, cs = [], []
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        b(x)
        ws.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ws) * 1e3, statistics.median(cs) * 1e3


def latency(files: dict[str, Path], size: int | tuple[int, int], rounds: int, iters: int,
            clock: str = "wall") -> dict[str, float]:
    """Batch-1 forward ms per row (main branch), rows interleaved per round: the best round's median for the
    wall clock, the median over rounds for CPU time."""
    from utils.engine.backend import Backend
    h, w = (size, size) if isinstance(size, int) else size
    runners = {r.name: Backend(files[r.key], half=r.half, main_only=True) for r in rows_for(files)}
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    for b in runners.values():
        for _ in range(2):
            b(x)  # warm-up: allocator, oneDNN primitive caches, OpenVINO's first inference
    wall = {n: [] for n in runners}
    cpu = {n: [] for n in runners}
    for _ in range(rounds):
        for n, b in runners.items():
            a, c = _call_times(b, x, iters)
            wall[n].append(a)
            cpu[n].append(c)
    return {n: (min(wall[n]) if clock == "wall" else statistics.median(cpu[n])) for n in runners}


def accuracy(files: dict[str, Path], data: str, size: int) -> dict[str, float]:
    """mAP50-95 of every row on the same val images (--half rows in bf16 where the CPU has it)."""
    from utils.engine.validator import validate_files
    rows = rows_for(files)
    res, _ = validate_files([files[r.key] for r in rows], data, size, half=[r.half for r in rows])
    return {r.name: v.map for r, v in zip(rows, res)}


def video_fps(pt: Path, folder: Path, data: str | None, lengths: list[int], rounds: int, tmp: Path) -> dict[str, dict]:
    """Frames/s of whole detect_dual.py runs (model load, decode, infer, NMS, draw, encode .mp4) on generated
    640x360 clips of each length, each format exported at 384x640 (what the .pt letterboxes the clip to);
    formats and lengths interleaved per round, best round kept. Key "steady": (M - N) frames / (t_M - t_N)."""
    from benchmarks.bench_detect import make_video, run_detect
    files = export_all(pt, folder, (384, 640), data, 20)
    videos = {n: make_video(tmp / f"clip{n}.mp4", n) for n in lengths}
    best: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        for row in rows_for(files):
            for n, video in videos.items():
                print(f"video round {r + 1}/{rounds}: {row.name}, {n} frames ...", file=sys.stderr, flush=True)
                t = run_detect(files[row.key], video, tmp / "video", None, (384, 640), True, row.half)
                best[row.name, n] = min(best.get((row.name, n), float("inf")), t)
    out: dict[str, dict] = {str(n): {f: n / best[f, n] for f, m in best if m == n} for n in lengths}
    if len(lengths) >= 2:
        a, b = sorted(lengths)[:2]
        out["steady"] = {f: (b - a) / (best[f, b] - best[f, a]) for f, m in best if m == a}
    return out


def table(model: str, eval_size: int, sizes: list[int], sizes_mb: dict, ms: dict, maps: dict,
          fps: dict | None = None, clock: str = "wall") -> str:
    base = {s: ms[s].get("pt FP32") for s in sizes}
    fps = fps or {}
    vids = [(k, f"{k}-frame clip" if k != "steady" else "steady state (longer - shorter clip)") for k in fps]
    unit = "ms/img" if clock == "wall" else "CPU ms/img"
    head = ("| format | file MB | " + "".join(f"{unit} {s} | x FP32 .pt {s} | " for s in sizes) +
            "".join(f"{t} frames/s | x FP32 .pt | " for _, t in vids) + f"mAP50-95 ({eval_size} px) |")
    out = [f"### {model}", "", head, "|---|---:|" + "---:|---:|" * (len(sizes) + len(vids)) + "---:|"]
    for row in registry_rows():
        name = row.name
        if not row.runs and name in sizes_mb and (not ONLY or name in ONLY):
            out.append(f"| {name} | {sizes_mb[name]:.1f} | " + "- | " * 2 * (len(sizes) + len(vids))
                       + f"- (runs on {_format(row).runs_on}) |")
            continue
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


def _format(row: Row):
    from utils.deploy import formats
    return formats.get(row.key.removesuffix("-int8").removesuffix("-fp16"))


def _sizes_mb(files: dict[str, Path]) -> dict[str, float]:
    from utils.deploy.formats import size_mb
    return {r.name: size_mb(files[r.key]) for r in registry_rows() if r.key in files}


# ---------------------------------------------------------------- which CPU, and which format to use on it

def cpu_summary(cpuinfo: str | None = None) -> str:
    """The CPU's model name and the instruction sets that decide the fastest format (from /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not name:
            name = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    has = [label for label, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX512-VNNI", "avx512_vnni"),
                                     ("AVX-VNNI", "avx_vnni"), ("AVX512", "avx512f"), ("AVX2", "avx2"),
                                     ("ARM dot product", "asimddp"), ("ARM BF16", "bf16"), ("ARM I8MM", "i8mm"))
           if flag in flags]
    return (f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
            f"{', '.join(has) or 'no AVX2/AVX512/ARM dot-product flags'}")


def _how_to_run(row: Row, weights: Path, size: int) -> str:
    half = " --half" if row.half else ""
    if row.key == "pt":
        return f"python detect_dual.py --weights {weights}{half}"
    fmt = _format(row)
    int8 = row.key.endswith("-int8")
    flag = " --int8" if int8 else " --half" if row.fp16_file else ""
    return (f"python export.py --weights {weights} --include {fmt.name} --imgsz {size}{flag} "
            f"&& python detect_dual.py --weights {fmt.path(weights, int8=int8)}{half}")


def recommend(model: str, pt: Path, data: str | None, size: int, eval_size: int, rounds: int, iters: int,
              clock: str, calib: int, tmp: Path) -> str:
    """Time every row at `size` on this machine, check bf16/INT8 accuracy at the checkpoint's training size
    where there is data (bf16 within the export check's float limit of the .pt, INT8 within its INT8 limit of
    its fp32 file), and name the fastest row that keeps accuracy, with the commands that make and run it."""
    from utils.deploy.accuracy import FLOAT_MAX_DROP, INT8_MAX_DROP
    files = export_all(pt, tmp / model / "recommend", size, data, calib)
    ms = latency(files, size, rounds, iters, clock)
    maps = {}
    if data:
        at_eval = files if eval_size == size else export_all(pt, tmp / model / "recommend-map", eval_size, data, calib)
        maps = accuracy(at_eval, data, eval_size)
    lost = {}
    for r in rows_for(files):
        if r.name in maps and r.name != "pt FP32":
            int8 = r.key.endswith("-int8")
            ref = maps.get(f"{r.key.removesuffix('-int8')} FP32" if int8 else "pt FP32", maps["pt FP32"])
            limit = INT8_MAX_DROP if int8 else FLOAT_MAX_DROP
            if (ref - maps[r.name]) * 100 > limit:
                lost[r.name] = f"lost {(ref - maps[r.name]) * 100:.2f} points of mAP50-95 (limit {limit})"
    base = ms["pt FP32"]
    unit = "ms" if clock == "wall" else "CPU ms"
    lines = [f"### Which format on this CPU: {model}", "",
             f"{torch.get_num_threads()} thread(s), batch 1, {size}x{size}, {unit} per forward; mAP50-95 of files "
             f"exported at {eval_size} px (the training size) on the val split.", "",
             f"| format | {unit}/img | x FP32 .pt | mAP50-95 | note |", "|---|---:|---:|---:|---|"]
    for n, v in sorted(ms.items(), key=lambda kv: kv[1]):
        m = f"{maps[n]:.4f}" if n in maps else "-"
        lines.append(f"| {n} | {v:.1f} | {base / v:.2f} | {m} | {lost.get(n, '')} |")
    best = min((n for n in ms if n not in lost), key=ms.get)
    row = next(r for r in rows_for(files) if r.name == best)
    lines += ["", f"Use **{best}** here: {base / ms[best]:.2f}x the FP32 .pt"
              + ("" if maps else " (accuracy not checked: no data YAML)") + ".",
              f"`{_how_to_run(row, pt, size)}`"]
    return "\n".join(lines)


# ---------------------------------------------------------------- INT8: sensitivity and static shapes

def sensitivity(files: dict[str, Path], data: str, size: int, calib: int, tmp: Path, layers: bool) -> str:
    """INT8 mAP50-95 per node group (utils.deploy.quantize.node_groups) for ONNX Runtime and OpenVINO: the
    default fp32 set, everything INT8, each decoding part / the attention quantized on top of the default, and
    (layers) each layer kept in fp32 on top of the default."""
    import onnx
    from utils.deploy.quantize import calibration_images, fp32_nodes, node_groups, quantize_onnx, quantize_openvino
    from utils.engine.validator import validate_files
    names = [n.name for n in onnx.load(str(files["onnx"])).graph.node]
    groups, default = node_groups(names), fp32_nodes(names)
    dec = groups["decoding"]
    parts = {"DFL softmax/conv": [n for n in dec if "/dfl/" in n], "score sigmoid": [n for n in dec if "Sigmoid" in n]}
    parts["box arithmetic"] = [n for n in dec if n not in parts["DFL softmax/conv"] + parts["score sigmoid"]]
    variants = {"default: decoding + attention fp32": default, "everything INT8": []}
    for part, nodes in parts.items():
        if nodes:
            variants[f"{part} INT8"] = [n for n in default if n not in nodes]
    if groups["attention"]:
        variants["attention INT8"] = [n for n in default if n not in groups["attention"]]
    if layers:
        for g, nodes in groups.items():
            if g.startswith("layer "):
                variants[f"default + {g} fp32"] = default + nodes
    images = calibration_images(data, (size, size), 32, calib)
    ov = "openvino" in files
    if ov:
        from utils.engine.backend import Backend
        meta = {k: v for k, v in Backend(files["openvino"]).metadata.items() if k != "int8"}
    paths: dict[str, list[Path]] = {"onnx": [], "openvino": []}
    for i, keep in enumerate(variants.values()):
        print(f"sensitivity: variant {i + 1}/{len(variants)} ...", file=sys.stderr, flush=True)
        paths["onnx"].append(quantize_onnx(files["onnx"], tmp / f"sens{i}.onnx", images, keep_fp32=keep))
        if ov:
            import openvino as ovr
            from utils.deploy.formats.openvino import _save
            m = quantize_openvino(ovr.convert_model(str(files["onnx"])), images, keep_fp32=keep)
            paths["openvino"].append(_save(m, tmp / f"sens{i}_openvino_model", meta, True))
    res, _ = validate_files([files["onnx"]] + paths["onnx"] + ([files["openvino"]] + paths["openvino"] if ov else []),
                            data, size)
    maps = [r.map for r in res]
    n = len(variants)
    onnx_ref, onnx_q = maps[0], maps[1:n + 1]
    ov_ref, ov_q = (maps[n + 1], maps[n + 2:]) if ov else (None, [])
    lines = ["| INT8 variant (fp32 nodes) | fp32 nodes | ONNX Runtime mAP50-95 | change vs fp32 onnx | "
             "OpenVINO mAP50-95 | change vs fp32 openvino |", "|---|---:|---:|---:|---:|---:|"]
    for i, (v, keep) in enumerate(variants.items()):
        o = f"{ov_q[i]:.4f} | {(ov_q[i] - ov_ref) * 100:+.2f}" if ov else "- | -"
        lines.append(f"| {v} | {len(keep)} | {onnx_q[i]:.4f} | {(onnx_q[i] - onnx_ref) * 100:+.2f} | {o} |")
    ref = f"fp32: onnx {onnx_ref:.4f}" + (f", openvino {ov_ref:.4f}" if ov else "")
    return f"INT8 sensitivity at {size} px ({ref}; changes in points):\n\n" + "\n".join(lines)


def static_shape(pt: Path, folder: Path, hw: tuple[int, int], data: str | None, rounds: int, iters: int,
                 clock: str) -> str:
    """A --dynamic export run on fixed h x w frames: dynamic vs compiled for that shape (set_input_shape), per
    format; startup (load, compile, first call) of each path measured apart. Rows whose runtime has nothing to
    compile (set_input_shape False) time the same file twice: their ratio shows the measurement's noise."""
    from utils.engine.backend import Backend
    files = export_all(pt, folder, hw, data, 20, dynamic=True)
    rows = [r for r in rows_for(files) if r.key != "pt"]
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    dyn, fixed, load, prep = {}, {}, {}, {}
    for r in rows:
        t0 = time.perf_counter()
        dyn[r.name] = Backend(files[r.key], half=r.half, main_only=True)
        dyn[r.name](x)
        load[r.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fixed[r.name] = Backend(files[r.key], half=r.half, main_only=True)
        ok = fixed[r.name].prepare_input_shape(*hw)
        fixed[r.name](x)
        prep[r.name] = (time.perf_counter() - t0) if ok else None
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for r in rows:
            for kind, b in (("dynamic", dyn[r.name]), ("static", fixed[r.name])):
                a, c = _call_times(b, x, iters)
                times.setdefault((r.name, kind), []).append(a if clock == "wall" else c)
    pick = min if clock == "wall" else statistics.median
    unit = "ms" if clock == "wall" else "CPU ms"
    lines = [f"| format ({hw[0]}x{hw[1]} frames, --dynamic export) | startup s: load + first call | {unit} dynamic | "
             f"startup s: load + set_input_shape + first call | {unit} static | static speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, s = pick(times[r.name, "dynamic"]), pick(times[r.name, "static"])
        p = f"{prep[r.name]:.2f}" if prep[r.name] is not None else "- (nothing to compile: noise)"
        lines.append(f"| {r.name} | {load[r.name]:.2f} | {d:.1f} | {p} | {s:.1f} | {d / s:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True,
                    help="trained .pt files, comma-separated, each optionally named: gelan-t=runs/train/a/weights/best.pt")
    ap.add_argument("--data", default=None, help="data YAML: INT8 calibration (train) and mAP (val); default: the "
                                                 "data each checkpoint was trained on")
    ap.add_argument("--sizes", type=int, nargs="*", default=None,
                    help="latency input sizes (square); no value: no latency (default 320 640; --recommend: the "
                         "checkpoint's training size)")
    ap.add_argument("--eval-size", type=int, default=0, help="mAP image size (0: the checkpoint's training size)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads of torch, ONNX Runtime and OpenVINO (default 1; --recommend: all cores)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (best kept)")
    ap.add_argument("--iters", type=int, default=5, help="forwards per format per round (median kept)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time forwards by the wall clock or by process CPU time (robust on a busy machine, 1 thread)")
    ap.add_argument("--calib-images", type=int, default=200, help="INT8 calibration images (mAP exports)")
    ap.add_argument("--recommend", action="store_true", help="measure the formats here and say which to use")
    ap.add_argument("--sensitivity", action="store_true", help="INT8 mAP with each node group quantized or fp32")
    ap.add_argument("--layers", action="store_true", help="--sensitivity: also each layer kept in fp32")
    ap.add_argument("--static-shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="time a dynamic export on fixed HxW frames, dynamic vs compiled for the shape")
    ap.add_argument("--video", type=int, nargs="*", default=[],
                    help="also time whole detect_dual.py runs on clips of these lengths (frames)")
    ap.add_argument("--formats", nargs="+", default=[], help="measure only these rows, e.g. 'onnx INT8' "
                                                             "(the FP32 .pt is always kept)")
    ap.add_argument("--no-map", action="store_true", help="skip the mAP50-95 exports and validation")
    ap.add_argument("--md", default="", help="also write the tables to this markdown file")
    opt = ap.parse_args(argv)
    if opt.no_map and opt.sensitivity:
        ap.error("--sensitivity compares with the FP32 mAP: drop --no-map")
    known = {r.name for r in registry_rows()}
    if set(opt.formats) - known:
        ap.error(f"--formats: unknown {sorted(set(opt.formats) - known)} (rows: {', '.join(sorted(known))})")
    sizes = opt.sizes if opt.sizes is not None else ([] if opt.recommend else [320, 640])
    torch.set_num_threads(opt.threads or ((os.cpu_count() or 1) if opt.recommend else 1))
    ONLY.clear()
    ONLY.update(opt.formats)
    NOTES.clear()
    from utils.checkpoint import load_checkpoint
    from utils.deploy.export import calibration_data
    from utils.general import UserError
    load = os.getloadavg()[0]
    parts = []
    with tempfile.TemporaryDirectory(prefix="bench_formats_") as t:
        tmp = Path(t)
        for pair in opt.weights.split(","):
            model, _, pt = pair.rpartition("=")
            pt = Path(pt)
            model = model or (pt.parent.parent.name if pt.parent.name == "weights" else pt.stem)
            try:
                data = calibration_data(pt, opt.data)
            except UserError:
                data = None
                _note(f"{model}: no data YAML (--data): INT8 rows and mAP skipped")
            train_size = int((load_checkpoint(pt).get("opt") or {}).get("imgsz") or 640)
            if opt.recommend:
                size = sizes[-1] if opt.sizes else train_size
                parts.append(recommend(model, pt, None if opt.no_map else data, size, opt.eval_size or train_size,
                                       opt.rounds, opt.iters, opt.clock, opt.calib_images, tmp))
                continue
            if opt.static_shape:
                parts.append(f"### {model}: fixed-size frames on a --dynamic export\n\n" + static_shape(
                    pt, tmp / model / "static", tuple(opt.static_shape), data, opt.rounds, opt.iters, opt.clock))
            eval_size = opt.eval_size or train_size
            maps, sizes_mb, at_eval = {}, {}, {}
            if not opt.no_map and data:
                at_eval = export_all(pt, tmp / model / str(eval_size), eval_size, data, opt.calib_images,
                                     size_only=not sizes)
                sizes_mb = _sizes_mb(at_eval)
                maps = accuracy(at_eval, data, eval_size)
            ms = {}
            for s in sizes:  # latency only: INT8 on 20 images; the last size also gives the file sizes
                files = export_all(pt, tmp / model / f"speed{s}", s, data, 20, size_only=s == sizes[-1])
                print(f"{model}: timing at {s} ...", file=sys.stderr, flush=True)
                ms[s] = latency(files, s, opt.rounds, opt.iters, opt.clock)
                sizes_mb = _sizes_mb(files)
            fps = video_fps(pt, tmp / model / "video", data, opt.video, opt.rounds, tmp) if opt.video else None
            if ms or maps or fps:
                parts.append(table(model, eval_size, sizes, sizes_mb, ms, maps, fps, opt.clock))
            if opt.sensitivity and "onnx" in at_eval:
                parts.append(f"\n{model}: " + sensitivity(at_eval, data, eval_size, opt.calib_images, tmp, opt.layers))
            print("\n\n".join(parts), file=sys.stderr, flush=True)
    from utils.torch_utils import cpu_bf16_native
    text = (f"{time.strftime('%Y-%m-%d')}, CPU: {cpu_summary()}; batch 1, {torch.get_num_threads()} intra-op "
            f"thread(s) for every runtime "
            f"(load average {load:.2f} before, {os.getloadavg()[0]:.2f} after); native bf16: {cpu_bf16_native()}; "
            f"latency = {'best' if opt.clock == 'wall' else 'median'} of {opt.rounds} interleaved rounds of the "
            f"median of {opt.iters} forwards ({'wall clock' if opt.clock == 'wall' else 'process CPU time'}; model "
            f"only: no decode, pre-processing or NMS); mAP50-95 on the val split, every file on the same images; "
            f"INT8 calibrated on {opt.calib_images} training images.\n\n" + "\n\n".join(parts)
            + "".join(f"\n\nNote: {n}" for n in NOTES) + "\n")
    print(text)
    if opt.md:
        write_md(opt.md, text)
    return text


if __name__ == "__main__":
    main()
