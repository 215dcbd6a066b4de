"""TensorBoard event files for a training run (`tensorboard --logdir runs/train`), as a trainer callback.

Scalars are exactly the results.csv row of each epoch (same tags as its columns) plus metrics/fitness;
images are the plots the run already wrote (train batch mosaics after the first epoch, validation labels vs
predictions, PR curve and confusion matrix at the end). Only files that exist are read, nothing at all with
--noplots, and the train mosaics only by the run that drew them (a --resume does not log them again).
Images are stored as JPEG (quality 85) at most 1024 px on the long side: TensorBoard's own add_image
stores uncompressed-size PNGs (5 MB per 1920 px mosaic). The trainer calls callbacks on global rank 0 only.
"""
from __future__ import annotations

from pathlib import Path

import cv2

from utils.general import LOGGER

TRAIN_IMAGES = ("train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg")
FINAL_IMAGES = ("val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch1_labels.jpg", "val_batch1_pred.jpg",
                "PR_curve.png", "confusion_matrix.png")
MAX_SIDE = 1024
JPEG_QUALITY = 85


def jpeg_summary(tag: str, im, max_side: int = MAX_SIDE):
    """A TensorBoard image summary holding `im` (BGR uint8) as JPEG bytes, downscaled to fit max_side."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    h, w = im.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        im = cv2.resize(im, (max(round(w * scale), 1), max(round(h * scale), 1)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        return None
    image = Summary.Image(height=im.shape[0], width=im.shape[1], colorspace=3, encoded_image_string=buf.tobytes())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class TensorBoardLogger:
    """Writes event files into the run folder; one scalar per results.csv column per epoch."""

    def __init__(self) -> None:
        self.writer = None

    def on_train_start(self, trainer) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            LOGGER.warning("WARNING: tensorboard is not installed (pip install tensorboard); no event files written")
            return
        self.writer = SummaryWriter(log_dir=str(trainer.save_dir))
        LOGGER.info(f"TensorBoard: view with `tensorboard --logdir {trainer.save_dir.parent}`")

    def on_epoch_end(self, trainer, epoch: int, row: dict) -> None:
        if self.writer is None:
            return
        for tag, value in row.items():
            if tag != "epoch":
                self.writer.add_scalar(tag, value, epoch)
        self.writer.add_scalar("metrics/fitness", trainer.last_result.fitness, epoch)
        if epoch == 0 and not trainer.cfg.noplots:  # the trainer draws train_batch* in epoch 0 only
            self._add_images(trainer.save_dir, TRAIN_IMAGES, epoch)
        self.writer.flush()

    def on_train_end(self, trainer, result) -> None:
        if self.writer is None:
            return
        if not trainer.cfg.noplots:
            self._add_images(trainer.save_dir, FINAL_IMAGES, trainer.cfg.epochs - 1)
        self.writer.close()
        self.writer = None

    def _add_images(self, folder: Path, names: tuple[str, ...], step: int) -> int:
        n = 0
        for name in names:
            f = folder / name
            im = cv2.imread(str(f)) if f.is_file() else None  # fewer batches than names: not every file exists
            summary = jpeg_summary(Path(name).stem, im) if im is not None else None
            if summary is not None:
                self.writer.file_writer.add_summary(summary, step)
                n += 1
        return n
