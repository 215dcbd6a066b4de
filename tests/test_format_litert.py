"""LiteRT (.tflite): the fitted tiny detector converted by litert-torch (fp32, fp16 weights, full-integer INT8),
run by ai-edge-litert's interpreter through the one backend loader (Predictor, val_dual.py, detect_dual.py
--track), detections compared with the .pt's; the metadata read back from the file."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from fitted import FP32, IMGSZ, INT8_TOL, assert_matches, assert_tracks_match, detect, fitted_checkpoint  # noqa: E402
from helpers import SHAPE_NAMES  # noqa: E402
from utils.deploy import export, formats  # noqa: E402
from utils.deploy.formats import base, litert  # noqa: E402
from utils.engine.backend import Backend  # noqa: E402
from utils.general import UserError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# fp16 weights, fp32 arithmetic (XNNPACK on x86): 11 significant bits per weight. Measured on the fitted model:
# min matched IoU 0.9999, max score change 0.0003; the check allows 100x that box error and 30x the score
# change, for ARM runtimes that compute in fp16 too.
FP16_TOL = dict(min_iou=0.99, score_tol=0.01, exact_count=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The fitted gelan-t exported once at 64 px: fp32 and INT8 (calibrated on its training images) from one
    conversion, and TorchScript (a fixed-size reference for validation). The --half export reuses that
    conversion's flatbuffer: fp16 weights are a post-conversion cast of the same graph, and a second
    litert-torch run would add ~35 s of CPU."""
    d = tmp_path_factory.mktemp("litert")
    w, data, images = fitted_checkpoint(d)
    out = export.run(w, include=("torchscript", "litert"), imgsz=IMGSZ, int8=True, data=data)
    fp32 = out["litert"].read_bytes()
    (d / "half").mkdir()
    w16 = d / "half" / "tiny.pt"
    w16.write_bytes(w.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(litert, "convert", lambda job: fp32)
        out["litert-fp16"] = export.run(w16, include=("litert",), imgsz=IMGSZ, half=True)["litert"]
    return {"pt": w, **out}, data, images


def _tensor_types(path: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """A .tflite's output tensor types per op name, and the bytes of its constants per type."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    m = fu.read_model(str(path))
    g = m.subgraphs[0]
    types: dict[str, list[str]] = {}
    for op in g.operators:
        for t in op.outputs:
            types.setdefault(fu.opcode_to_name(m, op.opcodeIndex), []).append(fu.type_to_name(g.tensors[t].type))
    const: dict[str, int] = {}
    for t in g.tensors:
        data = m.buffers[t.buffer].data
        if data is not None and len(data):
            const[fu.type_to_name(t.type)] = const.get(fu.type_to_name(t.type), 0) + len(data)
    return types, const


def test_fp32_detects_as_the_pt(exported):
    files, _, images = exported
    ref, got = detect(files["pt"], images), detect(files["litert"], images)
    assert sum(len(r) for r in ref) >= 3
    assert_matches(ref, got, **FP32)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.boxes, r.boxes, atol=0.05)


def test_file_layout_and_metadata(exported):
    """NHWC float input (the TFLite convention), [B, 4 + nc, A] output, the metadata in the file itself."""
    from ai_edge_litert.interpreter import Interpreter
    files, _, _ = exported
    f = files["litert"]
    assert f == files["pt"].with_suffix(".tflite") and formats.for_path(f).name == "litert"
    it = Interpreter(model_path=str(f))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert list(inp["shape"]) == [1, IMGSZ, IMGSZ, 3] and inp["dtype"] == np.float32
    assert list(out["shape"]) == [1, 4 + len(SHAPE_NAMES), (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2]
    meta = litert.read_metadata(f.read_bytes())
    assert meta["names"] == SHAPE_NAMES and meta["stride"] == 32 and meta["imgsz"] == [IMGSZ, IMGSZ]
    assert meta["dynamic"] is False and meta["half"] is False
    b = Backend(f)
    assert (b.format, b.names, b.nc, b.stride, b.fixed_imgsz, b.fixed_batch) == \
        ("litert", SHAPE_NAMES, len(SHAPE_NAMES), 32, (IMGSZ, IMGSZ), 1)
    x = torch.rand(3, 3, IMGSZ, IMGSZ)  # three images through a batch-1 file: run in chunks, same as one by one
    torch.testing.assert_close(b(x), torch.cat([b(x[i:i + 1]) for i in range(3)]))


def test_file_without_metadata_loads_with_classes_from_its_output(exported, tmp_path, caplog):
    from ai_edge_litert.tools import flatbuffer_utils as fu
    files, _, _ = exported
    m = fu.read_model(str(files["litert"]))
    m.metadata = [md for md in m.metadata if md.name != litert.METADATA_KEY]
    bare = tmp_path / "bare.tflite"
    fu.write_model(m, str(bare))
    assert litert.read_metadata(bare.read_bytes()) is None
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        b = Backend(bare)
    assert b.nc == len(SHAPE_NAMES) and b.names == [str(i) for i in range(len(SHAPE_NAMES))]
    assert "no export metadata" in caplog.text


def test_not_a_tflite_is_one_line(tmp_path):
    bad = tmp_path / "broken.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(UserError, match=r"broken.tflite: not a loadable LiteRT model"):
        Backend(bad)


def test_half_writes_fp16_weights_on_cpu(exported):
    """--half on a CPU writes fp16 weight buffers (dequantized at load, fp32 arithmetic): about half the file."""
    files, _, images = exported
    f16 = files["litert-fp16"]
    assert litert.read_metadata(f16.read_bytes())["half"] is True
    types, const = _tensor_types(f16)
    assert set(types["CONV_2D"]) == {"FLOAT32"} and types["DEQUANTIZE"]  # fp32 arithmetic on dequantized weights
    assert const["FLOAT16"] > 50 * const.get("FLOAT32", 0)  # the weights are fp16 (biases may stay fp32)
    assert f16.stat().st_size < 0.6 * files["litert"].stat().st_size
    assert_matches(detect(files["pt"], images), detect(f16, images), **FP16_TOL)


def test_int8_is_full_integer_with_a_float_decoding(exported):
    """INT8 file: int8 input (scale 1/255: 8-bit images are exact), int8 convolutions, the head's decoding
    (DFL softmax, anchor arithmetic, score sigmoid) and the output in float; detections within INT8_TOL."""
    from ai_edge_litert.interpreter import Interpreter
    files, _, images = exported
    f = files["litert-int8"]
    assert f.name == "tiny-int8.tflite"
    it = Interpreter(model_path=str(f))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and abs(inp["quantization"][0] - 1 / 255) < 1e-6 and out["dtype"] == np.float32
    types, const = _tensor_types(f)
    assert const["INT8"] > 20 * const.get("FLOAT32", 0)  # int8 weights
    assert types["CONV_2D"].count("INT8") >= len(types["CONV_2D"]) - 1  # all but the DFL's expectation
    assert types["SOFTMAX"] == ["FLOAT32"]
    b = Backend(f)
    assert b.names == SHAPE_NAMES and b.fixed_imgsz == (IMGSZ, IMGSZ) and b.precision == "int8"
    assert_matches(detect(files["pt"], images), detect(f, images), **INT8_TOL)


def test_int8_of_everything_loses_the_detections(exported, tmp_path):
    """What keeping the decoding float buys: quantizing every op (the output too) puts boxes in pixels and 0..1
    scores on one int8 scale, and the fitted model's detections vanish."""
    from utils.deploy.quantize import calibration_images
    files, data, images = exported
    buf = litert.with_metadata(litert.full_int8(files["litert"].read_bytes(),
                                                calibration_images(data, (IMGSZ, IMGSZ), 32), keep_float=[]),
                               litert.read_metadata(files["litert"].read_bytes()))
    everything = tmp_path / "everything-int8.tflite"
    everything.write_bytes(buf)
    assert sum(len(r) for r in detect(everything, images)) == 0
    assert sum(len(r) for r in detect(files["litert-int8"], images)) >= 3


def test_int8_input_range_is_the_pixel_domain(exported):
    """Calibration images without black or white pixels (squeezed here into 0.2..0.7) still give the input
    scale 1/255 and zero point -128: every 8-bit pixel is exact and none is clipped."""
    from ai_edge_litert.interpreter import Interpreter
    from utils.deploy.quantize import calibration_images
    files, data, _ = exported
    dim = [0.2 + 0.5 * x for x in calibration_images(data, (IMGSZ, IMGSZ), 32)]
    q = litert.full_int8(files["litert"].read_bytes(), dim, keep_float=[])
    scale, zero = Interpreter(model_content=q).get_input_details()[0]["quantization"]
    assert abs(scale - 1 / 255) < 1e-6 and zero == -128, (scale, zero)


def test_val_and_track_run_the_tflite(exported, tmp_path):
    """val_dual.py gives the mAP of the same model at the same fixed size (TorchScript; the .pt validates
    rectangular batches, a slightly different input); detect_dual.py --track gives the .pt's tracks."""
    from utils.engine.validator import run_validation
    files, data, _ = exported
    kw = dict(data=data, imgsz=IMGSZ, workers=0, plots=False, device="cpu")
    maps = [run_validation(weights=str(files[k]), project=str(tmp_path / k), **kw).map
            for k in ("pt", "torchscript", "litert")]
    assert maps[0] > 0.3 and abs(maps[1] - maps[2]) < 1e-3 and abs(maps[0] - maps[2]) < 0.03, maps
    assert_tracks_match(files["pt"], files["litert"], data, tmp_path)


def test_missing_litert_torch_is_one_line_before_any_work(tmp_path, monkeypatch):
    from helpers import seeded_tiny_checkpoint
    w = seeded_tiny_checkpoint(tmp_path / "w.pt", ["a", "b"])
    real = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda n: None if n == "litert_torch" else real(n))
    with pytest.raises(UserError, match=r"needs litert-torch \(for litert\); install with: pip install litert-torch$"):
        export.run(w, include=("litert",), imgsz=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
