"""What fine-tuning an MMQA model from upstream YOLOv9-C weights transfers, measured end to end.

Why: upstream users start from `yolov9-c.pt`; the way in is `python -m utils.deploy.upstream` (a safe convert)
and then `train_dual.py --weights converted.pt --cfg yolov9-c-MMQARepNCSPELAN4.yaml` (or `-P4P5-kv4`). This
script measures what that path moves, with the very functions training uses (convert, load_checkpoint,
transfer_weights).

With no real `yolov9-c.pt` on the machine (nothing is downloaded), the source is synthetic: this project's
yolov9-c at nc=80, random weights, pickled as whole model objects the way upstream's train.py saves checkpoints
(module paths models.yolo / models.common, as upstream's). Its state-dict keys are upstream's by construction
(tests/test_models.py checks every layer's parameter count against upstream's tables); a real file was not
tried here.

Usage:
    python benchmarks/upstream_transfer.py [--nc 5] [--md benchmarks/results/upstream_transfer.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ("yolov9-c-MMQARepNCSPELAN4.yaml", "yolov9-c-MMQA-P4P5-kv4.yaml", "yolov9-c.yaml")


def measure(nc_values: list[int], folder: Path) -> list[dict]:
    import torch

    from models.yolo import DetectionModel
    from utils.checkpoint import load_checkpoint, transfer_weights
    from utils.deploy.upstream import convert

    upstream = folder / "yolov9-c.pt"
    torch.save({"model": DetectionModel("yolov9-c.yaml", nc=80), "ema": None, "optimizer": None, "epoch": -1},
               upstream)  # upstream's layout: pickled model objects
    ck = load_checkpoint(convert(upstream, folder / "yolov9-c-converted.pt"))
    state = {k: v.float() for k, v in ck["model"].items()}
    rows = []
    for cfg in TARGETS:
        for nc in nc_values:
            t = transfer_weights(DetectionModel(cfg, nc=nc), state, source="yolov9-c-converted.pt",
                                 file_nc=ck["model_yaml"].get("nc"))
            rows.append({"cfg": cfg, "nc": nc, "tensors": f"{t.tensors}/{t.total_tensors}",
                         "params": f"{t.params:,}/{t.total_params:,}", "percent": f"{100 * t.fraction:.1f}",
                         "fresh": "; ".join(t.fresh) or "-"})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nc", type=int, nargs="+", default=[5, 80], help="class counts of the fine-tuning data")
    ap.add_argument("--md", default="", help="write the table to this markdown file")
    opt = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        rows = measure(opt.nc, Path(d))
    cols = ("cfg", "nc", "tensors", "params", "percent", "fresh")
    head = "| model YAML | nc | weight tensors moved | parameters moved | % | starts fresh |\n" + "|---" * 6 + "|\n"
    table = head + "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows)
    print(table)
    if opt.md:
        Path(opt.md).write_text(
            "# Fine-tuning from upstream YOLOv9-C weights: what transfers\n\n"
            "Command: `python benchmarks/upstream_transfer.py --md benchmarks/results/upstream_transfer.md`\n\n"
            "Source: a synthetic upstream-format `yolov9-c.pt` (this project's yolov9-c, nc=80, pickled as model "
            "objects like upstream's checkpoints), converted with `python -m utils.deploy.upstream`, then loaded "
            "by `transfer_weights` as `train_dual.py --weights` does. Weight tensors = parameters and BatchNorm "
            "statistics (BatchNorm `num_batches_tracked` counters are not counted). Not measured on a real "
            "upstream file. Counts, not timings: the same on any machine (run on an AMD EPYC Zen 4, 2 "
            "cores).\n\n" + table)
    return rows


if __name__ == "__main__":
    main()
