"""Persistent loader workers: dataset state changed in the main process (close_mosaic, image-weight
resampling) reaches live workers with the very next batch, without re-spawning them."""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.data import YOLODataset, create_dataloader

HYP = {"mosaic": 1.0, "mixup": 0.0, "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0,
       "perspective": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "flipud": 0.0, "fliplr": 0.0}


def _dataset(root: Path, n: int = 8) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.full((48, 64, 3), 20 * i, np.uint8))
        cls = 1 if i == 3 else 0  # image 3 is the only one with class 1
        (root / "labels" / f"{i}.txt").write_text(f"{cls} 0.5 0.5 0.4 0.4\n")
    return root / "images"


def _worker_pids(loader) -> set[int]:
    it = loader._iterator
    return {w.pid for w in it._workers} if it is not None else set()


def test_close_mosaic_reaches_persistent_workers_next_batch(tmp_path):
    loader, ds = create_dataloader(_dataset(tmp_path), 64, 2, hyp=HYP, augment=True, workers=2, shuffle=True, nc=2)
    assert loader.persistent_workers and loader.num_workers == 2
    first = list(loader)  # epoch 1: mosaic (shapes None for mosaic samples)
    assert all(s is None for b in first for s in b[3])
    pids = _worker_pids(loader)
    ds.close_mosaic()
    it = iter(loader)
    batch = next(it)  # the very next batch after the change
    assert _worker_pids(loader) == pids  # the same worker processes, not re-spawned
    assert all(s is not None for s in batch[3])  # letterbox path: no mosaic
    assert all(s is not None for b in it for s in b[3])


def test_image_weight_resampling_reaches_persistent_workers(tmp_path):
    loader, ds = create_dataloader(_dataset(tmp_path), 64, 2, hyp=HYP, augment=True, workers=2, shuffle=False,
                                   nc=2, image_weights=True)
    ds.close_mosaic()
    list(loader)  # workers are up and have the initial order
    ds.resample_image_weights(np.array([0.0, 1.0]))  # only class 1 weighs: image 3 drawn every time
    paths = [p for b in loader for p in b[2]]
    assert len(paths) == 8 and all(Path(p).name == "3.png" for p in paths)


def test_shared_state_survives_pickling(tmp_path):
    """Spawned workers receive the dataset pickled; a plain pickle keeps the values (a copy)."""
    ds = YOLODataset(_dataset(tmp_path), imgsz=64, augment=True, hyp=HYP, nc=2)
    ds.indices = np.arange(8)[::-1]
    ds.close_mosaic()
    ds2 = pickle.loads(pickle.dumps(ds))
    assert not ds2.mosaic and ds2.indices.tolist() == list(range(8))[::-1]
    assert isinstance(ds2[0][0], torch.Tensor)


def test_non_persistent_option(tmp_path):
    loader, _ = create_dataloader(_dataset(tmp_path), 64, 2, workers=2, nc=2, persistent=False)
    assert not loader.persistent_workers
