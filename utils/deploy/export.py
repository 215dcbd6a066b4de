"""Export engine: TorchScript / ONNX / OpenVINO files with metadata, INT8 copies (utils/deploy/quantize.py),
and the GELAN re-parameterisation step.

Exported files return y [B, 4+nc, A] (xywh pixels + class scores; the main branch for dual-head models).
By default they are fixed to one input size; with dynamic=True batch, height and width are dynamic (any
multiple of the stride; the anchor grid follows the input). Class names, stride, nc, imgsz and dynamic_hw
are stored in the file and read back by utils/engine/backend.py. OpenVINO models are converted from the ONNX
graph (the same traced graph; a temporary .onnx when onnx itself is not requested) and saved with FP32 weights
as `<name>_openvino_model/<name>.xml/.bin`, metadata in the IR's rt_info. With int8=True each of onnx and
openvino also gets a statically quantized copy (`<name>-int8.onnx`, `<name>-int8_openvino_model/`).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
from utils.checkpoint import load_checkpoint, load_model
from utils.deploy import quantize
from utils.deploy.reparam import main_branch_only, reparam_checkpoint
from utils.general import LOGGER, UserError, check_img_size, image_hw
from utils.torch_utils import select_device

FORMATS = ("torchscript", "onnx", "openvino", "reparam")
MIN_OPSET = 11  # opsets 7-10 stop inside torch's exporter on these models (IndexError in a transpose, torch 2.14)


def max_opset() -> int:
    """Newest ONNX opset this torch writes (23 for torch 2.14, checked against onnxruntime); 20 if torch
    does not say (torch.onnx keeps the number in a private module)."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return 20


def check_opset(opset: int) -> None:
    """One line before any work instead of an exporter traceback or a 1,000-line IR dump."""
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UserError(f"--opset {opset}: torch {torch.__version__.split('+')[0]} exports these models at ONNX "
                        f"opsets {MIN_OPSET}..{top} (default 17)")


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


def metadata(model: nn.Module, imgsz: tuple, batch: int, dynamic: bool, half: bool, weights: Path) -> dict:
    names = [str(n) for n in getattr(model, "names", [])] or [str(i) for i in range(model.nc)]
    return {"stride": int(max(model.stride)), "names": names, "nc": int(model.nc), "imgsz": [int(imgsz[0]), int(imgsz[1])],
            "batch": int(batch), "dynamic": bool(dynamic), "dynamic_hw": bool(dynamic),  # dynamic_hw: any H, W
            "half": bool(half), "task": "detect",
            "model": str(model.yaml.get("yaml_file", "")), "source": weights.name}


def trace_torchscript(model: nn.Module, im: torch.Tensor) -> torch.jit.ScriptModule:
    """The traced model (call inside export_mode). Nothing in it names a device (see utils.boxes.make_anchors),
    so a file exported on CPU runs on any GPU."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, im, strict=False, check_trace=False)


def export_torchscript(model: nn.Module, im: torch.Tensor, f: Path, meta: dict) -> Path:
    trace_torchscript(model, im).save(str(f), _extra_files={"config.txt": json.dumps(meta)})
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


def export_openvino(onnx_file: Path, d: Path, meta: dict, int8_images: list | None = None) -> Path:
    """OpenVINO IR folder `d` (d/<d's stem>.xml + .bin, FP32 weights) converted from `onnx_file`; with
    int8_images, NNCF-quantized on them first."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("export.py: --include openvino needs the openvino package (pip install openvino)") from None
    model = ov.convert_model(str(onnx_file))
    if int8_images is not None:
        model = quantize.quantize_openvino(model, int8_images)
    model.set_rt_info(json.dumps({**meta, "int8": int8_images is not None}), ["yolo", "metadata"])
    d.mkdir(parents=True, exist_ok=True)
    xml = d / (d.name.removesuffix("_openvino_model") + ".xml")
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return d


def calibration_data(weights: Path, data: str | Path | None) -> str:
    """--data, else the data YAML the checkpoint was trained on (its opt), else a one-line error."""
    data = data or (load_checkpoint(weights).get("opt") or {}).get("data")
    if not data:
        raise UserError(f"{weights}: --int8 needs --data (the data YAML whose train images calibrate INT8)")
    return str(data)


def _size_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*"))) / 1e6


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
        device: str = "cpu", fuse: bool = True, int8: bool = False, data: str | Path | None = None,
        calib_images: int = quantize.DEFAULT_IMAGES) -> dict[str, Path]:
    """Export `weights` to each format in include; returns {format: written path} (int8 copies under
    'onnx-int8' / 'openvino-int8', calibrated on `calib_images` training images of `data`)."""
    weights = Path(weights)
    include = [x.lower() for x in include]
    bad = [x for x in include if x not in FORMATS]
    if bad:
        raise UserError(f"export.py: unknown --include {bad} (choose from {', '.join(FORMATS)})")
    if weights.suffix != ".pt":
        raise UserError(f"{weights}: export needs a .pt checkpoint of this project")
    dev = select_device(device)
    if half and dev.type != "cuda":
        LOGGER.warning("WARNING: --half needs a CUDA device; exporting in fp32")
        half = False
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if "onnx" in include:
        check_opset(opset)
    if int8 and not {"onnx", "openvino"} & set(include):
        raise UserError("export.py: --int8 quantizes onnx and openvino exports; add --include onnx and/or openvino")
    if int8 and half:
        raise UserError("export.py: --int8 and --half exclude each other")
    sz = image_hw(imgsz)

    out: dict[str, Path] = {}
    if "reparam" in include:
        rows = load_checkpoint(weights)["model_yaml"]
        if str((rows["backbone"] + rows["head"])[-1][2]) == "DualDDetect":
            out["reparam"] = reparam_checkpoint(weights)
        else:
            LOGGER.warning(f"WARNING: {weights} is already single-head; --include reparam skipped")
    targets = [x for x in include if x != "reparam"]
    if not targets:
        return out

    model = load_model(out.get("reparam", weights), dev, fuse=False)
    model = main_branch_only(model, log=lambda m: LOGGER.warning(f"WARNING: exporting the dual-head graph; {m}"))
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
    images = None
    if int8:
        images = quantize.calibration_images(calibration_data(weights, data), (h, w), stride, calib_images,
                                             auto=dynamic)
    with export_mode(model), tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            for _ in range(2):
                model(im)  # dry runs
        if "torchscript" in targets:
            out["torchscript"] = export_torchscript(model, im, weights.with_suffix(".torchscript"), meta)
            LOGGER.info(f"TorchScript: saved {out['torchscript']} ({out['torchscript'].stat().st_size / 1e6:.1f} MB)")
        if "onnx" in targets or "openvino" in targets:
            keep = "onnx" in targets
            f = export_onnx(model, im, weights.with_suffix(".onnx") if keep else Path(tmp) / f"{weights.stem}.onnx",
                            meta, opset, dynamic, simplify)
            if keep:
                out["onnx"] = f
                LOGGER.info(f"ONNX (opset {opset}): saved {f} ({_size_mb(f):.1f} MB)")
            if not half:
                _onnx_check(f, model, im)
            if keep and int8:
                q = quantize.quantize_onnx(f, weights.with_name(f"{weights.stem}-int8.onnx"), images)
                out["onnx-int8"] = q
                LOGGER.info(f"ONNX INT8 (QDQ, per-channel): saved {q} ({_size_mb(q):.1f} MB)")
            if "openvino" in targets:
                d = export_openvino(f, weights.with_name(f"{weights.stem}_openvino_model"), meta)
                out["openvino"] = d
                LOGGER.info(f"OpenVINO (FP32 IR): saved {d} ({_size_mb(d):.1f} MB)")
                if int8:
                    d = export_openvino(f, weights.with_name(f"{weights.stem}-int8_openvino_model"), meta, images)
                    out["openvino-int8"] = d
                    LOGGER.info(f"OpenVINO INT8 (NNCF): saved {d} ({_size_mb(d):.1f} MB)")
    if dynamic:
        LOGGER.info(f"Export done, traced at [{batch_size}, 3, {h}, {w}] with dynamic batch and height/width "
                    f"(multiples of {stride}); run with: python detect_dual.py --weights <file> --imgsz <size>")
    else:
        LOGGER.info(f"Export done for input [{batch_size}, 3, {h}, {w}]; "
                    f"run with: python detect_dual.py --weights <file> --imgsz {h} {w}")
    return out


