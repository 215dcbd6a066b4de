"""Core ML export: every model family converts to an ML program whose spec, read back with coremltools, has the
input, output, metadata and (for Mobile MQA models) the attention this project's models have; the loader refuses
the file on Linux in one line (Core ML runs only on Apple devices, so predictions cannot be checked here)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import SHAPE_NAMES, perturb_bn, seeded_tiny_checkpoint
from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
from models.yolo import DetectionModel
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.deploy import export, formats
from utils.engine.backend import Backend
from utils.general import UserError

pytest.importorskip("coremltools")
pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 64, 96  # non-square: anchors 8*12 + 4*6 + 2*3
ANCHORS = 126


def _spec(path: Path):
    import coremltools as ct
    return ct.utils.load_spec(str(path))


def _meta(spec) -> dict:
    return {k: json.loads(v) for k, v in spec.description.metadata.userDefined.items() if not k.startswith("com.")}


def _ops(spec) -> Counter:
    f = spec.mlProgram.functions["main"]
    return Counter(op.type for op in f.block_specializations[f.opset].operations)


def _shape(feature) -> list[int]:
    return list(feature.type.multiArrayType.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded gelan-t with class names, exported through export.py's command line."""
    import export as export_cli
    d = tmp_path_factory.mktemp("coreml")
    w = seeded_tiny_checkpoint(d / "w.pt", SHAPE_NAMES)
    out = export_cli.main(["--weights", str(w), "--include", "coreml", "--imgsz", str(H), str(W)])
    return out["coreml"]


def test_spec_reads_back(tiny):
    from coremltools.proto import FeatureTypes_pb2 as ft
    assert tiny.name == "w.mlpackage" and sorted(p.name for p in tiny.parent.iterdir()) == ["w.mlpackage", "w.pt"]
    spec = _spec(tiny)
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "images" and _shape(inp) == [1, 3, H, W]
    assert out.name == "output0" and _shape(out) == [1, 4 + 5, ANCHORS]
    assert inp.type.multiArrayType.dataType == out.type.multiArrayType.dataType == ft.ArrayFeatureType.FLOAT32
    assert "0..1" in inp.shortDescription and "5 class scores" in out.shortDescription
    meta = _meta(spec)
    assert meta["names"] == SHAPE_NAMES and meta["nc"] == 5 and meta["stride"] == 32 and meta["imgsz"] == [H, W]
    assert meta["half"] is False and meta["dynamic_hw"] is False
    ops = _ops(spec)
    assert "cast" not in ops and ops["conv"] > 50  # fp32 compute: nothing cast to fp16


def test_loader_refuses_it_in_one_line(tiny, tmp_path, capsys):
    import cv2
    import numpy as np

    import detect_dual
    assert formats.for_path(tiny).name == "coreml" and formats.for_path(tiny.with_suffix(".mlmodel")).name == "coreml"
    others = " ".join(formats.runnable_names())
    want = (f"{tiny}: Core ML files run on macOS, iOS and iPadOS, not here; on this machine run the .pt or another "
            f"export (export.py --include {others})")
    with pytest.raises(UserError) as e:
        Backend(tiny)
    assert str(e.value) == want
    with pytest.raises(SystemExit) as e:
        cv2.imwrite(str(tmp_path / "a.jpg"), np.full((H, W, 3), 128, np.uint8))
        detect_dual.main(["--weights", str(tiny), "--source", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 1 and err == [f"ERROR: {want}"]


@pytest.mark.parametrize("cfg,half", [("gelan-t-MMQA", True), ("yolov9-t-MMQA", False),
                                      ("yolov9-c-MMQA-P4P5-kv4", False), ("yolov9-c-MMQARepNCSPELAN4", False)])
def test_every_family_converts(cfg, half, tmp_path):
    """Dual-head models convert as export.py exports them (re-parameterised to the main branch); each Mobile MQA
    block is one softmax beside the head's DFL one. --half: fp16 compute, inputs/outputs still fp32. The c-scale
    models at full size: their conversion measured 20-23 CPU-s against 14-16 for the t-scale ones (and their
    dual heads cannot be width-scaled: CBLinear's channel lists are absolute)."""
    torch.manual_seed(0)
    model = perturb_bn(DetectionModel(cfg, nc=3))
    n_mqa = sum(isinstance(m, MQA) for m in model.modules())
    assert n_mqa > 0
    w = save_checkpoint(make_checkpoint(model, names=["a", "b", "c"]), tmp_path / f"{cfg}.pt")
    f = export.run(w, include=("coreml",), imgsz=(H, W), half=half)["coreml"]
    spec = _spec(f)
    assert _shape(spec.description.input[0]) == [1, 3, H, W]
    assert _shape(spec.description.output[0]) == [1, 4 + 3, ANCHORS]  # main branch only
    assert _meta(spec)["names"] == ["a", "b", "c"] and _meta(spec)["half"] is half
    ops = _ops(spec)
    assert ops["softmax"] == 1 + n_mqa, ops
    assert (ops["cast"] == 2) is half  # fp16 program: the fp32 input cast down, the output back up
