"""Export a trained checkpoint to TorchScript / ONNX / OpenVINO / LiteRT / ExecuTorch / NCNN / Core ML (the formats
of utils/deploy/formats; FP32, FP16 or INT8 where the format has it), or re-parameterise a dual-head model into GELAN.

    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx --imgsz 640
    python export.py --weights best.pt --include reparam        # -> best-gelan.pt (single head, same outputs)
    python export.py --weights best.pt --include onnx openvino --int8 --data my.yaml   # + best-int8.onnx,
        # best-int8_openvino_model/; then the accuracy check: the .pt and every file validated on the val split,
        # one table; a file that lost more than its limit fails the export (utils/deploy/accuracy.py)

Exported files sit next to the weights (.torchscript / .onnx) and return y [B, 4+nc, A] (xywh pixels +
class scores; the main branch for dual-head models). By default they are fixed to one input size
(--imgsz), so feed letterboxed images of exactly that size. With --dynamic the batch size and the input
height/width are dynamic (any multiple of the stride 32; the anchor grid is computed from the input
shape), so rectangular minimal-padding batches work as with .pt. Class names, stride, nc, imgsz and
dynamic_hw are stored in the file and read back by utils/engine/backend.py. INT8 is static post-training
quantization calibrated on --calib-images training images of --data (default: the data the checkpoint was
trained on), preprocessed as detection preprocesses them (utils/deploy/quantize.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.deploy import accuracy, formats  # noqa: E402
from utils.deploy.accuracy import FLOAT_MAX_DROP, INT8_MAX_DROP, Limits  # noqa: E402
from utils.deploy.export import include_choices, run  # noqa: E402
from utils.deploy.quantize import DEFAULT_IMAGES  # noqa: E402
from utils.general import cli  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    fmts = formats.all_formats()
    dynamic = [f.name for f in fmts if f.dynamic]
    int8 = [f.name for f in fmts if f.export_int8]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint .pt of this project")
    p.add_argument("--include", nargs="+", default=["torchscript"], help=f"formats: {', '.join(include_choices())}")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="input size: h [w]")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the traced input")
    p.add_argument("--dynamic", action="store_true",
                   help=f"dynamic batch and height/width (multiples of the stride): {', '.join(dynamic)}; the others "
                        f"take one input size")
    p.add_argument("--half", action="store_true",
                   help=f"half precision, per format: {'; '.join(f'{f.name}: {f.half}' for f in fmts)}")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxsim if it is installed")
    p.add_argument("--device", default="cpu", help="cpu or cuda device, e.g. 0")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse Conv+BN and RepConvN before export (default on)")
    p.add_argument("--int8", action="store_true",
                   help=f"also write INT8 copies of the {'/'.join(int8)} exports (static quantization calibrated on "
                        f"training images of --data); the accuracy check then runs on the data's val split")
    p.add_argument("--data", default=None,
                   help="data YAML: --int8 calibrates on its train split, and the accuracy check validates the .pt "
                        "and every written file on its val split (default with --int8: the data the checkpoint "
                        "was trained on)")
    p.add_argument("--calib-images", type=int, default=DEFAULT_IMAGES,
                   help="--int8: training images to calibrate on (read one at a time: memory does not grow with it)")
    p.add_argument("--int8-all", action="store_true",
                   help="--int8 OpenVINO: every convolution in int8 (default: those this CPU runs faster in bf16, "
                        "measured layer by layer at export, stay bf16)")
    p.add_argument("--int8-max-drop", type=float, default=INT8_MAX_DROP,
                   help="accuracy check: mAP50-95 points an INT8 file may lose against its fp32 file")
    p.add_argument("--max-drop", type=float, default=FLOAT_MAX_DROP,
                   help="accuracy check: mAP50-95 points a float export may lose against the .pt")
    p.add_argument("--allow-drop", action="store_true",
                   help="accuracy check: keep files over the limit and exit 0 (a warning instead of an error)")
    return p.parse_args(argv)


def accuracy_check(weights: Path, imgsz: int, device: str, limits: Limits) -> Callable[[dict[str, Path], str], list]:
    """What export.run calls after writing: the .pt and every written file that runs here validated on the
    same val images (utils.engine.validator.validate_files), one table, a failure one line (exit 1)."""
    def check(out: dict[str, Path], data: str) -> list:
        from utils.engine.validator import validate_files

        def validate(paths):
            results, where = validate_files(paths, data, imgsz, device=device)
            return [(r.map50, r.map) for r in results], where
        return accuracy.check(out, weights, validate, limits)
    return check


def main(argv: list[str] | None = None) -> dict[str, Path]:
    opt = parse_opt(argv)
    check = None
    if opt.int8 or opt.data:
        check = accuracy_check(Path(opt.weights), max(opt.imgsz), opt.device,
                               Limits(opt.int8_max_drop, opt.max_drop, opt.allow_drop))
    return run(opt.weights, tuple(opt.include), opt.imgsz, opt.batch_size, opt.dynamic, opt.half, opt.opset,
               opt.simplify, opt.device, opt.fuse, opt.int8, opt.data, opt.calib_images, opt.int8_all, check)


if __name__ == "__main__":
    cli(main)()
