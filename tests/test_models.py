"""Model zoo: upstream parameter parity per layer, shapes on non-square input, fuse, summary FLOPs."""
import ast
import re
from pathlib import Path

import pytest
import torch

from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
from models.yolo import CFG_DIR, DetectionModel, attention_gflops, model_info

UPSTREAM = ["yolov9-t", "yolov9-s", "yolov9-m", "yolov9-c", "yolov9-e",
            "gelan-t", "gelan-s", "gelan-m", "gelan-c", "gelan-e"]
ALL_CFGS = sorted(p.stem for p in CFG_DIR.glob("*.yaml"))


def _upstream_tables() -> dict:
    """Parse the upstream per-layer tables: name -> (rows [(i, from, params, module, args)], total)."""
    text = (Path(__file__).parent / "data" / "upstream_model_summaries.txt").read_text()
    out, rows = {}, []
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s*(-?\d+|\[[^\]]*\])\s+(\d+)\s+(\d+)\s+(\S+)\s+(.*)$", line)
        if m:
            i, f, _, p, mod, args = m.groups()
            rows.append((int(i), ast.literal_eval(f), int(p), mod.split(".")[-1], ast.literal_eval(args.strip())))
        s = re.match(r"(\S+) summary: \d+ layers, (\d+) parameters, (\d+) gradients", line)
        if s:
            out[s.group(1)] = (rows, int(s.group(2)), int(s.group(3)))
            rows = []
    return out


TABLES = _upstream_tables()


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = DetectionModel(f"{name}.yaml")
        return cache[name]
    return get


@pytest.mark.parametrize("name", UPSTREAM)
def test_parameter_parity_with_upstream(name, built):
    rows, total, grads = TABLES[name]
    model = built(name)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == grads
    assert len(model.model) == len(rows)
    for layer, (i, f, params, module, args) in zip(model.model, rows):
        assert (layer.i, layer.f, layer.type) == (i, f, module.replace("Upsample", "Upsample"))
        assert sum(p.numel() for p in layer.parameters()) == params, f"{name} layer {i}"
        if module not in ("Upsample",):
            assert layer.args == args, f"{name} layer {i}: {layer.args} != {args}"


def test_state_dict_keys_follow_upstream(built):
    keys = set(built("yolov9-c").state_dict())
    for k in ("model.3.cv2.0.cv1.conv.weight", "model.3.cv2.0.m.0.cv1.conv1.conv.weight",
              "model.3.cv2.1.conv.weight", "model.10.cv5.bn.running_var", "model.23.conv.bias",
              "model.38.cv4.0.0.conv.weight", "model.38.cv5.2.2.bias", "model.38.dfl2.conv.weight"):
        assert k in keys, k
    mmqa = set(built("yolov9-c-MMQARepNCSPELAN4").state_dict())
    assert "model.3.cv2.1.query_proj.weight" in mmqa and "model.3.cv2.0.cv1.conv.weight" in mmqa
    assert "model.13.cv2.1.conv.weight" in mmqa  # head keeps RepNCSPELAN4


def test_mmqa_seed_yaml_differs_only_in_backbone_blocks(built):
    base, mq = built("yolov9-c"), built("yolov9-c-MMQARepNCSPELAN4")
    for a, b in zip(base.model, mq.model):
        if a.i in (3, 5, 7, 9):
            assert b.type == "MMQARepNCSPELAN4" and a.args == b.args
        else:
            assert a.type == b.type and a.args == b.args and a.np == b.np


@pytest.mark.parametrize("name", ALL_CFGS)
def test_forward_non_square_train_and_eval(name, built):
    model = built(name)
    nc = model.nc
    x = torch.rand(2, 3, 64, 96)
    model.train()
    feats = model(x)
    maps = feats[1] if model.is_dual else feats
    if model.is_dual:
        assert len(feats) == 2 and len(feats[0]) == 3
    assert [tuple(m.shape) for m in maps] == [(2, 64 + nc, 64 // s, 96 // s) for s in (8, 16, 32)]
    model.eval()
    with torch.no_grad():
        y, raw = model(x)
    anchors = sum((64 // s) * (96 // s) for s in (8, 16, 32))
    assert y.shape == (2, 4 + nc, anchors)
    assert ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all()


def test_dual_eval_scores_main_branch_only(built):
    model = built("yolov9-t").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y, (aux, main) = model(x)
        head = model.head
        y_main = head._decode(main, head.dfl2)
        y_aux = head._decode(aux, head.dfl)
    assert torch.equal(y, y_main) and not torch.allclose(y, y_aux)


@pytest.mark.parametrize("name", ["yolov9-t", "gelan-s", "yolov9-t-MMQA", "yolov9-c-MMQA-P4P5"])
def test_fuse_keeps_outputs(name):
    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml").eval()
    for m in model.modules():  # non-trivial BN statistics so fusing actually matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a = model(x)[0]
        n_before = sum(p.numel() for p in model.parameters())
        b = model.fuse()(x)[0]
    assert sum(p.numel() for p in model.parameters()) < n_before
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_fused_gelan_c_parameter_count():
    model = DetectionModel("gelan-c.yaml").eval().fuse()
    assert sum(p.numel() for p in model.parameters()) == 25_288_768


def test_nc_override_and_dict_cfg():
    model = DetectionModel("gelan-t.yaml", nc=3)
    assert model.nc == 3 and model.yaml["nc"] == 3
    clone = DetectionModel(model.yaml)
    assert clone.nc == 3 and set(clone.state_dict()) == set(model.state_dict())


def test_attention_gflops_counted_by_formula(built):
    """Seed model at 640: layers 3/5/7/9 see 160/80/40/20 px maps; 8 heads, key=value dim 48, kv stride 1."""
    expected = 0
    for side in (160, 80, 40, 20):
        L = side * side
        expected += 2 * (2 * 8 * L * L * (48 + 48))  # two MQA layers per block
    got = attention_gflops(built("yolov9-c-MMQARepNCSPELAN4"), 640)
    assert got == pytest.approx(expected / 1e9, rel=1e-9)
    assert attention_gflops(built("yolov9-c"), 640) == 0


def test_summary_line_includes_attention(built, caplog):
    caplog.set_level("INFO")
    info = model_info(built("yolov9-c-MMQARepNCSPELAN4"), imgsz=640)
    assert info["gflops"] == pytest.approx(info["thop_gflops"] + info["attention_gflops"])
    assert info["attention_gflops"] > 2000 and 200 < info["thop_gflops"] < 260
    assert "yolov9-c-MMQARepNCSPELAN4 summary:" in caplog.text and "GFLOPs" in caplog.text


def test_cheap_c_variant_within_budget(built):
    cheap = model_info(built("yolov9-c-MMQA-P4P5"), imgsz=640)
    base = model_info(built("yolov9-c"), imgsz=640)
    assert cheap["gflops"] <= 1.05 * base["gflops"]


def test_unknown_module_is_a_user_error(tmp_path):
    from utils.general import UserError
    cfg = {"nc": 2, "backbone": [[-1, 1, "Bogus", [16]]], "head": []}
    with pytest.raises(UserError, match="unknown module 'Bogus'"):
        DetectionModel(cfg)


def test_mqa_layers_present_in_variants(built):
    for name, n in (("yolov9-t-MMQA", 4), ("yolov9-c-MMQA-P4P5", 4), ("yolov9-c-MMQARepNCSPELAN4", 8)):
        assert sum(isinstance(m, MQA) for m in built(name).modules()) == n


def test_profile_rows_add_up_to_the_summary_total(monkeypatch):
    """--profile: every layer's GFLOPs (the list-input head and Concat rows too) sum to the model total."""
    import models.yolo as yolo
    rows = []
    real = yolo.layer_gflops

    def spy(m, x):
        rows.append((m.type, real(m, x)))
        return rows[-1][1]

    monkeypatch.setattr(yolo, "layer_gflops", spy)
    model = yolo.DetectionModel("yolov9-t-MMQA.yaml").eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64), profile=True)
    assert len(rows) == len(model.model)
    head_type, head_gflops = rows[-1]
    assert head_type == "DualDDetect" and head_gflops > 0
    total = yolo.model_info(model, imgsz=64)
    assert total["attention_gflops"] > 0
    assert abs(sum(g for _, g in rows) - total["gflops"]) < 0.01 * total["gflops"]


def test_summary_without_thop_says_na_not_zero(built, caplog, monkeypatch):
    """A missing optional counter must not print a convolution count of 0 GFLOPs."""
    import builtins
    real_import = builtins.__import__

    def no_thop(name, *a, **kw):
        if name == "thop":
            raise ImportError("no thop")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_thop)
    caplog.set_level("INFO")
    info = model_info(built("yolov9-t-MMQA"), imgsz=64)
    assert info["thop_gflops"] == 0 and info["attention_gflops"] > 0
    assert "GFLOPs n/a (thop not installed" in caplog.text and " 0.0 GFLOPs" not in caplog.text
