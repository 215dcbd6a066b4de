"""Which convolutions an OpenVINO INT8 export leaves in the CPU's float precision: those this CPU runs faster in
bf16 than in int8, measured layer by layer when the file is made.

Why: on a CPU with fast bf16 but no AMX (AMD Zen 4/5: AVX512-BF16 and VNNI) int8 wins on the wide convolutions
and loses on the narrow ones. gelan-t at 288x640, one thread, Zen 5: the head's 128-channel convolutions run
1.6-1.8x faster in int8, the 16-32-channel 3x3 convolutions inside the RepNCSP bottlenecks 1.3-2x slower (small
matrices leave VNNI idle while the int8 kernel pays for zero points and reorders). Quantizing every convolution
made the file 1.13x our bf16 file (2 streams, raw frames/s), keeping the slower ones in bf16 1.16x
(benchmarks/results/formats.md). On a CPU without native bf16 the float side is f32 and int8 wins nearly
everywhere, so the same measurement keeps (almost) nothing in float. The measurement runs a quickly calibrated
all-int8 copy and the float model once each with OpenVINO's per-layer counters (one thread, what each of a
video's streams gets); calibration itself does not change the kernels, so two images suffice for timing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TIMING_ROUNDS, CALLS_PER_ROUND = 5, 4
CONVOLUTIONS = ("Convolution", "GroupConvolution")  # node types of an openvino.Model (the CPU plugin calls both
# "Convolution" in its per-layer counters)


def cpu_float_precision(core=None) -> str:
    """'bf16' where the CPU runs bfloat16 natively (AVX512-BF16 or AMX), else 'f32'."""
    import openvino as ov
    core = core or ov.Core()
    return "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


def convolution_times(model, x: np.ndarray, precision: str) -> dict[str, float]:
    """Microseconds per Convolution node of `model` (an openvino.Model) on input `x`, one thread, the fastest of
    TIMING_ROUNDS rounds (the least disturbed by other work on the machine), keyed by the node's name."""
    import openvino as ov
    from utils.deploy.signal_stack import same_signal_stack
    core = ov.Core()
    if not model.input(0).get_partial_shape().is_static:  # a dynamic export: timed at the calibration shape
        model = model.clone()
        model.reshape({model.input(0): list(x.shape)})
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1,
              "PERF_COUNT": True}
    with same_signal_stack():
        compiled = core.compile_model(model, "CPU", config)
    convs = {op.get_friendly_name() for op in compiled.get_runtime_model().get_ordered_ops()
             if "layerType" in op.get_rt_info() and op.get_rt_info()["layerType"].astype(str) == "Convolution"}
    request, best = compiled.create_infer_request(), {}
    for _ in range(TIMING_ROUNDS):
        for _ in range(CALLS_PER_ROUND):
            request.infer({0: x})
        for p in request.profiling_info:
            if p.node_name in convs:
                us = p.real_time.total_seconds() * 1e6
                best[p.node_name] = min(best.get(p.node_name, us), us)
    return best


def slower_in_int8(float_us: dict[str, float], int8_us: dict[str, float]) -> list[str]:
    """The convolutions measured in both runs whose float time is below their int8 time."""
    return sorted(n for n, t in int8_us.items() if n in float_us and float_us[n] < t)


def with_their_modules(names: Sequence[str], conv_names: Sequence[str], keep: Sequence[str]) -> list[str]:
    """`keep` plus every other node whose innermost enclosing module (torch.onnx scope: '/model.4/cv2/m/m.0/')
    that holds a convolution has all its convolutions in `keep`: a bottleneck's residual Add and activations stay
    float with its convolutions, instead of being quantized between two float layers (measured slower: a
    quantize and a dequantize around each), while a layer's Concat whose other branches are int8 is quantized."""
    keep_set = set(keep)

    def scopes(n: str):
        parts = n.split("/")[:-1]
        return ["/".join(parts[:i]) + "/" for i in range(len(parts), 1, -1)]

    out = set(keep_set)
    for n in names:
        for s in scopes(n):
            inside = [c for c in conv_names if c.startswith(s)]
            if inside:
                if all(c in keep_set for c in inside):
                    out.add(n)
                break
    return [n for n in names if n in out]


def float_layers(model, images: Sequence[np.ndarray], quantize_all: Callable) -> tuple[list[str], str, str]:
    """(nodes to leave in float, the float precision they run in, one line for the log), measured on this CPU:
    `quantize_all(model, images)` makes the all-int8 copy the times are compared against."""
    precision = cpu_float_precision()
    x = np.asarray(images[0], np.float32)
    probe = quantize_all(model.clone(), list(images[:2]))
    int8_us = convolution_times(probe, x, precision)
    float_us = convolution_times(model, x, precision)
    slow = slower_in_int8(float_us, int8_us)
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in CONVOLUTIONS]
    kept = with_their_modules(names, convs, slow)
    both = [n for n in int8_us if n in float_us]
    best = sum(min(float_us[n], int8_us[n]) for n in both)
    line = (f"{len(slow)} of {len(both)} convolutions stay in {precision}, where this CPU runs them faster than int8 "
            f"(per-layer profile, one thread: convolutions {sum(float_us[n] for n in both) / 1e3:.1f} ms {precision}, "
            f"{sum(int8_us[n] for n in both) / 1e3:.1f} ms all int8, {best / 1e3:.1f} ms each in its faster kind)")
    return kept, precision, line
