"""Small-data training benchmark: upstream's optimizer recipe vs `--optimizer auto`, at equal epochs.

Why: a user's first custom dataset is often a few dozen images. At nominal batch 64 such a set makes about
one optimizer step per epoch and upstream's SGD barely moves in the whole run; `--optimizer auto` picks
AdamW there. This trains the same model on the same data, seeds and epochs under each setting
and reports mAP50 / mAP50-95 per epoch (train_dual.py's validation of the EMA model).

python benchmarks/train_small.py                                  # 40 hard synthetic images, old vs new
python benchmarks/train_small.py --data my.yaml --epochs 100       # any small dataset YAML
python benchmarks/train_small.py --finetune runs/train/exp/weights/best.pt --epochs 10   # fine-tuning

Settings (all at batch 16, upstream hyp data/hyps/hyp.scratch-high.yaml unless --hyp):
  old         --optimizer SGD: upstream's recipe (SGD lr0 0.01, upstream warmup)
  new         --optimizer auto (the default)
  adamw-upw   AdamW with auto's lr/beta1/bias-lr but upstream's warmup (to measure the warmup cap)
  adamw-2e-3  AdamW lr0 0.002, capped warmup (fine-tuning: auto's scratch lr instead of its fine-tune lr)
  fp32, bf16  --optimizer auto with --no-amp / --amp (on CPU: bf16 autocast), to decide the CPU precision default
Each run is a train_dual.py subprocess with one torch thread; --jobs runs several at once. A finished run
(results.csv complete) is reused, so re-running only adds what is missing and rebuilds the report.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.engine.train.optim import AUTO_ADAMW_BETA1, AUTO_ADAMW_LR, AUTO_WARMUP_MAX_FRAC  # noqa: E402

LABELS = {"old": "old: --optimizer SGD (upstream)", "new": "new: --optimizer auto",
          "adamw-upw": "AdamW, upstream warmup", "adamw-2e-3": "AdamW lr0 0.002",
          "fp32": "--optimizer auto --no-amp (fp32)", "bf16": "--optimizer auto --amp (CPU: bf16 autocast)"}
# Harder than the bundled set: smaller objects, more of them per image (more clutter), few images.
HARD = dict(obj_size=(0.08, 0.25), max_objects=10)


def make_data(root: Path, n_train: int, n_val: int, seed: int, shift: bool = False) -> Path:
    """Generate (once) a small hard shapes set and its data YAML; `shift` gives a different-looking set
    (other seed, smaller objects, larger images) for the fine-tuning measurement."""
    from utils.data.synthetic import SHAPE_NAMES, generate_shapes, shapes_complete
    kw = dict(HARD)
    if shift:
        kw.update(obj_size=(0.06, 0.18), sizes=[(320, 240), (288, 224), (256, 320), (320, 320)])
    name = f"small_{'shift_' if shift else ''}{n_train}_{n_val}_s{seed}"
    ds = root / name
    if not shapes_complete(ds):
        generate_shapes(ds, n_train=n_train, n_val=n_val, seed=seed, **kw)
    y = root / f"{name}.yaml"
    y.write_text(yaml.safe_dump({"path": str(ds), "train": "images/train", "val": "images/val",
                                 "names": list(SHAPE_NAMES)}))
    return y


def adamw_hyp(base: Path, out: Path, lr: float, cap: bool) -> Path:
    """A hyp file that makes explicit --optimizer AdamW equal to auto's choice (optionally without the
    warmup cap), so single factors can be compared."""
    hyp = yaml.safe_load(base.read_text())
    hyp.update(lr0=lr, momentum=AUTO_ADAMW_BETA1, warmup_bias_lr=0.0)
    if cap:
        hyp["warmup_max_frac"] = AUTO_WARMUP_MAX_FRAC
    out.write_text(yaml.safe_dump(hyp, sort_keys=False))
    return out


def setting_args(setting: str, hyp: Path, work: Path) -> list[str]:
    if setting == "old":
        return ["--optimizer", "SGD", "--hyp", str(hyp)]
    if setting == "new":
        return ["--optimizer", "auto", "--hyp", str(hyp)]
    if setting == "adamw-upw":
        return ["--optimizer", "AdamW", "--hyp", str(adamw_hyp(hyp, work / "hyp_adamw_upw.yaml", AUTO_ADAMW_LR, False))]
    if setting in ("fp32", "bf16"):  # the default recipe without / with mixed precision
        return ["--optimizer", "auto", "--hyp", str(hyp), "--amp" if setting == "bf16" else "--no-amp"]
    if setting == "adamw-2e-3":
        return ["--optimizer", "AdamW", "--hyp", str(adamw_hyp(hyp, work / "hyp_adamw_2e-3.yaml", 0.002, True))]
    raise SystemExit(f"unknown setting {setting}")


def read_curve(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return [{"epoch": int(float(r["epoch"])), "map50": float(r["metrics/mAP_0.5"]),
             "map": float(r["metrics/mAP_0.5:0.95"])} for r in rows]


def train_one(args: argparse.Namespace, data: Path, setting: str, seed: int, work: Path) -> tuple[str, int, float]:
    name = f"{setting}_s{seed}"
    run = work / "runs" / name
    if len(read_curve(run / "results.csv")) >= args.epochs:
        return setting, seed, float("nan")
    cmd = [sys.executable, str(ROOT / "train_dual.py"), "--data", str(data), "--cfg", args.cfg, "--epochs",
           str(args.epochs), "--imgsz", str(args.imgsz), "--batch-size", str(args.batch), "--workers", "0",
           "--seed", str(seed), "--project", str(work / "runs"), "--name", name, "--exist-ok", "--noplots",
           "--patience", "0", *setting_args(setting, Path(args.hyp), work)]
    if args.finetune:
        cmd += ["--weights", args.finetune]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed (rc {rc}), see {work / f'{name}.log'}")
    return setting, seed, time.time() - t0


def report(args: argparse.Namespace, work: Path, times: dict) -> None:
    import numpy as np
    curves = {(s, seed): read_curve(work / "runs" / f"{s}_s{seed}" / "results.csv")
              for s in args.settings for seed in args.seeds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "seed", "epoch", "mAP50", "mAP50-95"])
        for (s, seed), c in curves.items():
            for r in c:
                w.writerow([s, seed, r["epoch"], f"{r['map50']:.4f}", f"{r['map']:.4f}"])
    lines = [f"# Small-data training: {args.title}", "",
             f"`python benchmarks/train_small.py {' '.join(sys.argv[1:])}`", "",
             f"Model {args.cfg}, {args.epochs} epochs at {args.imgsz} px, batch {args.batch}, hyp {Path(args.hyp).name}, "
             f"seeds {', '.join(map(str, args.seeds))}; data: {args.data_desc}. mAP of the EMA model on the val split "
             f"after each epoch (train_dual.py's own validation); final = last epoch; best = best epoch.", "",
             "| setting | runs | final mAP50 (mean, per seed) | final mAP50-95 | best mAP50 | first epoch >= 0.5 x best final |",
             "|---|---|---|---|---|---|"]
    finals = {}
    for s in args.settings:
        done = [curves[(s, seed)] for seed in args.seeds if len(curves[(s, seed)]) >= args.epochs]
        if not done:
            lines.append(f"| {s} | 0 | not run | | | |")
            continue
        f50 = np.array([c[-1]["map50"] for c in done])
        f95 = np.array([c[-1]["map"] for c in done])
        b50 = np.array([max(r["map50"] for r in c) for c in done])
        finals[s] = f50.mean()
        lines.append(f"| {s} | {len(done)} | {f50.mean():.3f} ({', '.join(f'{v:.3f}' for v in f50)}) | "
                     f"{f95.mean():.3f} | {b50.mean():.3f} | {{reach_{s}}} |")
    if finals:
        target = 0.5 * max(finals.values())
        for s in args.settings:
            done = [curves[(s, seed)] for seed in args.seeds if len(curves[(s, seed)]) >= args.epochs]
            eps = [next((r["epoch"] + 1 for r in c if r["map50"] >= target), None) for c in done]
            txt = ", ".join("never" if e is None else str(e) for e in eps)
            lines = [ln.replace(f"{{reach_{s}}}", f"{txt} (target {target:.3f})") for ln in lines]
    if "fp32" in finals and "bf16" in finals and finals["fp32"] > 0:
        lines += ["", f"**bf16 / fp32 final mAP50: {finals['bf16'] / finals['fp32']:.3f}**"]
    if "old" in finals and finals["old"] > 0:
        for s, v in finals.items():
            if s != "old":
                lines += ["", f"**{s} / old final mAP50: {v / finals['old']:.1f}x**"]
    tfile = work / "wall_times.json"  # kept across invocations: a report rebuilt from finished runs keeps them
    times = {**(json.loads(tfile.read_text()) if tfile.exists() else {}), **{k: v for k, v in times.items() if v == v}}
    tfile.write_text(json.dumps(times))
    if times:
        lines += ["", "Wall time per run (1 torch thread each, "
                  f"{args.jobs} at once on a shared machine): " +
                  ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(times.items()) if v == v)]
    pairs = [(times[f"fp32_s{k}"], times[f"bf16_s{k}"]) for k in args.seeds if f"fp32_s{k}" in times and f"bf16_s{k}" in times]
    if pairs:  # the two precisions of a seed ran side by side, so their ratio is fair on a shared machine
        lines += ["", "fp32 / bf16 wall time per run (speed-up of bf16, per seed): " +
                  ", ".join(f"{a / b:.2f}x" for a, b in pairs)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        colours = dict(zip(args.settings, ["tab:red", "tab:blue", "tab:green", "tab:orange"]))
        for (s, seed), c in curves.items():
            if not c:
                continue
            e = [r["epoch"] + 1 for r in c]
            for ax, key in zip(axes, ("map50", "map")):
                ax.plot(e, [r[key] for r in c], color=colours[s], alpha=0.8, lw=1.2,
                        label=LABELS.get(s, s) if seed == args.seeds[0] else None)
        for ax, t in zip(axes, ("mAP50", "mAP50-95")):
            ax.set_xlabel("epoch"), ax.set_ylabel(t), ax.grid(alpha=0.3), ax.legend()
        fig.suptitle(args.title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=80)
    except ImportError:
        pass
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="dataset YAML (default: generate a small hard shapes set)")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-val", type=int, default=30)
    p.add_argument("--finetune", default="", help="--weights for every run: measure fine-tuning on a shifted set")
    p.add_argument("--settings", nargs="+", default=None, help="default: old new (fine-tune: old new adamw-2e-3)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cfg", default="gelan-t.yaml")
    p.add_argument("--hyp", default=str(ROOT / "data/hyps/hyp.scratch-high.yaml"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "runs/train_small"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train_small"),
                   help="writes OUT.md, OUT.csv, OUT.png")
    args = p.parse_args(argv)
    args.settings = args.settings or (["old", "new", "adamw-2e-3"] if args.finetune else ["old", "new"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data).resolve()
        args.data_desc = f"`{args.data}`"
    else:
        data = make_data(ROOT / "datasets", args.n_train, args.n_val, seed=11 if args.finetune else 7,
                         shift=bool(args.finetune))
        args.data_desc = (f"{args.n_train} train / {args.n_val} val generated shapes images "
                          f"({'shifted: smaller objects, larger images, other seed' if args.finetune else 'hard'}: "
                          f"objects {HARD['obj_size'] if not args.finetune else (0.06, 0.18)} of the short side, "
                          f"up to {HARD['max_objects']} per image)")
    args.title = (f"fine-tune from {Path(args.finetune).name}" if args.finetune else "from scratch") + \
        f", {args.epochs} epochs"
    jobs = [(s, seed) for seed in args.seeds for s in args.settings]
    times = {}
    with ThreadPoolExecutor(max(args.jobs, 1)) as ex:
        for s, seed, dt in ex.map(lambda j: train_one(args, data, j[0], j[1], work), jobs):
            times[f"{s}_s{seed}"] = dt
            print(f"done {s} seed {seed} ({dt / 60:.1f} min)", flush=True)
            report(args, work, times)
    report(args, work, times)


if __name__ == "__main__":
    main()
