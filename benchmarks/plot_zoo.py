"""Accuracy (or cost) vs CPU latency scatter of the model zoo, from bench_models.py's CSV.

Why: a picture of the speed/accuracy trade-off that includes the honest attention cost. With a mAP CSV
(columns model, mAP50) the y axis is mAP50; without one it falls back to true GFLOPs at 640, so the plot
is useful before any training has finished.

With --gpu-json (bench_gpu.py's JSON) a second panel puts the same y against GPU AMP time per image
at the largest batch measured there, where the GPU rather than Python's per-layer overhead sets the pace.

Usage:
    python benchmarks/plot_zoo.py --csv benchmarks/results/models.csv [--map map.csv] [--imgsz 640]
        [--gpu-json benchmarks/results/bench_gpu.json] [--out zoo.png]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _read(path: Path, need: tuple[str, ...]) -> list[dict]:
    from utils.general import UserError
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in need if rows and c not in rows[0]] or ([] if rows else ["any rows"])
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)} (need columns {', '.join(need)})")
    return rows


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def collect(bench_rows: list[dict], map_rows: list[dict] | None, imgsz: int) -> list[tuple[str, float, float]]:
    """(model, latency_ms at imgsz, y) for every model that has both numbers."""
    acc = {r["model"].strip(): _num(r["mAP50"]) for r in map_rows} if map_rows else {}
    cost = {}
    for r in bench_rows:  # GFLOPs are the same in every row of a model; take any filled one
        g = _num(r.get("gflops_640"))
        if g is not None:
            cost[r["model"]] = g
    pts = []
    for r in bench_rows:
        if str(r.get("imgsz")) != str(imgsz):
            continue
        lat = _num(r.get("latency_ms"))
        y = acc.get(r["model"]) if map_rows else cost.get(r["model"])
        if lat is not None and y is not None:
            pts.append((r["model"], lat, y))
    return pts


def gpu_points(path: Path, y_of: dict) -> tuple[list[tuple[str, float, float]], str]:
    """(model, GPU AMP ms per image at the largest batch, y) from bench_gpu.py's JSON."""
    import json
    from utils.general import UserError
    try:
        rows = json.loads(path.read_text())["latency"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a bench_gpu.py JSON ({e})") from None
    batches = sorted(int(k[5:]) for k in rows[0] if k.startswith("amp_b")) if rows else [1]
    b = batches[-1]
    pts = [(r["model"], r[f"amp_b{b}"]["ms"] / b, y_of[r["model"]]) for r in rows if r["model"] in y_of]
    return pts, f"GPU AMP ms per image, batch {b} @640 ({path.stem}, log)"


def _scatter(ax, points: list[tuple[str, float, float]], colours: dict) -> None:
    """One colour per model (same in every panel), squares = convolution-only, circles = Mobile MQA;
    a legend instead of point labels, which overlap where models cost about the same."""
    for name, lat, y in sorted(points, key=lambda p: (-p[2], p[1])):
        ax.scatter(lat, y, s=45, marker="o" if "MMQA" in name else "s", color=colours[name], label=name,
                   edgecolors="black", linewidths=0.4)
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Plot accuracy (or GFLOPs) vs CPU latency of the model zoo")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "models.csv"), help="bench_models.py CSV")
    ap.add_argument("--map", default="", help="optional CSV with columns model, mAP50")
    ap.add_argument("--imgsz", type=int, default=640, help="which latency column (image size) to plot")
    ap.add_argument("--gpu-json", default="", help="optional bench_gpu.py JSON: adds a GPU panel")
    ap.add_argument("--y-label", default="", help="y axis label (default: mAP50 or GFLOPs)")
    ap.add_argument("--out", default="zoo.png", help="PNG path")
    opt = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.general import LOGGER, UserError
    bench = _read(Path(opt.csv), ("model", "imgsz", "latency_ms"))
    maps = _read(Path(opt.map), ("model", "mAP50")) if opt.map else None
    pts = collect(bench, maps, opt.imgsz)
    if not pts:
        raise UserError(f"{opt.csv}: no model has a latency at imgsz {opt.imgsz}"
                        + (" and an mAP50 in " + opt.map if opt.map else " and GFLOPs"))
    panels = [(pts, f"CPU latency, batch 1 @{opt.imgsz} (ms, log)")]
    if opt.gpu_json:
        gpts, glabel = gpu_points(Path(opt.gpu_json), {p[0]: p[2] for p in pts})
        panels.append((gpts, glabel))
    cmap = plt.get_cmap("tab20")
    colours = {name: cmap(i % 20) for i, name in enumerate(sorted({p[0] for pp, _ in panels for p in pp}))}
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), dpi=120, squeeze=False)
    for ax, (points, xlabel) in zip(axes[0], panels):
        _scatter(ax, points, colours)
        if not maps:
            ax.set_yscale("log")  # GFLOPs span 10x-100x between tiny and attention-heavy models
        ax.set_xlabel(xlabel)
        ax.set_ylabel(opt.y_label or ("mAP50" if maps else "true GFLOPs @640 (attention included)"))
    axes[0][0].set_title("Model zoo: " + ("accuracy" if maps else "cost") + " vs latency (circles = Mobile MQA)")
    fig.tight_layout()
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(opt.out)
    plt.close(fig)
    LOGGER.info(f"wrote {opt.out} ({len(pts)} models)")


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
