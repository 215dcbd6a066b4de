"""Detection on images, folders, videos and streams: the `Predictor` Python API and `run(opt)` for detect_dual.py.

The model is loaded once through `Backend` (dual-head models give their main branch). Preprocessing is the
validation letterbox with minimal rectangular padding; boxes are mapped back to original-image pixels with
the exact ratio and padding the letterbox used. Sequences (videos, streams, folders) go through
`Predictor.stream`: frames in flight on worker threads, results in input order (utils/engine/predict/stream.py).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import scale_boxes, xyxy2xywhn
from utils.checkpoint import find_newest
from utils.engine.predict.annotate import draw_boxes, save_one_box
from utils.engine.backend import Backend
from utils.engine.config import PredictJob
from utils.engine.predict.stream import ordered_map
from utils.engine.sources import (BackgroundCalls, Frame, LoadSources, as_bgr_uint8, is_stream, letterbox_tensor,
                                  read_image)
from utils.engine.track.sequence import SEQUENCE_HINT, SequenceTracker, is_single_image, tracker_for_run
from utils.engine.tta import forward_augment
from utils.general import LOGGER, UserError, check_img_size, image_hw, increment_path
from utils.nms import non_max_suppression
from utils.threads import MAX_FRAME_WORKERS
from utils.torch_utils import select_device, sync


def _plural(name: str, n: int) -> str:
    if n == 1:
        return name
    return name + ("es" if re.search(r"(s|x|z|ch|sh)$", name) else "s")


@dataclass
class Result:
    """Detections for one image, in original-image pixels.

    boxes float32 [n,4] xyxy, scores float32 [n], class_ids int64 [n], names: class name of each box.
    speed: milliseconds spent in pre-process, inference and NMS for this image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    names: list[str]
    orig_shape: tuple[int, int]  # (h, w)
    input_shape: tuple[int, int]  # (h, w) of the letterboxed network input
    path: str | None = None
    speed: dict[str, float] = field(default_factory=dict)
    track_ids: np.ndarray | None = None  # int64 [n] from Predictor.track / --track; None for plain detection

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def xyxy(self) -> np.ndarray:
        return self.boxes

    @property
    def xywhn(self) -> np.ndarray:
        """Normalised centre boxes (the --save-txt format)."""
        h, w = self.orig_shape
        return xyxy2xywhn(self.boxes.astype(np.float64), w=w, h=h)

    def summary(self) -> str:
        """'2 circles, 1 star' (classes in id order) or '(no detections)'."""
        if not len(self):
            return "(no detections)"
        parts = []
        for c in np.unique(self.class_ids):
            n = int((self.class_ids == c).sum())
            parts.append(f"{n} {_plural(self.names[int(np.argmax(self.class_ids == c))], n)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable)."""
        dets = [{"box": [float(v) for v in b], "score": float(s), "class_id": int(c), "name": n}
                for b, s, c, n in zip(self.boxes, self.scores, self.class_ids, self.names)]
        if self.track_ids is not None:
            for d, t in zip(dets, self.track_ids):
                d["track_id"] = int(t)
        return {"path": self.path, "orig_shape": list(self.orig_shape), "detections": dets}

    def txt_lines(self, save_conf: bool = False) -> list[str]:
        """Lines 'cls xc yc w h [conf] [track_id]' (box normalised to the original image; id when tracking)."""
        out = []
        tids = [None] * len(self) if self.track_ids is None else self.track_ids.tolist()
        for c, xywh, s, t in zip(self.class_ids, self.xywhn, self.scores, tids):
            vals = (int(c), *(float(v) for v in xywh)) + ((float(s),) if save_conf else ())
            vals += (t,) if t is not None else ()
            out.append(" ".join(f"{v:g}" for v in vals))
        return out

    def plot(self, im0: np.ndarray, line_width: int | None = 3, hide_labels: bool = False,
             hide_conf: bool = False, class_names: list[str] | None = None) -> np.ndarray:
        """Annotated copy of the original image."""
        names = class_names or _names_by_id(self)
        return draw_boxes(im0.copy(), self.boxes, self.scores, self.class_ids, names, line_width, hide_labels,
                          hide_conf, self.track_ids)


def _names_by_id(r: Result) -> list[str]:
    n = int(r.class_ids.max()) + 1 if len(r) else 0
    names = [str(i) for i in range(n)]
    for c, name in zip(r.class_ids, r.names):
        names[int(c)] = name
    return names



def _class_ids(classes: Any, nc: int) -> list[int] | None:
    """classes=None, one id or a list of ids -> a list of ids within the model's 0..nc-1, or one clear error."""
    if classes is None:
        return None
    items = [classes] if isinstance(classes, (int, np.integer)) else classes
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise UserError(f"classes={classes!r}: give class ids as integers, e.g. classes=[0, 2]")
    ids = list(items)
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in ids):
        raise UserError(f"classes={classes!r}: give class ids as integers, e.g. classes=[0, 2]")
    bad = [int(c) for c in ids if not 0 <= c < nc]
    if bad:
        raise UserError(f"--classes {bad}: the model has classes 0..{nc - 1}")
    return [int(c) for c in ids]



class Predictor:
    """Load a detector once and run it on single images (`predict`) or as the engine of detect_dual.py.

    imgsz: int or (h, w) upper bound of the network input; each image is letterboxed to fit with minimal
    (stride-multiple) padding. classes: keep only these class ids. names: override class names.
    cuda_graph: 'capture' (or True) / 'compile' replays CUDA graphs for repeated input shapes (utils/engine/graphs.py).
    main_only: run dual-head .pt models without their auxiliary branch (same boxes, less compute).
    workers: frames `stream` infers at once on worker threads (None: `frame_workers()` decides; 0: one after
    another in the calling thread).
    """

    def __init__(self, weights: str | Path | torch.nn.Module, device: str = "", imgsz: int | tuple | None = None,
                 conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000,
                 classes: list[int] | None = None, agnostic: bool = False, half: bool = False,
                 augment: bool = False, names: list[str] | None = None, cuda_graph: str | bool | None = None,
                 main_only: bool = True, workers: int | None = None):
        if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
            raise UserError(f"--conf-thres {conf_thres} and --iou-thres {iou_thres} must lie in [0, 1]")
        if max_det < 1:
            raise UserError(f"--max-det {max_det}: must be at least 1")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise UserError(f"workers={workers!r}: give a whole number >= 0 (frames inferred at once on worker "
                            f"threads; 0: in the calling thread)")
        if imgsz is not None:
            image_hw(imgsz)  # 0, negative or non-whole sizes: one error before the weights load
        self.device = select_device(device)
        self.backend = Backend(weights, self.device, half=half, fuse=True, main_only=main_only)
        self.backend.use_cuda_graph(cuda_graph)
        self.stride = int(self.backend.stride)
        fixed = self.backend.fixed_imgsz
        if fixed:  # exported files run at their export size only
            asked = image_hw(imgsz) if imgsz is not None else tuple(fixed)
            if asked != tuple(fixed) and max(asked) != max(fixed):
                LOGGER.warning(f"WARNING: {weights} was exported at {fixed[0]}x{fixed[1]}; running at that size "
                               f"(--imgsz {asked[0]} {asked[1]} ignored; export with --dynamic to choose the size "
                               f"at run time)")
            imgsz = tuple(fixed)
        elif imgsz is None:  # default: the size the checkpoint was trained at, else 640
            imgsz = self.backend.default_imgsz()
        sz = image_hw(imgsz)
        self.imgsz = tuple(check_img_size(sz, self.stride))
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.classes = _class_ids(classes, self.backend.nc)
        self.agnostic = agnostic
        self.names = list(names) if names else list(self.backend.names)
        self.augment = bool(augment)
        if self.augment and not self.backend.pt:
            LOGGER.warning("WARNING: --augment is not supported for this weights format (fixed input shape), ignored")
            self.augment = False
        self.workers = workers
        self.dt = [0.0, 0.0, 0.0]  # accumulated seconds: pre-process, inference, NMS
        self.seen = 0
        self.in_flight = 1  # frames the last stream kept in flight
        self.last_shape: tuple[int, int] | None = None  # network input (h, w) of the last image
        self._fixed_shape: tuple[int, int] | None = None  # input shape announced to the backend

    @property
    def has_default_names(self) -> bool:
        return self.names == [str(i) for i in range(len(self.names))]

    def warmup(self) -> None:
        self.backend.warmup((1, 3, *self.imgsz))

    def preprocess(self, im0: np.ndarray) -> tuple[torch.Tensor, tuple]:
        """Letterboxed float input [1,3,h,w] in 0..1 (channels-last memory for PyTorch models: their layout) and
        the ratio/padding to map boxes back. Single-threaded numpy/OpenCV, so it can run beside inference."""
        x, ratio_pad = letterbox_tensor(im0, self.imgsz, self.stride, auto=self.backend.fixed_imgsz is None,
                                        channels_last=self.backend.pt)
        x = x.to(self.device) if self.device.type != "cpu" else x
        return (x.to(self.backend.dtype) if x.dtype != self.backend.dtype else x), ratio_pad

    @torch.inference_mode()
    def inference(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment:
            return forward_augment(lambda im: (self.backend(im), None), x, self.stride)[0]
        return self.backend(x)

    def postprocess(self, pred: torch.Tensor, input_shape: tuple, im0_shape: tuple, ratio_pad: tuple,
                    conf_thres: float | None = None) -> tuple:
        det = non_max_suppression(pred, self.conf_thres if conf_thres is None else conf_thres, self.iou_thres,
                                  classes=self.classes, agnostic=self.agnostic, max_det=self.max_det)[0]
        det = det.float().cpu()
        boxes = scale_boxes(input_shape, det[:, :4].clone(), im0_shape[:2], ratio_pad).numpy().astype(np.float32)
        return boxes, det[:, 4].numpy().astype(np.float32), det[:, 5].numpy().astype(np.int64)

    def _detect(self, x: torch.Tensor, ratio_pad: tuple, im0_shape: tuple, path: str | None, conf: float,
                pre_s: float) -> Result:
        """Inference + NMS on one preprocessed image (thread-safe: touches no Predictor state)."""
        t1 = time.perf_counter()
        pred = self.inference(x)
        sync(self.device)
        t2 = time.perf_counter()
        boxes, scores, cls = self.postprocess(pred, tuple(x.shape[2:]), im0_shape, ratio_pad, conf)
        t3 = time.perf_counter()
        names = [self.names[c] if 0 <= c < len(self.names) else str(c) for c in cls.tolist()]
        speed = {"preprocess": pre_s * 1e3, "inference": (t2 - t1) * 1e3, "nms": (t3 - t2) * 1e3}
        return Result(boxes, scores, cls, names, tuple(im0_shape[:2]), tuple(x.shape[2:]), path, speed)

    def _account(self, r: Result) -> None:
        for i, k in enumerate(("preprocess", "inference", "nms")):
            self.dt[i] += r.speed[k] / 1e3
        self.seen += 1
        self.last_shape = r.input_shape

    def predict(self, image: np.ndarray | str | Path, path: str | None = None) -> Result:
        """Detect on one BGR image (or an image file). Boxes are xyxy pixels of the original image."""
        if isinstance(image, (str, Path)):
            path = str(image)
            if Path(path).is_dir():
                raise UserError(f"{path}: is a folder; predict() takes one image (a file or an array): run a folder "
                                f"with detect_dual.py --source, or loop over its files")
            image = read_image(image)
            if image is None:
                raise UserError(f"{path}: image not found or unreadable")
        image = as_bgr_uint8(image)
        t0 = time.perf_counter()
        x, ratio_pad = self.preprocess(image)
        sync(self.device)
        r = self._detect(x, ratio_pad, image.shape[:2], path, self.conf_thres, time.perf_counter() - t0)
        self._account(r)
        return r

    def frame_workers(self) -> int:
        """Worker threads `stream` infers on. On a CPU with a PyTorch model: one per intra-op thread torch may
        use (torch.get_num_threads(), which follows the usable cores: utils/threads.py), at most 4, each forward
        then running with threads // workers threads; exported files: one worker (their runtime's own threads
        do the forward while this thread prepares the next frame) unless the runtime accepts concurrent calls
        (Backend.concurrent_runs: OpenVINO, one stream per frame). On CUDA and with --cuda-graph: 0 (in this thread)."""
        if self.workers is not None:
            return self.workers
        if self.device.type != "cpu" or self.backend.graph is not None:
            return 0
        want = min(torch.get_num_threads(), MAX_FRAME_WORKERS)
        if self.backend.pt or want <= 1:
            return want
        return max(1, self.backend.concurrent_runs(want))

    def _announce_shape(self, shape: tuple[int, int]) -> None:
        """Tell the backend that a video's/stream's frames all come at this letterboxed (h, w), before the first
        of them is inferred: a dynamic ONNX Runtime / OpenVINO export may compile once for it
        (Backend.prepare_input_shape; a .pt model ignores it)."""
        if tuple(shape) != self._fixed_shape:
            self.backend.prepare_input_shape(*shape)
        self._fixed_shape = tuple(shape)

    def stream(self, frames: Iterable[Frame], conf_thres: float | None = None,
               workers: int | None = None) -> Iterator[tuple[Frame, Result]]:
        """Detect on every frame of `frames` (e.g. a LoadSources), yielding (frame, Result) in input order.

        Preprocessing runs in the caller's thread while `workers` frames (default `frame_workers()`) are
        inferred on worker threads, each with torch.get_num_threads() // workers intra-op threads (0 workers:
        all in the caller's thread); the results are those of `predict` frame by frame. The first frame of a
        video/stream announces its letterboxed shape to the backend before it is inferred (`_announce_shape`),
        once per call. conf_thres overrides the threshold for this stream.
        """
        n = self.frame_workers() if workers is None else max(0, int(workers))
        conf = self.conf_thres if conf_thres is None else conf_thres
        threads = torch.get_num_threads()
        per = max(1, threads // max(n, 1))
        self.in_flight = max(n, 1)
        announced = False

        def prep(f: Frame) -> tuple:
            nonlocal announced
            t0 = time.perf_counter()
            x, ratio_pad = self.preprocess(f.im0)
            if not announced and f.is_video:  # a video's frames share one shape; images in a folder do not
                self._announce_shape(tuple(x.shape[2:]))
                announced = True
            return f, x, ratio_pad, time.perf_counter() - t0

        def infer(item: tuple) -> Result:
            f, x, ratio_pad, pre_s = item
            return self._detect(x, ratio_pad, f.im0.shape[:2], f.path, conf, pre_s)

        def init_worker() -> None:
            torch.set_num_threads(per)  # this thread's OpenMP team (torch keeps it per thread)

        try:
            for (f, *_), r in ordered_map(infer, map(prep, frames), n, initializer=init_worker):
                self._account(r)
                yield f, r
        finally:
            if n > 1:
                torch.set_num_threads(threads)  # the workers' setting is also torch's process-wide default

    __call__ = predict

    def track(self, source: str | Path, tracker: Any = None, vid_stride: int = 1) -> Iterator[Result]:
        """Detect and track on a video, stream or image folder, yielding one Result (with track_ids) per frame.

        Tracker state is per sequence (reset when the video/stream/folder changes). Detection runs at
        min(conf_thres, track_low_thresh) so the tracker sees its low-score candidates; a Result holds only
        boxes that belong to a confirmed track. A single still image is detected plainly (track_ids None).
        tracker: a tracker YAML path/name, a dict of its settings, a TrackerConfig, or None for the defaults.
        """
        seq = SequenceTracker(tracker)  # a bad tracker setting fails before the source is opened
        dataset = LoadSources(source, vid_stride=vid_stride)
        single = is_single_image(dataset)
        if single:
            LOGGER.warning(f"WARNING: {source}: {SEQUENCE_HINT}; running plain detection")
        conf = self.conf_thres if single else min(self.conf_thres, seq.cfg.track_low_thresh)
        try:
            for f, r in self.stream(dataset, conf_thres=conf):
                yield r if single else seq.step(f, r)
        finally:
            seq.close()

    def speed(self) -> tuple[float, float, float]:
        """Mean milliseconds per image: pre-process, inference, NMS."""
        n = max(self.seen, 1)
        return tuple(t / n * 1e3 for t in self.dt)


# ---------------------------------------------------------------- detect_dual.py engine

def default_source(data: str | Path = "data/shapes.yaml") -> str:
    from utils.data import load_data_config
    cfg = load_data_config(data, need=("val",))
    return str(cfg.val[0])


def _display_available() -> bool:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return True


class _Viewer:
    """cv2.imshow when a display exists; otherwise one warning and nothing more."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and _display_available()
        if enabled and not self.enabled:
            LOGGER.warning("WARNING: --view-img: no display available, not showing images")

    def show(self, name: str, im: np.ndarray, video: bool) -> None:
        if not self.enabled:
            return
        try:
            cv2.imshow(name, im)
            cv2.waitKey(1 if video else 500)
        except cv2.error as e:
            LOGGER.warning(f"WARNING: --view-img: cv2.imshow failed ({str(e).strip().splitlines()[-1]}), "
                           "not showing images")
            self.enabled = False


class _VideoSink:
    """One cv2.VideoWriter per input video, same size and fps, mp4v codec, .mp4 output, written frame by frame
    (threaded: encoded in a background thread, in order, overlapping inference)."""

    def __init__(self, save_dir: Path, threaded: bool):
        self.threaded, self.bg = threaded, None  # writer thread started with the first video frame
        self.save_dir = save_dir
        self.src: str | None = None
        self.writer: cv2.VideoWriter | None = None
        self.used: set[str] = set()
        self.paths: list[Path] = []

    def _name(self, src: str) -> str:
        stem = re.sub(r"[^\w.-]+", "_", src) if is_stream(src) else Path(src).stem
        name, n = f"{stem}.mp4", 2
        while name in self.used:
            name, n = f"{stem}{n}.mp4", n + 1
        self.used.add(name)
        return name

    def write(self, f: Frame, im: np.ndarray | Callable[[], np.ndarray]) -> None:
        """Append a frame to its video: an image, or a call that draws it (then drawn in the writer thread)."""
        if self.threaded:
            self.bg = self.bg or BackgroundCalls(name="video-writer")
            self.bg.submit(self._write, f, im)
        else:
            self._write(f, im)

    def _write(self, f: Frame, im: np.ndarray | Callable[[], np.ndarray]) -> None:
        im = im() if callable(im) else im
        if f.path != self.src:
            self._release()
            self.src = f.path
            out = self.save_dir / self._name(f.path)
            h, w = im.shape[:2]
            self.writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), f.video.fps, (w, h))
            if not self.writer.isOpened():
                LOGGER.warning(f"WARNING: {out}: cannot open video writer (mp4v), video not saved")
                self.writer = None
            else:
                self.paths.append(out)
        if self.writer is not None:
            self.writer.write(im)

    def close(self) -> None:
        if self.bg is not None:
            bg, self.bg = self.bg, None
            bg.submit(self._release)
            bg.close()
        else:
            self._release()

    def _release(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.writer, self.src = None, None


def _save_image(path: Path, im: np.ndarray) -> None:
    ok = False
    try:
        ok = cv2.imwrite(str(path), im)
    except cv2.error:
        ok = False
    if not ok:  # format cv2 cannot write (e.g. .dng/.pfm): fall back to JPEG
        cv2.imwrite(str(path.with_suffix(".jpg")), im)


def _names_for(predictor: Predictor, data: str | Path | None) -> None:
    """Weights without class names (0, 1, ...) take them from --data when the class counts agree."""
    if not predictor.has_default_names or not data:
        return
    from utils.data import load_data_config
    names = load_data_config(data, need=()).names
    if len(names) == len(predictor.names):
        predictor.names = list(names)
    else:
        LOGGER.warning(f"WARNING: {data}: {len(names)} class names but the model has {len(predictor.names)} "
                       f"classes; using class numbers as names")


def run(job: PredictJob | argparse.Namespace) -> Path:
    """Run detection as detect_dual.py describes; returns the output folder (runs/detect/exp{N})."""
    opt = job if isinstance(job, PredictJob) else PredictJob.from_args(job)
    if opt.visualize:
        LOGGER.warning("WARNING: --visualize (feature-map plots) is not implemented, ignored")
    if opt.update:
        LOGGER.info("--update: nothing to do (checkpoints of this project hold no optimizer after training)")
    if opt.dnn:
        LOGGER.info("--dnn: ignored (OpenCV DNN backend not used)")
    source = str(opt.source) if opt.source not in (None, "") else default_source(opt.data)
    dataset = LoadSources(source, vid_stride=opt.vid_stride, threaded=opt.threaded)  # a bad source fails early
    threaded = dataset.threaded  # decode and encode alike: background threads with 2+ usable cores
    track_cfg = tracker_for_run(opt, dataset)  # None unless --track on a sequence
    weights = opt.weights or find_newest("train/*/weights/best.pt", "--weights")
    if isinstance(weights, (list, tuple)):
        if len(weights) > 1:
            LOGGER.warning(f"WARNING: --weights: ensembles are not supported, using {weights[0]} only")
        weights = weights[0]
    conf = opt.conf_thres if track_cfg is None else min(opt.conf_thres, track_cfg.track_low_thresh)
    predictor = Predictor(weights, device=opt.device, imgsz=opt.imgsz, conf_thres=conf,
                          iou_thres=opt.iou_thres, max_det=opt.max_det, classes=opt.classes,
                          agnostic=opt.agnostic_nms, half=opt.half, augment=opt.augment,
                          cuda_graph=opt.cuda_graph, main_only=opt.main_only)
    _names_for(predictor, opt.data)
    names = predictor.names

    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    if opt.save_txt:
        (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    save_img = not opt.nosave
    viewer = _Viewer(opt.view_img)
    sink = _VideoSink(save_dir, threaded=threaded)
    seq = SequenceTracker(track_cfg, save_dir) if track_cfg is not None else None
    if predictor.device.type != "cpu":
        predictor.warmup()  # CUDA start-up; on a CPU the first frames warm up at the shape the source gives
    workers = None if threaded else 0  # the sequential path: one frame after another in this thread

    n_labels = 0
    bar: tqdm | None = None
    bar_src = None
    vid_det = 0
    t_video = time.perf_counter()

    def end_video() -> None:  # frames/s from the first result to the last (start-up and first frame excluded)
        rate = f", {(bar.n - 1) / max(time.perf_counter() - t_video, 1e-9):.1f} frames/s" if bar.n > 1 else ""
        bar.close()
        LOGGER.info(f"{bar.desc}: {bar.n} frames, {vid_det} detections{rate}")

    try:
        for f, r in predictor.stream(dataset, workers=workers):
            if seq is not None:
                r = seq.step(f, r)
            p = Path(f.path)
            stem = (re.sub(r"[^\w.-]+", "_", f.path) if is_stream(f.path) else p.stem)
            stem_f = f"{stem}_{f.frame}" if f.is_video else stem
            if opt.save_txt and len(r):
                (save_dir / "labels" / f"{stem_f}.txt").write_text("\n".join(r.txt_lines(opt.save_conf)) + "\n")
                n_labels += 1
            if opt.save_crop:
                for box, c in zip(r.boxes, r.class_ids):
                    save_one_box(box, f.im0, save_dir / "crops" / names[int(c)] / f"{stem_f}.jpg")
            draw = functools.partial(r.plot, f.im0, opt.line_thickness, opt.hide_labels, opt.hide_conf, names)
            im = draw() if viewer.enabled or (save_img and not f.is_video) else None
            shape = "x".join(map(str, r.input_shape))
            if f.is_video:
                if f.path != bar_src:
                    if bar is not None:
                        end_video()
                    kind = "stream" if is_stream(f.path) else "video"
                    bar = tqdm(total=f.video.frames or None, desc=f"{kind} {f.index + 1}/{f.count} {f.path}",
                               unit="frame", file=sys.stderr, leave=False)
                    bar_src, vid_det, t_video = f.path, 0, time.perf_counter()
                vid_det += len(r)
                bar.set_postfix_str(f"{shape} {r.summary()}, {r.speed['inference']:.1f}ms", refresh=False)
                bar.update(1)
                if save_img:
                    sink.write(f, im if im is not None else draw)  # drawn in the writer thread when threaded
            else:
                LOGGER.info(f"image {f.index + 1}/{f.count} {f.path}: {shape} {r.summary()}, "
                            f"{r.speed['inference']:.1f}ms")
                if save_img:
                    _save_image(save_dir / p.name, im)
            if viewer.enabled:
                viewer.show(f.path, im, f.is_video)
    finally:
        if bar is not None:
            end_video()
        sink.close()
        if seq is not None:
            seq.close()

    if dataset.skipped:  # each was named with its reason when skipped: count them, do not repeat them
        LOGGER.warning(f"WARNING: {len(dataset.skipped)} of {len(dataset)} files skipped (named above)")
    t = predictor.speed()
    shape = (1, 3, *predictor.last_shape) if predictor.last_shape else (1, 3, *predictor.imgsz)
    par = f", {predictor.in_flight} frames in flight" if predictor.in_flight > 1 else ""
    LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}{par}" % t)
    if opt.save_txt or save_img:
        extra = f"\n{n_labels} labels saved to {save_dir / 'labels'}" if opt.save_txt else ""
        LOGGER.info(f"Results saved to {save_dir}{extra}")
    return save_dir
