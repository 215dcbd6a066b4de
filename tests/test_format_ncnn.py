"""NCNN export (pnnx) and its runner on the fitted tiny model: the folder holds only what NCNN needs, and
Predictor, val_dual.py's validation and detect_dual.py --track give the .pt's results through it."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fitted import FP32, IMGSZ, assert_matches, assert_tracks_match, detect, fitted_checkpoint
from helpers import SHAPE_NAMES
from utils.deploy import export, formats
from utils.engine.backend import Backend
from utils.general import UserError
from utils.torch_utils import cpu_bf16_native

pytest.importorskip("pnnx")
pytest.importorskip("ncnn")
pytestmark = pytest.mark.usefixtures("one_thread")

# fp16 weights (export --half): measured on the fitted model min matched IoU 0.9997 and max score change 6e-5
# against the .pt; the check allows about 4-15x that (other CPUs' kernels and ncnn versions)
FP16_WEIGHTS = dict(min_iou=0.998, score_tol=1e-3, exact_count=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The fitted gelan-t exported at 64x64 to NCNN, and to TorchScript as the fixed-size fp32 reference."""
    d = tmp_path_factory.mktemp("ncnn")
    w, data, images = fitted_checkpoint(d)
    out = export.run(w, include=("ncnn", "torchscript"), imgsz=IMGSZ)
    return {"pt": w, **out}, data, images


def test_folder_holds_only_what_ncnn_needs(trained):
    files, _, _ = trained
    d = files["ncnn"]
    assert d.name == "tiny_ncnn_model" and sorted(p.name for p in d.iterdir()) == [
        "metadata.json", "model.ncnn.bin", "model.ncnn.param"]  # no pnnx intermediates, no partial folder
    assert (d / "model.ncnn.param").read_text().split()[0] == "7767517"  # NCNN's param magic
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["names"] == SHAPE_NAMES and meta["nc"] == 5 and meta["stride"] == 32 and meta["imgsz"] == [64, 64]
    b = Backend(d)
    assert (b.format, b.names, b.fixed_imgsz, b.stride, b.precision) == ("ncnn", SHAPE_NAMES, (64, 64), 32, "f32")


def test_fp32_detections_equal_pt(trained):
    files, _, images = trained
    ref, got = detect(files["pt"], images), detect(files["ncnn"], images)
    assert_matches(ref, got, **FP32)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.boxes, r.boxes, atol=0.05)


def test_batch_runs_image_by_image_like_pt(trained, caplog):
    """NCNN has no batch axis: a batch of 3 (and the .pt's own forward as the reference) gives the same raw
    predictions per image; --half on x86 stays fp32 (NCNN's fp16 is ARM-only), with one note."""
    files, _, _ = trained
    x = torch.rand(3, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    ref = Backend(files["pt"], main_only=True)(x)
    y = Backend(files["ncnn"])(x)
    assert y.shape == ref.shape == (3, 4 + 5, 8 * 8 + 4 * 4 + 2 * 2) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-4)
    import ncnn
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        b = Backend(files["ncnn"], half=True)
    if cpu_bf16_native() and not ncnn.cpu_support_arm_asimdhp():  # --half reached the runner, which cannot honour it
        assert "NCNN computes in fp16 on ARMv8.2 CPUs only" in caplog.text and b.precision == "f32"
    if b.precision == "f32":
        torch.testing.assert_close(b(x), ref, atol=1e-3, rtol=1e-4)


def test_val_equals_fixed_size_torchscript(trained):
    """val_dual.py's validation of the folder: the mAP of the same model in another fp32 file of the same size."""
    from utils.engine.validator import run_validation
    files, data, _ = trained
    kw = dict(data=data, imgsz=IMGSZ, workers=0, plots=False, device="cpu")
    a = run_validation(weights=str(files["torchscript"]), project=str(Path(data).parent / "v_ts"), **kw).map
    b = run_validation(weights=str(files["ncnn"]), project=str(Path(data).parent / "v_ncnn"), **kw).map
    assert a > 0.3 and abs(a - b) < 1e-4, (a, b)


def test_track_equals_pt(trained, tmp_path):
    """detect_dual.py --track on the fitted images: the same tracks (class, id) and boxes as the .pt."""
    files, data, _ = trained
    assert_tracks_match(files["pt"], files["ncnn"], data, tmp_path)


def test_recognised_by_name_and_by_content(trained, tmp_path):
    files, _, images = trained
    assert formats.for_path("x/best_ncnn_model").name == "ncnn"
    renamed = tmp_path / "my model"
    shutil.copytree(files["ncnn"], renamed)
    assert formats.for_path(renamed).name == "ncnn"  # a renamed folder, by the .param it holds
    assert formats.for_path(renamed / "model.ncnn.param").name == "ncnn"
    ref = detect(files["pt"], images[:2])
    assert_matches(ref, detect(renamed / "model.ncnn.param", images[:2]), **FP32)

    (renamed / "metadata.json").unlink()
    with pytest.raises(UserError, match=r"my model: no readable metadata.json with the input size"):
        Backend(renamed)
    (renamed / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match=r"no readable metadata.json"):
        Backend(renamed)
    shutil.copy(files["ncnn"] / "metadata.json", renamed)
    (renamed / "model.ncnn.param").write_text("not a param file\n")
    with pytest.raises(UserError, match=r"model.ncnn.param: not a loadable NCNN model"):
        Backend(renamed)


def test_half_export_stores_fp16_weights(trained, tmp_path):
    """--half: the same graph with fp16 weights, half the file, detections within the measured tolerance."""
    files, _, images = trained
    w = shutil.copy(files["pt"], tmp_path / "tiny.pt")
    d = export.run(w, include=("ncnn",), imgsz=IMGSZ, half=True)["ncnn"]
    size = lambda p: (p / "model.ncnn.bin").stat().st_size  # noqa: E731
    assert 0.45 < size(d) / size(files["ncnn"]) < 0.55
    assert (d / "model.ncnn.param").read_text() == (files["ncnn"] / "model.ncnn.param").read_text()
    assert json.loads((d / "metadata.json").read_text())["half"] is True
    assert_matches(detect(files["pt"], images), detect(d, images), **FP16_WEIGHTS)


def test_missing_pnnx_is_one_line(tmp_path, monkeypatch):
    from utils.deploy.formats import base
    real = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda n: None if n == "pnnx" else real(n))
    with pytest.raises(UserError, match=r"^export.py --include ncnn: needs pnnx \(for ncnn\); install with: "
                                        r"pip install pnnx$"):
        formats.check_packages([formats.get("ncnn")])


def test_failed_conversion_is_one_line_and_writes_nothing(trained, tmp_path, monkeypatch):
    import pnnx
    files, _, _ = trained
    w = shutil.copy(files["pt"], tmp_path / "tiny.pt")
    monkeypatch.setattr(pnnx, "EXEC_PATH", shutil.which("false"))
    with pytest.raises(UserError, match=r"^export.py --include ncnn: pnnx could not convert the model \(exit 1: "
                                        r"no output\)$"):
        export.run(w, include=("ncnn",), imgsz=IMGSZ)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]
