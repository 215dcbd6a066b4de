"""What every export format shares: its description (Format), the export job it writes from, and the runner
it loads into. One module per runtime in this package fills these in; utils/deploy/formats/__init__.py
finds them.

A runner takes float images [B, 3, H, W] in 0..1 (a torch tensor on any device) and returns predictions
[B, 4 + nc, A] (xywh pixels + class scores, float32, on the input's device) — the contract of the .pt model's
main branch. `meta` carries names / stride / nc / imgsz / dynamic_hw as export.py wrote them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, UserError



@contextlib.contextmanager
def quiet(logger: str = "", env: dict[str, str] | None = None) -> Iterator[None]:
    """Silence a converter's own chatter (progress bars, INFO lines, warnings about itself) while it runs:
    stdout/stderr captured, warnings ignored, `logger` ("" = the root logger) raised to its errors only and
    `env` set; all restored afterwards. Errors still raise, so nothing the user must see is lost."""
    env = env or {}
    old_env = {k: os.environ.get(k) for k in env}
    log = logging.getLogger(logger or None)
    old_level = log.level
    os.environ.update(env)
    log.setLevel(max(old_level, logging.ERROR if logger else logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(old_level)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

@dataclass(frozen=True)
class ExportOptions:
    """Settings of one export.py call that formats read (sizes are the checked, stride-aligned ones)."""
    imgsz: tuple[int, int] = (640, 640)
    batch: int = 1
    dynamic: bool = False
    half: bool = False
    int8: bool = False
    int8_all: bool = False  # OpenVINO INT8: every convolution int8, not only those faster in int8 on this CPU
    opset: int = 17
    simplify: bool = False
    data: str | None = None
    calib_images: int = 200


@dataclass(frozen=True)
class LoadOptions:
    """What the caller asks of a runner: the torch device of its inputs/outputs, `half` = --half as given (a
    runtime with fp16 kernels may use them; one that cannot honour it runs in its file's own precision), `bf16`
    = --half on a CPU with native bfloat16, intra-op threads."""
    device: torch.device = torch.device("cpu")
    half: bool = False
    bf16: bool = False
    threads: int = 0


class ExportJob:
    """One model being exported: the model in export mode, its example input, the metadata, the options, a
    scratch folder, and what several formats derive from it (the torch.export program, the INT8 calibration
    images, the ONNX file: formats/onnx.py's onnx_file), each made once on first use (`once`)."""

    def __init__(self, model: nn.Module, im: torch.Tensor, meta: dict, opts: ExportOptions, weights: Path,
                 tmp: Path, calibration: Callable[[], list[np.ndarray]] | None = None):
        self.model, self.im, self.meta, self.opts, self.weights, self.tmp = model, im, meta, opts, weights, tmp
        self._calibration = calibration
        self._cache: dict[str, object] = {}

    def once(self, key: str, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def float_cpu(self) -> tuple[nn.Module, torch.Tensor]:
        """The model and example input in fp32 on the CPU, what the mobile converters start from (the job's own
        model is fp16 on CUDA for --half TorchScript/ONNX exports)."""
        p = next(self.model.parameters())
        if p.device.type == "cpu" and p.dtype == torch.float32:
            return self.model, self.im
        return self.once("float_cpu", lambda: (copy.deepcopy(self.model).float().cpu(), self.im.float().cpu()))

    def exported_program(self) -> torch.export.ExportedProgram:
        """torch.export of the fp32 CPU model at the example input's fixed shape (static strides and token grids)."""
        def make():
            model, im = self.float_cpu()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(model, (im,), strict=False)
        return self.once("exported_program", make)

    def meta_for(self, fmt: "Format") -> dict:
        """The metadata as a file of `fmt` should carry it: a format without dynamic shapes is fixed-size."""
        if fmt.dynamic or not self.meta.get("dynamic"):
            return self.meta
        return {**self.meta, "dynamic": False, "dynamic_hw": False}

    def calibration_images(self) -> list[np.ndarray]:
        if self._calibration is None:
            raise UserError("export.py: INT8 needs calibration images (--data)")
        return self.once("calibration", self._calibration)


@dataclass(frozen=True)
class Format:
    """One runtime: how export.py names and writes its file, how the backend recognises and runs it, and the
    packages each side needs as (import name, pip package). `runs_here` False: the file can be written on
    this machine but its runtime exists only elsewhere (Core ML: macOS/iOS)."""
    name: str
    title: str
    order: int
    suffix: str                                   # file suffix (".onnx") or folder suffix ("_openvino_model")
    folder: bool
    export: Callable[[ExportJob, Path], Path]
    load: Callable[[Path, LoadOptions], "Runner"] | None
    export_packages: tuple[tuple[str, str], ...] = ()
    run_packages: tuple[tuple[str, str], ...] = ()
    int8_packages: tuple[tuple[str, str], ...] = ()
    export_int8: Callable[[ExportJob, Path], Path] | None = None
    half: str = "not supported"                   # what --half means at export (docs table)
    half_needs_cuda: bool = False                 # --half halves the torch model itself (needs a CUDA device)
    half_file: bool = False                       # --half at export writes a reduced-precision file on any device
    dynamic: bool = False                         # --dynamic can make height/width/batch free
    marker: str = ""                              # folder formats: a glob that identifies one by its content
    file_suffixes: tuple[str, ...] = ()           # other file suffixes that stand for this format (OpenVINO .xml)
    runs_here: bool = True
    runs_on: str = ""                             # devices it is meant for (docs table)
    extra: dict = field(default_factory=dict)

    def path(self, weights: Path, int8: bool = False) -> Path:
        """Where export writes it: next to the weights, `<stem>[-int8]<suffix>`."""
        return weights.with_name(weights.stem + ("-int8" if int8 else "") + self.suffix)

    def matches(self, path: Path) -> bool:
        if path.suffix.lower() in self.file_suffixes:
            return True
        if self.folder:
            return path.name.endswith(self.suffix) and (path.is_dir() or not path.exists())
        return path.suffix.lower() == self.suffix

    def missing(self, which: str = "export", int8: bool = False) -> list[str]:
        """pip packages this side ('export' or 'run') needs that are not importable."""
        need = list(self.export_packages if which == "export" else self.run_packages)
        if int8 and which == "export":
            need += self.int8_packages
        return [pip for mod, pip in need if find_spec(mod) is None]


class Runner:
    """A loaded exported model (see the module docstring). Subclasses set `meta` and implement __call__."""
    meta: dict
    fixed_batch: int | None = None
    precision: str = "f32"

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_input_shape(self, h: int, w: int) -> bool:
        """Prepare for a known fixed input size (a video's letterboxed frames); True if that changed anything."""
        return False


class NumpyRunner(Runner):
    """A runtime with numpy in and out; a fixed batch size runs in chunks, the last zero-padded."""
    input_dtype = np.float32

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        x = im.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        b, fb = x.shape[0], self.fixed_batch
        if fb is None or fb == b:
            y = self.run(x)
        else:
            outs = []
            for s in range(0, b, fb):
                chunk = x[s:s + fb]
                n = chunk.shape[0]
                if n < fb:
                    chunk = np.concatenate([chunk, np.zeros((fb - n, *chunk.shape[1:]), chunk.dtype)], 0)
                outs.append(self.run(chunk)[:n])
            y = np.concatenate(outs, 0)
        return torch.from_numpy(np.ascontiguousarray(y)).to(im.device).float()


def read_json(s, default=None):
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return default


def first_line_and_reason(e: BaseException, width: int = 160) -> str:
    """A runtime's error in one line: its first line and, when the reason is further down (OpenVINO puts it
    last), its last line too."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] if len(lines) == 1 or lines[-1] in lines[0] else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= width else text[:width - 3] + "..."


def input_geometry(meta: dict, shape: list) -> dict:
    """Fill imgsz / dynamic_hw from a file's input shape [B, 3, H, W] (ints where static): the graph is the
    truth over the metadata."""
    if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0 and shape[3] > 0:
        meta["imgsz"], meta["dynamic_hw"] = [int(shape[2]), int(shape[3])], False
    else:
        meta["dynamic_hw"] = True
    return meta


def check_detector_output(path: Path, meta: dict, has_meta: bool, name: str, shape: list) -> dict:
    """Refuse a foreign exported file (a classifier, another detector layout), for detection and validation
    alike: the first output (`name`, `shape` with ints for static sizes) must be [batch, 4 + classes, anchors];
    without metadata the class count is read from that shape. Returns meta (nc filled in)."""
    channels = shape[1] if len(shape) == 3 and isinstance(shape[1], int) else None
    nc = meta.get("nc", len(meta["names"]) if isinstance(meta.get("names"), list) else None)
    why = None
    if len(shape) != 3:
        why = f"its output '{name}' has shape {shape}"
    elif channels is not None and channels < 5:
        why = f"its output '{name}' has {channels} channels (4 box values + at least one class)"
    elif isinstance(nc, int) and channels is not None and channels != 4 + nc:
        why = f"its output has {channels} channels but its metadata says {nc} classes"
    elif not has_meta and channels is None:
        why = "it has no export metadata and its output's class count is not fixed"
    if why:
        raise UserError(f"{path}: not a detector exported by this project ({why}; expected "
                        f"[batch, 4 + classes, anchors]); export a checkpoint of this project with export.py")
    if not has_meta:
        meta["nc"] = channels - 4
        LOGGER.warning(f"WARNING: {path}: no export metadata; class names unknown, stride 32")
    return meta


def size_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 1e6
