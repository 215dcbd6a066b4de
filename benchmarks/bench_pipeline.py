"""Training data pipeline per CPU core: a base checkout's code path vs this one, side by side, one thread.

Why: a GPU box has a few CPU cores per GPU, and the loader's images/s per core decides whether the GPU waits.
Each code path runs in its own long-lived process (like a persistent loader worker) with one thread; the
processes take turns, round by round, on the same generated JPEG sets, so machine noise hits both alike and the
reported ratio is the median of per-round ratios. Paths: `base` (the checkout given by --base, e.g.
`git worktree add /tmp/base-24 4caf148`), `upstream` (this code with upstream=True: full decodes and fresh
partners, only the cheaper augment steps) and `new` (this code's default). Sets (generated once under --root):
1280x720 and 4032x3024 camera-like JPEGs with box labels, and 1280x720 with polygon labels; 64 or 32 distinct
images hard-linked under 256 names, so the dataset is larger than the partner buffer (steady state: one decode
per sample) while the files stay in the page cache. A separate cProfile pass splits the time into stages.

    python benchmarks/bench_pipeline.py --base /tmp/base-24 [--rounds 8] [--md benchmarks/results/pipeline.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SETS = {"1280x720 boxes": ((1280, 720), 64, False), "4032x3024 boxes": ((4032, 3024), 32, False),
        "1280x720 polygons": ((1280, 720), 64, True)}
NAMES = 256  # file names per set (> the partner buffer at 640 px, 109 images)
STAGES = {  # stage -> (file suffix or '~' for C functions, function names); time of C calls is their own time
    "decode": ("~", ("<imread>", "<imdecode>", "numpy.fromfile")),
    "resize": ("~", ("<resize>",)),
    "label re-read": ("dataset.py", ("segments",)),
    "mosaic": ("augment.py", ("mosaic4",)),
    "copy-paste": ("augment.py", ("copy_paste",)),
    "perspective": ("augment.py", ("random_perspective",)),
    "mixup": ("augment.py", ("mixup",)),
    "hsv": ("augment.py", ("augment_hsv",)),
}


def _photo(rng, w: int, h: int):
    """Camera-like content: a smooth colour field, texture and sensor-like noise (JPEG sizes of real photos)."""
    import cv2
    import numpy as np
    small = rng.integers(0, 255, (max(h // 64, 2), max(w // 64, 2), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    img += cv2.resize(rng.normal(0, 8, (h // 2, w // 2, 3)).astype(np.float32), (w, h))
    img += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_set(root: Path, size: tuple[int, int], distinct: int, polygons: bool, seed: int = 0) -> Path:
    """`distinct` JPEGs (quality 90) with 4-10 filled ellipses each, labelled as boxes or 36-point outlines,
    hard-linked under NAMES file names. Returns the images folder (reused when complete)."""
    import cv2
    import numpy as np
    w, h = size
    images, labels = root / "images", root / "labels"
    if images.is_dir() and len(list(images.glob("*.jpg"))) == NAMES:
        return images
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(distinct):
        img, rows = _photo(rng, w, h), []
        for _ in range(int(rng.integers(4, 11))):
            ax = rng.uniform(0.03, 0.2, 2) * min(w, h)
            c = rng.uniform(ax.max() + 1, [w, h] - ax.max() - 1)  # any rotation stays inside the image
            pts = cv2.ellipse2Poly((int(c[0]), int(c[1])), (int(ax[0]), int(ax[1])), int(rng.integers(0, 180)),
                                   0, 360, 10)[:-1]
            cv2.fillPoly(img, [pts], rng.integers(0, 255, 3).tolist())
            cls, p = int(rng.integers(0, 5)), pts / [w, h]
            if polygons:
                rows.append(f"{cls} " + " ".join(f"{v:.5f}" for v in p.ravel()))
            else:
                (x1, y1), (x2, y2) = p.min(0), p.max(0)
                rows.append(f"{cls} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
        cv2.imwrite(str(images / f"d{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (labels / f"d{i}.txt").write_text("\n".join(rows) + "\n")
    for k in range(NAMES - distinct):
        (images / f"n{k}.jpg").hardlink_to(images / f"d{k % distinct}.jpg")
        (labels / f"n{k}.txt").write_text((labels / f"d{k % distinct}.txt").read_text())
    return images


# ---------------------------------------------------------------- the per-code-path process
def serve(code_root: str) -> None:
    """Answer JSON commands on stdin with one JSON line each: {"set", "mode", "n", "profile"} -> timings."""
    import cProfile
    import pstats
    import random

    import cv2
    import numpy as np
    import torch
    sys.path.insert(0, code_root)
    from utils.data import YOLODataset
    from utils.general import LOGGER
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    LOGGER.setLevel("WARNING")
    datasets, orders = {}, {}
    for line in sys.stdin:
        cmd = json.loads(line)
        key = (cmd["set"], cmd["mode"])
        if key not in datasets:
            kw = {"upstream": True} if cmd["mode"] == "upstream" else {}
            datasets[key] = YOLODataset(cmd["path"], imgsz=cmd["imgsz"], augment=True, hyp=cmd["hyp"], nc=5, **kw)
            orders[key] = (np.random.default_rng(0).permutation(len(datasets[key])).tolist(), 0)
            random.seed(0)
            np.random.seed(0)
        ds, (order, pos) = datasets[key], orders[key]
        prof = cProfile.Profile() if cmd.get("profile") else None
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        for k in range(cmd["n"]):
            ds[order[(pos + k) % len(order)]]
        if prof:
            prof.disable()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        orders[key] = (order, pos + cmd["n"])
        out = {"s": dt, "cpu": cpu, "n": cmd["n"]}
        if prof:
            out["stages"], out["decodes"], out["total"] = _stages(pstats.Stats(prof).stats)
        print(json.dumps(out), flush=True)


def _stages(stats: dict) -> tuple[dict, int, float]:
    """Seconds per stage (C calls: own time; Python functions: cumulative), decode calls, total seconds."""
    sec, decodes, total = {k: 0.0 for k in STAGES}, 0, 0.0
    for (file, _, func), (_, calls, own, cum, _) in stats.items():
        if func == "__getitem__" and file.endswith("dataset.py"):
            total += cum
        for stage, (where, names) in STAGES.items():
            if where == "~" and file == "~" and any(n in func for n in names):
                sec[stage] += own
                decodes += calls if stage == "decode" and "fromfile" not in func else 0
            elif where != "~" and file.endswith(where) and func in names:
                sec[stage] += cum
    return sec, decodes, total


class CodePath:
    """One served code path: a child process fed one command at a time."""

    def __init__(self, code_root: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--_serve", code_root], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=code_root)

    def run(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark process ended (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="checkout of the code to compare against")
    p.add_argument("--root", default="/tmp/bench_pipeline_sets", help="where the generated sets live")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--hyp", default=str(HERE.parents[1] / "data" / "hyps" / "hyp.scratch-high.yaml"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--items", type=int, default=24, help="samples per round on 1280x720 (a quarter on 4032x3024)")
    p.add_argument("--warmup", type=int, default=64, help="samples per path before timing (fills the buffer)")
    p.add_argument("--profile-items", type=int, default=32)
    p.add_argument("--md", default="")
    opt = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parents[1]))
    import yaml
    hyp = yaml.safe_load(Path(opt.hyp).read_text())
    paths = {name: make_set(Path(opt.root) / name.replace(" ", "_"), *SETS[name]) for name in opt.sets}
    procs = {"base": CodePath(str(Path(opt.base).resolve())), "upstream": CodePath(str(HERE.parents[1])),
             "new": CodePath(str(HERE.parents[1]))}
    mode = {"base": "default", "upstream": "upstream", "new": "default"}
    rates = {(s, k): [] for s in opt.sets for k in procs}
    cpu_rates = {(s, k): [] for s in opt.sets for k in procs}  # images per CPU-second of the process
    prof: dict = {}
    try:
        for s in opt.sets:
            n = opt.items if s.startswith("1280") else max(opt.items // 4, 2)
            common = dict(set=s, path=str(paths[s]), imgsz=opt.imgsz, hyp=hyp)
            for k, pr in procs.items():
                pr.run(**common, mode=mode[k], n=opt.warmup if k == "new" else 4)
            for _ in range(opt.rounds):
                for k, pr in procs.items():
                    r = pr.run(**common, mode=mode[k], n=n)
                    rates[s, k].append(r["n"] / r["s"])
                    cpu_rates[s, k].append(r["n"] / r["cpu"])
            for k, pr in procs.items():
                pn = opt.profile_items if s.startswith("1280") else max(opt.profile_items // 4, 2)
                prof[s, k] = pr.run(**common, mode=mode[k], n=pn, profile=True)
    finally:
        for pr in procs.values():
            pr.close()
    return report(opt, rates, cpu_rates, prof)


def report(opt, rates: dict, cpu_rates: dict, prof: dict) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rounds = len(next(iter(rates.values())))
    lines = [f"Training samples per second, one thread per code path, {opt.imgsz} px, mosaic with "
             f"{Path(opt.hyp).name}; {rounds} interleaved rounds, medians; {os.cpu_count()} CPUs shared with "
             f"other jobs (1-min load {load:.1f} at the end). base = {opt.base}; upstream = this code with "
             f"--upstream-loader; new = this code's default. img per CPU-s = samples per second of the process's "
             f"own CPU time (what one otherwise idle core would make, less sensitive to the load).", "",
             "| set | base img/s | upstream img/s | new img/s | new / base | upstream / base | base / new img per "
             "CPU-s | decodes per sample base / new |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    out = {}
    for s in opt.sets:
        med = {k: statistics.median(rates[s, k]) for k in ("base", "upstream", "new")}
        ratio = statistics.median(n / b for n, b in zip(rates[s, "new"], rates[s, "base"]))
        up = statistics.median(n / b for n, b in zip(rates[s, "upstream"], rates[s, "base"]))
        dec = {k: prof[s, k]["decodes"] / prof[s, k]["n"] for k in ("base", "new")}
        per_cpu = {k: statistics.median(cpu_rates[s, k]) for k in ("base", "new")}
        out[s] = ratio
        lines.append(f"| {s} | {med['base']:.1f} | {med['upstream']:.1f} | {med['new']:.1f} | **{ratio:.2f}x** | "
                     f"{up:.2f}x | {per_cpu['base']:.1f} / {per_cpu['new']:.1f} | "
                     f"{dec['base']:.2f} / {dec['new']:.2f} |")
    lines += ["", "Milliseconds per sample by stage (one cProfile pass per path; the profiler inflates Python-heavy "
                  "stages alike for every path):", "",
              "| set | path | " + " | ".join(STAGES) + " | other | total |",
              "|---|---|" + "---:|" * (len(STAGES) + 2)]
    for s in opt.sets:
        for k in ("base", "upstream", "new"):
            r = prof[s, k]
            ms = {st: v / r["n"] * 1e3 for st, v in r["stages"].items()}
            total = r["total"] / r["n"] * 1e3
            lines.append(f"| {s} | {k} | " + " | ".join(f"{ms[st]:.2f}" for st in STAGES)
                         + f" | {total - sum(ms.values()):.2f} | {total:.2f} |")
    text = "\n".join(lines)
    print(text)
    if opt.md:
        from benchmarks.harness import write_md
        write_md(opt.md, "# Training data pipeline per CPU core\n\n" + text + "\n\nCommand: `python "
                 f"benchmarks/bench_pipeline.py --base {opt.base} --rounds {opt.rounds} --items {opt.items} "
                 f"--md {opt.md}`\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_serve":
        serve(sys.argv[2])
    else:
        sys.path.insert(0, str(HERE.parents[1]))
        from utils.general import cli
        cli(main)()
