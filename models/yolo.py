"""YOLOv9 models from YAML: parse_model, DetectionModel, fuse, honest summary (attention FLOPs included).

Usage: python models/yolo.py --cfg models/detect/yolov9-c-MMQARepNCSPELAN4.yaml [--imgsz 640] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

if __package__ in (None, ""):  # allow `python models/yolo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import common  # noqa: E402
from models.attention import MultiQueryAttentionLayerWithDownSampling  # noqa: E402
from models.common import (ELAN1, SPPELAN, ADown, AConv, CBFuse, CBLinear, Concat, Conv, MMQARepNCSPELAN4,  # noqa: E402
                           RepConvN, RepNCSPELAN4)
from models.heads import DDetect, DualDDetect  # noqa: E402
from utils.general import LOGGER, UserError, make_divisible  # noqa: E402

CFG_DIR = Path(__file__).resolve().parent / "detect"

# Modules looked up by the names a YAML may use. Nothing else is resolvable: YAML text is never evaluated.
MODULES: dict[str, type] = {name: getattr(common, name) for name in common.__all__ if isinstance(getattr(common, name), type)}
MODULES.update({"DDetect": DDetect, "DualDDetect": DualDDetect, "Upsample": nn.Upsample, "nn.Upsample": nn.Upsample,
                "MaxPool2d": nn.MaxPool2d, "nn.MaxPool2d": nn.MaxPool2d, "Identity": nn.Identity, "nn.Identity": nn.Identity})
# Modules whose first argument is the output width c2 (input width c1 is prepended, only c2 is width-scaled).
C2_FIRST = (Conv, AConv, ADown, RepConvN, RepNCSPELAN4, MMQARepNCSPELAN4, ELAN1, SPPELAN)
HEADS = (DDetect, DualDDetect)


def resolve_cfg(cfg: str | Path) -> Path:
    """Find a model YAML by path or by bare name in models/detect."""
    p = Path(cfg)
    for cand in (p, CFG_DIR / p.name, CFG_DIR / f"{p.stem}.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"{cfg}: model YAML not found (looked here and in {CFG_DIR})")


def load_model_yaml(cfg: str | Path) -> dict:
    path = resolve_cfg(cfg)
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or "backbone" not in d or "head" not in d:
        raise UserError(f"{path}: a model YAML needs 'backbone' and 'head' lists")
    d["yaml_file"] = path.name
    return d


def _arg(a, nc: int):
    """YAML argument -> value. Only 'nc' and 'None' are symbolic; other strings stay strings."""
    if a == "nc":
        return nc
    if a in ("None", "none"):
        return None
    return a


def parse_model(d: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list from a model dict; returns (layers, indices whose outputs must be kept)."""
    nc, gd, gw = d["nc"], d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    layers, save, chs = [], [], []
    c_in = ch[0]
    for i, row in enumerate(d["backbone"] + d["head"]):
        try:
            f, n, name, args = row
        except (TypeError, ValueError):
            raise UserError(f"{d.get('yaml_file', 'model')}: layer {i}: expected [from, number, module, args], got {row}") from None
        m = MODULES.get(str(name).replace("torch.nn.", "nn."))
        if m is None:
            raise UserError(f"{d.get('yaml_file', 'model')}: layer {i}: unknown module '{name}'")
        args = [_arg(a, nc) for a in (args or [])]
        n = max(round(n * gd), 1) if n > 1 else n
        src = (lambda j: c_in if (i == 0 and j == -1) else chs[j])
        if m in C2_FIRST:
            c1, c2 = src(f), args[0]
            c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
        elif m is Concat:
            c2 = sum(src(x) for x in f)
        elif m is CBLinear:
            c2 = args[0]
            args = [src(f), c2, *args[1:]]
        elif m is CBFuse:
            c2 = src(f[-1])
        elif m in HEADS:
            args.append([src(x) for x in f])
            c2 = None
        else:
            c2 = src(f)
        module = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        module.i, module.f, module.type = i, f, m.__name__
        module.np = sum(p.numel() for p in module.parameters())
        module.args = args
        save.extend(x % (i if i else 1) for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        chs.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


class DetectionModel(nn.Module):
    """YOLO detector built from a YAML path/name or dict; `nc` and `ch` override the YAML."""

    def __init__(self, cfg: str | Path | dict = "yolov9-t-MMQA.yaml", ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = copy.deepcopy(cfg) if isinstance(cfg, dict) else load_model_yaml(cfg)
        self.yaml["ch"] = ch
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = nc
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        head = self.head
        if not isinstance(head, HEADS):
            raise UserError(f"{self.yaml.get('yaml_file', 'model')}: the last layer must be DDetect or DualDDetect")
        s = 256  # strides from one dummy forward (training mode returns raw maps)
        was_training = self.training
        self.train()
        with torch.no_grad():
            out = self._forward_once(torch.zeros(1, ch, s, s))
        maps = out[1] if self.is_dual else out
        head.strides = tuple(s / m.shape[-2] for m in maps)
        head.stride = torch.tensor(head.strides)
        self.stride = head.stride
        head.bias_init()
        self.train(was_training)

    @property
    def head(self) -> DDetect:
        return self.model[-1]

    @property
    def is_dual(self) -> bool:
        return isinstance(self.head, DualDDetect)

    @property
    def nc(self) -> int:
        return self.head.nc

    def forward(self, x: torch.Tensor, profile: bool = False):
        return self._forward_once(x, profile)

    def _forward_once(self, x: torch.Tensor, profile: bool = False):
        y: list = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if profile:
                self._profile_layer(m, x)
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _profile_layer(self, m: nn.Module, x) -> None:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):
                m(copy.copy(x) if isinstance(x, list) else x)
        dt = (time.perf_counter() - t) / 3 * 1000
        gflops = layer_gflops(m, x)
        LOGGER.info(f"{m.i:>4}{dt:12.2f} ms{gflops:12.3f} GFLOPs  {m.type}")

    def fuse(self) -> "DetectionModel":
        """Fold BatchNorms into convs and RepConvN branches into one 3x3 conv (eval outputs unchanged)."""
        for m in self.model.modules():
            if isinstance(m, RepConvN):
                m.fuse()
            elif isinstance(m, Conv) and hasattr(m, "bn"):
                m.fuse()
            elif isinstance(m, MultiQueryAttentionLayerWithDownSampling):
                m.fuse()
        return self

    def info(self, verbose: bool = False, imgsz: int | tuple = 640) -> dict:
        return model_info(self, verbose=verbose, imgsz=imgsz)


# ---------------------------------------------------------------- cost accounting

def attention_gflops(model: nn.Module, imgsz: int | tuple = 640) -> float:
    """Attention matmul GFLOPs per image at imgsz, by formula (thop and flop counters miss fused SDPA)."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    sizes: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: sizes.__setitem__(mod, inp[0].shape[-2:]))
             for m in model.modules() if isinstance(m, MultiQueryAttentionLayerWithDownSampling)]
    if not hooks:
        return 0.0
    try:
        s = 64  # probe which resolution each attention layer sees; strides are powers of 2
        p = next(model.parameters())
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, s, s, device=p.device, dtype=p.dtype))
    finally:
        for hk in hooks:
            hk.remove()
    total = 0
    for mod, (fh, fw) in sizes.items():
        stride_h, stride_w = s // fh, s // fw
        total += mod.attention_flops(math.ceil(h / stride_h), math.ceil(w / stride_w))
    return total / 1e9


def _has_thop() -> bool:
    try:
        import thop  # noqa: F401
        return True
    except ImportError:
        return False


def thop_gflops(model: nn.Module, imgsz: int | tuple = 640) -> float:
    """thop's convolution GFLOPs at imgsz (2 x MACs), scaled from a small probe like upstream; 0 if thop is missing."""
    try:
        import thop
    except ImportError:
        return 0.0
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    s = 64
    p = next(model.parameters())
    m = copy.deepcopy(model).eval()
    with contextlib.redirect_stdout(None):
        macs = thop.profile(m, inputs=(torch.zeros(1, 3, s, s, device=p.device, dtype=p.dtype),), verbose=False)[0]
    return macs * 2 / 1e9 * (h / s) * (w / s)


def layer_gflops(m: nn.Module, x: torch.Tensor | list) -> float:
    """True GFLOPs of one layer at the given input, a tensor or the list a Concat/head takes (thop for
    convs + formula for attention)."""
    att = 0
    for a in m.modules():
        if isinstance(a, MultiQueryAttentionLayerWithDownSampling):
            h, w = (x[0] if isinstance(x, list) else x).shape[-2:]
            att += a.attention_flops(h, w)  # MMQA blocks keep resolution until attention
    try:
        import thop
        with contextlib.redirect_stdout(None):
            macs = thop.profile(copy.deepcopy(m), inputs=(copy.copy(x) if isinstance(x, list) else x,), verbose=False)[0]
    except Exception:
        macs = 0
    return (2 * macs + att) / 1e9


def model_info(model: DetectionModel, verbose: bool = False, imgsz: int | tuple = 640) -> dict:
    """Print the upstream-style per-layer table (verbose) and the summary line; return the numbers."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_l = len(list(model.modules()))
    if verbose:
        LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
        for m in model.model:
            n = len(m) if isinstance(m, nn.Sequential) and m.type != "Sequential" else 1
            LOGGER.info(f"{m.i:>3}{str(m.f):>18}{n:>3}{m.np:10.0f}  {m.type:<40}{str(m.args):<30}")
    was_training = model.training
    conv = thop_gflops(model, imgsz)
    att = attention_gflops(model, imgsz)
    model.train(was_training)
    name = Path(model.yaml.get("yaml_file", "model")).stem
    size = imgsz if isinstance(imgsz, int) else f"{imgsz[0]}x{imgsz[1]}"
    if _has_thop():
        LOGGER.info(f"{name} summary: {n_l} layers, {n_p} parameters, {n_g} gradients, {conv + att:.1f} GFLOPs "
                    f"(at {size}: convolutions {conv:.1f} as thop counts + attention matmuls {att:.1f})")
    else:  # say so rather than print a convolution count of 0
        LOGGER.info(f"{name} summary: {n_l} layers, {n_p} parameters, {n_g} gradients, GFLOPs n/a (thop not "
                    f"installed: pip install thop; attention matmuls alone {att:.1f} at {size})")
    return {"layers": n_l, "parameters": n_p, "gradients": n_g, "gflops": conv + att,
            "thop_gflops": conv, "attention_gflops": att}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build a model YAML and print its summary")
    ap.add_argument("--cfg", default="yolov9-t-MMQA.yaml", help="model YAML path or name in models/detect")
    ap.add_argument("--nc", type=int, default=None, help="override number of classes")
    ap.add_argument("--imgsz", type=int, default=640, help="image size for the FLOP count")
    ap.add_argument("--profile", action="store_true", help="per-layer time and FLOPs of one forward at --imgsz")
    ap.add_argument("--fuse", action="store_true", help="fuse before printing")
    opt = ap.parse_args(argv)
    model = DetectionModel(opt.cfg, nc=opt.nc).eval()
    if opt.fuse:
        model.fuse()
    model.info(verbose=True, imgsz=opt.imgsz)
    if opt.profile:
        LOGGER.info(f"\n{'layer':>4}{'time':>15}{'GFLOPs':>19}  module")
        with torch.no_grad():
            model(torch.zeros(1, 3, opt.imgsz, opt.imgsz), profile=True)


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
