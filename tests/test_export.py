"""TorchScript / ONNX export: parity with PyTorch, embedded metadata, Backend loading, detect_dual.py on .onnx."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import export as export_cli
from utils.deploy import export, formats
from utils.deploy.formats.onnx import max_opset
from models.yolo import DetectionModel
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.engine.backend import Backend
from utils.general import ROOT
from helpers import limit, perturb_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

H, W = 64, 96  # non-square export size
NAMES = ["red", "green", "blue"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]  # PyTorch eval output y (dual: main branch)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mmqa(tmp_path_factory):
    """yolov9-t-MMQA (dual head + Mobile MQA) checkpoint exported to all three formats at 64x96."""
    d = tmp_path_factory.mktemp("mmqa")
    torch.manual_seed(0)
    model = perturb_bn(DetectionModel("yolov9-t-MMQA", nc=3))
    model.names = NAMES
    w = save_checkpoint(make_checkpoint(model, names=NAMES), d / "best.pt")
    out = export_cli.main(["--weights", str(w), "--include", "torchscript", "onnx", "reparam", "--imgsz", str(H), str(W)])
    return model, out


def test_files_next_to_weights(mmqa):
    _, out = mmqa
    assert set(out) == {"torchscript", "onnx", "reparam"}
    assert out["onnx"].name == "best.onnx" and out["torchscript"].name == "best.torchscript"
    assert out["reparam"].name == "best-gelan.pt" and out["onnx"].parent == out["reparam"].parent


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mmqa_parity_and_metadata(mmqa):
    model, out = mmqa
    x = torch.rand(2, 3, H, W)
    ref = _reference(model, x)
    # TorchScript: traced module + config.txt
    extra = {"config.txt": ""}
    ts = torch.jit.load(str(out["torchscript"]), _extra_files=extra)
    meta = json.loads(extra["config.txt"])
    assert meta["names"] == NAMES and meta["stride"] == 32 and meta["nc"] == 3 and meta["imgsz"] == [H, W]
    with torch.no_grad():
        _close(ts(x), ref)
    # ONNX: onnxruntime on the raw file + metadata_props
    m = onnx.load(str(out["onnx"]))
    props = {p.key: json.loads(p.value) for p in m.metadata_props}
    assert props["names"] == NAMES and props["stride"] == 32 and props["imgsz"] == [H, W]
    sess = ort.InferenceSession(str(out["onnx"]), providers=["CPUExecutionProvider"])
    y = np.concatenate([sess.run(None, {"images": x[i:i + 1].numpy()})[0] for i in range(2)])
    assert y.shape == (2, 4 + 3, 8 * 12 + 4 * 6 + 2 * 3)
    _close(torch.from_numpy(y), ref)
    # no attention op fell back to something untraceable: the explicit softmax path is in the graph
    assert any(n.op_type == "Softmax" for n in m.graph.node)


def test_backend_loads_exports(mmqa):
    model, out = mmqa
    x = torch.rand(3, 3, H, W)
    ref = _reference(model, x)
    for fmt in ("onnx", "torchscript"):
        b = Backend(out[fmt])
        assert not b.pt and b.names == NAMES and b.nc == 3 and b.stride == 32
        assert b.fixed_imgsz == (H, W)
        b.warmup()
        _close(b(x), ref)  # onnx: fixed batch 1, Backend runs it in chunks
        # smaller (letterboxed) input: padded bottom/right to the export size, coordinates unchanged
        small = b(x[:, :, :32, :64])
        assert small.shape[0] == 3
        with pytest.raises(Exception, match="exported for 64x96"):
            b(torch.rand(1, 3, 128, 128))
    assert Backend(out["reparam"]).fixed_imgsz is None


def test_dual_graph_export_dynamic_batch(tmp_path):
    """yolov9-t exported as its dual-head graph (no re-parameterisation; fused): main-branch output."""
    model = perturb_bn(DetectionModel("yolov9-t", nc=2), seed=1)
    model.names = ["a", "b"]
    ref = _reference(model, x := torch.rand(2, 3, H, W))  # unfused PyTorch reference
    with torch.no_grad():
        model.fuse()
    meta = export.metadata(model, (H, W), 1, True, False, tmp_path / "w.pt")
    im = torch.zeros(1, 3, H, W)
    with export.export_mode(model):
        job = formats.ExportJob(model, im, meta, formats.ExportOptions(imgsz=(H, W), dynamic=True), tmp_path / "w.pt",
                                tmp_path)
        f = formats.get("onnx").export(job, tmp_path / "dual.onnx")
        t = formats.get("torchscript").export(job, tmp_path / "dual.torchscript")
    assert not model.training and "export" not in model.head.__dict__  # state restored
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    _close(torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]), ref)  # batch 2 on a dynamic-batch file
    b = Backend(t)
    assert b.names == ["a", "b"]
    _close(b(x), ref)


def test_gelan_export(tmp_path):
    model = perturb_bn(DetectionModel("gelan-t", nc=2), seed=2)
    w = save_checkpoint(make_checkpoint(model, names=["x", "y"]), tmp_path / "gelan.pt")
    out = export.run(w, include=("onnx", "torchscript"), imgsz=(W, H))  # 96 x 64 (h x w)
    x = torch.rand(2, 3, W, H)
    ref = _reference(model, x)
    for fmt in ("onnx", "torchscript"):
        b = Backend(out[fmt])
        assert b.fixed_imgsz == (W, H) and b.names == ["x", "y"]
        _close(b(x), ref)


def test_detect_dual_runs_on_onnx(mmqa, tmp_path):
    script = ROOT / "detect_dual.py"
    if not script.is_file():
        pytest.skip("detect_dual.py not written yet")
    import cv2
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 80), (120, 90)]):
        cv2.imwrite(str(src / f"im{i}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    _, out = mmqa
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(script), "--weights", str(out["onnx"]), "--source", str(src),
                        "--imgsz", str(H), str(W), "--project", str(tmp_path / "runs"), "--name", "exp",
                        "--save-txt", "--conf-thres", "0.0001"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=limit(300))
    assert r.returncode == 0, r.stderr[-2000:]
    saved = sorted(p.name for p in (tmp_path / "runs" / "exp").glob("*.jpg"))
    assert saved == ["im0.jpg", "im1.jpg"]


def test_val_dual_runs_on_exported_files_at_their_size(mmqa, tmp_path):
    """Exported files have one input size: validation must letterbox to it (no rect batches)."""
    from utils.data import generate_shapes
    from utils.engine.validator import run_validation
    import yaml
    generate_shapes(tmp_path / "ds", n_train=2, n_val=5, seed=1, nc=3)
    data = tmp_path / "d.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val",
                                    "names": NAMES}))
    _, out = mmqa
    results = {}
    for fmt in ("onnx", "torchscript"):
        r = run_validation(data=str(data), weights=str(out[fmt]), batch_size=4, workers=0,
                           project=str(tmp_path / "val"), name=fmt, plots=False)
        results[fmt] = (r.map50, r.map)
        assert all(np.isfinite(v) for v in results[fmt])
    assert results["onnx"] == pytest.approx(results["torchscript"], abs=1e-3)


def test_default_inference_size_is_the_training_size(tmp_path):
    torch.manual_seed(0)
    model = DetectionModel("gelan-t", nc=3)
    w = save_checkpoint(make_checkpoint(model, names=NAMES, opt={"imgsz": 96}), tmp_path / "w.pt")
    assert Backend(w).default_imgsz() == 96
    w2 = save_checkpoint(make_checkpoint(model, names=NAMES), tmp_path / "w2.pt")
    assert Backend(w2).default_imgsz() == 640


# ---- --dynamic: batch AND height/width dynamic (anchor grid computed from the input shape)
DYN = 64  # square export size; the checks below run at other, non-square sizes


def _n_anchors(h: int, w: int) -> int:
    """Anchor count of a stride 8/16/32 head, counted independently of make_anchors."""
    return sum((h // s) * (w // s) for s in (8, 16, 32))


@pytest.fixture(scope="module")
def mmqa_dynamic(tmp_path_factory):
    """yolov9-t-MMQA (dual head + Mobile MQA, nc=3) exported with --dynamic at 64x64."""
    d = tmp_path_factory.mktemp("mmqa_dyn")
    torch.manual_seed(1)
    model = perturb_bn(DetectionModel("yolov9-t-MMQA", nc=3), seed=3)
    model.names = NAMES
    w = save_checkpoint(make_checkpoint(model, names=NAMES), d / "best.pt")
    out = export_cli.main(["--weights", str(w), "--include", "onnx", "torchscript", "--dynamic",
                       "--imgsz", str(DYN), str(DYN)])
    return model, w, out


@pytest.mark.parametrize("shape", [(1, 3, 64, 96), (2, 3, 96, 64), (2, 3, 128, 64)])
def test_dynamic_onnx_runs_at_other_sizes(mmqa_dynamic, shape):
    model, _, out = mmqa_dynamic
    sess = ort.InferenceSession(str(out["onnx"]), providers=["CPUExecutionProvider"])
    inp, outp = sess.get_inputs()[0], sess.get_outputs()[0]
    assert inp.shape[0] == "batch" and inp.shape[1] == 3 and inp.shape[2:] == ["height", "width"]
    assert outp.shape[0] == "batch" and outp.shape[2] == "anchors"
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    y = sess.run(None, {"images": x.numpy()})[0]
    b, _, h, w = shape
    assert y.shape == (b, 4 + 3, _n_anchors(h, w))
    _close(torch.from_numpy(y), _reference(model, x))


def test_dynamic_metadata_and_backend(mmqa_dynamic, tmp_path):
    model, w, out = mmqa_dynamic
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out["onnx"])).metadata_props}
    assert props["dynamic"] is True and props["dynamic_hw"] is True and props["imgsz"] == [DYN, DYN]
    for fmt in ("onnx", "torchscript"):
        b = Backend(out[fmt])
        assert b.fixed_imgsz is None and b.fixed_batch is None  # like .pt: rect batches, minimal padding
        assert b.names == NAMES and b.stride == 32 and b.default_imgsz() == DYN
        b.warmup((1, 3, 96, 64))
        for shape in ((1, 3, 64, 96), (2, 3, 96, 64)):
            x = torch.rand(*shape)
            y = b(x)
            assert y.shape == (shape[0], 7, _n_anchors(*shape[2:]))
            _close(y, _reference(model, x))
    # a file exported without --dynamic keeps its one size (copy: the export would overwrite best.onnx)
    shutil.copy(w, tmp_path / "fixed.pt")
    fixed = export.run(tmp_path / "fixed.pt", include=("onnx",), imgsz=(DYN, DYN))["onnx"]
    assert Backend(fixed).fixed_imgsz == (DYN, DYN)


def _val_data(tmp_path, n_val: int, **shapes_kw):
    """A generated 3-class shapes dataset and its data YAML."""
    import yaml
    from utils.data import generate_shapes
    generate_shapes(tmp_path / "ds", n_train=1, n_val=n_val, nc=3, **shapes_kw)
    data = tmp_path / "d.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val",
                                    "names": NAMES}))
    return data


def _record_input_shapes(monkeypatch) -> list:
    """The (h, w) of every batch any Backend is called with, in call order."""
    seen: list = []
    call = Backend.__call__

    def spy(self, im):
        seen.append(tuple(im.shape[-2:]))
        return call(self, im)

    monkeypatch.setattr(Backend, "__call__", spy)
    return seen


def test_dynamic_onnx_validates_like_pt(mmqa_dynamic, tmp_path, monkeypatch):
    """A dynamic ONNX file is validated with rect batches at the requested size, like the .pt it came from."""
    from utils.engine.validator import run_validation
    data = _val_data(tmp_path, 5, seed=2)
    _, w, out = mmqa_dynamic
    seen = _record_input_shapes(monkeypatch)
    res, shapes = {}, {}
    for key, f in (("pt", w), ("onnx", out["onnx"])):
        seen.clear()
        r = run_validation(data=str(data), weights=str(f), batch_size=4, imgsz=96, workers=0,
                           project=str(tmp_path / "val"), name=key, plots=False)
        res[key], shapes[key] = (r.map50, r.map), list(seen)
    assert shapes["onnx"] == shapes["pt"]  # same letterboxed batch shapes as .pt (warmup included)
    assert (DYN, DYN) not in shapes["onnx"]  # not forced to the export size ...
    assert any(h != w for h, w in shapes["onnx"])  # ... and rectangular batches were used
    assert res["onnx"] == pytest.approx(res["pt"], abs=1e-3)


def test_opset_outside_the_exporters_range_is_one_line(mmqa, tmp_path, capsys):
    shutil.copy(mmqa[1]["onnx"].with_suffix(".pt"), tmp_path / "w.pt")
    top = max_opset()
    for opset in (10, top + 1, 99):  # 10: the exporter fails inside; above: torch dumps its IR (~1,000 lines)
        with pytest.raises(SystemExit) as e:
            export_cli.cli(export_cli.main)(["--weights", str(tmp_path / "w.pt"), "--include", "onnx",
                                             "--imgsz", "64", "--opset", str(opset)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 1 and err == [f"ERROR: --opset {opset}: torch {torch.__version__.split('+')[0]} "
                                             f"exports these models at ONNX opsets 11..{top} (default 17)"]
    assert not (tmp_path / "w.onnx").exists()


def _foreign_onnx(path, model: nn.Module, shape=(1, 3, 64, 64)):
    with torch.no_grad():
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), str(path), dynamo=False, input_names=["x"])
    return path


def test_foreign_onnx_is_refused_by_detect_as_by_val(mmqa, tmp_path):
    """ONNX files that are not this project's detectors are refused with the reason, in detection as in
    validation; a detector-shaped file without metadata gets its class count from the output shape."""
    from utils.engine.config import PredictJob
    from utils.engine.predict.predictor import run
    from utils.engine.validator import run_validation
    from utils.general import UserError
    import cv2
    classifier = _foreign_onnx(tmp_path / "classifier.onnx", nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))
    features = _foreign_onnx(tmp_path / "features.onnx", nn.Conv2d(3, 4, 3, 2, 1))
    narrow = _foreign_onnx(tmp_path / "narrow.onnx", nn.Sequential(nn.Conv2d(3, 3, 32, 32), nn.Flatten(2)))
    cases = {classifier: "has shape [1, 10]", features: "has shape [1, 4, 32, 32]", narrow: "has 3 channels"}
    src = tmp_path / "im.jpg"
    cv2.imwrite(str(src), np.full((64, 80, 3), 90, np.uint8))
    data = _val_data(tmp_path, 2, seed=1)
    for f, why in cases.items():
        with pytest.raises(UserError, match=f"{f.name}: not a detector exported by this project.*{re.escape(why)}"):
            run(PredictJob.from_args(dict(weights=[str(f)], source=str(src), project=str(tmp_path / "det"))))
        with pytest.raises(UserError, match="not a detector exported by this project"):
            run_validation(data=str(data), weights=str(f), workers=0, project=str(tmp_path / "val"))
    assert not (tmp_path / "det").exists()
    # this project's export with its metadata removed: still a detector, 3 classes read from [1, 7, anchors]
    bare = onnx.load(str(mmqa[1]["onnx"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    b = Backend(tmp_path / "bare.onnx")
    assert b.nc == 3 and b.names == ["0", "1", "2"]


def test_fixed_size_export_states_its_geometry(mmqa, tmp_path, monkeypatch, caplog):
    """A fixed-size file cannot take the .pt's rectangular batches (half a stride larger than --img): validation
    says so, the speed line shows the shape the model really ran, and detection says when it ignores --imgsz."""
    import logging
    from utils.engine.predict.predictor import Predictor
    from utils.engine.validator import run_validation
    data = _val_data(tmp_path, 4, seed=2, sizes=[(160, 224)])
    _, out = mmqa
    seen = _record_input_shapes(monkeypatch)
    caplog.set_level(logging.INFO)
    ran = {}
    for f in (out["onnx"].with_suffix(".pt"), out["onnx"]):
        seen.clear()
        caplog.clear()
        run_validation(data=str(data), weights=str(f), batch_size=4, imgsz=96, workers=0,
                       project=str(tmp_path / "val"), plots=False)
        speed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Speed:")]
        assert len(speed) == 1 and speed[0].endswith(f"at shape {(4, 3, *seen[-1])}"), (speed, seen)
        noted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Note:")]
        assert noted == ([] if f.suffix == ".pt" else [
            f"Note: {f} takes only {H}x{W} input, so it validates square letterboxed images; a .pt (or an export "
            f"with --dynamic) validates rectangular batches padded by half a stride, which a fixed-size file cannot "
            f"take, and scores a little differently"])
        ran[f.suffix] = seen[-1]
    assert ran[".pt"] == (128, 96)  # rectangular batches: 160 wide, 224 high images at --img 96, + half a stride
    caplog.clear()
    Predictor(out["onnx"], device="cpu", imgsz=(H, W))
    Predictor(out["onnx"], device="cpu", imgsz=W)  # the long side: the same size
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    Predictor(out["onnx"], device="cpu", imgsz=128)
    assert f"exported at {H}x{W}; running at that size (--imgsz 128 128 ignored" in caplog.text


def test_fixed_size_export_in_an_ensemble_and_no_rect(mmqa, tmp_path, monkeypatch):
    """A fixed-size file anywhere in an ensemble makes validation letterbox square at its size (every member
    takes that); --no-rect gives a .pt the same square batches. Neither ends in a size error."""
    import val_dual
    from utils.engine.validator import run_validation
    data = _val_data(tmp_path, 4, seed=2, sizes=[(160, 224)])
    _, out = mmqa
    pt = out["onnx"].with_suffix(".pt")
    seen = _record_input_shapes(monkeypatch)
    run_validation(data=str(data), weights=[str(pt), str(out["onnx"])], batch_size=4, workers=0,
                   project=str(tmp_path / "val"), plots=False)
    assert seen and set(seen) == {(H, W), (min(H, W), min(H, W))}  # the export pads to its own 64x96
    assert val_dual.parse_opt(["--no-rect"]).rect is False and val_dual.parse_opt([]).rect is True
    for rect, want in ((False, {(96, 96)}), (True, {(128, 96)})):  # 160x224 images at --img 96
        seen.clear()
        run_validation(data=str(data), weights=str(pt), batch_size=4, imgsz=96, workers=0, rect=rect,
                       project=str(tmp_path / "val"), plots=False)
        assert set(seen[1:]) == want, seen  # after the square warmup
