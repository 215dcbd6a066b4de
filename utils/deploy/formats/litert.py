"""LiteRT (formerly TensorFlow Lite): `<name>.tflite` converted by litert-torch from the export mode's
torch.export program, run by ai-edge-litert's interpreter (XNNPACK on the CPU; the same file runs on Android,
iOS and ARM boards, where GPU/NPU delegates can take it too).

The input is NHWC [B, H, W, 3] in 0..1 (the TFLite convention, what camera frames are; the runner transposes
torch's NCHW batches), the output [B, 4 + nc, A] as every format's. The export metadata (names, stride, nc,
imgsz...) is a JSON buffer of the flatbuffer's model metadata (`yolo_metadata`), read back without executing
anything. Fixed input size (the converter's shapes are static).

--half: the same conversion with fp16 weights (ai-edge-quantizer's float casting; half the file, the
runtime computes in fp32 on x86 and may use fp16 arithmetic on ARM). Works on a CPU: no CUDA model involved.
--int8: `<name>-int8.tflite`, full-integer static quantization by ai-edge-quantizer calibrated on training
images (job.calibration_images(), as the ONNX INT8): int8 input (scale 1/255, exact for 8-bit images),
per-channel symmetric int8 weights, asymmetric int8 activations; the detect head's decoding (DFL softmax and
expectation, anchor arithmetic, score sigmoid) and the float32 output stay float (int8_float_scopes); the
Mobile MQA attention is quantized too (integer-only NPUs need it so, and keeping it float gained nothing).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from utils.deploy.formats.base import (ExportJob, Format, LoadOptions, NumpyRunner, check_detector_output,
                                       first_line_and_reason, input_geometry, quiet, read_json)
from utils.general import LOGGER, UserError

METADATA_KEY = b"yolo_metadata"

def _quiet():
    """litert-torch prints a progress tree and an INFO line per JAX-lowered op, ai-edge-quantizer progress bars
    and a size report: keep export.py's log to its own lines (errors still raise)."""
    # TF_CPP_MIN_LOG_LEVEL: the converter's C++ INFO lines
    return quiet(env={"LITERT_TORCH_SHOW_PROGRESS": "n", "TF_CPP_MIN_LOG_LEVEL": "2"})


class _NHWC(torch.nn.Module):
    """The model behind an NHWC input (the converter folds the permute into its own layout). The module, not
    job.exported_program().module(): litert-torch exports it again either way, and only the module keeps
    the module paths in the tensor names that INT8 selects the head's decoding by."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def convert(job: ExportJob) -> bytes:
    """The fp32 flatbuffer of the job's torch.export program (NHWC input), converted once per job (--half and
    --int8 are made from it)."""
    def make() -> bytes:
        model, im = job.float_cpu()  # in export mode (export.py converts inside it)
        model = _NHWC(model).eval()
        with _quiet(), torch.no_grad():
            import litert_torch
            try:
                edge = litert_torch.convert(model, (im.permute(0, 2, 3, 1).contiguous(),))
            except Exception as e:
                raise UserError(f"export.py --include litert: litert-torch could not convert "
                                f"{job.weights.name} ({first_line_and_reason(e)})") from None
            return bytes(edge.model_content())
    return job.once("litert_fp32", make)


def _head_scope(job: ExportJob) -> str:
    """How the converter names the detect head's own ops (outside its conv branches): the module path
    component `<module>.<Class>_<index>` that litert-torch writes into tensor names."""
    head = job.model.model[-1]
    return re.escape(f"{type(head).__module__}.{type(head).__name__}_{len(job.model.model) - 1}")


def int8_float_scopes(job: ExportJob, output_names: list[str]) -> list[str]:
    """Tensor-name regexes that INT8 leaves in float: the head's decoding (ops of the head itself and of its
    DFL; its conv branches, `Sequential_<i>`, are quantized) and the model output.

    Why, measured on the fitted gelan-t of tests/fitted.py (64 px, calibrated on its 4 training images, its 4
    detections compared with the .pt's through Predictor):
    - everything int8: no detection at all (the output [B, 4 + nc, A] gets one int8 scale for pixel boxes and
      0..1 scores, 1.9 at 64 px, so every score is 0); raw box error up to 7.3 px;
    - only the output float: all 4 found, min matched IoU 0.885 (the decoding on a 256-level grid);
    - the decoding and the output float: min IoU 0.995, score change <= 0.004, raw box error <= 2.4 px.
    The decoding is a few element-wise ops on [B, 4 + nc, A]: keeping it float costs no measurable time.
    The attention is not kept float: on gelan-t-MMQA fitted the same way, its softmax and matmuls in float gave
    min IoU 0.992 against 0.995 quantized (score change 0.018 both)."""
    head = _head_scope(job)
    return [head + r"(;|/models\.common\.DFL)"] + [f"^{re.escape(n)};" for n in output_names]


def _quantizer(buf: bytes):
    from ai_edge_quantizer import quantizer
    return quantizer.Quantizer(bytearray(buf))


def float16_weights(buf: bytes) -> bytes:
    """The model with its convolution/linear weights stored in fp16 (dequantized by the runtime)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    q = _quantizer(buf)
    cfg = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True)
    q.update_quantization_recipe(".*", qtyping.TFLOperationName.ALL_SUPPORTED, cfg, AlgorithmName.FLOAT_CASTING)
    with _quiet():
        return bytes(q.quantize(enable_progress_bar=False, enable_progress_report=False).quantized_model)


def full_int8(buf: bytes, images: list[np.ndarray], keep_float: list[str]) -> bytes:
    """Static int8 quantization of every supported op (activations asymmetric per tensor, weights symmetric
    per channel) calibrated on `images` (NCHW float arrays), except ops whose output tensor name matches a
    regex of `keep_float`. Activation ranges are the min/max over all images, as ONNX Runtime's MinMax: the
    quantizer's default (a moving average, 0.95 on the ranges seen so far) kept the first images' ranges and
    clipped the rest (fitted gelan-t: scores 0.92 -> 0.22). The input's range is fixed to 0..1 (scale 1/255:
    every 8-bit pixel exact): calibration images without a pure black or white pixel would clip others."""
    from ai_edge_quantizer import calibrator, qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.utils import qsv_utils
    q = _quantizer(buf)
    q.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    for rx in keep_float:
        q.update_quantization_recipe(rx, qtyping.TFLOperationName.ALL_SUPPORTED, None, AlgorithmName.NO_QUANTIZE)
    recipe = recipe_manager.RecipeManager()
    recipe.load_quantization_recipe(q.get_quantization_recipe())
    name = _input_name(buf)
    data = {"serving_default": [{name: np.ascontiguousarray(x.transpose(0, 2, 3, 1))} for x in images]}
    with _quiet():
        cal = calibrator.Calibrator(bytearray(buf), num_threads=max(1, torch.get_num_threads()),
                                    qsv_update_func=qsv_utils.min_max_update)
        cal.calibrate(data, recipe)
        qsvs = cal.get_model_qsvs()
        for t in _io_tensor_names(buf)[0]:  # the input's range is its domain, 0..1, not what calibration saw
            if t in qsvs:
                qsvs[t] = {**qsvs[t], "min": np.zeros_like(qsvs[t]["min"]), "max": np.ones_like(qsvs[t]["max"])}
        return bytes(q.quantize(qsvs, enable_progress_bar=False, enable_progress_report=False).quantized_model)


def _input_name(buf: bytes) -> str:
    """The signature's input name (litert-torch calls the first positional argument `args_0`)."""
    from ai_edge_litert.interpreter import Interpreter
    sig = Interpreter(model_content=buf).get_signature_list()["serving_default"]
    return sig["inputs"][0]


def _tensor_names(buf: bytes) -> list[str]:
    from ai_edge_litert import schema_py_generated as fb
    g = fb.Model.GetRootAs(buf, 0).Subgraphs(0)
    return [g.Tensors(i).Name().decode() for i in range(g.TensorsLength())]


def _io_tensor_names(buf: bytes) -> tuple[list[str], list[str]]:
    """Names of the main graph's input and output tensors."""
    from ai_edge_litert import schema_py_generated as fb
    g = fb.Model.GetRootAs(buf, 0).Subgraphs(0)
    names = lambda idx, n: [g.Tensors(idx(i)).Name().decode() for i in range(n)]  # noqa: E731
    return names(g.Inputs, g.InputsLength()), names(g.Outputs, g.OutputsLength())


def with_metadata(buf: bytes, meta: dict) -> bytes:
    """The flatbuffer with `meta` as JSON in a model metadata buffer named METADATA_KEY (replacing one)."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    m = fu.read_model_from_bytearray(bytearray(buf))
    m.metadata = [md for md in (m.metadata or []) if md.name != METADATA_KEY]
    m.buffers.append(fu.BufferT(data=np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    md = fu.schema_fb.MetadataT()
    md.name, md.buffer = METADATA_KEY, len(m.buffers) - 1
    m.metadata.append(md)
    return bytes(fu.convert_object_to_bytearray(m))


def read_metadata(buf: bytes) -> dict | None:
    """The export metadata of a .tflite's bytes, or None (plain flatbuffer reading: nothing is executed)."""
    from ai_edge_litert import schema_py_generated as fb
    m = fb.Model.GetRootAs(buf, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() == METADATA_KEY:
            b = m.Buffers(md.Buffer())
            raw = bytes(buf[b.Offset():b.Offset() + b.Size()]) if b.Offset() > 1 else b.DataAsNumpy().tobytes()
            meta = read_json(raw.decode("utf-8", "replace"))
            return meta if isinstance(meta, dict) else None
    return None


def _write(f: Path, buf: bytes) -> Path:
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_bytes(buf)
    os.replace(tmp, f)
    return f


def export(job: ExportJob, f: Path) -> Path:
    buf = convert(job)
    meta = dict(job.meta_for(FORMAT))
    if job.opts.half:
        buf, meta["half"] = float16_weights(buf), True
    return _write(f, with_metadata(buf, meta))


def export_int8(job: ExportJob, f: Path) -> Path:
    from importlib.metadata import version
    buf = convert(job)
    keep = int8_float_scopes(job, _io_tensor_names(buf)[1])
    if not any(re.search(keep[0], n) for n in _tensor_names(buf)):
        raise UserError(f"export.py --include litert --int8: no tensor of the detect head's decoding found by "
                        f"name in the converted graph (litert-torch {version('litert-torch')}); INT8 would put "
                        f"boxes and scores on a 256-level grid")
    q = full_int8(buf, job.calibration_images(), keep)
    return _write(f, with_metadata(q, {**job.meta_for(FORMAT), "int8": True}))


class LiteRTRunner(NumpyRunner):
    """A .tflite in ai-edge-litert's interpreter (XNNPACK, LoadOptions.threads). NCHW batches in; the file's
    input may be NHWC (this project's exports) or NCHW, float or integer (then quantized with its scale and
    zero point, and an integer output dequantized)."""

    def __init__(self, path: Path, opts: LoadOptions):
        from ai_edge_litert.interpreter import Interpreter
        try:
            buf = path.read_bytes()
            meta = read_metadata(buf)
            self.interpreter = Interpreter(model_content=buf, num_threads=int(opts.threads or torch.get_num_threads()))
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise UserError(f"{path}: not a loadable LiteRT model ({first_line_and_reason(e)})") from None
        has_meta = meta is not None
        meta = meta or {}
        inp, out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        shape = [int(v) for v in inp["shape"]]
        self.nhwc = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
        nchw = [shape[0], shape[3], shape[1], shape[2]] if self.nhwc else shape
        input_geometry(meta, nchw)
        self.fixed_batch = nchw[0]
        self.input_index, self.output_index = inp["index"], out["index"]
        self.in_dtype, self.in_q = inp["dtype"], inp["quantization"]
        self.out_dtype, self.out_q = out["dtype"], out["quantization"]
        self.meta = check_detector_output(path, meta, has_meta, out["name"], [int(v) for v in out["shape"]])
        self.precision = "int8" if np.issubdtype(self.in_dtype, np.integer) else "f32"
        if opts.half or opts.bf16:
            LOGGER.warning(f"WARNING: --half: {path.name} runs in the precision it was exported in "
                           f"(LiteRT's CPU kernels take the file as it is)")

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        if np.issubdtype(self.in_dtype, np.integer):
            scale, zero = self.in_q
            info = np.iinfo(self.in_dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(self.in_dtype)
        self.interpreter.set_tensor(self.input_index, np.ascontiguousarray(x, dtype=self.in_dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output_index)
        if np.issubdtype(self.out_dtype, np.integer):
            scale, zero = self.out_q
            y = (y.astype(np.float32) - zero) * scale
        return y


FORMAT = Format(
    name="litert", title="LiteRT", order=40, suffix=".tflite", folder=False,
    export=export, load=LiteRTRunner, export_int8=export_int8,
    export_packages=(("litert_torch", "litert-torch"),), run_packages=(("ai_edge_litert", "ai-edge-litert"),),
    int8_packages=(("ai_edge_quantizer", "ai-edge-quantizer"),),
    half="fp16 weights (any device)", half_file=True,
    runs_on="Android and iOS phones, Raspberry Pi / ARM boards (XNNPACK CPU, GPU/NPU delegates), x86 CPUs",
)
