"""Validation engine used by val_dual.py and by the trainer after each epoch.

One path for every caller: uint8 batch -> float/255 on the device -> model (or Backend / Ensemble) ->
multi-label NMS -> boxes mapped back to ORIGINAL image pixels with the batch's ratio_pad -> COCO-style
matching against labels (also mapped to original pixels) -> AP per class (utils.metrics, which follows
pycocotools). When the model is a torch module in eval mode its raw head maps come back alongside the
decoded boxes, so `loss_fn(feats, targets)` gives the real validation losses (upstream writes zeros).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops import batched_nms
from tqdm import tqdm

from utils import coco
from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from utils.data import create_dataloader, load_data_config
from utils.data.loader import ShardSampler
from utils.engine import distributed as ddp
from utils.engine.backend import Backend
from utils.engine.config import ValJob, ValOptions
from utils.engine.graphs import plan_fixed_shapes
from utils.engine.tta import forward_augment
from utils.general import LOGGER, UserError, check_img_size, increment_path
from utils.metrics import ConfusionMatrix, ap_per_class, fitness, match_predictions
from utils.nms import non_max_suppression
from utils.plots import plot_images
from utils.torch_utils import time_sync

GRAPH_SHAPES = 4  # fixed input shapes of rectangular validation under --cuda-graph
HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4


class Ensemble:
    """Several backends as one: predictions concatenated along anchors, so one NMS merges them."""

    def __init__(self, backends: Sequence[Backend]):
        if not backends:
            raise ValueError("Ensemble needs at least one backend")
        ncs = {b.nc for b in backends}
        if len(ncs) > 1:
            raise UserError(f"--weights: ensemble members disagree on the number of classes {sorted(ncs)}")
        self.backends = list(backends)
        first = self.backends[0]
        self.stride = max(b.stride for b in self.backends)
        self.names, self.nc, self.device, self.half = first.names, first.nc, first.device, first.half
        self.pt, self.model = False, None

    @property
    def dtype(self) -> torch.dtype:
        return self.backends[0].dtype

    def __call__(self, im: Tensor) -> Tensor:
        return torch.cat([b(im) for b in self.backends], 2)

    def warmup(self, imgsz: tuple = (1, 3, 64, 64)) -> None:
        for b in self.backends:
            b.warmup(imgsz)


def _split_output(out) -> tuple[Tensor, object]:
    """Model output -> (y [B,4+nc,A], feats or None)."""
    if isinstance(out, (list, tuple)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def _make_forward(model, want_feats: bool):
    """A function im -> (y, feats|None) for a Backend, an Ensemble or a torch module."""
    if isinstance(model, Backend):
        if model.pt and want_feats:
            inner = model.model

            def forward(x):
                with model.autocast():
                    return _split_output(inner(x.to(model.device, model.dtype)))
            return forward
        return lambda x: (model(x), None)
    if isinstance(model, Ensemble):
        return lambda x: (model(x), None)
    return lambda x: _split_output(model(x))


def _autocast(forward, device_type: str, dtype: torch.dtype):
    def run(x):
        with torch.autocast(device_type, dtype=dtype):
            return forward(x)
    return run


def _model_device(model) -> torch.device:
    if isinstance(model, (Backend, Ensemble)):
        return model.device
    p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _model_stride(model) -> int:
    s = getattr(model, "stride", 32)
    return int(max(s)) if isinstance(s, (Tensor, list, tuple)) else int(s)


def _hybrid(pred: Tensor, gt_xyxy: Tensor, gt_cls: Tensor, iou_thres: float, max_det: int) -> Tensor:
    """Merge GT boxes (conf 1) into the detections and re-run NMS: GT wins over overlapping predictions
    of its class. Input-image pixels."""
    gt = torch.cat((gt_xyxy, torch.ones_like(gt_cls)[:, None], gt_cls[:, None]), 1).to(pred)
    det = torch.cat((gt, pred), 0)
    if not len(det):
        return det
    keep = batched_nms(det[:, :4].float(), det[:, 4].float(), det[:, 5].long(), iou_thres)
    return det[keep[:max_det]]


def _save_txt(predn: Tensor, save_conf: bool, shape: tuple, file: Path) -> None:
    """labels/<stem>.txt lines: cls xc yc w h [conf], normalised to the original image."""
    gn = torch.tensor(shape, dtype=torch.float64)[[1, 0, 1, 0]]
    rows = []
    for *xyxy, conf, cls in predn.double().cpu().tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy, dtype=torch.float64)) / gn).tolist()
        vals = (int(cls), *xywh, conf) if save_conf else (int(cls), *xywh)
        rows.append(" ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in vals))
    with open(file, "a") as f:
        f.write("".join(r + "\n" for r in rows))


def _shape_text(batch: int, input_hw: set) -> str:
    """'at shape (8, 3, 128, 160)', or the largest of several rectangular batch shapes: what the model really ran."""
    if not input_hw:
        return ""
    h, w = max(hw[0] for hw in input_hw), max(hw[1] for hw in input_hw)
    shape = (batch, 3, h, w)
    return f"at shape {shape}" if len(input_hw) == 1 else f"at rectangular batch shapes up to {shape}"


def _output_to_target(preds: list[Tensor], max_per_image: int = 15) -> Tensor:
    """NMS outputs -> [N, 7] (img, cls, xc, yc, w, h, conf) in input pixels for plot_images."""
    rows = []
    for i, p in enumerate(preds):
        p = p[:max_per_image].detach().float().cpu()
        rows.append(torch.cat((torch.full((len(p), 1), float(i)), p[:, 5:6], xyxy2xywh(p[:, :4]), p[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 7))


@dataclass
class ValResult:
    """One validation's numbers; results.csv, TensorBoard and the console all read this."""

    mp: float = 0.0
    mr: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    box: float = 0.0
    cls: float = 0.0
    dfl: float = 0.0
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-class mAP50-95
    nt: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # instances per class
    seen: int = 0
    speed: tuple = (0.0, 0.0, 0.0)  # pre-process, inference, NMS ms per image
    metrics_ms: float = 0.0  # matching + AP per image
    ap_table: list = field(default_factory=list)
    save_dir: Path | None = None
    confusion_matrix: np.ndarray | None = None
    map_ours: float | None = None  # set when pycocotools ran: map/map50 are then pycocotools' values
    map50_ours: float | None = None
    coco_json: str | None = None
    predictions: dict | None = None  # {path: [n, 6] original pixels} with return_predictions

    @classmethod
    def empty(cls, nc: int) -> "ValResult":
        return cls(maps=np.zeros(nc), nt=np.zeros(nc, int))

    @property
    def fitness(self) -> float:
        return float(fitness(self))


@dataclass
class _Stats:
    """What matching accumulates over the images; plain tensors so ranks can gather and merge them."""

    nc: int
    correct: list = field(default_factory=list)
    conf: list = field(default_factory=list)
    pred_cls: list = field(default_factory=list)
    target_cls: list = field(default_factory=list)
    img_per_cls: np.ndarray = None
    seen: int = 0

    def __post_init__(self):
        if self.img_per_cls is None:
            self.img_per_cls = np.zeros(self.nc, dtype=np.int64)

    def add(self, correct: Tensor, conf: Tensor, pred_cls: Tensor, target_cls: Tensor) -> None:
        self.correct.append(correct.cpu())
        self.conf.append(conf.cpu())
        self.pred_cls.append(pred_cls.cpu())
        self.target_cls.append(target_cls.cpu())

    @classmethod
    def merge(cls, parts: Sequence["_Stats"]) -> "_Stats":
        """Several ranks' statistics as one, in rank order (= single-process image order for ShardSampler)."""
        out = cls(parts[0].nc)
        for p in parts:
            for name in ("correct", "conf", "pred_cls", "target_cls"):
                getattr(out, name).extend(getattr(p, name))
            out.img_per_cls += p.img_per_cls
            out.seen += p.seen
        return out

    def arrays(self) -> list[np.ndarray]:
        if not self.correct:
            return []
        return [torch.cat(x, 0).numpy() for x in (self.correct, self.conf, self.pred_cls, self.target_cls)]


class Validator:
    """options -> per-batch inference + matching -> summary (a ValResult)."""

    def __init__(self, options: ValOptions | None = None, names: Sequence[str] | dict | None = None,
                 loss_fn: Callable | None = None):
        self.opt = options or ValOptions()
        self.names_arg, self.loss_fn = names, loss_fn

    @torch.no_grad()
    def run(self, model, dataloader) -> ValResult:
        """model: a torch DetectionModel (e.g. the trainer's EMA; its eval-mode (y, feats) give real losses
        through loss_fn), a Backend or an Ensemble."""
        self._prepare(model, dataloader)
        try:
            pbar = tqdm(dataloader, desc=HEADER, total=len(dataloader), bar_format="{l_bar}{bar:10}{r_bar}",
                        disable=not self.main)
            for batch_i, batch in enumerate(pbar):
                self._batch(batch_i, batch)
            self._gather(dataloader)
            return self._summary(dataloader)
        finally:
            self._restore(model)

    # ---- setup
    def _prepare(self, model, dataloader) -> None:
        opt = self.opt
        if (opt.save_txt or opt.save_json or opt.save_hybrid) and opt.save_dir is None:
            raise UserError("validate: save_txt/save_hybrid/save_json need a save_dir")
        self.is_backend = isinstance(model, (Backend, Ensemble))
        self.training = (not self.is_backend) if opt.training is None else opt.training
        names = self.names_arg
        names = list(names.values()) if isinstance(names, dict) else list(names or getattr(model, "names", []) or [])
        self.names = names or list(getattr(dataloader.dataset, "names", None) or ["0"])
        self.nc = 1 if opt.single_cls else len(self.names)
        self.main = ddp.is_main()  # under torchrun only global rank 0 plots and writes json (txt: each rank its own)
        self.plots = opt.plots and opt.save_dir is not None
        self.draw = self.plots and self.main
        self.save_txt = opt.save_txt or opt.save_hybrid
        if opt.save_dir is not None and (self.main or self.save_txt):
            (opt.save_dir / "labels" if self.save_txt else opt.save_dir).mkdir(parents=True, exist_ok=True)
        self.device = _model_device(model)
        self.was_training = model.training if isinstance(model, nn.Module) else None
        self.halved = False
        if self.is_backend:
            self.half = model.dtype == torch.float16
        else:
            self.half = opt.half and self.device.type == "cuda"
            model.eval()
            if self.half:
                model.half()
                self.halved = True
        self.want_loss = opt.compute_loss and self.loss_fn is not None
        self.forward = _make_forward(model, self.want_loss)
        if opt.autocast is not None and not self.is_backend:  # the trainer's AMP: autocast, weights stay fp32
            self.forward = _autocast(self.forward, self.device.type, opt.autocast)
        self.stride = _model_stride(model)
        self.iouv = torch.linspace(0.5, 0.95, 10)
        self.cm = ConfusionMatrix(nc=self.nc)
        self.loss = torch.zeros(3, device=self.device)
        self.dt = [0.0, 0.0, 0.0]
        self.dt_metrics = 0.0  # matching + AP (includes txt/json writing), reported as metrics_ms
        self.stats = _Stats(self.nc)
        self.jdict: list[dict] = []
        self.id_map = coco.image_id_map(getattr(dataloader.dataset, "im_files", [])) if opt.save_json else {}
        self.class_map = coco.coco80_to_coco91_class() if opt.is_coco else None
        self.predictions: dict[str, Tensor] = {}
        self.input_hw: set[tuple[int, int]] = set()  # (h, w) of every batch: the speed line's true shape

    def _restore(self, model) -> None:
        if isinstance(model, nn.Module):
            if self.halved:
                model.float()
            if self.was_training:
                model.train()

    # ---- one batch
    def _batch(self, batch_i: int, batch) -> None:
        im, targets, paths, shapes = batch
        opt = self.opt
        t1 = time_sync(self.device)
        im = im.to(self.device, non_blocking=True)
        im = (im.half() if self.half else im.float()) / 255
        targets = targets.to(self.device)
        height, width = im.shape[2:]
        self.input_hw.add((height, width))
        t2 = time_sync(self.device)
        y, feats = forward_augment(self.forward, im, self.stride) if opt.augment else self.forward(im)
        if batch_i == 0 and not opt.single_cls and y.shape[1] - 4 != self.nc:
            raise UserError(f"validate: the model predicts {y.shape[1] - 4} classes but the data has {self.nc}")
        t3 = time_sync(self.device)
        if self.want_loss and feats is not None:
            self.loss += self.loss_fn(feats, targets)[1].to(self.device).float()
        t4 = time_sync(self.device)
        preds = non_max_suppression(y, opt.conf_thres, opt.iou_thres, multi_label=True, agnostic=opt.single_cls,
                                    max_det=opt.max_det)
        t5 = time_sync(self.device)
        for i, dt in enumerate((t2 - t1, t3 - t2, t5 - t4)):
            self.dt[i] += dt
        for si, pred in enumerate(preds):
            shape_info = shapes[si] if shapes[si] is not None else ((height, width), ((1.0, 1.0), (0.0, 0.0)))
            self._image(pred, targets[targets[:, 0] == si, 1:].float(), Path(paths[si]), (height, width), shape_info)
        self.dt_metrics += time.time() - t5
        if self.draw and batch_i < 3:
            plot_images(im, targets, paths, opt.save_dir / f"val_batch{batch_i}_labels.jpg", names=self.names)
            plot_images(im, _output_to_target(preds), paths, opt.save_dir / f"val_batch{batch_i}_pred.jpg",
                        names=self.names)

    def _image(self, pred: Tensor, labels: Tensor, path: Path, input_hw: tuple, shape_info: tuple) -> None:
        """Match one image's detections to its labels, both in original-image pixels; write its outputs."""
        opt, stats = self.opt, self.stats
        shape, ratio_pad = shape_info
        height, width = input_hw
        scale = torch.tensor((width, height, width, height), device=self.device, dtype=torch.float32)
        nl, npr = labels.shape[0], pred.shape[0]
        stats.seen += 1
        correct = torch.zeros(npr, len(self.iouv), dtype=torch.bool)
        if nl:
            tbox = scale_boxes(input_hw, xywh2xyxy(labels[:, 1:5]) * scale, shape, ratio_pad)
            labelsn = torch.cat((labels[:, :1], tbox), 1)
            stats.img_per_cls[np.unique(labels[:, 0].long().cpu().numpy().clip(0, self.nc - 1))] += 1
        else:
            labelsn = torch.zeros((0, 5), device=self.device)
        predn = pred.clone().float()
        if opt.single_cls:
            predn[:, 5] = 0
        scale_boxes(input_hw, predn[:, :4], shape, ratio_pad)
        if opt.return_predictions:
            self.predictions[str(path)] = predn.cpu()
        if self.plots:
            self.cm.process_batch(predn if npr else None, labelsn)
        if npr == 0:
            if nl:
                stats.add(correct, torch.zeros(0), torch.zeros(0), labels[:, 0])
            return
        if nl:
            correct = match_cpu(predn, labelsn, self.iouv)
        stats.add(correct, predn[:, 4], predn[:, 5], labels[:, 0])
        if self.save_txt or opt.save_json:
            self._save_outputs(pred, predn, labels, path, input_hw, shape_info, scale)

    def _save_outputs(self, pred: Tensor, predn: Tensor, labels: Tensor, path: Path, input_hw: tuple,
                      shape_info: tuple, scale: Tensor) -> None:
        opt = self.opt
        shape, ratio_pad = shape_info
        saved = predn
        if opt.save_hybrid:
            gt_in = xywh2xyxy(labels[:, 1:5]) * scale
            hyb = _hybrid(pred.float(), gt_in, labels[:, 0], opt.iou_thres, opt.max_det)
            saved = scale_boxes(input_hw, hyb.clone(), shape, ratio_pad) if len(hyb) else hyb
            if opt.single_cls:
                saved[:, 5] = 0
        if self.save_txt:
            _save_txt(saved, opt.save_conf, shape, opt.save_dir / "labels" / f"{path.stem}.txt")
        if opt.save_json:
            image_id = self.id_map.get(str(path), int(path.stem) if path.stem.isnumeric() else path.stem)
            coco.detections_to_coco(saved, image_id, self.class_map, self.jdict)

    # ---- gather
    def _gather(self, dataloader) -> None:
        """Sharded validation (a ShardSampler under torchrun): merge every rank's statistics, losses, detections
        and timings in rank order, on every rank, so `_summary` sees the whole val set."""
        self.n_batches = len(dataloader)
        if not (isinstance(getattr(dataloader, "sampler", None), ShardSampler) and ddp.is_dist()):
            return
        mine = (self.stats, self.loss.cpu(), self.n_batches, self.jdict, self.dt, self.dt_metrics,
                self.cm.matrix if self.plots else None, self.predictions, self.input_hw)
        parts = ddp.gather_objects(mine)
        self.stats = _Stats.merge([p[0] for p in parts])
        self.loss = sum(p[1] for p in parts).to(self.device)
        self.n_batches = sum(p[2] for p in parts)
        self.jdict = [d for p in parts for d in p[3]]
        self.dt = [sum(p[4][i] for p in parts) for i in range(3)]
        self.dt_metrics = sum(p[5] for p in parts)
        if self.plots:
            self.cm.matrix = sum(p[6] for p in parts)
        self.predictions = {k: v for p in parts for k, v in p[7].items()}
        self.input_hw = set().union(*(p[8] for p in parts))

    # ---- summary
    def _summary(self, dataloader) -> ValResult:
        opt, nc, names, seen = self.opt, self.nc, self.names, self.stats.seen
        cat = self.stats.arrays()
        tcls = cat[3].astype(int) if cat else np.zeros(0, int)
        nt = np.bincount(tcls.clip(0, nc - 1), minlength=nc) if len(tcls) else np.zeros(nc, int)
        t6 = time.time()
        res = ap_per_class(*cat, plot=self.draw, save_dir=opt.save_dir, names=names) if cat else None
        mp, mr, map50, map_ = res.mean_results() if res is not None else (0.0, 0.0, 0.0, 0.0)
        maps = res.maps(nc) if res is not None else np.zeros(nc)
        self.dt_metrics += time.time() - t6 if not self.draw else 0.0  # curve plotting is not metrics time
        ap_table = self._log_table(res, nt, mp, mr, map50, map_)
        speed = tuple(x / max(seen, 1) * 1e3 for x in self.dt)
        if not self.training:
            LOGGER.info("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image " % speed
                        + _shape_text(getattr(dataloader, "batch_size", None) or 1, self.input_hw))
        if self.draw:
            self.cm.plot(save_dir=opt.save_dir, names=names)
        lossv = (self.loss.cpu() / max(self.n_batches, 1)).tolist()
        out = ValResult(mp=mp, mr=mr, map50=map50, map=map_, box=lossv[0], cls=lossv[1], dfl=lossv[2], maps=maps,
                        nt=nt, seen=seen, speed=speed, metrics_ms=self.dt_metrics / max(seen, 1) * 1e3,
                        ap_table=ap_table, save_dir=opt.save_dir,
                        confusion_matrix=self.cm.matrix if self.plots else None,
                        predictions=self.predictions if opt.return_predictions else None)
        if opt.save_json and opt.save_dir is not None and self.main:
            pred_json = coco.save_json(self.jdict, opt.save_dir / "predictions.json")
            LOGGER.info(f"Saved {len(self.jdict)} detections to {pred_json}")
            if opt.anno_json is not None:
                _coco_check(opt.anno_json, pred_json, dataloader, opt.save_dir, names, self.class_map, self.id_map, out)
        return out

    def _log_table(self, res, nt: np.ndarray, mp: float, mr: float, map50: float, map_: float) -> list[dict]:
        seen, nc, names = self.stats.seen, self.nc, self.names
        LOGGER.info(ROW % ("all", seen, nt.sum(), mp, mr, map50, map_))
        if nt.sum() == 0:
            LOGGER.warning(f"WARNING: no labels found in the {'val' if self.training else 'validation'} set, "
                           f"cannot compute metrics without labels")
        table = [dict(cls="all", images=seen, instances=int(nt.sum()), p=mp, r=mr, map50=map50, map=map_)]
        if res is None:
            return table
        for i, c in enumerate(res.ap_class):
            p, r, ap50, ap = res.class_result(i)
            table.append(dict(cls=names[c] if c < len(names) else str(c),
                              images=int(self.stats.img_per_cls[c]) if c < nc else 0,
                              instances=int(nt[c]) if c < nc else 0, p=p, r=r, map50=ap50, map=ap))
        if (self.opt.verbose or (nc < 50 and not self.training)) and nc > 1:
            for row in table[1:]:
                LOGGER.info(ROW % (row["cls"], row["images"], row["instances"], row["p"], row["r"], row["map50"],
                                   row["map"]))
        return table


def validate(model, dataloader, *, names: Sequence[str] | dict | None = None, loss_fn: Callable | None = None,
             **options) -> ValResult:
    """Shorthand for Validator(ValOptions(**options), names, loss_fn).run(model, dataloader)."""
    return Validator(ValOptions(**options), names=names, loss_fn=loss_fn).run(model, dataloader)


def match_cpu(predn: Tensor, labelsn: Tensor, iouv: Tensor) -> Tensor:
    """TP flags [n, 10] on the CPU (the metrics' matching is numpy anyway)."""
    return match_predictions(predn.cpu(), labelsn.cpu(), iouv).cpu()


def _coco_check(anno_json, pred_json: Path, dataloader, save_dir: Path, names, class_map, id_map,
                ours: ValResult) -> None:
    """Evaluate predictions.json with pycocotools; its mAPs replace ours (kept as *_ours)."""
    try:
        import pycocotools  # noqa: F401  (optional extra)
    except ImportError:
        LOGGER.warning("WARNING: pycocotools not installed (pip install pycocotools): skipping the COCO check")
        return
    if str(anno_json) == "auto":
        ds = dataloader.dataset
        files = list(ds.im_files)
        gt = coco.yolo_labels_to_coco_gt(files, ds.shapes, ds.labels, names, class_map,
                                         image_ids=[id_map[str(f)] for f in files])
        anno_json = coco.save_json(gt, save_dir / "gt.json")
        LOGGER.info(f"Wrote COCO ground truth from the YOLO labels to {anno_json}")
    img_ids = sorted(set(id_map.values())) if id_map else None
    LOGGER.info(f"\nEvaluating pycocotools mAP... ({anno_json}, {pred_json})")
    try:
        map_, map50 = coco.coco_evaluate(anno_json, pred_json, img_ids=img_ids)
    except UserError:
        raise
    except Exception as e:  # pycocotools' own errors (bad ids, etc.): report and keep ours
        LOGGER.warning(f"WARNING: pycocotools unable to run: {e}")
        return
    LOGGER.info(f"pycocotools: mAP50-95 {map_:.4f}, mAP50 {map50:.4f} (ours {ours.map:.4f}, {ours.map50:.4f})")
    ours.map_ours, ours.map50_ours, ours.map, ours.map50 = ours.map, ours.map50, map_, map50
    ours.coco_json = str(anno_json)


def run_validation(job: ValJob | None = None, **kwargs) -> ValResult:
    """What val_dual.py does: load weights (several = ensemble), build the rect val loader, validate.
    Pass a ValJob or its fields as keywords."""
    job = job or ValJob.from_args(kwargs)
    weights = list(job.weights)
    ddp.check_launch(job.device, script="val_dual.py")
    started = ddp.under_torchrun() and not ddp.is_dist()
    dev = ddp.process_device(job.device, job.batch_size)
    try:
        return _run_validation(job, weights, dev)
    finally:
        if started:
            ddp.destroy()


def _run_validation(job: ValJob, weights: list, dev: torch.device) -> ValResult:
    """run_validation once the device (and under torchrun the process group) is ready: each rank validates
    its ShardSampler share, the Validator gathers before the summary."""
    split = "val" if job.task == "speed" else job.task
    cfg = load_data_config(job.data, need=(split,))  # only the split validated must exist on this machine
    backends = [Backend(w, device=dev, half=job.half, fuse=True) for w in weights]
    for b in backends:
        b.use_cuda_graph(job.cuda_graph)
    model = backends[0] if len(backends) == 1 else Ensemble(backends)
    if len(backends) > 1:
        LOGGER.info(f"Ensemble of {len(backends)} models: {', '.join(str(w) for w in weights)}")
    nc = 1 if job.single_cls else cfg.nc
    if not job.single_cls and model.nc != nc:
        raise UserError(f"{weights[0]}: model has {model.nc} classes but {cfg.yaml_file} has nc={nc}; "
                        f"pass matching --data (or --single-cls)")
    # fixed-size exports (any member of an ensemble): square letterboxed images at the smallest of their sizes,
    # which every one of them takes (padded at the bottom/right to its own size)
    fixed_ones = [(w, b.fixed_imgsz) for w, b in zip(weights, backends) if getattr(b, "fixed_imgsz", None)]
    w_fixed, fixed = min(fixed_ones, key=lambda x: min(x[1])) if fixed_ones else (None, None)
    if fixed and job.imgsz and job.imgsz != min(fixed):
        LOGGER.warning(f"WARNING: {w_fixed} was exported at {fixed[0]}x{fixed[1]}; validating at that size")
    if fixed and job.task != "speed":
        LOGGER.info(f"Note: {w_fixed} takes only {fixed[0]}x{fixed[1]} input, so it validates square letterboxed "
                    f"images; a .pt (or an export with --dynamic) validates rectangular batches padded by half a "
                    f"stride, which a fixed-size file cannot take, and scores a little differently")
    imgsz = min(fixed) if fixed else (job.imgsz or backends[0].default_imgsz())
    imgsz = check_img_size(imgsz, model.stride)
    if not cfg.split(split):
        raise UserError(f"{cfg.yaml_file}: no '{split}' split")
    save_dir = ddp.broadcast_object(increment_path(Path(job.project) / job.name, exist_ok=job.exist_ok, mkdir=True)
                                    if ddp.is_main() else None)
    model.warmup((1, 3, imgsz, imgsz))
    # rectangular batches padded by half a stride (upstream's validation) unless --no-rect, --task speed or a
    # fixed-size export: then square letterboxed images, no extra padding
    pad, rect = (0.5, True) if (job.rect and job.task != "speed" and not fixed) else (0.0, False)
    loader, _ = create_dataloader(cfg.split(split), imgsz, job.batch_size, model.stride, pad=pad, rect=rect,
                                  workers=job.workers, names=cfg.names, nc=cfg.nc, single_cls=job.single_cls,
                                  min_items=job.min_items, prefix=f"{job.task}: ", pin_memory=dev.type == "cuda",
                                  shard=(ddp.rank(), ddp.world_size()) if ddp.is_dist() else None)
    _fix_graph_shapes(backends, loader.dataset)
    anno = (coco.find_annotations(cfg) or "auto") if job.options.save_json else None
    options = dataclasses.replace(job.options, save_dir=save_dir, is_coco=coco.is_coco_data(cfg), anno_json=anno,
                                  training=False)
    out = Validator(options, names=cfg.names).run(model, loader)
    if (options.save_txt or options.save_hybrid) and ddp.is_main():
        n = len(list((save_dir / "labels").glob("*.txt")))
        LOGGER.info(f"{n} labels saved to {save_dir / 'labels'}")
    if save_dir.is_dir() and any(save_dir.iterdir()):  # a check without plots or files saves nothing to point at
        LOGGER.info(f"Results saved to {save_dir}")
    return out


def _fix_graph_shapes(backends: Sequence[Backend], dataset, k: int = GRAPH_SHAPES) -> None:
    """--cuda-graph with rectangular batches: pad every batch to one of k fixed shapes, so the whole val set
    needs k captures (or compilations) instead of one per distinct batch shape. Padding is grey at the
    bottom/right of the letterbox, so boxes keep their coordinates; predictions near those edges may change
    slightly (the network sees more grey there)."""
    shapes = getattr(dataset, "batch_shapes", None)
    if shapes is None or not any(b.graph is not None for b in backends):
        return
    fixed = plan_fixed_shapes(shapes, k)
    for b in backends:
        b.graph_shapes = fixed
    LOGGER.info(f"--cuda-graph: {len({tuple(int(v) for v in s) for s in shapes})} rectangular batch shapes padded "
                f"to {len(fixed)} fixed shapes {', '.join(f'{h}x{w}' for h, w in fixed)} (grey at the bottom/right: "
                f"boxes near those edges can differ slightly from validation without graphs)")


def validate_files(weights: Sequence[str | Path], data: str | Path, imgsz: int, device: str = "cpu",
                   batch_size: int = 16, half: Sequence[bool] | None = None) -> tuple[list[ValResult], str]:
    """Several models (a .pt and its exports) on the very same val images, quietly: one loader, so every file
    sees the same letterbox (square at the export size when any file takes one fixed size, else rectangular
    batches as for a .pt) and the differences are the files'. Returns (results in order, what was validated).
    What export.py's accuracy check compares (utils/deploy/accuracy.py). half: --half per file."""
    import contextlib
    import io
    import logging
    from utils.torch_utils import select_device
    dev = select_device(device)
    cfg = load_data_config(data, need=("val",))
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # no per-file tables, speed lines or scan summaries; warnings still show
    try:
        backends = [Backend(w, device=dev, half=h, fuse=True) for w, h in zip(weights, half or [False] * len(weights))]
        fixed = [b.fixed_imgsz for b in backends if b.fixed_imgsz]
        size = int(min(fixed[0])) if fixed else check_img_size(imgsz, max(b.stride for b in backends))
        loader, _ = create_dataloader(cfg.val, size, batch_size, max(b.stride for b in backends),
                                      pad=0.0 if fixed else 0.5, rect=not fixed, workers=0, names=cfg.names,
                                      nc=cfg.nc, prefix="accuracy check: ")
        results = []
        for b in backends:
            b.warmup((1, 3, size, size))
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
                results.append(Validator(ValOptions(plots=False), names=cfg.names).run(b, loader))
    finally:
        LOGGER.setLevel(level)
    how = f"letterboxed to {size}x{size}" if fixed else f"in rectangular batches at {size}"
    return results, f"the val split of {Path(cfg.yaml_file).name} ({len(loader.dataset)} images {how}, alike for every file)"
