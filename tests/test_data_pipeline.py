"""Training image reading: reduced JPEG decode, the per-worker partner buffer, determinism, the upstream switch."""
import logging
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import utils.data.dataset as dataset_mod
from utils.boxes import convex_boxes_in_image, polygon_box_in_image
from utils.data import YOLODataset, create_dataloader
from utils.data.augment import augment_hsv, copy_paste
from utils.data.images import jpeg_reduction, read_reduced
from helpers import limit

NO_AUG = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, translate=0, scale=0, shear=0, perspective=0, flipud=0,
              fliplr=0, mosaic=0.0, mixup=0.0)
MOSAIC = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=5, translate=0.1, scale=0.5, shear=2, perspective=0,
              flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.5)


def _scene(w, h, seed=0):
    """Camera-like content: smooth colour field, some shapes, mild noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(h // 40, 2), max(w // 40, 2), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(h // 12, h // 4)), rng.integers(0, 255, 3).tolist(), -1)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _write_set(root: Path, sizes, ext=".jpg", seed=0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        cv2.imwrite(str(root / "images" / f"{i}{ext}"), _scene(w, h, seed + i), [cv2.IMWRITE_JPEG_QUALITY, 95])
        (root / "labels" / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 0.3 0.4\n{(i + 1) % 3} 0.25 0.3 0.2 0.2\n")
    return root / "images"


def test_reduction_keeps_the_long_side_at_least_the_target():
    lengths = (639, 640, 1278, 1279, 2556, 2557, 4032, 5112, 5113)
    assert [jpeg_reduction(n, 640) for n in lengths] == [1, 1, 1, 2, 2, 4, 4, 4, 8]  # ceil(1279 / 2) = 640


def test_reduced_decode_matches_full_decode_and_keeps_shapes(tmp_path):
    src = _write_set(tmp_path, [(1280, 720), (1003, 1501), (700, 500)])
    fast = YOLODataset(src, imgsz=320, augment=True, hyp=NO_AUG, nc=3)
    exact = YOLODataset(src, imgsz=320, augment=True, hyp=NO_AUG, nc=3, upstream=True)
    for i, factor in enumerate((4, 4, 2)):  # 1280 -> 320 at 1/4; 1501 -> 376 at 1/4; 700 -> 350 at 1/2
        img, hw0, hw = fast.load_image(i)
        ref, ref_hw0, ref_hw = exact.load_image(i)
        assert hw0 == ref_hw0 and hw == ref_hw == img.shape[:2] and max(hw) == 320
        full = cv2.imread(fast.im_files[i])
        assert full.shape[:2] == hw0 and np.array_equal(ref, cv2.resize(full, hw[::-1], interpolation=cv2.INTER_LINEAR))
        reduced = cv2.imread(fast.im_files[i], {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[factor])
        assert np.array_equal(img, cv2.resize(reduced, hw[::-1], interpolation=cv2.INTER_LINEAR))  # really reduced
        area = cv2.resize(full, hw[::-1], interpolation=cv2.INTER_AREA)  # the alias-free reference
        assert np.abs(img.astype(int) - area).mean() < 2.5  # measured 0.5-2.3 (of 255) on these images
        assert np.abs(img.astype(int) - ref).mean() < 3.5  # measured 1.0-2.9
        # letterbox path (close_mosaic epochs): shapes and ratio_pad exactly as with the full decode
        random.seed(i)
        a = fast[i]
        random.seed(i)
        b = exact[i]
        assert a[3] == b[3] and torch.equal(a[1], b[1]) and a[0].shape == b[0].shape
    val = YOLODataset(src, imgsz=320, augment=False, nc=3)  # validation keeps the full decode
    assert np.array_equal(val.load_image(0)[0], cv2.resize(cv2.imread(val.im_files[0]), (320, 180),
                                                              interpolation=cv2.INTER_AREA))


def test_reduced_decode_exif_png_and_stale_shape(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    arr = np.zeros((300, 600, 3), np.uint8)
    arr[:, :300] = (255, 0, 0)  # left half red (RGB) as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 300 wide, 600 high, red on top
    Image.fromarray(arr).save(root / "images" / "rot.jpg", exif=exif.tobytes(), quality=95)
    cv2.imwrite(str(root / "images" / "p.png"), _scene(900, 400))
    for s in ("rot", "p"):
        (root / "labels" / f"{s}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    ds = YOLODataset(root / "images", imgsz=150, augment=True, hyp=NO_AUG, nc=1)
    k = {Path(f).stem: i for i, f in enumerate(ds.im_files)}
    img, hw0, hw = ds.load_image(k["rot"])
    assert hw0 == (600, 300) and img.shape == (150, 75, 3)
    assert img[10, 37, 2] > 200 and img[140, 37, 2] < 60  # red on top: EXIF rotation applied at 1/4 scale
    img, hw0, hw = ds.load_image(k["p"])  # PNG: full decode
    assert np.array_equal(img, cv2.resize(cv2.imread(ds.im_files[k["p"]]), (150, 67), interpolation=cv2.INTER_LINEAR))
    # a JPEG whose size no longer matches the scan is decoded in full rather than mis-scaled
    assert read_reduced(ds.im_files[k["rot"]], (500, 300), 150).shape == (600, 300, 3)


class CountingDataset(YOLODataset):
    """Counts decodes (load_image calls that are not served by the RAM cache)."""
    decodes = 0

    def load_image(self, i):
        if self.ims[i] is None:
            type(self).decodes += 1
        return super().load_image(i)


def test_partner_buffer_is_bounded_and_primaries_are_each_image_once(tmp_path, monkeypatch, caplog):
    src = _write_set(tmp_path, [(96, 72)] * 30)
    monkeypatch.setattr(dataset_mod, "BUFFER_BYTES", 8 * 3 * 64 * 64)  # room for 8 images of <= 64 x 64
    caplog.set_level(logging.INFO)
    ds = CountingDataset(src, imgsz=64, augment=True, hyp=MOSAIC, nc=3, prefix="train: ")
    assert ds.buffer_capacity == 8
    assert "last 8 decoded images (<= 0.1 MiB per worker)" in caplog.text
    random.seed(0)
    np.random.seed(0)
    CountingDataset.decodes = 0
    seen, sizes = [], []
    for epoch in range(2):
        order = np.random.default_rng(epoch).permutation(len(ds))
        before = CountingDataset.decodes
        for i in order:
            img, labels, path, _ = ds[i]
            assert img.shape == (3, 64, 64) and len(labels)
            seen.append(path)
            sizes.append(len(ds._tiles))
        if epoch == 1:  # steady state: only primaries not in the buffer are decoded, mixup (p 0.5) included
            assert 0.5 * len(ds) < CountingDataset.decodes - before <= len(ds)
    assert max(sizes) == 8 and ds._tiles.nbytes() <= 8 * 3 * 64 * 64
    assert sorted(seen) == sorted(ds.im_files * 2)  # every image the primary sample once per epoch
    up = CountingDataset(src, imgsz=64, augment=True, hyp={**MOSAIC, "mixup": 0.0}, nc=3, upstream=True)
    CountingDataset.decodes = 0
    for i in range(10):
        up[i]
    assert 36 <= CountingDataset.decodes <= 40 and up._buffer() is None  # 4 fresh draws per mosaic (a repeat
    #                                                                      within one mosaic is decoded once)


def test_buffer_kept_by_persistent_workers_and_same_seed_same_batches(tmp_path, monkeypatch):
    """DistributedSampler ranks, 2 persistent workers each, 2 epochs, a buffer smaller than the data: the same seed
    gives the same batches, a new seed others; the ranks' primaries split the data every epoch."""
    src = _write_set(tmp_path, [(80, 64)] * 24)
    monkeypatch.setattr(dataset_mod, "BUFFER_BYTES", 5 * 3 * 64 * 64)
    monkeypatch.setenv("WORLD_SIZE", "2")

    def run(seed, rank, warm_main=False):
        loader, ds = create_dataloader(src, 64, 3, hyp=MOSAIC, augment=True, workers=2, shuffle=True, seed=seed,
                                       nc=3, rank=rank)
        assert ds.buffer_capacity == 5 and loader.persistent_workers
        if warm_main:  # a buffer filled in the main process is not inherited by the (forked) workers
            for i in range(6):
                ds[i]
        out = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            out.append([(b[0].clone(), b[1].clone(), b[2]) for b in loader])
        return out

    a0, a1 = run(0, 0), run(0, 1)
    b0, c0 = run(0, 0, warm_main=True), run(1, 0)
    for ea, eb in zip(a0, b0):
        for x, y in zip(ea, eb):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a0[1], c0[1]))
    for epoch in range(2):
        p0 = [p for b in a0[epoch] for p in b[2]]
        p1 = [p for b in a1[epoch] for p in b[2]]
        assert len(p0) == len(p1) == 12 and sorted(p0 + p1) == sorted(str(p) for p in src.iterdir())


def test_ram_cache_holds_resized_images_and_says_how_much(tmp_path, caplog):
    src = _write_set(tmp_path, [(1280, 720), (640, 960)])
    caplog.set_level(logging.INFO)
    ds = YOLODataset(src, imgsz=160, augment=True, hyp=MOSAIC, nc=3, cache="ram", prefix="train: ")
    assert [im.shape for im in ds.ims] == [(90, 160, 3), (160, 107, 3)]
    mib = sum(im.nbytes for im in ds.ims) / 2**20
    assert f"Cached images (ram, {mib:.1f} MiB of images resized to 160 px)" in caplog.text
    assert "partners from the RAM cache" in caplog.text and ds.buffer_capacity == len(ds)


def test_hsv_lookup_matches_per_channel_definition():
    img = _scene(67, 45)
    for seed in range(4):
        np.random.seed(seed)
        r = np.random.uniform(-1, 1, 3) * [0.015, 0.7, 0.4] + 1
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float64)
        hsv[..., 0] = np.floor(hsv[..., 0] * np.float32(r[0]) % 180)
        hsv[..., 1:] = np.floor(np.clip(hsv[..., 1:] * r[1:].astype(np.float32), 0, 255))
        ref = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
        out = img.copy()
        np.random.seed(seed)
        augment_hsv(out, 0.015, 0.7, 0.4)
        assert np.array_equal(out, ref)


def test_convex_boxes_in_image_match_polygon_clipping():
    w, h = 100, 80
    # hand-computed: a diamond centred on the top-left corner keeps the quarter inside; a box fully outside
    diamond = np.array([[-20, 0], [0, -20], [20, 0], [0, 20]], float)
    outside = np.array([[120, 10], [150, 10], [150, 30], [120, 30]], float)
    square = np.array([[10, 10], [30, 10], [30, 40], [10, 40]], float)
    got = convex_boxes_in_image(np.stack([diamond, outside, square]), w, h)
    np.testing.assert_allclose(got, [[0, 0, 20, 20], [0, 0, 0, 0], [10, 10, 30, 40]], atol=1e-12)
    rng = np.random.default_rng(0)
    quads = []
    for _ in range(400):  # rotated, sheared, scaled boxes around and across the image edges
        x1, y1 = rng.uniform(-60, 140), rng.uniform(-60, 120)
        bw, bh = rng.uniform(1, 80, 2)
        ang, s, sh = rng.uniform(-1, 1), rng.uniform(0.5, 1.5), rng.uniform(-0.3, 0.3)
        m = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) * s @ np.array([[1, sh], [0, 1]])
        quads.append((np.array([[x1, y1], [x1 + bw, y1], [x1 + bw, y1 + bh], [x1, y1 + bh]]) - 50) @ m.T + 50)
    got = convex_boxes_in_image(np.stack(quads), w, h)
    ref = np.stack([polygon_box_in_image(q, w, h) for q in quads])
    np.testing.assert_allclose(got, ref, atol=1e-9)
    assert ((ref[:, 2] - ref[:, 0]) > 0).sum() > 150  # many quads were partly inside


def test_copy_paste_region_equals_whole_canvas_mirror():
    """Pasting only the covered region gives the pixels of the definition (the whole canvas mirrored, copied
    where any pasted outline is filled), also when pasted outlines overlap or touch the canvas edge."""
    rng = np.random.default_rng(0)
    pasted = 0
    for t in range(60):
        h, w = 90, 130
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        segs, rows = [], []
        for i in range(int(rng.integers(2, 6))):
            c, r = rng.uniform([-5, -5], [w + 5, h + 5]), rng.uniform(4, 25)
            ang = np.sort(rng.uniform(0, 2 * np.pi, 10))
            pts = np.clip(c + r * np.stack([np.cos(ang), np.sin(ang)], 1), 0, [w, h])
            segs.append(pts if rng.random() > 0.2 else None)
            rows.append([i, *pts.min(0), *pts.max(0)])
        labels = np.array(rows)
        random.seed(t)
        out, lb, out_segs = copy_paste(img, labels, segs, 0.8)
        mask = np.zeros((h, w), np.uint8)
        for sg in out_segs[len(segs):]:
            cv2.fillPoly(mask, [np.round(sg).astype(np.int32)], 255)
        ref = np.where(mask[..., None] > 0, img[:, ::-1], img)
        assert np.array_equal(out, ref), t
        pasted += len(lb) - len(labels)
    assert pasted > 40


_PROBE = """
import os, sys, time, cv2, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from utils.data.loader import OneThreadWorkersLoader, seed_worker

class Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return cv2.getNumThreads()

cv2.setNumThreads(2)  # the parent's OpenCV pool has run (e.g. --cache ram decodes) before the workers fork
cv2.GaussianBlur(np.zeros((1000, 1000, 3), np.uint8), (5, 5), 0)
me = str(os.getpid())  # ... and its threads went to sleep on their condition variable (Linux: /proc)
while any(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] != "S"
          for t in os.listdir("/proc/self/task") if t != me):
    time.sleep(0.01)
loader = OneThreadWorkersLoader(Probe(), num_workers=1, worker_init_fn=seed_worker, persistent_workers=True)
print([int(x) for x in loader], [int(x) for x in loader], cv2.getNumThreads())
"""


def test_loader_workers_use_one_opencv_thread_after_the_parent_used_its_pool():
    """Workers report one OpenCV thread and start at all (setting it inside a forked worker hung there);
    the parent keeps its own count. The timeout only bounds a hang; the assertion is on the output."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _PROBE, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, timeout=limit(300))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[0] == "[1, 1] [1, 1] 2"


def test_upstream_loader_flag_reaches_the_training_config():
    import train_dual
    from utils.engine.config import TrainConfig
    assert TrainConfig.from_args(train_dual.parse_opt(["--upstream-loader"])).upstream_loader
    assert not TrainConfig.from_args(train_dual.parse_opt([])).upstream_loader


def test_batches_pinned_only_for_a_cuda_consumer(tmp_path, monkeypatch):
    """A CUDA build training on --device cpu must not pin batches (host memory and a copy per batch, no use)."""
    from types import SimpleNamespace

    from utils.engine.train import trainer as trainer_mod
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    src = _write_set(tmp_path / "d", [(96, 64), (64, 96)])
    kw = dict(hyp=MOSAIC, augment=True, workers=1, nc=3)
    assert not create_dataloader(str(src), 64, 2, **kw)[0].pin_memory
    assert create_dataloader(str(src), 64, 2, pin_memory=True, **kw)[0].pin_memory

    calls = []
    monkeypatch.setattr(trainer_mod, "create_dataloader", lambda *a, **k: (calls.append(k) or [], None))
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    cfg = SimpleNamespace(batch_size=2, cache=None, workers=1, single_cls=False, rect=False, image_weights=False,
                          seed=0, min_items=0, upstream_loader=False)
    t.cfg, t.data = cfg, SimpleNamespace(train="t", val="v", names=["a"], nc=1)
    t.imgsz, t.gs, t.hyp, t.main = 64, 32, {}, False
    for dev, pinned in (("cpu", False), ("cuda", True)):
        calls.clear()
        t.device = torch.device(dev)
        t._build_loaders()
        assert [k.get("pin_memory") for k in calls] == [pinned, pinned]
