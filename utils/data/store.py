"""The label store: one split's verification results as flat arrays in one uncompressed .npz file, memory-mapped.

Why: a split of a million images held as Python lists (paths, one small array per image) costs gigabytes per
process, seconds to build from a JSON cache on every start, and grows in every loader worker as reference
counts touch the lists' pages (copy-on-write). Here every record lives in a handful of arrays (paths as bytes +
offsets, labels [rows, 5] + per-image offsets, sizes, status, file sizes/mtimes) inside a standard .npz: loading
maps the file (`mmap`, read-only) so loader workers and the ranks of a node share the same page-cache pages,
and nothing grows when a worker reads labels. Each member is written 64-byte aligned so it maps in place, and
the file stays readable with `np.load(path, allow_pickle=False)`; object arrays are refused, nothing is
unpickled or executed on load. Written atomically (temp file + rename).
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.general import LOGGER, UserError

from .checks import img2label_paths

FORMAT = "yolo-mqa label store"
ALIGN = 64
FIELDS = {  # name: (dtype, trailing shape); per record unless named in OFFSET_OF
    "paths": (np.uint8, ()),  # image paths, UTF-8, each ended by a NUL byte
    "path_off": (np.int64, ()),  # [n + 1] start of path i in `paths`
    "im_stat": (np.int64, (2,)),  # image (size, mtime_ns)
    "lb_stat": (np.int64, (2,)),  # label file (size, mtime_ns); (-1, 0) when missing
    "status": (np.int8, ()),  # checks.OK / BACKGROUND / CORRUPT
    "label": (np.int8, ()),  # checks.LABEL_OK / LABEL_MISSING / LABEL_EMPTY
    "shape": (np.int32, (2,)),  # displayed (w, h); 0 when the image is unreadable
    "lb_off": (np.int64, ()),  # [n + 1] first label row of image i
    "labels": (np.float32, (5,)),  # all label rows: cls xc yc w h (normalised)
    "polygons": (np.bool_, ()),  # the label file holds polygon rows (re-read on demand)
    "dup": (np.int32, ()),
    "clipped": (np.int32, ()),
    "msgs": (np.uint8, ()),  # messages, UTF-8; one record's messages separated by newlines
    "msg_off": (np.int64, ()),  # [n + 1]
    "meta": (np.uint8, ()),  # JSON: format, version, nc, hash, split-level notes
}
OFFSET_OF = {"path_off": "paths", "lb_off": "labels", "msg_off": "msgs"}


def encode_strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (UTF-8 bytes, each followed by NUL; offsets [n + 1]). File names that are not valid UTF-8
    round-trip through surrogateescape, as os.listdir gives them."""
    blob = np.frombuffer(("\0".join(items) + "\0").encode("utf-8", "surrogateescape"), np.uint8) if len(items) \
        else np.zeros(0, np.uint8)
    return blob, np.concatenate(([0], np.flatnonzero(blob == 0) + 1)).astype(np.int64)


def decode_strings(blob: np.ndarray) -> list[str]:
    return blob.tobytes().decode("utf-8", "surrogateescape").split("\0")[:-1] if len(blob) else []


def rows_of(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row indices start[i] .. start[i]+count[i]-1 for every i, concatenated."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    begin = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.repeat(starts.astype(np.int64) - begin, counts) + np.arange(total)


def listing_hash(version: str, nc: int, paths: np.ndarray, im_stat: np.ndarray, lb_stat: np.ndarray) -> str:
    """sha256 of the checking rules' version, nc and every image path with its own and its label's size/mtime."""
    h = hashlib.sha256(f"{version}|nc={nc}|n={len(im_stat)}\n".encode())
    for a in (paths, im_stat, lb_stat):
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


class LabelStore:
    """Flat arrays of one split (all images, corrupt ones included, so a re-scan can reuse their verdicts)."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str | None = None):
        self.a = arrays
        self.meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
        self.path = path  # set when the arrays map this file

    def __len__(self) -> int:
        return len(self.a["status"])

    @property
    def hash(self) -> str:
        return self.meta.get("hash", "")

    def path_of(self, i: int) -> str:
        o = self.a["path_off"]
        return self.a["paths"][o[i]:o[i + 1] - 1].tobytes().decode("utf-8", "surrogateescape")

    def all_paths(self) -> list[str]:
        return decode_strings(self.a["paths"])

    def labels_of(self, i: int) -> np.ndarray:
        o = self.a["lb_off"]
        return self.a["labels"][o[i]:o[i + 1]]

    def msgs_of(self, i: int) -> list[str]:
        o = self.a["msg_off"]
        text = self.a["msgs"][o[i]:o[i + 1] - 1].tobytes().decode("utf-8", "surrogateescape")
        return text.split("\n") if text else []

    # ---- writing
    def save(self, path: str | Path, prefix: str = "") -> bool:
        """Write atomically as an uncompressed .npz whose members start 64-byte aligned; an unwritable folder only
        warns."""
        path = Path(path)
        tmp = Path(f"{path}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                for name in FIELDS:
                    _write_member(zf, f, name, np.ascontiguousarray(self.a[name]))
            os.replace(tmp, path)
            return True
        except OSError as e:
            LOGGER.warning(f"{prefix}WARNING: cache not saved, {path.parent} is not writeable ({e.strerror or e})")
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return False

    # ---- reading
    @classmethod
    def load(cls, path: str | Path) -> "LabelStore | None":
        """Map a store file read-only; None when it is missing, not a store (e.g. the JSON cache of earlier
        versions), damaged or inconsistent. Only plain numeric arrays are accepted."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 4 or f.read(4) != b"PK\x03\x04":
                    return None
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                arrays = _map_members(f, mm, size)
            if arrays is None or not _consistent(arrays):
                return None
            store = cls(arrays, str(path))
            return store if store.meta.get("format") == FORMAT else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, struct.error):
            return None

    def __getstate__(self) -> dict:
        """Pickled for spawned processes: a mapped store travels as its path (and re-maps the same file)."""
        if self.path is not None:
            return {"path": self.path, "hash": self.hash}
        return {"arrays": {k: np.asarray(v) for k, v in self.a.items()}}

    def __setstate__(self, state: dict) -> None:
        if "arrays" in state:
            self.__init__(state["arrays"])
            return
        other = LabelStore.load(state["path"])
        if other is None or other.hash != state["hash"]:
            raise UserError(f"{state['path']}: label cache changed or removed while the dataset was in use; "
                            f"restart to re-read it")
        self.__dict__.update(other.__dict__)


def _write_member(zf: zipfile.ZipFile, f, name: str, arr: np.ndarray) -> None:
    """One .npy member, padded (zip extra field 0xD935, as zipalign does) so the array data starts 64-aligned."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(arr))
    header = header.getvalue()  # a multiple of 64 bytes long
    fname = f"{name}.npy"
    zinfo = zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0))
    zinfo.compress_type = zipfile.ZIP_STORED
    zinfo.file_size = len(header) + arr.nbytes
    local = 30 + len(fname.encode()) + 20  # local header + name + the zip64 extra that force_zip64 adds
    pad = -(f.tell() + local) % ALIGN
    if pad and pad < 4:
        pad += ALIGN
    zinfo.extra = struct.pack("<HH", 0xD935, pad - 4) + bytes(pad - 4) if pad else b""
    with zf.open(zinfo, "w", force_zip64=True) as dest:
        dest.write(header)
        flat = arr.reshape(-1).view(np.uint8) if arr.size else np.zeros(0, np.uint8)
        step = 1 << 24
        for i in range(0, len(flat), step):
            dest.write(flat[i:i + step].data)


def _map_members(f, mm: mmap.mmap, size: int) -> dict[str, np.ndarray] | None:
    """Each known member as an array over the mapping (zero copy); None if a member is compressed, unknown,
    holds objects or runs past the end of the file."""
    arrays = {}
    with zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else None
            if name not in FIELDS or info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            n_name, n_extra = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + n_name + n_extra)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            want, trailing = FIELDS[name]
            if (dtype.hasobject or fortran or dtype != np.dtype(want) or tuple(shape[1:]) != trailing
                    or min(shape, default=0) < 0):
                return None
            count = int(np.prod(shape))
            start = f.tell()
            if start + count * dtype.itemsize > size:
                return None
            arrays[name] = np.frombuffer(mm, dtype, count, start).reshape(shape)
    return arrays if set(arrays) == set(FIELDS) else None


def _consistent(a: dict[str, np.ndarray]) -> bool:
    """Lengths and offsets agree (a damaged file must not index out of range later)."""
    n = len(a["status"])
    if any(len(a[k]) != n for k in ("im_stat", "lb_stat", "label", "shape", "polygons", "dup", "clipped")):
        return False
    for off, data in OFFSET_OF.items():
        o = a[off]
        if len(o) != n + 1 or o[0] != 0 or o[-1] != len(a[data]) or (n and (np.diff(o) < 0).any()):
            return False
    return True


def build_store(paths: Sequence[str] | np.ndarray, path_off: np.ndarray | None, im_stat: np.ndarray,
                lb_stat: np.ndarray, parts: dict[str, np.ndarray], msgs: list[str], meta: dict) -> LabelStore:
    """A store in memory from per-record arrays (`parts`: status, label, shape, counts, labels, polygons, dup,
    clipped) and the per-record messages."""
    if path_off is None:
        paths, path_off = encode_strings(paths)
    msg_blob, msg_off = encode_strings(msgs)
    a = {"paths": paths, "path_off": path_off, "im_stat": im_stat, "lb_stat": lb_stat,
         "lb_off": np.concatenate(([0], np.cumsum(parts["counts"]))).astype(np.int64), "msgs": msg_blob,
         "msg_off": msg_off, "meta": np.frombuffer(json.dumps({"format": FORMAT, **meta}).encode(), np.uint8)}
    for k in ("status", "label", "shape", "labels", "polygons", "dup", "clipped"):
        a[k] = np.ascontiguousarray(parts[k], FIELDS[k][0])
    a["labels"] = a["labels"].reshape(-1, 5)
    return LabelStore(a)


class PathList(Sequence):
    """Image paths of the given store records, decoded on access (no list of a million strings per process)."""

    def __init__(self, store: LabelStore, rows: np.ndarray):
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.store.path_of(r) for r in self.rows[i]]
        return self.store.path_of(self.rows[i])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    def __add__(self, other) -> list[str]:  # list-like where a list was used: a plain list comes back
        return list(self) + list(other)

    def __radd__(self, other) -> list[str]:
        return list(other) + list(self)

    def __mul__(self, k: int) -> list[str]:
        return list(self) * k

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


class LabelPathList(PathList):
    """Label file paths of the given records (derived from the image paths)."""

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return img2label_paths(got) if isinstance(i, slice) else img2label_paths([got])[0]


class LabelList(Sequence):
    """Per-image label arrays [k, 5] (cls xc yc w h) of the given records: read-only views into the store,
    or copies with class 0 when single_cls."""

    def __init__(self, store: LabelStore, rows: np.ndarray, single_cls: bool = False):
        self.store, self.rows, self.single_cls = store, rows, single_cls

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        lb = self.store.labels_of(self.rows[i])
        if self.single_cls:
            lb = lb.copy()
            lb[:, 0] = 0
        return lb

    def counts(self) -> np.ndarray:
        """Label rows per image, [n]."""
        o = self.store.a["lb_off"]
        return (o[self.rows + 1] - o[self.rows]).astype(np.int64)

    def classes(self) -> np.ndarray:
        """Class ids of every row of these images, in image order, [sum(counts)] int64."""
        if self.single_cls:
            return np.zeros(int(self.counts().sum()), np.int64)
        rows = rows_of(self.store.a["lb_off"][self.rows], self.counts())
        return self.store.a["labels"][rows, 0].astype(np.int64)

    def __repr__(self) -> str:
        return f"LabelList({len(self)} images)"
