"""Export engine: every format of utils/deploy/formats (one module per runtime) written from one model in
export mode, plus the GELAN re-parameterisation step.

Exported files return y [B, 4+nc, A] (xywh pixels + class scores; the main branch for dual-head models).
By default they are fixed to one input size; with dynamic=True batch, height and width are dynamic where the
format allows it (any multiple of the stride; the anchor grid follows the input). Class names, stride, nc,
imgsz and dynamic_hw are stored in each file and read back by the format's runner (utils/engine/backend.py).
With int8=True each format that has an INT8 mode also gets a quantized copy `<name>-int8<suffix>`, calibrated
on training images of the data YAML (utils/deploy/quantize.py).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
from utils.checkpoint import load_checkpoint, load_model
from utils.deploy import formats, quantize
from utils.deploy.formats import ExportJob, ExportOptions, Format
from utils.deploy.reparam import main_branch_only, reparam_checkpoint
from utils.general import LOGGER, UserError, check_img_size, image_hw
from utils.torch_utils import select_device

REPARAM = "reparam"  # not a runtime: the dual-head checkpoint re-parameterised into a single-head GELAN .pt


def include_choices() -> list[str]:
    return formats.names() + [REPARAM]


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Eval mode, head returns only y, MQA uses its explicit (traceable) math; all restored afterwards.

    In this mode every shape is a Python number for a fixed input size (the head's strides are floats, the
    attention's token grids come from the input's static shape), so torch.export accepts the model as well
    as the TorchScript tracer and the ONNX exporter do."""
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


def calibration_data(weights: Path, data: str | Path | None) -> str:
    """--data, else the data YAML the checkpoint was trained on (its opt), else a one-line error."""
    data = data or (load_checkpoint(weights).get("opt") or {}).get("data")
    if not data:
        raise UserError(f"{weights}: --int8 needs --data (the data YAML whose train images calibrate INT8)")
    return str(data)



def _parse_include(include) -> tuple[list[Format], bool]:
    wanted = [str(x).lower() for x in include]
    bad = [x for x in wanted if x not in include_choices()]
    if bad:
        raise UserError(f"export.py: unknown --include {' '.join(bad)} (choose from {', '.join(include_choices())})")
    return [formats.get(x) for x in dict.fromkeys(wanted) if x != REPARAM], REPARAM in wanted


def _check_request(weights: Path, fmts: list[Format], opts: ExportOptions, dev: torch.device) -> None:
    """Everything that can be refused is refused here, in one line, before any file is written."""
    if weights.suffix != ".pt":
        raise UserError(f"{weights}: export needs a .pt checkpoint of this project")
    if not weights.exists():
        raise UserError(f"{weights}: weights file not found")
    if opts.batch < 1:
        raise UserError(f"--batch-size {opts.batch}: must be at least 1")
    if any(f.name in ("onnx", "openvino") for f in fmts):
        from utils.deploy.formats.onnx import check_opset
        check_opset(opts.opset)
    if opts.int8:
        if opts.half:
            raise UserError("export.py: --int8 and --half exclude each other")
        if not any(f.export_int8 for f in fmts):
            raise UserError(f"export.py: --int8 quantizes {', '.join(f.name for f in formats.all_formats() if f.export_int8)} "
                            f"exports; add one of them to --include")
    formats.check_packages(fmts, int8=opts.int8)
    fixed = [f.name for f in fmts if not f.dynamic]
    if opts.dynamic and fixed:
        LOGGER.warning(f"WARNING: --dynamic: {', '.join(fixed)} {'take' if len(fixed) > 1 else 'takes'} one input size; "
                       f"exported for --imgsz")
    cuda_half = [f.name for f in fmts if f.half_needs_cuda]
    if opts.half and dev.type != "cuda" and cuda_half:
        LOGGER.warning(f"WARNING: --half: fp16 {' and '.join(cuda_half)} files need a CUDA device to export and run; "
                       f"exporting {'them' if len(cuda_half) > 1 else 'it'} in fp32")


def _check_classes(weights: Path, data: str) -> None:
    """INT8 calibrates and the accuracy check validates on `data`: its classes must be the model's, checked
    before any work; the message names the data YAML the checkpoint was trained on when that file is here."""
    from utils.data import load_data_config
    cfg = load_data_config(data, need=())
    ck = load_checkpoint(weights)
    names = [str(n) for n in ck.get("names") or []]
    nc = len(names) or int((ck.get("model_yaml") or {}).get("nc") or 0)
    if not nc or cfg.nc == nc:
        return
    listed = f" ({', '.join(names[:6])}{', ...' if nc > 6 else ''})" if names else ""
    stored = (ck.get("opt") or {}).get("data")
    if stored and Path(stored).is_file() and Path(stored).resolve() != Path(cfg.yaml_file).resolve():
        hint = f"pass --data {stored} (stored in {weights.name}: the data it was trained on)"
    else:
        hint = "pass the data YAML it was trained on with --data"
    raise UserError(f"{cfg.yaml_file} has nc={cfg.nc} but {weights.name} has {nc} classes{listed}: INT8 "
                    f"calibration and the accuracy check use the model's own data; {hint}")


def _export_model(weights: Path, dev: torch.device, fuse: bool, half: bool) -> nn.Module:
    model = load_model(weights, dev, fuse=False)
    model = main_branch_only(model, log=lambda m: LOGGER.warning(f"WARNING: exporting the dual-head graph; {m}"))
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        with torch.no_grad():
            model.fuse()
    return model.half() if half else model


def _log_saved(fmt: Format, path: Path, int8: bool) -> None:
    LOGGER.info(f"{fmt.title}{' INT8' if int8 else ''}: saved {path} ({formats.size_mb(path):.1f} MB)")


def _log_done(fmts: list[Format], shape: tuple[int, int, int], stride: int, dynamic: bool) -> None:
    b, h, w = shape
    elsewhere = "; ".join(f"{f.title} files run on {f.runs_on}" for f in fmts if not f.runs_here)
    if dynamic:
        done = (f"Export done, traced at [{b}, 3, {h}, {w}] with dynamic batch and height/width (multiples of "
                f"{stride}) where the format allows it")
        how = "python detect_dual.py --weights <file> --imgsz <size>"
    else:
        done, how = f"Export done for input [{b}, 3, {h}, {w}]", f"python detect_dual.py --weights <file> --imgsz {h} {w}"
    here = f"run with: {how}" if any(f.runs_here for f in fmts) else ""
    LOGGER.info("; ".join(x for x in (done, here, elsewhere) if x))


def run(weights: str | Path, include: tuple = ("torchscript",), imgsz: tuple | list | int = (640, 640),
        batch_size: int = 1, dynamic: bool = False, half: bool = False, opset: int = 17, simplify: bool = False,
        device: str = "cpu", fuse: bool = True, int8: bool = False, data: str | Path | None = None,
        calib_images: int = quantize.DEFAULT_IMAGES, int8_all: bool = False,
        check: Callable[[dict[str, Path], str], object] | None = None) -> dict[str, Path]:
    """Export `weights` to each format in include; returns {format: written path} (INT8 copies under
    '<format>-int8', calibrated on `calib_images` training images of `data`; OpenVINO's keeps the convolutions
    this CPU runs faster in bf16 unless `int8_all`). `check(out, data)`, when given,
    runs after the last file is written (export.py passes the accuracy check, utils/deploy/accuracy.py); its
    data YAML is `data` or the checkpoint's, whose classes are checked against the model before any work."""
    weights = Path(weights)
    fmts, reparam = _parse_include(include)
    dev = select_device(device)
    opts = ExportOptions(imgsz=image_hw(imgsz), batch=batch_size, dynamic=dynamic, half=half, int8=int8,
                         opset=opset, simplify=simplify, data=str(data) if data else None, calib_images=calib_images,
                         int8_all=int8_all)
    _check_request(weights, fmts, opts, dev)
    half = half and dev.type == "cuda"
    if int8 or check is not None:
        data = calibration_data(weights, data)
        _check_classes(weights, data)

    out: dict[str, Path] = {}
    if reparam:
        rows = load_checkpoint(weights)["model_yaml"]
        if str((rows["backbone"] + rows["head"])[-1][2]) == "DualDDetect":
            out[REPARAM] = reparam_checkpoint(weights)
        else:
            LOGGER.warning(f"WARNING: {weights} is already single-head; --include reparam skipped")
    if not fmts:
        if check is not None:
            check(out, str(data))
        return out

    model = _export_model(out.get(REPARAM, weights), dev, fuse, half)
    stride = int(max(model.stride))
    h, w = check_img_size(opts.imgsz, stride)
    im = torch.zeros(batch_size, 3, h, w, device=dev, dtype=torch.float16 if half else torch.float32)
    calibrate = None
    if int8:
        calibrate = lambda: quantize.calibration_images(data, (h, w), stride, calib_images, auto=dynamic)  # noqa: E731
    with export_mode(model), tempfile.TemporaryDirectory(prefix="yolo-export-") as tmp:
        with torch.no_grad():
            for _ in range(2):
                model(im)  # dry runs
        job = ExportJob(model, im, metadata(model, (h, w), batch_size, dynamic, half, weights), opts, weights,
                        Path(tmp), calibrate)
        for fmt in fmts:
            out[fmt.name] = fmt.export(job, fmt.path(weights))
            _log_saved(fmt, out[fmt.name], False)
            if int8 and fmt.export_int8:
                out[f"{fmt.name}-int8"] = fmt.export_int8(job, fmt.path(weights, int8=True))
                _log_saved(fmt, out[f"{fmt.name}-int8"], True)
        if "onnx" in out and not half:
            _onnx_check(out["onnx"], model, im)
    _log_done(fmts, (batch_size, h, w), stride, dynamic)
    if check is not None:
        check(out, str(data))
    return out


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
