"""Small helpers shared by the test modules."""
import contextlib

import cv2
import numpy as np
import torch
import torch.nn as nn


def perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (so equal outputs mean equal weights), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def colours(n):
    """n well-separated saturated BGR colours (one per class in the pixel-alignment tests)."""
    hsv = np.array([[[int(i * 180 / n), 255, 255] for i in range(n)]], np.uint8)
    return [tuple(int(v) for v in c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]]


def pixel_box(img_bgr, colour, tol=40):
    """Tight xyxy box of the pixels close to colour (single connected blob), or None."""
    mask = (np.abs(img_bgr.astype(int) - np.array(colour)).max(2) < tol).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask)
    big = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] > 3]
    if len(big) != 1:
        return None  # absent, or the same source image appears twice in this mosaic
    ys, xs = np.nonzero(lab == big[0])
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


SHAPE_NAMES = ["circle", "rectangle", "triangle", "star", "cross"]


def shapes_yaml(root, n_train: int, n_val: int, seed: int = 3, name: str = "tiny.yaml"):
    """A generated shapes dataset under root/ds and its data YAML (root/name): the tiny training data."""
    import yaml
    from utils.data import generate_shapes
    generate_shapes(root / "ds", n_train=n_train, n_val=n_val, seed=seed)
    data = root / name
    data.write_text(yaml.safe_dump({"path": str(root / "ds"), "train": "images/train", "val": "images/val",
                                    "names": SHAPE_NAMES}))
    return data


def seeded_tiny_checkpoint(path, names):
    """Seeded gelan-t whose random head still gives varied boxes above a low threshold (scores ~0.2-0.3)."""
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = DetectionModel("gelan-t.yaml", nc=len(names))
    g = torch.Generator().manual_seed(1)
    for box, cls in zip(model.head.cv2, model.head.cv3):
        box[-1].bias.data = torch.randn(box[-1].bias.shape, generator=g) * 3  # distinct box sizes per level
        cls[-1].bias.data[:] = -1.0
    return save_checkpoint(make_checkpoint(model, names=names), path)


@contextlib.contextmanager
def disk_full_after(nbytes: int):
    """Every write to a regular file past `nbytes` fails (EFBIG), as on a full disk: RLIMIT_FSIZE, with the
    kernel's SIGXFSZ ignored so the write returns the error instead of killing the process. Read captured
    output (capfd.readouterr()) before entering: captured stderr is a file too."""
    import resource
    import signal
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


# Time limits of subprocesses and waits are written for an idle 2-core machine and multiplied by TIME_SCALE, so
# that they hold when other jobs load the machine (at load 7 on 2 cores a training process that takes 11-14 s
# idle, mostly imports, took over 120 s). A limit only bounds a hang: tests wait for a condition they check,
# never for the limit itself. YOLO_TEST_TIME_SCALE overrides the factor (e.g. 1 to see a hang sooner).
TIME_SCALE = float(__import__("os").environ.get("YOLO_TEST_TIME_SCALE", "5"))


def limit(seconds: float) -> float:
    """A time limit for a subprocess or a wait: `seconds` (enough on an idle machine) times TIME_SCALE."""
    return seconds * TIME_SCALE


class FailingBackward(torch.autograd.Function):
    """Identity forward whose backward raises: a stand-in for inductor compiling the backward lazily and failing."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("inductor: backward compilation failed")


def signal_stack_is_mapped() -> bool:
    """The calling thread's signal stack (if any) lies in mapped memory (/proc/self/maps): a library that left it
    on a freed stack makes the next signal handler crash the process, far from the cause."""
    from utils.deploy.signal_stack import current
    stack = current()
    if stack is None or not stack[0] or stack[2] & 2:  # unknown, none, or disabled (SS_DISABLE)
        return True
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= stack[0] < hi:
            return True
    return False
