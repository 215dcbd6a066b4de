"""The label store: plain arrays mapped from one .npz (nothing unpickled), shared by processes, re-checking only
what changed, and the same verdicts from parallel worker processes as from one process."""
import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.data import YOLODataset, create_dataloader
from utils.data import checks, verify
from utils.data.store import LabelStore
from utils.data.verify import scan_dataset
from utils.threads import usable_cores


def make_split(root: Path, n: int, seed: int = 0) -> Path:
    """n small JPEGs with 1-4 box rows each under root/images/train (+ labels)."""
    rng = np.random.default_rng(seed)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(40, 90)), int(rng.integers(30, 70))
        cv2.imwrite(str(root / "images" / "train" / f"{i:03d}.jpg"), np.full((h, w, 3), i % 255, np.uint8))
        rows = [f"{rng.integers(0, 3)} {rng.uniform(0.3, 0.7):.4f} {rng.uniform(0.3, 0.7):.4f} 0.2 0.3"
                for _ in range(int(rng.integers(1, 5)))]
        (root / "labels" / "train" / f"{i:03d}.txt").write_text("\n".join(rows) + "\n")
    return root / "images" / "train"


def as_dict(scan) -> dict:
    return {f: (np.array(lb), tuple(s)) for f, lb, s in zip(scan.im_files, scan.labels, scan.shapes)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)


class Payload:
    """What a pickle-based cache loader would execute: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_store_maps_plain_arrays_and_never_unpickles(tmp_path):
    src = make_split(tmp_path / "ds", 12)
    first = scan_dataset(src, 3)
    cache = Path(first.cache_file)
    store = LabelStore.load(cache)
    assert store is not None and store.path == str(cache)
    for name, arr in store.a.items():  # read-only views of one shared file mapping, aligned for in-place use
        assert not arr.flags.writeable and arr.ctypes.data % 64 == 0, name
    with np.load(cache, allow_pickle=False) as z:  # a standard .npz of plain arrays
        assert all(np.array_equal(z[k], store.a[k]) for k in store.a)
        assert json.loads(z["meta"].tobytes())["hash"] == store.hash
    # a dataset pickled for a spawned worker carries the store as its path and maps the same file again
    ds = YOLODataset(src, imgsz=64, nc=3)
    assert len(pickle.dumps(ds.store)) < 1000
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.store.path == str(cache) and all(np.array_equal(a, b) for a, b in zip(clone.labels, ds.labels))
    assert list(clone.im_files) == list(ds.im_files)
    # a cache file holding a pickled object: refused without unpickling, rescanned and replaced
    marker = tmp_path / "executed"
    with open(tmp_path / "evil", "wb") as f:  # replaced, not rewritten in place: this process maps the old file
        np.savez(f, **{k: np.asarray(v) for k, v in store.a.items() if k != "meta"},
                 meta=np.array([Payload(marker)], dtype=object))
    os.replace(tmp_path / "evil", cache)
    again = scan_dataset(src, 3)
    assert not marker.exists() and not again.from_cache and again.verified == 12
    assert same(as_dict(again), as_dict(first)) and scan_dataset(src, 3).from_cache
    # damaged: offsets that would index past the data are refused too
    store = LabelStore.load(cache)
    off = np.array(store.a["lb_off"])
    off[-1] += 5
    LabelStore({**store.a, "lb_off": off}).save(cache)
    assert LabelStore.load(cache) is None and not scan_dataset(src, 3).from_cache


def _counting(calls):
    real = checks.check_image

    def check(path, nbytes=None):
        calls.append(path)
        return real(path, nbytes)
    return check


def test_only_new_or_changed_files_are_checked_again(tmp_path, monkeypatch):
    src = make_split(tmp_path / "ds", 40)
    labels = tmp_path / "ds" / "labels" / "train"
    assert scan_dataset(src, 3).verified == 40
    calls = []
    monkeypatch.setattr(checks, "check_image", _counting(calls))
    edited = [3, 7, 8, 15, 16, 22, 29, 31, 35, 39]
    for i in edited:  # 10 label files edited: a different box
        (labels / f"{i:03d}.txt").write_text(f"2 0.5 0.5 0.1 0.{i % 9 + 1}\n")
    scan = scan_dataset(src, 3)
    assert scan.verified == 10 and not scan.from_cache
    assert calls == []  # their images are unchanged: sizes come from the store, no decode
    got = as_dict(scan)
    for i in edited:
        np.testing.assert_allclose(got[str(src.resolve() / f"{i:03d}.jpg")][0], [[2, 0.5, 0.5, 0.1, (i % 9 + 1) / 10]])
    assert same(got, as_dict(scan_dataset(src, 3, use_cache=False)))  # what a full scan finds
    assert scan_dataset(src, 3).from_cache
    calls.clear()
    # one image replaced (other size), one added, one removed with its label: two checked, two decodes
    cv2.imwrite(str(src / "005.jpg"), np.zeros((20, 33, 3), np.uint8))
    cv2.imwrite(str(src / "new.jpg"), np.zeros((25, 30, 3), np.uint8))
    (labels / "new.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (src / "012.jpg").unlink()
    (labels / "012.txt").unlink()
    scan = scan_dataset(src, 3)
    assert scan.verified == 2 and sorted(Path(c).name for c in calls) == ["005.jpg", "new.jpg"]
    got = as_dict(scan)
    assert got[str(src.resolve() / "005.jpg")][1] == (33, 20) and str(src.resolve() / "012.jpg") not in got
    assert same(got, as_dict(scan_dataset(src, 3, use_cache=False)))
    # another nc changes the class check of every row: everything is checked again
    assert scan_dataset(src, 5).verified == 40


PIDS = "YOLO_TEST_PIDS"


def _pid_check_image(path, nbytes=None):
    with open(os.environ[PIDS], "a") as f:
        f.write(f"{os.getpid()}\n")
    return REAL_CHECK(path, nbytes)


REAL_CHECK = checks.check_image


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_parallel_scan_matches_one_process(tmp_path, monkeypatch, capsys):
    src = make_split(tmp_path / "ds", 48)
    labels = tmp_path / "ds" / "labels" / "train"
    full = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[1]
    (src / "010.jpg").write_bytes(full.tobytes()[:300])  # truncated
    (labels / "011.txt").write_text("0 0.5 0.5 0.2\n")  # a bad row
    (labels / "012.txt").write_text("1 0.1 0.1 0.4 0.1 0.4 0.5\n0 0.99 0.5 0.1 0.2\n0 0.99 0.5 0.1 0.2\n")
    (labels / "013.txt").unlink()
    monkeypatch.setattr(verify, "CHUNK", 5)  # 10 tasks over the worker processes
    monkeypatch.setattr(verify, "PROGRESS_MIN", 1)
    monkeypatch.setenv(PIDS, str(tmp_path / "pids.txt"))
    monkeypatch.setattr(checks, "check_image", _pid_check_image)
    scan = scan_dataset(src, 3, use_cache=False)
    pids = set((tmp_path / "pids.txt").read_text().split())
    assert len(pids) == min(usable_cores(), 10) and str(os.getpid()) not in pids
    assert "images/s" in capsys.readouterr().err  # the progress bar
    files = sorted(str(f.resolve()) for f in src.glob("*.jpg"))
    one = checks.verify_pairs(files, [str(labels / (Path(f).stem + ".txt")) for f in files], 3)  # this process
    a = scan.store.a
    for k in ("status", "label", "shape", "polygons", "dup", "clipped", "labels"):
        assert np.array_equal(a[k], getattr(one, k)), k
    assert [scan.store.msgs_of(i) for i in range(48)] == [m.split("\n") if m else [] for m in one.msgs]
    assert scan.counts.corrupt == 2 and scan.counts.missing_labels == 1 and scan.counts.duplicates == 1
    assert scan.counts.clipped_boxes == 2 and a["polygons"].sum() == 1  # counted before duplicates go


def test_loader_workers_read_the_mapped_store(tmp_path):
    src = make_split(tmp_path / "ds", 16)
    loader, ds = create_dataloader(src, 64, 4, nc=3, workers=2, augment=False)
    seen = 0
    for imgs, targets, paths, _ in loader:
        for j, p in enumerate(paths):
            k = list(ds.im_files).index(p)
            want = np.asarray(ds.labels[k])
            got = targets[targets[:, 0] == j][:, 1].numpy()
            assert sorted(got.tolist()) == sorted(want[:, 0].tolist())
            seen += 1
    assert seen == 16 and ds.store.path is not None


def test_fast_box_parser_equals_the_full_parser(tmp_path, monkeypatch):
    """Clean box files take the numpy path; it must give the full parser's rows bit for bit, and leave every
    file it cannot vouch for (clipping, duplicates, polygons, bad rows) to the full parser."""
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(300):
        n = int(rng.integers(1, 15))
        wh = rng.uniform(0.001, 0.6, (n, 2))
        xy = rng.uniform(wh / 2, 1 - wh / 2)
        rows = [f"{int(rng.integers(0, 80))} {x:.{d}f} {y:.{d}f} {w:.{d}f} {h:.{d}f}"
                for (x, y), (w, h), d in zip(xy, wh, rng.integers(3, 9, n))]
        texts.append("\n".join(rows) + rng.choice(["\n", "", "\r\n\n"]))
    texts += ["0 0.99 0.5 0.1 0.2\n", "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n", "1 0.1 0.1 0.4 0.1 0.4 0.5\n",
              "0 0.5 0.5 0 0.2\n", "80 0.5 0.5 0.1 0.1\n", "0 nan 0.5 0.1 0.1\n", "1.0 0.5 0.5 0.1 0.1\n"]
    files = []
    for i, t in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_bytes(t.encode())
    fast = [checks.parse_label_file(str(f), 80) for f in files]
    assert sum(checks._clean_boxes(f.read_text(), 80) is not None for f in files) == 301  # 300 + "1.0 ..."
    monkeypatch.setattr(checks, "_clean_boxes", lambda text, nc: None)
    full = [checks.parse_label_file(str(f), 80) for f in files]
    for a, b in zip(fast, full):
        assert a.labels.dtype == b.labels.dtype and a.labels.tobytes() == b.labels.tobytes()
        assert (a.error, a.messages, a.n_duplicates, a.n_clipped) == (b.error, b.messages, b.n_duplicates, b.n_clipped)
        assert len(a.segments) == len(b.segments)


def test_listing_one_realpath_per_folder(tmp_path):
    """Folders are listed without a stat or realpath per file; symlinked files still resolve to their target,
    symlinked folders are not entered, hidden and non-image files are left out (the latter with a message)."""
    root = tmp_path.resolve()
    imgs, other = root / "imgs", root / "other"
    (imgs / "sub" / "deep").mkdir(parents=True)
    other.mkdir()
    for f in ["a.jpg", "B.PNG", ".hid.jpg", "sub/c.jpeg", "sub/deep/d.webp", "notes.md", "x.txt", "noext", ".jpg"]:
        (imgs / f).write_bytes(b"x")
    (other / "t.jpg").write_bytes(b"x")
    (imgs / "link.jpg").symlink_to(other / "t.jpg")
    (imgs / "linkdir").symlink_to(other)
    files, msgs = checks.collect_image_files(imgs, "p: ")
    assert files == sorted(str(f) for f in (imgs / "B.PNG", imgs / "a.jpg", imgs / "sub" / "c.jpeg",
                                            imgs / "sub" / "deep" / "d.webp", other / "t.jpg"))
    assert msgs == [f"p: {imgs / 'noext'}: skipped, not an image file (suffix '')",
                    f"p: {imgs / 'notes.md'}: skipped, not an image file (suffix '.md')"]
    assert checks.img2label_paths(files[:2] + ["x.jpg", "/d/images/.a.b.jpg", "/d/images/x/images/y.jpg"]) == [
        str(imgs / "B.txt"), str(imgs / "a.txt"), "x.txt", "/d/labels/.a.b.txt", "/d/images/x/labels/y.txt"]


@pytest.mark.parametrize("mode", ["serial", "threads", "forked"])
def test_split_stats_match_os_stat_in_every_mode(tmp_path, monkeypatch, mode):
    """The stat of every image and of its label file (derived in the stat workers, so a start with an up-to-date
    store never builds the label paths itself) equals os.stat in each mode, across folders and chunk boundaries;
    a missing label is (-1, 0)."""
    # image folder -> its label folder, written out by hand (the last /images/ is the one replaced)
    folders = {tmp_path / "images" / "a": tmp_path / "labels" / "a",
               tmp_path / "images" / "b" / "images" / "c": tmp_path / "images" / "b" / "labels" / "c"}
    im_files, labels = [], []
    for k, (imd, lbd) in enumerate(folders.items()):
        imd.mkdir(parents=True)
        lbd.mkdir(parents=True)
        for i in range(21):
            (imd / f"{i:02d}.jpg").write_bytes(b"x" * (i + 1))
            im_files.append(str(imd / f"{i:02d}.jpg"))
            labels.append(str(lbd / f"{i:02d}.txt"))
            if i % 5:
                Path(labels[-1]).write_text("0 0.5 0.5 0.1 0.1\n" * (i + k))
    if mode != "serial":
        monkeypatch.setattr(verify, "STAT_THREADS_MIN", 1)
    if mode == "forked":
        monkeypatch.setattr(verify, "STAT_FORK_MIN", 1)
        monkeypatch.setattr(verify, "usable_cores", lambda: 2)

    def expect(f: str) -> list[int]:
        try:
            st = os.stat(f)
            return [st.st_size, st.st_mtime_ns]
        except OSError:
            return [-1, 0]

    groups = checks.FolderGroups([(str(imd) + os.sep, [f"{i:02d}.jpg" for i in range(21)]) for imd in folders])
    assert groups.paths() == im_files
    for listing in (im_files, groups):  # paths, or a walk's folders (stat through folder descriptors)
        im_stat, lb_stat = verify.SplitStats(listing).result()
        assert im_stat.tolist() == [expect(f) for f in im_files]
        assert lb_stat.tolist() == [expect(f) for f in labels]
        assert (lb_stat[:, 0] == -1).sum() == 10 and (lb_stat[:, 0] > 0).sum() == 32  # every 5th label missing
    shutil.rmtree(tmp_path / "labels")  # a label folder that does not exist: every label of it missing
    assert (verify.SplitStats(groups).result()[1][:21] == [-1, 0]).all()


def test_a_folder_walk_in_path_order_starts_work_before_the_join(tmp_path):
    """A single folder tree whose folders' files sort together is handed out as FolderGroups before its paths
    are joined (the label store's stat processes start on it) and gives the same sorted list; one whose files
    sort between a sub-folder's does not, and is sorted as a whole."""
    root = tmp_path.resolve()
    for f in ["0.jpg", "a/1.jpg", "a/2.png", "b/3.jpg"]:
        (root / "t" / f).parent.mkdir(parents=True, exist_ok=True)
        (root / "t" / f).write_bytes(b"x")
    seen = []
    files, _ = checks.collect_image_files(root / "t", on_groups=seen.append)
    assert files == sorted(str(p) for p in (root / "t").rglob("*.*"))
    assert len(seen) == 1 and seen[0].paths() == files and len(seen[0]) == 4
    (root / "t" / "z.jpg").write_bytes(b"x")  # t/z.jpg sorts after t/a/..., t/b/...: folders interleave
    seen.clear()
    files, _ = checks.collect_image_files(root / "t", on_groups=seen.append)
    assert files == sorted(str(p) for p in (root / "t").rglob("*.*")) and seen == []
    files, _ = checks.collect_image_files([root / "t" / "a", root / "t" / "a"], on_groups=seen.append)
    assert files == [str(root / "t" / "a" / "1.jpg"), str(root / "t" / "a" / "2.png")] and seen == []  # two paths
