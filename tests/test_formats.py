"""Deployment formats and CPU precision on a trained tiny model: every format's detections against the FP32
.pt model's, bfloat16 inference and training, INT8 ONNX / OpenVINO and their calibration, I/O threads sized
to the cores, and one-line errors when an optional package is missing."""
from __future__ import annotations

import builtins
import logging
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import export as export_cli
from fitted import BF16_TOL, FP32, IMGSZ, INT8_TOL, assert_matches, detect, fitted_checkpoint
from helpers import SHAPE_NAMES
from utils.deploy import export
from utils.general import UserError
from utils.torch_utils import cpu_bf16_native

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = cpu_bf16_native()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The fitted gelan-t (tests/fitted.py) exported at 64x64 to every CPU format; INT8 calibrated on the same
    training images. OpenVINO INT8 with every convolution quantized (int8_all): the default's layer choice comes
    from timings, so its file differs between runs (tests/test_int8_layers.py pins the timings instead)."""
    d = tmp_path_factory.mktemp("formats")
    w, data, images = fitted_checkpoint(d)
    ov = ("openvino",) if find_spec("openvino") and find_spec("nncf") else ()
    out = export.run(w, include=("torchscript", "onnx", *ov), imgsz=IMGSZ, int8=True, data=data, int8_all=True)
    return {"pt": w, **out}, data, images


def test_trained_model_detects(trained):
    files, _, images = trained
    ref = [r for r in detect(files["pt"], images) if len(r)]
    assert len(ref) >= 3 and max(r.scores.max() for r in ref) > 0.9  # fitted, not a random head


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "openvino"])
def test_fp32_formats_equal_pt(trained, fmt):
    files, _, images = trained
    if fmt not in files:
        pytest.skip("openvino not installed")
    ref, got = detect(files["pt"], images), detect(files[fmt], images)
    assert_matches(ref, got, **FP32)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.boxes, r.boxes, atol=0.05)


@pytest.mark.parametrize("fmt", ["pt", "openvino"])
def test_bf16_half_on_cpu(trained, fmt, caplog):
    files, _, images = trained
    if fmt not in files:
        pytest.skip("openvino not installed")
    from utils.engine.backend import Backend
    b = Backend(files[fmt], half=True)
    assert b.bf16 == BF16 and b.dtype == torch.float32  # inputs stay fp32: autocast / OpenVINO convert inside
    if fmt == "openvino":
        assert b.precision == ("bf16" if BF16 else "f32")
    assert_matches(detect(files["pt"], images), detect(files[fmt], images, half=True), **BF16_TOL)


def test_val_half_on_cpu_runs_bf16(trained, monkeypatch):
    """val_dual.py --half on CPU: the .pt forward runs under bf16 autocast (where the CPU has it), boxes and
    NMS in fp32, and the mAP50-95 stays within 0.05 of fp32 on the fitted model."""
    from utils.engine import backend
    from utils.engine.validator import run_validation
    files, data, _ = trained
    seen = []
    real = backend.Backend.autocast
    monkeypatch.setattr(backend.Backend, "autocast", lambda self: seen.append(self.bf16) or real(self))
    kw = dict(weights=str(files["pt"]), data=data, imgsz=IMGSZ, workers=0, plots=False, device="cpu")
    a = run_validation(**kw, project=str(Path(data).parent / "v32")).map
    b = run_validation(**kw, half=True, project=str(Path(data).parent / "v16")).map
    assert seen and seen[-1] == BF16 and not seen[0]
    assert a > 0.2 and abs(a - b) < 0.05, (a, b)


def test_track_half_on_cpu(trained, tmp_path, monkeypatch):
    """detect_dual.py --track --half on CPU runs bf16 (where the CPU has it): same tracks (class, id) as fp32 on
    the fitted model's images, box centres and sizes within 0.01 of the image (bf16 IoU >= 0.99 measured)."""
    import detect_dual
    from utils.engine import backend
    from utils.engine.predict.predictor import run
    files, data, _ = trained
    seen = []
    real = backend.Backend.autocast
    monkeypatch.setattr(backend.Backend, "autocast", lambda self: seen.append(self.bf16) or real(self))
    src = Path(data).parent / "ds" / "images" / "train"
    rows = {}
    for half in (False, True):
        opt = detect_dual.parse_opt(["--weights", str(files["pt"]), "--source", str(src), "--track", "--save-txt",
                                     "--imgsz", str(IMGSZ), "--device", "cpu", "--project", str(tmp_path),
                                     "--name", str(half)] + ["--half"] * half)
        d = run(opt)
        rows[half] = [sorted(map(str.split, f.read_text().splitlines())) for f in sorted((d / "labels").glob("*.txt"))]
    assert seen[-1] == BF16 and not seen[0]
    assert len(rows[False]) >= 2 and len(rows[True]) == len(rows[False])  # frames with confirmed tracks
    for a, b in zip(rows[False], rows[True]):
        assert [(r[0], r[-1]) for r in a] == [(r[0], r[-1]) for r in b]  # class and track id
        np.testing.assert_allclose(np.array([r[1:5] for r in b], float), np.array([r[1:5] for r in a], float),
                                   atol=0.01)


@pytest.mark.parametrize("fmt", ["onnx-int8", "openvino-int8"])
def test_int8_formats_match_pt(trained, fmt):
    files, _, images = trained
    if fmt not in files:
        pytest.skip("openvino not installed")
    import onnx
    if fmt == "onnx-int8":  # QDQ graph, per-channel weight scales, metadata carried over
        m = onnx.load(str(files[fmt]))
        assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)
        scales = [t for t in m.graph.initializer if t.name.endswith("weight_scale")]
        assert scales and all(len(t.dims) == 1 and t.dims[0] > 1 for t in scales)
        assert {p.key for p in m.metadata_props} >= {"names", "stride", "imgsz"}
    from utils.engine.backend import Backend
    b = Backend(files[fmt])
    assert b.names == SHAPE_NAMES and b.fixed_imgsz == (IMGSZ, IMGSZ) and b.stride == 32
    assert_matches(detect(files["pt"], images), detect(files[fmt], images), **INT8_TOL)


def test_accuracy_check_table(trained, caplog):
    """export.py's accuracy check on the fitted model: every file in one table next to the .pt, fp32 files equal
    to it, INT8 within 0.15 of its fp32 file (the fitted model's measured change is a few hundredths)."""
    from utils.deploy.accuracy import Limits
    files, data, _ = trained
    out = {k: v for k, v in files.items() if k != "pt"}
    with caplog.at_level(logging.INFO, logger="yolov9mqa"):
        rows = export_cli.accuracy_check(files["pt"], IMGSZ, "cpu", Limits(int8=15.0))(out, data)
    maps = {r.key: r.map for r in rows}
    assert set(maps) == {"pt", *out} and 0.3 < maps["pt"] <= 1
    for key in out:
        ref = maps[key.removesuffix("-int8")] if key.endswith("-int8") else maps["pt"]
        assert abs(maps[key] - ref) < (0.15 if key.endswith("-int8") else 0.003), (key, maps)
    table = caplog.text[caplog.text.index("Accuracy check"):].splitlines()
    assert len(table) == 2 + len(maps)  # title, column names, one line per file
    assert "reference" in table[2] and all(" ok: " in ln for ln in table[3:])
    for row, ln in zip(rows, table[2:]):
        assert row.path.name in ln.split() and f"{row.map:.4f}" in ln


def test_fixed_size_exports_have_no_shape_to_prepare(trained):
    from utils.engine.backend import Backend
    files, _, _ = trained
    for key in ("onnx", "openvino"):
        if key in files:
            assert not Backend(files[key]).prepare_input_shape(IMGSZ, IMGSZ)


def test_calibration_images_are_inference_inputs(trained):
    """Calibration tensors equal what Predictor feeds the fixed-size export for the same training images."""
    from utils.data.verify import collect_image_files
    from utils.deploy.quantize import calibration_images
    from utils.engine.predict.predictor import Predictor
    files, data, _ = trained
    cal = calibration_images(data, (IMGSZ, IMGSZ), 32, n=3)
    train, _ = collect_image_files(Path(data).parent / "ds" / "images" / "train")
    picked = [train[i] for i in (0, 2, 3)]  # evenly spaced: round(linspace(0, 3, 3)) = 0, 2, 3 (1.5 -> 2)
    p = Predictor(str(files["onnx"]), device="cpu")
    from utils.data import imread
    for c, f in zip(cal, picked):
        x, _ = p.preprocess(imread(f))
        np.testing.assert_array_equal(c, x.numpy())


def test_fp32_nodes_keep_decode_and_attention():
    from utils.deploy.quantize import fp32_nodes
    names = ["/model.0/conv/Conv", "/model.3/cv2/cv2.1/MatMul", "/model.3/cv2/cv2.1/Softmax",
             "/model.3/cv2/cv2.1/MatMul_1", "/model.22/cv2.0/cv2.0.2/Conv", "/model.22/cv3.1/cv3.1.0/conv/Conv",
             "/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid", "/model.22/Concat_9"]
    assert fp32_nodes(names) == names[1:4] + names[6:]


# ---------------------------------------------------------------- bfloat16 pieces

def test_head_decodes_in_fp32_under_autocast():
    """Under bf16 autocast the boxes are decoded in fp32: bf16 pixel coordinates step 2-4 px at 640."""
    from models.yolo import DetectionModel
    from helpers import perturb_bn
    model = perturb_bn(DetectionModel("gelan-t.yaml", nc=3))
    x = torch.rand(1, 3, 96, 640)
    with torch.no_grad():
        ref = model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)[0]
    assert y.dtype == torch.float32
    # same fp32 decoding of the bf16 head outputs: box error from the network only, not from rounding x
    assert (y[:, :4] - ref[:, :4]).abs().max() < 2.0


def test_loss_in_fp32_for_bf16_maps():
    """The loss decodes anchors and boxes in fp32 even when the head's maps come from bf16 autocast (a 160x160
    grid needs anchor centres 159.5 that bf16 cannot hold)."""
    from models.yolo import DetectionModel
    from utils.loss import DetectionLoss
    model = DetectionModel("gelan-t.yaml", nc=2)
    loss_fn = DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 64 + 2, s, s, generator=g).bfloat16() for s in (160, 80, 40)]
    targets = torch.tensor([[0, 1, 0.98, 0.97, 0.02, 0.03], [0, 0, 0.5, 0.5, 0.2, 0.1]])
    a, _ = loss_fn(feats, targets)
    b, _ = loss_fn([f.float() for f in feats], targets)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_bf16_falls_back_with_one_line(monkeypatch, caplog, trained):
    import utils.torch_utils as tu
    from utils.engine.backend import Backend
    files, _, _ = trained
    monkeypatch.setattr(tu.torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx512_f": True})
    assert not tu.cpu_bf16_native()
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        b = Backend(files["pt"], half=True)
    assert not b.bf16 and b.dtype == torch.float32
    lines = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "fp32" in lines[0]


def test_training_amp_on_cpu(tmp_path, monkeypatch):
    """--amp on CPU: the forward runs under bf16 autocast (where the CPU has it), the loss outside it in fp32;
    default and --no-amp train in fp32."""
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import Trainer
    from utils.data import generate_shapes
    generate_shapes(tmp_path / "ds", n_train=4, n_val=2, seed=1)
    data = tmp_path / "d.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val",
                                    "names": SHAPE_NAMES}))
    seen = {}
    for amp in (True, None, False):
        cfg = TrainConfig(data=str(data), cfg="gelan-t.yaml", epochs=1, batch_size=2, imgsz=64, workers=0,
                          device="cpu", project=str(tmp_path / "runs"), name=str(amp), noplots=True,
                          tensorboard=False, amp=amp)
        t = Trainer(cfg)
        t.setup()
        t.nonfinite, t.last_opt_step = 0, -1  # what run() sets before the first step
        inner = t.loss_fn

        def spy(pred, targets, inner=inner, amp=amp):
            seen[amp] = (pred[0].dtype, torch.is_autocast_enabled("cpu"))
            return inner(pred, targets)

        t.loss_fn = spy
        imgs, targets, paths, _ = next(iter(t.train_loader))
        t.train_step(0, 0, imgs.float() / 255, targets, paths)
    assert seen[True] == ((torch.bfloat16 if BF16 else torch.float32), False)
    assert seen[None] == seen[False] == (torch.float32, False)


# ---------------------------------------------------------------- optional packages missing: one line

def _without(monkeypatch, *names):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from utils.deploy.formats import base
    real_spec = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda name: None if name.split(".")[0] in names else real_spec(name))
    for n in list(sys.modules):
        if n.split(".")[0] in names:
            monkeypatch.delitem(sys.modules, n)


def test_missing_openvino_or_nncf_is_one_line(trained, monkeypatch, tmp_path):
    from utils.deploy import quantize
    from utils.engine.backend import Backend
    files, data, _ = trained
    folder = tmp_path / "m_openvino_model"
    folder.mkdir()
    (folder / "m.xml").write_text("<net/>")
    _without(monkeypatch, "openvino", "nncf")
    with pytest.raises(UserError, match=r"needs openvino \(pip install openvino\)$"):
        Backend(folder)
    before = sorted(p.name for p in files["pt"].parent.iterdir())
    with pytest.raises(UserError, match=r"--include onnx openvino --int8: needs openvino \(for openvino\), nncf "
                                        r"\(for openvino\); install with: pip install openvino nncf$"):
        export.run(files["pt"], include=("onnx", "openvino"), imgsz=IMGSZ, int8=True, data=data)
    assert sorted(p.name for p in files["pt"].parent.iterdir()) == before  # refused before any file was written
    with pytest.raises(UserError, match=r"needs nncf \(pip install nncf\)$"):
        quantize.quantize_openvino(object(), [])


@pytest.mark.skipif(find_spec("openvino") is None, reason="openvino not installed")
def test_foreign_openvino_model_is_refused(tmp_path):
    import openvino as ov
    from utils.engine.backend import Backend
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # output [1, 4]
    ov.save_model(ov.convert_model(classifier, example_input=torch.rand(1, 3, 64, 64), input=[1, 3, 64, 64]),
                  str(tmp_path / "classifier.xml"))
    with pytest.raises(UserError, match=r"classifier.xml: not a detector exported by this project .*shape \[1, 4\]"):
        Backend(tmp_path / "classifier.xml")


@pytest.mark.skipif(find_spec("openvino") is None or not sys.platform.startswith("linux"), reason="openvino on Linux")
def test_openvino_runners_leave_the_thread_signal_stack_alone(trained):
    """OpenVINO's CPU plugin swaps the compiling thread's signal stack and restores a stale, unmapped one when
    two Cores are destroyed first-in first-out; a signal handler (Ctrl-C, a DataLoader's SIGCHLD) then crashed
    the process. Two runners dropped in that order must leave the thread on the stack it had, still mapped."""
    import gc
    from helpers import signal_stack_is_mapped
    from utils.deploy.formats.base import LoadOptions
    from utils.deploy.formats.openvino import OpenVinoRunner
    from utils.deploy.signal_stack import current
    files, _, _ = trained
    before = current()
    first = OpenVinoRunner(files["openvino"], LoadOptions())
    second = OpenVinoRunner(files["openvino"], LoadOptions())
    for runner in (first, second):  # each compiles on its first call
        assert runner.run(np.zeros((1, 3, IMGSZ, IMGSZ), np.float32)).shape[0] == 1
    del first
    gc.collect()
    del second
    gc.collect()
    assert current() == before
    assert signal_stack_is_mapped()


@pytest.mark.skipif(find_spec("openvino") is None or find_spec("nncf") is None, reason="openvino not installed")
def test_openvino_frames_in_flight_run_on_their_own_streams(trained):
    """Frames in flight (the predictor's worker threads) each run on a stream of their own: compiled with that
    many streams, concurrent calls from several threads at once, each output that of a single-stream run of
    its own input; the streams are fixed at the first compilation."""
    import threading
    from utils.deploy.formats.base import LoadOptions
    from utils.deploy.formats.openvino import OpenVinoRunner
    files, _, _ = trained
    xs = [np.random.default_rng(i).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32) for i in range(4)]
    single = OpenVinoRunner(files["openvino"], LoadOptions(threads=2))
    refs = [single.run(x).copy() for x in xs]
    assert int(single.compiled.get_property("NUM_STREAMS")) == 1
    runner = OpenVinoRunner(files["openvino"], LoadOptions(threads=2))
    assert runner.concurrent_runs(4) == 2  # one stream per thread at most
    start, got, errors = threading.Barrier(len(xs)), [None] * len(xs), []

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[i] = runner.run(xs[i])
        except Exception as e:  # noqa: BLE001  reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert int(runner.compiled.get_property("NUM_STREAMS")) == 2
    for g, r in zip(got, refs):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    assert runner.concurrent_runs(1) == 2  # compiled: its streams stay


@pytest.mark.skipif(find_spec("openvino") is None or find_spec("nncf") is None, reason="openvino not installed")
def test_detect_adopts_the_openvino_compilation_started_before_torch(trained, tmp_path, monkeypatch):
    """detect_dual.py starts compiling an OpenVINO export before it imports torch; the runner takes that
    compilation when its settings are the same (no second compilation) and compiles its own when they are not
    (another thread count or precision), with the same detections either way."""
    import detect_dual
    from utils.deploy import early_compile
    from utils.deploy.formats import openvino as ov_format
    files, _, images = trained
    monkeypatch.setattr(early_compile, "torch_default_threads", torch.get_num_threads)  # this module: 1 thread
    compiles = []
    own = ov_format.OpenVinoRunner._compile
    monkeypatch.setattr(ov_format.OpenVinoRunner, "_compile", lambda self, m, what: compiles.append(what) or own(self, m, what))
    src = tmp_path / "images"
    src.mkdir()
    for f in images[:3]:
        (src / Path(f).name).write_bytes(Path(f).read_bytes())

    def run(*extra) -> list[str]:
        out = detect_dual.main(["--weights", str(files["openvino"]), "--source", str(src), "--device", "cpu",
                                "--imgsz", str(IMGSZ), "--save-txt", "--save-conf", "--nosave",
                                "--project", str(tmp_path / "runs"), "--name", "exp", *extra])
        return sorted(f.read_text() for f in (Path(out) / "labels").glob("*.txt"))

    adopted = run()
    assert compiles == []  # the early compilation was used
    assert early_compile.start(files["openvino"], False)
    assert early_compile.take(early_compile.model_xml(files["openvino"]),
                              early_compile.compile_config("bf16", torch.get_num_threads(), 1)) is None
    assert early_compile.take(early_compile.model_xml(files["openvino"]), {}) is None  # handed out once at most
    monkeypatch.setattr(early_compile, "torch_default_threads", lambda: torch.get_num_threads() + 1)  # a wrong guess
    assert run("--exist-ok") == adopted and compiles == [""]  # so the runner compiled its own: same detections
    assert not early_compile.start(files["onnx"], False)  # only OpenVINO exports
