"""Inference sources: images, folders, globs, .txt path lists, video files, webcams and network streams.

Everything is read lazily, one image or one frame at a time, so memory stays flat however long a video
is. Streams and webcams are only opened when iteration reaches them (never at import or construction).
Preprocessing uses the same `letterbox` as validation, with minimal (rectangular) padding.
"""
from __future__ import annotations

import glob
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch

from utils.data.augment import letterbox, preprocess_image  # noqa: F401  (preprocess_image: shared with INT8 calibration)
from utils.data.verify import IMG_FORMATS
from utils.general import LOGGER, UserError
from utils.threads import usable_cores

VID_FORMATS = {"asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "webm", "wmv"}
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")


@dataclass
class VideoInfo:
    """What a video writer needs to reproduce the input: frame rate, size and (if known) frame count."""

    fps: float
    w: int
    h: int
    frames: int  # 0 when unknown (webcams, streams)


@dataclass
class Frame:
    """One item of a source: `path` (file, or the stream address), original BGR image `im0`,
    1-based frame number in the input video (None for images; with vid_stride 2: 1, 3, 5, ...), and the video's `VideoInfo` (None for images)."""

    path: str
    im0: np.ndarray
    frame: int | None = None
    video: VideoInfo | None = None
    index: int = 0  # position of the file/stream in the source list (0-based)
    count: int = 1  # number of files/streams in the source list

    def __iter__(self):  # lets callers unpack: path, im0, frame, video = item
        return iter((self.path, self.im0, self.frame, self.video))

    @property
    def is_video(self) -> bool:
        return self.video is not None


def is_stream(source: str) -> bool:
    """Webcam index ('0') or a network address: opened with cv2.VideoCapture, read until it ends."""
    s = str(source)
    return s.isnumeric() or s.lower().startswith(STREAM_PREFIXES)


def file_kind(path: str | Path) -> str | None:
    suffix = Path(path).suffix[1:].lower()
    return "image" if suffix in IMG_FORMATS else "video" if suffix in VID_FORMATS else None


def _supported() -> str:
    return ", ".join(sorted(IMG_FORMATS | VID_FORMATS))


def _from_txt(txt: Path) -> list[str]:
    """A .txt list: one path (or stream address) per line, relative paths resolved from the list's folder."""
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{txt}: cannot read source list ({e})") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_stream(line):
            out.append(line)
        else:
            p = Path(line).expanduser()
            out.append(str(p if p.is_absolute() else (txt.parent / p)))
    return out


def resolve_source(source: str | Path) -> tuple[list[str], bool]:
    """Expand a source argument into a list of files/streams; returns (items, explicit).

    explicit is True when the user named the single item directly (then an unreadable item is an error,
    not a skip). Raises UserError for a missing source or a folder/glob/list with nothing usable.
    """
    if isinstance(source, bool) or not isinstance(source, (str, Path, int)):
        what = f"an array of shape {tuple(source.shape)}" if isinstance(source, np.ndarray) else type(source).__name__
        raise UserError(f"source: expected a file, folder, glob, .txt list, video, URL or webcam index, got {what}"
                        + (" (Predictor.predict takes image arrays)" if isinstance(source, np.ndarray) else ""))
    s = str(source).strip()
    if not s:
        raise UserError("--source: empty source")
    if is_stream(s):
        return [s], True
    p = Path(s).expanduser()
    if any(c in s for c in "*?[") and not p.exists():  # a real file named "a[1].jpg" is not a pattern
        files = sorted(glob.glob(s, recursive=True))
        items = [f for f in files if os.path.isfile(f) and file_kind(f)]
        if not items:
            raise UserError(f"{s}: no images or videos match this pattern (supported: {_supported()})")
        return items, False
    if p.is_dir():
        items = sorted(str(f) for f in p.iterdir() if f.is_file() and file_kind(f))
        if not items:
            raise UserError(f"{p}: folder has no images or videos (supported: {_supported()})")
        return items, False
    if not p.exists():
        raise UserError(f"{p}: source not found")
    if p.suffix.lower() == ".txt":
        entries = _from_txt(p)
        missing = [e for e in entries if not is_stream(e) and not os.path.isfile(e)]
        for m in missing:
            LOGGER.warning(f"WARNING: {m}: listed in {p} but not found, skipped")
        items = [e for e in entries if e not in missing and (is_stream(e) or file_kind(e))]
        for e in entries:
            if e not in missing and e not in items:
                LOGGER.warning(f"WARNING: {e}: unsupported format, skipped (supported: {_supported()})")
        if not items:
            raise UserError(f"{p}: source list has no usable images, videos or streams")
        return items, False
    if not file_kind(p):
        raise UserError(f"{p}: unsupported source format '{p.suffix}' (supported: {_supported()})")
    return [str(p)], True


def read_image(path: str | Path) -> np.ndarray | None:
    """BGR uint8 image or None if unreadable (imdecode copes with non-ASCII paths)."""
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if not buf.size:
        return None
    im = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return im if im is not None and im.size else None


def as_bgr_uint8(image: np.ndarray, what: str = "predict") -> np.ndarray:
    """An image array as the BGR uint8 [h, w, 3] every later step expects, or one clear UserError.

    Unambiguous inputs are converted: gray [h, w] or [h, w, 1] and BGRA; uint16 (0..65535) and other integer
    arrays in 0..255; float arrays in 0..1 (scaled by 255) or in 0..255. A channels-first array [3, h, w]
    is refused (its channel order, RGB or BGR, cannot be told), as are empty, non-finite or out-of-range ones.
    """
    if not isinstance(image, np.ndarray):
        raise UserError(f"{what}: expected an image array [h, w, 3] (BGR) or an image path, got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.ndim not in (2, 3) or image.size == 0 or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        hint = (f"; it looks channels-first: pass image.transpose(1, 2, 0) (and [..., ::-1] if it is RGB)"
                if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.size else "")
        raise UserError(f"{what}: image array of shape {shape} is not an image [h, w], [h, w, 3] or [h, w, 4]{hint}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 65535 -> 255, rounded
    elif image.dtype != np.uint8:
        if image.dtype.kind not in "biuf":
            raise UserError(f"{what}: image array of dtype {image.dtype} is not an image")
        x = image.astype(np.float64)
        lo, hi = (float(x.min()), float(x.max())) if np.isfinite(x).all() else (float("nan"),) * 2
        if not (lo >= 0 and hi <= 255):
            raise UserError(f"{what}: {image.dtype} image values span {lo:g}..{hi:g}; expected 0..1 or 0..255 "
                            f"(uint8 or uint16 images are read as they are)")
        if image.dtype.kind == "f" and hi <= 1:
            x = x * 255  # a float image in 0..1
        image = np.round(x).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(image.reshape(image.shape[:2])), cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def letterbox_tensor(im0: np.ndarray, imgsz: int | tuple, stride: int = 32, auto: bool = True,
                     channels_last: bool = False) -> tuple[torch.Tensor, tuple]:
    """Inference input of a BGR uint8 image: float [1,3,h,w] RGB in 0..1 (the same values as
    `preprocess_image` then `/ 255`) and ratio_pad ((rh, rw), (padw, padh)) as `scale_boxes` expects.

    Why not preprocess_image + torch: OpenCV's colour swap and one numpy division are single-threaded and skip
    the CHW copy, so this can run beside inference without waking torch's thread pool; channels_last=True
    returns the HWC buffer itself as a channels-last view (what PyTorch models here compute in).
    """
    img, (rw, rh), pad = letterbox(im0, imgsz, auto=auto, stride=stride)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    x = torch.from_numpy(np.divide(rgb, np.float32(255), dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    return (x if channels_last else x.contiguous()), ((rh, rw), pad)


def _video_info(cap: cv2.VideoCapture, stream: bool) -> VideoInfo:
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 30.0
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    n = 0 if stream else max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    return VideoInfo(fps=fps, w=w, h=h, frames=n)


class Prefetcher:
    """Run an iterator in a background thread and hand its items over in order through a bounded buffer.

    Why: decoding (cv2 releases the GIL) then overlaps inference, while at most `maxsize` items wait, so
    memory stays flat however long the video. An exception raised by the iterator reaches the consumer
    after the items produced before it. close() (also on early exit of the consumer) wakes a producer
    waiting for room, lets it close its iterator (releasing captures) and joins it; nothing sleeps or polls.
    """

    def __init__(self, items: Iterable, maxsize: int = 4, name: str = "source-reader"):
        if maxsize < 1:
            raise ValueError("Prefetcher: maxsize must be at least 1")
        self.maxsize = maxsize
        self._buf: deque = deque()
        self._cond = threading.Condition()
        self._stop = self._done = False
        self._error: BaseException | None = None
        self.high_water = 0  # most items ever waiting (the memory bound, checked by tests)
        self._thread = threading.Thread(target=self._produce, args=(iter(items),), name=name, daemon=True)
        self._thread.start()

    def _produce(self, it: Iterator) -> None:
        try:
            for item in it:
                with self._cond:
                    while len(self._buf) >= self.maxsize and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._buf.append(item)
                    self.high_water = max(self.high_water, len(self._buf))
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            self._error = e
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator's finally (cap.release) runs here, in its own thread
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        with self._cond:
            while not self._buf and not self._done:
                self._cond.wait()
            if self._buf:
                item = self._buf.popleft()
                self._cond.notify_all()
                return item
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            raise StopIteration

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._buf.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class BackgroundCalls:
    """Run submitted calls one after another in a background thread: order kept, at most `maxsize` waiting.

    Why: encoding a video frame (cv2 releases the GIL) then overlaps the next frame's inference. An error in
    a call is raised to the submitter at its next submit() or at close(); close() waits for queued calls.
    """

    def __init__(self, maxsize: int = 8, name: str = "background-calls"):
        self.maxsize = maxsize
        self._buf: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn, *args) -> None:
        with self._cond:
            self._raise()
            if self._closed:
                raise RuntimeError("BackgroundCalls: submit after close")
            while len(self._buf) >= self.maxsize and self._error is None:
                self._cond.wait()
            self._raise()
            self._buf.append((fn, args))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closed:
                    self._cond.wait()
                if not self._buf:
                    return
                fn, args = self._buf.popleft()
                self._cond.notify_all()
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 -- handed to the submitter
                with self._cond:
                    self._error = e
                    self._buf.clear()
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._raise()


def background_io() -> bool:
    """Whether to decode and encode in background threads: when this process may use more than one core
    (affinity and cgroup quota: utils.threads.usable_cores). On one core they only time-slice with inference,
    so I/O runs inline. Measured on 2 shared cores (benchmarks/results/detect_threads.md): inline vs background
    decode/encode alone is model-dependent within +-7%; with frames in flight (detect_pipeline.md) the
    background threads fill the gaps the inference threads leave."""
    return usable_cores() > 1


class LoadSources:
    """Iterate every image / video frame / stream frame of a source, yielding `Frame`s (unpackable as
    path, im0, frame, video_info).

    Unreadable files inside a folder, glob or list are reported (file + reason) and skipped and listed in
    `.skipped`; a directly named file that cannot be read raises UserError. vid_stride > 1 keeps every
    n-th video frame (the others are grabbed but not decoded). A video that stops decoding before its
    stated frame count is reported (warning, and listed in `.incomplete`).
    threaded: files are read and decoded in a background thread, `buffer` frames ahead (`Prefetcher`);
    False reads in the caller's thread (the sequential path); None (default) = `background_io()`.
    """

    def __init__(self, source: str | Path, vid_stride: int = 1, threaded: bool | None = None, buffer: int = 4):
        self.threaded, self.buffer = background_io() if threaded is None else bool(threaded), int(buffer)
        self.reader: Prefetcher | None = None
        self.incomplete: list[tuple[str, str]] = []
        self.source = str(source)
        self.items, self.explicit = resolve_source(source)
        if isinstance(vid_stride, bool) or not isinstance(vid_stride, (int, np.integer)) or vid_stride < 1:
            raise UserError(f"--vid-stride {vid_stride!r}: must be a whole number >= 1 (1 = every frame, 2 = every "
                            f"second frame, ...)")
        self.vid_stride = int(vid_stride)
        self.skipped: list[tuple[str, str]] = []
        self.nyield = 0
        kinds = ["stream" if is_stream(i) else file_kind(i) for i in self.items]
        self.n_images = kinds.count("image")  # tracking needs a sequence: one still image is not one
        self.n_videos = kinds.count("video") + kinds.count("stream")

    def __len__(self) -> int:
        return len(self.items)

    def _skip(self, path: str, reason: str) -> None:
        if self.explicit:
            raise UserError(f"{path}: {reason}")
        self.skipped.append((path, reason))
        LOGGER.warning(f"WARNING: {path}: {reason}, skipped")

    def _frames(self, path: str, index: int) -> Iterator[Frame]:
        stream = is_stream(path)
        cap = cv2.VideoCapture(int(path) if path.isnumeric() else path)
        try:
            if not cap.isOpened():
                what = "webcam" if path.isnumeric() else "stream" if stream else "video"
                self._skip(path, f"cannot open {what}")
                return
            info = _video_info(cap, stream)
            total = info.frames  # stated frame count of the file (0: unknown)
            if self.vid_stride > 1 and info.frames:
                info.frames = (info.frames + self.vid_stride - 1) // self.vid_stride
            n = pos = 0  # frames yielded, 1-based position in the input video of the last frame read
            while True:
                ok, im0 = cap.read()
                if not ok or im0 is None:
                    break
                pos += 1
                if not n and (info.w, info.h) != (im0.shape[1], im0.shape[0]):
                    info.w, info.h = im0.shape[1], im0.shape[0]  # trust decoded frames over metadata
                n += 1
                yield Frame(path, im0, pos, info, index, len(self.items))
                for _ in range(self.vid_stride - 1):
                    if not cap.grab():
                        break
                    pos += 1
                else:
                    continue
                break
            if n == 0:
                self._skip(path, "no decodable frames")
            elif not stream and total and pos < total:
                why = f"decoding stopped at frame {pos} of {total} (file damaged or truncated?)"
                self.incomplete.append((path, why))
                LOGGER.warning(f"WARNING: {path}: {why}")
        finally:
            cap.release()

    def __iter__(self) -> Iterator[Frame]:
        if not self.threaded:
            yield from self._read()
            return
        self.reader = Prefetcher(self._read(), self.buffer)
        try:
            yield from self.reader
        finally:
            self.reader.close()

    def _read(self) -> Iterator[Frame]:
        for i, path in enumerate(self.items):
            if is_stream(path) or file_kind(path) == "video":
                for f in self._frames(path, i):
                    self.nyield += 1
                    yield f
                continue
            im0 = read_image(path)
            if im0 is None:
                reason = "empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 else "cannot decode image"
                self._skip(path, reason)
                continue
            self.nyield += 1
            yield Frame(path, im0, None, None, i, len(self.items))
        if not self.nyield and self.skipped:
            raise UserError(f"{self.source}: none of the {len(self.items)} files could be read")
