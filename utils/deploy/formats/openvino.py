"""OpenVINO IR: `<name>_openvino_model/<name>.xml + .bin` converted from the traced ONNX graph, FP32 weights, the
metadata in the IR's rt_info; runs on Intel/AMD x86 CPUs (and Intel GPUs/NPUs) with OpenVINO. --int8: an
NNCF-quantized copy `<name>-int8_openvino_model/`. At run time --half asks for bf16 inference precision on a
CPU that has it; otherwise f32 (OpenVINO's own default on AMX CPUs is bf16, so results would depend on the CPU).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from utils.deploy import early_compile
from utils.deploy.formats.base import (ExportJob, Format, LoadOptions, NumpyRunner, check_detector_output,
                                       first_line_and_reason, input_geometry)
from utils.deploy.formats.onnx import onnx_file
from utils.deploy.signal_stack import same_signal_stack
from utils.general import UserError


def _save(model, d: Path, meta: dict, int8: bool) -> Path:
    import openvino as ov
    model.set_rt_info(json.dumps({**meta, "int8": int8}), ["yolo", "metadata"])
    d.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(d / (d.name.removesuffix("_openvino_model") + ".xml")), compress_to_fp16=False)
    return d


def export(job: ExportJob, d: Path) -> Path:
    import openvino as ov
    return _save(ov.convert_model(str(onnx_file(job))), d, job.meta, False)


def export_int8(job: ExportJob, d: Path) -> Path:
    """Every convolution in int8 with --int8-all; by default those this CPU runs faster in bf16 stay bf16
    (measured: utils/deploy/int8_layers.py), and the metadata says so for the runner."""
    import openvino as ov
    from utils.deploy import quantize
    model, images = ov.convert_model(str(onnx_file(job))), job.calibration_images()
    if job.opts.int8_all:
        return _save(quantize.quantize_openvino(model, images), d, job.meta, True)
    model, kept = quantize.quantize_openvino_for_cpu(model, images)
    return _save(model, d, {**job.meta, "int8_float": kept} if kept else job.meta, True)


def _xml(path: Path) -> Path:
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.xml"))
    if len(found) != 1:
        raise UserError(f"{path}: expected one OpenVINO .xml model in the folder, found {len(found)}")
    return found[0]


def _dims(partial_shape) -> list:
    return [d.get_length() if d.is_static else None for d in partial_shape] if partial_shape.rank.is_static else []


class OpenVinoRunner(NumpyRunner):
    """The IR compiled for the CPU: one stream with all of torch's threads (latency), or, when a video's frames
    are run `concurrent_runs(n)` at a time, n streams of threads // n threads each: on 2 cores two one-thread
    streams finish 5-20% more frames per second than one two-thread stream (no barrier after every layer;
    benchmarks/results/video_vs_ultralytics.md). Every calling thread gets its own infer request per
    compilation, so concurrent calls never share an output buffer."""

    def __init__(self, path: Path, opts: LoadOptions):
        import openvino as ov
        xml = _xml(path)
        early_compile.wait()  # no OpenVINO call beside the early compilation (see _FIRST_CALLS)
        self.core = ov.Core()
        self.static: tuple[tuple[int, ...], object] | None = None  # (input shape, compiled) after set_input_shape
        self._compiled = None  # the compilation for any input shape, made on first use
        self._local = threading.local()  # this thread's infer request per compilation
        self._lock = threading.Lock()
        try:
            self.model = model = self.core.read_model(str(xml))
        except Exception as e:  # the reason ("bin file cannot be found", "tags mismatch") is on OpenVINO's last line
            raise UserError(f"{xml}: not a loadable OpenVINO model ({first_line_and_reason(e)})") from None
        has_meta = model.has_rt_info(["yolo", "metadata"])
        meta = early_compile.model_meta(model)
        out = model.output(0)
        check_detector_output(xml, meta, has_meta, next(iter(sorted(out.get_names())), "0"), _dims(out.get_partial_shape()))
        shape = _dims(model.input(0).get_partial_shape())
        self.meta = input_geometry(meta, shape)
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None
        # f32 unless --half or an INT8 file with layers kept in bf16: OpenVINO would otherwise pick bf16 on AMX
        # CPUs by itself (results would differ by CPU)
        self.precision = "bf16" if opts.bf16 else early_compile.precision(self.core, meta, False)
        self.threads = int(opts.threads or torch.get_num_threads())
        self.streams = 1
        self.xml = xml

    @property
    def config(self) -> dict:
        return early_compile.compile_config(self.precision, self.threads, self.streams)

    def concurrent_runs(self, n: int) -> int:
        """Calls that may run at once from now on: up to one stream per thread, fixed before the first
        compilation (a model compiled already keeps its streams). Returns how many it takes."""
        if self._compiled is None and self.static is None:
            self.streams = max(1, min(int(n), self.threads))
        return self.streams

    def _compile(self, model, what: str):
        try:
            with same_signal_stack():
                return self.core.compile_model(model, "CPU", self.config)
        except Exception as e:
            raise UserError(f"{self.xml}: OpenVINO could not compile it for the CPU{what} "
                            f"({first_line_and_reason(e)})") from None

    @property
    def compiled(self):
        """The compilation for any input shape; a dynamic model compiles it on first use, so a video that calls
        set_input_shape first compiles once, for its frame shape (startup: one compilation, not two)."""
        with self._lock:  # frames in flight ask at once: one compilation, not one per thread
            if self._compiled is None:  # detect_dual.py may have compiled it during start-up already
                self._compiled = (early_compile.take(self.xml, self.config)
                                  or self._compile(self.model, " with dynamic shapes" if self.meta.get("dynamic_hw") else ""))
        return self._compiled

    def set_input_shape(self, h: int, w: int) -> bool:
        """A model with dynamic height/width about to see only [1, 3, h, w] inputs (a video's letterboxed
        frames): a copy reshaped to that shape and compiled once, so the CPU plugin picks its kernels and memory
        for it instead of per call (benchmarks/bench_formats.py --static-shape measures it); other shapes use
        the dynamic compilation. False for a model that is already static."""
        if self.model.input(0).get_partial_shape().is_static:
            return False
        model = self.model.clone()
        model.reshape({model.input(0): [1, 3, h, w]})
        self.static = ((1, 3, h, w), self._compile(model, f" at {h}x{w}"))
        return True

    def run(self, x: np.ndarray) -> np.ndarray:
        compiled = self.static[1] if self.static and x.shape == self.static[0] else self.compiled
        requests = self._local.__dict__.setdefault("requests", {})  # keyed by the compilation itself, kept alive
        request = requests.get(compiled)
        if request is not None:
            return request.infer({0: x}, share_inputs=True)[0]
        with _FIRST_CALLS:  # see _FIRST_CALLS
            request = requests[compiled] = compiled.create_infer_request()
            return request.infer({0: x}, share_inputs=True)[0]


# OpenVINO's Python binding initialises function-level statics on a first call and releases the GIL inside: a
# video run with two frame workers hung in their first calls (gdb: one worker held the GIL and waited on a static's
# guard in the binding, the other held the guard and waited for the GIL). Each thread's first call, one at a time.
_FIRST_CALLS = threading.Lock()


FORMAT = Format(
    name="openvino", title="OpenVINO", order=30, suffix="_openvino_model", folder=True,
    export=export, load=OpenVinoRunner, export_int8=export_int8,
    marker="*.xml", file_suffixes=(".xml",),
    export_packages=(("onnx", "onnx"), ("openvino", "openvino")), run_packages=(("openvino", "openvino"),),
    int8_packages=(("nncf", "nncf"),),
    dynamic=True, half="bf16 inference precision at run time (--half in detect/val)", runs_on="Intel/AMD x86 CPUs (AMX/AVX512 bf16), Intel GPUs and NPUs",
)
