"""One inference loader for validation, detection and export checks: .pt (this project), .torchscript, .onnx
(FP32 or INT8) and OpenVINO IR (a `*_openvino_model/` folder or its .xml file, FP32 or INT8).

Every format takes float images [B,3,H,W] in 0..1 and returns y [B, 4+nc, A] (main branch of dual models).
Files exported without --dynamic take one input size: `fixed_imgsz` is then (h, w) and callers should
letterbox to exactly that size (validator: no rect batches). Smaller inputs are padded at the bottom/right
(box coordinates stay valid); larger ones are refused. Files exported with --dynamic (metadata
'dynamic_hw': true, or an ONNX input with symbolic height/width) take any multiple of the stride:
`fixed_imgsz` is None, as for .pt, so rect batches and minimal-padding letterbox are used.

half=True: fp16 on CUDA; on a CPU with native bfloat16 (utils.torch_utils.cpu_bf16_native) .pt and
.torchscript run under bf16 autocast (the head decodes boxes in fp32) and OpenVINO runs with its bf16
inference precision; without half every CPU format computes in fp32 (OpenVINO too, whose own default on
AMX CPUs is bf16), so results do not depend on the CPU.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.deploy.reparam import main_branch_only
from utils.general import LOGGER, UserError
from utils.torch_utils import cpu_bf16

PAD_VALUE = 114 / 255.0  # letterbox grey
SUFFIXES = (".pt", ".torchscript", ".onnx", ".xml")  # plus OpenVINO folders (*_openvino_model/)


def _json(s, default=None):
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return default


def ort_session_options(threads: int | None = None):
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


def ort_providers(device: torch.device, available: list[str]) -> list:
    """ONNX Runtime providers for `device`: CUDA on that very GPU when onnxruntime-gpu offers it (its
    device_id defaults to GPU 0 whatever --device says), with the CPU as fallback."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def pad_bottom_right(im: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """An image batch padded with letterbox grey to h x w at the bottom and right: pixel coordinates, and so
    every predicted box, stay what they were."""
    dh, dw = h - im.shape[-2], w - im.shape[-1]
    return F.pad(im, (0, dw, 0, dh), value=PAD_VALUE) if dh or dw else im


class Backend:
    """Callable model wrapper: float images [B,3,H,W] in 0..1 -> predictions [B, 4+nc, A] (main branch).

    Attributes: stride (int), names, nc, pt (PyTorch module), jit, onnx, openvino, model (nn.Module /
    ScriptModule or None), device, dtype, bf16 (CPU bfloat16), fixed_imgsz ((h, w) for exported files, else
    None), fixed_batch (int or None).
    """

    def __init__(self, weights: str | Path | nn.Module, device: str | torch.device = "cpu", half: bool = False,
                 fuse: bool = True, main_only: bool = False):
        self.device = torch.device(device)
        self.half = bool(half) and self.device.type == "cuda"
        self.bf16 = self.device.type == "cpu" and cpu_bf16(half)  # bf16 autocast / OpenVINO bf16 precision
        self.model: nn.Module | None = None
        self.session = None
        self.jit = self.onnx = self.openvino = False
        self.fixed_imgsz: tuple[int, int] | None = None
        self.fixed_batch: int | None = None
        self.metadata: dict = {}
        self.train_imgsz: int | None = None  # image size the .pt checkpoint was trained at
        self._input_dtype = np.float32
        self.graph = None  # captured forward (--cuda-graph), see use_cuda_graph
        self.graph_shapes: list[tuple[int, int]] = []  # fixed (h, w) inputs are padded to while graphs are on
        if isinstance(weights, nn.Module):
            self.model = weights
            self.weights = None
        else:
            self.weights = Path(weights)
            suffix = ".xml" if self.weights.is_dir() else self.weights.suffix.lower()
            if suffix not in SUFFIXES:
                raise UserError(f"{weights}: unsupported weights format '{suffix}' (use .pt, .torchscript, .onnx "
                                f"or an OpenVINO *_openvino_model folder)")
            if not self.weights.exists():
                raise UserError(f"{weights}: weights file not found")
            if suffix == ".pt":
                ck = load_checkpoint(self.weights)
                self.model = model_from_checkpoint(ck).to(self.device).eval()
                if main_only:
                    self.model = main_branch_only(self.model)
                if fuse:
                    self.model.fuse()
                self.train_imgsz = (ck.get("opt") or {}).get("imgsz")
            elif suffix == ".torchscript":
                self._load_torchscript()
            elif suffix == ".xml":
                self._load_openvino()
            else:
                self._load_onnx()
        if self.bf16 and self.onnx:
            LOGGER.warning(f"WARNING: --half: {self.weights.name} runs in the precision it was exported in "
                           f"(ONNX Runtime has no bf16 CPU kernels); export --include openvino for bf16")
            self.bf16 = False
        if self.model is not None and not self.jit:
            self.model.to(self.device, memory_format=torch.channels_last).eval()  # NHWC: faster CPU and CUDA convs
            if self.half:
                self.model.half()
            self.stride = int(max(self.model.stride))
            self.names = list(getattr(self.model, "names", [str(i) for i in range(self.model.nc)]))
            self.nc = self.model.nc
        self.pt = self.model is not None and not self.jit

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

    # ---- loaders of exported files
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

    def _load_torchscript(self) -> None:
        extra = {"config.txt": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                self.model = torch.jit.load(str(self.weights), map_location=self.device, _extra_files=extra)
        except Exception as e:
            raise UserError(f"{self.weights}: not a loadable TorchScript file ({str(e).splitlines()[0][:120]})") from None
        self.jit = True
        self.model.eval()
        meta = _json(extra["config.txt"], {}) or {}
        if not meta:
            LOGGER.warning(f"WARNING: {self.weights}: no export metadata (config.txt); class names unknown, stride 32")
        self._set_meta(meta)
        if meta.get("half") and self.device.type == "cuda":
            self.half = True
        elif meta.get("half"):
            raise UserError(f"{self.weights}: exported in fp16, which needs a CUDA device")

    def _load_onnx(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{self.weights}: running .onnx files needs onnxruntime (pip install onnxruntime)") from None
        providers = ort_providers(self.device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.weights), sess_options=ort_session_options(),
                                                providers=providers)
        except Exception as e:
            raise UserError(f"{self.weights}: not a loadable ONNX model ({str(e).splitlines()[0][:120]})") from None
        self.onnx = True
        raw = self.session.get_modelmeta().custom_metadata_map or {}
        meta = {k: _json(v, v) for k, v in raw.items()}
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = list(inp.shape)
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
            meta["imgsz"] = [shape[2], shape[3]]  # the graph's input shape is the truth
            meta["dynamic_hw"] = False
        else:
            meta["dynamic_hw"] = True  # symbolic height/width: any multiple of the stride
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None
        if "float16" in inp.type:
            self._input_dtype = np.float16
        out = self.session.get_outputs()[0]
        self._check_detector_output(meta, bool(raw), out.name, list(out.shape))
        if not raw:
            LOGGER.warning(f"WARNING: {self.weights}: no export metadata; class names unknown, stride 32")
        self._set_meta(meta)

    def _check_detector_output(self, meta: dict, has_meta: bool, name: str, shape: list) -> None:
        """A foreign exported file (a classifier, another detector layout) is refused here, for detection and
        validation alike: the first output (`name`, `shape` with ints for static sizes) must be
        [batch, 4 + classes, anchors], and without metadata the class count is read from that shape."""
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
            raise UserError(f"{self.weights}: not a detector exported by this project ({why}; expected "
                            f"[batch, 4 + classes, anchors]); export a checkpoint of this project with export.py")
        if not has_meta:
            meta["nc"] = channels - 4

    def _load_openvino(self) -> None:
        """An OpenVINO IR (folder written by export.py --include openvino, or its .xml) compiled for the CPU."""
        try:
            import openvino as ov
        except ImportError:
            raise UserError(f"{self.weights}: running OpenVINO models needs openvino (pip install openvino)") from None
        xml = self.weights
        if xml.is_dir():
            found = sorted(xml.glob("*.xml"))
            if len(found) != 1:
                raise UserError(f"{xml}: expected one OpenVINO .xml model in the folder, found {len(found)}")
            xml = found[0]
        core = ov.Core()
        try:
            model = core.read_model(str(xml))
        except Exception as e:
            raise UserError(f"{xml}: not a loadable OpenVINO model ({str(e).splitlines()[0][:120]})") from None
        meta = {}
        has_meta = model.has_rt_info(["yolo", "metadata"])
        if has_meta:
            meta = _json(model.get_rt_info(["yolo", "metadata"]).astype(str), {}) or {}
        out = model.output(0)
        out_shape = [d.get_length() if d.is_static else None for d in out.get_partial_shape()] \
            if out.get_partial_shape().rank.is_static else []
        self._check_detector_output(meta, has_meta, next(iter(sorted(out.get_names())), "0"), out_shape)
        if not has_meta:
            LOGGER.warning(f"WARNING: {xml}: no export metadata; class names unknown, stride 32")
        shape = model.input(0).get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() == 4 and shape[2].is_static and shape[3].is_static:
            meta["imgsz"], meta["dynamic_hw"] = [shape[2].get_length(), shape[3].get_length()], False
        else:
            meta["dynamic_hw"] = True
        self.fixed_batch = shape[0].get_length() if shape.rank.is_static and shape[0].is_static else None
        # f32 unless --half: OpenVINO would otherwise pick bf16 on AMX CPUs by itself (results would differ by CPU)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.bf16 else "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(torch.get_num_threads())}
        self.session = core.compile_model(model, "CPU", config).create_infer_request()
        self.openvino = True
        self.precision = config["INFERENCE_PRECISION_HINT"]
        self._set_meta(meta)

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
                            f"letterbox to exactly {fh}x{fw} (--imgsz {fh} {fw}, no rectangular batches) or re-export")
        return pad_bottom_right(im, fh, fw)

    def _fit_graph(self, im: torch.Tensor) -> torch.Tensor:
        """Pad to the smallest of `graph_shapes` the batch fits in (bottom/right, coordinates unchanged), so
        the captured graphs see a few fixed shapes; unchanged when there are none or none fits."""
        from utils.engine.graphs import fixed_shape_for
        shape = fixed_shape_for(im.shape[-2], im.shape[-1], self.graph_shapes) if self.graph_shapes else None
        return pad_bottom_right(im, *shape) if shape else im

    def _run_numpy(self, im: torch.Tensor) -> torch.Tensor:
        """ONNX Runtime / OpenVINO: numpy in, numpy out; a fixed batch size runs in chunks, the last zero-padded."""
        run = self._run_ov if self.openvino else self._run_ort
        x = im.detach().cpu().numpy().astype(self._input_dtype, copy=False)
        b = x.shape[0]
        fb = self.fixed_batch
        if fb is None or fb == b:
            y = run(x)
        else:
            outs = []
            for s in range(0, b, fb):
                chunk = x[s:s + fb]
                n = chunk.shape[0]
                if n < fb:
                    chunk = np.concatenate([chunk, np.zeros((fb - n, *chunk.shape[1:]), chunk.dtype)], 0)
                outs.append(run(chunk)[:n])
            y = np.concatenate(outs, 0)
        return torch.from_numpy(np.ascontiguousarray(y)).to(self.device).float()

    def _run_ort(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], {self.input_name: x})[0]

    def _run_ov(self, x: np.ndarray) -> np.ndarray:
        return self.session.infer({0: x}, share_inputs=True)[0]

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
        """bf16 autocast for torch models on a bf16 CPU (--half), else nothing."""
        if self.bf16 and self.model is not None:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        if self.onnx or self.openvino:
            return self._run_numpy(self._fit(im))
        if self.graph is not None:
            return self.graph(self._fit_graph(im.to(self.device, self.dtype)))
        im = self._fit(im) if self.jit else im
        with self.autocast():
            out = self.model(im.to(self.device, self.dtype))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float() if (self.jit or self.bf16) else out

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
