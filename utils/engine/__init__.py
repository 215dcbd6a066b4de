"""One engine for every script, grouped by job.

Shared by several jobs (this folder): ``config`` (every script's typed, read-only job), ``backend`` (one
model loader for every weight format), ``validator`` (reached by training and by val_dual.py), ``sources``
(images, videos, streams as frames), ``graphs`` (CUDA graphs / torch.compile wrappers), ``tta``
(test-time augmentation) and ``distributed`` (torch.distributed plumbing).
One package per job: ``train/`` (trainer, optimizer and EMA, autobatch, TensorBoard, --evolve search),
``predict/`` (predictor, drawing), ``track/`` (the ByteTrack algorithm and the per-sequence driver).
Imports point down only: predict -> track -> shared, train -> validator -> shared.

The main classes are importable from here without loading every job (``from utils.engine import Predictor``).
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Predictor": "utils.engine.predict.predictor",
    "Trainer": "utils.engine.train.trainer",
    "Validator": "utils.engine.validator",
    "ByteTracker": "utils.engine.track.bytetrack",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'utils.engine' has no attribute {name!r}")
