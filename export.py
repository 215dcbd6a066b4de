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
import contextlib
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA  # noqa: E402
from utils.general import LOGGER, UserError, check_img_size, cli  # noqa: E402

FORMATS = ("torchscript", "onnx", "reparam")


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Eval mode, head returns only y, MQA uses its explicit (traceable) math; all restored afterwards."""
    head, was_training = model.head, model.training
    old_export, old_explicit = head.__dict__.get("export"), MQA.explicit_default
    model.eval()
    head.export = True
    MQA.explicit_default = True
    try:
        yield model
    finally:
        MQA.explicit_default = old_explicit
        if old_export is None:
            del head.export
        else:
            head.export = old_export
        model.train(was_training)


def single_head(model: nn.Module) -> nn.Module:
    """Dual-head model -> its GELAN form for export (smaller graph, same main-branch output); else unchanged."""
    if not getattr(model, "is_dual", False):
        return model
    from utils.reparam import reparameterize
    try:
        gelan = reparameterize(model).eval()
    except UserError as e:
        LOGGER.warning(f"WARNING: exporting the dual-head graph (main branch output); re-parameterisation failed: {e}")
        return model
    p = next(model.parameters())
    x = torch.rand(1, 3, 64, 64, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        ok = torch.allclose(model.eval()(x)[0], gelan(x)[0], atol=1e-4, rtol=1e-4)
    if not ok:
        LOGGER.warning("WARNING: re-parameterised outputs differ; exporting the dual-head graph (main branch output)")
        return model
    return gelan


def metadata(model: nn.Module, imgsz: tuple, batch: int, dynamic: bool, half: bool, weights: Path) -> dict:
    names = [str(n) for n in getattr(model, "names", [])] or [str(i) for i in range(model.nc)]
    return {"stride": int(max(model.stride)), "names": names, "nc": int(model.nc), "imgsz": [int(imgsz[0]), int(imgsz[1])],
            "batch": int(batch), "dynamic": bool(dynamic), "dynamic_hw": bool(dynamic),  # dynamic_hw: any H, W
            "half": bool(half), "task": "detect",
            "model": str(model.yaml.get("yaml_file", "")), "source": weights.name}


def export_torchscript(model: nn.Module, im: torch.Tensor, f: Path, meta: dict) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(model, im, strict=False, check_trace=False)
    ts.save(str(f), _extra_files={"config.txt": json.dumps(meta)})
    return f


def export_onnx(model: nn.Module, im: torch.Tensor, f: Path, meta: dict, opset: int = 17, dynamic: bool = False,
                simplify: bool = False) -> Path:
    try:
        import onnx
    except ImportError:
        raise UserError("export.py: --include onnx needs the onnx package (pip install onnx onnxruntime)") from None
    # dynamic: batch and image height/width (any multiple of the stride); the anchor count follows the size
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}} if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (im,), str(f), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=["images"], output_names=["output0"], dynamic_axes=axes)
    m = onnx.load(str(f))
    onnx.checker.check_model(m)
    if simplify:
        try:
            import onnxsim
            m, ok = onnxsim.simplify(m)
            if not ok:
                LOGGER.warning("WARNING: onnxsim could not validate the simplified model; kept it anyway")
        except ImportError:
            LOGGER.warning("WARNING: --simplify ignored: onnxsim is not installed")
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, json.dumps(v)
    onnx.save(m, str(f))
    return f


def _onnx_check(f: Path, model: nn.Module, im: torch.Tensor) -> None:
    """Log the max difference between onnxruntime and PyTorch on the export input (skipped without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    x = torch.rand_like(im)
    y = sess.run(None, {"images": x.cpu().numpy()})[0]
    with torch.no_grad():
        ref = model(x).float().cpu().numpy()
    LOGGER.info(f"ONNX check: max |onnxruntime - torch| = {abs(y - ref).max():.2e}")


def run(weights: str | Path, include: tuple = ("torchscript",), imgsz: tuple | list | int = (640, 640),
        batch_size: int = 1, dynamic: bool = False, half: bool = False, opset: int = 17, simplify: bool = False,
        device: str = "cpu", fuse: bool = True) -> dict[str, Path]:
    """Export `weights` to each format in include; returns {format: written path}."""
    from utils.checkpoint import load_model
    from utils.torch_utils import select_device
    weights = Path(weights)
    include = [x.lower() for x in include]
    bad = [x for x in include if x not in FORMATS]
    if bad:
        raise UserError(f"export.py: unknown --include {bad} (choose from {', '.join(FORMATS)})")
    if weights.suffix != ".pt":
        raise UserError(f"{weights}: export needs a .pt checkpoint of this project")
    dev = select_device(device) if not isinstance(device, torch.device) else device
    if half and dev.type != "cuda":
        LOGGER.warning("WARNING: --half needs a CUDA device; exporting in fp32")
        half = False
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    sz = [imgsz] * 2 if isinstance(imgsz, int) else list(imgsz) * (2 if len(imgsz) == 1 else 1)
    if len(sz) != 2 or min(sz) < 1:
        raise UserError(f"--imgsz {imgsz}: give one size or two (h w), all positive")

    out: dict[str, Path] = {}
    if "reparam" in include:
        from utils.checkpoint import load_checkpoint
        from utils.reparam import reparam_checkpoint
        rows = load_checkpoint(weights)["model_yaml"]
        if str((rows["backbone"] + rows["head"])[-1][2]) == "DualDDetect":
            out["reparam"] = reparam_checkpoint(weights)
        else:
            LOGGER.warning(f"WARNING: {weights} is already single-head; --include reparam skipped")
    targets = [x for x in include if x != "reparam"]
    if not targets:
        return out

    model = load_model(out.get("reparam", weights), dev, fuse=False)
    model = single_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        with torch.no_grad():
            model.fuse()
    stride = int(max(model.stride))
    h, w = check_img_size(sz, stride)
    im = torch.zeros(batch_size, 3, h, w, device=dev)
    if half:
        model, im = model.half(), im.half()
    meta = metadata(model, (h, w), batch_size, dynamic, half, weights)
    with export_mode(model):
        with torch.no_grad():
            for _ in range(2):
                model(im)  # dry runs
        if "torchscript" in targets:
            out["torchscript"] = export_torchscript(model, im, weights.with_suffix(".torchscript"), meta)
            LOGGER.info(f"TorchScript: saved {out['torchscript']} ({out['torchscript'].stat().st_size / 1e6:.1f} MB)")
        if "onnx" in targets:
            f = export_onnx(model, im, weights.with_suffix(".onnx"), meta, opset, dynamic, simplify)
            out["onnx"] = f
            LOGGER.info(f"ONNX (opset {opset}): saved {f} ({f.stat().st_size / 1e6:.1f} MB)")
            if not half:
                _onnx_check(f, model, im)
    if dynamic:
        LOGGER.info(f"Export done, traced at [{batch_size}, 3, {h}, {w}] with dynamic batch and height/width "
                    f"(multiples of {stride}); run with: python detect_dual.py --weights <file> --imgsz <size>")
    else:
        LOGGER.info(f"Export done for input [{batch_size}, 3, {h}, {w}]; "
                    f"run with: python detect_dual.py --weights <file> --imgsz {h} {w}")
    return out


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
