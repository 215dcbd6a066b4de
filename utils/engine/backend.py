"""One inference loader for validation, detection and export checks: .pt (this project) and every exported
format of utils/deploy/formats (TorchScript, ONNX, OpenVINO, ... each a module with its own runner).

Every format takes float images [B,3,H,W] in 0..1 and returns y [B, 4+nc, A] (main branch of dual models).
Files exported without --dynamic take one input size: `fixed_imgsz` is then (h, w) and callers should
letterbox to exactly that size (validator: no rect batches). Smaller inputs are padded at the bottom/right
(box coordinates stay valid); larger ones are refused. Files exported with --dynamic (metadata
'dynamic_hw': true, or an input with symbolic height/width) take any multiple of the stride:
`fixed_imgsz` is None, as for .pt, so rect batches and minimal-padding letterbox are used.

half=True: fp16 on CUDA; on a CPU with native bfloat16 (utils.torch_utils.cpu_bf16_native) .pt and
.torchscript run under bf16 autocast (the head decodes boxes in fp32) and OpenVINO runs with its bf16
inference precision; without half every CPU format computes in fp32 (OpenVINO too, whose own default on
AMX CPUs is bf16), so results do not depend on the CPU. A file whose runtime cannot honour --half runs in
the precision it was exported in, with one warning.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.deploy import formats
from utils.deploy.formats import LoadOptions, Runner
from utils.deploy.reparam import main_branch_only
from utils.general import UserError
from utils.torch_utils import cpu_bf16

PAD_VALUE = 114 / 255.0  # letterbox grey


def pad_bottom_right(im: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """An image batch padded with letterbox grey to h x w at the bottom and right: pixel coordinates, and so
    every predicted box, stay what they were."""
    dh, dw = h - im.shape[-2], w - im.shape[-1]
    return F.pad(im, (0, dw, 0, dh), value=PAD_VALUE) if dh or dw else im


class Backend:
    """Callable model wrapper: float images [B,3,H,W] in 0..1 -> predictions [B, 4+nc, A] (main branch).

    Attributes: stride (int), names, nc, format ('pt' or the export format's name), pt (a PyTorch module of
    this project), model (that module, else None), runner (an exported file's runner, else None), device,
    dtype, bf16 (CPU bfloat16), fixed_imgsz ((h, w) for fixed-size exports, else None), precision.
    """

    def __init__(self, weights: str | Path | nn.Module, device: str | torch.device = "cpu", half: bool = False,
                 fuse: bool = True, main_only: bool = False):
        self.device = torch.device(device)
        self.asked_half = bool(half)
        self.half = bool(half) and self.device.type == "cuda"
        self.bf16 = self.device.type == "cpu" and cpu_bf16(half)  # bf16 autocast / OpenVINO bf16 precision
        self.model: nn.Module | None = None
        self.runner: Runner | None = None
        self.format = "pt"
        self.fixed_imgsz: tuple[int, int] | None = None
        self.metadata: dict = {}
        self.train_imgsz: int | None = None  # image size the .pt checkpoint was trained at
        self.graph = None  # captured forward (--cuda-graph), see use_cuda_graph
        self.graph_shapes: list[tuple[int, int]] = []  # fixed (h, w) inputs are padded to while graphs are on
        if isinstance(weights, nn.Module):
            self.model, self.weights = weights, None
        else:
            self.weights = Path(weights)
            fmt = None if self.weights.suffix.lower() == ".pt" else formats.for_path(self.weights)
            if fmt is None and self.weights.is_dir():
                raise UserError(f"{weights}: is a folder; give a weights file or an exported model's folder "
                                f"({formats.accepted_suffixes()})")
            if fmt is None and self.weights.suffix.lower() != ".pt":
                raise UserError(f"{weights}: unsupported weights format '{self.weights.suffix or self.weights.name}' "
                                f"(use {formats.accepted_suffixes()})")
            if not self.weights.exists():
                raise UserError(f"{weights}: weights file not found")
            if fmt is None:
                self._load_pt(main_only, fuse)
            else:
                self._load_runner(fmt)
        if self.model is not None:
            self.model.to(self.device, memory_format=torch.channels_last).eval()  # NHWC: faster CPU and CUDA convs
            if self.half:
                self.model.half()
            self.stride = int(max(self.model.stride))
            self.names = list(getattr(self.model, "names", [str(i) for i in range(self.model.nc)]))
            self.nc = self.model.nc
            self.precision = "fp16" if self.half else "bf16" if self.bf16 else "f32"
        self.pt = self.model is not None

    def _load_pt(self, main_only: bool, fuse: bool) -> None:
        ck = load_checkpoint(self.weights)
        self.model = model_from_checkpoint(ck).to(self.device).eval()
        if main_only:
            self.model = main_branch_only(self.model)
        if fuse:
            self.model.fuse()
        self.train_imgsz = (ck.get("opt") or {}).get("imgsz")

    def _load_runner(self, fmt: formats.Format) -> None:
        if not fmt.runs_here or fmt.load is None:
            raise UserError(f"{self.weights}: {fmt.title} files run on {fmt.runs_on}, not here; on this machine run "
                            f"the .pt or another export (export.py --include {' '.join(formats.runnable_names())})")
        formats.check_runtime(fmt, self.weights)
        # half: what the user asked (each runtime decides what it can honour); bf16: a CPU that has it was asked
        self.runner = fmt.load(self.weights, LoadOptions(self.device, self.asked_half, self.bf16, torch.get_num_threads()))
        self.format = fmt.name
        self.precision = self.runner.precision
        self.half = self.runner.precision == "fp16"
        self.bf16 = self.runner.precision == "bf16"
        self._set_meta(self.runner.meta)

    @property
    def fixed_batch(self) -> int | None:
        return self.runner.fixed_batch if self.runner is not None else None

    def default_imgsz(self, fallback: int = 640) -> int:
        """Inference size when the user gave none: the export size, else the training size, else fallback."""
        if self.fixed_imgsz:
            return int(min(self.fixed_imgsz))
        imgsz = self.metadata.get("imgsz")  # dynamic export: the size it was traced at
        if isinstance(imgsz, (list, tuple)) and imgsz and all(isinstance(v, int) and v > 0 for v in imgsz):
            return int(max(imgsz))
        if isinstance(self.train_imgsz, int) and self.train_imgsz > 0:
            return self.train_imgsz
        return fallback

    def _set_meta(self, meta: dict) -> None:
        """stride / names / nc / imgsz from export metadata (missing names -> class indices)."""
        self.metadata = meta
        self.stride = int(meta.get("stride", 32))
        names = meta.get("names")
        nc = int(meta.get("nc", len(names) if names else 0))
        self.names = [str(n) for n in names] if names else [str(i) for i in range(nc)]
        self.nc = nc or len(self.names)
        imgsz = meta.get("imgsz")
        if imgsz and not meta.get("dynamic_hw"):
            self.fixed_imgsz = (int(imgsz[0]), int(imgsz[-1]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    # ---- inference
    def _fit(self, im: torch.Tensor) -> torch.Tensor:
        """Pad a smaller image batch at the bottom/right to the fixed export size (coordinates unchanged)."""
        if self.fixed_imgsz is None or tuple(im.shape[-2:]) == self.fixed_imgsz:
            return im
        h, w = im.shape[-2:]
        fh, fw = self.fixed_imgsz
        if h > fh or w > fw:
            raise UserError(f"{self.weights}: exported for {fh}x{fw} input, got {h}x{w}; "
                            f"letterbox to exactly {fh}x{fw} (no rectangular batches) or export again with --dynamic")
        return pad_bottom_right(im, fh, fw)

    def _fit_graph(self, im: torch.Tensor) -> torch.Tensor:
        """Pad to the smallest of `graph_shapes` the batch fits in (bottom/right, coordinates unchanged), so
        the captured graphs see a few fixed shapes; unchanged when there are none or none fits."""
        from utils.engine.graphs import fixed_shape_for
        shape = fixed_shape_for(im.shape[-2], im.shape[-1], self.graph_shapes) if self.graph_shapes else None
        return pad_bottom_right(im, *shape) if shape else im

    def prepare_input_shape(self, h: int, w: int) -> bool:
        """Tell an exported file's runtime that every input from now on is h x w (a video's or a camera's
        letterboxed frames), so it can compile for that one shape where that is faster; True if it did."""
        return self.runner.set_input_shape(h, w) if self.runner is not None else False

    def concurrent_runs(self, n: int) -> int:
        """How many calls may run at once, asked for n: what an exported file's runtime takes (OpenVINO: one
        stream per call), else 1 (a PyTorch model's threads are split by the predictor itself)."""
        hook = getattr(self.runner, "concurrent_runs", None)
        return int(hook(n)) if hook is not None else 1

    def use_cuda_graph(self, mode: str | bool | None, max_shapes: int = 8) -> bool:
        """Replay captured CUDA graphs for repeated input shapes (--cuda-graph capture|compile); True if on.

        Only PyTorch .pt models on CUDA; elsewhere one warning and eager inference. Set `graph_shapes` to pad
        inputs to a few fixed shapes (rectangular validation batches: utils.engine.graphs.plan_fixed_shapes).
        """
        from utils.engine.graphs import check_mode, graph_forward, warn_once
        if check_mode(mode) is None:
            self.graph = None
            return False
        if not self.pt:
            warn_once("WARNING: --cuda-graph applies to .pt weights only; running this format as usual")
            return False
        self.graph = graph_forward(self.model, mode, self.device, max_shapes)
        return self.graph is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for torch models on a bf16 CPU (--half), else nothing (runners apply their own)."""
        if self.bf16 and self.model is not None:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(self._fit(im)).to(self.device)
        if self.graph is not None:
            return self.graph(self._fit_graph(im.to(self.device, self.dtype)))
        with self.autocast():
            out = self.model(im.to(self.device, self.dtype))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float() if self.bf16 else out

    def warmup(self, imgsz: tuple = (1, 3, 64, 64)) -> None:
        """One eager forward (CUDA start-up, cuDNN's first choices). Never through --cuda-graph: a capture or a
        compilation for a warm-up shape that may not come again costs more than it saves."""
        shape = list(imgsz)
        if self.fixed_imgsz is not None:
            shape[-2:] = self.fixed_imgsz
        graph, self.graph = self.graph, None
        try:
            self(torch.zeros(*shape, device=self.device))
        finally:
            self.graph = graph
