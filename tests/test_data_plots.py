"""labels.jpg and batch mosaics are written and draw boxes where the targets say."""
import cv2
import numpy as np
import torch

from utils.plots import class_colour, plot_images, plot_labels, plot_results


def test_plot_labels_writes_file(tmp_path):
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.3], [1, 0.2, 0.3, 0.1, 0.1]]), np.zeros((0, 5)),
              np.array([[2, 0.7, 0.7, 0.4, 0.4]])]
    f = plot_labels(labels, ["a", "b", "c"], tmp_path)
    assert f == tmp_path / "labels.jpg" and cv2.imread(str(f)) is not None


def test_plot_images_boxes_drawn(tmp_path):
    imgs = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    t6 = torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0.5], [1, 0, 0.25, 0.25, 0.2, 0.2]])
    f = plot_images(imgs, t6, ["a.jpg", "b.jpg"], tmp_path / "b0.png", names=["x", "y"])
    grid = cv2.imread(str(f))
    assert grid.shape == (128, 192, 3)
    # the class-1 box in image 0 spans x 24..72, y 16..48: its left edge has the class colour
    edge = grid[20:44, 24].astype(int)
    assert (edge == np.array(class_colour(1))).all(1).mean() > 0.8
    # [N,7] predictions in pixels with confidences: low-confidence ones skipped
    t7 = np.array([[0, 1, 48, 32, 40, 20, 0.9], [0, 0, 10, 10, 8, 8, 0.01]])
    f2 = plot_images(imgs.float() / 255, t7, None, tmp_path / "pred.png", names=["x", "y"])
    g2 = cv2.imread(str(f2))
    assert g2[8:14, 6:14].max() < 30 and g2[22:42, 28].max() > 60


def test_plot_results(tmp_path):
    f = tmp_path / "results.csv"
    f.write_text("epoch, train/box_loss, metrics/mAP50(B)\n0, 3.0, 0.1\n1, 2.5, 0.2\n2, 2.0, 0.3\n")
    out = plot_results(f)
    assert out == tmp_path / "results.png" and cv2.imread(str(out)) is not None


def test_full_disk_plot_is_one_warning_and_no_partial_file(tmp_path, capfd, caplog):
    """labels.jpg (and every other plot) on a full disk: one warning line, no traceback, no half-written or
    temp file; an existing plot stays as it was."""
    import logging

    from helpers import disk_full_after
    labels = np.array([[0, 0.5, 0.5, 0.2, 0.3], [1, 0.3, 0.6, 0.1, 0.1]], np.float32)
    old = plot_labels(labels, ["a", "b"], tmp_path)
    before = old.read_bytes()
    capfd.readouterr()
    with caplog.at_level(logging.WARNING), disk_full_after(4096):
        assert plot_labels(labels[:1], ["a", "b"], tmp_path) is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith(f"WARNING: plot not saved: {tmp_path / 'labels.jpg'}: "
                                                     f"could not write (File too large)"), warned
    assert "previous file is unchanged" in warned[0] and old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jpg"]
