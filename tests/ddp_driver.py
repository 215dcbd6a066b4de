"""Test driver run by tests/test_distributed.py, alone or under torchrun. Not a user tool.

step: build the model, loss, optimizer (and under torchrun SyncBN + DDP) through the Trainer's own setup, then
      one optimizer step on 8 fixed val images (rank r of W takes its contiguous 8/W of them), no warmup.
      The model is built in float64 (the loss itself stays float32): a deep random-init network amplifies
      float32 rounding (batch 4 vs 8 kernels, BN reductions) to ~1e-4 in the gradient, which would hide what
      the test is about (scaling, normaliser, SyncBN); in float64 the rounding stays ~1e-11.
      Rank 0 saves parameters/buffers before and after, the pre-clip gradient norm, and the validation of the
      EMA model on the trainer's (sharded) val loader next to a plain single-process validation of it; and
      each rank's (forced AMP check result, AMP decision): rank 0's check passes, rank 1's fails.
val:  val_dual.main(argv) under torchrun or alone; rank 0 saves the ValResult numbers.
scan: every rank builds the training loader of a split together (gloo); rank 0 saves what each rank checked,
      whether it came from the label store, which file it maps and its labels.
paths: --compile, --image-weights and gradient accumulation 2 under torchrun: torch.compile is a stand-in whose
      backward fails on rank 1 only; a DDP communication hook records at which steps gradients are all-reduced.
      Rank 0 saves what every rank ended with.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def result_numbers(r) -> dict:
    return {"mp": r.mp, "mr": r.mr, "map50": r.map50, "map": r.map, "box": r.box, "cls": r.cls, "dfl": r.dfl,
            "maps": np.asarray(r.maps).tolist(), "nt": np.asarray(r.nt).tolist(), "seen": r.seen}


def step(out: Path, data: str, hyp: str, project: str, sync_bn: bool) -> None:
    from utils.data import create_dataloader
    from utils.engine import distributed as ddp
    from utils.engine.config import TrainConfig
    from utils.engine.train.optim import unwrap
    from utils.engine.train.trainer import Trainer
    from utils.engine.validator import Validator, ValOptions

    cfg = TrainConfig(data=data, cfg="gelan-t.yaml", hyp=hyp, epochs=1, batch_size=8, imgsz=64, device="cpu",
                      workers=0, sync_bn=sync_bn, project=project, name="step", noplots=True, tensorboard=False,
                      seed=1, optimizer="SGD")  # SGD: a step proportional to the gradient (Adam amplifies rounding)
    t = Trainer(cfg)
    # one rank forced to fail the AMP check (rank 0 passes, rank 1 fails): every rank must end up with one decision
    forced = {-1: False, 0: True, 1: False}
    t._amp_ok = lambda: forced[ddp.rank()]
    torch.set_default_dtype(torch.float64)
    try:
        t.setup()
    finally:
        torch.set_default_dtype(torch.float32)
    assert t.accumulate == 1, t.accumulate  # hyp nbs == batch: every batch is an optimizer step
    t.nw, t.last_opt_step, t.nonfinite = -1, -1, 0  # no warmup: every group at its scheduled lr
    full, _ = create_dataloader(t.data.val, 64, 8, t.gs, augment=False, rect=False, workers=0, nc=t.data.nc,
                                names=t.data.names)
    imgs, targets, paths, _ = next(iter(full))
    assert imgs.shape[0] == 8
    r, w = max(ddp.rank(), 0), ddp.world_size()
    per = 8 // w
    keep = (targets[:, 0] >= r * per) & (targets[:, 0] < (r + 1) * per)
    mine = targets[keep].clone()
    mine[:, 0] -= r * per
    before = {k: v.detach().clone() for k, v in unwrap(t.model).state_dict().items()}
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(*a, **k):
        n = clip(*a, **k)
        norms.append(float(n))
        return n

    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        items = t.train_step(0, 0, imgs[r * per:(r + 1) * per].double() / 255, mine, paths[r * per:(r + 1) * per])
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    assert items is not None and norms, "the step did not happen"
    after = {k: v.detach().clone() for k, v in unwrap(t.model).state_dict().items()}
    amp = ddp.gather_objects((forced[ddp.rank()], t.amp))
    t.ema.ema.float()
    sharded = t._validate(t.ema.ema)  # the trainer's own (sharded under torchrun) validation
    if ddp.is_main():
        plain = Validator(ValOptions(training=True), names=t.names, loss_fn=t.val_loss_fn)
        loader, _ = create_dataloader(t.data.val, t.imgsz, t.val_loader.batch_size, t.gs, augment=False, rect=True,
                                      pad=0.5, workers=0, nc=t.data.nc, names=t.data.names)
        single = plain.run(t.ema.ema, loader)
        torch.save({"before": before, "after": after, "norm": norms[0], "world": w,
                    "val_sharded": result_numbers(sharded), "val_single": result_numbers(single),
                    "val_batches": len(t.val_loader), "amp": amp}, out)
    ddp.destroy()


def paths(out: Path, data: str, hyp: str, project: str) -> None:
    import os

    from helpers import FailingBackward
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from utils.engine import distributed as ddp
    from utils.engine.config import TrainConfig
    from utils.engine.train.optim import unwrap
    from utils.engine.train.trainer import Trainer

    def fake_compile(fn, **kw):  # compiles fine on rank 0, fails at the first backward on rank 1
        if os.environ["RANK"] == "1":
            return lambda x: [FailingBackward.apply(t) for t in fn(x)]
        return fn

    torch.compile = fake_compile
    cfg = TrainConfig(data=data, cfg="gelan-t.yaml", hyp=hyp, epochs=1, batch_size=8, imgsz=64, device="cpu",
                      workers=0, project=project, name="paths", noplots=True, tensorboard=False, seed=1,
                      compile=True, image_weights=True)
    t = Trainer(cfg)
    t.setup()
    assert t.accumulate == 2, t.accumulate  # hyp nbs = 2 x batch
    t.nw, t.last_opt_step, t.nonfinite = -1, -1, 0  # no warmup (it would ramp the accumulation)
    reduced, now = [], [None]

    def hook(state, bucket):
        reduced.append(now[0])
        return default_hooks.allreduce_hook(None, bucket)

    t.model.register_comm_hook(None, hook)
    imgs, targets, paths_, _ = next(iter(t.train_loader))
    for ni in range(4):
        now[0] = ni
        assert t.train_step(ni, 0, imgs.float() / 255, targets, paths_) is not None
    mine = {"eager": t.forward is t.model, "reduced_at": sorted(set(reduced)), "image_weights": t.cfg.image_weights,
            "params": torch.cat([p.detach().flatten() for p in unwrap(t.model).parameters()])}
    everyone = ddp.gather_objects(mine)
    if ddp.is_main():
        torch.save(everyone, out)
    ddp.destroy()


def val(out: Path, argv: list[str]) -> None:
    import val_dual
    from utils.engine import distributed as ddp
    res = val_dual.main(argv)
    if ddp.rank() in (-1, 0):
        out.write_text(json.dumps(result_numbers(res)))


def scan(out: Path, images: str) -> None:
    import torch.distributed as dist
    from utils.data import create_dataloader, verify
    from utils.engine import distributed as ddp
    dist.init_process_group("gloo")
    stats = []

    class CountedStats(verify.SplitStats):  # count full stat passes
        def __init__(self, listing):
            stats.append(len(listing))
            super().__init__(listing)

    verify.SplitStats = CountedStats
    _, ds = create_dataloader(images, 64, 4, rank=dist.get_rank(), nc=5, workers=0, augment=True)
    mine = {"rank": dist.get_rank(), "verified": ds.verified, "store": ds.store.path, "pid": os.getpid(),
            "stats": stats, "labels": np.concatenate(list(ds.labels)).tolist(), "files": list(ds.im_files)}
    ranks = ddp.gather_objects(mine)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(ranks))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "step":
        step(out, sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1")
    elif mode == "scan":
        scan(out, sys.argv[3])
    elif mode == "paths":
        paths(out, sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        val(out, sys.argv[3:])
