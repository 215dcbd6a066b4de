"""Checkpoints without pickled classes: written atomically, read with torch.load(weights_only=True).

Layout (all plain data): model_yaml (dict), model (state dict), ema (state dict or None), updates,
optimizer (state dict or None), epoch, best_fitness, opt (dict), hyp (dict), names (list), date,
versions. A final (stripped) checkpoint has the EMA weights as `model`, in fp16, and no optimizer.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.yolo import DetectionModel
from utils.general import LOGGER, ROOT, UserError, file_mode, os_reason

FORMAT_VERSION = 1


def _plain(x: Any) -> Any:
    """Convert option values (Paths, tuples, namespaces) to types weights_only loading accepts."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        return x
    return str(x)


def versions() -> dict:
    import torchvision
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses to unpickle
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "format": FORMAT_VERSION}


def make_checkpoint(model: nn.Module, *, ema: nn.Module | None = None, updates: int = 0, optimizer=None,
                    epoch: int = -1, best_fitness: float = 0.0, opt: dict | None = None, hyp: dict | None = None,
                    names: list | None = None, **extra) -> dict:
    names = list(names if names is not None else getattr(model, "names", []))
    ck = {
        "model_yaml": _plain(model.yaml),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in ema.state_dict().items()} if ema is not None else None,
        "updates": int(updates),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "best_fitness": float(best_fitness),
        "opt": _plain(opt or {}),
        "hyp": _plain(hyp or {}),
        "names": [str(n) for n in names],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
    }
    ck.update(_plain(extra))
    return ck


def _remove_stale_temps(path: Path, before: float) -> None:
    """Drop `.{name}.*.tmp` files a killed save left behind (not touched since `before`, so not in use)."""
    for f in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if f.stat().st_mtime < before:
                f.unlink()


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    A crash or a full disk never leaves a half-written file under `path`; the old file stays intact.
    Temp files of earlier saves that were killed mid-write are removed after a successful save.
    """
    path = Path(path)
    t_start = time.time() - 1.0  # mtime granularity margin
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: could not write checkpoint ({os_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"{path}: could not write checkpoint ({os_reason(e)}); the previous file is unchanged") from None
        raise
    _remove_stale_temps(path, t_start)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint of this project safely (no code runs); clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file (an OpenVINO export runs with detect_dual.py/"
                        f"val_dual.py; training and export start from a .pt written by train_dual.py)")
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if _is_torchscript(path):  # torch.load would hand it to torch.jit.load: refuse before that
        raise UserError(f"{path}: {_exported('a TorchScript file', '.torchscript', path)}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refused, truncated or not a torch file
        raise UserError(f"{path}: {_what_instead(path, e)}") from None
    if not isinstance(ck, dict) or "model_yaml" not in ck or "model" not in ck:
        keys = ", ".join(map(str, list(ck)[:4])) if isinstance(ck, dict) else type(ck).__name__
        raise UserError(f"{path}: a torch file but not a checkpoint of this project (it holds {keys or 'nothing'}; "
                        f"a checkpoint has model_yaml and model entries): use a .pt written by train_dual.py")
    return ck


def _what_instead(path: Path, err: Exception) -> str:
    """Why torch.load refused `path`, said as what the file is and what to do (torch's own text is about
    re-running with weights_only=False, which this project never does)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty file (0 bytes), not a checkpoint; the save or download was cut short, fetch or train it again"
    if zipfile.is_zipfile(path):
        text = str(err)
        if "GLOBAL" in text or "Unsupported global" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            return (f"a checkpoint of another project (it pickles code{f': {found.group(1)}' if found else ''}), "
                    f"which is never unpickled here; an upstream YOLOv9 .pt converts with "
                    f"`python -m utils.deploy.upstream --weights {path}`")
        found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # the reason, not the weights_only advice
        detail = found.group(1) if found else (text.strip().splitlines() or [type(err).__name__])[0]
        return f"a damaged torch archive ({detail[:160]}); fetch or train it again"
    if head.startswith(b"PK\x03\x04"):
        return "a truncated or damaged zip archive (what torch checkpoints are); the save or download was cut short"
    if _looks_like_onnx(path):
        return _exported("an ONNX model", ".onnx", path)
    if head[:1] == b"\x80":
        return ("a legacy (pre-1.6, non-zip) torch pickle, which is never unpickled here (it can run code); "
                "re-save it as a zip checkpoint with a recent torch, then convert it with utils.deploy.upstream")
    return f"not a checkpoint (neither a torch zip archive nor an ONNX model; it starts with bytes {head[:8].hex(' ')})"


def _exported(what: str, suffix: str, path: Path) -> str:
    """An exported model where a checkpoint is needed: already named as such, it only runs (training, resuming
    and exporting start from the .pt it came from); under another name, it runs once renamed."""
    if path.suffix.lower() == suffix:
        return (f"{what} (an export for inference), not a checkpoint: detect_dual.py and val_dual.py run it; "
                f"training, --resume and export.py start from a .pt written by train_dual.py (the one it was "
                f"exported from)")
    return f"{what}, not a checkpoint: name it {suffix} and run it with detect_dual.py/val_dual.py"


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip with code/ and constants.pkl), told from its table of contents only."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _looks_like_onnx(path: Path) -> bool:
    """True when onnx (an optional package) parses the file as a model with a graph."""
    try:
        import onnx
    except ImportError:
        return False
    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # not protobuf, or not a ModelProto
        return False


def model_from_checkpoint(ck: dict, use_ema: bool = True) -> nn.Module:
    """Rebuild the DetectionModel from the YAML dict and load the (EMA) weights in fp32."""
    state = ck["ema"] if use_ema and ck.get("ema") else ck["model"]
    model = DetectionModel(ck["model_yaml"], ch=ck["model_yaml"].get("ch", 3))
    missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                                strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match its model YAML: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.names = list(ck.get("names") or model.names)
    return model.float()


def load_model(path: str | Path, device: str | torch.device = "cpu", fuse: bool = False) -> nn.Module:
    """One loader for training resumes, validation, detection and export (.pt files of this project)."""
    model = model_from_checkpoint(load_checkpoint(path)).to(device).eval()
    if fuse:
        model.fuse()
    return model


def strip_checkpoint(path: str | Path) -> None:
    """Final checkpoint: EMA weights as the model, fp16, no optimizer/EMA copy (smaller file)."""
    ck = load_checkpoint(path)
    state = ck["ema"] or ck["model"]
    ck["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    ck["ema"], ck["optimizer"], ck["updates"] = None, None, 0
    ck["epoch"] = -1
    save_checkpoint(ck, path)
    LOGGER.info(f"Optimizer stripped from {path}, {Path(path).stat().st_size / 1e6:.1f}MB")


@dataclass(frozen=True)
class Transfer:
    """What `--weights` gave a new model. Counted are tensors that carry weights (parameters and BatchNorm
    statistics, not the num_batches_tracked counters, which every BatchNorm has whatever the architecture)
    and parameter elements; `fresh` names the parts that keep their initialisation."""

    tensors: int  # weight tensors loaded from the file
    total_tensors: int  # weight tensors of the model
    params: int  # parameter elements loaded
    total_params: int
    fresh: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.params / max(self.total_params, 1)


def _carries_weights(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


def _fresh_parts(model: nn.Module, missing: list[str], file_nc: int | None) -> list[str]:
    """Readable names of the layers (or parts of layers) whose weight tensors were not in the file."""
    mqa = [f"{n}." for n, m in model.named_modules() if type(m).__name__ == "MultiQueryAttentionLayerWithDownSampling"]
    layers = getattr(model, "model", None)
    head_i = len(layers) - 1 if layers is not None else -1
    own = [k for k in model.state_dict() if _carries_weights(k)]
    by_layer: dict[int, list[str]] = {}
    for k in missing:
        parts = k.split(".")
        if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit():
            by_layer.setdefault(int(parts[1]), []).append(k)
    out = []
    for i, keys in sorted(by_layer.items()):
        kind = type(layers[i]).__name__ if layers is not None else "layer"
        n_layer = sum(k.startswith(f"model.{i}.") for k in own)
        cls_branch = {f"model.{i}.cv3.", f"model.{i}.cv5."}
        if any(k.startswith(p) for k in keys for p in mqa):
            only = all(any(k.startswith(p) for p in mqa) for k in keys)
            what = "Mobile MQA attention" + ("" if only else " and more")
        elif i == head_i and all(any(k.startswith(p) for p in cls_branch) for k in keys):
            nc = getattr(layers[i], "nc", None)
            what = "class branch" + (f" (the file has {file_nc} classes, this model {nc})"
                                     if file_nc is not None and nc is not None and file_nc != nc else "")
        else:
            what = "all of it" if len(keys) == n_layer else f"{len(keys)} of its {n_layer} weight tensors"
        out.append(f"layer {i} {kind}: {what}")
    return out


def transfer_weights(model: nn.Module, state: dict, exclude: tuple = (), source: str = "pretrained weights",
                     file_nc: int | None = None) -> Transfer:
    """Load the entries of `state` whose names and shapes match, and say honestly what moved: weight tensors
    and parameters loaded, the parts that start fresh, and a warning when less than half of the model's
    parameters came from the file (the run is then close to training from scratch)."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items()
            if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(keep, strict=False)
    weights = [k for k in own if _carries_weights(k)]
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in keep]
    t = Transfer(tensors=sum(k in keep for k in weights), total_tensors=len(weights),
                 params=sum(p.numel() for k, p in params.items() if k in keep),
                 total_params=sum(p.numel() for p in params.values()),
                 fresh=tuple(_fresh_parts(model, missing, file_nc)))
    LOGGER.info(f"Transferred {t.tensors}/{t.total_tensors} weight tensors ({t.params:,}/{t.total_params:,} "
                f"parameters, {100 * t.fraction:.1f}%) from {source}")
    if t.fresh:
        parts = (["every layer (no weight of the file matched a name and shape here)"] if not t.tensors else
                 list(t.fresh[:8]) + ([f"{len(t.fresh) - 8} more layers"] if len(t.fresh) > 8 else []))
        LOGGER.info("Starting fresh (not in the file, or another shape): " + "; ".join(parts))
    if t.fraction < 0.5:
        LOGGER.warning(f"WARNING: only {100 * t.fraction:.1f}% of this model's parameters came from {source}: "
                       f"the architectures differ, so this run is close to training from scratch (check --cfg)")
    return t


def find_newest(pattern: str, flag: str, root: Path = ROOT / "runs") -> Path:
    """The most recently written file matching `pattern` under runs/ (e.g. 'train/*/weights/best.pt'), so
    `python val_dual.py`, `detect_dual.py` and `train_dual.py --resume` work right after training."""
    found = sorted(Path(root).glob(pattern), key=os.path.getmtime)
    if not found:
        raise UserError(f"{flag}: no {Path(root) / pattern} found; train a model with `python train_dual.py` "
                        f"or pass the path")
    LOGGER.info(f"Using the newest {found[-1]}")
    return found[-1]
