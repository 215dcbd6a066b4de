"""Accuracy (or cost) vs CPU latency scatter of the model zoo, from bench_models.py's CSV.

Why: a picture of the speed/accuracy trade-off that includes the honest attention cost. With a mAP CSV
(columns model, mAP50) the y axis is mAP50; without one it falls back to true GFLOPs at 640, so the plot
is useful before any training has finished.

Usage:
    python benchmarks/plot_zoo.py --csv benchmarks/results/models.csv [--map map.csv] [--imgsz 640] [--out zoo.png]
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Plot accuracy (or GFLOPs) vs CPU latency of the model zoo")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "models.csv"), help="bench_models.py CSV")
    ap.add_argument("--map", default="", help="optional CSV with columns model, mAP50")
    ap.add_argument("--imgsz", type=int, default=640, help="which latency column (image size) to plot")
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
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for i, (name, lat, y) in enumerate(sorted(pts, key=lambda p: (p[1], p[2]))):
        mmqa = "MMQA" in name
        ax.scatter(lat, y, s=40, marker="o" if mmqa else "s", color="tab:red" if mmqa else "tab:blue")
        # stagger labels vertically so that models with near-equal latency stay readable
        ax.annotate(name, (lat, y), textcoords="offset points", xytext=(5, 4 + 9 * (i % 4)), fontsize=7)
    ax.set_xscale("log")
    if not maps:
        ax.set_yscale("log")  # GFLOPs span 10x-100x between tiny and attention-heavy models
    ax.set_xlabel(f"CPU latency, batch 1 @{opt.imgsz} (ms, log)")
    ax.set_ylabel("mAP50" if maps else "true GFLOPs @640 (attention included)")
    ax.set_title("Model zoo: " + ("accuracy" if maps else "cost") + " vs CPU latency (red = Mobile MQA)")
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(opt.out)
    plt.close(fig)
    LOGGER.info(f"wrote {opt.out} ({len(pts)} models)")


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
