"""INT8 export that fails safe, and the export's accuracy check: calibration on training's verified image list,
read one image at a time; ONNX Runtime calibration over every image; the check as one short table that fails the
export (one line, exit 1, file removed) when a file lost more than its limit; the class-count check before any
work; quiet quantizers; fixed-size inputs compiled once on dynamic exports (Runner.set_input_shape)."""
from __future__ import annotations

import logging
import shutil
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import export as export_cli
from fitted import IMGSZ, fitted_checkpoint
from helpers import SHAPE_NAMES
from utils.deploy import accuracy, export, quantize
from utils.general import UserError, cli

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    return fitted_checkpoint(d)


def _data_yaml(path: Path, root: Path, names=SHAPE_NAMES) -> str:
    path.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train", "names": names}))
    return str(path)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------- calibration

def test_calibration_skips_what_training_skips(tmp_path, caplog):
    """A corrupt and a too-small training image are skipped with a warning naming them (as training skips
    them), not fed to the quantizer (it raised 'cannot read image')."""
    from utils.data import generate_shapes
    generate_shapes(tmp_path / "ds", n_train=4, n_val=1, seed=2, sizes=[(96, 128)])
    train = tmp_path / "ds" / "images" / "train"
    (train / "garbage.jpg").write_bytes(b"not a jpeg at all")
    cv2.imwrite(str(train / "tiny.png"), np.full((4, 4, 3), 90, np.uint8))
    data = _data_yaml(tmp_path / "d.yaml", tmp_path / "ds")
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        images = quantize.calibration_images(data, (64, 64), 32, n=10)
    assert len(images) == 4 and not any(Path(f).name in ("garbage.jpg", "tiny.png") for f in images.files)
    assert "garbage.jpg" in caplog.text and "tiny.png" in caplog.text
    assert all(x.shape == (1, 3, 64, 64) and x.dtype == np.float32 for x in images)


def test_calibration_reads_one_image_at_a_time(tmp_path, caplog):
    """Memory does not grow with --calib-images: 40 images at 128 px would hold 7.9 MB as float32 arrays;
    iterating them peaks at about one image. The dynamic export's line says how images are sized."""
    from utils.data import generate_shapes
    generate_shapes(tmp_path / "ds", n_train=40, n_val=1, seed=3, sizes=[(96, 160)])
    data = _data_yaml(tmp_path / "d.yaml", tmp_path / "ds")
    one = 3 * 128 * 128 * 4
    tracemalloc.start()
    try:
        images = quantize.calibration_images(data, (128, 128), 32, n=40)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        shapes = {x.shape for x in images}
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(images) == 40 and shapes == {(1, 3, 128, 128)}
    assert peak < 4 * one, f"peak {peak / 1e6:.1f} MB while iterating 40 images of {one / 1e6:.2f} MB"
    with caplog.at_level(logging.INFO, logger="yolov9mqa"):
        dyn = quantize.calibration_images(data, (128, 128), 32, n=2, auto=True)
    assert {x.shape for x in dyn} == {(1, 3, 128, 96)}  # 160 high, 96 wide -> 128x77 -> padded to 128x96
    line = [r.getMessage() for r in caplog.records if "INT8 calibration" in r.getMessage()][-1]
    assert "minimal padding" in line and "letterboxed to 128x128" not in line


def _tiny_onnx(path: Path, pool: bool = False) -> Path:
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.AvgPool2d(2, 1, 0)] if pool else []) + [nn.Conv2d(4, 5, 1)]
    torch.onnx.export(nn.Sequential(*layers).eval(), (torch.rand(1, 3, 16, 16),), str(path), dynamo=False,
                      input_names=["images"], output_names=["output0"], opset_version=17)
    return path


def _input_scale(path: Path) -> float:
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images")
    return float(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == q.input[1])))


def test_onnx_calibration_uses_every_image(tmp_path, caplog, capfd):
    """The activation ranges cover all calibration images: ONNX Runtime dropped the ranges of every full chunk
    of 16 (here only the last image counted: input range 0..0.25 instead of 0..1), and 16 images failed with
    'No data is collected'. No pre-processing advice from ONNX Runtime on the console."""
    src = _tiny_onnx(tmp_path / "m.onnx")
    bright = [np.ones((1, 3, 16, 16), np.float32)] + [np.full((1, 3, 16, 16), 0.25, np.float32)] * 16
    with caplog.at_level(logging.INFO):
        quantize.quantize_onnx(src, tmp_path / "q17.onnx", bright)
        quantize.quantize_onnx(src, tmp_path / "q16.onnx", bright[:16])
    assert _input_scale(tmp_path / "q17.onnx") == pytest.approx(1 / 255, rel=1e-3)
    assert _input_scale(tmp_path / "q16.onnx") == pytest.approx(1 / 255, rel=1e-3)
    out = caplog.text + "".join(capfd.readouterr())
    assert "pre-processing" not in out


def test_quiet_quantizers_hide_only_third_party_noise(caplog, capfd):
    ext = logging.getLogger("torch.utils.cpp_extension")  # torch's loggers print through their own handler
    with caplog.at_level(logging.WARNING):
        with quantize.quiet_quantizers():
            ext.warning("No CUDA runtime is found, using CUDA_HOME='x'")
            logging.warning("Please consider to run pre-processing before quantization. Refer to example: ...")
            logging.getLogger("yolov9mqa").warning("WARNING: a real problem")
        ext.warning("after: shown again")
    shown = caplog.text + "".join(capfd.readouterr())
    assert "CUDA" not in shown and "pre-processing" not in shown
    assert "a real problem" in shown and "after: shown again" in shown


class _PoolSoftmax(nn.Module):
    """conv -> 2x2 average pool (ADown) -> softmax over axis 1 of [1, 4, 2, A] (the DFL's layout)."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(2, 1, 0)

    def forward(self, x):
        return self.pool(self.conv(x)).view(1, 4, 2, -1).softmax(1)


def test_graph_rewrites_keep_the_numbers(tmp_path):
    """Before quantizing: an unpadded AveragePool becomes a depthwise convolution and an inner-axis Softmax
    becomes reductions, the same fp32 numbers (ONNX Runtime runs both faster quantized / in fp32)."""
    import onnx
    import onnxruntime as ort
    src = tmp_path / "p.onnx"
    torch.onnx.export(_PoolSoftmax().eval(), (torch.rand(1, 3, 16, 16),), str(src), dynamo=False,
                      input_names=["images"], output_names=["output0"], opset_version=17)
    m = quantize.softmax_as_reductions(quantize.pools_as_convolutions(onnx.load(str(src))))
    ops = [n.op_type for n in m.graph.node]
    assert "AveragePool" not in ops and "Softmax" not in ops and {"ReduceMax", "ReduceSum", "Exp"} <= set(ops)
    onnx.save(m, str(tmp_path / "c.onnx"))
    x = np.random.default_rng(0).random((1, 3, 16, 16), np.float32)
    ref, got = (ort.InferenceSession(str(p)).run(None, {"images": x})[0] for p in (src, tmp_path / "c.onnx"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    q = onnx.load(str(quantize.quantize_onnx(src, tmp_path / "q.onnx", [x])))
    assert not any(n.op_type in ("AveragePool", "Softmax") for n in q.graph.node)


# ---------------------------------------------------------------- the accuracy check

def test_check_table_and_limits(tmp_path, caplog):
    """Decision and table without validation: a float export 0.4 point under the .pt fails (limit 0.3), an INT8
    file 0.6 under its fp32 file passes (limit 1.0); one line per file; the failed file is removed, or kept
    with a warning under --allow-drop."""
    files = {}
    for name in ("m.pt", "m.onnx", "m-int8.onnx"):
        files[name] = tmp_path / name
        files[name].write_bytes(b"x" * 1000)
    out = {"onnx": files["m.onnx"], "onnx-int8": files["m-int8.onnx"]}
    maps = {"m.pt": (0.80, 0.500), "m.onnx": (0.80, 0.496), "m-int8.onnx": (0.79, 0.490)}
    validate = lambda paths: ([maps[p.name] for p in paths], "3 images")  # noqa: E731
    with pytest.raises(UserError) as e:
        accuracy.check(out, files["m.pt"], validate)
    msg = str(e.value)
    assert "\n" not in msg and "m.onnx lost 0.40 points" in msg and "limit 0.3" in msg and "m-int8" not in msg
    assert not files["m.onnx"].exists() and files["m-int8.onnx"].exists()
    rows, _ = accuracy.plan(out, files["m.pt"], accuracy.Limits())
    for r, key in zip(rows, maps):
        r.map50, r.map = maps[key]
    lines = accuracy.table(rows).splitlines()
    assert len(lines) == 4 and lines[0].split()[:5] == ["format", "file", "MB", "mAP50", "mAP50-95"]
    assert "FAILED: -0.40 vs .pt" in lines[2] and "ok: -0.60 vs m.onnx" in lines[3] and "-1.00" in lines[3]
    files["m.onnx"].write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        accuracy.check(out, files["m.pt"], validate, accuracy.Limits(allow=True))  # --allow-drop: warn, keep
    assert files["m.onnx"].exists() and "accuracy check FAILED, files kept (--allow-drop): m.onnx lost" in caplog.text


def _zero_weight_scales(real):
    """A quantization that collapses: every weight's dequantization scale set to zero."""
    def broken(src, dst, images, keep_fp32=None):
        import onnx
        from onnx import numpy_helper
        real(src, dst, images, keep_fp32)
        m = onnx.load(str(dst))
        for i, t in enumerate(m.graph.initializer):
            if t.name.endswith("weight_scale"):
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        onnx.save(m, str(dst))
        return dst
    return broken


def test_collapsed_int8_fails_the_export(fitted, tmp_path, monkeypatch, capsys, caplog):
    """A collapsed INT8 model stops export.py with one line and exit 1, after one short table; the file is
    removed, the fp32 export kept."""
    pt, data, _ = fitted
    w = Path(shutil.copy(pt, tmp_path / "m.pt"))
    monkeypatch.setattr(quantize, "quantize_onnx", _zero_weight_scales(quantize.quantize_onnx))
    argv = ["--weights", str(w), "--include", "onnx", "--int8", "--data", data, "--imgsz", str(IMGSZ)]
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="yolov9mqa"), pytest.raises(SystemExit) as e:
        cli(export_cli.main)(argv)
    assert e.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ERROR: accuracy check FAILED: m-int8.onnx lost")
    assert "limit 1" in err[0] and "removed m-int8.onnx" in err[0]
    assert "m-int8.onnx" not in _files(tmp_path) and "m.onnx" in _files(tmp_path)
    table = caplog.text[caplog.text.index("Accuracy check"):]
    assert "FAILED" in table and table.count("mAP50-95") == 1  # one table, not a validation per file


def test_other_class_count_refused_before_any_work(fitted, tmp_path):
    """--data with another class count: refused before any file is written, naming the data YAML stored in
    the checkpoint (export.py has no --single-cls)."""
    pt, data, _ = fitted
    w = Path(shutil.copy(pt, tmp_path / "m.pt"))
    other = _data_yaml(tmp_path / "two.yaml", Path(data).parent / "ds", names=["a", "b"])
    before = _files(tmp_path)
    for int8 in (True, False):
        with pytest.raises(UserError) as e:
            export_cli.main(["--weights", str(w), "--include", "onnx", "--data", other, "--imgsz", str(IMGSZ)]
                            + ["--int8"] * int8)
        msg = str(e.value)
        assert "nc=2" in msg and f"{len(SHAPE_NAMES)} classes" in msg and f"--data {data}" in msg
        assert "single-cls" not in msg and "\n" not in msg
    assert _files(tmp_path) == before


def test_missing_onnxruntime_with_int8_is_one_line(fitted, tmp_path, monkeypatch, capsys):
    from test_formats import _without
    pt, data, _ = fitted
    w = Path(shutil.copy(pt, tmp_path / "m.pt"))
    _without(monkeypatch, "onnxruntime")
    before = _files(tmp_path)
    with pytest.raises(SystemExit):
        cli(export_cli.main)(["--weights", str(w), "--include", "onnx", "--int8", "--data", data])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["ERROR: export.py --include onnx --int8: needs onnxruntime (for onnx); install with: "
                   "pip install onnxruntime"]
    assert _files(tmp_path) == before


# ---------------------------------------------------------------- fixed-size inputs on dynamic exports

@pytest.fixture(scope="module")
def dynamic_exports(fitted, tmp_path_factory):
    from importlib.util import find_spec
    w = Path(shutil.copy(fitted[0], tmp_path_factory.mktemp("dyn") / "m.pt"))
    return export.run(w, include=("onnx",) + (("openvino",) if find_spec("openvino") else ()), imgsz=IMGSZ,
                      dynamic=True)


def test_set_input_shape_compiles_once_for_frames(dynamic_exports):
    """A --dynamic OpenVINO export told that every input is 64x96 compiles once, for that shape (not also for
    dynamic shapes), with the dynamic compilation's outputs; other shapes still run (fixed-size exports:
    tests/test_formats.py). ONNX Runtime has nothing to gain from it (measured) and says so."""
    from utils.engine.backend import Backend
    assert not Backend(dynamic_exports["onnx"]).prepare_input_shape(64, 96)
    if "openvino" not in dynamic_exports:
        pytest.skip("openvino not installed")
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    ref = Backend(dynamic_exports["openvino"])(x)
    b = Backend(dynamic_exports["openvino"])
    assert b.prepare_input_shape(64, 96) and b.runner.static[0] == (1, 3, 64, 96)
    b(x)
    assert b.runner._compiled is None  # the dynamic compilation was never needed
    torch.testing.assert_close(b(x), ref, rtol=1e-4, atol=1e-3)
    anchors = 12 * 8 + 6 * 4 + 3 * 2  # a 96x64 input at strides 8, 16, 32
    assert b(torch.rand(1, 3, 96, 64)).shape == (1, 4 + len(SHAPE_NAMES), anchors)
