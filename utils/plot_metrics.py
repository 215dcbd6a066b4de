"""Metric plots written during validation: PR / F1 / P / R curves and the confusion matrix."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curve(recall: np.ndarray, precision: np.ndarray, ap50: np.ndarray, save_path: str | Path,
                  names: Sequence[str] = ()) -> Path:
    """Precision (rows = classes, sampled at `recall`) vs recall at IoU 0.5, with the class mean."""
    plt = _plt()
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 1, figsize=(9, 6), tight_layout=True)
    show_legend = 0 < len(precision) < 21
    for i, y in enumerate(precision):
        label = f"{names[i] if i < len(names) else i} {ap50[i]:.3f}" if show_legend else None
        ax.plot(recall, y, linewidth=1, label=label)
    if len(precision):
        ax.plot(recall, precision.mean(0), linewidth=3, color="blue",
                label=f"all classes {float(np.mean(ap50)):.3f} mAP@0.5")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title("Precision-Recall Curve")
    fig.savefig(save_path, dpi=150)
    plt.close(fig)
    return save_path


def plot_mc_curve(px: np.ndarray, py: np.ndarray, save_path: str | Path, names: Sequence[str] = (),
                  xlabel: str = "Confidence", ylabel: str = "Metric") -> Path:
    """A metric vs confidence curve per class plus the class mean (marking its maximum)."""
    plt = _plt()
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 1, figsize=(9, 6), tight_layout=True)
    show_legend = 0 < len(py) < 21
    for i, y in enumerate(py):
        ax.plot(px, y, linewidth=1, label=(names[i] if i < len(names) else str(i)) if show_legend else None)
    if len(py):
        mean = py.mean(0)
        i = int(mean.argmax())
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[i]:.2f} at {px[i]:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(f"{ylabel}-{xlabel} Curve")
    fig.savefig(save_path, dpi=150)
    plt.close(fig)
    return save_path


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], save_path: str | Path,
                          normalize: bool = True) -> Path:
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
    fig.savefig(save_path, dpi=150)
    plt.close(fig)
    return save_path
