"""YOLODataset: verified YOLO-format images + labels with mosaic/mixup/perspective/HSV/flip, rect batches
and RAM/disk image caching. Training images are decoded at the smallest JPEG scale that still fills the target
size, and mosaic/mixup partners come from a bounded per-worker buffer of recently decoded images (utils/data/
images.py); `upstream=True` restores upstream YOLOv9's full-size decodes and freshly decoded partners."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.general import LOGGER, UserError

from .augment import augment_hsv, copy_paste, letterbox, mixup, mosaic4, random_perspective
from .images import TileBuffer, imread, read_reduced
from .verify import parse_label_file, scan_dataset

# Per-process bound of the mosaic partner buffer: at most this many bytes of resized images (an image is at most
# imgsz x imgsz x 3 bytes), so 109 images at 640 px, 27 at 1280 px, the whole bundled set at 128 px.
BUFFER_BYTES = 128 * 2**20
DEFAULT_HYP = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.1, scale=0.9, shear=0.0,
                   perspective=0.0, flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.15)


class YOLODataset(Dataset):
    """Verified detection dataset. __getitem__ -> (img CHW RGB uint8 tensor, labels [n,6], path, shapes)."""

    def __init__(self, path, imgsz: int = 640, batch_size: int = 16, augment: bool = False, hyp: dict | None = None,
                 rect: bool = False, image_weights: bool = False, cache: str | bool | None = None,
                 single_cls: bool = False, stride: int = 32, pad: float = 0.0, min_items: int = 0,
                 prefix: str = "", nc: int | None = None, names: list | None = None, upstream: bool = False):
        self.imgsz, self.augment, self.rect, self.stride = imgsz, augment, rect, int(stride)
        self.upstream = upstream  # upstream YOLOv9's exact pipeline: full-size decodes, fresh mosaic partners
        self.hyp = {**DEFAULT_HYP, **(hyp or {})}
        self.image_weights = image_weights
        self.prefix = prefix
        self.names = list(names) if names else None
        self.nc = int(nc) if nc is not None else (len(self.names) if self.names else 1_000_000)
        scan = scan_dataset(path, self.nc, prefix)
        self.counts, self.cache_file = scan.counts, scan.cache_file
        self.im_files, self.label_files = scan.im_files, scan.label_files
        self.labels, self.shapes = scan.labels, scan.shapes  # shapes: (w, h)
        self.polygons = scan.polygons  # which label files hold polygon rows (augmentation re-reads them)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        if min_items:
            keep = [i for i, lb in enumerate(self.labels) if len(lb) >= min_items]
            gone = [Path(f).name for i, f in enumerate(self.im_files) if len(self.labels[i]) < min_items]
            LOGGER.info(f"{prefix}{len(gone)} images with fewer than {min_items} labels removed (--min-items)"
                        + (f": {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}" if gone else ""))
            self._subset(keep)
        n = len(self.im_files)
        if n == 0:
            raise UserError(f"{path}: no images left after filtering")
        # mosaic flag and sample order live in shared memory: persistent loader workers (forked or spawned
        # with the dataset) read them in __getitem__, so close_mosaic()/resample_image_weights() in the
        # main process reach workers at once, without re-spawning them every epoch
        self._state = torch.zeros(n + 1, dtype=torch.int64).share_memory_()  # [mosaic, indices...]
        self.mosaic = augment and not rect and self.hyp.get("mosaic", 0) > 0
        if self.mosaic and float(self.hyp.get("copy_paste", 0) or 0) > 0 and not any(self.polygons):
            LOGGER.info(f"{prefix}copy_paste={self.hyp['copy_paste']} has no effect: no polygon labels "
                        f"(segment copy-paste needs 'cls x1 y1 x2 y2 ...' rows)")
        self.indices = np.arange(n)
        self.batch = np.floor(np.arange(n) / batch_size).astype(int)
        self.batch_shapes = None
        if rect:
            self._set_rect(batch_size, pad)
        if image_weights:
            self.resample_image_weights()
        self.ims: list = [None] * n  # RAM cache of resized images
        self.npy_files = self._npy_paths()
        self.cache = (cache.lower() if isinstance(cache, str) else ("ram" if cache else None))
        if self.cache:
            self._cache_images(self.cache)
        self._tiles: TileBuffer | None = None  # this process's partner buffer, made on first use
        self.buffer_capacity = 0 if upstream else (n if self.cache == "ram" else
                                                   min(n, max(4, BUFFER_BYTES // (3 * imgsz * imgsz))))
        if self.mosaic:
            self._log_pipeline()

    def _log_pipeline(self) -> None:
        """Say how training images are read and what the partner buffer may hold (it is per worker process)."""
        if self.upstream:
            LOGGER.info(f"{self.prefix}upstream loader: full-size decodes, 4 freshly decoded images per mosaic")
            return
        cap, n = self.buffer_capacity, len(self)
        if self.cache == "ram":
            how = "from the RAM cache"
        elif cap >= n:
            how = (f"from a per-worker buffer of decoded images that grows to the whole set "
                   f"(<= {cap * 3 * self.imgsz ** 2 / 2**20:.1f} MiB per worker)")
        else:
            how = (f"from each worker's last {cap} decoded images "
                   f"(<= {cap * 3 * self.imgsz ** 2 / 2**20:.1f} MiB per worker)")
        LOGGER.info(f"{self.prefix}JPEGs decoded at 1/2-1/8 scale where {self.imgsz} px allows; "
                    f"mosaic/mixup partners {how}; --upstream-loader for full decodes and fresh partners")

    def __getstate__(self) -> dict:
        """Pickled for spawned workers: the partner buffer stays behind (each process fills its own)."""
        return {**self.__dict__, "_tiles": None}

    @property
    def mosaic(self) -> bool:
        return bool(self._state[0])

    @mosaic.setter
    def mosaic(self, on: bool) -> None:
        self._state[0] = int(bool(on))

    @property
    def indices(self) -> np.ndarray:
        """Sample order (dataset index -> image); a view of shared memory, assign with `ds.indices = ...`."""
        return self._state.numpy()[1:]

    @indices.setter
    def indices(self, value) -> None:
        self._state.numpy()[1:] = np.asarray(value, dtype=np.int64)

    def _npy_paths(self) -> list[str]:
        """Disk-cache files live in one folder beside the split's label cache, never beside the images.

        Why: images may be listed from read-only or foreign folders; the name carries a hash of the image's
        path, size and mtime, so same-named images from different folders and edited images never collide, and
        of the size and decode the array holds (it is stored resized, like the RAM cache), so another --imgsz
        or a validation reader of the same split never takes arrays made for training.
        """
        folder = Path(self.cache_file).with_suffix(".npy-cache")
        how = f"{self.imgsz}|{'reduced' if self.augment and not self.upstream else 'full'}"
        out = []
        for f in self.im_files:
            try:
                st = os.stat(f)
                key = f"{f}|{st.st_size}|{st.st_mtime_ns}|{how}"
            except OSError:
                key = f"{f}|{how}"
            out.append(str(folder / f"{Path(f).stem}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"))
        return out

    def segments(self, i: int) -> list | None:
        """Polygon points of image i's labels ([k, 2] normalised, None for box rows), re-read from its label
        file; None if the file changed since the scan (rows no longer match the cached boxes)."""
        parsed = parse_label_file(self.label_files[i], self.nc)
        mine = self.labels[i]
        if (parsed.error or len(parsed.segments) != len(mine)
                or not np.allclose(parsed.labels[:, 1:], mine[:, 1:], atol=1e-5)):
            return None
        return parsed.segments

    def _subset(self, keep: list[int]) -> None:
        self.im_files = [self.im_files[i] for i in keep]
        self.label_files = [self.label_files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.polygons = [self.polygons[i] for i in keep]
        self.shapes = self.shapes[keep]

    def _set_rect(self, batch_size: int, pad: float) -> None:
        """Sort by aspect ratio; each batch gets the smallest stride-multiple shape fitting its images."""
        ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = ar.argsort()
        self._subset(list(order))
        ar = ar[order]
        nb = int(self.batch[-1]) + 1
        shapes = np.ones((nb, 2))  # (h, w) relative to imgsz
        for i in range(nb):
            ari = ar[self.batch == i]
            lo, hi = ari.min(), ari.max()
            if hi < 1:  # all wide: full width, height = hi * width
                shapes[i] = [hi, 1]
            elif lo > 1:  # all tall
                shapes[i] = [1, 1 / lo]
        self.batch_shapes = (np.ceil(shapes * self.imgsz / self.stride + pad).astype(int) * self.stride)

    def _cache_images(self, kind: str) -> None:
        if kind not in ("ram", "disk"):
            raise UserError(f"--cache {kind}: use 'ram' or 'disk'")
        if kind == "disk":
            folder = Path(self.npy_files[0]).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                writeable = os.access(folder, os.W_OK)
            except OSError:
                writeable = False
            if not writeable:
                LOGGER.warning(f"{self.prefix}WARNING: {folder} not writeable, disk cache disabled")
                self.cache = None
                return
        nbytes = 0
        for i in range(len(self.im_files)):
            if kind == "ram":
                self.ims[i] = self.load_image(i)[0]
                nbytes += self.ims[i].nbytes
            elif not Path(self.npy_files[i]).exists():
                tmp = f"{self.npy_files[i]}.tmp{os.getpid()}.npy"  # atomic: a killed run leaves no half file
                try:
                    np.save(tmp, self.load_image(i)[0], allow_pickle=False)  # resized: 64 px, not 8000x6000
                    os.replace(tmp, self.npy_files[i])
                except OSError as e:
                    Path(tmp).unlink(missing_ok=True)
                    LOGGER.warning(f"{self.prefix}WARNING: disk cache disabled, cannot write {tmp} ({e.strerror or e})")
                    self.cache = None
                    return
        held = f", {nbytes / 2**20:.1f} MiB of images resized to {self.imgsz} px" if kind == "ram" else ""
        LOGGER.info(f"{self.prefix}Cached images ({kind}{held})")

    def __len__(self) -> int:
        return len(self.im_files)

    def close_mosaic(self) -> None:
        """Turn mosaic (and mixup, which rides on it) off for the final epochs."""
        self.mosaic = False

    # ---- image weights ----
    def class_weights(self) -> np.ndarray:
        """Inverse class frequency, normalised to sum 1 (classes never seen get weight of 1 count)."""
        nc = self.nc if self.nc < 1_000_000 else int(max((lb[:, 0].max() for lb in self.labels if len(lb)),
                                                          default=0)) + 1
        counts = np.bincount(np.concatenate([lb[:, 0].astype(int) for lb in self.labels] or [np.zeros(0, int)]),
                             minlength=nc).astype(float)
        w = 1 / np.maximum(counts, 1)
        return w / w.sum()

    def resample_image_weights(self, class_weights: np.ndarray | None = None) -> None:
        """Draw this epoch's image order with probability ~ sum of its labels' class weights."""
        cw = self.class_weights() if class_weights is None else np.asarray(class_weights, float)
        iw = np.array([cw[lb[:, 0].astype(int)].sum() if len(lb) else cw.min() for lb in self.labels])
        self.indices = np.array(random.choices(range(len(self.im_files)), weights=iw, k=len(self.im_files)))

    # ---- loading ----
    def load_image(self, i: int) -> tuple[np.ndarray, tuple, tuple]:
        """BGR image resized so its long side is imgsz -> (img, (h0, w0), (h, w))."""
        im = self.ims[i]
        if im is not None:
            w0, h0 = self.shapes[i]
            return im, (int(h0), int(w0)), im.shape[:2]
        if self.cache == "disk" and Path(self.npy_files[i]).exists():  # stored resized, as load_image returns it
            im = np.load(self.npy_files[i], allow_pickle=False)
            w0, h0 = self.shapes[i]
            return im, (int(h0), int(w0)), im.shape[:2]
        if self.augment and not self.upstream:  # training: decode only the pixels the target size keeps
            w0, h0 = (int(v) for v in self.shapes[i])
            im = read_reduced(self.im_files[i], (h0, w0), self.imgsz)
        else:  # validation and --upstream-loader: full decode, so val mAP does not depend on this speed-up
            im = imread(self.im_files[i])
            h0, w0 = im.shape[:2]
        r = self.imgsz / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (max(int(round(w0 * r)), 1), max(int(round(h0 * r)), 1)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    # ---- mosaic partners ----
    def _buffer(self) -> TileBuffer | None:
        """This process's partner buffer (a new, empty one in a new worker process); None for --upstream-loader."""
        if not self.buffer_capacity:
            return None
        if self._tiles is None or self._tiles.pid != os.getpid():
            self._tiles = TileBuffer(self.buffer_capacity)
        return self._tiles

    def _from_buffer(self) -> TileBuffer | None:
        """The buffer when partners are drawn from it: it is full and smaller than the dataset. Until then
        (and whenever the whole dataset fits) partners are drawn from the whole dataset as upstream does, with
        the same random draws, and each decoded one is buffered."""
        buf = self._buffer()
        return buf if buf is not None and buf.full and buf.capacity < len(self) else None

    def _tile(self, i: int) -> tuple[np.ndarray, list | None]:
        """(resized image, polygon rows or None) of image i: buffered, or decoded and buffered."""
        buf = self._buffer()
        item = buf.get(i) if buf is not None else None
        if item is None:
            item = (self.load_image(i)[0], self.segments(i) if self.polygons[i] else None)
            if buf is not None:
                buf.put(i, item)
        return item

    def _mosaic_tiles(self, index: int, partners: list[int]) -> list[tuple]:
        """[(img, labels, polygons)] in a random order: the primary image and its partners. Partners are read
        first: buffering the primary (a decode) may evict one of them."""
        idx = [index] + partners
        random.shuffle(idx)
        tiles: dict[int, tuple] = {}
        for i in sorted(set(idx), key=lambda j: j == index):
            tiles[i] = self._tile(i)
        return [(tiles[i][0], self.labels[i], tiles[i][1]) for i in idx]

    def _load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        buf = self._from_buffer()
        partners = random.choices(buf.keys if buf else range(len(self.im_files)), k=3)
        h = self.hyp
        img, labels, segments = mosaic4(self._mosaic_tiles(index, partners), self.imgsz)
        p_cp = float(h.get("copy_paste", 0) or 0)
        if segments is not None and p_cp > 0:
            img, labels, segments = copy_paste(img, labels, segments, p_cp)
        border = -(self.imgsz // 2)
        return random_perspective(img, labels, degrees=h["degrees"], translate=h["translate"], scale=h["scale"],
                                  shear=h["shear"], perspective=h["perspective"], border=(border, border),
                                  segments=segments)

    def __getitem__(self, index: int):
        index = int(self.indices[index])
        hyp = self.hyp
        if self.mosaic and random.random() < hyp["mosaic"]:
            img, labels = self._load_mosaic(index)
            shapes = None
            if random.random() < hyp.get("mixup", 0):
                buf = self._from_buffer()
                img2, labels2 = self._load_mosaic(random.choice(buf.keys) if buf else random.randrange(len(self)))
                img, labels = mixup(img, labels, img2, labels2)
        else:
            if not self.mosaic:
                self._tiles = None  # mosaic is off for good (close_mosaic): free the partner buffer
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.imgsz
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment, stride=self.stride)
            shapes = ((h0, w0), ((h / h0 * ratio[1], w / w0 * ratio[0]), pad))
            lb = self.labels[index]
            labels = np.zeros((len(lb), 5))
            if len(lb):
                nw, nh = ratio[0] * w, ratio[1] * h  # resized content size in pixels
                labels[:, 0] = lb[:, 0]
                labels[:, 1:] = xywhn2xyxy(lb[:, 1:5], nw, nh, pad[0], pad[1])
            if self.augment:
                segs = self.segments(index) if self.polygons[index] else None
                if segs:  # polygon outlines in letterboxed pixels, for tight boxes after the warp
                    segs = [None if sg is None else sg * [nw, nh] + pad for sg in segs]
                img, labels = random_perspective(img, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                                 scale=hyp["scale"], shear=hyp["shear"],
                                                 perspective=hyp["perspective"], segments=segs)
        hh, ww = img.shape[:2]
        nl = len(labels)
        out = torch.zeros((nl, 6))
        if nl:
            xywhn = xyxy2xywhn(labels[:, 1:5], ww, hh, clip=True)
            keep = (xywhn[:, 2] > 1e-3) & (xywhn[:, 3] > 1e-3)  # drop boxes squashed to nothing
            labels, xywhn = labels[keep], xywhn[keep]
            nl = len(labels)
            out = torch.zeros((nl, 6))
        if self.augment:
            augment_hsv(img, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
            if random.random() < hyp["flipud"]:
                img = np.flipud(img)
                if nl:
                    xywhn[:, 1] = 1 - xywhn[:, 1]
            if random.random() < hyp["fliplr"]:
                img = np.fliplr(img)
                if nl:
                    xywhn[:, 0] = 1 - xywhn[:, 0]
        if nl:
            out[:, 1] = torch.from_numpy(labels[:, 0].astype(np.float32))
            out[:, 2:] = torch.from_numpy(xywhn.astype(np.float32))
        img = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        return torch.from_numpy(img), out, self.im_files[index], shapes

    @staticmethod
    def collate_fn(batch):
        """Stack images; prefix each target row with its image index in the batch."""
        imgs, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        return torch.stack(imgs, 0), torch.cat(labels, 0), paths, shapes
