"""ONNX: the traced graph (torch.onnx, TorchScript-based exporter) with the metadata in metadata_props; runs in
ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). --int8: a statically quantized copy `<name>-int8.onnx`
(QDQ, utils/deploy/quantize.py). --dynamic: batch and height/width symbolic (any multiple of the stride).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from utils.deploy.formats.base import (ExportJob, Format, LoadOptions, NumpyRunner, check_detector_output,
                                       first_line_and_reason, input_geometry, read_json)
from utils.general import LOGGER, UserError

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


def write_onnx(job: ExportJob, f: Path) -> Path:
    """Trace the job's model to ONNX at f (checked, optionally simplified, metadata attached)."""
    import onnx
    o = job.opts
    # dynamic: batch and image height/width (any multiple of the stride); the anchor count follows the size
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}} if o.dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(job.model, (job.im,), str(f), dynamo=False, opset_version=o.opset, do_constant_folding=True,
                          input_names=["images"], output_names=["output0"], dynamic_axes=axes)
    m = onnx.load(str(f))
    onnx.checker.check_model(m)
    if o.simplify:
        try:
            import onnxsim
            m, ok = onnxsim.simplify(m)
            if not ok:
                LOGGER.warning("WARNING: onnxsim could not validate the simplified model; kept it anyway")
        except ImportError:
            LOGGER.warning("WARNING: --simplify ignored: onnxsim is not installed")
    del m.metadata_props[:]
    for k, v in job.meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, json.dumps(v)
    onnx.save(m, str(f))
    return f


def onnx_file(job: ExportJob) -> Path:
    """The job's traced ONNX graph in its scratch folder, written once (the formats converted from ONNX share it)."""
    return job.once("onnx", lambda: write_onnx(job, job.tmp / f"{job.weights.stem}.onnx"))


def export(job: ExportJob, f: Path) -> Path:
    shutil.copyfile(onnx_file(job), f)
    return f


def export_int8(job: ExportJob, f: Path) -> Path:
    from utils.deploy import quantize
    return quantize.quantize_onnx(onnx_file(job), f, job.calibration_images())


def session_options(threads: int | None = None):
    """ONNX Runtime settings for CPU inference: all graph optimisations (constant folding, Conv+BN+activation
    fusion, layout transforms) and as many intra-op threads as torch uses (torch.set_num_threads /
    OMP_NUM_THREADS are respected, so the video reader thread is not starved by oversubscription), and
    workers that block instead of spinning between operators (spinning took CPU from the decode/encode
    threads and other processes: gelan-t 234 ms spinning vs 156 ms blocking on a busy 2-core machine)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def providers(device: torch.device, available: list[str]) -> list:
    """ONNX Runtime providers for `device`: CUDA on that very GPU when onnxruntime-gpu offers it (its
    device_id defaults to GPU 0 whatever --device says), with the CPU as fallback."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner(NumpyRunner):
    def __init__(self, path: Path, opts: LoadOptions):
        self.path, self.opts = path, opts
        try:
            self.session = self._session()
        except Exception as e:
            raise UserError(f"{path}: not a loadable ONNX model ({first_line_and_reason(e)})") from None
        raw = self.session.get_modelmeta().custom_metadata_map or {}
        meta = {k: read_json(v, v) for k, v in raw.items()}
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        shape = list(inp.shape)
        input_geometry(meta, shape)
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None
        if "float16" in inp.type:
            self.input_dtype, self.precision = np.float16, "fp16"
        self.meta = check_detector_output(path, meta, bool(raw), out.name, list(out.shape))
        if opts.bf16:
            LOGGER.warning(f"WARNING: --half: {path.name} runs in the precision it was exported in "
                           f"(ONNX Runtime has no bf16 CPU kernels); export --include openvino for bf16")

    def _session(self):
        import onnxruntime as ort
        return ort.InferenceSession(str(self.path), sess_options=session_options(self.opts.threads),
                                    providers=providers(self.opts.device, ort.get_available_providers()))

    def set_input_shape(self, h: int, w: int) -> bool:
        """Nothing to gain: a second session with the symbolic dimensions fixed to the frame shape (free
        dimension overrides) ran gelan-t at 384x640 no faster than the dynamic one (CPU time per forward, one
        thread, 15 interleaved rounds: fp32 31.5 vs 30.0 ms, INT8 22.7 vs 22.9 ms) and doubled the startup, so
        the dynamic session serves every shape."""
        return False

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


FORMAT = Format(
    name="onnx", title="ONNX", order=20, suffix=".onnx", folder=False,
    export=export, load=OnnxRunner, export_int8=export_int8,
    export_packages=(("onnx", "onnx"),), run_packages=(("onnxruntime", "onnxruntime"),),
    int8_packages=(("onnxruntime", "onnxruntime"),),
    half="fp16 weights (CUDA only)", half_needs_cuda=True, dynamic=True, runs_on="ONNX Runtime on x86/ARM CPUs and NVIDIA GPUs; other runtimes that read ONNX",
)
