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
Off CUDA both warn once and run eager. The capture mechanics are injectable (`capture=`, and the torch.cuda
namespace `CudaCapture` calls), so the caching, buffer and capture-argument logic are tested on CPU with
stand-ins.

At scale: every shape's graph shares one memory pool per device (a private pool per shape held several GB
at batch 32); validation with rectangular batches pads each batch to one of a few fixed shapes
(`plan_fixed_shapes`), so a whole val set needs few captures (or compilations); and every path that falls
back to eager says so once.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn as nn

from utils.general import LOGGER, UserError

MODES = ("capture", "compile")
T = TypeVar("T")
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


class CudaCapture:
    """Capture with torch.cuda.CUDAGraph on the example's own device.

    Everything runs under a device guard for `example.device` with one side stream and one memory pool per
    device, shared by every shape this object captures: `--device 1` captures on GPU 1 (torch.cuda.graph's
    default capture stream lives on whichever device was current when it was first made), and N shapes hold
    one pool rather than N. Warm-up runs on that side stream first (cuDNN autotuning and lazy allocations must
    not happen inside the capture), and the capture uses it too (torch asks captures that share a pool to
    share the stream). capture_error_mode="thread_local" (as torch's own cudagraph trees use): the default
    "global" mode fails the capture when another thread, such as a data loader's pin-memory thread, makes a
    CUDA call that is unsafe while capturing. `cuda` is the torch.cuda namespace (a stand-in in tests).
    """

    def __init__(self, cuda: Any = torch.cuda):
        self.cuda = cuda
        self.streams: dict[torch.device, Any] = {}
        self.pools: dict[torch.device, Any] = {}

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = 3) -> Captured:
        cuda, dev = self.cuda, example.device
        with cuda.device(dev):
            if dev not in self.streams:
                self.streams[dev] = cuda.Stream(device=dev)
                self.pools[dev] = cuda.graph_pool_handle()
            side, pool = self.streams[dev], self.pools[dev]
            static_in = example.clone()
            side.wait_stream(cuda.current_stream(dev))
            with cuda.stream(side):
                for _ in range(warmup):
                    fn(static_in)
            graph = cuda.CUDAGraph()
            with cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                static_out = fn(static_in)
            cuda.current_stream(dev).wait_stream(side)
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
                 capture: Callable[..., Captured] | None = None, warmup: int = 3):
        if max_shapes < 1 or capture_after < 1:
            raise ValueError("GraphRunner: max_shapes and capture_after must be at least 1")
        self.fn, self.max_shapes, self.capture_after = fn, max_shapes, capture_after
        self.capture, self.warmup = capture or CudaCapture(), warmup
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
                warn_once(f"WARNING: --cuda-graph: more than {self.max_shapes} input shapes; the least recently "
                          f"used graphs are dropped and shapes seen again are captured again (fixed input sizes "
                          f"avoid this)")
        else:
            self.graphs.move_to_end(k)
        g.static_in.copy_(x)
        g.replay()
        self.replays += 1
        return g.static_out.clone()  # the static output is overwritten by the next replay

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()


def plan_fixed_shapes(shapes: Sequence[Sequence[int]], k: int = 4) -> list[tuple[int, int]]:
    """At most k (h, w) shapes that together cover every shape in `shapes` (each fits inside one of them).

    For rectangular validation batches under --cuda-graph: each batch is padded to the smallest fixed shape it
    fits, so the graphs (or compilations) number k instead of one per distinct batch shape. Wide and tall
    shapes are planned apart; within each, shapes sorted by size are cut into runs holding equal numbers of
    batches, and each run is covered by its largest height and width.
    """
    if k < 1:
        raise ValueError("plan_fixed_shapes: k must be at least 1")
    hw = [(int(h), int(w)) for h, w in shapes]
    groups = [sorted(s for s in hw if s[0] <= s[1]), sorted((s for s in hw if s[0] > s[1]), key=lambda s: (s[1], s[0]))]
    groups = [g for g in groups if g]
    if not groups:
        return []
    slots = [max(1, round(k * len(g) / len(hw))) for g in groups]
    while sum(slots) > k:  # k = 1 with both orientations: one shape covering all
        if len(groups) > 1 and slots == [1, 1]:
            g = groups[0] + groups[1]
            return [(max(h for h, _ in g), max(w for _, w in g))]
        slots[slots.index(max(slots))] -= 1
    out: list[tuple[int, int]] = []
    for g, m in zip(groups, slots):
        m = min(m, len(g))
        for i in range(m):
            run = g[i * len(g) // m:(i + 1) * len(g) // m]
            out.append((max(h for h, _ in run), max(w for _, w in run)))
    return sorted(set(out))


def fixed_shape_for(h: int, w: int, shapes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The smallest (by area) of `shapes` that an h x w input fits in, or None."""
    fits = [s for s in shapes if s[0] >= h and s[1] >= w]
    return min(fits, key=lambda s: (s[0] * s[1], s)) if fits else None


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
    return build_graph_forward(main_output(model), mode, max_shapes)


def build_graph_forward(fn: Callable[[torch.Tensor], torch.Tensor], mode: str, max_shapes: int = 8,
                        capture: Callable[..., Captured] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """GraphRunner ('capture') or a reduce-overhead CompiledForward ('compile') around fn, on any device (the
    CUDA check is graph_forward's; tests build these on CPU with stand-ins)."""
    if mode == "compile":
        return CompiledForward(fn, mode="reduce-overhead", max_shapes=max_shapes)
    return GraphRunner(fn, max_shapes=max_shapes, capture=capture)


class CompiledForward:
    """torch.compile'd callable that falls back to the eager one (one warning) if compiling or running fails.

    torch.compile is lazy: unsupported platforms and graph breaks that error show up on the first call,
    so the fallback has to wrap the call, not the compile. Errors raised by the eager function itself
    (out of memory, bad input) are re-raised unchanged. The backward of a compiled training forward is
    compiled lazily too, at the first backward(): `with_fallback` wraps a whole training step for that.

    mode="reduce-overhead" replays CUDA graphs whose outputs live in static buffers that the next call
    overwrites; its outputs are cloned, so results stay valid when several compiled models run in turn (an
    ensemble concatenating their outputs, test-time augmentation). dynamic=False compiles once per input
    shape; after `max_shapes` shapes (at most torch's own recompile limit, past which torch runs eager
    silently) further new shapes run eager, with one warning.

    Under DDP an eager retry cannot rejoin the other ranks (they are inside the step's collectives): the
    trainer `probe`s one step on every rank before the first real one, agrees on the outcome, and then sets
    `fallback = False`, after which a failure of the compiled code is raised instead of retried.
    """

    def __init__(self, fn: Callable, mode: str | None = None, backend: str | Callable = "inductor",
                 dynamic: bool | None = False, max_shapes: int | None = None):
        self.eager = fn
        self.clone_outputs = mode == "reduce-overhead"
        limit = int(getattr(torch._dynamo.config, "recompile_limit", 8))
        self.max_shapes = min(max_shapes or limit, limit) if dynamic is False else None
        self.shapes: set[tuple] = set()
        self.fallback = True
        self.compiled: Callable | None
        try:
            self.compiled = torch.compile(fn, mode=mode, backend=backend, dynamic=dynamic)
        except Exception as e:  # noqa: BLE001 -- any failure means "run eager"
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if not self.fallback:
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"torch.compile failed during distributed training ({type(e).__name__}: {msg}); a rank "
                            f"cannot redo a step eagerly while the others are in it: train without --compile") from e
        self.compiled = None
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        warn_once(f"WARNING: torch.compile failed ({type(e).__name__}: {msg}); running eager")

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def _new_shape_over_limit(self, args: tuple) -> bool:
        """True when args[0] has a shape beyond the first max_shapes ones (then that call runs eager)."""
        if self.max_shapes is None or not args or not isinstance(args[0], torch.Tensor):
            return False
        key = (tuple(args[0].shape), args[0].dtype)
        if key in self.shapes:
            return False
        if len(self.shapes) < self.max_shapes:
            self.shapes.add(key)
            return False
        warn_once(f"WARNING: torch.compile: more than {self.max_shapes} input shapes; new shapes run eager "
                  f"(fixed input sizes avoid this)")
        return True

    def __call__(self, *args, **kwargs):
        if self.compiled is not None and not self._new_shape_over_limit(args):
            try:
                out = self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            else:
                return _clone_tensors(out) if self.clone_outputs else out
        return self.eager(*args, **kwargs)

    def probe(self, step: Callable[[Callable], Any]) -> bool:
        """Run step(compiled forward) once with no eager retry: True if it ran; on failure warn once and run eager
        from now on. What the step computed is the caller's to discard."""
        if self.compiled is None:
            return False
        compiled = self.compiled
        try:
            step(compiled)
        except (torch.OutOfMemoryError, UserError):
            raise
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            return False
        return True

    def with_fallback(self, step: Callable[[Callable], T]) -> T:
        """step(forward) for one training step (forward, loss, backward) through the compiled forward. If the
        step fails after the forward returned (a backward that does not compile), warn once and run the step
        again with the eager forward: no gradient of the failed step reached the parameters, because the
        compiled backward is one autograd node that raised before producing any."""
        if self.compiled is None:
            return step(self.eager)
        try:
            return step(self)
        except (torch.OutOfMemoryError, UserError):
            raise
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        return step(self.eager)


def _clone_tensors(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_tensors(v) for v in out)
    return out
