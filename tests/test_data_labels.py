"""Label/image verification and the label cache: every bad-input kind has its documented outcome."""
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.data import YOLODataset, create_dataloader, img2label_paths, imread
from utils.data.verify import CACHE_VERSION, scan_dataset
from utils.general import UserError

GOOD = "0 0.5 0.5 0.4 0.3\n"


def write_img(path: Path, w=64, h=48, colour=(40, 160, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), colour, np.uint8)
    cv2.imwrite(str(path), img)
    return path


def write_label(root: Path, stem: str, text: str, split="train") -> Path:
    f = root / "labels" / split / f"{stem}.txt"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


BAD_LABELS = {  # stem -> label text that makes the image be dropped, and a word the reason must contain
    "cols": ("0 0.5 0.5 0.2\n", "columns"),
    "nonnum": ("0 a 0.5 0.2 0.2\n", "non-numeric"),
    "nan": ("0 nan 0.5 0.2 0.2\n", "NaN"),
    "inf": ("0 0.5 inf 0.2 0.2\n", "NaN or inf"),
    "outside": ("0 0.5 0.5 1.5 0.2\n", "outside [0, 1]"),
    "negsize": ("0 0.5 0.5 -0.2 0.2\n", "negative"),
    "clsbig": ("3 0.5 0.5 0.2 0.2\n", "outside 0..2"),
    "clsneg": ("-1 0.5 0.5 0.2 0.2\n", "outside 0..2"),
    "clsfloat": ("1.5 0.5 0.5 0.2 0.2\n", "not an integer"),
}


@pytest.fixture()
def messy(tmp_path):
    """A split with one of every kind of problem (all files made here; nothing binary is committed)."""
    root = tmp_path / "ds"
    im = root / "images" / "train"
    write_img(im / "good.jpg")
    write_label(root, "good", GOOD)
    (im / "zero.jpg").write_bytes(b"")
    full = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    (im / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (im / "notimg.jpg").write_text("this is not an image")
    (im / "readme.md").write_text("notes")
    for stem, (text, _) in BAD_LABELS.items():
        write_img(im / f"{stem}.png")
        write_label(root, stem, text)
    write_img(im / "overshoot.png")
    write_label(root, "overshoot", "1 0.5 0.5 1.01 0.2\n")
    write_img(im / "dup.png")
    write_label(root, "dup", GOOD + GOOD + "1 0.2 0.2 0.1 0.1\n")
    write_img(im / "empty.png")
    write_label(root, "empty", "\n")
    write_img(im / "missing.png")
    write_img(im / "poly.png")
    write_label(root, "poly", "2 0.1 0.1 0.4 0.1 0.4 0.5\n")
    write_label(root, "ghost", GOOD)  # label without an image
    # EXIF orientation 6 (rotate 90): stored 60x30 (w x h), displayed 30x60
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)  # left half red (RGB) in storage
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(im / "exif.jpg", exif=exif.tobytes(), quality=95)
    write_label(root, "exif", GOOD)
    # grayscale, RGBA, 16-bit
    cv2.imwrite(str(im / "gray.png"), np.full((40, 50), 200, np.uint8))
    cv2.imwrite(str(im / "rgba.png"), np.full((40, 50, 4), 100, np.uint8))
    cv2.imwrite(str(im / "deep.png"), np.full((40, 50, 3), 65535, np.uint16))
    for s in ("gray", "rgba", "deep"):
        write_label(root, s, GOOD)
    return root


def test_bad_inputs_outcomes(messy, caplog):
    caplog.set_level(logging.INFO)
    ds = YOLODataset(messy / "images" / "train", imgsz=64, nc=3)
    c = ds.counts
    dropped = {"zero", "trunc", "notimg", *BAD_LABELS}
    assert c.corrupt == len(dropped) == 12
    assert c.images == 10 and len(ds) == 10
    assert c.backgrounds == 2 and c.missing_labels == 1 and c.empty_labels == 1
    assert c.duplicates == 1
    stems = {Path(f).stem for f in ds.im_files}
    assert stems == {"good", "overshoot", "dup", "empty", "missing", "poly", "exif", "gray", "rgba", "deep"}
    text = caplog.text
    assert "10 images, 2 backgrounds, 12 corrupt, 1 duplicates removed" in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for stem in dropped:  # each problem: file named, reason given, reported exactly once
        hits = [m for m in warnings if f"{stem}." in m]
        assert len(hits) == 1, (stem, hits)
        if stem in BAD_LABELS:
            assert BAD_LABELS[stem][1] in hits[0]
        assert "dropped" in hits[0]
    assert any("zero-byte" in m for m in warnings)
    assert any("truncated" in m and "trunc.jpg" in m for m in warnings)
    assert any("readme.md" in m and "not an image" in m for m in warnings)
    assert any("label files have no image" in m and "ghost.txt" in m for m in warnings)
    assert any("overshoot.txt" in m and "clipped" in m for m in warnings)

    lab = {Path(f).stem: lb for f, lb in zip(ds.im_files, ds.labels)}
    np.testing.assert_allclose(lab["overshoot"], [[1, 0.5, 0.5, 1.0, 0.2]], atol=1e-6)  # clipped to the image
    np.testing.assert_allclose(lab["dup"], [[0, 0.5, 0.5, 0.4, 0.3], [1, 0.2, 0.2, 0.1, 0.1]], atol=1e-6)
    np.testing.assert_allclose(lab["poly"], [[2, 0.25, 0.3, 0.3, 0.4]], atol=1e-6)
    assert lab["empty"].shape == (0, 5) and lab["missing"].shape == (0, 5)

    # EXIF: verified shape is the displayed one, and the loaded pixels are rotated accordingly
    shp = {Path(f).stem: s for f, s in zip(ds.im_files, ds.shapes)}
    assert tuple(shp["exif"]) == (30, 60)
    img = imread(str(messy / "images" / "train" / "exif.jpg"))
    assert img.shape == (60, 30, 3)
    assert img[5, 15, 2] > 200 and img[55, 15, 2] < 60  # red (stored left) is now on top after rotating 90 cw
    for s in ("gray", "rgba", "deep"):
        im = imread(str(messy / "images" / "train" / f"{s}.png"))
        assert im.shape == (40, 50, 3) and im.dtype == np.uint8
    assert imread(str(messy / "images" / "train" / "deep.png")).max() == 255
    # training continues: every item loads
    for i in range(len(ds)):
        img, lb, path, shapes = ds[i]
        assert img.shape == (3, 64, 64) and lb.shape[1] == 6


def test_cache_hit_and_invalidation(messy):
    src = messy / "images" / "train"
    first = scan_dataset(src, 3)
    assert not first.from_cache
    cache_file = Path(first.cache_file)
    assert cache_file == messy / "labels" / "train.cache" and cache_file.is_file()
    cache = json.loads(cache_file.read_text())  # plain data, readable without executing anything
    assert cache["version"] == CACHE_VERSION
    second = scan_dataset(src, 3)
    assert second.from_cache and second.counts == first.counts
    # a changed label file invalidates
    f = messy / "labels" / "train" / "good.txt"
    f.write_text("1 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n")
    third = scan_dataset(src, 3)
    assert not third.from_cache
    assert len(third.labels[third.im_files.index(str(src.resolve() / "good.jpg"))]) == 2
    # a different nc invalidates (class range checks depend on it)
    assert not scan_dataset(src, 5).from_cache
    assert scan_dataset(src, 5).counts.corrupt == 12 - 1  # class 3 now valid
    # a stale version or garbage cache is rebuilt, not trusted
    cache = json.loads(cache_file.read_text())
    cache["version"] = "old"
    cache_file.write_text(json.dumps(cache))
    assert not scan_dataset(src, 5).from_cache
    cache_file.write_text("\x00garbage")
    assert not scan_dataset(src, 5).from_cache
    assert scan_dataset(src, 5).from_cache
    # a new image invalidates
    write_img(src / "new.png")
    assert not scan_dataset(src, 5).from_cache


def test_unwritable_cache_only_warns(tmp_path, caplog):
    root = tmp_path / "ds"
    write_img(root / "images" / "train" / "a.png")
    write_label(root, "a", GOOD)
    (root / "labels" / "train.cache").mkdir()  # the cache path cannot be written as a file
    out = scan_dataset(root / "images" / "train", 1)
    assert len(out.im_files) == 1
    assert "cache not saved" in caplog.text
    assert not list((root / "labels").glob("train.cache.tmp*"))


def test_no_label_folder_says_where_labels_were_looked_for(tmp_path, caplog):
    """Images but no labels/ folder at all: one warning naming where the labels were looked for (not a
    misleading 'cache not saved, not writeable'); one image with a label is a normal dataset again."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "ds"
    for stem in ("a", "b", "c"):
        write_img(root / "images" / "val" / f"{stem}.png")
    out = scan_dataset(root / "images" / "val", 2, prefix="val: ")
    assert out.counts.backgrounds == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"val: WARNING: no label files found for any of the 3 images: looked for "
                        f"{root / 'labels' / 'val' / '<image name>.txt'} (a labels/ folder beside images/, same "
                        f"sub-folders); every image counts as background"], warnings
    assert not (root / "labels").exists()  # nothing written into the dataset
    caplog.clear()
    write_label(root, "a", GOOD, split="val")
    scan_dataset(root / "images" / "val", 2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_images_and_missing_path_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        scan_dataset(tmp_path / "empty", 1)
    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(tmp_path / "nope", 1)
    bad = tmp_path / "bad" / "images"
    (bad).mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no usable images"):
        scan_dataset(bad, 1)


def test_txt_list_and_label_paths(tmp_path):
    root = tmp_path / "ds"
    a = write_img(root / "images" / "train" / "a.png")
    b = write_img(root / "images" / "val" / "b.png")
    write_label(root, "a", GOOD)
    lst = root / "list.txt"
    lst.write_text("images/train/a.png\n./images/val/b.png\n\nimages/train/a.png\n")
    out = scan_dataset(lst, 1)
    assert out.im_files == sorted([str(a.resolve()), str(b.resolve())])
    assert img2label_paths(["/d/images/x/images/y.jpg"]) == ["/d/images/x/labels/y.txt"]
    assert img2label_paths(["/d/x/y.png"]) == ["/d/x/y.txt"]


def test_single_cls_and_min_items(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "ds"
    for s, t in (("a", "2 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n"), ("b", GOOD), ("c", "")):
        write_img(root / "images" / "train" / f"{s}.png")
        write_label(root, s, t)
    ds = YOLODataset(root / "images" / "train", imgsz=64, nc=3, single_cls=True, min_items=1)
    assert len(ds) == 2 and all((lb[:, 0] == 0).all() for lb in ds.labels)
    assert "1 images with fewer than 1 labels removed (--min-items): c.png" in caplog.text  # which, and why
    loader, _ = create_dataloader(root / "images" / "train", 64, 4, nc=3)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.dtype.is_floating_point is False and imgs.shape == (3, 3, 64, 64)
    assert targets.shape == (3, 6) and targets[:, 0].tolist() == [0, 0, 1]
    assert len(paths) == 3 and shapes[0][0] == (48, 64)


EDGE_LABELS = {  # stem -> label text; boxes crossing the image edge are clipped and kept, never a lost image
    "edge": "0 0.99 0.5 0.1 0.2\n1 0.02 0.02 0.1 0.1\n2 0.5 0.5 0.2 0.2\n",  # two boxes cross an edge
    "edgepoly": "2 -0.01 0.1 0.5 0.1 0.5 0.6\n",  # a polygon point a little left of the image
    "outside": "1 1.015 0.5 0.01 0.2\n0 0.5 0.5 0.2 0.2\n",  # first box has nothing inside: that row goes
}
BROKEN_LABELS = {"pixels": ("0 320 240 50 60\n", "outside [0, 1]"), "negsize": ("0 0.5 0.5 -0.1 0.2\n", "negative")}


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_past_the_edge_are_clipped_and_kept(tmp_path, caplog, split):
    caplog.set_level(logging.INFO)
    root = tmp_path / "ds"
    for stem, text in {**EDGE_LABELS, **{k: t for k, (t, _) in BROKEN_LABELS.items()}}.items():
        write_img(root / "images" / split / f"{stem}.png")
        write_label(root, stem, text, split)
    ds = YOLODataset(root / "images" / split, imgsz=64, augment=split == "train", nc=3, prefix=f"{split}: ")
    assert {Path(f).stem for f in ds.im_files} == set(EDGE_LABELS)
    assert ds.counts.clipped_boxes == 3 and ds.counts.clipped_files == 2 and ds.counts.corrupt == 2
    lab = {Path(f).stem: lb for f, lb in zip(ds.im_files, ds.labels)}
    np.testing.assert_allclose(lab["edge"], [[0, 0.97, 0.5, 0.06, 0.2], [1, 0.035, 0.035, 0.07, 0.07],
                                             [2, 0.5, 0.5, 0.2, 0.2]], atol=1e-6)
    np.testing.assert_allclose(lab["edgepoly"], [[2, 0.25, 0.35, 0.5, 0.5]], atol=1e-6)
    np.testing.assert_allclose(lab["outside"], [[0, 0.5, 0.5, 0.2, 0.2]], atol=1e-6)
    summary = f"{split}: 3 images, 0 backgrounds, 2 corrupt, 0 duplicates removed, 3 boxes clipped in 2 files"
    assert summary in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("3 boxes extend past the image edge" in m and "edge.txt" in m for m in warnings)
    assert any("outside.txt" in m and "nothing inside the image" in m for m in warnings)
    for stem, (_, reason) in BROKEN_LABELS.items():  # every dropped image: named, with its reason
        assert sum(f"{stem}.txt: image dropped" in m and reason in m for m in warnings) == 1, stem
    loader, _ = create_dataloader(root / "images" / split, 64, 4, nc=3)
    _, targets, paths, _ = next(iter(loader))
    assert len(paths) == 3 and len(targets) == 5


def test_label_cache_from_before_edge_clipping_is_rebuilt(messy, monkeypatch):
    """A cache written by the previous version (which dropped images with edge-crossing boxes) is not trusted."""
    from utils.data import verify

    src = messy / "images" / "train"
    write_img(src / "crossing.png")
    write_label(messy, "crossing", "0 0.99 0.5 0.1 0.2\n")
    monkeypatch.setattr(verify, "CACHE_VERSION", "yolo-mqa-labels-2")  # the version before this change
    first = scan_dataset(src, 3)
    cache_file = Path(first.cache_file)
    cache = json.loads(cache_file.read_text())
    rec = next(r for r in cache["records"] if r["im_file"].endswith("crossing.png"))
    rec.update(status="corrupt", labels=[])  # what that version recorded for this image
    cache_file.write_text(json.dumps(cache))
    stale = scan_dataset(src, 3)
    assert stale.from_cache and not any(f.endswith("crossing.png") for f in stale.im_files)  # old code trusts it
    monkeypatch.undo()
    fresh = scan_dataset(src, 3)
    assert not fresh.from_cache and any(f.endswith("crossing.png") for f in fresh.im_files)
    assert json.loads(cache_file.read_text())["version"] == CACHE_VERSION != "yolo-mqa-labels-2"
    assert scan_dataset(src, 3).from_cache


def test_image_list_does_not_call_unlisted_labels_orphans(tmp_path, caplog):
    """train.txt / val.txt listing parts of one folder: the other split's label files are not 'without image'."""
    im, lb = tmp_path / "images", tmp_path / "labels"
    im.mkdir()
    lb.mkdir()
    for i in range(4):
        cv2.imwrite(str(im / f"{i}.jpg"), np.full((32, 32, 3), 90, np.uint8))
        (lb / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "train.txt").write_text("images/0.jpg\nimages/1.jpg\n")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(tmp_path / "train.txt", nc=1, use_cache=False)
    assert len(scan.im_files) == 2 and "have no image" not in caplog.text
    with caplog.at_level(logging.WARNING):  # a folder split still reports a label without its image
        (lb / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
        scan_dataset(im, nc=1, use_cache=False)
    assert "1 label files have no image" in caplog.text
