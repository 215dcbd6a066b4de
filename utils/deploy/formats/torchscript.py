"""TorchScript: the traced model with the export metadata as config.txt; runs wherever torch does (C++ LibTorch,
PyTorch Mobile's lite interpreter after optimisation).

Precision follows the file: an fp16 file (export --half on CUDA) runs in fp16 and needs a CUDA device; an fp32
file runs in fp32, or under bf16 autocast on a CPU with native bfloat16 when --half is asked for. --half with
an fp32 file on CUDA cannot apply (its weights are fp32): one warning, fp32.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from utils.deploy.formats.base import ExportJob, Format, LoadOptions, Runner, first_line_and_reason, read_json
from utils.general import LOGGER, UserError


def trace(model: torch.nn.Module, im: torch.Tensor) -> torch.jit.ScriptModule:
    """The traced model (call inside export_mode). Nothing in it names a device (see utils.boxes.make_anchors),
    so a file exported on CPU runs on any GPU."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, im, strict=False, check_trace=False)


def export(job: ExportJob, f: Path) -> Path:
    trace(job.model, job.im).save(str(f), _extra_files={"config.txt": json.dumps(job.meta)})
    return f


class TorchScriptRunner(Runner):
    def __init__(self, path: Path, opts: LoadOptions):
        extra = {"config.txt": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                self.model = torch.jit.load(str(path), map_location=opts.device, _extra_files=extra).eval()
        except Exception as e:
            raise UserError(f"{path}: not a loadable TorchScript file ({first_line_and_reason(e)})") from None
        self.meta = read_json(extra["config.txt"], {}) or {}
        if not self.meta:
            LOGGER.warning(f"WARNING: {path}: no export metadata (config.txt); class names unknown, stride 32")
        file_half = bool(self.meta.get("half"))
        if file_half and opts.device.type != "cuda":
            raise UserError(f"{path}: exported in fp16, which needs a CUDA device")
        if opts.half and opts.device.type == "cuda" and not file_half:
            LOGGER.warning(f"WARNING: --half: {path.name} holds fp32 weights, so it runs in fp32 "
                           f"(export with --half on a CUDA device for an fp16 file)")
        self.dtype = torch.float16 if file_half else torch.float32
        self.bf16 = bool(opts.bf16) and opts.device.type == "cpu"
        self.device = opts.device
        self.precision = "fp16" if file_half else "bf16" if self.bf16 else "f32"

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = self.model(im.to(self.device, self.dtype))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float()


FORMAT = Format(
    name="torchscript", title="TorchScript", order=10, suffix=".torchscript", folder=False,
    export=export, load=TorchScriptRunner,
    half="fp16 weights (CUDA only)", half_needs_cuda=True, dynamic=True, runs_on="PyTorch / LibTorch (C++), x86 and NVIDIA servers",
)
