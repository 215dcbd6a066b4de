"""Validate a trained detector: P, R, mAP50, mAP50-95 per class, plots, optional txt/COCO-JSON output.

    python val_dual.py --weights runs/train/exp/weights/best.pt --data data/shapes.yaml --img 640
    python val_dual.py --weights a.pt b.pt          # ensemble: boxes of both models merged before NMS
    python val_dual.py --weights best.pt --save-json  # + pycocotools check (GT JSON from the labels if needed)
    python val_dual.py --weights best.pt --task speed # timing at conf 0.25 / IoU 0.45, no plots
Results go to runs/val/exp{N}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.checkpoint import find_newest  # noqa: E402
from utils.general import cli  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=str, default="data/shapes.yaml", help="dataset YAML")
    p.add_argument("--weights", nargs="+", type=str, default=None,
                   help="model .pt file(s); several = ensemble (default: newest runs/train/*/weights/best.pt)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                   help="inference size in pixels (default: the size the weights were trained or exported at, else 640)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.7, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", choices=("val", "test", "speed"), help="val, test or speed")
    p.add_argument("--device", default="", help="cuda device, e.g. 0 or 0,1, or cpu")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--augment", action="store_true", help="test-time augmentation (scales 1/0.83/0.67 + flip)")
    p.add_argument("--verbose", action="store_true", help="report mAP by class")
    p.add_argument("--save-txt", action="store_true", help="save results to labels/<stem>.txt")
    p.add_argument("--save-hybrid", action="store_true",
                   help="save label+prediction hybrid results to *.txt (GT boxes merged in; metrics unaffected)")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true",
                   help="save predictions.json (COCO) and check it with pycocotools")
    p.add_argument("--project", default="runs/val", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--half", action="store_true", help="half precision: FP16 on CUDA, bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX)")
    p.add_argument("--cuda-graph", nargs="?", const="capture", default=None, choices=("capture", "compile"),
                   help="CUDA only: replay the forward as a CUDA graph per batch shape ('capture', the default, "
                        "or 'compile' = torch.compile reduce-overhead); warns and runs eager elsewhere")
    p.add_argument("--min-items", type=int, default=0, help="skip images with fewer labels")
    p.add_argument("--rect", action=argparse.BooleanOptionalAction, default=True,
                   help="rectangular batches padded by half a stride, as upstream validates (--no-rect: square "
                        "letterboxed images at --imgsz, as fixed-size exports are validated)")
    p.add_argument("--dnn", action="store_true", help="ignored (kept for upstream compatibility)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    opt = parse_opt(argv)
    if not opt.weights:
        opt.weights = [str(find_newest("train/*/weights/best.pt", "--weights"))]
    from utils.engine.config import ValJob
    from utils.engine.validator import run_validation
    return run_validation(ValJob.from_args(opt))


if __name__ == "__main__":
    cli(main)()
