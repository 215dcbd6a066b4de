"""Launch-overhead-free GPU inference: replay a captured forward pass for input shapes seen before.

At batch 1 a c-scale model issues hundreds of small kernels; on a fast GPU the CPU cannot launch them as
quickly as they run, so latency is launch-bound. A CUDA graph records the kernels of one forward once and
replays them with a single launch. A graph is bound to its input/output memory and shapes, so
`GraphRunner` keeps, per (shape, dtype, device), a static input buffer, the captured graph and its static
output: each call copies the input into the buffer, replays, and returns a copy of the output. A shape is
captured the `capture_after`-th time it is seen (earlier calls run eager: validation's last odd-sized batch
is never worth a capture); at most `max_shapes` graphs are kept (least recently used dropped).

Two modes (`--cuda-graph [capture|compile]`): 'capture' records with torch.cuda.CUDAGraph directly;
'compile' hands the module to torch.compile(mode="reduce-overhead"), which captures CUDA graphs itself.
Off CUDA both warn once and run eager. The capture mechanics are injectable (`capture=`), so the caching
and buffer logic are tested on CPU with an eager stand-in.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn as nn

from utils.general import LOGGER, UserError

MODES = ("capture", "compile")
_warned: set[str] = set()


def warn_once(msg: str) -> None:
    """Log a warning the first time this exact message comes up in the process."""
    if msg not in _warned:
        _warned.add(msg)
        LOGGER.warning(msg)


class Captured:
    """One captured forward: copy into `static_in`, `replay()`, read `static_out`."""

    def __init__(self, static_in: torch.Tensor, static_out: torch.Tensor, replay: Callable[[], None]):
        self.static_in, self.static_out, self.replay = static_in, static_out, replay


def cuda_capture(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = 3,
                 pool: Any = None) -> Captured:
    """Capture fn on a static copy of `example` with torch.cuda.CUDAGraph.

    Warm-up runs on a side stream first (cuDNN autotuning and lazy allocations must not happen inside the
    capture); the graph gets its own memory pool unless one is given.
    """
    static_in = example.clone()
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_in)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_out = fn(static_in)
    return Captured(static_in, static_out, graph.replay)


def eager_capture(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = 0,
                  pool: Any = None) -> Captured:
    """Stand-in with the same buffer contract as `cuda_capture`: replay() re-runs fn on the static input and
    writes into the one static output tensor (used on CPU in tests; no speed gain)."""
    static_in = example.clone()
    static_out = fn(static_in).clone()

    def replay() -> None:
        static_out.copy_(fn(static_in))

    return Captured(static_in, static_out, replay)


class GraphRunner:
    """Call `fn(x)` through captured graphs, one per input (shape, dtype, device); results equal eager.

    fn must be a pure function of its input tensor returning one tensor (model in eval mode, no grad).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_shapes: int = 8, capture_after: int = 2,
                 capture: Callable[..., Captured] = cuda_capture, warmup: int = 3):
        if max_shapes < 1 or capture_after < 1:
            raise ValueError("GraphRunner: max_shapes and capture_after must be at least 1")
        self.fn, self.max_shapes, self.capture_after = fn, max_shapes, capture_after
        self.capture, self.warmup = capture, warmup
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.captures = self.replays = self.eager_calls = 0

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.dtype, x.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.key(x)
        g = self.graphs.get(k)
        if g is None:
            n = self.seen.get(k, 0) + 1
            self.seen[k] = n
            if n < self.capture_after:
                self.eager_calls += 1
                return self.fn(x)
            g = self.capture(self.fn, x, warmup=self.warmup)
            self.captures += 1
            self.graphs[k] = g
            if len(self.graphs) > self.max_shapes:
                old, _ = self.graphs.popitem(last=False)  # least recently used
                self.seen.pop(old, None)  # an evicted shape starts counting again
        else:
            self.graphs.move_to_end(k)
        g.static_in.copy_(x)
        g.replay()
        self.replays += 1
        return g.static_out.clone()  # the static output is overwritten by the next replay

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()


def main_output(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(x) -> the prediction tensor of a detection model (first element of tuple/list outputs)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out
    return fn


def check_mode(mode: str | bool | None) -> str | None:
    """Normalise a --cuda-graph value: None/False/'' -> None, True -> 'capture'; unknown -> UserError."""
    if mode in (None, False, "", "off", "none"):
        return None
    if mode is True:
        return "capture"
    if mode not in MODES:
        raise UserError(f"--cuda-graph {mode}: choose 'capture' (torch.cuda.CUDAGraph) or 'compile' "
                        f"(torch.compile reduce-overhead)")
    return str(mode)


def graph_forward(model: nn.Module, mode: str | bool | None, device: torch.device,
                  max_shapes: int = 8) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The captured forward of `model` for --cuda-graph `mode`, or None to run eager (mode off, or not CUDA)."""
    mode = check_mode(mode)
    if mode is None:
        return None
    if device.type != "cuda":
        warn_once(f"WARNING: --cuda-graph needs a CUDA device (running on {device.type}); running eager")
        return None
    fn = main_output(model)
    if mode == "compile":
        return CompiledForward(fn, mode="reduce-overhead")
    return GraphRunner(fn, max_shapes=max_shapes)


class CompiledForward:
    """torch.compile'd callable that falls back to the eager one (one warning) if compiling or running fails.

    torch.compile is lazy: unsupported platforms and graph breaks that error show up on the first call,
    so the fallback has to wrap the call, not the compile. Errors raised by the eager function itself
    (out of memory, bad input) are re-raised unchanged.
    """

    def __init__(self, fn: Callable, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = False):
        self.eager = fn
        self.compiled: Callable | None
        try:
            self.compiled = torch.compile(fn, mode=mode, backend=backend, dynamic=dynamic)
        except Exception as e:  # noqa: BLE001 -- any failure means "run eager"
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.compiled = None
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        warn_once(f"WARNING: torch.compile failed ({type(e).__name__}: {msg}); running eager")

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        return self.eager(*args, **kwargs)
