"""The training engine behind train_dual.py: dual-head (YOLOv9) and single-head (GELAN) models alike.

Epoch loop: warmup -> forward -> TAL loss -> accumulate to nominal batch 64 -> clipped step -> EMA; then
validation of the EMA model with real losses, results.csv, checkpoints (atomic), early stopping.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

from models.yolo import DetectionModel
from utils.checkpoint import (load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint,
                              strip_checkpoint, transfer_weights)
from utils.data import create_dataloader, load_data_config, multi_scale
from utils.data.verify import collect_image_files
from utils.engine.optim import ModelEMA, build_optimizer, choose_optimizer, lr_lambda, unwrap, warmup_iterations
from utils.general import LOGGER, ROOT, UserError, check_img_size, increment_path
from utils.loss import DetectionLoss
from utils.metrics import fitness as metrics_fitness

RESULT_COLUMNS = ["epoch", "train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision",
                  "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/cls_loss",
                  "val/dfl_loss", "x/lr0", "x/lr1", "x/lr2"]
HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
            "box", "cls", "dfl")
MAX_NONFINITE = 10  # consecutive non-finite losses before the run stops
DEFAULTS = {"epochs": 100, "imgsz": 640, "batch_size": 16, "close_mosaic": 0,
            "hyp": str(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")}  # upstream defaults when neither flag nor data YAML says


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


LOCAL_RANK, RANK, WORLD_SIZE = _env_int("LOCAL_RANK", -1), _env_int("RANK", -1), _env_int("WORLD_SIZE", 1)


def fitness(results: dict) -> float:
    return float(metrics_fitness(np.array([[results["mp"], results["mr"], results["map50"], results["map"]]]))[0])


def _injected_nonfinite(ni: int) -> bool:
    """Test hook: YOLO_INJECT_NONFINITE='3,7' or '5+' makes the loss at those iterations NaN."""
    spec = os.environ.get("YOLO_INJECT_NONFINITE", "")
    for part in filter(None, spec.split(",")):
        if part.endswith("+") and ni >= int(part[:-1]):
            return True
        if part.isdigit() and ni == int(part):
            return True
    return False


def load_hyp(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file() and (ROOT / "data" / "hyps" / p.name).is_file():
        p = ROOT / "data" / "hyps" / p.name
    if not p.is_file():
        raise UserError(f"{path}: hyperparameter file not found")
    try:
        hyp = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(hyp, dict):
        raise UserError(f"{p}: expected a mapping of hyperparameters")
    missing = [k for k in HYP_KEYS if k not in hyp]
    if missing:
        raise UserError(f"{p}: missing hyperparameter(s) {', '.join(missing)}")
    bad = [k for k, v in hyp.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise UserError(f"{p}: non-numeric hyperparameter(s) {', '.join(map(str, bad))}")
    return {k: float(v) for k, v in hyp.items()}


def find_last_checkpoint(search: Path = ROOT / "runs") -> Path:
    found = sorted(Path(search).glob("**/last.pt"), key=os.path.getmtime)
    if not found:
        raise UserError(f"--resume: no last.pt found under {search}; pass the checkpoint path")
    return found[-1]


def select_device(device: str = "") -> torch.device:
    """'' (auto), 'cpu', '0', '0,1', 'cuda:0' -> torch.device (this process's GPU under torchrun)."""
    from utils.torch_utils import select_device as _sel
    return _sel(device)


class Trainer:
    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.stop_requested = False
        self.main = RANK in (-1, 0)

    # ------------------------------------------------------------------ setup
    def _resolve_resume(self) -> dict | None:
        opt = self.opt
        if not opt.resume:
            return None
        path = Path(opt.resume) if isinstance(opt.resume, str) and opt.resume not in ("True", "") else find_last_checkpoint()
        ck = load_checkpoint(path)
        if ck.get("optimizer") is None:
            raise UserError(f"{path}: stripped checkpoint (no optimizer state); it cannot be resumed")
        saved = dict(ck.get("opt") or {})
        new_epochs = opt.epochs
        keep = {k: getattr(opt, k) for k in ("device", "workers", "exist_ok") if hasattr(opt, k)}
        for k, v in saved.items():
            setattr(opt, k, v)
        opt.__dict__.update(keep)
        opt.resume, opt.weights = str(path), str(path)
        if new_epochs is not None:
            opt.epochs = int(new_epochs)
        opt.save_dir = str(path.parent.parent)
        if ck["epoch"] + 1 >= opt.epochs:
            raise UserError(f"{path}: run already finished {ck['epoch'] + 1} epochs; "
                            f"extend it with --resume {path} --epochs N (N > {ck['epoch'] + 1})")
        LOGGER.info(f"Resuming training from {path} at epoch {ck['epoch'] + 1} of {opt.epochs}")
        return ck

    def _setup(self) -> None:
        opt = self.opt
        self.ckpt = self._resolve_resume()
        self.device = select_device(opt.device)
        if LOCAL_RANK != -1:
            if self.device.type == "cuda":
                torch.cuda.set_device(LOCAL_RANK)
                self.device = torch.device("cuda", LOCAL_RANK)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.data = load_data_config(opt.data)
        defaults = {**DEFAULTS, **(self.data.get("train_defaults") or {})}
        for k, v in defaults.items():
            if getattr(opt, k, None) is None:
                setattr(opt, k, v)
        if not Path(opt.hyp).is_absolute() and not Path(opt.hyp).exists():
            opt.hyp = str(ROOT / opt.hyp)
        self.hyp = dict(self.ckpt["hyp"]) if self.ckpt else load_hyp(opt.hyp)
        names = ["item"] if opt.single_cls else list(self.data["names"])
        self.names, self.nc = names, len(names)
        if not self.ckpt:
            opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
        self.save_dir = Path(opt.save_dir)
        self.wdir = self.save_dir / "weights"
        if self.main:
            try:
                self.wdir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"{self.save_dir}: cannot create run folder ({e.strerror})") from None
        seed = int(opt.seed) + 1 + max(RANK, 0)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    def _build_model(self) -> None:
        opt = self.opt
        if self.ckpt:
            model = model_from_checkpoint(self.ckpt, use_ema=False)
        elif opt.weights:
            ck = load_checkpoint(opt.weights)
            cfg = opt.cfg or ck["model_yaml"]
            model = DetectionModel(cfg, nc=self.nc)
            exclude = ("anchor",) if (opt.cfg or ck["model_yaml"].get("nc") == self.nc) else ()
            transfer_weights(model, {k: v.float() for k, v in (ck.get("ema") or ck["model"]).items()}, exclude)
        else:
            model = DetectionModel(opt.cfg, nc=self.nc)
        model.names = self.names
        freeze = [f"model.{x}." for x in (opt.freeze if len(opt.freeze) > 1 else range(opt.freeze[0]))]
        for k, p in model.named_parameters():
            if any(k.startswith(f) for f in freeze):
                p.requires_grad_(False)
        if freeze:
            LOGGER.info(f"Froze {len(freeze)} layer(s)")
        self.model = model.to(self.device)
        gs = max(int(model.stride.max()), 32)
        self.gs = gs
        self.imgsz = check_img_size(opt.imgsz, gs)
        if self.main:
            model.info(imgsz=self.imgsz)

    def _amp_ok(self) -> bool:
        """Offline AMP check on this very model: fp16 autocast output must match fp32 closely."""
        if self.device.type != "cuda":
            return False
        m = unwrap(self.model)
        was = m.training
        m.eval()
        g = torch.Generator().manual_seed(0)
        im = torch.rand(1, 3, self.imgsz, self.imgsz, generator=g).to(self.device)
        with torch.no_grad():
            a = m(im)[0]
            with torch.autocast("cuda", dtype=torch.float16):
                b = m(im)[0].float()
        m.train(was)
        ok = bool(torch.isfinite(b).all()) and torch.allclose(a[:, :4], b[:, :4], atol=0.5 * max(1.0, float(a[:, :4].abs().max()) * 0.01))
        LOGGER.info(f"AMP checks {'passed' if ok else 'failed, training in fp32'}")
        return ok

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        self._setup()
        self._build_model()
        opt, hyp, device = self.opt, self.hyp, self.device
        cuda = device.type == "cuda"
        nbs = int(hyp.get("nbs", 64))  # nominal batch size (optional hyp key; upstream fixes 64)
        batch = int(opt.batch_size)
        per_rank = max(batch // WORLD_SIZE, 1)
        accumulate = max(round(nbs / batch), 1)
        hyp["weight_decay"] *= batch * accumulate / nbs
        choice = choose_optimizer(opt.optimizer, len(collect_image_files(self.data["train"])[0]), batch, nbs,
                                  opt.epochs, hyp, finetune=bool(opt.weights) and not self.ckpt)
        opt.optimizer = choice.name  # resolved: opt.yaml, hyp.yaml and checkpoints keep it, --resume reuses it
        hyp.update(choice.hyp_updates())
        if self.main:
            LOGGER.info(f"optimizer: {choice.name} lr0={choice.lr0} momentum={choice.momentum} "
                        f"warmup_bias_lr={choice.warmup_bias_lr} ({choice.reason})")
            try:
                (self.save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
                (self.save_dir / "opt.yaml").write_text(yaml.safe_dump(_plain_opt(opt), sort_keys=False))
            except OSError as e:
                raise UserError(f"{self.save_dir}: cannot write run files ({e.strerror or e})") from None
            LOGGER.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyp.items()))

        optimizer = build_optimizer(self.model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
        kind = "cos" if opt.cos_lr else "flat-cos" if opt.flat_cos_lr else "fixed" if opt.fixed_lr else "linear"
        lf = lr_lambda(kind, opt.epochs, hyp["lrf"])
        ema = ModelEMA(self.model) if self.main else None
        start_epoch, best_fitness = 0, 0.0
        if self.ckpt:
            optimizer.load_state_dict(self.ckpt["optimizer"])
            if ema and self.ckpt.get("ema"):
                ema.ema.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in self.ckpt["ema"].items()})
                ema.updates = int(self.ckpt.get("updates", 0))
            start_epoch, best_fitness = self.ckpt["epoch"] + 1, float(self.ckpt.get("best_fitness", 0.0))
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf, last_epoch=start_epoch - 1)

        if opt.sync_bn and LOCAL_RANK != -1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        amp = self._amp_ok()
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        model = self.model
        if LOCAL_RANK != -1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[LOCAL_RANK] if cuda else None)

        prefix = "train: "
        train_loader, dataset = create_dataloader(
            self.data["train"], self.imgsz, per_rank, self.gs, hyp=hyp, augment=True, cache=opt.cache,
            rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers, image_weights=opt.image_weights,
            shuffle=not opt.rect, seed=opt.seed, names=self.data["names"], nc=self.data["nc"],
            single_cls=opt.single_cls, min_items=opt.min_items, prefix=prefix)
        val_loader = None
        if self.main:
            val_loader, _ = create_dataloader(
                self.data["val"], self.imgsz, per_rank * 2, self.gs, hyp=hyp, augment=False, cache=opt.cache,
                rect=True, rank=-1, workers=opt.workers, pad=0.5, names=self.data["names"], nc=self.data["nc"],
                single_cls=opt.single_cls, prefix="val: ")
            if not self.ckpt and not opt.noplots:
                from utils.plots import plot_labels
                plot_labels(np.concatenate(dataset.labels, 0) if dataset.labels else np.zeros((0, 5)),
                            self.names, self.save_dir)
        loss_fn = DetectionLoss(unwrap(model), hyp)
        nb = len(train_loader)
        nw = warmup_iterations(hyp, nb, opt.epochs)
        last_opt_step = -1
        close_at = opt.epochs - opt.close_mosaic
        csv_path = self.save_dir / "results.csv"
        if self.main:
            _truncate_results(csv_path, start_epoch)
        stopper = EarlyStopping(opt.patience, best_fitness=best_fitness)
        nonfinite = 0
        results: dict = {}
        prev_handler = signal.signal(signal.SIGINT, self._on_sigint) if self.main else None
        LOGGER.info(f"Image sizes {self.imgsz} train, {self.imgsz} val; {len(dataset)} train images, "
                    f"batch {batch} (accumulate {accumulate} -> nominal {nbs})\nLogging results to {self.save_dir}\n"
                    f"Starting training for {opt.epochs} epochs...")
        t0 = time.time()
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, opt.epochs):
                model.train()
                if epoch >= close_at and dataset.mosaic:
                    LOGGER.info("Closing dataloader mosaic")
                    dataset.close_mosaic()
                if opt.image_weights and results.get("maps") is not None:
                    cw = dataset.class_weights() * (1 - np.asarray(results["maps"])) ** 2 / max(self.nc, 1)
                    dataset.resample_image_weights(cw)
                if LOCAL_RANK != -1:
                    train_loader.sampler.set_epoch(epoch)
                mloss = torch.zeros(3, device=device)
                n_seen = 0
                optimizer.zero_grad()
                LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "cls_loss", "dfl_loss", "Instances", "Size"))
                pbar = enumerate(train_loader)
                if self.main:
                    pbar = tqdm(pbar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
                for i, (imgs, targets, paths, _) in pbar:
                    ni = i + nb * epoch
                    imgs = imgs.to(device, non_blocking=True).float() / 255
                    if ni <= nw:
                        xi = [0, nw]
                        accumulate = max(1, round(np.interp(ni, xi, [1, nbs / batch])))
                        for j, x in enumerate(optimizer.param_groups):
                            x["lr"] = float(np.interp(ni, xi, [hyp["warmup_bias_lr"] if j == 0 else 0.0,
                                                               x["initial_lr"] * lf(epoch)]))
                            if "momentum" in x:
                                x["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))
                    if opt.multi_scale:
                        imgs = multi_scale(imgs, self.imgsz, self.gs)
                    with torch.autocast("cuda", enabled=amp):
                        pred = model(imgs)
                        loss, items = loss_fn(pred, targets.to(device))
                    if _injected_nonfinite(ni):
                        loss = loss * float("nan")
                    finite = torch.isfinite(loss).to(torch.float32)
                    if LOCAL_RANK != -1:
                        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                    if finite.item() == 0:
                        nonfinite += 1
                        optimizer.zero_grad()
                        LOGGER.warning(f"WARNING: non-finite loss at epoch {epoch} batch {i} ({paths[0]} ...), step skipped "
                                       f"({nonfinite}/{MAX_NONFINITE} in a row)")
                        if nonfinite >= MAX_NONFINITE:
                            if self.main:
                                self._save(ema, optimizer, epoch - 1, best_fitness, "last.pt")
                            raise UserError(f"training stopped: the loss was not finite for {MAX_NONFINITE} steps in a row "
                                            f"(try a lower lr0, check labels); last checkpoint kept at {self.wdir / 'last.pt'}")
                        continue
                    nonfinite = 0
                    scaler.scale(loss).backward()
                    if ni - last_opt_step >= accumulate:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad()
                        if ema:
                            ema.update(model)
                        last_opt_step = ni
                    if self.main:
                        mloss = (mloss * n_seen + items) / (n_seen + 1)
                        n_seen += 1
                        mem = f"{torch.cuda.memory_reserved() / 1e9 if cuda else 0:.3g}G"
                        pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                            f"{epoch}/{opt.epochs - 1}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1]))
                        if ni < 3 and not opt.noplots:
                            from utils.plots import plot_images
                            plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg", names=self.names)
                    if self.stop_requested:
                        raise KeyboardInterrupt
                lrs = [x["lr"] for x in optimizer.param_groups]
                scheduler.step()
                stop = False
                if self.main:
                    final = epoch + 1 == opt.epochs
                    if not opt.noval or final:
                        results = self._validate(ema.ema, val_loader, loss_fn, plots=False)
                    else:
                        results = {"mp": 0.0, "mr": 0.0, "map50": 0.0, "map": 0.0, "box": 0.0, "cls": 0.0, "dfl": 0.0}
                    fi = fitness(results)
                    if fi > best_fitness:
                        best_fitness = fi
                    _append_results(csv_path, epoch, mloss.tolist(), results, lrs)
                    if not opt.nosave or final:
                        self._save(ema, optimizer, epoch, best_fitness, "last.pt")
                        if best_fitness == fi:
                            self._save(ema, optimizer, epoch, best_fitness, "best.pt")
                        if opt.save_period > 0 and (epoch + 1) % opt.save_period == 0:
                            self._save(ema, optimizer, epoch, best_fitness, f"epoch{epoch}.pt")
                    stop = stopper(epoch, fi)
                if LOCAL_RANK != -1:
                    flag = [stop]
                    dist.broadcast_object_list(flag, 0)
                    stop = flag[0]
                if stop:
                    break
        except KeyboardInterrupt:
            if self.main:
                self._save(ema, optimizer, epoch - 1, best_fitness, "last.pt")
                LOGGER.info(f"\nInterrupted: saved {self.wdir / 'last.pt'}; continue with "
                            f"python train_dual.py --resume {self.wdir / 'last.pt'}")
            raise SystemExit(130)
        finally:
            if prev_handler is not None:
                signal.signal(signal.SIGINT, prev_handler)

        if self.main:
            LOGGER.info(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
            best = self.wdir / "best.pt"
            if best.exists():
                strip_checkpoint(best)
                LOGGER.info(f"\nValidating {best}...")
                results = self._validate(model_from_checkpoint(load_checkpoint(best)).to(device), val_loader, loss_fn,
                                         plots=not opt.noplots, verbose=True)
            if not opt.noplots:
                from utils.plots import plot_results
                plot_results(csv_path)
            LOGGER.info(f"Results saved to {self.save_dir}")
        if LOCAL_RANK != -1 and dist.is_initialized():
            dist.destroy_process_group()
        return results

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        LOGGER.info("\nStopping after this batch (Ctrl-C again to stop at once)...")

    def _validate(self, model: nn.Module, loader, loss_fn, plots: bool, verbose: bool = False) -> dict:
        from utils.engine.validator import validate
        return validate(model, loader, names=self.names, loss_fn=loss_fn, save_dir=self.save_dir, plots=plots,
                        verbose=verbose, single_cls=self.opt.single_cls, half=False)

    def _save(self, ema: ModelEMA | None, optimizer, epoch: int, best_fitness: float, name: str) -> None:
        ck = make_checkpoint(unwrap(self.model), ema=ema.ema if ema else None, updates=ema.updates if ema else 0,
                             optimizer=optimizer, epoch=epoch, best_fitness=best_fitness, opt=_plain_opt(self.opt),
                             hyp=self.hyp, names=self.names)
        save_checkpoint(ck, self.wdir / name)


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs."""

    def __init__(self, patience: int = 100, best_fitness: float = 0.0):
        self.best_fitness, self.best_epoch = best_fitness, 0
        self.patience = patience if patience > 0 else float("inf")

    def __call__(self, epoch: int, fi: float) -> bool:
        if fi >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fi
        stop = (epoch - self.best_epoch) >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early: no improvement in the last {self.patience} epochs "
                        f"(best at epoch {self.best_epoch}); use --patience to change this.")
        return stop


def _plain_opt(opt: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}


def _truncate_results(path: Path, start_epoch: int) -> None:
    """On resume, drop rows of epochs that will be trained again (no duplicates, no gaps)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) < start_epoch]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def _append_results(path: Path, epoch: int, train_losses: list, r: dict, lrs: list) -> None:
    new = not path.exists()
    row = [epoch, *train_losses, r["mp"], r["mr"], r["map50"], r["map"], r.get("box", 0.0), r.get("cls", 0.0),
           r.get("dfl", 0.0), *lrs]
    try:
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(RESULT_COLUMNS)
            w.writerow([row[0]] + [f"{float(x):.6g}" for x in row[1:]])
    except OSError as e:
        raise UserError(f"{path}: cannot append results ({e.strerror or e})") from None


def train(opt: argparse.Namespace) -> dict:
    return Trainer(opt).run()
