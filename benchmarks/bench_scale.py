"""Datasets of many images: first scan, build from the cache, peak memory, one loader pass and the loader workers'
private memory, for this code and (with --base) an older checkout side by side in the same run. Not a test.

    python benchmarks/bench_scale.py 100000 [--data-root /work/scale_data] [--base /path/to/old/checkout]

Generates N small JPEGs (64-160 x 48-120 px, 1-20 boxes each, 80 classes) once under --data-root/n<N> and reuses
them. Every phase runs in a fresh process (`--_worker`); with --base the same phase runs for both trees back to back
(old first), each tree keeping its own label cache (moved aside while the other runs, both use labels/train.cache).
Peak RSS is reported above an "empty" dataset: the same process after imports and a 16-image dataset build.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CHUNK = 2000


# ---------------------------------------------------------------------------------------------- the data
def _write_chunk(args: tuple) -> int:
    """Images [lo, hi) of a dataset: flat-coloured rectangles on a flat background, a YOLO label file each."""
    import cv2
    import numpy as np
    root, lo, hi, seed = args
    rng = np.random.default_rng([seed, lo])
    img_dir, lb_dir = Path(root) / "images" / "train", Path(root) / "labels" / "train"
    for i in range(lo, hi):
        w, h = int(rng.integers(64, 161)), int(rng.integers(48, 121))
        img = np.empty((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        rows = []
        for _ in range(int(rng.integers(1, 21))):
            bw, bh = rng.uniform(0.05, 0.5, 2)
            xc, yc = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
            x1, y1 = int((xc - bw / 2) * w), int((yc - bh / 2) * h)
            x2, y2 = int((xc + bw / 2) * w), int((yc + bh / 2) * h)
            img[y1:y2, x1:x2] = rng.integers(0, 256, 3, dtype=np.uint8)
            rows.append(f"{int(rng.integers(0, 80))} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}\n")
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
        (img_dir / f"{i:07d}.jpg").write_bytes(buf.tobytes())
        (lb_dir / f"{i:07d}.txt").write_text("".join(rows))
    return hi - lo


def generate(root: Path, n: int, workers: int = 2, seed: int = 0) -> Path:
    """root/images/train + root/labels/train with n images; reused when root/DONE says n."""
    done = root / "DONE"
    if done.is_file() and done.read_text().strip() == str(n):
        return root
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), lo, min(lo + CHUNK, n), seed) for lo in range(0, n, CHUNK)]
    t0, made = time.time(), 0
    with ProcessPoolExecutor(workers) as pool:
        for k in pool.map(_write_chunk, jobs):
            made += k
            if made % (50 * CHUNK) == 0 or made == n:
                print(f"generated {made}/{n} images in {time.time() - t0:.0f} s", flush=True)
    done.write_text(str(n))
    return root


# ---------------------------------------------------------------------------------------------- one phase
def _private_mib(pid: int) -> float | None:
    """Memory only this process holds (Private_Clean + Private_Dirty from /proc/<pid>/smaps_rollup), MiB."""
    try:
        kb = sum(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Private_"))
        return kb / 1024
    except OSError:
        return None


def _phase(kind: str, tree: str, images: str, tiny: str, workers: int, batch: int, pass_images: int) -> dict:
    """Runs in a fresh interpreter with `tree` first on sys.path."""
    sys.path.insert(0, tree)
    sys.path.insert(1, str(HERE))
    import logging
    from benchmarks.harness import mem_baseline, mem_peak_growth
    from utils.data import YOLODataset, create_dataloader
    from utils.general import LOGGER
    LOGGER.setLevel(logging.WARNING)
    YOLODataset(tiny, imgsz=64, augment=True, nc=80)  # the "empty" dataset: imports and first-use costs
    base = mem_baseline()
    t0 = time.perf_counter()
    if kind != "pass":
        ds = YOLODataset(images, imgsz=64, augment=True, nc=80)
        return {"s": time.perf_counter() - t0, "peak_mib": mem_peak_growth(base), "n": len(ds),
                "verified": getattr(ds, "verified", None)}
    loader, ds = create_dataloader(images, 64, batch, 32, augment=True, workers=workers, shuffle=True, nc=80,
                                   hyp={"mosaic": 1.0, "mixup": 0.0})
    build = time.perf_counter() - t0
    total = min(len(loader), -(-pass_images // batch)) if pass_images else len(loader)
    marks = {max(1, round(total * f)) for f in (0.01, 0.25, 0.5, 0.75, 1.0)}
    it = iter(loader)
    pids = [w.pid for w in it._workers]
    priv, n, t1 = {}, 0, time.perf_counter()
    for k in range(1, total + 1):
        n += next(it)[0].shape[0]
        if k in marks:
            priv[f"{k / total:.2f}"] = [_private_mib(p) for p in pids]
    sec = time.perf_counter() - t1
    del it
    return {"s": sec, "images": n, "img_s": n / sec, "build_s": build, "private_mib": priv}


def run_phase(kind: str, tree: str, images: Path, tiny: Path, opt) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_phase", kind, tree, str(images), str(tiny),
           str(opt.workers), str(opt.batch), str(opt.pass_images)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=tree)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]}


# ---------------------------------------------------------------------------------------------- the run
class CacheSlots:
    """Both trees write labels/train.cache; each keeps its own file here between its phases."""

    def __init__(self, root: Path):
        self.live = root / "labels" / "train.cache"

    def slot(self, side: str) -> Path:
        return self.live.with_name(f"train.cache.{side}")

    def enter(self, side: str, with_cache: bool) -> None:
        self.live.unlink(missing_ok=True)
        if with_cache and self.slot(side).exists():
            os.replace(self.slot(side), self.live)

    def leave(self, side: str) -> None:
        if self.live.exists():
            os.replace(self.live, self.slot(side))


def warm(root: Path) -> None:
    """Read every file once so neither tree pays for a cold page cache."""
    for d in (root / "images" / "train", root / "labels" / "train"):
        with os.scandir(d) as it:
            for e in it:
                with open(e.path, "rb") as f:
                    f.read()


def edit_labels(root: Path, k: int = 10) -> list[tuple[Path, str]]:
    """Append a box to k label files spread over the split; returns what to restore."""
    files = sorted((root / "labels" / "train").glob("*.txt"))
    picked = files[:: max(1, len(files) // k)][:k]
    saved = [(f, f.read_text()) for f in picked]
    for f, text in saved:
        f.write_text(text + "1 0.5 0.5 0.1 0.1\n")
    return saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, nargs="?", default=10_000, help="images in the generated split")
    p.add_argument("--data-root", default="/work/scale_data")
    p.add_argument("--base", default="", help="an older checkout (e.g. a git worktree) run side by side")
    p.add_argument("--base-max", type=int, default=200_000, help="skip the base tree above this many images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pass-images", type=int, default=0, help="images in the timed pass (0 = one epoch)")
    p.add_argument("--no-pass", action="store_true")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--_phase", nargs=7, help=argparse.SUPPRESS)
    opt = p.parse_args()
    if opt._phase:
        kind, tree, images, tiny, workers, batch, pass_images = opt._phase
        print("RESULT " + json.dumps(_phase(kind, tree, images, tiny, int(workers), int(batch), int(pass_images))))
        return
    data_root = Path(opt.data_root)
    root, tiny = generate(data_root / f"n{opt.n}", opt.n), generate(data_root / "n16", 16)
    images = root / "images" / "train"
    sides = [("new", str(HERE))]
    if opt.base and opt.n <= opt.base_max:
        sides.insert(0, ("old", str(Path(opt.base).resolve())))
    slots = CacheSlots(root)
    for side, _ in sides:
        slots.slot(side).unlink(missing_ok=True)
    print(f"{opt.n} images under {root}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    warm(root)
    out = {"n": opt.n, "sides": [s for s, _ in sides], "load_start": os.getloadavg()[0]}
    phases = [("first scan", "build", False), ("cached build", "build", True)]
    for name, kind, cached in phases:
        for side, tree in sides:
            slots.enter(side, cached)
            r = run_phase(kind, tree, images, tiny, opt)
            slots.leave(side)
            out[f"{name}|{side}"] = r
            print(f"  {name:<24} {side:<4} {json.dumps(r)}", flush=True)
    saved = edit_labels(root)
    try:
        for side, tree in sides:
            slots.enter(side, True)
            r = run_phase("build", tree, images, tiny, opt)
            slots.leave(side)
            out[f"10 labels edited|{side}"] = r
            print(f"  {'10 labels edited':<24} {side:<4} {json.dumps(r)}", flush=True)
    finally:
        for f, text in saved:
            f.write_text(text)
    if not opt.no_pass:
        for side, tree in sides:
            slots.enter(side, True)
            r = run_phase("pass", tree, images, tiny, opt)
            slots.leave(side)
            out[f"pass|{side}"] = r
            print(f"  {'one pass':<24} {side:<4} {json.dumps(r)}", flush=True)
    for side, _ in sides:
        slots.slot(side).unlink(missing_ok=True)
    out["load_end"] = os.getloadavg()[0]
    if opt.json:
        Path(opt.json).write_text(json.dumps(out, indent=1))
    print(f"load average at the end {out['load_end']:.1f}")


if __name__ == "__main__":
    main()
