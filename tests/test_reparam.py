"""Re-parameterisation dual-head YOLOv9 -> single-head GELAN: layer mapping, outputs, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.yolo import DetectionModel, load_model_yaml
from utils.general import UserError
from utils.deploy.reparam import gelan_yaml_for, layer_map, main_branch, offset_map, reparameterize
from helpers import perturb_bn

SCALES = "tsmce"


pytestmark = pytest.mark.usefixtures("one_thread")


def _table(d: dict) -> list:
    """(resolved inputs, module, args) per layer, the comparison used against upstream's layer tables."""
    rows = d["backbone"] + d["head"]
    out = []
    for i, (f, n, m, a) in enumerate(rows):
        fs = [f] if isinstance(f, int) else f
        out.append(([None if (x == -1 and i == 0) else (i + x if x < 0 else x) for x in fs], n,
                    str(m).replace("nn.", ""), a))
    return out


@pytest.mark.parametrize("s", SCALES)
def test_layer_map_matches_upstream_offsets(s):
    dual, gelan = load_model_yaml(f"yolov9-{s}"), load_model_yaml(f"gelan-{s}")
    m = layer_map(dual, gelan)
    assert len(m) == len(gelan["backbone"] + gelan["head"])
    assert m[:-1] == offset_map(s)                      # body: upstream's per-scale offsets
    assert m[-1] == len(dual["backbone"] + dual["head"]) - 1  # head <- DualDDetect
    # the synthesised single-head YAML is the shipped gelan YAML, layer for layer
    assert _table(gelan_yaml_for(dual)) == _table(gelan)


def test_upstream_index_facts():
    assert offset_map("c")[:3] == [1, 2, 3] and offset_map("t")[:3] == [0, 1, 2]
    e = offset_map("e")
    assert e[:29] == list(range(29)) and e[29:] == list(range(36, 49))
    kept, new = main_branch(load_model_yaml("yolov9-c"))
    assert kept[0] == 1 and new[0] is None                  # Silence dropped, image feeds layer 1
    kept, _ = main_branch(load_model_yaml("yolov9-e"))
    assert kept[0] == 0                                      # yolov9-e keeps Silence: layer 15 reads it


@pytest.mark.parametrize("dual, gelan, mmqa_at", [
    ("yolov9-c-MMQARepNCSPELAN4", "gelan-c-MMQARepNCSPELAN4", [2, 4, 6, 8]),
    ("yolov9-c-MMQA-P4P5", "gelan-c-MMQA-P4P5", [6, 8]),
    ("yolov9-t-MMQA", "gelan-t-MMQA", [6, 8]),
])
def test_mmqa_gelan_yamls(dual, gelan, mmqa_at):
    d, g = load_model_yaml(dual), load_model_yaml(gelan)
    layer_map(d, g)  # raises on any type/args/input mismatch
    rows = g["backbone"] + g["head"]
    assert [i for i, r in enumerate(rows) if r[2] == "MMQARepNCSPELAN4"] == mmqa_at
    assert _table(gelan_yaml_for(d)) == _table(g)


def test_mismatched_or_single_head_refused():
    with pytest.raises(UserError, match="layer|layers"):
        layer_map(load_model_yaml("yolov9-c"), load_model_yaml("gelan-t"))
    with pytest.raises(UserError, match="layer 6"):  # MMQA dual onto a plain gelan: block types differ
        layer_map(load_model_yaml("yolov9-t-MMQA"), load_model_yaml("gelan-t"))
    with pytest.raises(UserError, match="not a dual-head"):
        gelan_yaml_for(load_model_yaml("gelan-t"))


def _main_branch(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]


def test_yolov9_t_checkpoint_to_gelan_t(tmp_path):
    from utils.checkpoint import load_checkpoint, load_model, make_checkpoint, save_checkpoint
    from utils.deploy.reparam import main
    dual = perturb_bn(DetectionModel("yolov9-t", nc=5))
    dual.names = list("abcde")
    w = save_checkpoint(make_checkpoint(dual, names=dual.names), tmp_path / "best.pt")
    out = main(["--weights", str(w), "--out", str(tmp_path / "gelan.pt")])  # cfg picked from yaml_file
    ck = load_checkpoint(out)
    assert ck["model_yaml"]["yaml_file"] == "gelan-t.yaml" and ck["names"] == list("abcde")
    gelan = load_model(out)
    assert not gelan.is_dual and gelan.nc == 5
    x = torch.rand(2, 3, 64, 96)  # non-square
    y_dual, y_gelan = _main_branch(dual, x), _main_branch(gelan, x)
    assert y_gelan.shape == y_dual.shape == (2, 4 + 5, 8 * 12 + 4 * 6 + 2 * 3)
    assert (y_dual - y_gelan).abs().max() <= 1e-5
    # the auxiliary head really is gone and the main head moved: gelan cv2 == dual cv4
    sd_d, sd_g = dual.state_dict(), gelan.state_dict()
    assert torch.equal(sd_g["model.22.cv2.0.0.conv.weight"], sd_d["model.29.cv4.0.0.conv.weight"])
    assert torch.equal(sd_g["model.22.cv3.2.2.bias"], sd_d["model.29.cv5.2.2.bias"])
    assert not any(k.startswith(("model.22.cv4", "model.22.cv5", "model.22.dfl2")) for k in sd_g)


def test_yolov9_c_mmqa_p4p5_to_gelan():
    dual = perturb_bn(DetectionModel("yolov9-c-MMQA-P4P5", nc=2), seed=1)
    gelan = reparameterize(dual)
    assert gelan.yaml["yaml_file"] == "gelan-c-MMQA-P4P5.yaml"
    assert type(gelan.model[6]).__name__ == "MMQARepNCSPELAN4" and type(gelan.model[8]).__name__ == "MMQARepNCSPELAN4"
    x = torch.rand(1, 3, 64, 96)
    assert (_main_branch(dual, x) - _main_branch(gelan, x)).abs().max() <= 1e-5


def test_yolov9_c_param_counts():
    dual = DetectionModel("yolov9-c")
    gelan = reparameterize(dual)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dual) == 51_182_080
    assert count(gelan) == 25_498_752
    with torch.no_grad():
        gelan.eval().fuse()
    assert count(gelan) == 25_288_768
