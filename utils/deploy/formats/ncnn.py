"""NCNN: `<name>_ncnn_model/` holding model.ncnn.param + model.ncnn.bin, converted by pnnx from the traced graph,
and metadata.json (names, stride, nc, imgsz; read as JSON, never executed). Runs with ncnn's Python binding on
ARM boards (Raspberry Pi, Jetson CPUs), Android and x86 CPUs; one image at a time (NCNN has no batch axis).

--half at export stores the weights in fp16: half the file, and the outputs of fp16-rounded weights (NCNN widens
them to fp32 as it loads them; measured gelan-t at 320 px: max box-coordinate change 9e-4 px, same speed). At run
time the file computes in fp32 unless --half reaches it (the loader passes --half to CPU runtimes where the CPU
has native bf16); then NCNN's fp16 storage and arithmetic are switched on, which NCNN uses on ARMv8.2 CPUs with
fp16 arithmetic and ignores on x86 (measured: same outputs, same speed).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from utils.deploy.formats.base import (ExportJob, Format, LoadOptions, NumpyRunner, check_detector_output,
                                       input_geometry, read_json)
from utils.general import LOGGER, UserError

PARAM, BIN, META = "model.ncnn.param", "model.ncnn.bin", "metadata.json"


def _pnnx(job: ExportJob, work: Path) -> tuple[Path, Path]:
    """The traced fp32 model converted by the pnnx executable into `work` (every file pnnx writes, the
    intermediate .pnnx.* / _pnnx.py / .onnx ones included, stays in `work`); returns (param, bin).

    The executable is called directly: pnnx.export() would also import the Python model it generates, and its
    Python API stores fp16 weights unless told otherwise."""
    import pnnx
    from utils.deploy.formats.torchscript import trace
    model, im = job.float_cpu()
    im = im[:1]  # NCNN has no batch axis: one image per call
    work.mkdir(parents=True, exist_ok=True)
    ts = work / "model.pt"
    trace(model, im).save(str(ts))
    param, binary = work / PARAM, work / BIN
    outs = {"pnnxparam": "model.pnnx.param", "pnnxbin": "model.pnnx.bin", "pnnxpy": "model_pnnx.py",
            "pnnxonnx": "model.pnnx.onnx", "ncnnparam": PARAM, "ncnnbin": BIN, "ncnnpy": "model_ncnn.py"}
    cmd = [pnnx.EXEC_PATH, str(ts), f"inputshape=[{','.join(str(int(s)) for s in im.shape)}]f32", "device=cpu",
           f"fp16={int(job.opts.half)}", *(f"{k}={work / v}" for k, v in outs.items())]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if r.returncode or not (param.is_file() and binary.is_file()):
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise UserError(f"export.py --include ncnn: pnnx could not convert the model (exit {r.returncode}: "
                        f"{lines[-1][:160] if lines else 'no output'})")
    return param, binary


def export(job: ExportJob, d: Path) -> Path:
    """Only what NCNN needs goes into the folder, assembled next to it and renamed into place."""
    param, binary = _pnnx(job, job.tmp / "ncnn")
    meta = {**job.meta_for(FORMAT), "batch": 1, "half": bool(job.opts.half)}
    part = d.with_name(d.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    try:
        part.mkdir(parents=True)
        shutil.copyfile(param, part / PARAM)
        shutil.copyfile(binary, part / BIN)
        (part / META).write_text(json.dumps(meta, indent=1))
        if d.is_dir():
            shutil.rmtree(d)
        os.replace(part, d)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return d


def _param(path: Path) -> Path:
    """The model's .param: the given file, or the one NCNN .param of the folder (pnnx's own *.pnnx.param is
    not one)."""
    if not path.is_dir():
        return path
    found = sorted(p for p in path.glob("*.param") if not p.name.endswith(".pnnx.param"))
    if len(found) != 1:
        raise UserError(f"{path}: expected one NCNN .param file in the folder, found {len(found)}")
    return found[0]


class NcnnRunner(NumpyRunner):
    """The network on the CPU with torch's thread count, fp32 unless --half (see the module docstring)."""

    def __init__(self, path: Path, opts: LoadOptions):
        import ncnn
        param = _param(path)
        binary = param.with_suffix(".bin")
        meta_file = param.parent / META
        meta = read_json(meta_file.read_text(errors="replace")) if meta_file.is_file() else None
        if not isinstance(meta, dict) or not isinstance(meta.get("imgsz"), list):
            raise UserError(f"{param.parent}: no readable {META} with the input size; export a checkpoint of this "
                            f"project with export.py --include ncnn")
        if not binary.is_file():
            raise UserError(f"{param}: its weights {binary.name} are missing")
        self.net = ncnn.Net()
        o = self.net.opt
        o.use_vulkan_compute = False
        o.num_threads = int(opts.threads or torch.get_num_threads())
        # NCNN's own default is fp16 wherever the CPU has it; here only when --half asks (fp32 otherwise)
        reduced = bool(opts.half or opts.bf16)
        o.use_fp16_storage = o.use_fp16_packed = o.use_fp16_arithmetic = reduced
        o.use_bf16_storage = False
        fp16_cpu = bool(getattr(ncnn, "cpu_support_arm_asimdhp", lambda: False)())
        if reduced and not fp16_cpu:  # measured on x86 (Zen 4): same outputs, same speed as fp32
            LOGGER.warning(f"WARNING: --half: {path.name} runs in fp32 (NCNN computes in fp16 on ARMv8.2 CPUs only)")
        self.precision = "ncnn-fp16" if reduced and fp16_cpu else "f32"  # not "fp16": inputs stay fp32
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(binary)) != 0:
            raise UserError(f"{param}: not a loadable NCNN model (ncnn could not read {param.name} / {binary.name})")
        self.input_name, self.output_name = self.net.input_names()[0], self.net.output_names()[0]
        h, w = (int(v) for v in (meta["imgsz"][0], meta["imgsz"][-1]))
        self.meta = input_geometry(meta, [1, 3, h, w])
        y = self.run(np.zeros((1, 3, h, w), np.float32))  # the output shape, and a warm-up
        check_detector_output(param, self.meta, True, self.output_name, list(y.shape))

    def run(self, x: np.ndarray) -> np.ndarray:
        import ncnn
        outs = []
        for im in x:
            ex = self.net.create_extractor()
            ex.input(self.input_name, ncnn.Mat(np.ascontiguousarray(im)))
            ret, out = ex.extract(self.output_name)
            if ret != 0:
                raise UserError(f"NCNN could not run the model on a {im.shape[1]}x{im.shape[2]} input (error {ret})")
            outs.append(np.array(out))
        return np.stack(outs)


FORMAT = Format(
    name="ncnn", title="NCNN", order=60, suffix="_ncnn_model", folder=True,
    export=export, load=NcnnRunner, marker="*.param", file_suffixes=(".param",),
    export_packages=(("pnnx", "pnnx"),), run_packages=(("ncnn", "ncnn"),),
    half="fp16 weights in the file (half the size)", half_file=True,
    runs_on="ARM boards (Raspberry Pi), Android and x86 CPUs",
)
