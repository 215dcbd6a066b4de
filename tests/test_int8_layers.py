"""OpenVINO INT8 with the convolutions this CPU runs faster in float left in float (utils/deploy/int8_layers.py):
the choice from per-layer times, a module's residual Add and activations going with its convolutions, the
per-layer timing itself on a real model, and an export whose timings are given: those convolutions unquantized
in the file, its metadata read by the runner, detections as the .pt's."""
from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest

from fitted import IMGSZ, INT8_TOL, assert_matches, detect, fitted_checkpoint
from utils.deploy import early_compile, export, int8_layers

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (find_spec("openvino") and find_spec("nncf")), reason="openvino/nncf not installed")]

NAMES = ["/model.4/cv1/conv/Conv/WithoutBiases", "/model.4/cv1/act/Mul",
         "/model.4/m/m.0/cv1/conv/Conv/WithoutBiases", "/model.4/m/m.0/cv1/act/Sigmoid",
         "/model.4/m/m.0/cv2/conv/Conv/WithoutBiases", "/model.4/m/m.0/Add",
         "/model.4/m/m.1/cv1/conv/Conv/WithoutBiases", "/model.4/m/m.1/cv2/conv/Conv/WithoutBiases",
         "/model.4/m/m.1/Add", "/model.4/Concat", "/model.4/Slice"]
CONVS = [n for n in NAMES if n.endswith("/WithoutBiases")]


def test_slower_in_int8_compares_layer_by_layer():
    f = {"a": 10.0, "b": 30.0, "c": 5.0}
    q = {"a": 12.0, "b": 20.0, "c": 5.0, "d": 1.0}  # c: a tie stays int8; d: not timed in float
    assert int8_layers.slower_in_int8(f, q) == ["a"]


def test_a_module_goes_float_with_all_its_convolutions():
    keep = ["/model.4/m/m.0/cv1/conv/Conv/WithoutBiases", "/model.4/m/m.0/cv2/conv/Conv/WithoutBiases",
            "/model.4/m/m.1/cv1/conv/Conv/WithoutBiases"]
    got = int8_layers.with_their_modules(NAMES, CONVS, keep)
    # m.0: both convolutions float, so its activation and residual Add too; m.1: one convolution stays int8, so
    # its Add is quantized; the layer's Concat and Slice belong to a module with int8 convolutions
    assert set(got) == set(keep) | {"/model.4/m/m.0/cv1/act/Sigmoid", "/model.4/m/m.0/Add"}
    assert [n for n in NAMES if n in got] == got  # graph order
    assert set(int8_layers.with_their_modules(NAMES, CONVS, CONVS)) == set(NAMES)  # every convolution: all of it
    assert int8_layers.with_their_modules(NAMES, CONVS, []) == []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return fitted_checkpoint(tmp_path_factory.mktemp("int8layers"))


def _ir(path):
    import openvino as ov
    return ov.Core().read_model(str(next(path.glob("*.xml"))))


def _convs(model) -> set[str]:
    return {op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in int8_layers.CONVOLUTIONS}


def _quantized_convs(model) -> set[str]:
    """Convolutions with int8 weights (NNCF stores them as an int8 constant, converted and scaled: Multiply)."""
    return {op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in int8_layers.CONVOLUTIONS
            and op.input_value(1).get_node().get_type_name() == "Multiply"}


def test_convolution_times_cover_the_model(fitted, tmp_path):
    """Per-layer times on a real export: one time per Convolution of the model, under its own name
    (what the choice is made over), for the float model and its all-int8 copy."""
    w, data, _ = fitted
    out = export.run(w, include=("openvino",), imgsz=IMGSZ, int8=True, int8_all=True, data=data)
    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    for key in ("openvino", "openvino-int8"):
        m = _ir(out[key])
        convs = _convs(m)
        t = int8_layers.convolution_times(m, x, int8_layers.cpu_float_precision())
        assert set(t) == convs and min(t.values()) >= 0 and sum(t.values()) > 0  # counters are whole us: a
        # tiny layer at 64 px can read 0
    q = _ir(out["openvino-int8"])  # --int8-all: every convolution outside the box decoding quantized
    head = {n for n in convs if n.startswith("/model.22/") and "/cv" not in n}
    assert _quantized_convs(q) == convs - head and head
    assert "int8_float" not in json.loads(q.get_rt_info(["yolo", "metadata"]).astype(str))


def test_export_leaves_the_slower_convolutions_float(fitted, monkeypatch, tmp_path):
    """Timings given (every convolution of layer 2 and of the bottlenecks slower in int8): exactly those are
    unquantized in the file, the metadata names their precision, the runner runs it (bf16 where the CPU has
    it), detections as the .pt's within the INT8 tolerance."""
    w, data, images = fitted
    calls = []

    def times(model, x, precision):
        calls.append(precision)
        int8 = any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
        convs = _convs(model)
        slow = lambda n: n.startswith("/model.2/") or "/m/m." in n  # noqa: E731
        return {n: (20.0 if int8 and slow(n) else 10.0) if int8 else 15.0 for n in convs}

    monkeypatch.setattr(int8_layers, "convolution_times", times)
    out = export.run(w, include=("openvino",), imgsz=IMGSZ, int8=True, data=data)
    precision = int8_layers.cpu_float_precision()
    assert calls == [precision, precision]
    m = _ir(out["openvino-int8"])
    convs = _convs(m)
    slow = {n for n in convs if n.startswith("/model.2/") or "/m/m." in n}
    head = {n for n in convs if n.startswith("/model.22/") and "/cv" not in n}
    assert slow and _quantized_convs(m) == convs - slow - head
    adds = [op for op in m.get_ordered_ops() if op.get_type_name() == "Add" and "/m/m." in op.get_friendly_name()
            and op.get_friendly_name().endswith("/Add")]  # residual Adds of float bottlenecks: no FakeQuantize
    assert all(i.get_node().get_type_name() != "FakeQuantize" for a in adds for i in a.input_values())
    assert json.loads(m.get_rt_info(["yolo", "metadata"]).astype(str))["int8_float"] == precision
    from utils.engine.backend import Backend
    assert Backend(out["openvino-int8"]).precision == precision
    assert_matches(detect(w, images), detect(out["openvino-int8"], images), **INT8_TOL)


def test_early_compile_precision_follows_the_metadata():
    import openvino as ov
    core = ov.Core()
    bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert early_compile.precision(core, {}, False) == "f32"
    assert early_compile.precision(core, {"int8_float": "f32"}, False) == "f32"
    assert early_compile.precision(core, {"int8_float": "bf16"}, False) == ("bf16" if bf16 else "f32")
    assert early_compile.precision(core, {}, True) == ("bf16" if bf16 else "f32")
