"""Multi-object tracking: Kalman filter against a reference, ByteTracker scored by motmetrics on synthetic
trajectories, per-source reset, config errors, and detect_dual.py --track outputs."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.general import UserError

W, H = 640, 480


# ---------------------------------------------------------------- synthetic ground truth and detections

def make_scene(seed: int = 0, frames: int = 120) -> dict[int, dict[int, np.ndarray]]:
    """Ground truth {frame (1-based): {object id: xyxy}} of 6 boxes: straight and curved motion, two pairs
    that cross each other, one object entering late, one leaving early, two briefly hidden (fully occluded
    frames are absent, as MOTChallenge ignores boxes with visibility 0)."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, frames + 1, dtype=np.float64)
    objs = {  # id: (cx(t), cy(t), w, h, first frame, last frame, hidden frames)
        1: (40 + 4.0 * t, 120 + 0 * t, 50, 90, 1, frames, ()),  # left -> right
        2: (600 - 4.0 * t, 140 + 0 * t, 50, 90, 1, frames, range(60, 65)),  # crosses 1 (offset rows), hidden 5 frames
        3: (320 + 150 * np.sin(t / 20), 330 + 60 * np.cos(t / 20), 70, 60, 1, frames, ()),  # ellipse
        4: (80 + 2.5 * t, 430 - 2.0 * t, 40, 40, 1, frames, range(30, 34)),  # diagonal up, hidden 4 frames
        5: (560 - 2.0 * t, 20 + 2.0 * t, 45, 45, 20, frames, ()),  # enters at frame 20, crosses 4 near frame 107
        6: (300 + 0 * t, 60 + 0.5 * t, 60, 60, 1, 90, ()),  # slow, leaves after frame 90
    }
    gt: dict[int, dict[int, np.ndarray]] = {int(f): {} for f in t}
    for oid, (cx, cy, w, h, first, last, hidden) in objs.items():
        for i, f in enumerate(t.astype(int)):
            if first <= f <= last and f not in hidden:
                gt[f][oid] = np.array([cx[i] - w / 2, cy[i] - h / 2, cx[i] + w / 2, cy[i] + h / 2])
    del rng
    return gt


def make_detections(gt: dict[int, dict[int, np.ndarray]], seed: int = 0, miss: float = 0.03, weak: float = 0.1,
                    fp_rate: float = 1.0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per frame (boxes xyxy, scores): each GT box jittered (2 % of its size on the centre, 3 % on the size),
    dropped with probability `miss`, scored low (0.15-0.45, below the first-stage threshold) with probability
    `weak`, else 0.6-0.95; plus Poisson(fp_rate) false positives of random size/place/score 0.1-0.7."""
    rng = np.random.default_rng(seed)
    out = {}
    for f, objs in gt.items():
        boxes, scores = [], []
        for b in objs.values():
            if rng.random() < miss:
                continue
            w, h = b[2] - b[0], b[3] - b[1]
            cx, cy = (b[0] + b[2]) / 2 + rng.normal(0, 0.02 * w), (b[1] + b[3]) / 2 + rng.normal(0, 0.02 * h)
            w, h = w * (1 + rng.normal(0, 0.03)), h * (1 + rng.normal(0, 0.03))
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            scores.append(rng.uniform(0.15, 0.45) if rng.random() < weak else rng.uniform(0.6, 0.95))
        for _ in range(rng.poisson(fp_rate)):
            w, h = rng.uniform(20, 80, 2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            boxes.append([x, y, x + w, y + h])
            scores.append(rng.uniform(0.1, 0.7))
        order = rng.permutation(len(boxes))  # detector output order carries no identity
        out[f] = (np.array(boxes, np.float64).reshape(-1, 4)[order], np.array(scores, np.float64)[order])
    return out


def iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent pairwise IoU (plain numpy broadcasting), not the tracker's torchvision call."""
    a, b = a[:, None, :], b[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def mot_scores(gt: dict, hyp: dict) -> dict[str, float]:
    """motmetrics MOTA / IDF1 / ID switches; distance 1 - IoU, NaN (no match allowed) where IoU < 0.5."""
    import motmetrics as mm
    acc = mm.MOTAccumulator(auto_id=True)
    for f in sorted(gt):
        g_ids, g_boxes = list(gt[f]), np.array(list(gt[f].values())).reshape(-1, 4)
        h_ids, h_boxes = list(hyp.get(f, {})), np.array(list(hyp.get(f, {}).values())).reshape(-1, 4)
        d = np.full((len(g_ids), len(h_ids)), np.nan)
        if len(g_ids) and len(h_ids):
            iou = iou_np(g_boxes, h_boxes)
            d = np.where(iou >= 0.5, 1 - iou, np.nan)
        acc.update(g_ids, h_ids, d)
    mh = mm.metrics.create()
    s = mh.compute(acc, metrics=["mota", "idf1", "num_switches", "num_false_positives", "num_misses"], name="t")
    return {k: float(s[k].iloc[0]) for k in s.columns}


def run_tracker(dets: dict, tracker) -> dict[int, dict[int, np.ndarray]]:
    hyp = {}
    for f in sorted(dets):
        boxes, scores = dets[f]
        idx, ids = tracker.update(boxes, scores)
        hyp[f] = {int(i): boxes[d] for d, i in zip(idx, ids)}
    return hyp


# ---------------------------------------------------------------- tracker quality (independent scorer)

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytetracker_mot_metrics(seed):
    from utils.engine.track.bytetrack import ByteTracker
    gt = make_scene(seed)
    hyp = run_tracker(make_detections(gt, seed=seed), ByteTracker())
    s = mot_scores(gt, hyp)
    assert s["mota"] >= 0.9 and s["idf1"] >= 0.9 and s["num_switches"] <= 2, s


def test_second_stage_recovers_low_score_detections():
    """The low-score association is what keeps weak-but-true boxes: switching it off (low = high threshold)
    loses them, so this scene separates a ByteTrack-style tracker from a single-threshold one."""
    from utils.engine.track.bytetrack import ByteTracker, TrackerConfig
    gt = make_scene(0)
    dets = make_detections(gt, seed=0, weak=0.15)
    full = mot_scores(gt, run_tracker(dets, ByteTracker()))
    single = mot_scores(gt, run_tracker(dets, ByteTracker(TrackerConfig(track_low_thresh=0.5))))
    assert full["num_misses"] < single["num_misses"] - 40, (full, single)
    assert full["mota"] >= 0.9 > single["mota"], (full, single)


def test_fresh_ids_every_frame_fail_the_scorer():
    """Scorer sanity: perfect boxes with a new id on every frame must fail the IDF1 / switch thresholds."""
    gt = make_scene(0)
    n = iter(range(1, 10 ** 6))
    hyp = {f: {next(n): b for b in objs.values()} for f, objs in gt.items()}
    s = mot_scores(gt, hyp)
    assert s["mota"] < 0.9 and s["idf1"] < 0.1 and s["num_switches"] > 100, s
    same = mot_scores(gt, gt)
    assert same["mota"] == 1.0 and same["idf1"] == 1.0 and same["num_switches"] == 0


# ---------------------------------------------------------------- Kalman filter

def test_kalman_hand_computed_step():
    """One predict + update for a 40x80 box, worked by hand (noise weights 1/20 position, 1/160 velocity):
    initial var x = (2*40/20)^2 = 16, vx = (10*40/160)^2 = 6.25; predicted var x = 16 + 6.25 + (40/20)^2 = 26.25,
    cov(x, vx) = 6.25; measurement var (40/20)^2 = 4, so gain on x = 26.25/30.25 and on vx = 6.25/30.25."""
    from utils.engine.track.bytetrack import KalmanBoxFilter
    kf = KalmanBoxFilter()
    mean, cov = kf.initiate(np.array([[100.0, 50.0, 40.0, 80.0]]))
    np.testing.assert_allclose(np.diag(cov[0]), [16, 64, 16, 64, 6.25, 25, 6.25, 25])
    mean, cov = kf.predict(mean, cov)
    np.testing.assert_allclose(mean[0], [100, 50, 40, 80, 0, 0, 0, 0])
    assert cov[0, 0, 0] == pytest.approx(26.25) and cov[0, 0, 4] == pytest.approx(6.25)
    assert cov[0, 4, 4] == pytest.approx(6.25 + 0.0625) and cov[0, 3, 3] == pytest.approx(64 + 25 + 16)
    mean, cov = kf.update(mean, cov, np.array([[110.0, 50.0, 40.0, 80.0]]))
    assert mean[0, 0] == pytest.approx(100 + 10 * 26.25 / 30.25)
    assert mean[0, 4] == pytest.approx(10 * 6.25 / 30.25)
    assert cov[0, 0, 0] == pytest.approx(26.25 * 4 / 30.25)
    np.testing.assert_allclose(mean[0, [1, 2, 3, 5, 6, 7]], [50, 40, 80, 0, 0, 0], atol=1e-12)


def test_kalman_batch_matches_textbook_reference():
    """Batched predict/update equal the textbook matrix formulas (explicit inverse) on random states."""
    from utils.engine.track.bytetrack import KalmanBoxFilter
    rng = np.random.default_rng(0)
    kf = KalmanBoxFilter(pos_weight=0.07, vel_weight=0.01)
    n = 5
    mean = np.concatenate([rng.uniform(50, 300, (n, 2)), rng.uniform(10, 90, (n, 2)), rng.normal(0, 3, (n, 4))], 1)
    a = rng.normal(size=(n, 8, 8))
    cov = a @ a.transpose(0, 2, 1) + 8 * np.eye(8)
    z = mean[:, :4] + rng.normal(0, 4, (n, 4))
    F = np.eye(8) + np.eye(8, k=4)
    Hm = np.eye(4, 8)
    m2, c2 = kf.predict(mean, cov)
    m3, c3 = kf.update(m2, c2, z)
    for i in range(n):
        s = np.r_[mean[i, 2:4], mean[i, 2:4]]
        Q = np.diag(np.r_[0.07 * s, 0.01 * s] ** 2)
        mp, Pp = F @ mean[i], F @ cov[i] @ F.T + Q
        np.testing.assert_allclose(m2[i], mp, rtol=1e-10)
        np.testing.assert_allclose(c2[i], Pp, rtol=1e-10)
        sp = np.r_[mp[2:4], mp[2:4]]
        R = np.diag((0.07 * sp) ** 2)
        K = Pp @ Hm.T @ np.linalg.inv(Hm @ Pp @ Hm.T + R)
        np.testing.assert_allclose(m3[i], mp + K @ (z[i] - Hm @ mp), rtol=1e-9)
        np.testing.assert_allclose(c3[i], (np.eye(8) - K @ Hm) @ Pp, rtol=1e-7, atol=1e-9)


def test_assign_prefers_one_good_match_over_two_poor_ones():
    from utils.engine.track.bytetrack import assign
    cost = np.array([[0.1, 0.5], [0.5, 9.0]])
    assert assign(cost, 0.8) == ([(0, 0)], [1], [1])  # 0.1 + two unmatched (0.4 each) = 0.9 < 0.5 + 0.5
    assert assign(cost, 0.95)[0] == [(0, 1), (1, 0)]  # 0.1 + 2 * 0.475 = 1.05 > 1.0: both matched
    assert assign(np.zeros((0, 3)), 0.5) == ([], [], [0, 1, 2])


def test_assign_matches_brute_force():
    """On random small matrices the matching cost equals the best of all partial matchings enumerated
    (objective: matched costs + thresh / 2 per unmatched row and column, pairs above thresh forbidden)."""
    import itertools
    from utils.engine.track.bytetrack import assign
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, m, thr = int(rng.integers(1, 5)), int(rng.integers(1, 5)), float(rng.uniform(0.3, 0.9))
        cost = rng.uniform(0, 1, (n, m))

        def total(pairs):
            return sum(cost[i, j] for i, j in pairs) + thr / 2 * (n + m - 2 * len(pairs))

        best = min(total([(i, j) for i, j in enumerate(choice) if j is not None])
                   for choice in itertools.product([None, *range(m)], repeat=n)
                   if len({j for j in choice if j is not None}) == sum(j is not None for j in choice)
                   and all(j is None or cost[i, j] <= thr for i, j in enumerate(choice)))
        matches, un_r, un_c = assign(cost, thr)
        assert total(matches) == pytest.approx(best)
        assert sorted(un_r + [i for i, _ in matches]) == list(range(n))
        assert sorted(un_c + [j for _, j in matches]) == list(range(m))


# ---------------------------------------------------------------- tracker behaviour

def _box(x: float, y: float = 50.0, s: float = 40.0) -> np.ndarray:
    return np.array([[x, y, x + s, y + s]])


def test_lost_buffer_scales_with_fps():
    """An object hidden for k frames keeps its id when k <= track_buffer * fps / 30, else gets a new one."""
    from utils.engine.track.bytetrack import ByteTracker, TrackerConfig
    cfg = TrackerConfig(track_buffer=4)
    for fps, gap, same in ((30, 4, True), (30, 5, False), (60, 8, True), (60, 9, False)):
        t = ByteTracker(cfg, fps=fps)
        first = [t.update(_box(10 + 3 * f), [0.9])[1].tolist() for f in range(5)]
        assert first == [[1]] * 5
        for _ in range(gap):
            assert t.update(np.zeros((0, 4)), [])[1].size == 0
        got = [t.update(_box(10 + 3 * f), [0.9])[1].tolist() for f in range(5 + gap, 8 + gap)]
        if same:
            assert got == [[1]] * 3, (fps, gap, got)
        else:  # new object: tentative on its first frame, confirmed with a fresh id on the second
            assert got == [[], [2], [2]], (fps, gap, got)


def test_low_scores_never_start_tracks_and_clutter_is_not_confirmed():
    from utils.engine.track.bytetrack import ByteTracker
    t = ByteTracker()
    for f in range(5):  # a persistent weak box (0.3) never becomes a track on its own
        assert t.update(_box(100), [0.3])[1].size == 0
    t.reset()
    boxes = np.concatenate([_box(10), _box(200)])
    assert t.update(boxes, [0.9, 0.55])[1].tolist() == [1]  # 0.55 < new_track_thresh 0.6: not started
    idx, ids = t.update(np.concatenate([_box(13), _box(300, 300)]), [0.9, 0.8])  # one-frame clutter at (300, 300)
    assert idx.tolist() == [0] and ids.tolist() == [1]
    idx, ids = t.update(_box(16), [0.9])
    assert ids.tolist() == [1] and t.next_id == 2  # the clutter never took an id


def test_per_class_association():
    from utils.engine.track.bytetrack import ByteTracker, TrackerConfig
    for per_class, want in ((False, [1]), (True, [])):
        t = ByteTracker(TrackerConfig(per_class=per_class))
        t.update(_box(10), [0.9], [0])
        assert t.update(_box(12), [0.9], [1])[1].tolist() == want  # same place, other class


# ---------------------------------------------------------------- config

def test_shipped_yaml_equals_defaults():
    from utils.engine.track.bytetrack import TrackerConfig, load_tracker_config
    assert load_tracker_config("bytetrack.yaml") == TrackerConfig() == load_tracker_config(None)


@pytest.mark.parametrize("text, msg", [
    ("track_high_thresh: [0.5\n", "invalid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("track_hihg_thresh: 0.5\n", "unknown key.*track_hihg_thresh"),
    ("match_thresh: 1.5\n", "match_thresh must be a number in \\[0, 1\\]"),
    ("track_buffer: 0\n", "track_buffer must be a whole number"),
    ("fuse_score: maybe\n", "fuse_score must be true or false"),
    ("track_low_thresh: 0.7\n", "track_low_thresh 0.7 is above track_high_thresh 0.5"),
])
def test_bad_tracker_yaml_is_one_clear_error(tmp_path, text, msg):
    from utils.engine.track.bytetrack import load_tracker_config
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=msg) as e:
        load_tracker_config(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_tracker_config(tmp_path / "missing.yaml")
    assert load_tracker_config(_write(tmp_path / "ok.yaml", "track_buffer: 60.0\n")).track_buffer == 60


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# ---------------------------------------------------------------- sequences, outputs, detect_dual.py

def _result(boxes: np.ndarray, path: str):
    from utils.engine.predict.predictor import Result
    n = len(boxes)
    return Result(np.asarray(boxes, np.float32).reshape(-1, 4), np.full(n, 0.9, np.float32), np.zeros(n, np.int64),
                  ["circle"] * n, (H, W), (H, W), path)


def test_sequence_tracker_resets_per_source(tmp_path):
    """Video b after video a: ids restart at 1 and b's first frame is confirmed at once (no state carried
    over, which would leave b's new boxes tentative with ids 4, 5); one MOT file per video, frames from 1."""
    from utils.engine.sources import Frame, VideoInfo
    from utils.engine.track.sequence import SequenceTracker
    seq = SequenceTracker(None, tmp_path)
    a_boxes = np.array([[10, 10, 50, 50], [100, 100, 150, 150], [300, 50, 340, 90]], float)
    b_boxes = np.array([[400, 300, 450, 350], [200, 200, 260, 240]], float)
    info = VideoInfo(30.0, W, H, 0)
    for i in range(3):
        r = seq.step(Frame("a.mp4", None, i + 1, info), _result(a_boxes + 2 * i, "a.mp4"))
        assert sorted(r.track_ids.tolist()) == [1, 2, 3]
    outs = [seq.step(Frame("b.mp4", None, i + 1, info), _result(b_boxes + i, "b.mp4")) for i in range(2)]
    seq.close()
    assert [o.track_ids.tolist() for o in outs] == [[1, 2], [1, 2]]
    assert [p.name for p in seq.files] == ["a.txt", "b.txt"]
    rows = np.loadtxt(tmp_path / "mot" / "b.txt", delimiter=",")
    assert rows.shape == (4, 10) and rows[:, 0].tolist() == [1, 1, 2, 2]
    np.testing.assert_allclose(rows[:2, 2:6], [[400, 300, 50, 50], [200, 200, 60, 40]])  # x, y, w, h pixels
    assert (rows[:, 7:] == -1).all() and np.allclose(rows[:, 6], 0.9)
    # image folders are sequences too: frame numbers count the images of each folder
    seq = SequenceTracker(None, tmp_path / "imgs")
    for d in ("s1", "s1", "s2"):
        seq.step(Frame(f"{d}/x.jpg", None, None, None), _result(a_boxes, f"{d}/x.jpg"))
    seq.close()
    assert [np.loadtxt(p, delimiter=",", ndmin=2)[:, 0].max() for p in seq.files] == [2, 1]


def test_track_ids_set_box_colour_and_label():
    from utils.engine.predict.annotate import colors, draw_boxes
    im = np.zeros((120, 160, 3), np.uint8)
    out = draw_boxes(im, np.array([[10, 40, 150, 110]]), np.array([0.8]), np.array([0]), ["circle"], 3,
                     hide_labels=True, track_ids=np.array([7]))
    assert tuple(int(v) for v in out[80, 150]) == colors(7) != colors(0)  # right edge: the id's colour
    tag = out[5:40, 10:80]  # the 'id:7' tag above the box is drawn although labels are hidden
    assert (tag == colors(7)).all(-1).sum() > 100 and (tag == 255).all(-1).sum() > 10  # fill + white text
    r = _result(np.array([[0, 0, 64, 48]]), "x")
    r.track_ids = np.array([5])
    assert r.txt_lines(save_conf=True) == ["0 0.05 0.05 0.1 0.1 0.9 5"]
    assert r.to_dict()["detections"][0]["track_id"] == 5


def _write_video(path: Path, n: int, w: int, h: int, phase: int = 0) -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    for i in range(n):
        im = np.full((h, w, 3), 70, np.uint8)
        cv2.circle(im, (16 + 6 * i, 30 + phase), 12, (0, 200, 255), -1)
        cv2.rectangle(im, (w - 30 - 5 * i, 52), (w - 8 - 5 * i, 80), (255, 80, 0), -1)
        vw.write(im)
    vw.release()
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Seeded tiny gelan-t whose class biases put its boxes at score ~0.73 (above the new-track threshold);
    untrained, so the boxes barely depend on the image: this checks the --track plumbing and file formats,
    tracking quality is scored by motmetrics above."""
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = DetectionModel("gelan-t.yaml", nc=2)
    g = torch.Generator().manual_seed(1)
    for box, cls in zip(model.head.cv2, model.head.cv3):
        box[-1].bias.data = torch.randn(box[-1].bias.shape, generator=g) * 3
        cls[-1].bias.data[:] = 1.0
    return save_checkpoint(make_checkpoint(model, names=["circle", "square"]), tmp_path_factory.mktemp("w") / "t.pt")


def _opt(weights, source, project, *extra):
    import detect_dual
    return detect_dual.parse_opt(["--weights", str(weights), "--source", str(source), "--imgsz", "128",
                                  "--max-det", "20", "--device", "cpu", "--project", str(project), *extra])


def test_detect_dual_track_end_to_end(weights, tmp_path, caplog):
    """Two videos in one run: annotated videos, labels rows 'cls xc yc w h conf id' that agree with the
    MOT rows of the same frame, one MOT file per video with ids restarting at 1."""
    torch.set_num_threads(1)
    from utils.engine.predict.predictor import run
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"a": (16, 128, 96), "b": (10, 96, 128)}
    for name, (n, w, h) in sizes.items():
        _write_video(src / f"{name}.mp4", n, w, h)
    with caplog.at_level(logging.INFO, logger="yolov9mqa"):
        save_dir = run(_opt(weights, src, tmp_path / "runs", "--track", "--save-txt", "--save-conf"))
    assert "MOT file" in caplog.text
    for name, (n, w, h) in sizes.items():
        cap = cv2.VideoCapture(str(save_dir / f"{name}.mp4"))
        frames = 0
        while cap.read()[0]:
            frames += 1
        assert frames == n
        mot = np.loadtxt(save_dir / "mot" / f"{name}.txt", delimiter=",", ndmin=2)
        assert mot.shape[1] == 10 and len(mot) and (mot[:, 7:] == -1).all()
        assert set(mot[:, 0].astype(int)) <= set(range(1, n + 1)) and mot[:, 0].min() == 1
        ids = mot[:, 1].astype(int)
        assert ids.min() == 1 and (mot[:, 1] == ids).all()
        assert ((mot[:, 2] >= -0.01) & (mot[:, 2] + mot[:, 4] <= w + 0.01)).all()
        assert ((mot[:, 3] >= -0.01) & (mot[:, 3] + mot[:, 5] <= h + 0.01)).all()
        for fr in sorted(set(mot[:, 0].astype(int))):
            rows = np.loadtxt(save_dir / "labels" / f"{name}_{fr}.txt", ndmin=2)
            assert rows.shape[1] == 7  # cls xc yc w h conf id
            m = mot[mot[:, 0] == fr]
            lab = {int(r[6]): (r[1] * w - r[3] * w / 2, r[2] * h - r[4] * h / 2, r[3] * w, r[4] * h, r[5])
                   for r in rows}
            assert sorted(lab) == sorted(m[:, 1].astype(int).tolist())
            for r in m:
                np.testing.assert_allclose(lab[int(r[1])], r[2:7], atol=0.05)


def test_predictor_track_api_and_still_image(weights, tmp_path, caplog):
    torch.set_num_threads(1)
    from utils.engine.predict.predictor import Predictor, run
    p = Predictor(weights, device="cpu", imgsz=128, conf_thres=0.25, max_det=20)
    vid = _write_video(tmp_path / "v.mp4", 6, 128, 96)
    results = list(p.track(vid))
    assert len(results) == 6 and all(r.track_ids is not None and len(r.track_ids) == len(r) for r in results)
    assert results[0].track_ids.tolist() == list(range(1, len(results[0]) + 1)) and len(results[0])
    assert p.conf_thres == 0.25  # restored after tracking at the tracker's low threshold
    # each track() call has its own tracker: the same video again gives the same ids, not continued ones
    again = list(p.track(vid))
    assert [r.track_ids.tolist() for r in again] == [r.track_ids.tolist() for r in results]

    img = tmp_path / "one.jpg"
    cv2.imwrite(str(img), np.full((96, 128, 3), 70, np.uint8))
    with caplog.at_level(logging.INFO, logger="yolov9mqa"):
        only = list(p.track(img))
        save_dir = run(_opt(weights, img, tmp_path / "runs", "--track", "--save-txt"))
    assert len(only) == 1 and only[0].track_ids is None
    assert caplog.text.count("tracking needs a sequence") == 2
    rows = np.loadtxt(save_dir / "labels" / "one.txt", ndmin=2)
    assert rows.shape[1] == 5 and not (save_dir / "mot").exists()  # plain detection rows
    # an image folder is one sequence: frames 1..3 in name order, rows 'cls xc yc w h id' without --save-conf
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"f{i}.png"), np.full((96, 128, 3), 70 + 10 * i, np.uint8))
    save_dir = run(_opt(weights, frames, tmp_path / "runs", "--track", "--save-txt"))
    mot = np.loadtxt(save_dir / "mot" / "frames.txt", delimiter=",", ndmin=2)
    assert sorted(set(mot[:, 0].astype(int))) == [1, 2, 3]
    for i in range(3):
        rows = np.loadtxt(save_dir / "labels" / f"f{i}.txt", ndmin=2)
        assert rows.shape[1] == 6 and sorted(rows[:, 5]) == sorted(mot[mot[:, 0] == i + 1, 1])


def test_cli_bad_tracker_yaml_one_error_line(weights, tmp_path, capsys):
    import detect_dual
    bad = _write(tmp_path / "bt.yaml", "track_buffer: 30\nnew_trak_thresh: 0.6\n")
    vid = _write_video(tmp_path / "v.mp4", 3, 128, 96)
    with pytest.raises(SystemExit) as e:
        detect_dual.main(["--weights", str(weights), "--source", str(vid), "--tracker", str(bad),
                          "--project", str(tmp_path / "runs")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1 and "new_trak_thresh" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_tracker_by_name_and_the_list_of_bundled_trackers(tmp_path):
    from utils.engine.track.bytetrack import TrackerConfig, load_tracker_config
    from utils.general import UserError
    assert load_tracker_config("bytetrack") == TrackerConfig()  # a name, as the docs say
    with pytest.raises(UserError, match=r"botsort: tracker config not found; .* bundled trackers: bytetrack \("):
        load_tracker_config("botsort")
