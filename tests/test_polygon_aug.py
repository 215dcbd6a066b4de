"""Polygon-aware augmentation: boxes come from the warped, clipped outlines (checked against OpenCV rasters),
polygons follow their mosaic tiles, copy-paste mirrors across the whole canvas, and box-only data still
produces exactly the batches of the box-only pipeline (checked against an independent re-implementation)."""
import math
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import colours, pixel_box
from utils.data import YOLODataset
from utils.data.augment import box_candidates, copy_paste, mosaic4, perspective_matrix, random_perspective

SS = 32  # reference rasters are drawn at 32x the output resolution: their own error is 1/32 px


def raster_box(poly: np.ndarray, w: int, h: int):
    """Tight box of the pixels cv2.fillPoly sets for a polygon on a w x h canvas (None if none)."""
    lo = np.floor(np.clip(poly.min(0), 0, [w, h])).astype(int)
    hi = np.ceil(np.clip(poly.max(0), 0, [w, h])).astype(int)
    if (hi - lo).min() <= 0:
        return None
    mask = np.zeros(((hi[1] - lo[1]) * SS, (hi[0] - lo[0]) * SS), np.uint8)  # only the polygon's own window
    pts = np.round(((poly - lo) * SS - 0.5) * 16).astype(np.int32)  # pixel centres at +0.5, 4 fractional bits
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if not len(cols):
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], float) / SS + [*lo, *lo]


def star(rng, cx, cy, r, low=0.3):
    """A random simple (star-shaped, often non-convex) polygon around (cx, cy); radii in [low, 1] * r."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 12))))
    rad = r * rng.uniform(low, 1.0, len(ang))
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def test_polygon_boxes_match_opencv_raster():
    """300 random warps (mosaic crops and plain, affine and perspective): every kept label equals the tight box
    of the OpenCV-rasterised warped outline within 1 px, many of them cut by the border; objects dropped
    are ones the candidate rule drops for the reference box too (up to rasterisation margins)."""
    s_out = 80
    n_cmp = n_cut = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        size = 2 * s_out if seed % 2 == 0 else s_out
        border = (-s_out // 2, -s_out // 2) if seed % 2 == 0 else (0, 0)
        polys, labels = [], []
        for k in range(int(rng.integers(1, 6))):
            r = rng.uniform(4, 40)
            p = star(rng, *rng.uniform(r, size - r, 2), r)
            polys.append(None if rng.random() < 0.2 else p)  # some box rows among the polygons
            labels.append([k, *p.min(0), *p.max(0)])
        labels = np.array(labels)
        hyp = dict(degrees=float(rng.uniform(0, 45)), translate=0.2, scale=0.5, shear=10,
                   perspective=0.0005 if seed % 3 == 0 else 0.0)
        random.seed(seed)
        out, lb = random_perspective(np.zeros((size, size, 3), np.uint8), labels, **hyp, border=border,
                                     segments=polys)
        random.seed(seed)
        m, s = perspective_matrix((size, size, 3), s_out, s_out, **hyp)  # the same draws -> the same matrix
        got = {int(row[0]): row[1:] for row in lb}
        area_thr = 0.01 if any(p is not None for p in polys) else 0.10
        for k, (p, row) in enumerate(zip(polys, labels)):
            x1, y1, x2, y2 = row[1:]
            q = p if p is not None else np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
            warped = cv2.perspectiveTransform(q.reshape(-1, 1, 2), m).reshape(-1, 2)
            ref = raster_box(warped, s_out, s_out)
            if k in got:
                assert ref is not None, (seed, k)
                assert np.abs(got[k] - ref).max() <= 1.0, (seed, k, got[k], ref)
                n_cmp += 1
                n_cut += bool(warped.min() < 0 or warped.max() > s_out)
            elif ref is not None:  # dropped: the rule drops the reference box too, shrunk by its raster margin
                shrunk = ref + [0.25, 0.25, -0.25, -0.25]
                assert not box_candidates(row[1:5, None] * s, shrunk[:, None], area_thr=area_thr)[0], (seed, k)
    assert n_cmp > 600 and n_cut > 200


def test_box_rows_alone_keep_the_box_rule():
    """Without any polygon in the canvas the box path runs, with upstream's 10% area rule."""
    labels = np.array([[0, 10, 10, 50, 50]], float)
    for segments in (None, [None]):
        random.seed(0)
        _, a = random_perspective(np.zeros((64, 64, 3), np.uint8), labels, 30, 0.1, 0.5, 5, segments=segments)
        random.seed(0)
        _, b = random_perspective(np.zeros((64, 64, 3), np.uint8), labels, 30, 0.1, 0.5, 5)
        assert np.array_equal(a, b)
    cut = np.array([[0, 0, 0, 60, 60]], float)  # a 60x60 object of which a 10x10 corner (2.8%) stays visible
    poly = [np.array([[0, 0], [60, 0], [60, 60], [0, 60]], float)]
    kw = dict(degrees=0, translate=0, scale=0, shear=0, border=(-50, -50))  # crop (50, 50)-(150, 150) of 200x200
    _, kept = random_perspective(np.zeros((200, 200, 3), np.uint8), cut, **kw, segments=poly)
    _, dropped = random_perspective(np.zeros((200, 200, 3), np.uint8), cut, **kw)
    assert len(dropped) == 0 and len(kept) == 1  # > 1% of the area survives with polygons, not > 10% with boxes
    np.testing.assert_allclose(kept[0, 1:], [0, 0, 10, 10], atol=1e-9)


def _tile(w, h, pts, colour):
    img = np.full((h, w, 3), (30, 30, 30), np.uint8)
    cv2.fillPoly(img, [np.array(pts, np.int32)], colour)
    seg = np.array(pts, float) / [w, h]
    return img, seg


def test_mosaic4_moves_polygons_with_their_tiles():
    cols = colours(4)
    items = []
    for i, (w, h) in enumerate([(90, 70), (60, 100), (100, 100), (70, 50)]):
        img, seg = _tile(w, h, [(5, 5), (w - 5, h // 2), (w // 3, h - 5)], cols[i])
        x1, y1 = seg.min(0)
        x2, y2 = seg.max(0)
        lb = np.array([[i, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], [i, 0.5, 0.5, 0.1, 0.1]])
        items.append((img, lb, [seg, None]))  # a polygon row and a box row
    n_cut = 0
    for seed in range(20):
        random.seed(seed)
        canvas, labels, segments = mosaic4(items, 64)
        assert len(segments) == len(labels) == 8 and all(segments[j] is None for j in range(1, 8, 2))
        for (c, *box), sg in zip(labels[::2], segments[::2]):
            assert sg.min() >= 0 and sg.max() <= 128  # clipped to the canvas
            pb = pixel_box(canvas, cols[int(c)])
            if pb is None:
                assert len(sg) == 0 or np.ptp(sg, 0).min() < 2  # the tile's object fell off the canvas
                continue
            np.testing.assert_allclose([*sg.min(0), *sg.max(0)], pb, atol=1.5)  # outline on its pixels
            mask = np.zeros(canvas.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.round(sg).astype(np.int32)], 1)
            colour = np.abs(canvas.astype(int) - cols[int(c)]).max(2) < 40
            assert (mask.astype(bool) & colour).sum() >= 0.85 * colour.sum()  # the shape, not just its box
            n_cut += pb[0] == 0 or pb[1] == 0 or pb[2] == 128 or pb[3] == 128
    assert n_cut > 0


def test_copy_paste_mirrors_across_the_whole_canvas():
    """Mirrors are candidates only with IoA < 0.30 against every box; round(p * candidates) are pasted."""
    w, h = 200, 100
    img = np.full((h, w, 3), (30, 30, 30), np.uint8)
    polys = [np.array([[10, 10], [50, 10], [10, 60]], float),  # left: its mirror lands on free ground
             np.array([[90, 40], [110, 80], [92, 80]], float),  # centred: its mirror covers itself
             np.array([[20, 70], [40, 70], [30, 95]], float)]  # left: mirror hits the box on the right
    labels = np.array([[k, *p.min(0), *p.max(0)] for k, p in enumerate(polys)], float)
    labels = np.concatenate([labels, [[3, 160, 68, 185, 98]]])  # a box row right where polygon 2's mirror goes
    cols = colours(3)
    for p, c in zip(polys, cols):
        cv2.fillPoly(img, [p.astype(np.int32)], c)
    segments = polys + [None]
    out, lb, segs = copy_paste(img, labels, segments, p=1.0)
    assert len(lb) == 5 and lb[4, 0] == 0 and len(segs) == 5  # only polygon 0 was a candidate
    np.testing.assert_allclose(lb[4, 1:], [w - 50, 10, w - 10, 60])
    np.testing.assert_allclose(segs[4], np.stack([w - polys[0][:, 0], polys[0][:, 1]], 1))
    np.testing.assert_allclose(pixel_box(out[:, 100:], cols[0]) + [100, 0, 100, 0], lb[4, 1:], atol=1.5)
    assert (out[:, :100] == img[:, :100]).all() and len(labels) == 4 and len(segments) == 4  # inputs untouched
    many = [polys[0] + [0, dy] for dy in (-8, 0, 8, 16, 24, 32)]  # six candidates (overlapping each other)
    lab6 = np.array([[0, *p.min(0), *p.max(0)] for p in many])
    random.seed(0)
    assert len(copy_paste(img, lab6, many, p=0.25)[1]) == 6 + round(0.25 * 6)


def make_polygon_dataset(root: Path, n=6, seed=0):
    """n images, each with two solid random polygons; the colour index is the class id (unique per object)."""
    rng = np.random.default_rng(seed)
    cols = colours(2 * n)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        w, h = int(rng.integers(90, 140)), int(rng.integers(90, 140))
        img = np.full((h, w, 3), (30, 30, 30), np.uint8)
        rows = []
        for j in range(2):
            r = rng.uniform(15, 30)
            cx = rng.uniform(r, w / 2 - 2) + j * w / 2  # one object per half: no overlap
            p = np.round(star(rng, cx, rng.uniform(r, h - r), r, low=0.85))  # no thin spikes: they blur away
            cv2.fillPoly(img, [p.astype(np.int32)], cols[2 * i + j])
            outline = (p + 0.5) / [w, h]  # fillPoly's vertex p is the centre of pixel p, i.e. at p + 0.5 in labels
            rows.append(f"{2 * i + j} " + " ".join(f"{v:.6f}" for v in outline.ravel()))
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        (root / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")
    return cols


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_polygon_dataset_boxes_are_tight_after_mosaic_and_rotation(tmp_path, mosaic):
    """End to end (mosaic, and the letterbox path used after close-mosaic): rotated, sheared, scaled, cut
    polygon objects get boxes that hug their pixels."""
    cols = make_polygon_dataset(tmp_path)
    hyp = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=30, translate=0.1, scale=0.4, shear=8, perspective=0.0,
               flipud=0.5, fliplr=0.5, mosaic=mosaic, mixup=0.0, copy_paste=0.0)
    ds = YOLODataset(tmp_path / "images", imgsz=128, augment=True, hyp=hyp, nc=len(cols))
    random.seed(0)
    np.random.seed(0)
    inner, edge = [], []  # objects clear of the image border; objects cut by it (thin slivers blur away)
    for k in range(24):
        img, targets, _, _ = ds[k % len(ds)]
        im = img.numpy().transpose(1, 2, 0)[..., ::-1]
        for c, xc, yc, bw, bh in targets[:, 1:].tolist():
            if (targets[:, 1] == c).sum() != 1:
                continue
            pb = pixel_box(im, cols[int(c)])
            if pb is not None:
                box = np.array([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2]) * 128
                if pb.min() == 0 or pb.max() == 128:  # cut: no visible pixel may fall outside the label
                    edge.append(max((box[:2] - pb[:2]).max(), (pb[2:] - box[2:]).max()))
                else:
                    inner.append(np.abs(pb - box).max())
    assert len(inner) >= 20 and len(edge) >= 5
    assert max(inner) <= 2.5 and np.median(inner) <= 0.8  # boxes from warped corners would be many px loose
    assert max(edge) <= 1.5


def make_box_dataset(root: Path, n=8, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        w, h = int(rng.integers(50, 130)), int(rng.integers(50, 130))
        cv2.imwrite(str(root / "images" / f"{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        rows = []
        for k in range(int(rng.integers(0, 5))):
            x1, y1 = rng.uniform(-0.2, 0.8, 2).clip(0, 1)
            x2, y2 = (np.array([x1, y1]) + rng.uniform(0.05, 0.6, 2)).clip(0, 1)
            rows.append(f"{k % 3} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
        (root / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")


def box_only_reference(ds: YOLODataset, index: int):
    """The box-only mosaic pipeline re-implemented from its definition, with the same random draws in the same
    order: mosaic placement, the perspective matrix, box corners warped with cv2 and clipped with
    cv2.intersectConvexConvex, the 10% candidate rule, flips. HSV gains must be 0 (no draws)."""
    hyp, s = ds.hyp, ds.imgsz
    assert random.random() < hyp["mosaic"]
    idx = [index] + random.choices(range(len(ds)), k=3)
    random.shuffle(idx)
    xc, yc = int(random.uniform(s * 0.5, s * 1.5)), int(random.uniform(s * 0.5, s * 1.5))
    canvas = np.full((2 * s, 2 * s, 3), 114, np.uint8)
    boxes = []
    for i, k in enumerate(idx):
        img, lb = ds.load_image(k)[0], ds.labels[k]
        h, w = img.shape[:2]
        x0, y0 = (xc - w if i in (0, 2) else xc), (yc - h if i in (0, 1) else yc)  # tile origin on the canvas
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * s), min(y0 + h, 2 * s)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
        for c, bx, by, bw, bh in lb:
            boxes.append([c, w * (bx - bw / 2) + x0, h * (by - bh / 2) + y0, w * (bx + bw / 2) + x0,
                          h * (by + bh / 2) + y0])
    boxes = np.array(boxes, float).reshape(-1, 5)
    boxes[:, 1:] = boxes[:, 1:].clip(0, 2 * s)
    mats = {k: np.eye(3) for k in "CPRST"}
    mats["C"][:2, 2] = -s, -s
    mats["P"][2, :2] = [random.uniform(-hyp["perspective"], hyp["perspective"]) for _ in range(2)]
    angle, scale = random.uniform(-hyp["degrees"], hyp["degrees"]), random.uniform(1 - hyp["scale"], 1 + hyp["scale"])
    mats["R"][:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=scale)
    mats["S"][0, 1] = math.tan(math.radians(random.uniform(-hyp["shear"], hyp["shear"])))
    mats["S"][1, 0] = math.tan(math.radians(random.uniform(-hyp["shear"], hyp["shear"])))
    mats["T"][:2, 2] = [random.uniform(0.5 - hyp["translate"], 0.5 + hyp["translate"]) * s for _ in range(2)]
    m = mats["T"] @ mats["S"] @ mats["R"] @ mats["P"] @ mats["C"]
    img = cv2.warpPerspective(canvas, m, (s, s), borderValue=(114, 114, 114))
    rect = np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float32)
    out = []
    for c, x1, y1, x2, y2 in boxes:
        quad = cv2.perspectiveTransform(np.array([[[x1, y1]], [[x2, y1]], [[x2, y2]], [[x1, y2]]]), m)
        area, inter = cv2.intersectConvexConvex(quad.astype(np.float32), rect)
        if inter is None or area <= 0:
            continue
        (nx1, ny1), (nx2, ny2) = inter.reshape(-1, 2).min(0), inter.reshape(-1, 2).max(0)
        w2, h2, w1, h1 = nx2 - nx1, ny2 - ny1, (x2 - x1) * scale, (y2 - y1) * scale
        if w2 > 2 and h2 > 2 and w2 * h2 / (w1 * h1 + 1e-16) > 0.1 and max(w2 / h2, h2 / w2) < 100:
            out.append([c, (nx1 + nx2) / 2 / s, (ny1 + ny2) / 2 / s, w2 / s, h2 / s])
    assert not random.random() < hyp["mixup"]
    out = np.array(out).reshape(-1, 5)
    if random.random() < hyp["flipud"]:
        img, out[:, 2] = img[::-1], 1 - out[:, 2]
    if random.random() < hyp["fliplr"]:
        img, out[:, 1] = img[:, ::-1], 1 - out[:, 1]
    return img[..., ::-1].transpose(2, 0, 1), out


def test_box_only_batches_unchanged(tmp_path):
    """Box-only data never enters the polygon path: items equal the box-only pipeline's, pixel for pixel."""
    make_box_dataset(tmp_path)
    hyp = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=20, translate=0.1, scale=0.5, shear=5, perspective=0.0005,
               flipud=0.5, fliplr=0.5, mosaic=1.0, mixup=0.0, copy_paste=0.5)
    ds = YOLODataset(tmp_path / "images", imgsz=96, augment=True, hyp=hyp, nc=3)
    n_boxes = 0
    for k in range(16):
        random.seed(k)
        img, targets, _, _ = ds[k % len(ds)]
        random.seed(k)
        ref_img, ref = box_only_reference(ds, k % len(ds))
        assert np.array_equal(img.numpy(), ref_img), k
        assert targets.shape == (len(ref), 6), k
        np.testing.assert_allclose(targets[:, 1:].numpy(), ref, atol=1e-5)
        n_boxes += len(ref)
    assert n_boxes > 30
