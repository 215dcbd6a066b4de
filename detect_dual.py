"""Run a trained detector on images, folders, globs, .txt lists, videos, webcams or streams.

    python detect_dual.py --weights runs/train/exp/weights/best.pt --source path/to/images_or_video
Outputs (annotated images/videos, --save-txt labels, --save-crop crops) go to runs/detect/exp{N}.
    python detect_dual.py --weights best.pt --source video.mp4 --track --save-txt
adds track ids (labels rows 'cls xc yc w h [conf] id') and one MOTChallenge file per video in mot/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.general import cli  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", type=str, default=None,
                   help="model .pt (default: newest runs/train/*/weights/best.pt)")
    p.add_argument("--source", type=str, default=None,
                   help="file/folder/glob/.txt list/video/webcam index/URL (default: val images of --data)")
    p.add_argument("--data", type=str, default=str(ROOT / "data" / "shapes.yaml"),
                   help="dataset YAML, used for class names when the weights have none")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=None,
                   help="inference size: one value or h w")
    p.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    p.add_argument("--device", default="", help="cuda device, e.g. 0 or 0,1, or cpu")
    p.add_argument("--view-img", action="store_true", help="show results (needs a display)")
    p.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    p.add_argument("--save-conf", action="store_true", help="add confidences to --save-txt labels")
    p.add_argument("--save-crop", action="store_true", help="save cropped boxes under crops/<class>/")
    p.add_argument("--nosave", action="store_true", help="do not save images/videos")
    p.add_argument("--classes", nargs="+", type=int, help="keep only these classes: --classes 0, or --classes 0 2 3")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--augment", action="store_true", help="test-time augmentation (flips and scales)")
    p.add_argument("--visualize", action="store_true", help="feature visualisation (not implemented; ignored)")
    p.add_argument("--update", action="store_true", help="no-op, kept for upstream compatibility")
    p.add_argument("--project", default=str(ROOT / "runs" / "detect"), help="save results to project/name")
    p.add_argument("--name", default="exp", help="save results to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of making exp2, exp3, ...")
    p.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    p.add_argument("--hide-labels", action="store_true", help="hide labels")
    p.add_argument("--hide-conf", action="store_true", help="hide confidences")
    p.add_argument("--half", action="store_true", help="half precision: FP16 on CUDA, bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX)")
    p.add_argument("--cuda-graph", nargs="?", const="capture", default=None, choices=("capture", "compile"),
                   help="CUDA only: replay the forward as a CUDA graph per input shape ('capture', the default, "
                        "or 'compile' = torch.compile reduce-overhead); warns and runs eager elsewhere")
    p.add_argument("--dnn", action="store_true", help="ignored (kept for upstream compatibility)")
    p.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    p.add_argument("--track", action="store_true",
                   help="track objects across frames (videos, streams, image folders): ids on boxes, "
                        "--save-txt rows end with the id, MOTChallenge files in mot/")
    p.add_argument("--tracker", type=str, default=None,
                   help="tracker YAML (implies --track; default data/trackers/bytetrack.yaml settings)")
    return p.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> Path:
    opt = parse_opt(argv)
    if opt.weights and len(opt.weights) == 1:  # an OpenVINO export compiles while torch is imported
        from utils.deploy import early_compile
        early_compile.start(opt.weights[0], opt.half)
    if opt.source:  # a bad --source fails fast, before the model code (torchvision, models) is imported
        from utils.engine.sources import resolve_source
        resolve_source(opt.source)
    from utils.engine.config import PredictJob
    from utils.engine.predict.predictor import run
    return run(PredictJob.from_args(opt))


if __name__ == "__main__":
    main()
