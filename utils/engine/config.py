"""Typed, read-only run settings: built once from the command line (or a Python call), checked there.

Resume never edits a config: `TrainConfig.for_resume` returns a new one from the checkpoint's saved options
plus the few flags a user may change on resume. Data-YAML defaults (`train_defaults:`) fill only the
settings the command line left unset.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from utils.general import LOGGER, ROOT, UserError

DEFAULT_HYP = str(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")
# upstream's defaults, used when neither a flag nor the data YAML's train_defaults says otherwise
UPSTREAM_DEFAULTS = {"epochs": 100, "imgsz": 640, "batch_size": 16, "close_mosaic": 0, "hyp": DEFAULT_HYP}
RESUME_KEEPS = ("device", "workers", "exist_ok")  # flags a resumed run takes from the new command line
RESUME_OWN = ("resume", "weights", "save_dir", "epochs", "tensorboard")  # decided by for_resume itself
OPTIMIZERS = ("auto", "SGD", "Adam", "AdamW")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told. Unset values (None) are filled by `with_defaults`."""

    data: str = "data/shapes.yaml"
    cfg: str = ""
    weights: str = ""
    hyp: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    imgsz: int | None = None
    rect: bool = False
    resume: str = ""  # checkpoint path being resumed ('' = fresh run)
    nosave: bool = False
    noval: bool = False
    noplots: bool = False
    cache: str | None = None
    upstream_loader: bool = False  # training images: full decodes, fresh mosaic partners (upstream's pipeline)
    image_weights: bool = False
    device: str = ""
    multi_scale: bool = False
    single_cls: bool = False
    optimizer: str = "auto"  # resolved to a name by the trainer (opt.yaml and checkpoints keep the name)
    sync_bn: bool = False
    workers: int = 8
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    cos_lr: bool = False
    flat_cos_lr: bool = False
    fixed_lr: bool = False
    patience: int = 100
    freeze: tuple[int, ...] = (0,)
    save_period: int = -1
    seed: int = 0
    min_items: int = 0
    close_mosaic: int | None = None
    tensorboard: bool = True  # event files in the run folder (rank 0)
    compile: bool = False  # torch.compile the training forward
    amp: bool | None = None  # mixed precision: None = auto (CUDA fp16 after a check; CPU see Trainer.amp_dtype)
    save_dir: str = ""  # the run folder, decided once by the trainer (or taken from a resumed checkpoint)

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any] | None = None, strict: bool | None = None,
                  **overrides: Any) -> "TrainConfig":
        """From train_dual.py's namespace (its compatibility and --evolve flags are not settings of one run) or a
        dict. A dict's unknown keys are an error (a typo would be ignored silently) unless strict=False (the
        options saved in an older checkpoint may name settings this version no longer has)."""
        namespace = isinstance(args, argparse.Namespace)
        raw = dict(vars(args) if namespace else (args or {}))
        raw.update(overrides)
        known = {f.name for f in fields(cls)}
        if strict is None:
            strict = not namespace
        if strict:
            check_keys(raw, known, "TrainConfig")
        kw = {k: v for k, v in raw.items() if k in known}
        resume = kw.get("resume", "")
        kw["resume"] = "" if resume in (False, None, "", "False") else ("last" if resume in (True, "True") else str(resume))
        if "freeze" in kw:
            kw["freeze"] = tuple(int(x) for x in (kw["freeze"] if isinstance(kw["freeze"], (list, tuple)) else [kw["freeze"]]))
        for k in ("data", "cfg", "weights", "hyp", "project", "save_dir"):
            if isinstance(kw.get(k), Path):
                kw[k] = str(kw[k])
        return cls(**kw)

    def __post_init__(self) -> None:
        self.checked()  # every way of making one (TrainConfig(...), from_args, replace) is checked

    def checked(self) -> "TrainConfig":
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer}: choose from {', '.join(OPTIMIZERS)}")
        for k in ("epochs", "batch_size", "imgsz"):
            v = getattr(self, k)
            if k == "batch_size" and v == -1:  # autobatch
                continue
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UserError(f"--{k.replace('_', '-')} {v}: must be a positive integer")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be >= 0")
        if self.cache is not None and str(self.cache).lower() not in ("ram", "disk"):
            raise UserError(f"--cache {self.cache}: use 'ram' (the default of a bare --cache) or 'disk'")
        if sum((self.cos_lr, self.flat_cos_lr, self.fixed_lr)) > 1:
            raise UserError("--cos-lr, --flat-cos-lr and --fixed-lr exclude each other: pick one")
        return self

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def with_defaults(self, train_defaults: Mapping[str, Any]) -> "TrainConfig":
        """Fill unset values: data YAML's train_defaults first, then upstream's defaults."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(train_defaults) - known)
        if bad:
            raise UserError(f"data YAML train_defaults: unknown key(s) {', '.join(bad)}")
        merged = {**UPSTREAM_DEFAULTS, **train_defaults}
        fill = {k: v for k, v in merged.items() if getattr(self, k) is None}
        out = self.replace(**fill)
        hyp = Path(out.hyp)
        if not hyp.is_absolute() and not hyp.exists() and (ROOT / hyp).exists():
            out = out.replace(hyp=str(ROOT / hyp))
        return out

    def for_resume(self, saved: Mapping[str, Any], path: Path) -> "TrainConfig":
        """The config of a resumed run: the checkpoint's options, this command line's device/workers/exist_ok,
        --epochs when given (to extend a finished run) and --no-tensorboard when given (a run that had
        TensorBoard off keeps it off). Every other setting this command names differently is ignored, and said."""
        base = TrainConfig.from_args(dict(saved), strict=False)
        keep = {k: getattr(self, k) for k in RESUME_KEEPS}
        if self.epochs is not None:
            keep["epochs"] = self.epochs
        keep["tensorboard"] = base.tensorboard and self.tensorboard
        ignored = self.ignored_on_resume(base)
        if ignored:
            LOGGER.warning(f"WARNING: --resume continues {path} with the settings it was started with; ignored: "
                           + ", ".join(ignored))
        return base.replace(**keep, resume=str(path), weights=str(path), save_dir=str(path.parent.parent))

    def ignored_on_resume(self, run: "TrainConfig") -> list[str]:
        """'--flag value (the run's: value)' for each setting this config gives (differs from the default) that
        the resumed run does not use because it keeps its own."""
        out = []
        for f in fields(self):
            if f.name in (*RESUME_KEEPS, *RESUME_OWN):
                continue
            given, used = getattr(self, f.name), getattr(run, f.name)
            if given != f.default and given != used:
                out.append(f"{_as_flag(f.name, given)} (the run's: {_as_value(used)})")
        return out

    @property
    def schedule(self) -> str:
        return "cos" if self.cos_lr else "flat-cos" if self.flat_cos_lr else "fixed" if self.fixed_lr else "linear"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for opt.yaml and checkpoints."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def check_keys(given: Mapping[str, Any], known: set[str], what: str) -> None:
    """Unknown keyword arguments are one error naming them (and the nearest known name), not ignored."""
    bad = sorted(set(given) - known)
    if bad:
        hints = [difflib.get_close_matches(k, sorted(known), 1) for k in bad]
        near = "".join(f" ({k}: did you mean {h[0]}?)" for k, h in zip(bad, hints) if h)
        raise UserError(f"{what}: unknown argument(s) {', '.join(bad)}{near}")


def _as_value(v: Any) -> str:
    return "on" if v is True else "off" if v is False else " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _as_flag(name: str, v: Any) -> str:
    """How the command line spells a setting: --imgsz 320, --rect, --no-amp, --freeze 3 5."""
    flag = name.replace("_", "-")
    if isinstance(v, bool):
        return f"--{flag}" if v else f"--no-{flag}"
    return f"--{flag} {_as_value(v)}"


@dataclass(frozen=True)
class ValOptions:
    """How to validate. save_hybrid merges GT boxes into the SAVED txt/json only (like upstream's
    autolabelling); the metrics always use the model's own detections, so mAP is never inflated by GT.
    anno_json: a COCO GT file for the pycocotools check of save_json ('auto' writes one from the labels).
    training: None = infer (a torch module means the trainer is calling: no per-class table unless
    verbose, no speed line)."""

    conf_thres: float = 0.001
    iou_thres: float = 0.7
    max_det: int = 300
    single_cls: bool = False
    augment: bool = False
    half: bool = False
    save_dir: Path | None = None
    plots: bool = True
    verbose: bool = False
    save_txt: bool = False
    save_hybrid: bool = False
    save_conf: bool = False
    save_json: bool = False
    is_coco: bool = False
    compute_loss: bool = True
    anno_json: str | Path | None = None
    training: bool | None = None
    return_predictions: bool = False
    autocast: Any = None  # a torch.dtype: a torch model's forward under autocast of this dtype (AMP training)

    def __post_init__(self):
        if self.save_dir is not None and not isinstance(self.save_dir, Path):
            object.__setattr__(self, "save_dir", Path(self.save_dir))



VAL_COMPAT_KEYS = ("dnn",)  # val_dual.py flags kept for upstream's command lines, without effect


def _check_counts(raw: Mapping[str, Any], positive: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Whole numbers >= 1 (None = the default) and thresholds in [0, 1]: one error each, never a silent default."""
    for k in positive:
        v = raw.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"--{k.replace('_', '-')} {v!r}: must be a whole number >= 1")
    for k in fractions:
        v = raw.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
            raise UserError(f"--{k.replace('_', '-')} {v!r}: must be a number in [0, 1]")


@dataclass(frozen=True)
class ValJob:
    """What val_dual.py is asked: which weights on which data split, and how to validate (`options`)."""

    weights: tuple[str, ...]
    data: str = "data/shapes.yaml"
    batch_size: int = 32
    imgsz: int | None = None
    task: str = "val"
    device: str = ""
    workers: int = 8
    project: str = "runs/val"
    name: str = "exp"
    exist_ok: bool = False
    half: bool = False
    single_cls: bool = False
    min_items: int = 0
    rect: bool = True  # rectangular batches (pad 0.5); False: square letterboxed images like a fixed-size export
    cuda_graph: str | None = None  # 'capture' / 'compile': replay the forward per batch shape (CUDA only)
    options: ValOptions = None  # type: ignore[assignment]  # always set by from_args

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any]) -> "ValJob":
        """From val_dual.py's namespace or keywords; the validation options among them become `options`."""
        raw = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
        allowed = {f.name for f in fields(cls)} | {f.name for f in fields(ValOptions)} | set(VAL_COMPAT_KEYS)
        check_keys(raw, allowed - {"options", "save_dir", "is_coco", "anno_json", "training"}, "validation")
        weights = raw.get("weights")
        if not weights:
            raise UserError("val_dual.py: --weights is required (a .pt checkpoint written by train_dual.py)")
        weights = (weights,) if isinstance(weights, (str, Path)) else tuple(weights)
        for w in weights:
            if not Path(w).exists():  # a file, or an OpenVINO *_openvino_model folder
                raise UserError(f"{w}: weights file not found")
        task = raw.get("task", "val")
        if task not in ("val", "test", "speed"):
            raise UserError(f"--task {task}: use val, test or speed")
        _check_counts(raw, positive=("imgsz", "batch_size", "max_det"), fractions=("conf_thres", "iou_thres"))
        job_keys = {f.name for f in fields(cls)} - {"weights", "options"}
        opt_keys = {f.name for f in fields(ValOptions)} - {"save_dir", "is_coco", "anno_json", "training"}
        opts = {k: v for k, v in raw.items() if k in opt_keys}
        opts["half"] = raw.get("half", False)
        opts["single_cls"] = raw.get("single_cls", False)
        if task == "speed":  # upstream: speed benchmark at deployment thresholds, nothing saved
            opts.update(conf_thres=0.25, iou_thres=0.45, save_json=False, plots=False)
        options = ValOptions(**opts)  # save_dir is decided when the job runs
        job = {k: v for k, v in raw.items() if k in job_keys}
        return cls(weights=tuple(str(w) for w in weights), options=options, **job)


@dataclass(frozen=True)
class PredictJob:
    """What detect_dual.py is asked: weights, source, thresholds, outputs, tracking."""

    weights: tuple[str, ...] = ()  # empty: the newest runs/train/*/weights/best.pt
    source: str | None = None  # None: the val images of `data`
    data: str = str(ROOT / "data" / "shapes.yaml")
    imgsz: tuple[int, ...] | None = None
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    device: str = ""
    view_img: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    nosave: bool = False
    classes: tuple[int, ...] | None = None
    agnostic_nms: bool = False
    augment: bool = False
    visualize: bool = False
    update: bool = False
    project: str = str(ROOT / "runs" / "detect")
    name: str = "exp"
    exist_ok: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    half: bool = False
    cuda_graph: str | None = None
    dnn: bool = False
    vid_stride: int = 1
    track: bool = False
    tracker: str | None = None
    threaded: bool | None = None  # threads (decode, frames in flight, encode); None: with 2+ usable cores; False: inline
    main_only: bool = True  # run dual-head .pt models as their GELAN form (same boxes, less compute)

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any]) -> "PredictJob":
        raw = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
        kw = {k: v for k, v in raw.items() if k in {f.name for f in fields(cls)}}
        for k in ("weights", "imgsz", "classes"):
            v = kw.get(k)
            if v is not None and not isinstance(v, tuple):
                kw[k] = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        for k in ("source", "data", "project", "tracker"):
            if isinstance(kw.get(k), Path):
                kw[k] = str(kw[k])
        kw["weights"] = tuple(str(w) for w in (kw.get("weights") or ()))
        return cls(**kw)
