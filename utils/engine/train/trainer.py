"""The training engine behind train_dual.py: dual-head (YOLOv9) and single-head (GELAN) models alike.

Read it as its phases: `setup` (config, model, optimizer, schedule, loaders, DDP), `train_epoch` (the step
loop: warmup, forward, TAL loss, non-finite guard, accumulation to the nominal batch, clipped step, EMA),
`end_epoch` (validation of the EMA model with real losses, results.csv, checkpoints, early stop) and
`finish` (final validation of best.pt, plots). Extra concerns attach as callbacks (see `Callback`).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

from models.yolo import DetectionModel
from utils.checkpoint import (find_newest, load_checkpoint, make_checkpoint, model_from_checkpoint,
                              save_checkpoint, strip_checkpoint, transfer_weights)
from utils.data import create_dataloader, load_data_config, max_random_imgsz, multi_scale
from utils.engine import distributed as ddp
from utils.engine.train.autobatch import auto_batch_size
from utils.engine.config import TrainConfig
from utils.engine.graphs import CompiledForward, warn_once
from utils.engine.train.optim import ModelEMA, build_optimizer, choose_optimizer, lr_lambda, unwrap, warmup_iterations
from utils.engine.train.tensorboard import TensorBoardLogger
from utils.engine.validator import ValOptions, ValResult, Validator
from utils.general import LOGGER, ROOT, UserError, check_img_size, increment_path
from utils.loss import DetectionLoss
from utils.plots import plot_images, plot_labels, plot_results
from utils.torch_utils import cpu_bf16, cpu_thread_governor, cuda_memory_gb

RESULT_COLUMNS = ["epoch", "train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision",
                  "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/cls_loss",
                  "val/dfl_loss", "x/lr0", "x/lr1", "x/lr2"]
HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
            "box", "cls", "dfl", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
            "flipud", "fliplr", "mosaic")
# read with a default (mixup, copy_paste, nbs), or found in upstream hyp files and accepted with no effect here
HYP_OPTIONAL_KEYS = ("warmup_max_frac", "mixup", "copy_paste", "nbs", "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "anchors",
                     "fl_gamma", "label_smoothing")
MAX_NONFINITE = 10  # consecutive non-finite losses before the run stops
# written in weights/ when training has ended and `finish` starts, removed when it is done: a run stopped while
# finishing (Ctrl-C in the final validation) is then resumed into the finishing step, not called finished
FINISH_PENDING = "finish.pending"
GRAD_CLIP = 10.0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


LOCAL_RANK, RANK, WORLD_SIZE = _env_int("LOCAL_RANK", -1), _env_int("RANK", -1), _env_int("WORLD_SIZE", 1)


class Callback(Protocol):
    """Optional hooks; implement any subset. Called on global rank 0 only."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, row: dict) -> None: ...
    def on_train_end(self, trainer: "Trainer", result: ValResult | None) -> None: ...


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
    unknown = [str(k) for k in hyp if k not in HYP_KEYS + HYP_OPTIONAL_KEYS]
    if unknown:  # a typo would otherwise be ignored silently
        near = [difflib.get_close_matches(k, HYP_KEYS + HYP_OPTIONAL_KEYS, 1) for k in unknown]
        hints = "".join(f" ({k}: did you mean {m[0]}?)" for k, m in zip(unknown, near) if m)
        raise UserError(f"{p}: unknown hyperparameter(s) {', '.join(unknown)}{hints}")
    missing = [k for k in HYP_KEYS if k not in hyp]
    if missing:
        raise UserError(f"{p}: missing hyperparameter(s) {', '.join(missing)}")
    bad = [k for k, v in hyp.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise UserError(f"{p}: non-numeric hyperparameter(s) {', '.join(map(str, bad))}")
    return {k: float(v) for k, v in hyp.items()}


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, dict | None]:
    """(the run's final config, the checkpoint being resumed or None). Never edits `cfg`."""
    if not cfg.resume:
        return cfg, None
    path = find_newest("**/last.pt", "--resume") if cfg.resume == "last" else Path(cfg.resume)
    ck = load_checkpoint(path)
    if ck.get("optimizer") is None:
        raise UserError(f"{path}: stripped checkpoint (no optimizer state); it cannot be resumed")
    new = cfg.for_resume(ck.get("opt") or {}, path)
    done = ck["epoch"] + 1  # epochs trained (an early stop may end before opt's epochs)
    if (path.parent / FINISH_PENDING).is_file() and (cfg.epochs is None or cfg.epochs <= done):
        LOGGER.info(f"Resuming {path}: training ended after {done} epochs but the run stopped while finishing; "
                    f"finishing it now (strip best.pt, final validation, plots)")
        return new.replace(epochs=done), ck
    if ck["epoch"] + 1 >= (new.epochs or 0):
        raise UserError(f"{path}: run already finished {ck['epoch'] + 1} epochs; "
                        f"extend it with --resume {path} --epochs N (N > {ck['epoch'] + 1})")
    LOGGER.info(f"Resuming training from {path} at epoch {ck['epoch'] + 1} of {new.epochs}")
    return new, ck


class Trainer:
    def __init__(self, cfg: TrainConfig | argparse.Namespace, callbacks: Sequence[Callback] = ()):
        self.cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_args(cfg)
        self.user_callbacks = list(callbacks)
        self.callbacks = self._with_tensorboard(self.cfg)  # built again once a resumed run's config is known
        self.main = RANK in (-1, 0)
        self.stop_requested = False
        self.stop_after_epoch = False  # a callback may set it in on_epoch_end: training then ends cleanly (finish runs)
        self.resume_hint = True  # after Ctrl-C, print the --resume command (--evolve prints its own instead)

    # ================================================================== setup
    def setup(self) -> None:
        ddp.check_launch(self.cfg.device, self.cfg.sync_bn)
        self.device = self._init_device(self.cfg.device)
        self.governor = cpu_thread_governor() if self.device.type == "cpu" else None  # threads follow the CPU we get
        self.main = ddp.is_main()
        # global rank 0 decides the run (folder, resume point) and every rank receives the same decision
        cfg, self.ckpt = ddp.broadcast_object(self._plan_run() if self.main else None)
        self.data = load_data_config(cfg.data)
        ddp.check_batch(cfg.batch_size, WORLD_SIZE)
        if cfg.image_weights and WORLD_SIZE > 1:
            # each rank would draw its own weighted image list (its own RNG) and the DistributedSampler's split
            # of it would no longer cover the set once: off on every rank, said once
            if self.main:
                LOGGER.warning("WARNING: --image-weights is not supported under torchrun; training without it")
            cfg = cfg.replace(image_weights=False)
        self.cfg = cfg
        self.callbacks = self._with_tensorboard(cfg)
        self.hyp = dict(self.ckpt["hyp"]) if self.ckpt else load_hyp(cfg.hyp)
        self.names = ["item"] if cfg.single_cls else list(self.data.names)
        if self.ckpt:
            self._check_resumed_data()
        self.save_dir, self.wdir = Path(cfg.save_dir), Path(cfg.save_dir) / "weights"
        seed = cfg.seed + 1 + max(RANK, 0)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        self.model = self._build_model()
        # one decision for every rank: the ranks' models differ until DDP broadcasts rank 0's weights, and
        # ranks that disagreed would train with and without loss scaling while DDP averages their gradients
        passed = self._amp_ok() if cfg.amp is not False else False  # --no-amp: fp32 everywhere
        self.amp = ddp.all_true(passed)
        if passed and not self.amp:
            LOGGER.warning("WARNING: the AMP check failed on another rank; every rank trains in fp32")
        if cfg.batch_size == -1:  # autobatch: the largest batch within 60% of CUDA memory (printed)
            size = max_random_imgsz(self.imgsz, self.gs) if cfg.multi_scale else self.imgsz
            bs = auto_batch_size(self.model, size, self.device, loss_fn=DetectionLoss(self.model, self.hyp),
                                 world_size=WORLD_SIZE, amp=self.amp)
            self.cfg = cfg = cfg.replace(batch_size=bs)
        self._make_run_folder()
        self._build_loaders()
        self.cfg = cfg = self._batch_in_use(cfg)
        self._build_optimization()
        self._write_run_files()
        self.loss_fn = DetectionLoss(unwrap(self.model), self.hyp)
        self.val_loss_fn = DetectionLoss(unwrap(self.model), self.hyp)  # per rank: shards differ in length
        if LOCAL_RANK != -1:
            self.loss_fn.score_sum_fn = ddp.global_score_sum  # normalise by the global batch's score sum

    def _with_tensorboard(self, cfg: TrainConfig) -> list:
        return [TensorBoardLogger()] * cfg.tensorboard + self.user_callbacks

    def _check_resumed_data(self) -> None:
        """Before any step: the resumed model's classes must be the data's (an edited data YAML would
        otherwise fail, or train the wrong classes, only after an epoch)."""
        trained = [str(n) for n in self.ckpt.get("names") or []]
        nc = int(self.ckpt["model_yaml"].get("nc", len(trained)))
        if nc != len(self.names):
            raise UserError(f"{self.cfg.data}: {len(self.names)} classes now, but {self.cfg.resume} was trained on "
                            f"{nc} ({', '.join(trained[:10])}{' ...' if len(trained) > 10 else ''}); a run resumes "
                            f"on the classes it started with: restore the data YAML, or start a new run on this "
                            f"data with --weights {self.cfg.resume}")
        if trained and trained != [str(n) for n in self.names]:
            LOGGER.warning(f"WARNING: {self.cfg.data}: class names differ from the resumed run's "
                           f"({', '.join(trained[:10])}); training goes on with the class ids as they are")

    def _init_device(self, spec: str) -> torch.device:
        return ddp.process_device(spec)

    def _batch_in_use(self, cfg: TrainConfig) -> TrainConfig:
        """The config with the batch the loaders really use: a batch larger than the training set is clamped
        (one batch per epoch), and gradient accumulation and the weight-decay scaling must follow the clamped
        value, not the requested one (autobatch 1024 on 128 images would otherwise decay 16x too hard)."""
        per_rank = math.ceil(len(self.dataset) / WORLD_SIZE)  # what each rank's sampler yields per epoch
        used = min(cfg.batch_size, per_rank * WORLD_SIZE)
        if used < cfg.batch_size:
            LOGGER.warning(f"WARNING: --batch-size {cfg.batch_size} is larger than the {len(self.dataset)} training "
                           f"images; training with batch {used}")
            return cfg.replace(batch_size=used)
        return cfg

    def _plan_run(self) -> tuple[TrainConfig, dict | None]:
        """(config, checkpoint being resumed). After a torchelastic restart, the failed attempt's run folder
        and its newest last.pt (no flag needed); otherwise --resume or a new incremented folder."""
        cfg, folder = self.cfg, None
        if ddp.restart_count() > 0:
            folder = (Path(cfg.resume).resolve().parent.parent if cfg.resume not in ("", "last")
                      else ddp.restart_run_folder(Path(cfg.project) / cfg.name, cfg.exist_ok))
            if folder is not None and (folder / "weights" / "last.pt").is_file():
                LOGGER.info(f"Restart {ddp.restart_count()} of the worker group: continuing {folder}")
                cfg = cfg.replace(resume=str(folder / "weights" / "last.pt"))
        cfg, ck = resolve_config(cfg)
        cfg = cfg.with_defaults(load_data_config(cfg.data).train_defaults)
        if not ck:
            cfg = cfg.replace(save_dir=str(folder or increment_path(Path(cfg.project) / cfg.name, exist_ok=cfg.exist_ok)))
        return cfg, ck

    def _make_run_folder(self) -> None:
        if self.main:
            try:
                self.wdir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"{self.save_dir}: cannot create run folder ({e.strerror or e})") from None

    def _write_run_files(self) -> None:
        if not self.main:
            return
        try:
            (self.save_dir / "hyp.yaml").write_text(yaml.safe_dump(self.hyp, sort_keys=False))
            (self.save_dir / "opt.yaml").write_text(yaml.safe_dump(self.cfg.as_dict(), sort_keys=False))
        except OSError as e:
            raise UserError(f"{self.save_dir}: cannot write run files ({e.strerror or e})") from None
        LOGGER.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in self.hyp.items()))

    def _build_model(self) -> nn.Module:
        cfg, nc = self.cfg, len(self.names)
        if self.ckpt:
            model = model_from_checkpoint(self.ckpt, use_ema=False)
        elif cfg.weights:
            ck = load_checkpoint(cfg.weights)
            model = DetectionModel(cfg.cfg or ck["model_yaml"], nc=nc)
            exclude = ("anchor",) if (cfg.cfg or ck["model_yaml"].get("nc") == nc) else ()
            transfer_weights(model, {k: v.float() for k, v in (ck.get("ema") or ck["model"]).items()}, exclude,
                             source=str(cfg.weights), file_nc=ck["model_yaml"].get("nc"))
        else:
            model = DetectionModel(cfg.cfg, nc=nc)
        model.names = self.names
        freeze = [f"model.{x}." for x in (cfg.freeze if len(cfg.freeze) > 1 else range(cfg.freeze[0]))]
        for k, p in model.named_parameters():
            if any(k.startswith(f) for f in freeze):
                p.requires_grad_(False)
        if freeze and not any(p.requires_grad for p in model.parameters()):  # before any run folder is made
            n = len(model.model)
            raise UserError(f"--freeze {' '.join(map(str, cfg.freeze))}: that freezes every trainable layer of this "
                            f"{n}-layer model (layers 0..{n - 1}), leaving nothing to train; freeze fewer "
                            f"(e.g. --freeze 10 for the backbone of the YOLOv9/GELAN models)")
        if freeze:
            LOGGER.info(f"Froze {len(freeze)} layer(s)")
        self.gs = max(int(model.stride.max()), 32)
        self.imgsz = check_img_size(cfg.imgsz, self.gs)
        if self.main:
            model.info(imgsz=self.imgsz)
        # NHWC on every device: cuDNN's tensor-core and oneDNN's CPU convolutions both work in it, so no layout
        # reorders around each convolution (CPU: 1.08-1.21x per training step, benchmarks/results/layout.md)
        return model.to(self.device, memory_format=torch.channels_last)

    def _build_optimization(self) -> None:
        """Optimizer, LR schedule, EMA, AMP scaler, resumed state, then SyncBN/DDP wrapping."""
        cfg, hyp = self.cfg, self.hyp
        self.nbs = int(hyp.get("nbs", 64))  # nominal batch size (optional hyp key; upstream fixes 64)
        self.accumulate = max(round(self.nbs / cfg.batch_size), 1)
        choice = choose_optimizer(cfg.optimizer, len(self.dataset), cfg.batch_size, self.nbs, cfg.epochs, hyp,
                                  finetune=bool(cfg.weights) and not self.ckpt)
        if self.main:
            LOGGER.info(f"optimizer: {choice.name} lr0={choice.lr0} momentum={choice.momentum} "
                        f"warmup_bias_lr={choice.warmup_bias_lr} ({choice.reason})")
        # resolved once: opt.yaml, hyp.yaml and checkpoints keep the choice, so --resume never decides again
        self.cfg = cfg = cfg.replace(optimizer=choice.name)
        hyp.update(choice.hyp_updates())
        self.nw = warmup_iterations(hyp, self.nb, cfg.epochs)  # warmup iterations
        decay = hyp["weight_decay"] * cfg.batch_size * self.accumulate / self.nbs  # scaled here, never stored
        self.optimizer = build_optimizer(self.model, cfg.optimizer, hyp["lr0"], hyp["momentum"], decay)
        self.lf = lr_lambda(cfg.schedule, cfg.epochs, hyp["lrf"])
        self.ema = ModelEMA(self.model)  # on every rank: each validates its shard of the val set
        self.start_epoch, self.best_fitness = 0, 0.0
        if self.ckpt:
            self.optimizer.load_state_dict(self.ckpt["optimizer"])
            if self.ema and self.ckpt.get("ema"):
                self.ema.ema.load_state_dict({k: v.float() if v.is_floating_point() else v
                                              for k, v in self.ckpt["ema"].items()})
                self.ema.updates = int(self.ckpt.get("updates", 0))
            self.start_epoch, self.best_fitness = self.ckpt["epoch"] + 1, float(self.ckpt.get("best_fitness", 0.0))
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf,
                                                           last_epoch=self.start_epoch - 1)
        if cfg.sync_bn and LOCAL_RANK != -1:
            self.model = ddp.convert_sync_bn(self.model, self.device)
        self.amp_dtype = torch.float16 if self.amp else self._cpu_amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if LOCAL_RANK != -1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # torch.compile of the training forward (opt-in; warns and runs eager where unsupported); under DDP the
        # ranks agree on compiled or eager before the first step (`_agree_on_compile`)
        self.forward = CompiledForward(self.model) if cfg.compile else self.model
        self.compile_agreed = LOCAL_RANK == -1 or not isinstance(self.forward, CompiledForward)

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
        tol = 0.5 * max(1.0, float(a[:, :4].abs().max()) * 0.01)
        ok = bool(torch.isfinite(b).all()) and torch.allclose(a[:, :4], b[:, :4], atol=tol)
        LOGGER.info(f"AMP checks {'passed' if ok else 'failed, training in fp32'}")
        return ok

    def _cpu_amp_dtype(self) -> torch.dtype | None:
        """bf16 autocast for CPU training when asked (--amp) and the CPU has native bf16; else None (fp32).
        No gradient scaler: bf16 keeps fp32's exponent range."""
        if self.device.type != "cpu" or not cpu_bf16(bool(self.cfg.amp), "--amp"):
            return None
        if self.main:
            LOGGER.info("AMP: bfloat16 autocast on CPU (forward and backward; loss in fp32)")
        return torch.bfloat16

    def _build_loaders(self) -> None:
        cfg, data = self.cfg, self.data
        per_rank = cfg.batch_size // WORLD_SIZE
        common = dict(cache=cfg.cache, workers=cfg.workers, names=data.names, nc=data.nc, single_cls=cfg.single_cls,
                      pin_memory=self.device.type == "cuda")
        self.train_loader, self.dataset = create_dataloader(
            data.train, self.imgsz, per_rank, self.gs, hyp=self.hyp, augment=True, rect=cfg.rect, rank=ddp.rank(),
            image_weights=cfg.image_weights, shuffle=not cfg.rect, seed=cfg.seed, min_items=cfg.min_items,
            prefix="train: ", upstream=cfg.upstream_loader, **common)
        self.val_loader, _ = create_dataloader(data.val, self.imgsz, per_rank * 2, self.gs, hyp=self.hyp, augment=False,
                                               rect=True, rank=-1, pad=0.5, prefix="val: ",
                                               shard=(ddp.rank(), ddp.world_size()), **common)
        if self.main:
            if not self.ckpt and not cfg.noplots:
                labels = np.concatenate(self.dataset.labels, 0) if self.dataset.labels else np.zeros((0, 5))
                plot_labels(labels, self.names, self.save_dir)
        self.nb = len(self.train_loader)

    # ================================================================== the run
    def run(self) -> ValResult | None:
        self.setup()
        cfg = self.cfg
        self.csv_path = self.save_dir / "results.csv"
        if self.main:
            _truncate_results(self.csv_path, self.start_epoch)
        self.stopper = EarlyStopping(cfg.patience, best_fitness=self.best_fitness)
        self.nonfinite, self.last_opt_step, self.last_result = 0, -1, None
        prev_handler = signal.signal(signal.SIGINT, self._on_sigint) if self.main else None
        LOGGER.info(f"Image sizes {self.imgsz} train, {self.imgsz} val; {len(self.dataset)} train images, "
                    f"batch {cfg.batch_size} (accumulate {self.accumulate} -> nominal {self.nbs})\n"
                    f"Logging results to {self.save_dir}\n" + (f"Starting training for {cfg.epochs} epochs..."
                    if self.start_epoch < cfg.epochs else "Nothing left to train: finishing the run"))
        self._emit("on_train_start", self)
        t0, epoch = time.time(), self.start_epoch - 1
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                mloss = self.train_epoch(epoch)
                if self.end_epoch(epoch, mloss):
                    break
        except KeyboardInterrupt:
            if self.main:
                self._save(epoch - 1, "last.pt")
                if self.resume_hint:
                    LOGGER.info(f"\nInterrupted: saved {self.wdir / 'last.pt'}; continue with "
                                f"python train_dual.py --resume {self.wdir / 'last.pt'}")
            raise SystemExit(130)
        finally:
            if prev_handler is not None:
                signal.signal(signal.SIGINT, prev_handler)
            if self.governor is not None:
                self.governor.restore()
        if epoch >= self.start_epoch:
            LOGGER.info(f"\n{epoch - self.start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        try:
            return self.finish()
        except KeyboardInterrupt:
            if self.main and self.resume_hint:
                LOGGER.info(f"\nInterrupted while finishing: training itself is complete; strip best.pt, validate "
                            f"and plot with python train_dual.py --resume {self.wdir / 'last.pt'}")
            raise SystemExit(130)

    # ================================================================== one epoch
    def train_epoch(self, epoch: int) -> list[float]:
        """Train one epoch; returns the mean (box, cls, dfl) training losses."""
        cfg, model = self.cfg, self.model
        model.train()
        if epoch >= cfg.epochs - cfg.close_mosaic and self.dataset.mosaic:
            LOGGER.info("Closing dataloader mosaic")
            self.dataset.close_mosaic()
        if cfg.image_weights and self.last_result is not None:
            cw = self.dataset.class_weights() * (1 - np.asarray(self.last_result.maps)) ** 2 / max(len(self.names), 1)
            self.dataset.resample_image_weights(cw)
        if LOCAL_RANK != -1:
            self.train_loader.sampler.set_epoch(epoch)
        mloss, n_seen = torch.zeros(3, device=self.device), 0
        self.optimizer.zero_grad()
        LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "cls_loss", "dfl_loss", "Instances", "Size"))
        batches = enumerate(self.train_loader)
        pbar = tqdm(batches, total=self.nb, bar_format="{l_bar}{bar:10}{r_bar}") if self.main else batches
        for i, (imgs, targets, paths, _) in pbar:
            ni = i + self.nb * epoch
            imgs = imgs.to(self.device, non_blocking=True).float() / 255
            items = self.train_step(ni, epoch, imgs, targets, paths)
            if self.governor is not None:
                self.governor.step()
            if items is not None and self.main:
                mloss = (mloss * n_seen + items) / (n_seen + 1)
                n_seen += 1
                mem = f"{cuda_memory_gb(self.device):.3g}G"
                pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                    f"{epoch}/{cfg.epochs - 1}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1]))
                if ni < 3 and not cfg.noplots:
                    plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg", names=self.names)
            if self.stop_requested:
                raise KeyboardInterrupt
        self.lrs = [x["lr"] for x in self.optimizer.param_groups]
        with warnings.catch_warnings():  # an epoch whose steps were all skipped (non-finite loss) already warned
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        return mloss.tolist()

    def train_step(self, ni: int, epoch: int, imgs: torch.Tensor, targets: torch.Tensor,
                   paths: Sequence[str]) -> torch.Tensor | None:
        """Forward + loss + backward; an optimizer step every `accumulate` batches. None if the step was skipped."""
        if ni <= self.nw:
            self._warmup(ni, epoch)
        if self.cfg.multi_scale:
            imgs = multi_scale(imgs, self.imgsz, self.gs)
        imgs = imgs.contiguous(memory_format=torch.channels_last)
        # targets stay where the loader put them (the host): the loss pads them there and sends them once
        if not self.compile_agreed:
            self._agree_on_compile(imgs, targets)

        def forward_backward(forward) -> torch.Tensor | None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                pred = forward(imgs)
            loss, items = self.loss_fn(pred, targets)  # fp32: the assigner and DFL need the precision
            if not self._loss_is_finite(loss, epoch, ni, paths):
                return None
            if LOCAL_RANK != -1:
                loss = loss * WORLD_SIZE  # DDP averages gradients over ranks; this makes it the global-batch sum
            self.scaler.scale(loss).backward()
            return items

        # --compile: the backward compiles lazily at the first backward(); if it fails, the step runs again eager
        f = self.forward
        step_now = ni - self.last_opt_step >= self.accumulate
        # gradient accumulation under DDP: only the micro-batch that ends in an optimizer step all-reduces (the
        # gradients summed locally until then are reduced with it); the others skip DDP's reduction
        sync = self.model.no_sync() if LOCAL_RANK != -1 and not step_now else contextlib.nullcontext()
        with sync:
            items = f.with_fallback(forward_backward) if isinstance(f, CompiledForward) else forward_backward(f)
        if items is None:
            return None
        if step_now:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=GRAD_CLIP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            if self.ema:
                self.ema.update(self.model)
            self.last_opt_step = ni
        return items

    def _agree_on_compile(self, imgs: torch.Tensor, targets: torch.Tensor) -> None:
        """--compile under DDP, before the first step: every rank tries one compiled forward and backward on its
        first batch with DDP's reduction off (no_sync) and a loss that needs no other rank, throws the gradients
        away, and the ranks agree by all-reduce: compiled everywhere, or eager everywhere. Afterwards a compile
        failure is an error, never an eager retry (it would run outside the step the other ranks are in)."""
        self.compile_agreed = True
        f = self.forward
        local_loss = DetectionLoss(unwrap(self.model), self.hyp)  # this rank's own normaliser: no collective

        def step(forward) -> None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                pred = forward(imgs)
            local_loss(pred, targets)[0].backward()

        with self.model.no_sync():
            ok = f.probe(step)
        self.optimizer.zero_grad()
        if ddp.all_true(ok):
            f.fallback = False
            return
        if ok:
            warn_once("WARNING: torch.compile failed on another rank; every rank trains eager")
        self.forward = self.model

    def _warmup(self, ni: int, epoch: int) -> None:
        """Ramp accumulation, LRs (bias from warmup_bias_lr, others from 0) and momentum over nw iterations."""
        hyp, xi = self.hyp, [0, self.nw]
        self.accumulate = max(1, round(np.interp(ni, xi, [1, self.nbs / self.cfg.batch_size])))
        for j, g in enumerate(self.optimizer.param_groups):
            g["lr"] = float(np.interp(ni, xi, [hyp["warmup_bias_lr"] if j == 0 else 0.0, g["initial_lr"] * self.lf(epoch)]))
            if "momentum" in g:
                g["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))

    def _loss_is_finite(self, loss: torch.Tensor, epoch: int, ni: int, paths: Sequence[str]) -> bool:
        """Skip non-finite steps on every rank together; stop after MAX_NONFINITE in a row."""
        finite = torch.isfinite(loss).to(torch.float32)
        if LOCAL_RANK != -1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 1:
            self.nonfinite = 0
            return True
        self.nonfinite += 1
        self.optimizer.zero_grad()
        LOGGER.warning(f"WARNING: non-finite loss at epoch {epoch} batch {ni - self.nb * epoch} ({paths[0]} ...), "
                       f"step skipped ({self.nonfinite}/{MAX_NONFINITE} in a row)")
        if self.nonfinite >= MAX_NONFINITE:
            if self.main:
                self._save(epoch - 1, "last.pt")
            raise UserError(f"training stopped: the loss was not finite for {MAX_NONFINITE} steps in a row "
                            f"(try a lower lr0, check labels); last checkpoint kept at {self.wdir / 'last.pt'}")
        return False

    # ================================================================== end of epoch
    def end_epoch(self, epoch: int, mloss: list[float]) -> bool:
        """Validate, log, save, early-stop. Returns True when training should stop (same on every rank)."""
        stop, cfg = False, self.cfg
        final = epoch + 1 == cfg.epochs
        result = self._validate(self.ema.ema) if (not cfg.noval or final) else ValResult.empty(len(self.names))
        self.last_result = result  # every rank validated its shard; the gathered result is the same on all
        if self.main:
            fi = result.fitness
            self.best_fitness = max(self.best_fitness, fi)
            row = _append_results(self.csv_path, epoch, mloss, result, self.lrs)
            if not cfg.nosave or final:
                self._save(epoch, "last.pt")
                if self.best_fitness == fi:
                    self._save(epoch, "best.pt")
                if cfg.save_period > 0 and (epoch + 1) % cfg.save_period == 0:
                    self._save(epoch, f"epoch{epoch}.pt")
            self._emit("on_epoch_end", self, epoch, row)
            stop = self.stopper(epoch, fi) or self.stop_after_epoch
        if LOCAL_RANK != -1:
            flag = [stop]
            dist.broadcast_object_list(flag, 0)
            stop = flag[0]
        return stop

    # ================================================================== finish
    def finish(self) -> ValResult | None:
        """Strip best.pt, validate it with plots, draw results.png; tear down DDP."""
        result = self.last_result
        best, pending = self.wdir / "best.pt", self.wdir / FINISH_PENDING
        ck = None
        if self.main:
            pending.write_text(f"training ended; finishing (strip best.pt, final validation, plots) did not complete: "
                               f"python train_dual.py --resume {self.wdir / 'last.pt'}\n")
        if self.main and best.exists():
            strip_checkpoint(best)
            LOGGER.info(f"\nValidating {best}...")
            ck = load_checkpoint(best)
        ck = ddp.broadcast_object(ck)  # rank 0's file, so other nodes need no shared filesystem
        if ck is not None:
            result = self._validate(model_from_checkpoint(ck).to(self.device), plots=not self.cfg.noplots,
                                    verbose=True)
        if self.main:
            if not self.cfg.noplots:
                plot_results(self.csv_path)
            LOGGER.info(f"Results saved to {self.save_dir}")
            self._emit("on_train_end", self, result)
            pending.unlink(missing_ok=True)
        ddp.destroy()
        return result

    # ================================================================== helpers
    def _emit(self, event: str, *args) -> None:
        if self.main:
            for cb in self.callbacks:
                fn = getattr(cb, event, None)
                if fn is not None:
                    fn(*args)

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        LOGGER.info("\nStopping after this batch (Ctrl-C again to stop at once)...")

    def _validate(self, model: nn.Module, plots: bool = False, verbose: bool = False) -> ValResult:
        # AMP training validates under the same autocast (never model.half(): that would swap the BatchNorm
        # buffers of the EMA for new tensors, and the EMA's cached references would stop updating them)
        opts = ValOptions(single_cls=self.cfg.single_cls, save_dir=self.save_dir, plots=plots, verbose=verbose,
                          training=True, autocast=getattr(self, "amp_dtype", None))
        return Validator(opts, names=self.names, loss_fn=self.val_loss_fn).run(model, self.val_loader)

    def _save(self, epoch: int, name: str) -> None:
        ema = self.ema
        ck = make_checkpoint(unwrap(self.model), ema=ema.ema if ema else None, updates=ema.updates if ema else 0,
                             optimizer=self.optimizer, epoch=epoch, best_fitness=self.best_fitness,
                             opt=self.cfg.as_dict(), hyp=self.hyp, names=self.names)
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


def _append_results(path: Path, epoch: int, train_losses: list, r: ValResult, lrs: list) -> dict:
    """Append one results.csv row; returns it as {column: value} (what callbacks log)."""
    values = [*train_losses, r.mp, r.mr, r.map50, r.map, r.box, r.cls, r.dfl, *lrs]
    row = dict(zip(RESULT_COLUMNS, [epoch, *(float(v) for v in values)]))
    try:
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if not path.stat().st_size:
                w.writerow(RESULT_COLUMNS)
            w.writerow([epoch] + [f"{float(x):.6g}" for x in values])
    except OSError as e:
        raise UserError(f"{path}: cannot append results ({e.strerror or e})") from None
    return row


def train(opt: TrainConfig | argparse.Namespace, callbacks: Sequence[Callback] = ()) -> ValResult | None:
    try:
        return Trainer(opt, callbacks).run()
    except RuntimeError as e:  # includes torch.distributed.DistError
        err = ddp.lost_peer(e)
        if err is None:
            raise
        raise err from e
