"""Training data loader: epoch-start gap with per-epoch vs persistent workers, and images/s (mosaic).

Why: with per-epoch workers every epoch begins by forking/starting N processes, re-running worker init and
refilling the prefetch queue while the GPU waits; persistent workers (utils/data/loader.py) only refill.
The gap = time from iter(loader) to the first batch, for epochs after the first (the first is start-up
in both cases); close_mosaic() is called half way so the measurement also covers a live state change.
Loader img/s next to training img/s: benchmarks/bench_gpu.py --speed (via bench_data.bench).

    python benchmarks/bench_loader.py [--data data/shapes.yaml] [--images 64] [--imgsz 640] [--workers 2]
        [--epochs 4] [--batch-size 16] [--md benchmarks/results/loader.md]

--scaling: loader images/s with 0, 1, 2 workers (this code and, with --base, a base checkout's, in interleaved
rounds, each measurement a fresh process) on bench_pipeline.py's generated 1280x720 camera-like JPEG set, beside
one training step of --model on this machine, so cores per GPU = training img/s / loader img/s per worker.

    python benchmarks/bench_loader.py --scaling [--base /tmp/base-24] [--model yolov9-t] [--rounds 3]
        [--md benchmarks/results/loader_scaling.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.harness import run_worker, write_md  # noqa: E402
from utils.data import create_dataloader, load_data_config  # noqa: E402


def _subset_list(train, n: int, folder: Path) -> Path:
    """A .txt image list with the first n training images (short epochs, same images)."""
    from utils.data.verify import IMG_FORMATS
    roots = train if isinstance(train, (list, tuple)) else [train]
    files = sorted(str(p) for r in roots for p in Path(r).rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)[:n]
    out = folder / "subset.txt"
    out.write_text("\n".join(files) + "\n")
    return out


def epoch_gaps(source, nc: int, imgsz: int, workers: int, batch_size: int, epochs: int, hyp: dict,
               persistent: bool) -> dict:
    """Seconds from iter(loader) to the first batch per epoch, and each epoch's images/s."""
    loader, ds = create_dataloader(source, imgsz, batch_size, 32, hyp=hyp, augment=True, workers=workers,
                                   shuffle=True, nc=nc, persistent=persistent)
    gaps, rates = [], []
    for e in range(epochs):
        if e == epochs // 2:
            ds.close_mosaic()
        t0 = time.perf_counter()
        it = iter(loader)
        n = len(next(it)[0])
        gaps.append(time.perf_counter() - t0)
        for b in it:
            n += len(b[0])
        rates.append(n / (time.perf_counter() - t0))
    return {"gaps": gaps, "img_s": rates}


def loader_rate(cfg: dict) -> dict:
    """(In a fresh process) images/s of one training loader after `warm` batches (workers started, buffers
    filled), for the code under cfg['code'] (this checkout or a base one)."""
    sys.path.insert(0, cfg["code"])
    for name in [m for m in sys.modules if m == "utils" or m.startswith("utils.")]:
        del sys.modules[name]  # this checkout's utils may be imported already
    from utils.data import create_dataloader as make
    from utils.general import LOGGER
    LOGGER.setLevel("WARNING")
    loader, _ = make(cfg["source"], cfg["imgsz"], cfg["batch"], 32, hyp=cfg["hyp"], augment=True,
                     workers=cfg["workers"], shuffle=True, nc=5)

    def batches():
        while True:
            yield from loader
    it = batches()
    for _ in range(cfg["warm"]):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(cfg["batches"]):
        n += len(next(it)[0])
    return {"img_s": n / (time.perf_counter() - t0)}


def train_step_rate(cfg: dict) -> dict:
    """(In a fresh process, OpenMP threads passive) training images/s of cfg['model'] (forward, loss, backward,
    SGD step; AMP on CUDA) on this machine."""
    import torch
    model_name, imgsz, batch, steps = cfg["model"], cfg["imgsz"], cfg["batch"], cfg.get("steps", 2)
    from benchmarks.harness import random_targets
    from models.yolo import DetectionModel
    from utils.loss import DetectionLoss
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = DetectionModel(f"{model_name}.yaml").to(dev).train()
    loss_fn = DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    imgs, targets = torch.rand(batch, 3, imgsz, imgsz, device=dev), random_targets(batch, model.nc).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=dev.type == "cuda"):
            loss, _ = loss_fn(model(imgs), targets)
        loss.backward()
        opt.step()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"img_s": batch * steps / (time.perf_counter() - t0), "device": str(dev), "threads": torch.get_num_threads()}


def scaling(opt, hyp: dict) -> dict:
    """Loader images/s for 0/1/2 workers (base and this code, interleaved rounds) beside a training step."""
    from benchmarks.bench_pipeline import SETS, make_set
    src = make_set(Path(opt.root) / "1280x720_boxes", *SETS["1280x720 boxes"])
    codes = {"new": str(ROOT)} | ({"base": str(Path(opt.base).resolve())} if opt.base else {})
    rates: dict = {}
    for _ in range(opt.rounds):
        for w in opt.scaling_workers:
            for name, code in codes.items():
                cfg = dict(code=code, source=str(src), imgsz=opt.imgsz, batch=opt.batch_size, hyp=hyp, workers=w,
                           warm=opt.warm_batches, batches=opt.timed_batches)
                r = run_worker(__file__, "loader", cfg, timeout=1800)
                if "error" in r:
                    raise RuntimeError(f"{name}, {w} workers: {r['error']}")
                rates.setdefault((name, w), []).append(r["img_s"])
    train = run_worker(__file__, "train", dict(model=opt.model, imgsz=opt.imgsz, batch=opt.train_batch,
                                              omp_passive=True), timeout=3600)
    if "error" in train:
        raise RuntimeError(f"training step: {train['error']}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"Training loader images/s at {opt.imgsz} px (mosaic, {Path(opt.hyp).name}), batch {opt.batch_size}, "
             f"1280x720 camera-like JPEGs (256 files), {opt.warm_batches} warm-up batches then {opt.timed_batches} "
             f"timed; median of {opt.rounds} interleaved rounds, each a fresh process; {os.cpu_count()} CPUs "
             f"shared with other jobs (1-min load {load:.1f} at the end).", "",
             "| workers | " + " | ".join(f"{k} img/s" for k in codes) + (" | new / base |" if opt.base else " |"),
             "|---:|" + "---:|" * (len(codes) + bool(opt.base))]
    for w in opt.scaling_workers:
        med = {k: statistics.median(rates[k, w]) for k in codes}
        row = f"| {w} | " + " | ".join(f"{med[k]:.1f}" for k in codes)
        if opt.base:
            row += f" | {statistics.median(a / b for a, b in zip(rates['new', w], rates['base', w])):.2f}x"
        lines.append(row + " |")
    lines += ["", f"Training step beside it: {opt.model} at {opt.imgsz} px, batch {opt.train_batch}, "
                  f"{train['device']} ({train['threads']} threads): {train['img_s']:.2f} img/s."]
    text = "\n".join(lines)
    print(text)
    if opt.md:
        cmd = (f"python benchmarks/bench_loader.py --scaling --base {opt.base} --rounds {opt.rounds} --warm-batches "
               f"{opt.warm_batches} --timed-batches {opt.timed_batches} --md {opt.md}")
        write_md(opt.md, "# Training loader scaling\n\n" + text + f"\n\nCommand: `{cmd}`\n")
    return {"rates": {f"{k[0]}:{k[1]}": v for k, v in rates.items()}, "train": train}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml"))
    p.add_argument("--images", type=int, default=64, help="training images per epoch (first N of the split)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--md", default="", help="write the table as markdown")
    p.add_argument("--scaling", action="store_true", help="images/s for 0/1/2 workers beside a training step")
    p.add_argument("--scaling-workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base", default="", help="--scaling: also measure this checkout's loader")
    p.add_argument("--root", default="/tmp/bench_pipeline_sets", help="--scaling: generated sets folder")
    p.add_argument("--model", default="yolov9-t", help="--scaling: model whose training step is measured")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm-batches", type=int, default=6)
    p.add_argument("--timed-batches", type=int, default=12)
    opt = p.parse_args(argv)
    hyp = yaml.safe_load(Path(opt.hyp).read_text())
    if opt.scaling:
        return scaling(opt, hyp)
    data = load_data_config(opt.data)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        src = _subset_list(data.train, opt.images, Path(tmp))
        res = {}
        for persistent in (False, True):  # interleave twice so machine noise hits both alike
            for _ in range(2):
                r = epoch_gaps(src, data.nc, opt.imgsz, opt.workers, opt.batch_size, opt.epochs, hyp, persistent)
                best = res.get(persistent)
                if best is None or statistics.mean(r["gaps"][1:]) < statistics.mean(best["gaps"][1:]):
                    res[persistent] = r
    old, new = (statistics.mean(res[k]["gaps"][1:]) for k in (False, True))
    old_r, new_r = (statistics.mean(res[k]["img_s"][1:]) for k in (False, True))
    lines = [f"Training loader at {opt.imgsz} px (mosaic {hyp.get('mosaic')}, close_mosaic half way), "
             f"{opt.images} images/epoch, batch {opt.batch_size}, {opt.workers} workers, {opt.epochs} epochs, "
             f"{os.cpu_count()} CPUs, load average {load:.2f}; best of 2 runs each", "",
             "| workers | epoch-start gap s (epochs 2..) | epoch img/s (epochs 2..) | gaps per epoch s |",
             "|---|---:|---:|---|"]
    for k, name in ((False, "per-epoch (old)"), (True, "persistent")):
        g = res[k]["gaps"]
        lines.append(f"| {name} | {statistics.mean(g[1:]):.3f} | {statistics.mean(res[k]['img_s'][1:]):.1f} | "
                     + ", ".join(f"{x:.3f}" for x in g) + " |")
    lines += ["", f"Epoch-start gap ratio old / persistent: {old / new:.2f}x; epoch img/s ratio "
                  f"persistent / old: {new_r / old_r:.2f}x"]
    text = "\n".join(lines)
    print(text)
    if opt.md:
        write_md(opt.md, text + "\n")
    return {"gap_old": old, "gap_new": new}


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--_worker":
        import json
        fn = {"loader": loader_rate, "train": train_step_rate}[sys.argv[2]]
        print("RESULT " + json.dumps(fn(json.loads(sys.argv[3]))), flush=True)
    else:
        from utils.general import cli
        cli(main)()
