"""Convert upstream YOLOv9 .pt files (pickled model objects) into this project's plain checkpoints, safely.

Upstream checkpoints pickle whole Python objects (models.yolo.DetectionModel, models.common.Conv, torch.nn
modules, ...). Unpickling them normally would import and run whatever the file names, so a downloaded file
could execute code. Here the zip archive is opened by hand and data.pkl is read by a restricted Unpickler:
only tensor/storage rebuild functions and a few plain builtins are resolved; model classes become inert
stand-ins that merely keep their attribute dict; every other global is refused before anything runs.

Usage:
    python -m utils.deploy.upstream --weights yolov9-c.pt --out yolov9-c-converted.pt [--cfg yolov9-c.yaml]
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.yolo import DetectionModel, load_model_yaml
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.general import LOGGER, UserError, cli

# torch.<Name>Storage classes as written by torch.save -> element dtype
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_DTYPE_NAMES = {"float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32",
                "int", "int16", "int8", "uint8", "bool"}
# module prefixes whose classes become inert stand-ins (model code of upstream and torch.nn internals)
_STUB_PREFIXES = ("models.", "torch.nn.modules.", "utils.")


class Stub:
    """Inert stand-in for a pickled object of an upstream class: keeps its state, runs no code."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args, **kwargs):  # called only when a pickle REDUCEs the class itself
        pass

    def __setstate__(self, state: Any) -> None:
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)  # (dict, slot state)
        if not all(isinstance(p, dict) or p is None for p in parts):
            self.__dict__["_stub_state"] = state
            return
        for part in parts:
            for k, v in (part or {}).items():
                if not str(k).startswith("__"):  # never shadow special methods (e.g. __setstate__)
                    self.__dict__[str(k)] = v

    def __repr__(self) -> str:
        return f"<stand-in {self._qualname}>"


_stub_classes: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _stub_classes:
        _stub_classes[key] = type(name, (Stub,), {"_qualname": key, "__module__": "utils.deploy.upstream.stubs"})
    return _stub_classes[key]


class _StorageType:
    """Marker for torch.<X>Storage in persistent ids (no torch storage class is instantiated by the pickle)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# ---- safe replacements for the few callables a checkpoint pickle needs

def _encode(s: str, encoding: str = "latin1") -> bytes:  # protocol-2 bytes: _codecs.encode(str, 'latin1')
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise UserError("refused: _codecs.encode with unexpected arguments")
    return s.encode("latin1")


def _np_dtype(name, *_args) -> Any:
    return np.dtype(str(name))


def _np_scalar(dtype, data: bytes = b"") -> Any:
    dt = dtype if isinstance(dtype, np.dtype) else np.dtype(str(dtype))
    return np.frombuffer(bytes(data), dtype=dt)[0].item() if data else None


def _np_reconstruct(*_args) -> Any:  # numpy arrays: rebuilt as empty stand-ins (no checkpoint tensor uses them)
    return _stub_class("numpy", "ndarray")()


def _path(*parts) -> str:  # pathlib paths in upstream 'opt' become strings
    return str(Path(*[str(p) for p in parts]))


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2 restricted to plain tensors/parameters."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UserError(f"refused: tensor subclass {new_type}")
    ret = func(*args)
    if type(ret) is not new_type:
        ret = ret.as_subclass(new_type)
    return ret


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _encode,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("pathlib", "PureWindowsPath"): _path,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; upstream model classes become Stub subclasses."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str = "checkpoint"):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2 writes __builtin__ for builtins
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if module.startswith(_STUB_PREFIXES) and name.isidentifier() and not name.startswith("__"):
            return _stub_class(module, name)
        raise UserError(f"{self.source}: refused: {module}.{name} (not a tensor or model class; "
                        f"the file may contain code and was not loaded)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UserError(f"{self.source}: refused: unexpected persistent id {str(pid)[:60]}")
        _, stype, key, _location, numel = pid
        if isinstance(stype, _StorageType):
            dtype = stype.dtype
        elif isinstance(stype, torch.dtype):
            dtype = stype
        else:
            raise UserError(f"{self.source}: refused: storage type {stype!r}")
        key = str(key)
        if key not in self.storages:
            try:
                data = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise UserError(f"{self.source}: damaged file (storage {key} missing)") from None
            untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]


def safe_load(path: str | Path) -> Any:
    """Unpickle a torch.save zip file without executing pickled code (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a torch zip checkpoint (legacy pre-1.6 or non-torch files are not supported)")
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise UserError(f"{path}: no data.pkl record in the archive")
        prefix = pkls[0].rsplit("/", 1)[0]
        names = set(zf.namelist())
        if f"{prefix}/byteorder" in names and zf.read(f"{prefix}/byteorder").strip() != b"little" \
                and sys.byteorder == "little":
            raise UserError(f"{path}: big-endian checkpoints are not supported")
        data = zf.read(pkls[0])
        try:
            return RestrictedUnpickler(io.BytesIO(data), zf, prefix, str(path)).load()
        except UserError:
            raise
        except Exception as e:  # malformed pickle streams
            raise UserError(f"{path}: could not read the pickle ({type(e).__name__}: {str(e)[:120]})") from None


# ---------------------------------------------------------------- stand-ins -> plain data

def _is_stub(x: Any) -> bool:
    return isinstance(x, Stub)


def stub_state_dict(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """state_dict() of a stand-in nn.Module tree: walk _parameters, persistent _buffers, _modules."""
    if not _is_stub(module):
        raise UserError(f"expected a pickled nn.Module at '{prefix or 'model'}', got {type(module).__name__}")
    d = vars(module)
    out: dict[str, torch.Tensor] = {}
    skip = set(d.get("_non_persistent_buffers_set") or ())
    for name, p in (d.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach().clone()
    for name, b in (d.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach().clone()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(stub_state_dict(child, f"{prefix}{name}."))
    return out


def _plain_names(names: Any, nc: int) -> list[str]:
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


def convert(weights: str | Path, out: str | Path | None = None, cfg: str | Path | None = None) -> Path:
    """Upstream .pt -> this project's checkpoint; verified by a strict load into DetectionModel."""
    weights = Path(weights)
    ck = safe_load(weights)
    if _is_stub(ck):  # a bare pickled model instead of a checkpoint dict
        ck = {"model": ck}
    if not isinstance(ck, dict):
        raise UserError(f"{weights}: expected a checkpoint dict, found {type(ck).__name__}")
    if "model_yaml" in ck:
        raise UserError(f"{weights}: already a checkpoint of this project (plain state dicts); no conversion needed")
    entry = "ema" if ck.get("ema") is not None else "model"
    model = ck.get(entry)
    if not _is_stub(model):
        raise UserError(f"{weights}: no pickled model under 'ema' or 'model'")
    attrs = vars(model)
    state = stub_state_dict(model)
    if cfg is not None:
        yaml_dict = load_model_yaml(cfg)
    else:
        yaml_dict = attrs.get("yaml")
        if not isinstance(yaml_dict, dict) or "backbone" not in yaml_dict:
            raise UserError(f"{weights}: the pickled model has no YAML dict; pass --cfg <model yaml>")
        yaml_dict = dict(yaml_dict)
        if attrs.get("yaml_file") and "yaml_file" not in yaml_dict:
            yaml_dict["yaml_file"] = str(attrs["yaml_file"])
    cls_bias = [k for k in state if k.endswith(".cv3.0.2.bias")]  # last class conv of the head: nc outputs
    nc = int(state[cls_bias[0]].shape[0]) if cls_bias else int(yaml_dict.get("nc", 80))
    yaml_dict["nc"] = nc
    ch = int(yaml_dict.get("ch", 3))
    try:
        net = DetectionModel(yaml_dict, ch=ch)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{weights}: its model YAML does not build here ({type(e).__name__}: {e}); "
                        f"pass --cfg with an equivalent YAML of models/detect") from None
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{weights}: weights do not match {yaml_dict.get('yaml_file', 'the model YAML')}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    net.names = _plain_names(attrs.get("names"), nc)
    epoch = ck.get("epoch", -1)
    new = make_checkpoint(net, names=net.names, epoch=-1,
                          opt={"converted_from": weights.name, "upstream_epoch": epoch if isinstance(epoch, int) else -1})
    # keep the upstream precision (released checkpoints are fp16) instead of doubling the file
    new["model"] = {k: state[k].clone() for k in own}
    save_checkpoint(new, out := Path(out) if out else weights.with_name(f"{weights.stem}-converted.pt"))
    n_p = sum(p.numel() for p in net.parameters())
    LOGGER.info(f"Converted {weights} ('{entry}' entry, {len(state)} tensors, {n_p:,} parameters, nc={nc}, "
                f"{yaml_dict.get('yaml_file', 'model')}) -> {out}; strict load verified")
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Upstream YOLOv9 .pt (pickled objects) -> checkpoint of this project")
    ap.add_argument("--weights", required=True, help="upstream checkpoint, e.g. yolov9-c.pt")
    ap.add_argument("--out", default=None, help="output path (default: <weights>-converted.pt)")
    ap.add_argument("--cfg", default=None, help="model YAML to use instead of the one pickled in the file")
    opt = ap.parse_args(argv)
    return convert(opt.weights, opt.out, opt.cfg)


if __name__ == "__main__":
    cli(main)()
