"""ExecuTorch (.pte lowered to XNNPACK): the fitted gelan-t exported once at 64 px must be delegated whole, carry
its metadata, and detect, validate and track like the .pt through the one backend loader; the rewrites that
make XNNPACK take every op must compute what the ops they replace compute."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fitted import FP32, IMGSZ, assert_matches, assert_tracks_match, detect, fitted_checkpoint
from helpers import SHAPE_NAMES
from utils.deploy import export
from utils.general import UserError

pytest.importorskip("executorch")
pytestmark = pytest.mark.usefixtures("one_thread")

from utils.deploy.formats import executorch as et  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(.pt, .pte, data YAML, images, export log): the fitted gelan-t (tests/fitted.py) lowered at 64x64, and
    traced to TorchScript at that size (the fixed-size reference for validation)."""
    d = tmp_path_factory.mktemp("executorch")
    w, data, images = fitted_checkpoint(d)
    log = logging.getLogger("yolov9mqa")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        out = export.run(w, include=("torchscript", "executorch"), imgsz=IMGSZ)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return w, out["executorch"], data, images, records


def test_lowered_whole_to_xnnpack_with_metadata(exported):
    """No op of `forward` left to the portable kernels (one XNNPACK delegate), said in one export line; the
    metadata is read from the file's tables and reaches the loader."""
    from utils.engine.backend import Backend
    w, pte, _, _, records = exported
    assert pte.name == "tiny.pte" and pte.stat().st_size > 1e6
    meta, portable_ops, delegates = et.read_program(pte)
    assert portable_ops == 0 and delegates == 1
    assert "ExecuTorch: every op delegated to XNNPACK (1 partition)" in records
    assert meta["names"] == SHAPE_NAMES and meta["stride"] == 32 and meta["imgsz"] == [IMGSZ, IMGSZ]
    assert meta["nc"] == 5 and meta["half"] is False and meta["source"] == "tiny.pt"
    b = Backend(pte)
    assert (b.format, b.names, b.nc, b.stride, b.fixed_imgsz, b.fixed_batch, b.precision) == \
        ("executorch", SHAPE_NAMES, 5, 32, (IMGSZ, IMGSZ), 1, "f32")


def test_detections_equal_pt(exported):
    w, pte, _, images, _ = exported
    ref, got = detect(w, images), detect(pte, images)
    assert sum(len(r) for r in ref) >= 3
    assert_matches(ref, got, **FP32)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.boxes, r.boxes, atol=0.05)


def test_batches_run_one_image_at_a_time(exported):
    """The program takes batch 1: a batch of 3 runs as three calls and returns what each image gives alone."""
    from utils.engine.backend import Backend
    w, pte, _, _, _ = exported
    b, pt = Backend(pte), Backend(w)
    x = torch.rand(3, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    y = b(x)
    assert y.shape == (3, 4 + 5, 8 * 8 + 4 * 4 + 2 * 2) and y.dtype == torch.float32
    torch.testing.assert_close(y[1:2], b(x[1:2]))
    torch.testing.assert_close(y, pt(x), atol=1e-3, rtol=1e-4)


def test_val_map_equals_fixed_size_export(exported):
    """val_dual.py's validation of the .pte gives the mAP of the TorchScript export of the same size (a .pt
    validates rectangular batches padded by half a stride, a fixed-size file square 64x64 letterboxes)."""
    from utils.engine.validator import run_validation
    w, pte, data, _, _ = exported
    kw = dict(data=data, imgsz=IMGSZ, workers=0, plots=False, device="cpu")
    ts = run_validation(weights=str(w.with_suffix(".torchscript")), project=str(Path(data).parent / "vts"), **kw).map
    got = run_validation(weights=str(pte), project=str(Path(data).parent / "vpte"), **kw).map
    assert ts > 0.3 and abs(got - ts) < 1e-4, (ts, got)


def test_track_equals_pt(exported, tmp_path):
    """detect_dual.py --track on the .pte: the .pt's tracks (class, id) and boxes."""
    w, pte, data, _, _ = exported
    assert_tracks_match(w, pte, data, tmp_path)


def test_half_request_runs_fp32_with_one_note(exported, caplog):
    """--half on a CPU with bf16 asks the runner for bf16: an fp32 program runs in fp32, with one note."""
    from utils.engine.backend import Backend
    from utils.torch_utils import cpu_bf16_native
    _, pte, _, _, _ = exported
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        b = Backend(pte, half=True)
    assert b.precision == "f32" and not b.half and not b.bf16
    notes = [r.getMessage() for r in caplog.records if "tiny.pte runs in the precision" in r.getMessage()]
    assert notes == ["WARNING: --half: tiny.pte runs in the precision it was exported in (fp32); export with "
                     "--include executorch --half for an fp16 program"] * int(cpu_bf16_native())


def test_not_a_program_is_one_line(tmp_path):
    from utils.engine.backend import Backend
    f = tmp_path / "broken.pte"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"broken.pte: not a loadable ExecuTorch program \("):
        Backend(f)
    assert et.read_program(f) == (None, 0, 0)


def test_missing_executorch_is_one_line(exported, monkeypatch):
    """Without the package: export stops before any work, and the loader names the pip package."""
    from utils.deploy.formats import base
    from utils.engine.backend import Backend
    w, pte, _, _, _ = exported
    real = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda n: None if n == "executorch" else real(n))
    with pytest.raises(UserError, match=r"^export.py --include executorch: needs executorch \(for executorch\); "
                                        r"install with: pip install executorch$"):
        export.run(w, include=("executorch",), imgsz=IMGSZ)
    with pytest.raises(UserError, match=r"tiny.pte: running ExecuTorch models needs executorch \(pip install executorch\)"):
        Backend(pte)


class TinyDetector(nn.Module):
    """[B, 3, H, W] -> [B, 4 + 2, H/8 * W/8]: the detector contract in one convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 128, 8, 8), nn.Conv2d(128, 6, 1))

    def forward(self, x):
        y = self.conv(x)
        return torch.cat((y[:, :4] * 8 + 16, y[:, 4:].sigmoid()), 1).flatten(2)


def test_half_writes_an_fp16_program(tmp_path):
    """--half: an fp16 program (fp16 input and activations; XNNPACK keeps convolution weights fp32 in the file and
    packs them to fp16 at load), read back as an fp16 runner that takes the usual fp32 images and returns fp32
    within fp16 rounding of the fp32 model (the whole fitted model measured: matched IoU 0.998, scores within
    0.001; mAP50-95 0.5987 against 0.5975 fp32 for gelan-t trained at 128 px)."""
    from utils.deploy.formats import ExportJob, ExportOptions
    from utils.engine.backend import Backend
    torch.manual_seed(0)
    model = TinyDetector().eval()
    im = torch.zeros(1, 3, 32, 64)
    meta = {"names": ["a", "b"], "nc": 2, "stride": 8, "imgsz": [32, 64], "dynamic": False, "half": False}
    job = ExportJob(model, im, meta, ExportOptions(imgsz=(32, 64), half=True), tmp_path / "t.pt", tmp_path)
    f = et.export(job, tmp_path / "t.pte")
    assert et.read_program(f) == ({**meta, "half": True}, 0, 1)
    b = Backend(f)
    assert (b.precision, b.names, b.fixed_imgsz, b.stride) == ("fp16", ["a", "b"], (32, 64), 8)
    x = torch.rand(2, 3, 32, 64)
    y = b(x)
    with torch.no_grad():
        ref = model(x)
    assert y.dtype == torch.float32 and y.shape == (2, 6, 32)
    torch.testing.assert_close(y, ref, atol=0.05, rtol=2e-3)
    assert (y - ref).abs().max() > 1e-3  # fp16 rounding of values ~16: computed in fp16, not fp32


class Rewritten(nn.Module):
    """Every op REWRITES replaces, in the forms these models use them."""

    def forward(self, x, q, k):
        a, b = x.chunk(2, 1)                                   # RepNCSPELAN4
        c, d = x.split((1, 3), 1)                              # the head's box/class split
        up = F.interpolate(a, scale_factor=2, mode="nearest")  # the neck
        wide = F.interpolate(b, size=(x.shape[2], 2 * x.shape[3]), mode="nearest")
        dfl = x.view(1, 4, 1, -1).transpose(2, 1).softmax(1)   # DFL's softmax over axis 1
        attn = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)  # Mobile MQA: one key head for all query heads
        same = torch.matmul(q, q.transpose(-1, -2))
        return up, wide, c * d / 2 + 1, F.silu(b), dfl, torch.matmul(attn, k), same, k.squeeze(1).unsqueeze(1)


def test_rewrites_compute_the_replaced_ops():
    """Exact in float64 against eager, non-square maps; none of the replaced ops stays in the graph."""
    m = Rewritten()
    args = (torch.rand(1, 4, 3, 5, dtype=torch.float64), torch.rand(1, 4, 6, 8, dtype=torch.float64),
            torch.rand(1, 1, 10, 8, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, args, strict=False).run_decompositions(et.REWRITES)
    aten = torch.ops.aten
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    gone = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.matmul.default,
            aten.upsample_nearest2d.vec, aten.unsqueeze.default, aten.silu.default}
    assert not gone & {n.target for n in calls}
    assert all(n.args[1] % n.args[0].meta["val"].dim() == n.args[0].meta["val"].dim() - 1 
               for n in calls if n.target in (aten._softmax.default, aten.softmax.int))
    arithmetic = [n for n in calls if n.target in (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor)]
    assert len(arithmetic) >= 4 and all(isinstance(n.args[1], torch.fx.Node) for n in arithmetic)
    for got, ref in zip(ep.module()(*args), m(*args)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_anchor_grid_folds_to_constants():
    """The head's anchor grid (new_ones / cumsum / meshgrid of the feature maps' static shapes) becomes tensor
    constants, and the folded graph still computes the head's output (non-square maps)."""
    from models.heads import DDetect
    torch.manual_seed(0)
    head = DDetect(nc=3, ch=(16, 32, 64)).eval()
    head.strides, head.stride, head.export = (8.0, 16.0, 32.0), torch.tensor([8.0, 16.0, 32.0]), True
    feats = [torch.rand(1, c, 64 // s, 96 // s) for c, s in ((16, 8), (32, 16), (64, 32))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = head(feats)
        gm = torch.export.export(head, (feats,), strict=False).module()
    ops = lambda: {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}  # noqa: E731
    assert {"aten.cumsum.default", "aten.new_ones.default"} <= ops()
    assert et.fold_constants(gm) >= 2
    assert not {"aten.cumsum.default", "aten.new_ones.default", "aten.meshgrid.indexing"} & ops(), ops()
    with torch.no_grad():
        torch.testing.assert_close(gm(feats), ref, atol=1e-5, rtol=1e-5)


def test_mobile_mqa_lowers_whole(tmp_path):
    """One Mobile MQA block (query and key/value downsampling, 4 heads sharing one key/value head) in export
    mode: XNNPACK takes every op, and the program computes the block's output. As a .pte it is no detector:
    the loader refuses it in one line."""
    from utils.engine.backend import Backend
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
    torch.manual_seed(0)
    block = MQA(32, num_heads=4, key_dim=8, value_dim=8, query_h_strides=2, query_w_strides=2, kv_strides=2).eval()
    block.explicit = True
    x = torch.rand(1, 32, 8, 12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = block(x)
        gm = torch.export.export(block, (x,), strict=False).run_decompositions(et.REWRITES).module()
        et.fold_constants(gm)
        edge = to_edge_transform_and_lower(torch.export.export(gm, (x,), strict=False),
                                           partitioner=[XnnpackPartitioner()])
    parts, ops = et.outside_delegate(edge.exported_program())
    assert parts == 1 and not ops, ops
    f = tmp_path / "block.pte"
    f.write_bytes(edge.to_executorch().buffer)
    program = Runtime.get().load_program(f)
    torch.testing.assert_close(program.load_method("forward").execute((x,))[0], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match=r"block.pte: not a detector exported by this project \(its output 'output 0' "
                                        r"has shape \[1, 32, 8, 12\]"):
        Backend(f)
