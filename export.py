"""Export a trained checkpoint to TorchScript / ONNX, or re-parameterise a dual-head model into GELAN.

    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx --imgsz 640
    python export.py --weights best.pt --include reparam        # -> best-gelan.pt (single head, same outputs)

Exported files sit next to the weights (.torchscript / .onnx) and return y [B, 4+nc, A] (xywh pixels +
class scores; the main branch for dual-head models). By default they are fixed to one input size
(--imgsz), so feed letterboxed images of exactly that size. With --dynamic the batch size and the input
height/width are dynamic (any multiple of the stride 32; the anchor grid is computed from the input
shape), so rectangular minimal-padding batches work as with .pt. Class names, stride, nc, imgsz and
dynamic_hw are stored in the file and read back by utils/engine/backend.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.deploy.export import FORMATS, run  # noqa: E402
from utils.general import cli  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint .pt of this project")
    p.add_argument("--include", nargs="+", default=["torchscript"], help=f"formats: {', '.join(FORMATS)}")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="input size: h [w]")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the traced input")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic batch and height/width (multiples of the stride), ONNX and TorchScript")
    p.add_argument("--half", action="store_true", help="FP16 export (CUDA only)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxsim if it is installed")
    p.add_argument("--device", default="cpu", help="cpu or cuda device, e.g. 0")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse Conv+BN and RepConvN before export (default on)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    opt = parse_opt(argv)
    return run(opt.weights, tuple(opt.include), opt.imgsz, opt.batch_size, opt.dynamic, opt.half, opt.opset,
               opt.simplify, opt.device, opt.fuse)


if __name__ == "__main__":
    cli(main)()
