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
    root, lo, hi, seed, link = args
    rng = np.random.default_rng([seed, lo])
    img_dir, lb_dir = Path(root) / "images" / "train", Path(root) / "labels" / "train"
    for i in range(lo, hi):
        if link and i >= link:  # labels-only variant: the image is a hard link to one of the first `link` images
            rows = [f"{int(rng.integers(0, 80))} " + " ".join(f"{v:.6f}" for v in rng.uniform(0.2, 0.4, 4)) + "\n"
                    for _ in range(int(rng.integers(1, 21)))]
            os.link(img_dir / f"{i % link:07d}.jpg", img_dir / f"{i:07d}.jpg")
            (lb_dir / f"{i:07d}.txt").write_text("".join(rows))
            continue
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


def generate(root: Path, n: int, workers: int = 2, seed: int = 0, link: int = 0) -> Path:
    """root/images/train + root/labels/train with n images; reused when root/DONE says n. link > 0: only the
    first `link` images are distinct files, the others hard links to them (each its own name and label file,
    no image data on disk): every image is still listed, stat'ed and checked."""
    done = root / "DONE"
    if done.is_file() and done.read_text().strip() == str(n):
        return root
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    if link:
        _write_chunk((str(root), 0, min(link, n), seed, 0))
    jobs = [(str(root), lo, min(lo + CHUNK, n), seed, link) for lo in range(min(link, n), n, CHUNK)]
    t0, made = time.time(), min(link, n)
    with ProcessPoolExecutor(workers) as pool:
        for k in pool.map(_write_chunk, jobs):
            made += k
            if made % (50 * CHUNK) == 0 or made == n:
                print(f"generated {made}/{n} images in {time.time() - t0:.0f} s", flush=True)
    done.write_text(str(n))
    return root


# ---------------------------------------------------------------------------------------------- one phase
def _private_mib(pid: int) -> list[float] | None:
    """[Private_Dirty, Private_Clean] of a process, MiB (/proc/<pid>/smaps_rollup). Dirty: its own copies (heap,
    copy-on-write pages of the parent); clean: file pages only it maps right now (e.g. parts of the label store
    no other process has read), which the kernel can drop at any time."""
    try:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in open(f"/proc/{pid}/smaps_rollup")
                                                if line.startswith("Private_"))}
        return [kb.get("Private_Dirty", 0) / 1024, kb.get("Private_Clean", 0) / 1024]
    except OSError:
        return None


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) and of its waited-for children (the scan's worker processes)."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


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
    t0, c0 = time.perf_counter(), _cpu_s()
    if kind == "build":
        ds = YOLODataset(images, imgsz=64, augment=True, nc=80)
        return {"s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "peak_mib": mem_peak_growth(base),
                "n": len(ds), "verified": getattr(ds, "verified", None)}
    # "pass": training (mosaic; each worker keeps a bounded buffer of decoded partners); "plain": letterbox only,
    # nothing kept per image; "plain-empty": the same, but the batches carry no label rows (the workers still read
    # every image's labels): what remains is the dataset itself, without the transport of the label tensors
    if kind == "plain-empty":
        import torch
        collate = YOLODataset.collate_fn
        YOLODataset.collate_fn = staticmethod(lambda batch: (*collate(batch)[:1], torch.zeros(0, 6),
                                                             *collate(batch)[2:]))
    loader, ds = create_dataloader(images, 64, batch, 32, augment=kind == "pass", workers=workers, shuffle=True,
                                   nc=80, hyp={"mosaic": 1.0, "mixup": 0.0})
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
    worker_cpu = sum(_proc_cpu_s(p) or 0.0 for p in pids)
    del it
    return {"s": sec, "images": n, "img_s": n / sec, "worker_cpu_ms": worker_cpu / n * 1e3, "build_s": build,
            "private_mib": priv}


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


def _fmt(r: dict | None, key: str, fmt: str = "{:.2f}") -> str:
    if not r:
        return "-"
    if "error" in r:
        return "error"
    v = r.get(key)
    return "-" if v is None else fmt.format(v)


def _ratio(old: dict | None, new: dict | None, key: str) -> str:
    try:
        return f"{old[key] / new[key]:.1f}x"
    except (TypeError, KeyError, ZeroDivisionError):
        return "-"


def markdown(out: dict, args: str) -> str:
    """This run as a markdown section: previous and this code side by side, ratios previous / this."""
    g = lambda name, side: out.get(f"{name}|{side}")  # noqa: E731
    lines = [f"### {out['n']:,} images", "", f"`python benchmarks/bench_scale.py {args}`; load average "
             f"{out['load_start']:.1f} at the start, {out['load_end']:.1f} at the end (2 shared cores)."
             + (f" Labels-only variant: {out['link']:,} distinct JPEGs, every other image a hard link to one of "
                f"them (own name, own label file; listed, stat'ed and checked like any image)." if out.get("link")
                else ""), "",
             "| phase | previous | this | previous / this |", "|---|---:|---:|---:|"]
    for name in ("first scan", "cached build", "10 labels edited"):
        o, n = g(name, "old"), g(name, "new")
        if not (o or n):
            continue
        what = "rebuild after 10 label files changed" if name == "10 labels edited" else name
        lines.append(f"| {what}: wall s | {_fmt(o, 's')} | {_fmt(n, 's')} | {_ratio(o, n, 's')} |")
        lines.append(f"| {what}: CPU s (all processes) | {_fmt(o, 'cpu_s')} | {_fmt(n, 'cpu_s')} | "
                     f"{_ratio(o, n, 'cpu_s')} |")
        lines.append(f"| {what}: peak RSS above an empty dataset, MB | {_fmt(o, 'peak_mib', '{:.0f}')} | "
                     f"{_fmt(n, 'peak_mib', '{:.0f}')} | {_ratio(o, n, 'peak_mib')} |")
    if g("10 labels edited", "new"):
        lines.append(f"| images checked after 10 label files changed | {out['n']:,} (all) | "
                     f"{_fmt(g('10 labels edited', 'new'), 'verified', '{:,}')} | |")
    def cell(r, m):
        ws = (r or {}).get("private_mib", {}).get(m)
        return " / ".join(f"{w[0]:.0f} + {w[1]:.0f}" if isinstance(w, list) else f"{w:.0f}" for w in ws) if ws else "-"

    passes = [(k, g(k, "old"), g(k, "new")) for k in ("pass", "plain", "plain-empty") if g(k, "old") or g(k, "new")]
    what = {"pass": "training pass (mosaic)", "plain": "plain pass (letterbox only)",
            "plain-empty": "plain pass, batches without label rows"}
    for k, o, n in passes:
        lines.append(f"| {what[k]}, 2 workers, 64 px: images/s | {_fmt(o, 'img_s', '{:.0f}')} | "
                     f"{_fmt(n, 'img_s', '{:.0f}')} | {_ratio(n, o, 'img_s')} (this / previous) |")
        lines.append(f"| {what[k]}: loader workers' CPU ms per image | {_fmt(o, 'worker_cpu_ms')} | "
                     f"{_fmt(n, 'worker_cpu_ms')} | {_ratio(o, n, 'worker_cpu_ms')} |")
    for k, o, n in passes:
        note = {"pass": " The mosaic partner buffer (at most 128 MiB per worker; full after about 11k images at 64 px) "
                        "is part of it.",
                "plain": " Nothing is kept per image.",
                "plain-empty": " The workers read every image's labels but send none: the dataset's own cost."}[k]
        lines += ["", f"Loader workers' private memory over one epoch of the {what[k]}, MB per worker, dirty + clean "
                  f"(smaps_rollup).{note}", "", "| epoch done | previous | this |", "|---|---|---|"]
        marks = sorted(set((o or {}).get("private_mib", {})) | set((n or {}).get("private_mib", {})), key=float)
        lines += [f"| {float(m):.0%} | {cell(o, m)} | {cell(n, m)} |" for m in marks]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, nargs="?", default=10_000, help="images in the generated split")
    p.add_argument("--data-root", default="/work/scale_data")
    p.add_argument("--base", default="", help="an older checkout (e.g. a git worktree) run side by side")
    p.add_argument("--base-max", type=int, default=200_000, help="skip the base tree above this many images")
    p.add_argument("--link-images", type=int, default=0, metavar="K",
                   help="labels-only variant where disk is short: K distinct images, the rest hard links to them")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pass-images", type=int, default=0, help="images in the timed pass (0 = one epoch)")
    p.add_argument("--no-pass", action="store_true")
    p.add_argument("--passes", nargs="+", default=["plain", "plain-empty", "pass"],
                   choices=["plain", "plain-empty", "pass"], help="loader passes to time (each a fresh process)")
    p.add_argument("--only-passes", action="store_true", help="skip the scan phases")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--md", default="", help="add this run's table to this markdown file")
    p.add_argument("--_phase", nargs=7, help=argparse.SUPPRESS)
    opt = p.parse_args()
    if opt._phase:
        kind, tree, images, tiny, workers, batch, pass_images = opt._phase
        print("RESULT " + json.dumps(_phase(kind, tree, images, tiny, int(workers), int(batch), int(pass_images))))
        return
    data_root = Path(opt.data_root)
    name = f"n{opt.n}" + (f"-link{opt.link_images}" if opt.link_images else "")
    root = generate(data_root / name, opt.n, link=opt.link_images)
    tiny = generate(data_root / "n16", 16)
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
    out = {"n": opt.n, "sides": [s for s, _ in sides], "load_start": os.getloadavg()[0], "link": opt.link_images}
    phases = [] if opt.only_passes else [("first scan", "build", False), ("cached build", "build", True)]

    def measure(label: str, key: str, kind: str, side: str, tree: str, cached: bool) -> None:
        """One phase of one tree in a fresh process, its own label cache in place; recorded under key|side."""
        slots.enter(side, cached)
        r = run_phase(kind, tree, images, tiny, opt)
        slots.leave(side)
        out[f"{key}|{side}"] = r
        print(f"  {label:<24} {side:<4} {json.dumps(r)}", flush=True)

    for name, kind, cached in phases:
        for side, tree in sides:
            measure(name, name, kind, side, tree, cached)
    saved = [] if opt.only_passes else edit_labels(root)
    try:
        for side, tree in sides if saved else ():
            measure("10 labels edited", "10 labels edited", "build", side, tree, True)
    finally:
        for f, text in saved:
            f.write_text(text)
    for kind in () if opt.no_pass else opt.passes:
        for side, tree in sides:
            measure(f"one pass ({kind})", kind, kind, side, tree, True)
    for side, _ in sides:
        slots.slot(side).unlink(missing_ok=True)
    out["load_end"] = os.getloadavg()[0]
    if opt.json:
        Path(opt.json).write_text(json.dumps(out, indent=1))
    if opt.md:
        with open(opt.md, "a") as f:
            f.write(markdown(out, " ".join(sys.argv[1:])) + "\n")
    print(f"load average at the end {out['load_end']:.1f}")


if __name__ == "__main__":
    main()
