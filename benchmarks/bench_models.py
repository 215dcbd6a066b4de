"""Model zoo benchmark: parameters, true GFLOPs (attention included) next to the thop-style figure,
CPU inference latency and peak memory, and CPU training throughput.

Why: thop does not see attention matmuls, so a Mobile MQA model looks cheap on paper; this table puts the
honest cost (formula-counted attention FLOPs, measured latency and memory) beside the usual one.

Every measurement (one model at one image size, or one model's training steps) runs in a fresh
subprocess, so its peak RSS growth (ru_maxrss after the runs minus ru_maxrss right before the first
forward) is its own. Latency = median of repeated batch-1 forwards of the fused model after warm-up.
Training = forward + backward + SGD step with the real utils/loss.DetectionLoss on random targets.
The machine's load average is recorded with every row: on a shared machine compare rows of one run.

Usage:
    python benchmarks/bench_models.py [--models yolov9-t,yolov9-c] [--imgsz 320,640] [--repeats 3]
        [--csv benchmarks/results/models.csv --md benchmarks/results/models.md [--append]] [--no-train]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import (mem_baseline, mem_peak_growth, random_targets,  # noqa: E402
                                run_worker as _run_worker, write_md)


def run_worker(kind: str, cfg: dict, timeout: float) -> dict:
    return _run_worker(__file__, kind, cfg, timeout)

BASE_MODELS = ["yolov9-t", "yolov9-t-MMQA", "yolov9-c", "gelan-c", "yolov9-c-MMQARepNCSPELAN4", "yolov9-c-MMQA-P4P5"]
FIELDS = ["model", "imgsz", "params", "gflops_640", "thop_gflops_640", "attention_gflops_640", "latency_ms", "latency_runs",
          "peak_mib", "train_img_s", "train_batch", "train_peak_mib", "load"]


def default_models() -> list[str]:
    """The base list plus every other *MMQA* YAML shipped in models/detect."""
    extra = sorted(p.stem for p in (ROOT / "models" / "detect").glob("*MMQA*.yaml") if p.stem not in BASE_MODELS)
    return BASE_MODELS + extra


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def worker_infer(cfg: dict) -> dict:
    """Fresh process: fused eval model, batch-1 latency and peak RSS growth, then the FLOP counts."""
    import torch
    from models.yolo import DetectionModel, model_info
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = DetectionModel(cfg["model"]).eval()
    if cfg["fuse"]:
        model.fuse()
    s = cfg["imgsz"]
    x = torch.rand(1, 3, s, s)
    base = mem_baseline()
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(cfg["warmup"]):
            model(x)
        t_start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            if len(times) >= cfg["repeats"] or (time.perf_counter() - t_start > cfg["max_seconds"]
                                                and len(times) >= cfg["min_repeats"]):
                break
    peak = mem_peak_growth(base)
    del model
    info = model_info(DetectionModel(cfg["model"]), imgsz=640)  # unfused like upstream; quoted at 640 always
    return {"latency_ms": statistics.median(times) * 1e3, "latency_runs": len(times), "peak_mib": peak,
            "params": info["parameters"], "gflops_640": info["gflops"], "thop_gflops_640": info["thop_gflops"],
            "attention_gflops_640": info["attention_gflops"]}


def worker_train(cfg: dict) -> dict:
    """Fresh process: forward + DetectionLoss + backward + SGD steps on random images and targets."""
    import torch
    from models.yolo import DetectionModel
    from utils.loss import DetectionLoss
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = DetectionModel(cfg["model"]).train()
    loss_fn = DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    b, s = cfg["batch"], cfg["imgsz"]
    imgs = torch.rand(b, 3, s, s)
    targets = random_targets(b, model.nc)
    base = mem_baseline()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(imgs), targets)
        loss.backward()
        opt.step()
        return float(loss)

    for _ in range(cfg["warmup"]):
        step()
    t0 = time.perf_counter()
    losses = [step() for _ in range(cfg["steps"])]
    dt = time.perf_counter() - t0
    return {"train_img_s": b * cfg["steps"] / dt, "train_peak_mib": mem_peak_growth(base),
            "train_batch": b, "finite": all(map(lambda v: v == v and abs(v) < float("inf"), losses))}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Newer measurements of the same (model, imgsz) replace older fields; order of first appearance kept."""
    out: dict = {}
    for r in old + new:
        key = (r["model"], str(r["imgsz"]))
        cur = out.setdefault(key, {k: "" for k in FIELDS})
        cur.update({k: v for k, v in r.items() if k in FIELDS and v not in ("", None)})
    return list(out.values())


def _f(v, fmt: str) -> str:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return "-"


def format_table(rows: list[dict]) -> list[str]:
    """Wide markdown table, one line per model; FLOPs are always quoted at 640x640."""
    sizes = sorted({int(r["imgsz"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], int(r["imgsz"])): r for r in rows}
    ref = next((by[(m, 640)] for m in models if m == "yolov9-c" and (m, 640) in by), None)
    head = ["model", "params (M)", "GFLOPs true @640", "thop GFLOPs @640", "attention GFLOPs @640"]
    for s in sizes:
        head += [f"latency ms @{s}", f"peak MiB @{s}"]
    head += ["x yolov9-c latency @640", "train img/s", "train peak MiB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        r640 = by.get((m, 640))
        fl = next((by[(m, s)] for s in sizes if (m, s) in by and by[(m, s)].get("params")), {})
        cells = [m, _f(float(fl.get("params") or "nan") / 1e6, ".2f"), _f(fl.get("gflops_640"), ".1f"),
                 _f(fl.get("thop_gflops_640"), ".1f"), _f(fl.get("attention_gflops_640"), ".1f")]
        for s in sizes:
            r = by.get((m, s), {})
            cells += [_f(r.get("latency_ms"), ".0f"), _f(r.get("peak_mib"), ".0f")]
        rel = "-"
        if ref is not None and r640 is not None and r640.get("latency_ms") and ref.get("latency_ms"):
            rel = f"{float(r640['latency_ms']) / float(ref['latency_ms']):.2f}"
        tr = next((by[(m, s)] for s in sizes if (m, s) in by and by[(m, s)].get("train_img_s")), {})
        tr_cell = f"{_f(tr.get('train_img_s'), '.2f')} (b{tr.get('train_batch')}@{tr.get('imgsz')})" if tr else "-"
        cells += [rel, tr_cell, _f(tr.get("train_peak_mib"), ".0f")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Params, true/thop GFLOPs, CPU latency, memory and training speed per model")
    ap.add_argument("--models", default="", help="comma-separated YAML names/paths (default: zoo + every *MMQA* YAML)")
    ap.add_argument("--imgsz", default="320,640", help="comma-separated inference sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per model and size (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-repeats", type=int, default=2, help="at least this many even past --max-seconds")
    ap.add_argument("--max-seconds", type=float, default=45.0, help="stop repeating after this long")
    ap.add_argument("--no-fuse", action="store_true", help="time the unfused model")
    ap.add_argument("--omp-active", action="store_true",
                    help="keep OpenMP's spin-waiting (default: workers run with OMP_WAIT_POLICY=PASSIVE)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-throughput measurement")
    ap.add_argument("--train-imgsz", type=int, default=320)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2, help="timed optimiser steps after one warm-up step")
    ap.add_argument("--csv", default="", help="CSV output (one row per model and size)")
    ap.add_argument("--md", default="", help="markdown table output")
    ap.add_argument("--append", action="store_true", help="merge into an existing --csv instead of overwriting")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is abandoned")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    opt = ap.parse_args(argv)

    if opt._worker:
        kind, cfg = opt._worker[0], json.loads(opt._worker[1])
        print("RESULT " + json.dumps(worker_infer(cfg) if kind == "infer" else worker_train(cfg)), flush=True)
        return

    from models.yolo import resolve_cfg
    from utils.general import LOGGER, UserError
    models = [m.strip() for m in opt.models.split(",") if m.strip()] or default_models()
    for m in models:
        resolve_cfg(m)  # UserError for an unknown model before any long run
    try:
        sizes = [int(s) for s in opt.imgsz.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"bench_models.py: --imgsz must be comma-separated integers, got {opt.imgsz!r}") from None
    if not sizes or min(sizes) < 32 or any(s % 32 for s in sizes):
        raise UserError("bench_models.py: --imgsz sizes must be positive multiples of 32")
    if opt.append and not opt.csv:
        raise UserError("bench_models.py: --append needs --csv")

    LOGGER.info(f"models: {', '.join(models)}; sizes {sizes}; repeats {opt.repeats} after {opt.warmup} warm-up; "
                f"load avg {_load():.2f} on {os.cpu_count()} CPUs")
    new_rows: list[dict] = []
    for m in models:
        name = Path(m).stem
        for s in sizes:
            cfg = dict(model=m, imgsz=s, fuse=not opt.no_fuse, warmup=opt.warmup, repeats=opt.repeats,
                       min_repeats=opt.min_repeats, max_seconds=opt.max_seconds, threads=opt.threads,
                       omp_passive=not opt.omp_active)
            load0 = _load()
            r = run_worker("infer", cfg, opt.timeout)
            row = {"model": name, "imgsz": s, "load": f"{(load0 + _load()) / 2:.2f}"}
            if "error" in r:
                LOGGER.warning(f"{name} @{s}: {r['error']}")
            else:
                row.update(r)
                LOGGER.info(f"{name} @{s}: {r['latency_ms']:.0f} ms (n={r['latency_runs']}), peak +{r['peak_mib']:.0f} MiB, "
                            f"{r['gflops_640']:.1f} GFLOPs@640 true ({r['thop_gflops_640']:.1f} thop + "
                            f"{r['attention_gflops_640']:.1f} attention), {r['params']:,} params [load {row['load']}]")
            new_rows.append(row)
        if not opt.no_train:
            cfg = dict(model=m, imgsz=opt.train_imgsz, batch=opt.train_batch, warmup=1, steps=opt.train_steps,
                       threads=opt.threads, omp_passive=not opt.omp_active)
            r = run_worker("train", cfg, opt.timeout)
            if "error" in r:
                LOGGER.warning(f"{name} training: {r['error']}")
                continue
            LOGGER.info(f"{name} training @{opt.train_imgsz} b{opt.train_batch}: {r['train_img_s']:.2f} img/s, "
                        f"peak +{r['train_peak_mib']:.0f} MiB, finite loss {r['finite']}")
            row = next((x for x in new_rows if x["model"] == name and x["imgsz"] == opt.train_imgsz), None)
            if row is None:
                row = {"model": name, "imgsz": opt.train_imgsz, "load": f"{_load():.2f}"}
                new_rows.append(row)
            row.update({k: r[k] for k in ("train_img_s", "train_peak_mib", "train_batch")})

    rows = merge_rows(read_rows(Path(opt.csv)) if (opt.append and opt.csv) else [], new_rows)
    table = format_table(rows)
    LOGGER.info("\n" + "\n".join(table))
    if opt.csv:
        Path(opt.csv).parent.mkdir(parents=True, exist_ok=True)
        with Path(opt.csv).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        LOGGER.info(f"wrote {opt.csv}")
    if opt.md:
        import torch
        loads = [float(r["load"]) for r in rows if r.get("load") not in ("", None)]
        md = ["# Model zoo on CPU", "",
              f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {opt.threads or torch.get_num_threads()}, "
              f"OMP_WAIT_POLICY {'default' if opt.omp_active else 'PASSIVE'}, fp32, batch 1 inference of the "
              f"{'unfused' if opt.no_fuse else 'fused'} model (median of <= {opt.repeats} runs after warm-up), "
              f"training = forward + DetectionLoss + backward + SGD step on random data. "
              f"GFLOPs: true = thop convolutions + attention matmuls by formula; thop alone misses attention.",
              f"Peak MiB = peak RSS (VmHWM, reset just before the first forward/step) minus RSS at that point, "
              f"fresh process per cell. "
              f"Shared machine: 1-min load average during the rows {min(loads, default=0):.1f}-{max(loads, default=0):.1f}.",
              "", *table, ""]
        write_md(opt.md, "\n".join(md))
        LOGGER.info(f"wrote {opt.md}")


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
