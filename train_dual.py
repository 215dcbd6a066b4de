"""Train a YOLOv9 (dual head) or GELAN (single head) detector.

python train_dual.py                      # default: yolov9-t-MMQA on the bundled synthetic shapes dataset
python train_dual.py --data my.yaml --cfg yolov9-c-MMQA-P4P5.yaml --epochs 100 --img 640 --batch-size 16
torchrun --nproc_per_node 2 train_dual.py --device cpu ...   # distributed (gloo on CPU, nccl on CUDA)
python train_dual.py --data my.yaml --epochs 30 --evolve 100   # hyperparameter search -> runs/evolve/exp
"""
from __future__ import annotations

import argparse

from utils.general import cli


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=str, default="", help="initial weights path (matching layers are transferred)")
    p.add_argument("--cfg", type=str, default="", help="model YAML (default yolov9-t-MMQA.yaml unless --weights)")
    p.add_argument("--data", type=str, default="data/shapes.yaml", help="dataset YAML")
    p.add_argument("--hyp", type=str, default=None, help="hyperparameters YAML (default: data YAML train_defaults, "
                                                         "else data/hyps/hyp.scratch-high.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (default: data YAML train_defaults, else 100)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="total batch size for all GPUs (default 16); -1: autobatch, the largest batch within 60%% of "
                        "CUDA memory (single GPU)")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None, help="train/val image size in pixels (default 640)")
    p.add_argument("--rect", action="store_true", help="rectangular training")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume the newest (or given) last.pt")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate the final epoch")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument("--cache", type=str, nargs="?", const="ram", default=None, help="cache images in 'ram' (default) or 'disk'")
    p.add_argument("--upstream-loader", action="store_true",
                   help="upstream YOLOv9's training data pipeline: full-size decodes, 4 freshly decoded images per "
                        "mosaic (default: reduced JPEG decode, partners from a per-worker buffer)")
    p.add_argument("--image-weights", action="store_true", help="weighted image selection for training")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument("--optimizer", type=str, choices=["auto", "SGD", "Adam", "AdamW"], default="auto",
                   help="auto: AdamW for short schedules (< 10k optimizer steps), else upstream SGD; "
                        "SGD: upstream's exact recipe (hyp file values)")
    p.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per rank in DDP mode)")
    p.add_argument("--project", default="runs/train", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--quad", action="store_true", help="(accepted for compatibility; no effect)")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    p.add_argument("--flat-cos-lr", action="store_true", help="flat then cosine LR scheduler")
    p.add_argument("--fixed-lr", action="store_true", help="fixed LR")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="(accepted for compatibility; no effect)")
    p.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: backbone=10, first3=0 1 2")
    p.add_argument("--save-period", type=int, default=-1, help="save checkpoint every x epochs (disabled if < 1)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="(set by torchrun; read from LOCAL_RANK)")
    p.add_argument("--min-items", type=int, default=0, help="drop training images with fewer labels")
    p.add_argument("--close-mosaic", type=int, default=None, help="disable mosaic for the final N epochs")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard event files into the run folder (--no-tensorboard: off)")
    p.add_argument("--evolve", type=int, nargs="?", const=300, default=None,
                   help="search hyperparameters for N trials (default 300) with Optuna; continue a study with "
                        "the same --project/--name and --exist-ok")
    p.add_argument("--evolve-prune", choices=["on", "off"], default="on",
                   help="stop trials whose per-epoch fitness trails the others (median pruner)")
    p.add_argument("--evolve-plots", action="store_true", help="keep plots and TensorBoard files of every trial")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: fp16 autocast on CUDA (after a check), bf16 autocast on CPUs with native "
                        "bf16 (AVX512-BF16/AMX/ARM BF16); default: on for CUDA and off for CPU; --no-amp: fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (first steps compile; warns and runs eager if unsupported)")
    opt = p.parse_args(argv)
    if opt.batch_size is not None and opt.batch_size < 1 and opt.batch_size != -1:
        p.error(f"--batch-size {opt.batch_size}: give a positive batch size, or -1 for autobatch")
    if not opt.cfg and not opt.weights and not opt.resume:
        opt.cfg = "yolov9-t-MMQA.yaml"
    return opt


@cli
def main(argv: list[str] | None = None) -> dict:
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import train
    opt = parse_opt(argv)
    if opt.evolve is not None:
        from utils.engine.train.evolve import evolve
        return evolve(TrainConfig.from_args(opt), opt.evolve, prune=opt.evolve_prune == "on",
                      trial_plots=opt.evolve_plots)
    return train(TrainConfig.from_args(opt))


if __name__ == "__main__":
    main()
