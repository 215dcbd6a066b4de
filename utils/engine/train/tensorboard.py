"""TensorBoard event files for a training run (`tensorboard --logdir runs/train`), as a trainer callback.

Scalars are exactly the results.csv row of each epoch (same tags as its columns) plus metrics/fitness;
images are the plots the run already writes (train batch mosaics, validation labels vs predictions, PR curve).
The trainer calls callbacks on global rank 0 only, so other ranks never write.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from utils.general import LOGGER

TRAIN_IMAGES = ("train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg")
FINAL_IMAGES = ("val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch1_labels.jpg", "val_batch1_pred.jpg",
                "PR_curve.png", "confusion_matrix.png")


class TensorBoardLogger:
    """Writes event files into the run folder; one scalar per results.csv column per epoch."""

    def __init__(self) -> None:
        self.writer = None
        self.train_images_logged = False

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
        if not self.train_images_logged:
            self.train_images_logged = self._add_images(trainer.save_dir, TRAIN_IMAGES, epoch) > 0
        self.writer.flush()

    def on_train_end(self, trainer, result) -> None:
        if self.writer is None:
            return
        self._add_images(trainer.save_dir, FINAL_IMAGES, trainer.cfg.epochs - 1)
        self.writer.close()
        self.writer = None

    def _add_images(self, folder: Path, names: tuple[str, ...], step: int) -> int:
        n = 0
        for name in names:
            im = cv2.imread(str(folder / name))
            if im is not None:
                self.writer.add_image(Path(name).stem, np.ascontiguousarray(im[..., ::-1]), step, dataformats="HWC")
                n += 1
        return n
