"""ByteTrack-style multi-object tracker: Kalman motion model + two-stage IoU association.

Why this design: a detector run at a low threshold still finds most objects on most frames, but the
low-score boxes are mixed with false positives. Associating confident detections first and then using the
low-score ones only to extend tracks that already exist (never to start new ones) keeps identities through
partial occlusion and motion blur without inventing tracks from clutter. A constant-velocity Kalman filter
predicts where each track should be, so the IoU cost compares like with like even for moving objects, and a
lost-track buffer lets an object that vanished for a few frames come back with its old id.

Everything here is numpy + scipy (`linear_sum_assignment`); no model code, no torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import yaml

from utils.general import ROOT, UserError

TRACKER_DIR = ROOT / "data" / "trackers"


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class TrackerConfig:
    """Tracker thresholds (the keys of data/trackers/bytetrack.yaml, same defaults)."""

    track_high_thresh: float = 0.5  # first association uses detections with score >= this
    track_low_thresh: float = 0.1  # second association: scores in [low, high) extend existing tracks only
    new_track_thresh: float = 0.6  # an unmatched detection starts a track only at or above this score
    track_buffer: int = 30  # frames a lost track is kept at 30 fps (scaled by fps / 30)
    match_thresh: float = 0.8  # first association: largest accepted cost (1 - IoU, times score if fuse_score)
    low_match_thresh: float = 0.5  # second association: largest accepted cost (1 - IoU)
    new_match_thresh: float = 0.7  # tentative (one-frame-old) tracks: largest accepted cost
    fuse_score: bool = True  # scale IoU by the detection score in the first association
    per_class: bool = False  # match a track only with detections of its own class

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise UserError(f"tracker config: {f.name} must be true or false, got {v!r}")
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"tracker config: {f.name} must be a whole number >= 1, got {v!r}")
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                raise UserError(f"tracker config: {f.name} must be a number in [0, 1], got {v!r}")
        if self.track_low_thresh > self.track_high_thresh:
            raise UserError(f"tracker config: track_low_thresh {self.track_low_thresh} is above "
                            f"track_high_thresh {self.track_high_thresh}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "tracker config") -> "TrackerConfig":
        """Build from a mapping; unknown keys are an error (a misspelt key would otherwise be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "track_buffer" in d and isinstance(d["track_buffer"], float) and d["track_buffer"].is_integer():
            d = {**d, "track_buffer": int(d["track_buffer"])}
        try:
            return cls(**d)
        except UserError as e:
            raise UserError(str(e).replace("tracker config", source, 1)) from None

    def to_dict(self) -> dict:
        return asdict(self)


def load_tracker_config(path: str | Path | dict | TrackerConfig | None = None) -> TrackerConfig:
    """Read a tracker YAML (a bare name like 'bytetrack.yaml' or 'bytetrack' is looked up in data/trackers/);
    None: defaults.
    A dict of settings or a TrackerConfig is taken as it is (checked the same way)."""
    if path is None:
        return TrackerConfig()
    if isinstance(path, TrackerConfig):
        return path
    if isinstance(path, dict):
        return TrackerConfig.from_dict(path, "tracker settings")
    if not isinstance(path, (str, Path)):
        raise UserError(f"tracker={path!r}: give a tracker YAML path, a dict of settings or a TrackerConfig")
    p = Path(path)
    for bundled in (TRACKER_DIR / p.name, TRACKER_DIR / f"{p.name}.yaml"):  # 'bytetrack.yaml' or 'bytetrack'
        if not p.is_file() and bundled.is_file():
            p = bundled
    if not p.is_file():
        names = sorted(f.stem for f in TRACKER_DIR.glob("*.yaml"))
        raise UserError(f"{path}: tracker config not found; give a tracker YAML path or one of the bundled "
                        f"trackers: {', '.join(names)} (in {TRACKER_DIR})")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: invalid YAML ({first})") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a mapping of tracker settings, got {type(d).__name__}")
    return TrackerConfig.from_dict(d, str(p))


# ---------------------------------------------------------------- motion model

def xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    return np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                     b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], -1)


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    hw, hh = b[..., 2] / 2, b[..., 3] / 2
    return np.stack([b[..., 0] - hw, b[..., 1] - hh, b[..., 0] + hw, b[..., 1] + hh], -1)


class KalmanBoxFilter:
    """Constant-velocity Kalman filter on (cx, cy, w, h); state (cx, cy, w, h, vcx, vcy, vw, vh), one frame per step.

    Noise standard deviations are proportional to the box size (x terms to the width, y terms to the height),
    so a large near object may jump more pixels per frame than a small far one. All methods are batched:
    mean [N, 8], cov [N, 8, 8], measurements [N, 4].
    """

    def __init__(self, pos_weight: float = 1 / 20, vel_weight: float = 1 / 160):
        self.pos_weight, self.vel_weight = pos_weight, vel_weight
        self.F = np.eye(8)
        self.F[:4, 4:] = np.eye(4)  # x_{t+1} = x_t + v_t

    @staticmethod
    def _scale(wh: np.ndarray) -> np.ndarray:
        """[N, 4] per-coordinate size (w, h, w, h)."""
        return np.concatenate([wh, wh], -1)

    def initiate(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New tracks from measurements z [N, 4]: zero velocity, wide velocity uncertainty."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 4)
        mean = np.concatenate([z, np.zeros_like(z)], -1)
        s = self._scale(z[:, 2:])
        std = np.concatenate([2 * self.pos_weight * s, 10 * self.vel_weight * s], -1)
        return mean, np.einsum("ni,ij->nij", std ** 2, np.eye(8))

    def predict(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step ahead: mean' = F mean, cov' = F cov F^T + Q (Q from the current box size)."""
        s = self._scale(mean[:, 2:4])
        q = np.concatenate([self.pos_weight * s, self.vel_weight * s], -1) ** 2
        mean = mean @ self.F.T
        cov = self.F @ cov @ self.F.T + np.einsum("ni,ij->nij", q, np.eye(8))
        return mean, cov

    def update(self, mean: np.ndarray, cov: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correct with measurements z [N, 4] (H = [I 0]): gain K = P H^T S^-1, S = H P H^T + R."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 4)
        r = (self.pos_weight * self._scale(mean[:, 2:4])) ** 2
        S = cov[:, :4, :4] + np.einsum("ni,ij->nij", r, np.eye(4))
        PHt = cov[:, :, :4]  # [N, 8, 4]
        K = np.linalg.solve(S, PHt.transpose(0, 2, 1)).transpose(0, 2, 1)  # S symmetric: K^T = S^-1 H P
        mean = mean + np.einsum("nij,nj->ni", K, z - mean[:, :4])
        cov = cov - K @ S @ K.transpose(0, 2, 1)
        return mean, (cov + cov.transpose(0, 2, 1)) / 2


# ---------------------------------------------------------------- tracks and association

NEW, TRACKED, LOST, REMOVED = range(4)


class Track:
    """One object hypothesis: Kalman state, last score/class, and bookkeeping (id is 0 until confirmed)."""

    __slots__ = ("mean", "cov", "score", "cls", "id", "state", "last_frame", "start_frame", "det_index")

    def __init__(self, mean: np.ndarray, cov: np.ndarray, score: float, cls: int, frame: int, det_index: int):
        self.mean, self.cov = mean, cov
        self.score, self.cls = score, cls
        self.id = 0
        self.state = NEW
        self.last_frame = self.start_frame = frame
        self.det_index = det_index  # index of the detection matched on last_frame

    @property
    def xyxy(self) -> np.ndarray:
        return cxcywh_to_xyxy(self.mean[:4])

    def __repr__(self) -> str:
        state = ("new", "tracked", "lost", "removed")[self.state]
        return f"Track(id={self.id}, {state}, box={np.round(self.xyxy, 1).tolist()}, score={self.score:.2f})"


def assign(cost: np.ndarray, thresh: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Minimum-cost matching where leaving a row or column unmatched costs thresh / 2; pairs costlier than
    thresh are never matched.

    That objective equals maximising the sum of (thresh - cost) over matched pairs, so it is solved as one
    rectangular assignment on min(cost - thresh, 0) (infeasible pairs weigh 0, like leaving both unmatched)
    over the rows/columns that have any feasible pair. Unlike plain rectangular assignment on the costs,
    it matches fewer pairs when that is cheaper (one good match beats two poor ones).
    Returns (matches [(row, col)], unmatched rows, unmatched cols).
    """
    n, m = cost.shape
    ok = cost <= thresh
    rows, cols = np.flatnonzero(ok.any(1)), np.flatnonzero(ok.any(0))
    matches: list[tuple[int, int]] = []
    if len(rows):
        sub = cost[np.ix_(rows, cols)]
        from scipy.optimize import linear_sum_assignment  # here: detection without --track starts without scipy
        r, c = linear_sum_assignment(np.where(sub <= thresh, sub - thresh, 0.0))
        matches = [(int(rows[i]), int(cols[j])) for i, j in zip(r, c) if sub[i, j] <= thresh]
    mr, mc = {i for i, _ in matches}, {j for _, j in matches}
    return matches, [i for i in range(n) if i not in mr], [j for j in range(m) if j not in mc]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes [N, 4] x [M, 4].

    Plain numpy rather than torchvision.ops.box_iou: on these small matrices torch's intra-op threads cost
    more than the arithmetic (200x200 on a busy 2-core machine: 1-26 ms with torch vs under 1 ms here).
    """
    a, b = np.asarray(a, np.float64)[:, None, :], np.asarray(b, np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class ByteTracker:
    """Multi-object tracker for one sequence; call `update` once per frame, `reset` between sequences.

    fps scales the lost-track buffer: track_buffer is in frames at 30 fps, so a 60 fps video keeps a lost
    track for twice as many frames (the same wall-clock time).
    """

    def __init__(self, cfg: TrackerConfig | None = None, fps: float = 30.0):
        self.cfg = cfg or TrackerConfig()
        self.kf = KalmanBoxFilter()
        self.reset(fps)

    def reset(self, fps: float | None = None) -> None:
        """Forget every track and restart ids at 1 (a new video or image sequence)."""
        if fps is not None:
            self.fps = float(fps) if fps and fps > 0 else 30.0
        self.max_lost = max(1, int(round(self.fps / 30.0 * self.cfg.track_buffer)))
        self.tracks: list[Track] = []  # NEW, TRACKED and LOST; REMOVED ones are dropped
        self.frame = 0
        self.next_id = 1

    # -- helpers
    def _confirm(self, t: Track) -> None:
        t.state = TRACKED
        if not t.id:
            t.id = self.next_id
            self.next_id += 1

    def _predict(self, tracks: list[Track]) -> None:
        if not tracks:
            return
        mean = np.stack([t.mean for t in tracks])
        cov = np.stack([t.cov for t in tracks])
        lost = np.array([t.state == LOST for t in tracks])
        mean[lost, 6:8] = 0  # a lost box keeps drifting with its centre velocity but stops growing/shrinking
        mean, cov = self.kf.predict(mean, cov)
        mean[:, 2:4] = np.maximum(mean[:, 2:4], 1e-3)
        for t, m, c in zip(tracks, mean, cov):
            t.mean, t.cov = m, c

    def _cost(self, tracks: list[Track], boxes: np.ndarray, scores: np.ndarray, cls: np.ndarray,
              fuse: bool) -> np.ndarray:
        if not tracks or not len(boxes):
            return np.zeros((len(tracks), len(boxes)))
        sim = iou_matrix(cxcywh_to_xyxy(np.stack([t.mean[:4] for t in tracks])), boxes)
        if fuse:
            sim = sim * scores[None, :]
        cost = 1.0 - sim
        if self.cfg.per_class:
            cost[np.array([t.cls for t in tracks])[:, None] != cls[None, :]] = np.inf
        return cost

    def _match(self, tracks: list[Track], idx: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
               cls: np.ndarray, thresh: float, fuse: bool) -> tuple[list[int], np.ndarray]:
        """Associate `tracks` with detections `idx`, Kalman-update the matched ones.

        Returns (positions in `tracks` left unmatched, detection indices left unmatched).
        """
        cost = self._cost(tracks, boxes[idx], scores[idx], cls[idx], fuse)
        matches, un_t, un_d = assign(cost, thresh)
        if matches:
            ti = [r for r, _ in matches]
            di = idx[[c for _, c in matches]]
            mean, cov = self.kf.update(np.stack([tracks[i].mean for i in ti]), np.stack([tracks[i].cov for i in ti]),
                                       xyxy_to_cxcywh(boxes[di]))
            for i, d, m, c in zip(ti, di, mean, cov):
                t = tracks[i]
                t.mean, t.cov = m, c
                t.score, t.cls, t.det_index = float(scores[d]), int(cls[d]), int(d)
                t.last_frame = self.frame
                if t.state == LOST:
                    t.state = TRACKED  # re-found: keeps its id
        return un_t, idx[un_d]

    # -- main step
    def update(self, boxes: np.ndarray, scores: np.ndarray, cls: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Advance one frame with this frame's detections (xyxy pixels, scores, optional class ids).

        Returns (det_index, track_id), both int64 [K]: which detections belong to a confirmed track this
        frame, and that track's id. Detections not returned are clutter or not yet confirmed.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        cls = np.zeros(len(boxes), np.int64) if cls is None else np.asarray(cls, dtype=np.int64).reshape(-1)
        if not len(scores) == len(boxes) == len(cls):
            raise ValueError(f"update: {len(boxes)} boxes, {len(scores)} scores, {len(cls)} classes")
        c = self.cfg
        self.frame += 1
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes).all(1)
        high = np.flatnonzero(valid & (scores >= c.track_high_thresh))
        low = np.flatnonzero(valid & (scores >= c.track_low_thresh) & (scores < c.track_high_thresh))

        tentative = [t for t in self.tracks if t.state == NEW]
        pool = [t for t in self.tracks if t.state in (TRACKED, LOST)]
        self._predict(self.tracks)

        # 1) confirmed and lost tracks <-> confident detections
        un_t, high_left = self._match(pool, high, boxes, scores, cls, c.match_thresh, c.fuse_score)
        # 2) still-unmatched tracks that were visible last frame <-> low-score detections
        rest = [pool[i] for i in un_t if pool[i].state == TRACKED]
        un_r, _ = self._match(rest, low, boxes, scores, cls, c.low_match_thresh, False)
        for i in un_r:
            rest[i].state = LOST
        # 3) tentative tracks (seen once) <-> confident detections nobody claimed: a second hit confirms them
        un_n, high_left = self._match(tentative, high_left, boxes, scores, cls, c.new_match_thresh, c.fuse_score)
        for i, t in enumerate(tentative):
            if i in un_n:
                t.state = REMOVED
            else:
                self._confirm(t)
        # 4) leftover confident detections start tracks (confirmed at once on a sequence's first frame)
        starts = high_left[scores[high_left] >= c.new_track_thresh]
        if len(starts):
            mean, cov = self.kf.initiate(xyxy_to_cxcywh(boxes[starts]))
            for d, m, cv in zip(starts, mean, cov):
                t = Track(m, cv, float(scores[d]), int(cls[d]), self.frame, int(d))
                if self.frame == 1:
                    self._confirm(t)
                self.tracks.append(t)
        # 5) forget tracks lost for longer than the buffer
        for t in self.tracks:
            if t.state == LOST and self.frame - t.last_frame > self.max_lost:
                t.state = REMOVED
        self.tracks = [t for t in self.tracks if t.state != REMOVED]

        out = [(t.det_index, t.id) for t in self.tracks if t.state == TRACKED and t.last_frame == self.frame]
        out.sort(key=lambda p: p[0])
        arr = np.array(out, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    @property
    def active(self) -> list[Track]:
        """Confirmed tracks currently visible (not lost)."""
        return [t for t in self.tracks if t.state == TRACKED]
