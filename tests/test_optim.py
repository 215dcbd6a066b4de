"""EMA of weights: the fused update must equal the textbook formula on every float tensor."""
import copy
import math

import torch
import torch.nn as nn

from utils.engine.optim import ModelEMA


def test_ema_update_matches_formula_and_skips_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    ema = ModelEMA(model, decay=0.9, tau=3.0)
    before = copy.deepcopy(ema.ema.state_dict())
    with torch.no_grad():  # move the live model away from the EMA copy, buffers included
        for t in model.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn_like(t))
    model.train()(torch.rand(2, 3, 8, 8))  # bumps num_batches_tracked (an integer buffer)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 3.0))
    live = model.state_dict()
    for k, v in ema.ema.state_dict().items():
        if v.dtype.is_floating_point:
            want = d * before[k].double() + (1 - d) * live[k].double()
            assert torch.allclose(v.double(), want, atol=1e-6), k
        else:
            assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in ema.ema.parameters())
