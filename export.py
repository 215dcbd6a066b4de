"""Export a trained checkpoint to TorchScript / ONNX / OpenVINO / LiteRT / ExecuTorch / NCNN / Core ML (the formats
of utils/deploy/formats; FP32, FP16 or INT8 where the format has it), or re-parameterise a dual-head model into GELAN.

    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx --imgsz 640
    python export.py --weights best.pt --include reparam        # -> best-gelan.pt (single head, same outputs)
    python export.py --weights best.pt --include onnx openvino --int8 --data my.yaml   # + best-int8.onnx,
        # best-int8_openvino_model/; then both INT8 models and their FP32 originals are validated on the val split

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
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.deploy.export import calibration_data, include_choices, run  # noqa: E402
from utils.deploy.quantize import DEFAULT_IMAGES  # noqa: E402
from utils.general import LOGGER, cli  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint .pt of this project")
    p.add_argument("--include", nargs="+", default=["torchscript"], help=f"formats: {', '.join(include_choices())}")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="input size: h [w]")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the traced input")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic batch and height/width (multiples of the stride), ONNX and TorchScript")
    p.add_argument("--half", action="store_true", help="FP16 export (CUDA only; for bf16 on CPU run an FP32 export "
                                                       "with --half in detect/val)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxsim if it is installed")
    p.add_argument("--device", default="cpu", help="cpu or cuda device, e.g. 0")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse Conv+BN and RepConvN before export (default on)")
    p.add_argument("--int8", action="store_true",
                   help="also write INT8 copies of the onnx/openvino exports (static quantization), then validate "
                        "them against the FP32 exports on the val split of --data")
    p.add_argument("--data", default=None, help="data YAML for --int8 calibration and validation "
                                                "(default: the data the checkpoint was trained on)")
    p.add_argument("--calib-images", type=int, default=DEFAULT_IMAGES, help="--int8: training images to calibrate on")
    return p.parse_args(argv)


def check_int8(out: dict[str, Path], data: str, device: str) -> dict[str, tuple[float, float]]:
    """mAP50-95 of each INT8 export and its FP32 original on the val split, printed; {format: (fp32, int8)}."""
    from utils.engine.validator import run_validation
    maps = {}
    with tempfile.TemporaryDirectory() as tmp:  # nothing of the check is kept but the printed numbers
        for fmt in [k.removesuffix("-int8") for k in out if k.endswith("-int8")]:
            if fmt in out:
                maps[fmt] = tuple(run_validation(weights=str(out[k]), data=data, project=tmp, plots=False,
                                                 device=device, workers=0).map for k in (fmt, f"{fmt}-int8"))
    for fmt, (a, b) in maps.items():
        LOGGER.info(f"INT8 check, {fmt}: mAP50-95 FP32 {a:.4f}, INT8 {b:.4f} ({(b - a) * 100:+.2f} points) "
                    f"on the val split of {data}")
    return maps


def main(argv: list[str] | None = None) -> dict[str, Path]:
    opt = parse_opt(argv)
    out = run(opt.weights, tuple(opt.include), opt.imgsz, opt.batch_size, opt.dynamic, opt.half, opt.opset,
              opt.simplify, opt.device, opt.fuse, opt.int8, opt.data, opt.calib_images)
    if opt.int8:
        check_int8(out, calibration_data(Path(opt.weights), opt.data), opt.device)
    return out


if __name__ == "__main__":
    cli(main)()
