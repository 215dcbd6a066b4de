"""Scanning a split: list its images, check every image/label pair once (in parallel processes), keep the verdicts
in the label store (store.py) next to the labels, and on later starts map that store instead of checking again.

Why: checking is what keeps a long run from dying on a bad file hours in, but it must not cost minutes on every
start of every process. The store is keyed by a hash of every image path with its own and its label's size and
mtime, nc and CACHE_VERSION; when it does not match, only the images whose files are new or changed are checked
again (an image whose file is unchanged keeps its size, so a changed label alone costs no image decode). Under
torchrun one process per node (local rank 0) scans; the others wait for it at a barrier and map the same file.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from utils.general import LOGGER, UserError
from utils.threads import usable_cores

from .checks import (BACKGROUND, CORRUPT, IMG_FORMATS, LABEL_EMPTY, LABEL_MISSING, FolderGroups, LabelFile,  # noqa: F401
                     Verified, check_image, collect_image_files, exif_size, img2label_paths, label_folder, label_name,
                     parse_label_file, verify_pairs)
from .store import (LabelList, LabelPathList, LabelStore, PathList, build_store, decode_strings, encode_strings,
                    listing_hash, rows_of)

CACHE_VERSION = "yolo-mqa-labels-4"  # 2: records say which label files hold polygons; 3: boxes past the
#                                       image edge are clipped and kept (were: image dropped), counted per file;
#                                       4: the label store (flat arrays in a memory-mapped .npz) replaces JSON
CHUNK = 512  # images per task of a verification process
PROGRESS_MIN = 1000  # show a progress bar when at least this many images are checked
STAT_THREADS_MIN, STAT_FORK_MIN = 8192, 65536  # images from which the stat calls run in threads / forked processes


def _stat_chunk(files: Iterable[str], dir_fd: int | None = None) -> list[tuple[int, int]]:
    out = []
    for f in files:
        try:
            st = os.stat(f, dir_fd=dir_fd)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, 0))
    return out


def _stat_pairs(files: Sequence[str]) -> np.ndarray:
    """[2, len(files), 2]: the images' (size, mtime_ns), then their label files' (the paths derived here)."""
    return np.array(_stat_chunk(files) + _stat_chunk(img2label_paths(files)), np.int64).reshape(2, -1, 2)


def _stat_in(folder: str, names: list[str]) -> list[tuple[int, int]]:
    """_stat_chunk of names in one folder through a descriptor of it: the kernel looks up the name only, not
    every component of the path again (~10% less per call, measured at 1M images)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # no such folder (a split without labels): every file missing
        return [(-1, 0)] * len(names)
    try:
        return _stat_chunk(names, fd)
    finally:
        os.close(fd)


def _stat_groups(groups: FolderGroups, a: int, b: int) -> np.ndarray:
    """_stat_pairs of the images a..b of `groups` (indexes in path order), folder by folder."""
    ims, lbs, start = [], [], 0
    for real, names in groups.groups:
        lo, hi = max(a - start, 0), min(b - start, len(names))
        start += len(names)
        if lo < hi:
            part = names[lo:hi]
            ims += _stat_in(real, part)
            lbs += _stat_in(label_folder(real), [label_name(n) for n in part])
    return np.array(ims + lbs, np.int64).reshape(2, -1, 2)


_FORKED: Sequence[str] | FolderGroups = ()  # what a forked stat process reads (inherited, never pickled)


def _stat_span(a: int, b: int, listing: Sequence[str] | FolderGroups | None = None) -> np.ndarray:
    """_stat_pairs of the images a..b of `listing` (a forked process: of the one it inherited)."""
    listing = _FORKED if listing is None else listing
    return _stat_groups(listing, a, b) if isinstance(listing, FolderGroups) else _stat_pairs(listing[a:b])


class SplitStats:
    """(size, mtime_ns) of every image of a split and of its label file, (-1, 0) when missing: started here,
    collected by result().

    Every start of every process stats the whole split (that is what keys the label store), so at 100k+ images
    the system calls, and the label paths they need, run in forked processes (the listing is inherited, not
    sent), else in threads. Given a walk's FolderGroups the processes start before the paths are joined and
    stat through folder descriptors, while this process joins and encodes the paths (at 1M images ~1 s of its
    work then overlaps theirs)."""

    def __init__(self, listing: Sequence[str] | FolderGroups):
        global _FORKED
        n, cpus = len(listing), min(usable_cores(), 8)
        self._pool, self._parts = None, []
        if n >= STAT_FORK_MIN and cpus > 1 and "fork" in multiprocessing.get_all_start_methods():
            step = -(-n // (4 * cpus))
            _FORKED = listing  # read by the children, which fork at the first submit
            self._pool = ProcessPoolExecutor(cpus, mp_context=multiprocessing.get_context("fork"))
            self._parts = [self._pool.submit(_stat_span, a, min(a + step, n)) for a in range(0, n, step)]
        elif n < STAT_THREADS_MIN:
            self._parts = [_stat_span(0, n, listing)]
        else:
            self._pool, step = ThreadPoolExecutor(min(4, cpus)), 4096
            self._parts = [self._pool.submit(_stat_span, a, min(a + step, n), listing) for a in range(0, n, step)]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, label files): [n, 2] int64 each."""
        try:
            both = np.concatenate([p if isinstance(p, np.ndarray) else p.result() for p in self._parts], axis=1)
        finally:
            self.close()
        return both[0], both[1]

    def close(self) -> None:
        global _FORKED
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        _FORKED = ()


def stat_split(im_files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images, label files): [n, 2] int64 (size, mtime_ns) of each, (-1, 0) when missing (SplitStats)."""
    return SplitStats(im_files).result()


def cache_path_for(label_files: list[str], paths=None) -> Path:
    """labels/train/x.txt -> labels/train.cache (next to the label folder).

    A split given as a .txt image list may point anywhere (outside the dataset): its cache goes next to
    the .txt file instead, so files listed from other folders are only ever read, never written beside.
    """
    first = (paths if isinstance(paths, (list, tuple)) else [paths])[0] if paths is not None else None
    if first is not None and Path(first).is_file() and Path(first).suffix.lower() == ".txt":
        return Path(first).with_suffix(".cache")
    return Path(label_files[0]).parent.with_suffix(".cache")


def _orphan_labels(label_files: list[str]) -> list[str]:
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
    """A verified split: usable images with their labels (aligned sequences over the store), counts and the
    messages logged."""

    im_files: PathList
    label_files: LabelPathList
    labels: LabelList  # per image [n, 5] float32 cls xc yc w h (normalised), read-only views
    polygons: list[bool]  # which label files hold polygon rows (their points are re-read on demand)
    shapes: np.ndarray  # [n, 2] (w, h) as displayed
    counts: ScanCounts
    msgs: list[str]
    from_cache: bool
    cache_file: str
    store: LabelStore | None = None
    rows: np.ndarray | None = None  # store record of each usable image
    verified: int = 0  # images checked by this call (0: everything came from the cache)


@contextmanager
def node_leader_first(enabled: bool):
    """Under torch.distributed: local rank 0 runs the block first; the node's other ranks wait at a barrier and
    run it after (finding the store it wrote). Yields True in those followers. Every rank calls barrier()
    exactly once, also when the block raises, so a failing leader never leaves the others waiting."""
    import torch.distributed as dist
    active = enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if active and not leader:
        dist.barrier()
    try:
        yield active and not leader
    finally:
        if active and leader:
            dist.barrier()


def _pool_context():
    """fork where available (nothing to re-import in the workers), else the platform default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def verify_parallel(im_files: list[str], lb_files: list[str], nc: int, im_sizes: list[int], lb_sizes: list[int],
                    known_shapes: list | None, prefix: str = "", workers: int | None = None) -> Verified:
    """verify_pairs over chunks of the list in worker processes (label parsing holds the GIL, so threads
    would not scale), results in list order; a progress bar with images/s for large lists."""
    n = len(im_files)
    spans = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
    workers = min(workers or usable_cores(), len(spans))
    args = [(im_files[a:b], lb_files[a:b], nc, im_sizes[a:b], known_shapes[a:b] if known_shapes else None,
             lb_sizes[a:b]) for a, b in spans]
    bar = tqdm(total=n, desc=f"{prefix}Checking images", unit=" images", disable=n < PROGRESS_MIN,
               bar_format="{l_bar}{bar:10}{r_bar}")
    parts = []
    try:
        if workers <= 1:
            for a in args:
                parts.append(verify_pairs(*a))
                bar.update(len(a[0]))
        else:
            with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                for part in pool.map(verify_pairs, *zip(*args)):
                    parts.append(part)
                    bar.update(len(part.status))
    finally:
        bar.close()
    if not parts:
        z = np.zeros
        return Verified(z(0, np.int8), z(0, np.int8), z((0, 2), np.int32), z(0, np.int64), z((0, 5), np.float32),
                        z(0, bool), z(0, np.int32), z(0, np.int32), [])
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in
           ("status", "label", "shape", "counts", "labels", "polygons", "dup", "clipped")}
    return Verified(**cat, msgs=[m for p in parts for m in p.msgs])


def _merge(n: int, old: LabelStore | None, old_idx: np.ndarray, reuse: np.ndarray, todo: np.ndarray,
           new: Verified) -> tuple[dict, list[str]]:
    """Per-record arrays of the whole split: records in `reuse` copied from the old store, `todo` from `new`."""
    fields = {"status": np.int8, "label": np.int8, "polygons": bool, "dup": np.int32, "clipped": np.int32}
    parts = {k: np.zeros(n, t) for k, t in fields.items()}
    parts["shape"], parts["counts"] = np.zeros((n, 2), np.int32), np.zeros(n, np.int64)
    msgs = [""] * n
    if len(reuse):
        src = old_idx[reuse]
        for k in fields:
            parts[k][reuse] = old.a[k][src]
        parts["shape"][reuse] = old.a["shape"][src]
        o = old.a["lb_off"]
        parts["counts"][reuse] = o[src + 1] - o[src]
        old_msgs = decode_strings(old.a["msgs"])
        for i, s in zip(reuse.tolist(), src.tolist()):
            msgs[i] = old_msgs[s]
    for k in fields:
        parts[k][todo] = getattr(new, k)
    parts["shape"][todo], parts["counts"][todo] = new.shape, new.counts
    for i, m in zip(todo.tolist(), new.msgs):
        msgs[i] = m
    lb_off = np.concatenate(([0], np.cumsum(parts["counts"])))
    labels = np.zeros((int(lb_off[-1]), 5), np.float32)
    if len(reuse):
        labels[rows_of(lb_off[reuse], parts["counts"][reuse])] = \
            old.a["labels"][rows_of(old.a["lb_off"][old_idx[reuse]], parts["counts"][reuse])]
    if len(todo):
        labels[rows_of(lb_off[todo], new.counts)] = new.labels
    parts["labels"] = labels
    return parts, msgs


def _scan_or_load(paths, nc: int, prefix: str, use_cache: bool,
                  fresh: bool = False) -> tuple[LabelStore, list[str], str, int]:
    """(store, messages about the listing, cache path, images checked now). fresh: the node's leader has just
    checked this split against the files, so a store listing the same images is taken without a stat each."""
    early: list[SplitStats] = []  # a folder's stats, started before its paths are joined (not for a follower)
    try:
        im_files, list_msgs = collect_image_files(paths, on_groups=None if fresh else lambda g: early.append(SplitStats(g)))
        cpath = cache_path_for(img2label_paths(im_files[:1]), paths)
        if fresh and use_cache:
            store = LabelStore.load(cpath)
            if (store is not None and store.meta.get("version") == CACHE_VERSION and store.meta.get("nc") == nc
                    and store.all_paths() == im_files):
                return store, list_msgs, str(cpath), 0
        stats = early.pop() if early else SplitStats(im_files)
        blob, path_off = encode_strings(im_files)  # while the stat processes work
        im_stat, lb_stat = stats.result()
    finally:
        for s in early:
            s.close()
    want = listing_hash(CACHE_VERSION, nc, blob, im_stat, lb_stat)
    old = LabelStore.load(cpath) if use_cache else None
    why = ""
    if old is None and use_cache and cpath.is_file():
        why = "not a label store of this version (an older cache, damaged or tampered with)"
    elif old is not None and old.meta.get("version") != CACHE_VERSION:
        why = f"written with other checking rules ({old.meta.get('version')})"
    elif old is not None and old.meta.get("nc") != nc:
        why = f"written for {old.meta.get('nc')} classes, not {nc}"
    if why:  # other checking rules or class range: every verdict may differ
        LOGGER.info(f"{prefix}{cpath}: {why}; checking every image again and replacing it")
        old = None
    if old is not None and old.hash == want:
        return old, list_msgs, str(cpath), 0
    n = len(im_files)
    old_idx, reuse = np.full(n, -1, np.int64), np.zeros(n, bool)
    if old is not None:
        if old.a["paths"].shape == blob.shape and np.array_equal(old.a["paths"], blob):
            old_idx[:] = np.arange(n)
        else:
            where = {p: i for i, p in enumerate(old.all_paths())}
            old_idx[:] = [where.get(p, -1) for p in im_files]
        found = old_idx >= 0
        src = old_idx[found]
        same_im = np.zeros(n, bool)
        same_im[found] = (old.a["im_stat"][src] == im_stat[found]).all(1)
        reuse[found] = same_im[found] & (old.a["lb_stat"][src] == lb_stat[found]).all(1)
    todo = np.flatnonzero(~reuse)
    lb_files = img2label_paths(im_files)
    known = None
    if old is not None:  # unchanged image, changed label: the image's size is known, no decode needed
        known = [tuple(old.a["shape"][old_idx[i]]) if same_im[i] and old.a["shape"][old_idx[i]].min() > 0 else None
                 for i in todo.tolist()]
    new = verify_parallel([im_files[i] for i in todo], [lb_files[i] for i in todo], nc,
                          im_stat[todo, 0].tolist(), lb_stat[todo, 0].tolist(), known, prefix)
    parts, msgs = _merge(n, old, old_idx, np.flatnonzero(reuse), todo, new)
    # a .txt image list names a subset on purpose (train.txt and val.txt share one labels/ folder): only a
    # split given as folders says which label files lack their image
    folders = all(Path(p).is_dir() for p in (paths if isinstance(paths, (list, tuple)) else [paths]))
    orphans = _orphan_labels(lb_files) if folders else []
    notes = [f"{len(orphans)} label files have no image, e.g. {orphans[0]}"] if orphans else []
    store = build_store(blob, path_off, im_stat, lb_stat, parts, msgs,
                        {"version": CACHE_VERSION, "nc": nc, "hash": want, "notes": notes})
    if use_cache and cpath.parent.is_dir():  # no folder: no labels there either (said below), nothing to cache
        if store.save(cpath, prefix):
            store = LabelStore.load(cpath) or store  # map the file: pages shared with workers and other ranks
    return store, list_msgs, str(cpath), len(todo)


def scan_dataset(paths, nc: int, prefix: str = "", use_cache: bool = True, collective: bool = False) -> DatasetScan:
    """Collect, verify (or load from the label store) and summarise a split; logs each problem once.

    collective=True: every rank of a torch.distributed job calls this together; local rank 0 scans first."""
    with node_leader_first(collective) as follower:
        store, list_msgs, cache_file, verified = _scan_or_load(paths, nc, prefix, use_cache, fresh=follower)
    a = store.a
    status, label = a["status"], a["label"]
    rows = np.flatnonzero(status != CORRUPT)
    clipped = a["clipped"]
    counts = ScanCounts(
        found=len(store), images=len(rows), backgrounds=int((status == BACKGROUND).sum()),
        corrupt=int((status == CORRUPT).sum()), duplicates=int(a["dup"].sum()),
        missing_labels=int((label == LABEL_MISSING).sum()), empty_labels=int((label == LABEL_EMPTY).sum()),
        clipped_boxes=int(clipped.sum()), clipped_files=int((clipped > 0).sum()))
    msgs = list(list_msgs)
    for i in np.flatnonzero(np.diff(a["msg_off"]) > 1).tolist():  # records with messages
        msgs += store.msgs_of(i)
    msgs = list(dict.fromkeys(msgs + store.meta.get("notes", [])))  # each problem once, in order
    if counts.clipped_files:  # one line, not one per file: tools that overshoot the edge do it everywhere
        examples = img2label_paths([store.path_of(i) for i in np.flatnonzero(clipped)[:3]])
        msgs.append(f"{counts.clipped_boxes} boxes extend past the image edge: clipped to it and kept "
                    f"({counts.clipped_files} label files, e.g. {', '.join(examples)})")
    if counts.images and counts.missing_labels == counts.images:  # not one label file: a layout problem
        folders = sorted({os.path.dirname(f) for f in img2label_paths(PathList(store, rows)[:])})
        more = f" and {len(folders) - 1} more folder(s)" if len(folders) > 1 else ""
        msgs.append(f"no label files found for any of the {counts.images} images: looked for "
                    f"{os.path.join(folders[0], '<image name>.txt')}{more} (a labels/ folder beside images/, "
                    f"same sub-folders); every image counts as background")
    for m in msgs:
        LOGGER.warning(f"{prefix}WARNING: {m}")
    how = (" (from cache)" if not verified else
           f" ({verified} new or changed images checked, {len(store) - verified} from cache)"
           if verified < len(store) else "")
    LOGGER.info(f"{prefix}{counts.images} images, {counts.backgrounds} backgrounds, {counts.corrupt} corrupt, "
                f"{counts.duplicates} duplicates removed, {counts.clipped_boxes} boxes clipped in "
                f"{counts.clipped_files} files" + how)
    if not len(rows):
        named = ", ".join(str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths]))
        raise UserError(f"{prefix}{named}: no usable images ({counts.corrupt} corrupt)")
    return DatasetScan(
        im_files=PathList(store, rows), label_files=LabelPathList(store, rows), labels=LabelList(store, rows),
        polygons=a["polygons"][rows].tolist(), shapes=a["shape"][rows].astype(np.int64), counts=counts, msgs=msgs,
        from_cache=verified == 0, cache_file=cache_file, store=store, rows=rows, verified=verified)
