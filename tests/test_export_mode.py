"""The export mode that torch.export accepts (the graph every mobile format starts from): no data-dependent
Python scalars, strides and token grids static for a fixed input size, outputs equal to the eager model's."""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import perturb_bn
from models.yolo import DetectionModel
from utils.deploy.export import export_mode
from utils.deploy.reparam import main_branch_only

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 64, 96  # non-square


@pytest.mark.parametrize("cfg", ["gelan-t", "yolov9-t-MMQA", "gelan-t-MMQA", "yolov9-c-MMQA-P4P5-kv4",
                                 "yolov9-c-MMQARepNCSPELAN4"])
def test_torch_export_accepts_every_family(cfg):
    """Dual-head models are exported as export.py exports them: re-parameterised to their main branch, fused."""
    torch.manual_seed(0)
    model = perturb_bn(DetectionModel(cfg, nc=3))
    model = main_branch_only(model, log=lambda m: None).eval()
    with torch.no_grad():
        model.fuse()
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        ref = model(x)[0]
    with export_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (torch.zeros(2, 3, H, W),), strict=False)
    assert not model.training and "export" not in model.head.__dict__  # the mode is undone
    with torch.no_grad():
        y = ep.module()(x)
    assert y.shape == (2, 4 + 3, 8 * 12 + 4 * 6 + 2 * 3)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    # the anchor grid and strides are constants of the graph: nothing reads a tensor back into Python
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten.item.default", "aten._local_scalar_dense.default"}, ops


def test_head_compiles_to_one_graph():
    """The head's decode reads its strides as Python numbers: torch.compile of an eval model keeps one graph
    (float() of the stride tensor broke it inside the layer loop, ~22 graphs for the whole model)."""
    model = DetectionModel("gelan-t", nc=3).eval()
    head = model.head
    feats = [torch.rand(1, m[0].conv.in_channels, H // int(s), W // int(s)) for m, s in zip(head.cv2, head.strides)]
    torch._dynamo.reset()
    ex = torch._dynamo.explain(head)(feats)
    assert ex.graph_count == 1 and ex.graph_break_count == 0, [str(b.reason)[:120] for b in ex.break_reasons]
    assert head.strides == (8.0, 16.0, 32.0) and head.stride.tolist() == [8.0, 16.0, 32.0]
