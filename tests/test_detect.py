"""Inference: sources, Predictor API, detect_dual.py outputs (images, videos, labels, crops) and error lines."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import limit, seeded_tiny_checkpoint
from utils.general import ROOT, UserError

NAMES = ["circle", "square", "cross"]
IMGSZ = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return seeded_tiny_checkpoint(tmp_path_factory.mktemp("w") / "tiny.pt", NAMES)


@pytest.fixture(scope="module")
def predictor(weights):
    from utils.engine.predict.predictor import Predictor
    return Predictor(weights, device="cpu", imgsz=IMGSZ, conf_thres=0.1, iou_thres=0.45, max_det=50)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = np.full((h, w, 3), 90, np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.circle(im, (x, y), int(rng.integers(5, 30)), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return im


def _opt(weights, source, project, *extra):
    import detect_dual
    return detect_dual.parse_opt(["--weights", str(weights), "--source", str(source), "--imgsz", str(IMGSZ),
                                  "--conf-thres", "0.1", "--max-det", "50", "--device", "cpu",
                                  "--project", str(project), *extra])


# ---------------------------------------------------------------- sources

def test_sources_kinds_and_errors(tmp_path):
    from utils.engine.sources import LoadSources, preprocess_image, resolve_source
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"a{i}.png"), _image(40, 60, i))
    (d / "notes.md").write_text("not an image")
    assert len(resolve_source(d)[0]) == 3
    assert len(resolve_source(str(d / "a*.png"))[0]) == 3
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/a0.png\n\n" + str(d / "a2.png") + "\n")
    items = [f.path for f in LoadSources(lst)]
    assert [Path(p).name for p in items] == ["a0.png", "a2.png"]
    path, im0, frame, info = next(iter(LoadSources(d / "a1.png")))
    assert im0.shape == (40, 60, 3) and frame is None and info is None

    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, msg in ((tmp_path / "nope", "not found"), (empty, "no images or videos"),
                     (str(tmp_path / "*.jpg"), "no images or videos")):
        with pytest.raises(UserError, match=msg):
            LoadSources(bad)
    bad_vid = tmp_path / "broken.mp4"
    bad_vid.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="broken.mp4: cannot open video"):
        list(LoadSources(bad_vid))
    LoadSources("rtsp://example.invalid/stream")  # constructing does not contact it

    # minimal rectangular padding: long side = imgsz, short side padded only to a stride multiple
    img, ((rh, rw), (pw, ph)) = preprocess_image(np.zeros((50, 300, 3), np.uint8), 128, 32)
    assert img.shape == (3, 32, 128) and abs(rw - 128 / 300) < 1e-9 and pw == 0 and ph == (32 - 21) // 2


# ---------------------------------------------------------------- Predictor API

def test_predict_matches_independent_letterbox_reference(predictor):
    """Boxes of an image needing only padding equal the raw model boxes on a hand-padded image, shifted back."""
    from utils.nms import non_max_suppression
    im = _image(100, 128, seed=3)  # width == imgsz: no resize, pad height 100 -> 128 (top 14)
    r = predictor.predict(im)
    assert len(r) > 0 and r.input_shape == (128, 128)
    padded = cv2.copyMakeBorder(im, 14, 14, 0, 0, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    x = torch.from_numpy(padded[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    det = non_max_suppression(predictor.backend(x), 0.1, 0.45, max_det=50)[0].numpy()
    ref = det[:, :4].copy()
    ref[:, [1, 3]] -= 14
    ref[:, [1, 3]] = ref[:, [1, 3]].clip(0, 100)
    ref[:, [0, 2]] = ref[:, [0, 2]].clip(0, 128)
    np.testing.assert_allclose(r.boxes, ref, atol=1e-3)
    np.testing.assert_allclose(r.scores, det[:, 4], atol=1e-5)
    assert r.class_ids.dtype.kind == "i" and r.names == [NAMES[c] for c in r.class_ids]
    d = r.to_dict()
    assert len(d["detections"]) == len(r) and d["orig_shape"] == [100, 128]
    assert np.array_equal(r.xyxy, r.boxes)


def test_predict_downscaled_image_is_scaled_reference(predictor):
    """A 256x256 image at imgsz 128 gives exactly 2x the boxes of its INTER_AREA half-size copy."""
    im = _image(256, 256, seed=4)
    small = cv2.resize(im, (128, 128), interpolation=cv2.INTER_AREA)
    r_big, r_small = predictor.predict(im), predictor.predict(small)
    assert len(r_big) == len(r_small) > 0
    np.testing.assert_allclose(r_big.boxes, r_small.boxes * 2, atol=1e-3)


@pytest.mark.parametrize("shape", [(30, 400), (400, 30), (17, 129), (1, 5)])
def test_extreme_aspect_ratios_stay_inside(predictor, shape):
    h, w = shape
    r = predictor.predict(_image(h, w, seed=h + w))
    assert max(r.input_shape) == IMGSZ and all(s % 32 == 0 for s in r.input_shape)
    assert r.boxes.shape[1:] == (4,)
    if len(r):
        assert (r.boxes[:, [0, 2]] >= 0).all() and (r.boxes[:, [0, 2]] <= w).all()
        assert (r.boxes[:, [1, 3]] >= 0).all() and (r.boxes[:, [1, 3]] <= h).all()
        assert (r.boxes[:, 2] >= r.boxes[:, 0]).all() and (r.boxes[:, 3] >= r.boxes[:, 1]).all()


def test_classes_filter(weights, predictor):
    from utils.engine.predict.predictor import Predictor
    im = _image(96, 128, seed=5)
    full = predictor.predict(im)
    only = Predictor(weights, device="cpu", imgsz=IMGSZ, conf_thres=0.1, max_det=50, classes=[1]).predict(im)
    assert set(full.class_ids.tolist()) - {1}, "reference should contain other classes too"
    assert (only.class_ids == 1).all()
    np.testing.assert_allclose(only.boxes, full.boxes[full.class_ids == 1], atol=1e-4)


def test_predict_path_and_tta(weights, tmp_path):
    from utils.engine.predict.predictor import Predictor
    f = tmp_path / "x.jpg"
    cv2.imwrite(str(f), _image(70, 110, 6))
    p = Predictor(weights, device="cpu", imgsz=IMGSZ, conf_thres=0.1, augment=True)
    r = p.predict(f)
    assert r.path == str(f) and r.orig_shape == (70, 110)
    if len(r):
        assert (r.boxes[:, [0, 2]] <= 110).all() and (r.boxes[:, [1, 3]] <= 70).all()
    with pytest.raises(UserError):
        p.predict(tmp_path / "missing.jpg")


def test_valid_sizes_do_not_warn(weights, caplog):
    """A size that already is a multiple of the stride (as a tuple or a list) is used without a warning."""
    from utils.engine.predict.predictor import Predictor
    from utils.general import check_img_size
    caplog.set_level(logging.WARNING)
    assert check_img_size((128, 96), 32) == [128, 96] and check_img_size([128, 96], 32) == [128, 96]
    assert Predictor(weights, device="cpu", imgsz=(128, 96)).imgsz == (128, 96)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert check_img_size((100, 96), 32) == [128, 96] and "using [128, 96]" in caplog.text  # a real change warns


def test_predictor_reads_unambiguous_inputs_and_refuses_the_rest(weights, predictor, tmp_path):
    from utils.engine.predict.predictor import Predictor
    im = _image(96, 160, seed=8)
    ref = predictor.predict(im)
    assert len(ref) > 0
    # the same picture as float 0..1, float 0..255, uint16, gray [h, w, 1]: read as the uint8 image
    for x in (im.astype(np.float32) / 255, im.astype(np.float64), im.astype(np.uint16) * 257):
        r = predictor.predict(x)
        np.testing.assert_allclose(r.boxes, ref.boxes, atol=1e-4)
        np.testing.assert_allclose(r.scores, ref.scores, atol=1e-6)
    gray = cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)
    np.testing.assert_allclose(predictor.predict(gray[..., None]).boxes, predictor.predict(gray).boxes, atol=1e-4)
    for x, words in ((im.transpose(2, 0, 1), "channels-first"), (np.zeros((0, 0, 3), np.uint8), "shape (0, 0, 3)"),
                     (im.astype(np.float32) * 10, "expected 0..1 or 0..255"), (im[..., :2], "shape (96, 160, 2)"),
                     ("not an array".split(), "got list")):
        with pytest.raises(UserError, match=re.escape(words)):
            predictor.predict(x)
    # numeric sizes in any spelling; class ids as integers in range
    assert Predictor(weights, device="cpu", imgsz=128.0).imgsz == (128, 128)
    assert Predictor(weights, device="cpu", imgsz="128").imgsz == (128, 128)
    assert Predictor(weights, device="cpu", imgsz=IMGSZ, classes=2).classes == [2]
    for kw, words in ((dict(imgsz=128.5), "whole numbers"), (dict(imgsz="big"), "whole numbers"),
                      (dict(classes="1"), "give class ids as integers"), (dict(classes=[3]), "classes 0..2")):
        with pytest.raises(UserError, match=words):
            Predictor(weights, device="cpu", **kw)
    # track(): a sequence source, a tracker YAML / dict / TrackerConfig, a positive frame stride
    folder = tmp_path / "seq"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.roll(im, 4 * i, axis=1))
    tracked = list(predictor.track(folder, tracker={"track_high_thresh": 0.2, "new_track_thresh": 0.2}))
    assert len(tracked) == 3 and all(r.track_ids is not None for r in tracked) and len(tracked[-1]) > 0
    for kw, words in ((dict(source=im), "Predictor.predict takes image arrays"),
                      (dict(source=folder, tracker=5), "tracker=5: give a tracker YAML path"),
                      (dict(source=folder, tracker={"track_hi": 0.3}), "unknown key(s) track_hi"),
                      (dict(source=folder, vid_stride=0), "--vid-stride 0: must be a whole number >= 1")):
        with pytest.raises(UserError, match=re.escape(words)):
            list(predictor.track(**kw))
    from utils.engine.predict.predictor import run
    with pytest.raises(UserError, match="--vid-stride -1: must be a whole number >= 1"):  # detect_dual.py too
        run(_opt(weights, folder, tmp_path / "runs", "--vid-stride", "-1"))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- detect_dual.py

def test_folder_with_corrupt_file_txt_crops(weights, predictor, tmp_path, caplog):
    from utils.engine.predict.predictor import run
    src = tmp_path / "src"
    src.mkdir()
    shapes = {"wide": (40, 200), "tall": (200, 40), "mid": (90, 120)}
    for i, (stem, (h, w)) in enumerate(shapes.items()):
        cv2.imwrite(str(src / f"{stem}.jpg"), _image(h, w, 10 + i))
    (src / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    with caplog.at_level(logging.INFO, logger="yolov9mqa"):
        save_dir = run(_opt(weights, src, tmp_path / "runs", "--save-txt", "--save-conf", "--save-crop"))
    log = caplog.text
    assert "corrupt.jpg" in log and "cannot decode image" in log
    named = [r.getMessage() for r in caplog.records if "corrupt.jpg" in r.getMessage()]
    assert len(named) == 1, named  # each skip said once (the summary counts, it does not repeat)
    assert "WARNING: 1 of 4 files skipped (named above)" in log
    assert "Speed:" in log and "Results saved to" in log and "image 2/4" in log  # corrupt.jpg is item 1 of 4
    assert save_dir == tmp_path / "runs" / "exp"
    for stem, (h, w) in shapes.items():
        out = cv2.imread(str(save_dir / f"{stem}.jpg"))
        assert out is not None and out.shape[:2] == (h, w)
        ref = predictor.predict(cv2.imread(str(src / f"{stem}.jpg")))
        lines = (save_dir / "labels" / f"{stem}.txt").read_text().split() if len(ref) else []
        rows = np.array(lines, float).reshape(-1, 6)
        assert len(rows) == len(ref)
        xc, yc, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        back = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1)
        np.testing.assert_allclose(back, ref.boxes, atol=1.0)
        np.testing.assert_array_equal(rows[:, 0].astype(int), ref.class_ids)
        np.testing.assert_allclose(rows[:, 5], ref.scores, atol=1e-4)
    assert not (save_dir / "corrupt.jpg").exists()
    crops = list((save_dir / "crops").rglob("*.jpg"))
    assert crops and all(c.parent.name in NAMES for c in crops)
    # second run increments exp -> exp2, --classes filters the labels, --nosave writes no images
    save2 = run(_opt(weights, src, tmp_path / "runs", "--save-txt", "--classes", "0", "--nosave"))
    assert save2.name == "exp2" and not list(save2.glob("*.jpg"))
    for f in (save2 / "labels").glob("*.txt"):
        assert {line.split()[0] for line in f.read_text().splitlines()} == {"0"}


def test_video_same_frames_size_fps(weights, tmp_path, caplog):
    from utils.engine.predict.predictor import run
    vid = tmp_path / "clip.mp4"
    w, h, fps, n = 160, 96, 12, 20
    vw = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for i in range(n):
        im = np.full((h, w, 3), 60, np.uint8)
        cv2.circle(im, (10 + 6 * i, 48), 15, (0, 200, 255), -1)
        vw.write(im)
    vw.release()
    from utils.engine.sources import LoadSources
    got = [(f.frame, f.im0.shape, f.video.fps, f.video.frames) for f in LoadSources(vid, vid_stride=3)]
    assert [g[0] for g in got] == list(range(1, n + 1, 3))  # positions in the input video
    assert all(g[1] == (h, w, 3) and abs(g[2] - fps) < 1e-3 and g[3] == 7 for g in got)
    with caplog.at_level(logging.INFO, logger="yolov9mqa"):
        save_dir = run(_opt(weights, vid, tmp_path / "runs", "--save-txt"))
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert cap.isOpened()
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (w, h)
    assert abs(cap.get(cv2.CAP_PROP_FPS) - fps) < 1e-3
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == n
    labels = sorted((save_dir / "labels").glob("clip_*.txt"))
    assert labels and {int(f.stem.split("_")[1]) for f in labels} <= set(range(1, n + 1))
    assert "20 frames" in caplog.text


def test_cli_source_errors_are_one_line(weights, tmp_path):
    """Missing source and empty folder: exit code 1, exactly one 'ERROR:' line, no traceback, no run folder.
    Both CLI runs start together (interpreter start-up dominates)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for src in (tmp_path / "nothing_here", empty):
        cmd = [sys.executable, str(ROOT / "detect_dual.py"), "--weights", str(weights), "--source", str(src),
               "--project", str(tmp_path / "runs")]
        procs[src] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                      env=env)
    for src, proc in procs.items():
        _, stderr = proc.communicate(timeout=limit(180))
        assert proc.returncode != 0
        assert "Traceback" not in stderr
        err = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
        assert len(err) == 1 and str(src) in err[0], stderr
    assert not (tmp_path / "runs").exists()


def test_background_io_only_with_several_cores(monkeypatch, tmp_path):
    """Decode/encode threads with 2+ usable cores; on one core they run inline; an explicit choice is kept."""
    from utils.engine import sources
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    for cores, expect in (({0}, False), ({0, 1}, True)):
        monkeypatch.setattr(sources.os, "sched_getaffinity", lambda pid, c=cores: c, raising=False)
        assert sources.background_io() is expect
        assert sources.LoadSources(str(tmp_path)).threaded is expect  # the default follows the cores
        assert sources.LoadSources(str(tmp_path), threaded=not expect).threaded is (not expect)
