"""Augmentations keep boxes on the objects; letterbox/rect shapes; loader contract and seeding."""
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import colours, pixel_box
from utils.boxes import scale_boxes, xywh2xyxy
from utils.data import YOLODataset, create_dataloader, letterbox, multi_scale, random_imgsz
from utils.data.augment import augment_hsv, copy_paste, mosaic4, random_perspective

BG = (30, 30, 30)


def make_rect_dataset(root: Path, n=12, seed=0):
    """n PNG images (varied sizes), each with one solid rectangle whose colour index is its class id."""
    rng = np.random.default_rng(seed)
    cols = colours(n)
    for i in range(n):
        w, h = int(rng.integers(60, 140)), int(rng.integers(60, 140))
        img = np.full((h, w, 3), BG, np.uint8)
        bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img[y1:y1 + bh, x1:x1 + bw] = cols[i]
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        (root / "labels" / f"{i}.txt").write_text(f"{i} {(x1 + bw / 2) / w} {(y1 + bh / 2) / h} {bw / w} {bh / h}\n")
    return cols


def check_alignment(img_chw, targets, cols, tol=3.0):
    img = img_chw.numpy().transpose(1, 2, 0)[..., ::-1]  # RGB CHW -> BGR HWC
    h, w = img.shape[:2]
    checked = 0
    for cls, *xywh in targets[:, 1:].tolist():
        assert all(0 <= v <= 1 for v in xywh[:2]) and xywh[2] > 0 and xywh[3] > 0
        box = xywh2xyxy(np.array(xywh)) * [w, h, w, h]
        assert box[0] >= -1e-3 and box[1] >= -1e-3 and box[2] <= w + 1e-3 and box[3] <= h + 1e-3
        if (targets[:, 1] == cls).sum() != 1:
            continue
        pb = pixel_box(img, cols[int(cls)])
        if pb is None:
            continue
        assert np.abs(pb - box).max() <= tol, (cls, pb, box)
        checked += 1
    return checked


HYP_GEOM = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=15, translate=0.1, scale=0.5, shear=5, perspective=0.0005,
                flipud=0.5, fliplr=0.5, mosaic=1.0, mixup=0.0)


def test_mosaic_perspective_boxes_match_pixels(tmp_path):
    cols = make_rect_dataset(tmp_path)
    ds = YOLODataset(tmp_path / "images", imgsz=160, augment=True, hyp=HYP_GEOM, nc=len(cols))
    random.seed(0)
    np.random.seed(0)
    checked = 0
    for k in range(12):
        img, targets, _, shapes = ds[k % len(ds)]
        assert img.shape == (3, 160, 160) and img.dtype == torch.uint8 and shapes is None
        checked += check_alignment(img, targets, cols)
    assert checked >= 20  # most boxes were actually compared against pixels


def test_plain_augment_path_boxes_match_pixels(tmp_path):
    cols = make_rect_dataset(tmp_path)
    ds = YOLODataset(tmp_path / "images", imgsz=128, augment=True, hyp={**HYP_GEOM, "mosaic": 0.0}, nc=len(cols))
    random.seed(1)
    np.random.seed(1)
    checked = 0
    for k in range(len(ds)):
        img, targets, _, shapes = ds[k]
        assert shapes is not None
        checked += check_alignment(img, targets, cols)
    assert checked >= 8


@pytest.mark.parametrize("seed", range(6))
def test_random_perspective_single_rectangle(seed):
    random.seed(seed)
    img = np.full((120, 160, 3), BG, np.uint8)
    img[30:70, 50:110] = (0, 0, 255)
    labels = np.array([[0, 50, 30, 110, 70]], float)
    out, lb = random_perspective(img, labels, degrees=30, translate=0.1, scale=0.3, shear=10, perspective=0.001)
    assert out.shape == img.shape
    if len(lb):
        pb = pixel_box(out, (0, 0, 255))
        assert pb is not None and np.abs(pb - lb[0, 1:]).max() <= 2.5, (pb, lb)


def test_mosaic4_labels_clipped_to_canvas():
    random.seed(3)
    items = [(np.full((64, 48, 3), 50 * i, np.uint8), np.array([[i, 0.5, 0.5, 1.0, 1.0]])) for i in range(4)]
    canvas, labels, segments = mosaic4(items, 64)
    assert canvas.shape == (128, 128, 3) and len(labels) == 4 and segments is None
    assert labels[:, 1:].min() >= 0 and labels[:, 1:].max() <= 128
    for c, x1, y1, x2, y2 in labels:  # each full-image box covers exactly its tile's pixels
        region = canvas[int(y1):int(y2), int(x1):int(x2)]
        assert (region == 50 * int(c)).all()


def test_letterbox_shapes_and_inverse():
    img = np.zeros((100, 200, 3), np.uint8)
    out, ratio, pad = letterbox(img, 128)
    assert out.shape == (128, 128, 3) and ratio == (128 / 200, 64 / 100) and pad == (0.0, 32.0)
    out, ratio, pad = letterbox(img, 128, auto=True, stride=32)
    assert out.shape == (64, 128, 3) and pad == (0.0, 0.0)
    out, ratio, pad = letterbox(np.zeros((30, 40, 3), np.uint8), (64, 96), scaleup=False)
    assert out.shape == (64, 96, 3) and ratio == (1.0, 1.0) and pad == (28.0, 17.0)
    assert (out[:17] == 114).all() and (out[17:47, 28:68] == 0).all()


def make_aspect_dataset(root: Path):
    sizes = {"a": (128, 64), "b": (120, 60), "c": (64, 128), "d": (60, 120)}  # (w, h)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for s, (w, h) in sizes.items():
        cv2.imwrite(str(root / "images" / f"{s}.png"), np.full((h, w, 3), 60, np.uint8))
        (root / "labels" / f"{s}.txt").write_text("0 0.5 0.5 0.5 0.25\n")
    return sizes


@pytest.mark.parametrize("pad,expect", [(0.0, [(32, 64), (64, 32)]), (0.5, [(64, 96), (96, 64)])])
def test_rect_batch_shapes(tmp_path, pad, expect):
    sizes = make_aspect_dataset(tmp_path)
    stride = torch.tensor([8.0, 16.0, 32.0])  # model.stride is accepted as is
    loader, ds = create_dataloader(tmp_path / "images", 64, 2, stride=stride, rect=True, pad=pad, nc=1)
    assert [tuple(s) for s in ds.batch_shapes] == expect
    for b, (imgs, targets, paths, shapes) in enumerate(loader):
        assert tuple(imgs.shape[2:]) == expect[b]
        for i, (p, (hw0, ratio_pad)) in enumerate(zip(paths, shapes)):
            w0, h0 = sizes[Path(p).stem]
            assert hw0 == (h0, w0)
            t = targets[targets[:, 0] == i, 2:]
            box = xywh2xyxy(t.clone()) * torch.tensor([imgs.shape[3], imgs.shape[2]] * 2)
            back = scale_boxes(imgs.shape[2:], box, (h0, w0), ratio_pad)  # undo letterbox exactly
            ref = torch.tensor([[0.25 * w0, 0.375 * h0, 0.75 * w0, 0.625 * h0]])
            assert torch.allclose(back, ref, atol=0.6)


def test_loader_seeded_workers_reproducible(tmp_path):
    cols = make_rect_dataset(tmp_path, n=8)
    hyp = {**HYP_GEOM, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "mixup": 0.5}

    def run(seed):
        loader, _ = create_dataloader(tmp_path / "images", 96, 4, hyp=hyp, augment=True, workers=1, shuffle=True,
                                      seed=seed, nc=len(cols))
        return [(b[0].clone(), b[1].clone(), b[2]) for b in loader]

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 2
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_distributed_sampler(tmp_path, monkeypatch):
    cols = make_rect_dataset(tmp_path, n=6)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        loader, _ = create_dataloader(tmp_path / "images", 64, 2, rank=rank, shuffle=True, nc=len(cols))
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        seen.append(set(loader.sampler))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 6


def test_close_mosaic_and_image_weights(tmp_path):
    root = tmp_path
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i in range(10):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.zeros((40, 40, 3), np.uint8))
        (root / "labels" / f"{i}.txt").write_text(f"{1 if i == 0 else 0} 0.5 0.5 0.5 0.5\n")
    ds = YOLODataset(root / "images", imgsz=64, augment=True, image_weights=True, nc=2)
    assert ds.mosaic
    ds.close_mosaic()
    assert not ds.mosaic and ds[0][3] is not None  # letterbox path now (shapes recorded)
    cw = ds.class_weights()
    np.testing.assert_allclose(cw, np.array([1 / 9, 1]) / (1 / 9 + 1))
    random.seed(0)
    picks = []
    for _ in range(50):
        ds.resample_image_weights()
        picks += list(ds.indices)
    frac = np.mean(np.array(picks) == 0)  # the only image with the rare class: weight 1 vs 1/9 for the others
    assert 0.4 < frac < 0.6


def test_hsv_and_multiscale():
    np.random.seed(0)
    img = np.full((8, 8, 3), (40, 120, 200), np.uint8)
    before = img.copy()
    augment_hsv(img, 0.5, 0.5, 0.5)
    assert img.shape == before.shape and not np.array_equal(img, before)
    random.seed(0)
    sizes = {random_imgsz(640, 32) for _ in range(200)}
    assert all(s % 32 == 0 and 320 <= s <= 960 for s in sizes) and len(sizes) > 10
    x = torch.rand(2, 3, 64, 96)
    y = multi_scale(x, 96, 32)
    assert y.shape[2] % 32 == 0 and y.shape[3] % 32 == 0


def test_ram_and_disk_cache_give_same_images(tmp_path):
    make_rect_dataset(tmp_path, n=3)
    plain = YOLODataset(tmp_path / "images", imgsz=64, nc=3)
    ram = YOLODataset(tmp_path / "images", imgsz=64, nc=3, cache="ram")
    disk = YOLODataset(tmp_path / "images", imgsz=64, nc=3, cache="disk")
    assert not list(tmp_path.rglob("images/*.npy"))  # never written next to the images
    assert len(list(Path(disk.cache_file).with_suffix(".npy-cache").glob("*.npy"))) == 3
    for i in range(3):
        assert torch.equal(plain[i][0], ram[i][0]) and torch.equal(plain[i][0], disk[i][0])


def test_disk_cache_stores_images_at_the_training_size(tmp_path):
    """--cache disk holds what training reads (long side = --imgsz), not the full-size decode: a 600x800 image
    at --img 64 is a 48x64 array; training and validation readers of one split keep separate arrays."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    big = np.full((600, 800, 3), BG, np.uint8)
    big[100:300, 200:500] = (0, 0, 255)
    cv2.imwrite(str(tmp_path / "images" / "big.jpg"), big)
    (tmp_path / "labels" / "big.txt").write_text("0 0.4375 0.3333 0.375 0.3333\n")
    for augment in (False, True):
        plain = YOLODataset(tmp_path / "images", imgsz=64, nc=1, augment=augment)
        disk = YOLODataset(tmp_path / "images", imgsz=64, nc=1, augment=augment, cache="disk")
        arr = np.load(disk.npy_files[0], allow_pickle=False)
        assert arr.shape == (48, 64, 3)
        im, hw0, hw = disk.load_image(0)
        ref = plain.load_image(0)
        assert np.array_equal(im, ref[0]) and hw0 == ref[1] == (600, 800) and hw == ref[2] == (48, 64)
    assert len(list(Path(disk.cache_file).with_suffix(".npy-cache").glob("*.npy"))) == 2


def test_copy_paste_without_polygons_says_it_has_no_effect(tmp_path, caplog):
    make_rect_dataset(tmp_path, n=3)
    caplog.set_level("INFO")
    YOLODataset(tmp_path / "images", imgsz=64, augment=True, hyp={"copy_paste": 0.3}, nc=3, prefix="train: ")
    assert "copy_paste=0.3 has no effect: no polygon labels" in caplog.text
    caplog.clear()
    YOLODataset(tmp_path / "images", imgsz=64, augment=False, hyp={"copy_paste": 0.3}, nc=3)  # validation: no noise
    YOLODataset(tmp_path / "images", imgsz=64, augment=True, hyp={"copy_paste": 0.0}, nc=3)
    assert "copy_paste" not in caplog.text


RED, GREY = (0, 0, 255), (90, 90, 90)


def _triangle_image(w=100, h=60, pts=((10, 10), (40, 10), (10, 50))):
    img = np.full((h, w, 3), GREY, np.uint8)
    poly = np.array(pts, np.float32)
    cv2.fillPoly(img, [poly.astype(np.int32)], RED)
    seg = poly / np.array([w, h], np.float32)
    x1, y1 = seg.min(0)
    x2, y2 = seg.max(0)
    labels = np.array([[3, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]], np.float32)
    return img, labels, [seg]


def _pixel_labels(labels, segs, w=100, h=60):
    """Normalised xywh labels / polygons -> pixel xyxy labels / polygons, as copy_paste takes them on the canvas."""
    px = np.concatenate([labels[:, :1], xywh2xyxy(labels[:, 1:5]) * [w, h, w, h]], 1)
    return px, [None if sg is None else sg * [w, h] for sg in segs]


def test_copy_paste_mirrors_the_object_and_its_box():
    img, labels, segs = _triangle_image()
    px, polys = _pixel_labels(labels, segs)
    out, lb, out_polys = copy_paste(img, px, polys, p=1.0)
    assert lb.shape == (2, 5) and lb[1, 0] == 3 and len(out_polys) == 2
    np.testing.assert_allclose(lb[1, 1:], [100 - px[0, 3], px[0, 2], 100 - px[0, 1], px[0, 4]], atol=1e-6)
    np.testing.assert_allclose(out_polys[1], np.stack([100 - polys[0][:, 0], polys[0][:, 1]], 1), atol=1e-6)
    assert (out[:, :50] == img[:, :50]).all()  # the original half is untouched
    red = np.all(np.abs(out[:, 50:].astype(int) - RED) < 40, axis=2)
    ys, xs = np.nonzero(red)
    pasted = np.array([xs.min() + 50, ys.min(), xs.max() + 51, ys.max() + 1])
    np.testing.assert_allclose(pasted, lb[1, 1:], atol=2)  # pixels of the pasted copy fill its box
    assert red.sum() == pytest.approx(np.all(img == RED, axis=2).sum(), rel=0.1)  # same object size, not a rectangle


def test_copy_paste_skips_mirrors_that_cover_an_existing_box():
    img, labels, segs = _triangle_image(pts=((40, 10), (60, 10), (50, 50)))  # centred: its mirror overlaps it
    out, lb, _ = copy_paste(img, *_pixel_labels(labels, segs), p=1.0)
    assert len(lb) == 1 and (out == img).all()
    img, labels, segs = _triangle_image()
    out, lb, _ = copy_paste(img, *_pixel_labels(labels, [None]), p=1.0)  # a box row has nothing to cut out
    assert len(lb) == 1 and (out == img).all()


def test_polygon_labels_reach_the_mosaic_through_copy_paste(tmp_path):
    """Polygon rows are kept (aligned with boxes, duplicates removed) and copy_paste=1 doubles the objects."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(6):
        img, labels, segs = _triangle_image()
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), img)
        row = "0 " + " ".join(f"{v:.6f}" for v in segs[0].flatten())
        (tmp_path / "labels" / f"{i}.txt").write_text(row + "\n" + row + "\n" + "1 0.9 0.9 0.1 0.1\n")
    hyp = {"degrees": 0, "translate": 0, "scale": 0, "shear": 0, "fliplr": 0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0}
    counts = {}
    for cp in (0.0, 1.0):
        ds = YOLODataset(tmp_path / "images", imgsz=128, augment=True, hyp={**hyp, "copy_paste": cp}, nc=2)
        segs = ds.segments(0)
        assert ds.polygons == [True] * 6 and len(ds.labels[0]) == 2 and segs[0].shape == (3, 2) and segs[1] is None
        random.seed(0)
        counts[cp] = sum(int((ds[i % 6][1][:, 1] == 0).sum()) for i in range(24))
    assert counts[1.0] >= 1.5 * counts[0.0] > 0
    (tmp_path / "labels" / "0.txt").write_text("1 0.5 0.5 0.2 0.2\n")  # edited after the scan: not trusted
    assert ds.segments(0) is None
