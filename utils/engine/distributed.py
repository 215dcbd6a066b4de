"""torch.distributed glue for training and validation under `torchrun` (one node or several, elastic restarts).

What lives here, and why:
- launch checks that turn common mistakes into one clear line instead of a hang (`check_launch`,
  `check_batch`), and a process-group start with a timeout (YOLO_DDP_TIMEOUT seconds, default 1800) so no
  rank waits forever for one that never came or has died;
- the global-batch loss normaliser (`global_score_sum`): DDP averages gradients, the trainer multiplies the
  loss by the world size (as upstream) and the loss divides by the score sum of the WHOLE global batch, so a
  step equals one process on the global batch (upstream divides by each rank's own sum, which differs a
  little whenever ranks hold different numbers of objects);
- elastic restarts: `restart_count` > 0 means torchrun restarted the group, `restart_run_folder` finds the
  run folder of the failed attempt so training continues from its newest last.pt;
- small collectives (`broadcast_object`, `gather_objects`) that are no-ops in a single process.
Global rank 0 alone logs, plots and writes the run folder.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.general import LOGGER, UserError
from utils.torch_utils import select_device

DEFAULT_TIMEOUT_S = 1800


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or a launcher that sets LOCAL_RANK, RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT the same way)."""
    return "LOCAL_RANK" in os.environ


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank from the process group (-1 without one)."""
    return dist.get_rank() if is_dist() else -1


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() in (-1, 0)


def restart_count() -> int:
    """How many times torchrun has restarted the worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def timeout_s() -> float:
    raw = os.environ.get("YOLO_DDP_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        t = float(raw)
    except ValueError:
        raise UserError(f"YOLO_DDP_TIMEOUT={raw!r}: expected a number of seconds") from None
    if t <= 0:
        raise UserError(f"YOLO_DDP_TIMEOUT={raw!r}: must be > 0 seconds")
    return t


def _gpu_ids(spec: str) -> list[int]:
    spec = str(spec or "").strip().lower().replace(" ", "").removeprefix("cuda:")
    return [int(x) for x in spec.split(",")] if re.fullmatch(r"\d+(,\d+)+", spec) else []


def check_launch(device: str, sync_bn: bool = False, script: str = "train_dual.py") -> None:
    """Mistakes that would otherwise hang or silently train on one device, caught before any work."""
    ids = _gpu_ids(device)
    if len(ids) > 1 and not under_torchrun():
        raise UserError(f"--device {device}: {len(ids)} GPUs need one process each; launch with "
                        f"`python -m torch.distributed.run --nproc-per-node {len(ids)} {script} --device {device} ...`")
    if sync_bn and not under_torchrun():
        raise UserError("--sync-bn needs distributed training: launch with "
                        f"`python -m torch.distributed.run --nproc-per-node N {script} --sync-bn ...`")


def fail(message: str) -> None:
    """A user error every rank detects at once: every rank raises it, and the script's `cli` wrapper prints it
    from rank 0 only and hands it to torchrun's failure summary (utils.general.report_error)."""
    raise UserError(message)


def check_batch(batch_size: int, world: int) -> None:
    if world > 1 and batch_size == -1:
        fail("--batch-size -1 (autobatch) measures one GPU: under torchrun pass the total batch size")
    if world > 1 and batch_size % world:
        fail(f"--batch-size {batch_size} is the total over {world} processes: use a multiple of {world}")


def rank_device(spec: str, local_rank: int, local_world: int) -> str:
    """The --device of one torchrun process: the LOCAL_RANK-th GPU of the list (`--device 2,3`: local rank 0
    trains on GPU 2, local rank 1 on GPU 3); GPU LOCAL_RANK when no GPU is named; 'cpu' / 'mps' unchanged.
    A list whose length differs from the processes per node is refused in one line (printed by rank 0)."""
    s = str(spec or "").strip().lower().replace(" ", "").removeprefix("cuda:")
    if s in ("", "cuda"):
        return str(local_rank)
    if not re.fullmatch(r"\d+(,\d+)*", s):
        return str(spec)  # cpu, mps, or a mistake select_device reports
    ids = [int(x) for x in s.split(",")]
    if len(ids) != local_world:
        fail(f"--device {spec} names {len(ids)} GPU(s) but torchrun started {local_world} process(es) on this node: "
             f"give one GPU per process (--nproc-per-node {len(ids)}, or {local_world} ids in --device)")
    return str(ids[local_rank])


def process_device(spec: str, batch_size: int = 0) -> torch.device:
    """select_device for this process: under torchrun the GPU that `rank_device` maps LOCAL_RANK to (made the
    current device), then the process group is joined; otherwise select_device(spec) as is."""
    if not under_torchrun():
        return select_device(spec, batch_size)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return init_distributed(select_device(rank_device(spec, local_rank, local_world), typed=spec))


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun prepared (nccl on CUDA, gloo otherwise), with a timeout on the
    rendezvous and on every collective. Returns this process's device (already chosen and made current by
    `process_device`). No-op outside torchrun."""
    if not under_torchrun():
        return device
    if is_dist():
        return device
    t = timeout_s()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        kw: dict = {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # the agent's store may outlive a restart: a fresh key prefix per attempt, so a restarted group
            # never reads the addresses of the workers that died (gloo would try to reach them)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  int(os.environ["WORLD_SIZE"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=t))
            kw = dict(store=dist.PrefixStore(f"yolo/attempt_{restart_count()}", store),
                      rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=t), **kw)
    except (dist.DistError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: the process group "
                        f"at {where} did not form within {t:g} s ({first[:160]}); check that every node was started "
                        f"with the same --nnodes/--master-addr/--master-port and can reach the master "
                        f"(YOLO_DDP_TIMEOUT sets the wait)") from None
    if not is_main():  # one console: the other ranks only report warnings and errors
        LOGGER.setLevel(logging.WARNING)
    return device


def lost_peer(e: BaseException) -> UserError | None:
    """A collective that failed because another rank died or timed out, as one clear line (None otherwise)."""
    text = str(e)
    if not is_dist() or not (isinstance(e, dist.DistError) or any(
            w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out"))):
        return None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return UserError(f"rank {rank()} of {world_size()}: lost contact with the other processes ({first[:160]}); "
                     f"another rank probably failed, see its messages (collectives wait YOLO_DDP_TIMEOUT={timeout_s():g} s)")


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (pickled between our own processes only)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_true(flag: bool) -> bool:
    """True only if `flag` is True on every rank (one all-reduce MIN); the flag itself in a single process.
    For decisions each rank makes on its own but all must share (whether AMP passed its check)."""
    if not is_dist():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def gather_objects(obj: Any) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank; [obj] in a single process."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def global_score_sum(local_sum: torch.Tensor) -> torch.Tensor:
    """The loss normaliser under DDP: clamp(sum over ranks, 1) / world size.

    Each rank's loss is multiplied by the world size W and DDP divides the summed gradients by W, so with
    this normaliser the step equals one process whose normaliser is clamp(global sum, 1)."""
    z = local_sum.detach().clone()
    if is_dist():
        dist.all_reduce(z)
    return z.clamp(min=1.0) / world_size()


def restart_run_folder(base: Path, exist_ok: bool) -> Path | None:
    """The run folder an earlier attempt of this torchrun job created: `base` with --exist-ok, else the
    highest-numbered of base, base2, base3, ... that has an opt.yaml (what increment_path handed out last)."""
    if exist_ok:
        return base if base.is_dir() else None
    if not base.parent.is_dir():
        return None
    pat = re.compile(re.escape(base.name) + r"(\d*)")
    found = []
    for p in base.parent.iterdir():
        m = pat.fullmatch(p.name)
        if m and (p / "opt.yaml").is_file():
            found.append((int(m.group(1) or 1), p))
    return max(found)[1] if found else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks (every rank's loss uses the result)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of every rank, for CPU (gloo) runs:
    torch's SyncBatchNorm (used on CUDA) refuses CPU modules. Statistics in float64 (like the CPU batch-norm
    kernel); the all-reduces are autograd-aware, so gradients flow through the shared mean and variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        xd = x.double()
        local = torch.cat((xd.sum((0, 2, 3)), xd.new_tensor([x.numel() / c])))
        total = all_reduce(local)
        n = total[-1].detach()
        mean = total[:-1] / n
        xc = xd - mean.view(1, c, 1, 1)
        var = all_reduce((xc * xc).sum((0, 2, 3))) / n
        y = xc * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / max(float(n) - 1, 1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """--sync-bn: torch's SyncBatchNorm on CUDA, CPUSyncBatchNorm otherwise. Parameters and buffers are
    the same objects, so an optimizer built before the conversion keeps working."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_bn(child, device)
    return model
