"""Train every zoo model on the bundled shapes dataset with one schedule, then tabulate mAP50 and mAP50-95.

Why: a cost table means little without accuracy from the same training; this runs train_dual.py once per
model with identical flags (several at a time on one GPU if asked) and reads each run's results.csv.
The reported epoch is the one best.pt keeps (highest fitness 0.1 * mAP50 + 0.9 * mAP50-95).

Usage:
    python benchmarks/train_zoo.py [--models yolov9-t,...] [--epochs 20 --imgsz 128 --batch-size 16]
        [--device 0] [--jobs 4] [--timeout 3600] [--csv benchmarks/results/zoo_map.csv] [--md zoo_map.md]
    python benchmarks/train_zoo.py --collect runs/zooA,runs/zooB [--at-epoch 15] --csv ... --md ...
--collect trains nothing: it reads finished (or stopped) runs from one or more project folders and
reports each model's mean over them; --at-epoch compares every model at the same epoch of the schedule,
for runs stopped early. On 2 CPU cores the c-scale models take hours each; on one GPU, minutes.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ZOO = ["yolov9-t", "yolov9-t-MMQA", "gelan-t", "gelan-t-MMQA", "yolov9-c", "gelan-c", "yolov9-c-MMQARepNCSPELAN4",
       "yolov9-c-MMQA-P4P5", "yolov9-c-MMQA-P4P5-kv4", "yolov9-c-MMQA-P3P4P5", "gelan-c-MMQA-P4P5",
       "gelan-c-MMQARepNCSPELAN4"]
FIELDS = ["model", "mAP50", "mAP50-95", "best_epoch", "epochs_done", "epochs", "imgsz", "batch", "wall_s", "status",
          "runs", "mAP50_runs", "mAP50-95_runs"]


def prepare(data: str) -> None:
    """Generate the dataset and write its label caches once, so parallel runs only read them."""
    from utils.data.config import load_data_config
    from utils.data.verify import scan_dataset
    cfg = load_data_config(data)
    for split in ("train", "val"):
        scan_dataset(cfg[split], cfg.nc, prefix=f"{split}: ")


def command(name: str, opt: argparse.Namespace) -> list[str]:
    return [sys.executable, str(ROOT / "train_dual.py"), "--cfg", f"models/detect/{name}.yaml", "--data", opt.data,
            "--epochs", str(opt.epochs), "--imgsz", str(opt.imgsz), "--batch-size", str(opt.batch_size),
            "--device", opt.device, "--workers", str(opt.workers), "--seed", "0", "--noplots",
            "--project", opt.project, "--name", name, "--exist-ok", "--optimizer", opt.optimizer]


def best_row(results_csv: Path, at_epoch: int | None = None) -> dict:
    """The epoch best.pt keeps (or epoch at_epoch), from a run's results.csv; no metrics if that epoch is missing."""
    if not results_csv.is_file():
        return {}
    with results_csv.open(newline="") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    if at_epoch is not None:
        picked = [r for r in rows if int(r["epoch"]) == at_epoch]
    else:
        from utils.metrics import fitness
        picked = [max(rows, key=lambda r: fitness([0, 0, float(r["metrics/mAP_0.5"]), float(r["metrics/mAP_0.5:0.95"])]))] \
            if rows else []
    if not picked:
        return {"epochs_done": len(rows)}
    r = picked[0]
    return {"mAP50": float(r["metrics/mAP_0.5"]), "mAP50-95": float(r["metrics/mAP_0.5:0.95"]),
            "best_epoch": int(r["epoch"]), "epochs_done": len(rows)}


def collect(projects: list[str], models: list[str], at_epoch: int | None) -> list[dict]:
    """Each model's metrics averaged over the project folders that hold a run of it (per-run values kept)."""
    out = []
    for m in models:
        runs = [best_row(Path(p) / m / "results.csv", at_epoch) for p in projects]
        runs = [r for r in runs if "mAP50" in r]
        if not runs:
            continue
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("mAP50", "mAP50-95")}
        out.append({"model": m, **mean, "best_epoch": "/".join(str(r["best_epoch"]) for r in runs),
                    "epochs_done": "/".join(str(r["epochs_done"]) for r in runs), "runs": len(runs),
                    "mAP50_runs": "/".join(f"{r['mAP50']:.3f}" for r in runs),
                    "mAP50-95_runs": "/".join(f"{r['mAP50-95']:.3f}" for r in runs), "status": "collected"})
    return out


def run_all(models: list[str], opt: argparse.Namespace) -> list[dict]:
    """Run up to opt.jobs trainings at once; stop whatever is still running at opt.timeout seconds."""
    from utils.general import LOGGER
    project = Path(opt.project)
    project.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    pending, running, done = list(models), {}, {}
    t_end = time.time() + opt.timeout
    while pending or running:
        while pending and len(running) < opt.jobs:
            name = pending.pop(0)
            log = (project / f"{name}.log").open("w")
            running[name] = (subprocess.Popen(command(name, opt), cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT), time.time(), log)
            LOGGER.info(f"started {name}")
        for name, (proc, t0, log) in list(running.items()):
            timed_out = time.time() > t_end
            if proc.poll() is None and not timed_out:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            status = "timeout" if timed_out and proc.returncode != 0 else ("ok" if proc.returncode == 0 else
                                                                         f"exit {proc.returncode}")
            done[name] = {"model": name, "wall_s": round(time.time() - t0), "status": status,
                          **best_row(project / name / "results.csv", opt.at_epoch)}
            LOGGER.info(f"finished {name}: {done[name]}")
            del running[name]
        if time.time() > t_end:
            for name in pending:
                done[name] = {"model": name, "status": "not started"}
            pending = []
        time.sleep(1)
    return [{"epochs": opt.epochs, "imgsz": opt.imgsz, "batch": opt.batch_size, **done[m]} for m in models]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Same-schedule training of the model zoo on a dataset; mAP table")
    ap.add_argument("--models", default=",".join(ZOO), help="comma list of models/detect YAML stems")
    ap.add_argument("--data", default="data/shapes.yaml")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--optimizer", default="SGD", help="as train_dual.py; SGD reproduces the recorded table "
                                                       "(measured before --optimizer auto became the default)")
    ap.add_argument("--device", default="", help="as train_dual.py: '' (auto), cpu, 0")
    ap.add_argument("--workers", type=int, default=2, help="dataloader workers per run")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (a GPU has room for several)")
    ap.add_argument("--timeout", type=float, default=24 * 3600, help="seconds; runs still going are stopped")
    ap.add_argument("--project", default="runs/zoo")
    ap.add_argument("--csv", default="", help="write the table as CSV (columns model, mAP50, ... for plot_zoo.py)")
    ap.add_argument("--md", default="", help="write the table as markdown")
    ap.add_argument("--at-epoch", type=int, default=None, help="report this epoch (0-based) instead of best.pt's")
    ap.add_argument("--collect", default="", help="comma list of project folders to read instead of training")
    opt = ap.parse_args(argv)

    models = [m for m in opt.models.split(",") if m]
    from utils.general import UserError
    missing = [m for m in models if not (ROOT / "models" / "detect" / f"{m}.yaml").is_file()]
    if missing:
        raise UserError(f"unknown model(s): {', '.join(missing)} (no models/detect/<name>.yaml)")
    if opt.collect:
        rows = collect([p for p in opt.collect.split(",") if p], models, opt.at_epoch)
        if not rows:
            raise UserError(f"{opt.collect}: no results.csv with the requested epoch for any model")
    else:
        prepare(opt.data)
        rows = run_all(models, opt)
    which = f"epoch {opt.at_epoch}" if opt.at_epoch is not None else "epoch"
    lines = [f"| model | mAP50 | mAP50-95 | {which} | epochs run | runs (mAP50) | wall s | status |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('mAP50', float('nan')):.3f} | {r.get('mAP50-95', float('nan')):.3f} | "
                     f"{r.get('best_epoch', '-')} | {r.get('epochs_done', 0)} | {r.get('mAP50_runs', '-')} | "
                     f"{r.get('wall_s', '-')} | {r['status']} |")
    print("\n".join(lines))
    if opt.csv:
        Path(opt.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(opt.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows([{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    if opt.md:
        Path(opt.md).write_text(f"Same schedule for every model: {opt.data}, {opt.epochs} epochs, {opt.imgsz} px, "
                                f"batch {opt.batch_size}, seed 0, data YAML train_defaults otherwise.\n\n"
                                + "\n".join(lines) + "\n")


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
