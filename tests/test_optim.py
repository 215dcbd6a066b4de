"""EMA of weights: the fused update must equal the textbook formula on every float tensor."""
import copy
import math

import torch
import torch.nn as nn

from utils.engine.train.optim import ModelEMA


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



def test_ema_follows_the_live_model_over_steps_and_a_new_source_model():
    """The EMA reads the source tensors it collected once; optimizer steps, BN statistics, load_state_dict
    into the model and a different source model must all be seen, as by the formula on fresh state_dicts."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1))  # noqa: E731
    model = make()
    ema = ModelEMA(model, decay=0.9, tau=3.0)
    ref = {k: v.double().clone() for k, v in ema.ema.state_dict().items() if v.dtype.is_floating_point}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = make()
    for step in range(1, 7):
        if step == 3:
            model.load_state_dict(other.state_dict())  # in-place copy: same tensors, new values
        if step == 5:
            model = other  # a different module: its tensors are collected anew
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        model(torch.rand(2, 3, 8, 8)).square().mean().backward()  # also moves BN running stats
        opt.step()
        opt.zero_grad()
        ema.update(model)
        d = 0.9 * (1 - math.exp(-step / 3.0))
        live = model.state_dict()
        for k in ref:
            ref[k] = d * ref[k] + (1 - d) * live[k].double()
        got = ema.ema.state_dict()
        for k, want in ref.items():
            assert torch.allclose(got[k].double(), want, atol=1e-6), (step, k)

# ---------------------------------------------------------------- --optimizer auto
import pytest  # noqa: E402
import yaml  # noqa: E402

from utils.engine.train.optim import (AUTO_ADAMW_FINETUNE_LR, AUTO_ADAMW_LR, AUTO_SGD_MIN_STEPS,  # noqa: E402
                                AUTO_WARMUP_MAX_FRAC, choose_optimizer, optimizer_steps, warmup_iterations)
from utils.general import ROOT  # noqa: E402


@pytest.fixture()
def upstream_hyp():
    return yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())


def test_optimizer_steps_hand_counted():
    # 37 images, batch 16: 3 batches/epoch, accumulate 64/16=4 -> 100 epochs make 300/4 = 75 steps
    assert optimizer_steps(37, 16, 64, 100) == 75
    assert optimizer_steps(500, 16, 16, 20) == 32 * 20  # bundled shapes: nbs 16, no accumulation
    assert optimizer_steps(100, 128, 64, 3) == 3  # batch above nbs: one step per batch
    assert optimizer_steps(0, 16, 64, 10) == 0


def test_auto_short_schedule_picks_adamw(upstream_hyp):
    before = dict(upstream_hyp)
    c = choose_optimizer("auto", 40, 16, 64, 100, upstream_hyp)
    assert upstream_hyp == before  # pure: the caller applies hyp_updates
    assert (c.name, c.lr0, c.momentum, c.warmup_bias_lr) == ("AdamW", AUTO_ADAMW_LR, 0.9, 0.0)
    assert c.steps == 75 and "75 optimizer steps" in c.reason and "AdamW" in c.reason
    assert c.hyp_updates() == {"lr0": AUTO_ADAMW_LR, "momentum": 0.9, "warmup_bias_lr": 0.0,
                               "warmup_max_frac": AUTO_WARMUP_MAX_FRAC}


def test_auto_long_schedule_is_upstream_sgd(upstream_hyp):
    c = choose_optimizer("auto", 118_287, 64, 64, 300, upstream_hyp)  # COCO-scale: ~555k steps
    assert c.name == "SGD" and c.steps > AUTO_SGD_MIN_STEPS
    hyp = dict(upstream_hyp)
    hyp.update(c.hyp_updates())
    assert hyp == upstream_hyp  # every hyp value (and so the warmup) stays upstream's
    assert c.warmup_max_frac == 0


def test_auto_threshold_is_inclusive_for_sgd(upstream_hyp):
    # batch = nbs = 1: one step per image per epoch, so the count is exact
    assert choose_optimizer("auto", AUTO_SGD_MIN_STEPS, 1, 1, 1, upstream_hyp).name == "SGD"
    assert choose_optimizer("auto", AUTO_SGD_MIN_STEPS - 1, 1, 1, 1, upstream_hyp).name == "AdamW"


def test_auto_finetune_uses_lower_lr(upstream_hyp):
    scratch = choose_optimizer("auto", 60, 16, 64, 20, upstream_hyp)
    ft = choose_optimizer("auto", 60, 16, 64, 20, upstream_hyp, finetune=True)
    assert ft.name == "AdamW" and ft.lr0 == AUTO_ADAMW_FINETUNE_LR < scratch.lr0 and "fine-tun" in ft.reason
    # a long fine-tune is still upstream's SGD
    assert choose_optimizer("auto", 118_287, 16, 64, 50, upstream_hyp, finetune=True).name == "SGD"


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_explicit_optimizer_keeps_hyp_values(name, upstream_hyp):
    for n_images in (10, 1_000_000):  # the schedule length plays no role
        c = choose_optimizer(name, n_images, 16, 64, 100, upstream_hyp, finetune=True)
        assert (c.name, c.lr0, c.momentum, c.warmup_bias_lr) == (name, 0.01, 0.937, 0.1)
        hyp = dict(upstream_hyp)
        hyp.update(c.hyp_updates())
        assert hyp == upstream_hyp and "warmup_max_frac" not in hyp


def test_resolved_choice_is_stable():
    """Resume re-runs choose_optimizer with the stored name and hyp: it must give the same values back."""
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    first = choose_optimizer("auto", 40, 16, 64, 100, hyp, finetune=True)
    hyp.update(first.hyp_updates())
    again = choose_optimizer(first.name, 40, 16, 64, 300, hyp, finetune=False)  # extended, weights= last.pt
    assert (again.name, again.lr0, again.momentum, again.warmup_bias_lr) == \
        (first.name, first.lr0, first.momentum, first.warmup_bias_lr)
    assert warmup_iterations(hyp, 3, 100) == round(AUTO_WARMUP_MAX_FRAC * 300)


def test_unknown_optimizer_rejected(upstream_hyp):
    with pytest.raises(ValueError):
        choose_optimizer("RMSprop", 40, 16, 64, 100, upstream_hyp)


def test_warmup_iterations_upstream_and_capped():
    hyp = {"warmup_epochs": 3.0}
    assert warmup_iterations(hyp, 3, 100) == 100  # upstream floor of 100 iterations
    assert warmup_iterations(hyp, 1000, 300) == 3000  # upstream: 3 epochs of 1000 batches
    capped = {"warmup_epochs": 3.0, "warmup_max_frac": 0.05}
    assert warmup_iterations(capped, 3, 100) == 15  # 5% of 300 iterations instead of a third of the run
    assert warmup_iterations(capped, 1000, 300) == 3000  # the cap binds only when the run is short
    assert warmup_iterations(capped, 1, 2) == 1  # never zero (np.interp needs a non-empty ramp)
