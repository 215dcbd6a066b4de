"""Mobile MQA against an independent float64 reference written with per-head loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
from models.common import MMQARepNCSPELAN4, RepNCSPELAN4


def _bn(x, bn):
    """BatchNorm in eval mode, explicit."""
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.double().view(shape)) / torch.sqrt(bn.running_var.double().view(shape) + bn.eps) \
        * bn.weight.double().view(shape) + bn.bias.double().view(shape)


def _conv1x1(x, conv):
    w = conv.weight.double()[:, :, 0, 0]  # [out, in]
    return torch.einsum("oi,bihw->bohw", w, x)


def reference_mqa(m: MQA, x: torch.Tensor) -> torch.Tensor:
    """Explicit float64 MQA following the spec step by step (one loop iteration per head)."""
    x = x.double()
    b, c, h, w = x.shape
    nh, kd, vd = m.num_heads, m.key_dim, m.value_dim
    qh, qw = m.query_strides
    xq = x
    if qh > 1 or qw > 1:
        if h >= qh and w >= qw:
            xq = F.avg_pool2d(x, (qh, qw), (qh, qw))
        else:  # smaller than the window: mean of what exists
            xq = F.adaptive_avg_pool2d(x, (max(h // qh, 1), max(w // qw, 1)))
        xq = _bn(xq, m.query_norm)
    q = _conv1x1(xq, m.query_proj)  # [B, h*k, Hq, Wq]
    hq, wq = q.shape[-2:]
    xk, xv = x, x
    if m.kv_strides > 1:
        def down(t, seq):
            conv, bn = seq[0], seq[1]
            t = F.conv2d(t, conv.weight.double(), None, conv.stride, conv.padding, groups=conv.groups)
            return _bn(t, bn)
        xk, xv = down(x, m.key_down), down(x, m.value_down)
    k = _conv1x1(xk, m.key_proj)    # [B, k, Hk, Wk]
    v = _conv1x1(xv, m.value_proj)  # [B, v, Hk, Wk]
    out = torch.zeros(b, nh * vd, hq, wq, dtype=torch.float64)
    for bi in range(b):
        K = k[bi].reshape(kd, -1).T  # [P, k]
        V = v[bi].reshape(vd, -1).T  # [P, v]
        for head in range(nh):
            Q = q[bi, head * kd:(head + 1) * kd].reshape(kd, -1).T  # [L, k], token = row-major pixel
            logits = Q @ K.T / math.sqrt(kd)
            probs = torch.softmax(logits, dim=-1)
            o = probs @ V  # [L, v]
            out[bi, head * vd:(head + 1) * vd] = o.T.reshape(vd, hq, wq)
    if (hq, wq) != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return _conv1x1(out, m.output_proj)


def _randomise_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("size", [(7, 13), (1, 1), (20, 32), (9, 4)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("qs", [(1, 1), (2, 2), (2, 1)])
def test_mqa_matches_float64_reference(size, batch, kv, qs):
    torch.manual_seed(0)
    m = MQA(16, 4, 8, 6, qs[0], qs[1], kv).double().eval()
    _randomise_bn(m)
    x = torch.randn(batch, 16, *size, dtype=torch.float64)
    ref = reference_mqa(m, x)
    for explicit in (False, True):
        m.explicit = explicit
        out = m(x)
        assert out.shape == x.shape
        assert _rel_err(out, ref) < 1e-6, (explicit, _rel_err(out, ref))


def test_mqa_float32_sdpa_equals_explicit():
    torch.manual_seed(0)
    m = MQA(32, 8, 16, 16, 1, 1, 2).eval()
    x = torch.randn(2, 32, 11, 17)
    m.explicit = False
    a = m(x)
    m.explicit = True
    b = m(x)
    assert _rel_err(a, b) < 1e-5
    assert _rel_err(a, reference_mqa(m, x)) < 1e-5


def test_value_dim_is_honoured_and_param_formula():
    c, h, k, v = 64, 8, 48, 32
    m = MQA(c, h, k, v, 1, 1, 1)
    assert m.value_proj.out_channels == v and m.output_proj.in_channels == h * v
    assert sum(p.numel() for p in m.parameters()) == c * (h * k + k + v + h * v)
    assert sum(p.numel() for p in MQA(c, h, k, v, 1, 1, 2).parameters()) == c * (h * k + k + v + h * v) + 22 * c
    assert sum(p.numel() for p in MQA(c, h, k, v, 2, 2, 1).parameters()) == c * (h * k + k + v + h * v) + 2 * c
    assert sum(p.numel() for p in MQA(64, 8, 48, 48, 1, 1, 1).parameters()) == 55_296


def test_scale_is_one_over_sqrt_key_dim():
    """Scaling by 1/sqrt(key_dim // heads) (a known port bug) would change the output."""
    torch.manual_seed(0)
    m = MQA(8, 4, 16, 16, 1, 1, 1).double().eval()
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    out = m(x)
    m.scale = 1 / math.sqrt(16 // 4)
    assert _rel_err(m(x), out) > 1e-3


def test_gradients_reach_every_parameter_train_mode():
    torch.manual_seed(0)
    m = MQA(16, 4, 8, 8, 2, 2, 2, dropout=0.1).train()
    x = torch.randn(2, 16, 9, 14, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


def test_dropout_applies_to_probabilities_not_logits():
    """Explicit path in train mode equals softmax -> dropout(probs) -> @V with the same RNG draw."""
    torch.manual_seed(0)
    m = MQA(4, 2, 4, 4, 1, 1, 1, dropout=0.5).double().train()
    m.explicit = True
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    torch.manual_seed(123)
    out = m(x)
    q = _conv1x1(x, m.query_proj).reshape(1, 2, 4, 36).transpose(2, 3)
    k = _conv1x1(x, m.key_proj).reshape(1, 1, 4, 36).transpose(2, 3)
    v = _conv1x1(x, m.value_proj).reshape(1, 1, 4, 36).transpose(2, 3)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    torch.manual_seed(123)
    ctx = F.dropout(probs, 0.5) @ v  # [1, 2, 36, 4]
    ref = _conv1x1(ctx.transpose(2, 3).reshape(1, 8, 6, 6), m.output_proj)
    assert _rel_err(out, ref) < 1e-9
    m.eval()
    assert _rel_err(m(x), out) > 1e-3  # dropout really acted in training


def test_mmqa_block_param_count():
    base = sum(p.numel() for p in RepNCSPELAN4(128, 256, 128, 64, 1).parameters())
    mmqa = sum(p.numel() for p in MMQARepNCSPELAN4(128, 256, 128, 64, 1).parameters())
    assert base == 212_864
    assert mmqa == 212_864 - 2 * 36_992 + 2 * 55_296


def test_mmqa_block_non_square_shapes():
    m = MMQARepNCSPELAN4(16, 24, 16, 8, 1, num_heads=2, key_dim=8, kv_strides=2).eval()
    for hw in ((5, 9), (1, 1), (12, 7)):
        assert m(torch.randn(2, 16, *hw)).shape == (2, 24, *hw)


def test_attention_flops_formula():
    m = MQA(64, 8, 48, 40, 1, 1, 2)
    # 20x30 map: L = 600 query tokens, kv stride 2 with k=3, pad 1 -> 10x15 = 150 tokens
    assert m.attention_flops(20, 30) == 2 * 8 * 600 * 150 * (48 + 40)
    m2 = MQA(64, 8, 48, 40, 2, 2, 1)
    assert m2.attention_flops(20, 30) == 2 * 8 * 150 * 600 * (48 + 40)


@pytest.mark.parametrize("size,kv,qs", [((1, 1), 1, (1, 1)), ((4, 4), 4, (1, 1)), ((2, 3), 8, (2, 2)), ((6, 10), 2, (1, 1))])
def test_sdpa_inputs_have_row_major_strides(monkeypatch, size, kv, qs):
    """CUDA's memory-efficient kernel rejects misaligned strides, even on size-1 dims (1x1 key map, one
    query token): every tensor handed to SDPA must be laid out row-major, and the result stays exact."""
    torch.manual_seed(0)
    m = MQA(16, 4, 8, 8, *qs, kv).eval()
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append([(t.shape, t.stride()) for t in (q, k, v)])
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 16, *size)
    out = m(x)
    assert seen, "SDPA path not taken"
    for shape, stride in seen[0]:
        want = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        assert stride == want, (shape, stride)
    assert _rel_err(out, reference_mqa(m, x)) < 1e-5


def test_explicit_path_in_fp16_scales_before_the_product():
    """The explicit (exported) path in fp16: logits whose unscaled product q.k passes fp16's 65504 are still finite
    once scaled (q is scaled first); scaling after the product gave inf, then NaN from the softmax."""
    torch.manual_seed(0)
    m = MQA(16, 2, 16, 8, 1, 1, 1).double().eval()
    with torch.no_grad():  # every query and key component 70: q.k = 16 * 70^2 = 78400 > 65504, scaled 19600
        m.query_proj.weight.fill_(70.0 / 16)
        m.key_proj.weight.fill_(70.0 / 16)
    x = torch.ones(1, 16, 3, 5, dtype=torch.float64) + 0.01 * torch.randn(1, 16, 3, 5, dtype=torch.float64)
    ref = reference_mqa(m, x)
    m.explicit = True
    out = m.half()(x.half())
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 1e-2, _rel_err(out, ref)
