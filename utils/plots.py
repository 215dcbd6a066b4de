"""Every plot the project writes: labels.jpg, batch mosaics with boxes, results.png, PR / F1 / P / R curves and
the confusion matrix. matplotlib is imported on first use (it is slow to import and detection never needs it)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from utils.general import LOGGER, UserError, write_atomic

# A fixed, colour-blind-friendly-ish palette (BGR) so a class keeps its colour across plots.
_PALETTE_HEX = ["FF3838", "2C99A8", "FF9D97", "00C2FF", "FFB21D", "344593", "CFD231", "6473FF", "48F90A",
                "520085", "92CC17", "CB38FF", "3DDB86", "FF95C8", "1A9334", "FF37C7", "00D4BB", "8438FF",
                "FF701F", "0018EC"]
PALETTE = [(int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)) for h in _PALETTE_HEX]


def class_colour(i: int) -> tuple:
    return PALETTE[int(i) % len(PALETTE)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: str | Path, dpi: int) -> Path | None:
    """Save and close a figure, atomically; a failed write (full disk, read-only folder) is one warning and
    None: plots are extras, the run they illustrate goes on."""
    path, buf = Path(path), io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format=path.suffix[1:])
        write_atomic(path, buf.getvalue())
    except UserError as e:
        LOGGER.warning(f"WARNING: plot not saved: {e}")
        return None
    finally:
        _plt().close(fig)
    return path


def _to_numpy(x):
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_labels(labels, names=(), save_dir: str | Path = ".") -> Path | None:
    """Write save_dir/labels.jpg: instances per class, box centre (x, y) and size (w, h) distributions.

    labels: array [n, 5] (cls, xc, yc, w, h normalised) or a list of per-image arrays.
    """
    plt = _plt()
    import pandas as pd
    import seaborn as sns

    if isinstance(labels, (list, tuple)):
        labels = np.concatenate([_to_numpy(x).reshape(-1, 5) for x in labels], 0) if len(labels) else np.zeros((0, 5))
    labels = _to_numpy(labels).reshape(-1, 5)
    names = list(names.values()) if isinstance(names, dict) else list(names)
    nc = max(len(names), int(labels[:, 0].max()) + 1 if len(labels) else 0, 1)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(labels[:, 1:], columns=["x", "y", "width", "height"])
    fig, ax = plt.subplots(2, 2, figsize=(8, 8), tight_layout=True)
    ax = ax.ravel()
    counts = np.bincount(labels[:, 0].astype(int), minlength=nc)
    bars = ax[0].bar(range(nc), counts, color=[np.array(class_colour(i)[::-1]) / 255 for i in range(nc)])
    ax[0].set_ylabel("instances")
    if 0 < len(names) <= 30:
        ax[0].set_xticks(range(nc), [str(n) for n in names] + [""] * (nc - len(names)), rotation=90, fontsize=8)
    else:
        ax[0].set_xlabel("classes")
    del bars
    if len(df) > 1:
        sns.histplot(df, x="x", y="y", ax=ax[1], bins=50, pmax=0.9)
        sns.histplot(df, x="width", y="height", ax=ax[2], bins=50, pmax=0.9)
    else:
        ax[1].scatter(df["x"], df["y"], s=4)
        ax[2].scatter(df["width"], df["height"], s=4)
    ax[1].set(xlim=(0, 1), ylim=(1, 0), title="box centres")
    ax[2].set(xlim=(0, 1), ylim=(0, 1), title="box sizes")
    # rectangles of (up to) 500 boxes drawn centred, to show typical shapes
    canvas = np.full((500, 500, 3), 255, np.uint8)
    for c, _, _, w, h in labels[:500]:
        x1, y1 = int((0.5 - w / 2) * 500), int((0.5 - h / 2) * 500)
        x2, y2 = int((0.5 + w / 2) * 500), int((0.5 + h / 2) * 500)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), class_colour(c)[::-1], 1)
    ax[3].imshow(canvas)
    ax[3].axis("off")
    ax[3].set_title("box shapes")
    return _savefig(fig, save_dir / "labels.jpg", 150)


def plot_images(images, targets, paths=None, fname: str | Path = "images.jpg", names=(), max_size: int = 1920,
                max_subplots: int = 16, conf_thres: float = 0.25) -> Path:
    """Draw a batch as a grid with boxes; targets [N,6] (img, cls, xc, yc, w, h) or [N,7] (+ conf).

    Box coordinates may be normalised (all <= ~1) or pixels of the network input; predictions with conf
    below conf_thres are not drawn. Images may be uint8 0..255 or float 0..1, [B,3,H,W] RGB.
    """
    images = _to_numpy(images)
    targets = _to_numpy(targets).reshape(-1, _to_numpy(targets).shape[-1] if len(targets) else 6)
    names = list(names.values()) if isinstance(names, dict) else list(names)
    if images.size and images.max() <= 1.0:
        images = images * 255
    bs, _, h, w = images.shape
    bs = min(bs, max_subplots)
    ns = math.ceil(bs ** 0.5)
    scale = min(1.0, max_size / (ns * max(h, w)))
    hs, ws = int(h * scale), int(w * scale)
    grid = np.full((ns * hs, ns * ws, 3), 255, np.uint8)
    fs = max(0.35, min(hs, ws) / 450)
    for i in range(bs):
        x0, y0 = (i % ns) * ws, (i // ns) * hs
        im = images[i].transpose(1, 2, 0)[..., ::-1].clip(0, 255).astype(np.uint8)  # RGB CHW -> BGR HWC
        if scale < 1:
            im = cv2.resize(im, (ws, hs), interpolation=cv2.INTER_AREA)
        grid[y0:y0 + hs, x0:x0 + ws] = im
        cv2.rectangle(grid, (x0, y0), (x0 + ws - 1, y0 + hs - 1), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            cv2.putText(grid, Path(str(paths[i])).name[:40], (x0 + 4, y0 + int(14 * fs / 0.35)),
                        cv2.FONT_HERSHEY_SIMPLEX, fs, (220, 220, 220), 1, cv2.LINE_AA)
        t = targets[targets[:, 0] == i] if len(targets) else targets
        if not len(t):
            continue
        boxes = t[:, 2:6].astype(np.float64).copy()
        if boxes.max() <= 1.01:  # normalised
            boxes[:, [0, 2]] *= w
            boxes[:, [1, 3]] *= h
        boxes *= scale
        has_conf = t.shape[1] > 6
        for j, (cx, cy, bw, bh) in enumerate(boxes):
            conf = float(t[j, 6]) if has_conf else None
            if conf is not None and conf < conf_thres:
                continue
            c = int(t[j, 1])
            col = class_colour(c)  # BGR, like the grid
            p1 = (int(x0 + cx - bw / 2), int(y0 + cy - bh / 2))
            p2 = (int(x0 + cx + bw / 2), int(y0 + cy + bh / 2))
            cv2.rectangle(grid, p1, p2, col, 1 if min(hs, ws) < 300 else 2)
            label = names[c] if c < len(names) else str(c)
            if conf is not None:
                label += f" {conf:.2f}"
            cv2.putText(grid, label, (p1[0], max(p1[1] - 2, y0 + 8)), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.9, col, 1,
                        cv2.LINE_AA)
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(fname), grid):
        LOGGER.warning(f"WARNING: could not write {fname}")
    return fname


def plot_results(file: str | Path = "results.csv", dir: str | Path | None = None) -> Path | None:
    """Plot every numeric column of results.csv against the epoch into results.png beside it."""
    plt = _plt()
    import pandas as pd

    file = Path(dir) / "results.csv" if dir is not None else Path(file)
    try:
        df = pd.read_csv(file)
    except (OSError, ValueError) as e:
        LOGGER.warning(f"WARNING: cannot plot {file}: {e}")
        return None
    df.columns = [c.strip() for c in df.columns]
    x_col = "epoch" if "epoch" in df.columns else None
    cols = [c for c in df.columns if c != x_col and pd.api.types.is_numeric_dtype(df[c])]
    if not cols or df.empty:
        return None
    n = len(cols)
    ncols = min(5, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), tight_layout=True, squeeze=False)
    x = df[x_col] if x_col else np.arange(len(df))
    for ax, c in zip(axes.ravel(), cols):
        y = df[c].astype(float)
        ax.plot(x, y, marker=".", linewidth=1.5, markersize=5)
        if len(y) > 4:  # light smoothing to show the trend
            ax.plot(x, y.rolling(3, center=True, min_periods=1).mean(), ":", color="tab:orange", linewidth=1.5)
        ax.set_title(c, fontsize=10)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return _savefig(fig, file.with_name("results.png"), 150)


# ---- validation metric plots ----

def _save_curve(fig, ax, save_path: str | Path, xlabel: str, ylabel: str, title: str) -> Path | None:
    """The frame both 0..1 curve plots share: labels, unit axes, legend outside, saved and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(title)
    return _savefig(fig, save_path, 150)


def plot_pr_curve(recall: np.ndarray, precision: np.ndarray, ap50: np.ndarray, save_path: str | Path,
                  names: Sequence[str] = ()) -> Path | None:
    """Precision (rows = classes, sampled at `recall`) vs recall at IoU 0.5, with the class mean."""
    fig, ax = _plt().subplots(1, 1, figsize=(9, 6), tight_layout=True)
    show_legend = 0 < len(precision) < 21
    for i, y in enumerate(precision):
        label = f"{names[i] if i < len(names) else i} {ap50[i]:.3f}" if show_legend else None
        ax.plot(recall, y, linewidth=1, label=label)
    if len(precision):
        ax.plot(recall, precision.mean(0), linewidth=3, color="blue",
                label=f"all classes {float(np.mean(ap50)):.3f} mAP@0.5")
    return _save_curve(fig, ax, save_path, "Recall", "Precision", "Precision-Recall Curve")


def plot_mc_curve(px: np.ndarray, py: np.ndarray, save_path: str | Path, names: Sequence[str] = (),
                  xlabel: str = "Confidence", ylabel: str = "Metric") -> Path | None:
    """A metric vs confidence curve per class plus the class mean (marking its maximum)."""
    fig, ax = _plt().subplots(1, 1, figsize=(9, 6), tight_layout=True)
    show_legend = 0 < len(py) < 21
    for i, y in enumerate(py):
        ax.plot(px, y, linewidth=1, label=(names[i] if i < len(names) else str(i)) if show_legend else None)
    if len(py):
        mean = py.mean(0)
        i = int(mean.argmax())
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[i]:.2f} at {px[i]:.3f}")
    return _save_curve(fig, ax, save_path, xlabel, ylabel, f"{ylabel}-{xlabel} Curve")


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], save_path: str | Path,
                          normalize: bool = True) -> Path | None:
    """Heatmap of a (nc+1)^2 confusion matrix (rows predicted, columns true); labels include background."""
    plt = _plt()
    import seaborn as sn

    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    m = matrix.astype(np.float64)
    if normalize:
        m = m / (m.sum(0, keepdims=True) + 1e-9)
    m[m < 0.005] = np.nan  # leave near-empty cells blank
    n = len(labels)
    fig, ax = plt.subplots(1, 1, figsize=(12, 9), tight_layout=True)
    tick = list(labels) if n < 30 else "auto"
    sn.heatmap(m, ax=ax, annot=n < 30, annot_kws={"size": 8}, cmap="Blues", fmt=".2f" if normalize else ".0f",
               square=True, vmin=0.0, xticklabels=tick, yticklabels=tick).set_facecolor((1, 1, 1))
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix" + (" (normalised)" if normalize else ""))
    return _savefig(fig, save_path, 150)


def plot_evolve(file: str | Path, keys: Sequence[str]) -> Path | None:
    """evolve.png beside evolve.csv: the fitness of every trial against each searched hyperparameter, the best
    finished trial starred, pruned/failed trials grey (their fitness is that of an unfinished training)."""
    plt = _plt()
    import pandas as pd

    file = Path(file)
    try:
        df = pd.read_csv(file)
    except (OSError, ValueError) as e:
        LOGGER.warning(f"WARNING: cannot plot {file}: {e}")
        return None
    keys = [k for k in keys if k in df.columns]
    if df.empty or not keys:
        return None
    done = df[df["state"] == "COMPLETE"]
    other = df[df["state"] != "COMPLETE"]
    best = done.loc[done["fitness"].idxmax()] if len(done) and done["fitness"].notna().any() else None
    ncols = min(5, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), tight_layout=True, squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        ax.scatter(other[k], other["fitness"], s=12, c="0.7", marker="x", label="pruned/failed")
        ax.scatter(done[k], done["fitness"], s=14, c=done["trial"], cmap="viridis", label="finished")
        if best is not None:
            ax.plot(best[k], best["fitness"], "*", color="tab:red", markersize=12)
        ax.set_title(f"{k} = {best[k]:.3g}" if best is not None else k, fontsize=10)
        ax.set_xlabel(k, fontsize=8)
    axes[0, 0].set_ylabel("fitness")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    return _savefig(fig, file.with_name("evolve.png"), 120)
