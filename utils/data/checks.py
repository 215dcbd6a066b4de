"""Per-file checks of a YOLO split: finding the images, reading an image's size and integrity, parsing a label file,
and verifying a run of image/label pairs into flat arrays (what a worker process of the scan returns).

Why: bad files are the most common way a long training run dies hours in. Every image and label is checked once;
problems are reported with file and reason and the image is dropped or the label repaired. The scan (verify.py)
runs `verify_pairs` over chunks of the split in parallel and keeps the results in the label store (store.py).
"""
from __future__ import annotations

import itertools
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.general import UserError

IMG_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"}
COORD_TOL = 0.02  # a coordinate up to this far outside [0, 1] is tool rounding; beyond it the row is pixels/garbage
FLOAT_TOL = 1e-4  # overshoot from rounding coordinates to text: clipped without being counted
MIN_IMG_SIDE = 10
NOT_IMAGE_SUFFIXES = (".txt", ".cache", ".npy", ".json", ".xml")  # files beside images that are not worth a warning

# record codes in the label store
OK, BACKGROUND, CORRUPT = 0, 1, 2  # status of an image
LABEL_OK, LABEL_MISSING, LABEL_EMPTY = 0, 1, 2  # state of its label file

Image.MAX_IMAGE_PIXELS = None  # very large aerial images are legitimate; size is checked by decoding


def _stem(name: str) -> str:
    """os.path.splitext(name)[0] for a file name (no separator): leading dots do not start a suffix."""
    i = name.rfind(".")
    return name[:i] if i > 0 and name[:i].strip(".") else name


def label_folder(folder: str) -> str:
    """The label folder (ending in a separator) of an image folder given with its trailing separator:
    .../images/a/ -> .../labels/a/ (last /images/ only); the same folder when there is none."""
    head, sep, tail = folder.rpartition(f"{os.sep}images{os.sep}")
    return head + f"{os.sep}labels{os.sep}" + tail if sep else folder


def label_name(name: str) -> str:
    """x.jpg -> x.txt (the last suffix replaced; a leading dot does not start one)."""
    i = name.rfind(".")
    return (name[:i] if i > 0 and name[0] != "." else _stem(name)) + ".txt"


def img2label_paths(img_paths: list[str]) -> list[str]:
    """.../images/x.jpg -> .../labels/x.txt (last /images/ only); same folder when there is none."""
    folder, lf, out = None, "", []
    for p in img_paths:  # images of one folder come together: its label folder is computed once
        f, slash, name = str(p).rpartition(os.sep)
        if f != folder:
            folder, lf = f, label_folder(f + slash)
        out.append(lf + label_name(name))
    return out


class FolderGroups:
    """A folder walk's images as (real folder + separator, sorted image names) groups, in an order where joining
    them gives the sorted path list: what the stat processes of a large split start on before a million paths
    are joined (utils/data/verify.py SplitStats). len() counts images."""

    def __init__(self, groups: list[tuple[str, list[str]]]):
        self.groups = groups
        self.count = sum(len(names) for _, names in groups)

    def __len__(self) -> int:
        return self.count

    def paths(self) -> list[str]:
        return [real + n for real, names in self.groups for n in names]

    @staticmethod
    def in_path_order(found: list[tuple[str, list[str]]]) -> FolderGroups | None:
        """The groups (names sorted in place) ordered by folder, if their concatenation is sorted (each group's
        last path before the next one's first: not so when a folder's files sort between its sub-folders'),
        else None."""
        groups = sorted(((real, names) for real, names in found if names), key=lambda g: g[0])
        for _, names in groups:
            names.sort()
        if any(not ra + na[-1] < rb + nb[0] for (ra, na), (rb, nb) in zip(groups, groups[1:])):
            return None
        return FolderGroups(groups)


def _walk_images(folder: Path, prefix: str, msgs: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Images under a folder, recursively (symlinked sub-folders are not entered): ([(real folder + separator,
    image names)], resolved targets of symlinked images), unsorted.

    One realpath for the folder instead of one per file: os.scandir's entries know their type without a stat,
    so only symlinked files cost a resolve (they resolve to their target, as before)."""
    stack = [(str(folder), os.path.realpath(folder))]
    found: list[tuple[str, list[str]]] = []  # (real folder + separator, image names in it)
    links: list[str] = []  # resolved targets of symlinked images
    other: list[str] = []  # non-image files, reported in path order
    while stack:
        shown, real = stack.pop()
        plain, odd = [], []
        with os.scandir(shown) as it:
            for e in it:  # the entry type comes from the directory listing: no stat for regular files
                (plain if e.is_file(follow_symlinks=False) else odd).append(e)
        real += os.sep
        names = []
        for e in plain:
            name = e.name
            if name[0] == ".":
                continue
            i = name.rfind(".")  # not hidden: a dot after the first character starts the suffix
            if i > 0 and name[i + 1:].lower() in IMG_FORMATS:
                names.append(name)
            else:
                other.append(e.path)
        found.append((real, names))
        for e in odd:  # folders (symlinked ones are not entered) and symlinks
            if e.is_dir(follow_symlinks=False):
                stack.append((e.path, real + e.name))
            elif e.is_file() and not e.name.startswith("."):
                if _stem(e.name) != e.name and e.name.rpartition(".")[2].lower() in IMG_FORMATS:
                    links.append(os.path.realpath(e.path))
                else:
                    other.append(e.path)
    for f in sorted(other, key=Path):
        suffix = Path(f).suffix
        if suffix.lower() not in NOT_IMAGE_SUFFIXES:
            msgs.append(f"{prefix}{Path(f)}: skipped, not an image file (suffix '{suffix}')")
    return found, links


def _resolve_file(f: Path, real_dirs: dict[str, str]) -> str | None:
    """str(f.resolve()) if f is a file, else None: one lstat per file and one realpath per folder (a realpath per
    file costs an lstat per path component; lists of a million images are common)."""
    try:
        st = os.lstat(f)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return str(f.resolve()) if f.is_file() else None
    if not stat.S_ISREG(st.st_mode):
        return None
    folder = str(f.parent)
    real = real_dirs.get(folder)
    if real is None:
        real = real_dirs[folder] = os.path.realpath(folder)
    return os.path.join(real, f.name)


def collect_image_files(paths: list[str | Path] | str | Path, prefix: str = "",
                        on_groups: Callable[[FolderGroups], None] | None = None) -> tuple[list[str], list[str]]:
    """Expand folders (recursively), .txt lists and single images into a sorted, de-duplicated list.

    Returns (image files, messages about skipped entries). A missing path or an empty result is a UserError.
    on_groups: called with the FolderGroups of a single folder (no symlinked images) before its paths are
    joined, so work that needs only folders and names can start early.
    """
    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    files, msgs = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found, links = _walk_images(p, prefix, msgs)
            groups = FolderGroups.in_path_order(found) if len(paths) == 1 and not links else None
            if groups is not None:  # one folder tree in path order: joined, its paths are sorted and unique
                if on_groups is not None and len(groups):
                    on_groups(groups)
                return _some(groups.paths(), paths), msgs
            files += [real + n for real, names in found for n in names] + links
        elif p.is_file() and p.suffix.lower() == ".txt":
            files += _read_list(p, prefix, msgs)
        elif p.is_file() and p.suffix[1:].lower() in IMG_FORMATS:
            files.append(str(p.resolve()))
        elif p.exists():
            raise UserError(f"{p}: not a folder, .txt image list or image")
        else:
            raise UserError(f"{p}: path does not exist")
    files.sort()
    unique = [f for f, _ in itertools.groupby(files)]
    if len(unique) < len(files):
        msgs.append(f"{prefix}{len(files) - len(unique)} image paths listed more than once, using each once")
    return _some(unique, paths), msgs


def _some(files: list[str], paths: list) -> list[str]:
    if not files:
        raise UserError(f"{', '.join(str(p) for p in paths)}: no images found "
                        f"(supported: {', '.join(sorted(IMG_FORMATS))})")
    return files


def _read_list(p: Path, prefix: str, msgs: list[str]) -> list[str]:
    """The images a .txt list names (relative to the list's folder), resolved; the others reported."""
    real_dirs: dict[str, str] = {}
    files = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = Path(line)
        f = f if f.is_absolute() else (p.parent / f)
        resolved = None if f.suffix[1:].lower() not in IMG_FORMATS else _resolve_file(f, real_dirs)
        if resolved is None:
            why = "not an image file" if f.suffix[1:].lower() not in IMG_FORMATS else "image missing"
            msgs.append(f"{prefix}{f}: skipped, {why} (listed in {p.name})")
        else:
            files.append(resolved)
    return files


def exif_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) as displayed, i.e. after the EXIF orientation rotation."""
    w, h = img.size
    try:
        orient = img.getexif().get(0x0112, 1)
    except Exception:
        orient = 1
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def check_image(im_file: str, nbytes: int | None = None) -> tuple[int, int]:
    """Decode (catches truncation and broken data); returns displayed (w, h). Raises ValueError with the reason.

    A JPEG is decoded once at 1/8 scale, luminance only: libjpeg still reads and Huffman-decodes every coefficient
    of every component (so truncated or broken files fail exactly as with a full decode) but skips the full-size
    inverse DCT, chroma upsampling and colour conversion (2-3x cheaper at 640 px).
    Other formats keep PIL's verify() (e.g. PNG chunk checksums) and a full decode.
    """
    if (os.path.getsize(im_file) if nbytes is None else nbytes) == 0:
        raise ValueError("zero-byte file")
    try:
        with Image.open(im_file) as im:
            fmt = (im.format or "").lower()
            if fmt == "jpeg":
                size = exif_size(im)  # from the header, before draft() changes im.size
                im.draft("L", (1, 1))  # luminance only (YCbCr files), 1/8 scale
                im.load()
            else:
                im.verify()
        if fmt != "jpeg":
            with Image.open(im_file) as im:
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


def _clean_boxes(text: str, nc: int) -> np.ndarray | None:
    """The common case at numpy speed: every row a box `cls xc yc w h` with an integer class in range, the box
    inside the image (nothing to clip), no duplicates. Returns the rows exactly as parse_label_file
    would (same float64 arithmetic, then float32), or None for anything else (parse_label_file then decides)."""
    parts = [p for p in (ln.split() for ln in text.splitlines()) if p]
    if not parts or any(len(p) != 5 for p in parts):
        return None
    try:
        v = np.array([float(t) for p in parts for t in p], np.float64).reshape(-1, 5)  # float() as the full parser
    except ValueError:
        return None
    if not np.isfinite(v).all():
        return None
    c, xy, wh = v[:, 0], v[:, 1:3], v[:, 3:5]
    lo, hi = xy - wh / 2, xy + wh / 2  # x1 y1, x2 y2 as parse_label_file computes them
    size = hi - lo
    if not ((c == np.floor(c)).all() and c.min() >= 0 and c.max() < nc
            and wh.min() > 0 and size.min() > 0 and lo.min() >= 0 and hi.max() <= 1):
        return None
    lb = np.empty((len(v), 5), np.float32)
    lb[:, 0], lb[:, 1:3], lb[:, 3:5] = c, (lo + hi) / 2, size
    return lb if len(set(map(tuple, lb.tolist()))) == len(lb) else None  # duplicates: the full parser says so


def parse_label_file(lb_file: str, nc: int) -> LabelFile:
    """Parse one label file: boxes (cls xc yc w h) and polygons (cls x1 y1 x2 y2 ...), duplicates removed.

    Polygon rows become their bounding box; their points ([k, 2], clipped to [0, 1]) come back in `segments`,
    aligned with the label rows, for the polygon-aware augmentation. They are not stored in the label store
    (re-read on demand). An error means the image is dropped: a partly wrong label file would teach the model that
    real objects are background.
    """
    notes: list[str] = []
    empty = np.zeros((0, 5), np.float32)

    def fail(reason: str) -> LabelFile:
        return LabelFile(empty, messages=notes, error=reason)

    try:
        with open(lb_file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        return fail("label file is not UTF-8 text")
    fast = _clean_boxes(text, nc)
    if fast is not None:
        return LabelFile(fast)
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


@dataclass
class Verified:
    """Results of `verify_pairs` for a run of k images, as flat arrays (cheap to send between processes)."""

    status: np.ndarray  # [k] int8: OK, BACKGROUND or CORRUPT
    label: np.ndarray  # [k] int8: LABEL_OK, LABEL_MISSING or LABEL_EMPTY
    shape: np.ndarray  # [k, 2] int32 displayed (w, h); 0 when the image itself is unreadable
    counts: np.ndarray  # [k] int64 label rows per image
    labels: np.ndarray  # [sum(counts), 5] float32 cls xc yc w h, normalised
    polygons: np.ndarray  # [k] bool: the label file holds polygon rows
    dup: np.ndarray  # [k] int32 duplicate rows removed
    clipped: np.ndarray  # [k] int32 rows clipped at the image edge
    msgs: list[str]  # [k] the image's messages joined by "\n" ("" for none)


def verify_pairs(im_files: list[str], lb_files: list[str], nc: int, im_sizes: list[int] | None = None,
                 known_shapes: list | None = None, lb_sizes: list[int] | None = None) -> Verified:
    """Check each image + label pair. known_shapes[i] (w, h) skips the decode of an image verified before and
    unchanged since (only its label file changed); im_sizes[i] and lb_sizes[i] (-1: missing) are what the caller
    already knows from its stat of the files."""
    k = len(im_files)
    status, label = np.full(k, CORRUPT, np.int8), np.zeros(k, np.int8)
    shape, counts = np.zeros((k, 2), np.int32), np.zeros(k, np.int64)
    polygons, dup, clipped = np.zeros(k, bool), np.zeros(k, np.int32), np.zeros(k, np.int32)
    rows, msgs = [], [""] * k
    for i, (im_file, lb_file) in enumerate(zip(im_files, lb_files)):
        known = known_shapes[i] if known_shapes is not None else None
        try:
            shape[i] = known if known is not None else check_image(im_file, im_sizes[i] if im_sizes else None)
        except (ValueError, OSError) as e:
            msgs[i] = f"{im_file}: image dropped, {e}"
            continue
        if (lb_sizes[i] < 0) if lb_sizes is not None else not os.path.isfile(lb_file):
            status[i], label[i] = BACKGROUND, LABEL_MISSING
            continue
        parsed = parse_label_file(lb_file, nc)
        if parsed.error:
            msgs[i] = f"{lb_file}: image dropped, {parsed.error}"
            continue
        lb = parsed.labels.round(6)
        msgs[i] = "\n".join(f"{lb_file}: {n}" for n in parsed.messages)
        status[i], label[i] = (OK, LABEL_OK) if len(lb) else (BACKGROUND, LABEL_EMPTY)
        counts[i], polygons[i] = len(lb), bool(parsed.segments)
        dup[i], clipped[i] = parsed.n_duplicates, parsed.n_clipped
        rows.append(lb)
    labels = np.concatenate(rows, 0) if rows else np.zeros((0, 5), np.float32)
    return Verified(status, label, shape, counts, labels, polygons, dup, clipped, msgs)
