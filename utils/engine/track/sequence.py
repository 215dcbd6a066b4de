"""Tracking on inference sources: one ByteTracker state per video / stream / image folder, MOTChallenge files.

Why a separate layer: the tracker itself (utils/engine/track/bytetrack.py) knows nothing about files. This module
decides what a "sequence" is (a video file, a stream, or the images of one folder in name order), resets
the tracker whenever the sequence changes so two videos in one run never share ids, turns a frame's
detections into a `Result` that carries track ids, and writes one MOTChallenge text file per sequence.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import IO, Any

import numpy as np

from utils.engine.sources import Frame, LoadSources, is_stream
from utils.engine.track.bytetrack import ByteTracker, TrackerConfig, load_tracker_config
from utils.general import LOGGER

SEQUENCE_HINT = "tracking needs a sequence (a video, a webcam/stream or a folder of images)"


def is_single_image(dataset: LoadSources) -> bool:
    """True when the source is one still image: nothing to track across."""
    return dataset.n_videos == 0 and dataset.n_images <= 1


def sequence_key(f: Frame) -> str:
    """Videos and streams are sequences of their own; images form one sequence per folder."""
    return f.path if f.is_video else f"images:{Path(f.path).parent}"


def _sequence_name(f: Frame) -> str:
    if is_stream(f.path):
        return re.sub(r"[^\w.-]+", "_", f.path)
    p = Path(f.path)
    return p.stem if f.is_video else (p.parent.name or "images")


def with_tracks(r: Any, det_index: np.ndarray, ids: np.ndarray) -> Any:
    """Copy of a detection `Result` keeping only the tracked detections, with their `track_ids`."""
    return dataclasses.replace(r, boxes=r.boxes[det_index], scores=r.scores[det_index],
                               class_ids=r.class_ids[det_index], names=[r.names[i] for i in det_index],
                               track_ids=ids.astype(np.int64))


def mot_lines(frame: int, r: Any) -> list[str]:
    """MOTChallenge rows 'frame,id,x,y,w,h,conf,-1,-1,-1' (frame 1-based, top-left x/y and size in pixels)."""
    out = []
    for (x1, y1, x2, y2), tid, s in zip(r.boxes.tolist(), r.track_ids.tolist(), r.scores.tolist()):
        out.append(f"{frame},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{s:.4f},-1,-1,-1")
    return out


class SequenceTracker:
    """Feeds a stream of (Frame, Result) pairs to a ByteTracker, resetting it when the sequence changes.

    save_dir: when given, MOTChallenge files go to save_dir/mot/<sequence>.txt (written frame by frame).
    Frame numbers are the input video's 1-based frame positions (so --vid-stride keeps them aligned with
    the original video) and, for image folders, the 1-based position of the image in the folder's sequence.
    """

    def __init__(self, cfg: TrackerConfig | dict | str | Path | None = None, save_dir: Path | None = None):
        self.cfg = load_tracker_config(cfg)
        self.tracker = ByteTracker(self.cfg)
        self.mot_dir = Path(save_dir) / "mot" if save_dir is not None else None
        self.key: str | None = None
        self.n = 0  # frames seen in the current sequence
        self.file: IO[str] | None = None
        self.files: list[Path] = []
        self._used: set[str] = set()

    def _start(self, f: Frame) -> None:
        self.close()
        self.key, self.n = sequence_key(f), 0
        self.tracker.reset(f.video.fps if f.is_video else 30.0)
        if self.mot_dir is not None:
            name, k = _sequence_name(f), 2
            stem = name
            while name in self._used:
                name, k = f"{stem}{k}", k + 1
            self._used.add(name)
            self.mot_dir.mkdir(parents=True, exist_ok=True)
            path = self.mot_dir / f"{name}.txt"
            self.file = open(path, "w", encoding="utf-8")
            self.files.append(path)

    def step(self, f: Frame, r: Any) -> Any:
        """Track this frame's detections; returns `r` reduced to tracked boxes, with `track_ids` set."""
        if sequence_key(f) != self.key:
            self._start(f)
        self.n += 1
        idx, ids = self.tracker.update(r.boxes, r.scores, r.class_ids)
        out = with_tracks(r, idx, ids)
        if self.file is not None and len(out):
            self.file.write("\n".join(mot_lines(f.frame if f.is_video else self.n, out)) + "\n")
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            LOGGER.info(f"tracks of {self.key.removeprefix('images:')}: {self.tracker.next_id - 1} ids, "
                        f"MOT file {self.files[-1]}")
        self.file = None


def tracker_for_run(opt: Any, dataset: LoadSources) -> TrackerConfig | None:
    """detect_dual.py: the tracker config when --track (or --tracker) applies to this source, else None.

    Reads the YAML before any model is loaded, so a bad config fails fast.
    """
    if not (opt.track or opt.tracker):
        return None
    cfg = load_tracker_config(opt.tracker)
    if is_single_image(dataset):
        LOGGER.warning(f"WARNING: --track: {SEQUENCE_HINT}; running plain detection on this image")
        return None
    return cfg
