"""DataLoader factory: seeded workers, DistributedSampler (or whole rect batches) under DDP, sharded validation,
multi-scale helper."""
from __future__ import annotations

import math
import os
import random

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, distributed

from utils.general import LOGGER
from utils.threads import usable_cores

from .augment import random_imgsz
from .dataset import YOLODataset


def seed_worker(worker_id: int) -> None:
    """Give each worker distinct but reproducible python/numpy seeds derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class OneThreadWorkersLoader(DataLoader):
    """A DataLoader whose worker processes run OpenCV with one thread: the workers are the parallelism (torch
    already gives each one thread), and OpenCV's own pool in every worker would oversubscribe the cores the
    workers were sized to. The count cannot be set inside a forked worker: when the parent's pthreads pool
    has run, cv2.setNumThreads in the child waits forever on the pool's condition variables (the pool's
    threads were not forked). So the parent drops to one thread while torch forks the workers (they inherit
    it) and then restores its own count."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        n = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super()._get_iterator()
        finally:
            cv2.setNumThreads(n)


class ShardSampler(Sampler):
    """This rank's contiguous run of whole batches, no padding: rank r of W gets batches
    [ceil(r*nb/W), ceil((r+1)*nb/W)) (rank 0 always has the first ones, which it plots). Every image is seen exactly once over all ranks, each batch is exactly the
    batch one process would form (same rect shape), and rank order is the single-process order, so
    gathered validation statistics equal a single-process validation."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        nb = -(-n // batch_size)
        first, last = -(-rank * nb // world), -(-(rank + 1) * nb // world)
        self.indices = list(range(first * batch_size, min(last * batch_size, n)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RectBatchSampler(Sampler):
    """Training with --rect under DDP: rank r of W gets whole rect batches r, r+W, r+2W, ... of the single-process
    batch order, so every batch its loader forms holds images of one rect shape (a DistributedSampler interleaves
    images, and one loader batch would then mix shapes that cannot be stacked). Every rank gets ceil(nb/W)
    batches (DDP needs equal step counts): the ranks that come up short repeat batches from the start, as a
    DistributedSampler pads with samples. The one partial batch (n not a multiple of the batch size) is always
    its rank's last, so the loader's grouping of the indices stays on batch boundaries."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        self.n, self.bs, self.rank, self.world = n, batch_size, rank, world
        nb = -(-n // batch_size)
        ids = [(rank + world * j) % nb for j in range(-(-nb // world))]
        self.indices = [i for b in ids for i in range(b * batch_size, min((b + 1) * batch_size, n))]

    def set_epoch(self, epoch: int) -> None:
        """Rect batches keep their order (no shuffle), as in one process."""

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RecordingSampler(Sampler):
    """Wraps a sampler and appends the indices it hands out each epoch to <dir>/rank<R>.txt
    ("epoch i,j,k,..."): set YOLO_SAMPLER_LOG=<dir> to see which images each rank trained on."""

    def __init__(self, sampler: Sampler, folder: str, rank: int):
        self.sampler, self.file, self.epoch = sampler, os.path.join(folder, f"rank{max(rank, 0)}.txt"), 0
        os.makedirs(folder, exist_ok=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        idx = list(iter(self.sampler))
        with open(self.file, "a") as f:
            f.write(f"{self.epoch} {','.join(map(str, idx))}\n")
        return iter(idx)

    def __len__(self) -> int:
        return len(self.sampler)


def create_dataloader(path, imgsz: int, batch_size: int, stride=32, hyp: dict | None = None,
                      augment: bool = False, cache: str | bool | None = None, pad: float = 0.0,
                      rect: bool = False, rank: int = -1, workers: int = 0, image_weights: bool = False,
                      shuffle: bool = False, seed: int = 0, names: list | None = None, nc: int | None = None,
                      single_cls: bool = False, min_items: int = 0, prefix: str = "",
                      persistent: bool = True, shard: tuple[int, int] | None = None, upstream: bool = False,
                      pin_memory: bool = False) -> tuple[DataLoader, YOLODataset]:
    """Build (loader, dataset). Batches are (imgs uint8 [B,3,H,W] RGB, targets [N,6], paths, shapes).

    rank >= 0: training under DDP, a DistributedSampler over the GLOBAL rank and world size (padded, shuffled
    per epoch), or with rect a RectBatchSampler (whole rect batches per rank). shard=(rank, world): validation,
    a ShardSampler (whole batches, no padding duplicates).

    Workers are persistent (no re-spawn, re-import and re-seed at every epoch start); dataset state changed
    between epochs (close_mosaic, image-weight resampling) is held in shared memory by the dataset, so it
    reaches the live workers with the next batch requested. persistent=False restores per-epoch workers.
    upstream=True: upstream YOLOv9's image reading for training (full-size decodes, fresh mosaic partners).
    pin_memory: page-locked batches (workers > 0 only), for a consumer on a CUDA device; pinning for a CPU
    consumer only costs host memory and a copy per batch.
    """
    if isinstance(stride, (torch.Tensor, np.ndarray, list, tuple)):  # e.g. model.stride tensor([8, 16, 32])
        stride = int(max(float(x) for x in (stride.flatten().tolist() if hasattr(stride, "flatten") else stride)))
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING: rect batches are incompatible with shuffle, setting shuffle=False")
        shuffle = False
    if image_weights and rank != -1:
        LOGGER.warning(f"{prefix}WARNING: image weights are not supported with DDP, disabling them")
        image_weights = False
    # every rank builds a training (rank >= 0) or sharded validation loader: one scan per node, the rest map it
    collective = dist.is_available() and dist.is_initialized() and (rank != -1 or shard is not None)
    dataset = YOLODataset(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect,
                          image_weights=image_weights, cache=cache, single_cls=single_cls, stride=int(stride),
                          pad=pad, min_items=min_items, prefix=prefix, nc=nc, names=names, upstream=upstream,
                          collective=collective)
    batch_size = min(batch_size, len(dataset))
    world = (dist.get_world_size() if dist.is_available() and dist.is_initialized()
             else int(os.environ.get("WORLD_SIZE", 1))) if rank != -1 else 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes sharing this node's CPUs
    nw = min(usable_cores() // max(local_world, 1), batch_size if batch_size > 1 else 0, int(workers))  # affinity, quota
    if rank == -1:
        sampler = None
    elif rect:  # whole rect batches per rank: a DistributedSampler would mix shapes within a batch
        sampler = RectBatchSampler(len(dataset), batch_size, rank, world)
    else:
        sampler = distributed.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    if shard is not None and shard[1] > 1:
        sampler = ShardSampler(len(dataset), batch_size, *shard)
    if rank != -1 and os.environ.get("YOLO_SAMPLER_LOG"):  # training samplers only
        sampler = RecordingSampler(sampler, os.environ["YOLO_SAMPLER_LOG"], rank)
    gen = torch.Generator()
    gen.manual_seed(6148914691236517205 + seed + max(rank, 0))
    loader = OneThreadWorkersLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                    num_workers=nw, sampler=sampler, pin_memory=pin_memory and nw > 0,
                                    collate_fn=YOLODataset.collate_fn, worker_init_fn=seed_worker, generator=gen,
                                    drop_last=False, persistent_workers=persistent and nw > 0)
    return loader, dataset


def multi_scale(imgs: torch.Tensor, imgsz: int, stride: int = 32, low: float = 0.5, high: float = 1.5) -> torch.Tensor:
    """Resize a float batch so its long side is a random stride multiple in [low, high] * imgsz."""
    sz = random_imgsz(imgsz, stride, low, high)
    sf = sz / max(imgs.shape[2:])
    if sf == 1:
        return imgs
    ns = [math.ceil(x * sf / stride) * stride for x in imgs.shape[2:]]
    return F.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)
