"""Image/label discovery, one-time verification (thread pool) and a safe JSON label cache.

Why: bad files are the most common way a long training run dies hours in. Every image and label is
checked once; problems are reported with file and reason and the image is dropped or the label repaired.
The cache is plain JSON (no pickle), keyed by a hash of paths, sizes, mtimes, nc and CACHE_VERSION.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.general import LOGGER, UserError

IMG_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"}
CACHE_VERSION = "yolo-mqa-labels-3"  # 2: records say which label files hold polygons; 3: boxes past the
#                                       image edge are clipped and kept (were: image dropped), counted per file
COORD_TOL = 0.02  # a coordinate up to this far outside [0, 1] is tool rounding; beyond it the row is pixels/garbage
FLOAT_TOL = 1e-4  # overshoot from rounding coordinates to text: clipped without being counted
MIN_IMG_SIDE = 10
NUM_THREADS = min(8, os.cpu_count() or 1)

Image.MAX_IMAGE_PIXELS = None  # very large aerial images are legitimate; size is checked by decoding


def img2label_paths(img_paths: list[str]) -> list[str]:
    """.../images/x.jpg -> .../labels/x.txt (last /images/ only); same folder when there is none."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in img_paths:
        p = str(p)
        head, sep, tail = p.rpartition(sa)
        q = head + sb + tail if sep else p
        out.append(os.path.splitext(q)[0] + ".txt")
    return out


def collect_image_files(paths: list[str | Path] | str | Path, prefix: str = "") -> tuple[list[str], list[str]]:
    """Expand folders (recursively), .txt lists and single images into a sorted, de-duplicated list.

    Returns (image files, messages about skipped entries). A missing path or an empty result is a UserError.
    """
    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    files, msgs = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    if f.suffix[1:].lower() in IMG_FORMATS:
                        files.append(str(f.resolve()))
                    elif f.suffix.lower() not in (".txt", ".cache", ".npy", ".json", ".xml"):
                        msgs.append(f"{prefix}{f}: skipped, not an image file (suffix '{f.suffix}')")
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line)
                f = f if f.is_absolute() else (p.parent / f)
                if f.suffix[1:].lower() not in IMG_FORMATS:
                    msgs.append(f"{prefix}{f}: skipped, not an image file (listed in {p.name})")
                elif not f.is_file():
                    msgs.append(f"{prefix}{f}: skipped, image missing (listed in {p.name})")
                else:
                    files.append(str(f.resolve()))
        elif p.is_file() and p.suffix[1:].lower() in IMG_FORMATS:
            files.append(str(p.resolve()))
        elif p.exists():
            raise UserError(f"{p}: not a folder, .txt image list or image")
        else:
            raise UserError(f"{p}: path does not exist")
    unique = sorted(set(files))
    if len(unique) < len(files):
        msgs.append(f"{prefix}{len(files) - len(unique)} image paths listed more than once, using each once")
    if not unique:
        raise UserError(f"{', '.join(str(p) for p in paths)}: no images found "
                        f"(supported: {', '.join(sorted(IMG_FORMATS))})")
    return unique, msgs


def exif_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) as displayed, i.e. after the EXIF orientation rotation."""
    w, h = img.size
    try:
        orient = img.getexif().get(0x0112, 1)
    except Exception:
        orient = 1
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def _check_image(im_file: str) -> tuple[int, int]:
    """Decode fully (catches truncation); returns displayed (w, h). Raises ValueError with the reason."""
    if os.path.getsize(im_file) == 0:
        raise ValueError("zero-byte file")
    try:
        with Image.open(im_file) as im:
            im.verify()
        with Image.open(im_file) as im:
            fmt = (im.format or "").lower()
            size = exif_size(im)
            im.load()  # full decode: truncated files raise here
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"unreadable or truncated image ({reason})") from None
    if fmt.replace("jpeg", "jpg") not in IMG_FORMATS | {"jpg", "mpo"}:
        raise ValueError(f"unsupported image format {fmt!r}")
    if min(size) < MIN_IMG_SIDE:
        raise ValueError(f"image too small {size}")
    return size


@dataclass
class LabelFile:
    """One parsed label file. `error` set means the image is unusable (a row cannot be interpreted); otherwise
    `labels` holds the repaired rows (possibly none) and `messages` say what was repaired."""

    labels: np.ndarray  # [n, 5] float32: cls, xc, yc, w, h (normalised)
    # per row: polygon [k, 2] normalised, or None for a box row; [] when the file holds no polygon at all
    segments: list = field(default_factory=list)
    n_duplicates: int = 0
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    n_clipped: int = 0  # boxes (or outlines) that extended past the image edge, clipped to it and kept


def parse_label_file(lb_file: str, nc: int) -> LabelFile:
    """Parse one label file: boxes (cls xc yc w h) and polygons (cls x1 y1 x2 y2 ...), duplicates removed.

    Polygon rows become their bounding box; their points ([k, 2], clipped to [0, 1]) come back in `segments`,
    aligned with the label rows, for the polygon-aware augmentation. They are not cached (a COCO-size polygon
    cache would be gigabytes). An error means the image is dropped: a partly wrong label file would teach the
    model that real objects are background.
    """
    notes: list[str] = []
    empty = np.zeros((0, 5), np.float32)

    def fail(reason: str) -> LabelFile:
        return LabelFile(empty, messages=notes, error=reason)

    try:
        text = Path(lb_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return fail("label file is not UTF-8 text")
    rows, segs = [], []
    n_clipped = 0
    for ln, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        n = len(parts)
        if n != 5 and (n < 7 or n % 2 == 0):
            return fail(f"line {ln}: {n} columns (need 5 for a box or an odd number >= 7 for a polygon)")
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            return fail(f"line {ln}: non-numeric value")
        if not all(math.isfinite(v) for v in vals):
            return fail(f"line {ln}: NaN or inf value")
        c = vals[0]
        if c != int(c):
            return fail(f"line {ln}: class id {parts[0]} is not an integer")
        if c < 0 or c >= nc:
            return fail(f"line {ln}: class id {int(c)} outside 0..{nc - 1}")
        if n == 5:
            xc, yc, w, h = vals[1:]
            if w < 0 or h < 0:
                return fail(f"line {ln}: negative box size (w {w:g}, h {h:g})")
            coords = vals[1:]  # a centre may sit on the edge and a size span the image, no more
            x1, y1, x2, y2 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
            seg = None
        else:
            xy = np.array(vals[1:], np.float64).reshape(-1, 2)
            coords = xy.ravel().tolist()
            seg = xy.clip(0, 1).astype(np.float32)
            x1, y1 = xy.min(0)
            x2, y2 = xy.max(0)
        if min(coords) < -COORD_TOL or max(coords) > 1 + COORD_TOL:
            return fail(f"line {ln}: coordinates outside [0, 1] (min {min(coords):.3f}, max {max(coords):.3f}); "
                        f"labels must be normalised by the image size, not pixels")
        if x2 - x1 <= 0 or y2 - y1 <= 0:  # an empty object: nothing to learn, but no reason to lose the image
            notes.append(f"line {ln}: removed a zero-size box")
            continue
        crossed = bool(min(x1, y1) < -FLOAT_TOL or max(x2, y2) > 1 + FLOAT_TOL)  # beyond text rounding noise
        if min(x1, y1) < 0 or max(x2, y2) > 1:  # past the image edge (annotation tools do this): clip, keep
            x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            notes.append(f"line {ln}: removed an object with nothing inside the image")
            continue
        n_clipped += crossed
        rows.append([c, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        segs.append(seg)
    if not rows:
        return LabelFile(empty, messages=notes, n_clipped=n_clipped)
    lb = np.array(rows, np.float32)
    _, idx = np.unique(lb, axis=0, return_index=True)
    n_dup = len(lb) - len(idx)
    if n_dup:
        idx = np.sort(idx)
        lb, segs = lb[idx], [segs[i] for i in idx]
        notes.append(f"removed {n_dup} duplicate label rows")
    return LabelFile(lb, segs if any(x is not None for x in segs) else [], n_dup, notes, n_clipped=n_clipped)


def verify_image_label(im_file: str, lb_file: str, nc: int) -> dict:
    """Check one image + label pair. status: ok | background | corrupt; msgs list the problems."""
    rec = {"im_file": im_file, "shape": None, "labels": [], "status": "corrupt", "dup": 0, "clipped": 0, "msgs": [],
           "label": "ok"}
    try:
        rec["shape"] = list(_check_image(im_file))
    except (ValueError, OSError) as e:
        rec["msgs"].append(f"{im_file}: image dropped, {e}")
        return rec
    if not os.path.isfile(lb_file):
        rec.update(status="background", label="missing")
        return rec
    parsed = parse_label_file(lb_file, nc)
    if parsed.error:
        rec["msgs"].append(f"{lb_file}: image dropped, {parsed.error}")
        return rec
    lb = parsed.labels
    rec["msgs"] += [f"{lb_file}: {n}" for n in parsed.messages]
    rec.update(labels=lb.round(6).tolist(), polygons=bool(parsed.segments), dup=parsed.n_duplicates,
               clipped=parsed.n_clipped, status="ok" if len(lb) else "background", label="ok" if len(lb) else "empty")
    return rec


def _files_hash(files: list[str], nc: int) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|nc={nc}".encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()


def cache_path_for(label_files: list[str], paths=None) -> Path:
    """labels/train/x.txt -> labels/train.cache (next to the label folder).

    A split given as a .txt image list may point anywhere (outside the dataset): its cache goes next to
    the .txt file instead, so files listed from other folders are only ever read, never written beside.
    """
    first = (paths if isinstance(paths, (list, tuple)) else [paths])[0] if paths is not None else None
    if first is not None and Path(first).is_file() and Path(first).suffix.lower() == ".txt":
        return Path(first).with_suffix(".cache")
    return Path(label_files[0]).parent.with_suffix(".cache")


def load_cache(path: Path, want_hash: str) -> dict | None:
    """Plain-JSON cache: nothing is executed on load; a wrong version/hash or unreadable file -> None."""
    try:
        cache = json.loads(Path(path).read_text(encoding="utf-8"))
        if cache.get("version") == CACHE_VERSION and cache.get("hash") == want_hash:
            return cache
    except (OSError, ValueError, AttributeError):
        pass
    return None


def save_cache(path: Path, cache: dict, prefix: str = "") -> bool:
    """Write atomically; an unwritable folder only warns."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
        return True
    except OSError as e:
        LOGGER.warning(f"{prefix}WARNING: cache not saved, {path.parent} is not writeable ({e.strerror or e})")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def _orphan_labels(im_files: list[str], label_files: list[str]) -> list[str]:
    """Label .txt files sitting in our label folders whose image is not in the dataset."""
    have = set(label_files)
    out = []
    for d in sorted({os.path.dirname(f) for f in label_files}):
        if f"{os.sep}labels" not in d or not os.path.isdir(d):  # labels beside images: .txt may be lists
            continue
        for name in sorted(os.listdir(d)):
            f = os.path.join(d, name)
            if name.endswith(".txt") and f not in have:
                out.append(f)
    return out


@dataclass
class ScanCounts:
    """What the verification found in one split."""

    found: int  # image files listed
    images: int  # usable (with labels or as backgrounds)
    backgrounds: int
    corrupt: int  # dropped, each with a message naming the file and the reason
    duplicates: int  # duplicate label rows removed
    missing_labels: int
    empty_labels: int
    clipped_boxes: int  # boxes past the image edge, clipped and kept
    clipped_files: int  # label files holding them


@dataclass
class DatasetScan:
    """A verified split: usable images with their labels (aligned lists), counts and the messages logged."""

    im_files: list[str]
    label_files: list[str]
    labels: list[np.ndarray]  # per image [n, 5] float32 cls xc yc w h (normalised)
    polygons: list[bool]  # which label files hold polygon rows (their points are re-read on demand)
    shapes: np.ndarray  # [n, 2] (w, h) as displayed
    counts: ScanCounts
    msgs: list[str]
    from_cache: bool
    cache_file: str


def scan_dataset(paths, nc: int, prefix: str = "", use_cache: bool = True) -> DatasetScan:
    """Collect, verify (or load from the cache) and summarise a split; logs each problem once."""
    im_files, list_msgs = collect_image_files(paths)
    label_files = img2label_paths(im_files)
    want = _files_hash(im_files + label_files, nc)
    cpath = cache_path_for(label_files, paths)
    cache = load_cache(cpath, want) if use_cache else None
    from_cache = cache is not None
    if cache is None:
        with ThreadPoolExecutor(NUM_THREADS) as pool:
            recs = list(pool.map(verify_image_label, im_files, label_files, [nc] * len(im_files)))
        # a .txt image list names a subset on purpose (train.txt and val.txt share one labels/ folder): only a
        # split given as folders says which label files lack their image
        folders = all(Path(p).is_dir() for p in (paths if isinstance(paths, (list, tuple)) else [paths]))
        orphans = _orphan_labels(im_files, label_files) if folders else []
        msgs = list(list_msgs)
        for r in recs:
            msgs += r["msgs"]
        if orphans:
            msgs.append(f"{len(orphans)} label files have no image, e.g. {orphans[0]}")  # prefix added when logged
        cache = {"version": CACHE_VERSION, "hash": want, "records": recs, "msgs": msgs}
        if use_cache and cpath.parent.is_dir():  # no folder: no labels there either (said below), nothing to cache
            save_cache(cpath, cache, prefix)
    recs = cache["records"]
    good = [r for r in recs if r["status"] != "corrupt"]
    counts = ScanCounts(
        found=len(recs),
        images=len(good),
        backgrounds=sum(r["status"] == "background" for r in recs),
        corrupt=sum(r["status"] == "corrupt" for r in recs),
        duplicates=sum(r["dup"] for r in recs),
        missing_labels=sum(r["label"] == "missing" for r in recs),
        empty_labels=sum(r["label"] == "empty" for r in recs),
        clipped_boxes=sum(r["clipped"] for r in recs),
        clipped_files=sum(r["clipped"] > 0 for r in recs),
    )
    msgs = list(dict.fromkeys(cache["msgs"]))  # each problem once, in order
    if counts.clipped_files:  # one line, not one per file: tools that overshoot the edge do it everywhere
        examples = [img2label_paths([r["im_file"]])[0] for r in recs if r["clipped"]][:3]
        msgs.append(f"{counts.clipped_boxes} boxes extend past the image edge: clipped to it and kept "
                    f"({counts.clipped_files} label files, e.g. {', '.join(examples)})")
    if counts.images and counts.missing_labels == counts.images:  # not one label file: a layout problem
        folders = sorted({os.path.dirname(f) for f in img2label_paths([r["im_file"] for r in good])})
        more = f" and {len(folders) - 1} more folder(s)" if len(folders) > 1 else ""
        msgs.append(f"no label files found for any of the {counts.images} images: looked for "
                    f"{os.path.join(folders[0], '<image name>.txt')}{more} (a labels/ folder beside images/, "
                    f"same sub-folders); every image counts as background")
    for m in msgs:
        LOGGER.warning(f"{prefix}WARNING: {m}")
    LOGGER.info(f"{prefix}{counts.images} images, {counts.backgrounds} backgrounds, {counts.corrupt} corrupt, "
                f"{counts.duplicates} duplicates removed, {counts.clipped_boxes} boxes clipped in "
                f"{counts.clipped_files} files" + (" (from cache)" if from_cache else ""))
    if not good:
        raise UserError(f"{prefix}{', '.join(str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths]))}: "
                        f"no usable images ({counts.corrupt} corrupt)")
    return DatasetScan(
        im_files=[r["im_file"] for r in good],
        label_files=img2label_paths([r["im_file"] for r in good]),
        labels=[np.array(r["labels"], np.float32).reshape(-1, 5) for r in good],
        polygons=[bool(r.get("polygons")) for r in good],
        shapes=np.array([r["shape"] for r in good], np.int64).reshape(-1, 2),
        counts=counts,
        msgs=msgs,
        from_cache=from_cache,
        cache_file=str(cpath),
    )
