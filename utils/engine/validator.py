"""Validation engine used by val_dual.py and by the trainer after each epoch.

One path for every caller: uint8 batch -> float/255 on the device -> model (or Backend / Ensemble) ->
multi-label NMS -> boxes mapped back to ORIGINAL image pixels with the batch's ratio_pad -> COCO-style
matching against labels (also mapped to original pixels) -> AP per class (utils.metrics, which follows
pycocotools). When the model is a torch module in eval mode its raw head maps come back alongside the
decoded boxes, so `loss_fn(feats, targets)` gives the real validation losses (upstream writes zeros).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops import batched_nms
from tqdm import tqdm

from utils import coco
from utils.engine.backend import Backend
from utils.engine.tta import forward_augment
from utils.general import LOGGER, UserError, increment_path, scale_boxes, xywh2xyxy, xyxy2xywh
from utils.metrics import ConfusionMatrix, ap_per_class, fitness, match_predictions
from utils.nms import non_max_suppression
from utils.torch_utils import select_device, time_sync

HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4


class Results(dict):
    """The validation result dict; keys are also attributes (so `metrics.fitness(results)` works)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


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
            return lambda x: _split_output(inner(x.to(model.device, model.dtype)))
        return lambda x: (model(x), None)
    if isinstance(model, Ensemble):
        return lambda x: (model(x), None)
    return lambda x: _split_output(model(x))


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


def _output_to_target(preds: list[Tensor], max_per_image: int = 15) -> Tensor:
    """NMS outputs -> [N, 7] (img, cls, xc, yc, w, h, conf) in input pixels for plot_images."""
    rows = []
    for i, p in enumerate(preds):
        p = p[:max_per_image].detach().float().cpu()
        rows.append(torch.cat((torch.full((len(p), 1), float(i)), p[:, 5:6], xyxy2xywh(p[:, :4]), p[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 7))


@torch.no_grad()
def validate(model, dataloader, *, names: Sequence[str] | dict | None = None, conf_thres: float = 0.001,
             iou_thres: float = 0.7, max_det: int = 300, single_cls: bool = False, augment: bool = False,
             loss_fn=None, half: bool = False, save_dir: str | Path | None = None, plots: bool = True,
             verbose: bool = False, save_txt: bool = False, save_hybrid: bool = False, save_conf: bool = False,
             save_json: bool = False, is_coco: bool = False, compute_loss: bool = True,
             anno_json: str | Path | None = None, training: bool | None = None,
             return_predictions: bool = False) -> Results:
    """Validate `model` on `dataloader` and return a Results dict.

    model: torch DetectionModel (e.g. the trainer's EMA; eval-mode (y, feats) gives real losses through
    loss_fn), a Backend or an Ensemble. anno_json: COCO GT file for pycocotools when save_json; 'auto' writes
    one from the YOLO labels (save_dir/gt.json) so any dataset can be cross-checked. save_hybrid merges GT
    boxes into the SAVED txt/json only (like upstream's autolabelling); unlike upstream the metrics always
    use the model's own detections, so mAP is never inflated by GT. training: None = infer (torch module
    means the trainer is calling: no per-class table unless verbose, no speed line).

    Returns keys mp, mr, map50, map, box, cls, dfl, fitness, maps (per-class mAP50-95, len nc), nt
    (instances per class), seen, speed (pre, inference, NMS ms/img), metrics_ms (matching + AP per img),
    ap_table (list of row dicts), results (mp, mr, map50, map, box, cls, dfl), confusion_matrix (when
    plots), save_dir, and when pycocotools ran: map_ours/map50_ours with
    map/map50 replaced by pycocotools' values; with return_predictions, predictions {path: [n,6] original px}.
    """
    is_backend = isinstance(model, (Backend, Ensemble))
    training = (not is_backend) if training is None else training
    names = list(names.values()) if isinstance(names, dict) else list(names or getattr(model, "names", []) or [])
    if not names:
        ds_names = getattr(dataloader.dataset, "names", None)
        names = list(ds_names) if ds_names else ["0"]
    nc = 1 if single_cls else len(names)
    save_dir = Path(save_dir) if save_dir is not None else None
    if (save_txt or save_json or save_hybrid) and save_dir is None:
        raise UserError("validate: save_txt/save_hybrid/save_json need a save_dir")
    plots = plots and save_dir is not None
    save_txt = save_txt or save_hybrid
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        if save_txt:
            (save_dir / "labels").mkdir(parents=True, exist_ok=True)

    device = _model_device(model)
    was_training = model.training if isinstance(model, nn.Module) else None
    halved = False
    if is_backend:
        half = model.dtype == torch.float16
    else:
        half = half and device.type == "cuda"
        model.eval()
        if half:
            model.half()
            halved = True
    want_loss = compute_loss and loss_fn is not None
    forward = _make_forward(model, want_loss)
    stride = _model_stride(model)

    iouv = torch.linspace(0.5, 0.95, 10)
    cm = ConfusionMatrix(nc=nc)
    loss = torch.zeros(3, device=device)
    dt = [0.0, 0.0, 0.0]
    dt_metrics = 0.0  # matching + AP (includes txt/json writing), reported as metrics_ms
    seen = 0
    stats: list[tuple] = []
    img_per_cls = np.zeros(nc, dtype=np.int64)
    jdict: list[dict] = []
    id_map = coco.image_id_map(getattr(dataloader.dataset, "im_files", [])) if save_json else {}
    class_map = coco.coco80_to_coco91_class() if is_coco else None
    predictions: dict[str, Tensor] = {}
    nb_total = len(dataloader)

    pbar = tqdm(dataloader, desc=HEADER, total=nb_total, bar_format="{l_bar}{bar:10}{r_bar}")
    for batch_i, (im, targets, paths, shapes) in enumerate(pbar):
        t1 = time_sync()
        im = im.to(device, non_blocking=True)
        im = (im.half() if half else im.float()) / 255
        targets = targets.to(device)
        nb, _, height, width = im.shape
        t2 = time_sync()
        dt[0] += t2 - t1

        y, feats = forward_augment(forward, im, stride) if augment else forward(im)
        if batch_i == 0 and not single_cls and y.shape[1] - 4 != nc:
            raise UserError(f"validate: the model predicts {y.shape[1] - 4} classes but the data has {nc}")
        t3 = time_sync()
        dt[1] += t3 - t2
        if want_loss and feats is not None:
            loss += loss_fn(feats, targets)[1].to(device).float()

        scale = torch.tensor((width, height, width, height), device=device, dtype=torch.float32)
        t4 = time_sync()
        preds = non_max_suppression(y, conf_thres, iou_thres, multi_label=True, agnostic=single_cls,
                                    max_det=max_det)
        t5 = time_sync()
        dt[2] += t5 - t4

        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:].float()
            nl, npr = labels.shape[0], pred.shape[0]
            path = Path(paths[si])
            if shapes[si] is not None:
                shape, ratio_pad = shapes[si][0], shapes[si][1]
            else:  # no letterbox record (should not happen for val loaders): treat input as original
                shape, ratio_pad = (height, width), ((1.0, 1.0), (0.0, 0.0))
            seen += 1
            correct = torch.zeros(npr, len(iouv), dtype=torch.bool)
            if nl:
                tbox = scale_boxes((height, width), xywh2xyxy(labels[:, 1:5]) * scale, shape, ratio_pad)
                labelsn = torch.cat((labels[:, :1], tbox), 1)
                img_per_cls[np.unique(labels[:, 0].long().cpu().numpy().clip(0, nc - 1))] += 1
            else:
                labelsn = torch.zeros((0, 5), device=device)
            predn = pred.clone().float()
            if single_cls:
                predn[:, 5] = 0
            scale_boxes((height, width), predn[:, :4], shape, ratio_pad)
            if return_predictions:
                predictions[str(path)] = predn.cpu()
            if plots:
                cm.process_batch(predn if npr else None, labelsn)
            if npr == 0:
                if nl:
                    stats.append((correct, torch.zeros(0), torch.zeros(0), labels[:, 0].cpu()))
                continue
            if nl:
                correct = match_cpu(predn, labelsn, iouv)
            stats.append((correct, predn[:, 4].cpu(), predn[:, 5].cpu(), labels[:, 0].cpu()))

            saved = predn
            if save_hybrid:
                gt_in = xywh2xyxy(labels[:, 1:5]) * scale
                hyb = _hybrid(pred.float(), gt_in, labels[:, 0], iou_thres, max_det)
                saved = scale_boxes((height, width), hyb.clone(), shape, ratio_pad) if len(hyb) else hyb
                if single_cls:
                    saved[:, 5] = 0
            if save_txt:
                _save_txt(saved, save_conf, shape, save_dir / "labels" / f"{path.stem}.txt")
            if save_json:
                image_id = id_map.get(str(path), int(path.stem) if path.stem.isnumeric() else path.stem)
                coco.detections_to_coco(saved, image_id, class_map, jdict)

        dt_metrics += time.time() - t5
        if plots and batch_i < 3:
            from utils.plots import plot_images
            plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names=names)
            plot_images(im, _output_to_target(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names=names)

    # ---- metrics ----
    cat = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)] if stats else []
    tcls = cat[3].astype(int) if cat else np.zeros(0, int)
    nt = np.bincount(tcls.clip(0, nc - 1), minlength=nc) if len(tcls) else np.zeros(nc, int)
    t6 = time.time()
    if cat:
        res = ap_per_class(cat[0], cat[1], cat[2], cat[3], plot=plots, save_dir=save_dir, names=names)
        mp, mr, map50, map_ = res.mean_results()
        maps = res.maps(nc)
    else:
        res, mp, mr, map50, map_, maps = None, 0.0, 0.0, 0.0, 0.0, np.zeros(nc)
    dt_metrics += time.time() - t6 if not plots else 0.0  # curve plotting is not metrics time

    LOGGER.info(ROW % ("all", seen, nt.sum(), mp, mr, map50, map_))
    if nt.sum() == 0:
        LOGGER.warning(f"WARNING: no labels found in the {'val' if training else 'validation'} set, "
                       f"cannot compute metrics without labels")
    ap_table = [dict(cls="all", images=seen, instances=int(nt.sum()), p=mp, r=mr, map50=map50, map=map_)]
    if res is not None:
        for i, c in enumerate(res.ap_class):
            p, r, ap50, ap = res.class_result(i)
            ap_table.append(dict(cls=names[c] if c < len(names) else str(c), images=int(img_per_cls[c])
                                 if c < nc else 0, instances=int(nt[c]) if c < nc else 0, p=p, r=r, map50=ap50,
                                 map=ap))
        if (verbose or (nc < 50 and not training)) and nc > 1:
            for row in ap_table[1:]:
                LOGGER.info(ROW % (row["cls"], row["images"], row["instances"], row["p"], row["r"], row["map50"],
                                   row["map"]))

    speed = tuple(x / max(seen, 1) * 1e3 for x in dt)
    if not training:
        imgsz = getattr(dataloader.dataset, "imgsz", height if nb_total else 0)
        shape = (getattr(dataloader, "batch_size", None) or 1, 3, imgsz, imgsz)
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % speed)
    if plots:
        cm.plot(save_dir=save_dir, names=names)

    out = Results(mp=mp, mr=mr, map50=map50, map=map_)
    lossv = (loss.cpu() / max(nb_total, 1)).tolist()
    out.update(box=lossv[0], cls=lossv[1], dfl=lossv[2], maps=maps, nt=nt, seen=seen, speed=speed,
               metrics_ms=dt_metrics / max(seen, 1) * 1e3,
               ap_table=ap_table, save_dir=save_dir, confusion_matrix=cm.matrix if plots else None)

    if save_json and save_dir is not None:
        pred_json = coco.save_json(jdict, save_dir / "predictions.json")
        LOGGER.info(f"Saved {len(jdict)} detections to {pred_json}")
        if anno_json is not None:
            out.update(_coco_check(anno_json, pred_json, dataloader, save_dir, names, class_map, id_map, out))

    out["fitness"] = float(fitness(out))
    out["results"] = (out["mp"], out["mr"], out["map50"], out["map"], *lossv)
    if return_predictions:
        out["predictions"] = predictions
    if isinstance(model, nn.Module):
        if halved:
            model.float()
        if was_training:
            model.train()
    return out


def match_cpu(predn: Tensor, labelsn: Tensor, iouv: Tensor) -> Tensor:
    """TP flags [n, 10] on the CPU (the metrics' matching is numpy anyway)."""
    return match_predictions(predn.cpu(), labelsn.cpu(), iouv).cpu()


def _coco_check(anno_json, pred_json: Path, dataloader, save_dir: Path, names, class_map, id_map, ours) -> dict:
    """Evaluate predictions.json with pycocotools; its mAPs replace ours (kept as *_ours)."""
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        LOGGER.warning("WARNING: pycocotools not installed (pip install pycocotools): skipping the COCO check")
        return {}
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
        return {}
    LOGGER.info(f"pycocotools: mAP50-95 {map_:.4f}, mAP50 {map50:.4f} (ours {ours['map']:.4f}, {ours['map50']:.4f})")
    return dict(map_ours=ours["map"], map50_ours=ours["map50"], map=map_, map50=map50, coco_json=str(anno_json))


def run_validation(data: str | Path = "data/shapes.yaml", weights: Sequence[str | Path] | str | None = None,
                   batch_size: int = 32, imgsz: int | None = None, conf_thres: float = 0.001, iou_thres: float = 0.7,
                   max_det: int = 300, task: str = "val", device: str = "", workers: int = 8,
                   single_cls: bool = False, augment: bool = False, verbose: bool = False, save_txt: bool = False,
                   save_hybrid: bool = False, save_conf: bool = False, save_json: bool = False,
                   project: str | Path = "runs/val", name: str = "exp", exist_ok: bool = False, half: bool = False,
                   min_items: int = 0, plots: bool = True, cuda_graph: str | None = None, **_ignored) -> Results:
    """What val_dual.py does: load weights (several = ensemble), build the rect val loader, validate."""
    from utils.data import create_dataloader, load_data_config
    from utils.general import check_img_size

    if not weights:
        raise UserError("val_dual.py: --weights is required (a .pt checkpoint written by train_dual.py)")
    weights = [weights] if isinstance(weights, (str, Path)) else list(weights)
    for w in weights:
        if not Path(w).is_file():
            raise UserError(f"{w}: weights file not found")
    if task not in ("val", "test", "speed"):
        raise UserError(f"--task {task}: use val, test or speed")
    if task == "speed":  # upstream: speed benchmark at deployment thresholds, nothing saved
        conf_thres, iou_thres, save_json, plots = 0.25, 0.45, False, False
    save_txt = save_txt or save_hybrid
    dev = select_device(device, batch_size)
    cfg = load_data_config(data)
    backends = [Backend(w, device=dev, half=half, fuse=True) for w in weights]
    for b in backends:
        b.use_cuda_graph(cuda_graph)
    model = backends[0] if len(backends) == 1 else Ensemble(backends)
    if len(backends) > 1:
        LOGGER.info(f"Ensemble of {len(backends)} models: {', '.join(str(w) for w in weights)}")
    nc = 1 if single_cls else cfg["nc"]
    if not single_cls and model.nc != nc:
        raise UserError(f"{weights[0]}: model has {model.nc} classes but {cfg['yaml_file']} has nc={nc}; "
                        f"pass matching --data (or --single-cls)")
    fixed = getattr(backends[0], "fixed_imgsz", None)
    if fixed and imgsz and imgsz != min(fixed):
        LOGGER.warning(f"WARNING: {weights[0]} was exported at {fixed[0]}x{fixed[1]}; validating at that size")
    imgsz = backends[0].default_imgsz() if (fixed or not imgsz) else imgsz
    imgsz = check_img_size(imgsz, model.stride)
    split = "val" if task == "speed" else task
    if not cfg.get(split):
        raise UserError(f"{cfg['yaml_file']}: no '{split}' split")
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    if save_txt:
        (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    model.warmup((1, 3, imgsz, imgsz))
    pad, rect = (0.0, False) if (task == "speed" or fixed) else (0.5, True)  # exported files: one fixed size
    loader, _ = create_dataloader(cfg[split], imgsz, batch_size, model.stride, pad=pad, rect=rect, workers=workers,
                                  names=cfg["names"], nc=cfg["nc"], single_cls=single_cls, min_items=min_items,
                                  prefix=f"{task}: ")
    is_coco = coco.is_coco_data(cfg)
    anno = coco.find_annotations(cfg) if save_json else None
    if save_json and anno is None:
        anno = "auto"
    out = validate(model, loader, names=cfg["names"], conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                   single_cls=single_cls, augment=augment, half=half, save_dir=save_dir, plots=plots,
                   verbose=verbose, save_txt=save_txt, save_hybrid=save_hybrid, save_conf=save_conf,
                   save_json=save_json, is_coco=is_coco, anno_json=anno, training=False)
    if save_txt:
        n = len(list((save_dir / "labels").glob("*.txt")))
        LOGGER.info(f"{n} labels saved to {save_dir / 'labels'}")
    LOGGER.info(f"Results saved to {save_dir}")
    return out
