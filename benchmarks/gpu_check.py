"""The prepared GPU check: every CUDA path of the project, run once on a real GPU, PASS/FAIL with numbers.

Made for a short loan (about 10 minutes with the machine's start): the whole run keeps to a 6-minute budget
(BUDGET_S, setup included), the steps come in order of value, each in its own process with its own time limit
(the limits add up to the budget, so no step starves the ones after it; a step may use what the ones before
it left unused, as torch.compile's cold start in the compile step needs), and gpu_check.md is rewritten after
every step, so a loan that ends early still leaves every finished step's result. Nothing is installed here:
bash benchmarks/run_gpu_speed.sh only says which packages are missing.

  train_amp      train_dual.py 2 epochs, AMP, --device 0, generated shapes set at 160 px: AMP check passed,
                 finite losses, best.pt
  predict        Predictor eager / --half / --cuda-graph capture (fp32, fp16), two passes (the second replays):
                 raw outputs equal eager of the same dtype (IoU per box, dtype tolerance), ms per image
  val            val_dual.py eager / --half / --cuda-graph capture (rect batches padded to 4 fixed shapes) and a
                 two-model ensemble: mAP and detections equal to eager within the dtype tolerance
  speed          benchmarks/bench_gpu.py --speed: batch-1 vs batch-16 per image, CUDA graph, training img/s
  torchrun       torchrun --nproc-per-node 1 (nccl): training with --sync-bn, sharded validation equal to one
                 process, and the --device / process-count mismatch as one line
  export         export.py TorchScript (fixed and --dynamic) and ONNX on CPU, then each file run on the GPU:
                 outputs equal the .pt model's
  autobatch      cuda_batch_size on a model: its parameters and BN buffers unchanged, batch printed, the
                 --multi-scale top size gives a smaller batch; train_dual.py --batch-size -1 clamps to the set
  compile        train_dual.py --compile (1 epoch, compiled, no eager fallback), then Predictor fp16 and a
                 val ensemble under --cuda-graph compile equal to eager (as far as the step's time allows)
  pytest_gpu     the GPU tests of tests/test_speed.py

Results: gpu_check.md and gpu_check.json (+ gpu_speed.md, logs/) under --out ($OUT from the shell script,
else benchmarks/results), and a one-screen PASS/FAIL/SKIP summary at the end. `--device cpu` runs the same
steps on CPU (GPU-only ones skipped) to check the script itself; `--dry-run` goes through the whole run, budget
accounting and reports included, with each step only checking its command lines against the real parsers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check_report import brief, print_summary, write_report  # noqa: E402

IMG = 160  # training / validation size of the tiny set
NAMES = ["circle", "rectangle", "triangle", "star", "cross"]
# Tolerances by dtype. fp16 steps are ~1e-3 of the image size (0.06-0.12 px at 100-160 px); fp32 convolutions
# run in TF32 on recent GPUs (cuDNN's default), whose 10-bit mantissa is fp16's, so fp32 is only a little tighter.
IOU_MIN = {"fp32": 0.995, "fp16": 0.99}  # per box
ATOL_REL = {"fp32": 1e-3, "fp16": 2e-3}  # per box coordinate, as a share of the image size
SCORE_TOL = {"fp32": 2e-3, "fp16": 1e-2}  # per class score
MAP_TOL = {"fp32": 0.01, "fp16": 0.02}  # |mAP50-95 - eager|; padded rect batches move edge boxes a little
BUDGET_S = 360  # the whole run, setup included: a 10-minute loan less the machine's start
SETUP_S = 15  # data generation and the environment line, before the first step


@dataclass
class Ctx:
    device: str  # "0" or "cpu"
    work: Path  # data, runs, exports
    out: Path  # results
    logs: Path

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def data(self) -> Path:
        return self.work / "data.yaml"

    def weights(self, run: str = "amp") -> Path:
        """best.pt of an earlier training step; a seeded checkpoint (random weights, head biased to give plenty of
        boxes above a low threshold) when that step failed or for run="seeded". Two training epochs on 64
        images detect next to nothing, so comparisons of detections use the seeded one."""
        w = self.work / "runs" / run / "weights" / "best.pt"
        if w.is_file():
            return w
        fallback = self.work / "seeded.pt"
        if not fallback.is_file():
            sys.path.insert(0, str(ROOT / "tests"))
            from helpers import seeded_tiny_checkpoint
            seeded_tiny_checkpoint(fallback, NAMES)
        return fallback


# ---------------------------------------------------------------- command lines (also checked by --dry-run)

def train_argv(ctx: Ctx, name: str, *extra: str, device: str | None = None) -> list[str]:
    return ["--cfg", "gelan-t.yaml", "--data", str(ctx.data), "--imgsz", str(IMG), "--batch-size", "16", "--epochs",
            "2", "--device", device or ctx.device, "--workers", "2", "--project", str(ctx.work / "runs"), "--name",
            name, "--exist-ok", "--noplots", "--no-tensorboard", *extra]


def val_argv(ctx: Ctx, weights: list[Path], name: str, *extra: str, batch: int = 2) -> list[str]:
    return ["--weights", *map(str, weights), "--data", str(ctx.data), "--imgsz", str(IMG), "--batch-size", str(batch),
            "--device", ctx.device, "--workers", "2", "--project", str(ctx.work / "val"), "--name", name,
            "--exist-ok", *extra]


def export_argv(weights: Path, *extra: str) -> list[str]:
    return ["--weights", str(weights), "--include", "torchscript", "onnx", "--imgsz", str(IMG), "--device", "cpu",
            *extra]


def torchrun(script: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port), script]


def speed_argv(ctx: Ctx) -> list[str]:
    return ["--speed", "--no-compile", "--models", "yolov9-c,yolov9-t", "--train-models", "yolov9-c", "--runs", "20",
            "--loader-workers", "8", "--device", ctx.device, "--md", str(ctx.out / "gpu_speed.md")]


def run_cli(ctx: Ctx, log: str, cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run a command from the repo root in its own process group (a timeout ends it and everything it
    started, so nothing keeps the GPU busy for the next step); output to logs/<log>.log and returned."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        text, _ = p.communicate(timeout=max(timeout, 1))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        text, _ = p.communicate()
        rc, text = 124, (text or "") + f"\nTIMEOUT after {timeout:.0f} s"
    (ctx.logs / f"{log}.log").write_text(" ".join(map(str, cmd)) + "\n" + text)
    return rc, text


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-n:])[-400:]


# ---------------------------------------------------------------- comparisons

def match_detections(ref: tuple, other: tuple, iou_min: float) -> dict:
    """Greedy one-to-one matching of two detection sets (boxes [n, 4] xyxy, classes [n]) by class and IoU.

    Returns matched, unmatched (on either side) and the smallest IoU among the matches. A raw coordinate
    tolerance would have to follow the dtype and the box size; IoU per matched box does both.
    """
    (ab, ac), (bb, bc) = (np.asarray(ref[0], float).reshape(-1, 4), np.asarray(ref[1])), \
        (np.asarray(other[0], float).reshape(-1, 4), np.asarray(other[1]))
    used = np.zeros(len(bb), bool)
    ious = []
    for box, c in zip(ab, ac):
        lt, rb = np.maximum(box[:2], bb[:, :2]), np.minimum(box[2:], bb[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), 1)
        union = np.prod(box[2:] - box[:2]) + np.prod(bb[:, 2:] - bb[:, :2], 1) - inter
        iou = np.where((bc == c) & ~used, inter / np.maximum(union, 1e-9), -1.0)
        j = int(iou.argmax()) if len(iou) else -1
        if j >= 0 and iou[j] >= iou_min:
            used[j] = True
            ious.append(float(iou[j]))
    matched = len(ious)
    return {"matched": matched, "unmatched": len(ab) + len(bb) - 2 * matched,
            "min_iou": round(min(ious), 5) if ious else None}


# ---------------------------------------------------------------- steps (each returns ok, numbers, note)

def step_train(ctx: Ctx, name: str, extra: tuple, timeout: float) -> tuple[bool, dict, str]:
    t0 = time.time()
    rc, text = run_cli(ctx, f"train_{name}", [sys.executable, "train_dual.py", *train_argv(ctx, name, *extra)], timeout)
    num: dict = {"seconds": round(time.time() - t0, 1), "rc": rc}
    csv = ctx.work / "runs" / name / "results.csv"
    if rc != 0 or not csv.is_file():
        return False, num, last_lines(text)
    import pandas as pd
    df = pd.read_csv(csv)
    df.columns = [c.strip() for c in df.columns]
    last = df.iloc[-1]
    num.update(epochs=len(df), box=round(float(last["train/box_loss"]), 4), cls=round(float(last["train/cls_loss"]), 4),
               map50=round(float(last["metrics/mAP_0.5"]), 4), map=round(float(last["metrics/mAP_0.5:0.95"]), 4))
    problems = []
    if not np.isfinite(df[["train/box_loss", "train/cls_loss", "train/dfl_loss"]].to_numpy(float)).all():
        problems.append("non-finite training loss")
    if not (ctx.work / "runs" / name / "weights" / "best.pt").is_file():
        problems.append("no best.pt")
    if ctx.gpu and "AMP checks passed" not in text:
        problems.append("AMP check did not pass (training in fp32)")
    if "--compile" in extra:
        num["compiled"] = "torch.compile failed" not in text and "new shapes run eager" not in text
        if not num["compiled"]:
            problems.append("fell back to eager: " + next(ln for ln in text.splitlines() if "torch.compile" in ln)[:200])
    return not problems, num, "; ".join(problems)


def step_autobatch(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    import torch

    from models.yolo import DetectionModel
    from utils.data import max_random_imgsz
    from utils.engine.train.autobatch import auto_batch_size
    from utils.loss import DetectionLoss
    from utils.torch_utils import select_device
    dev = select_device(ctx.device)
    torch.manual_seed(0)
    model = DetectionModel("gelan-t.yaml", nc=len(NAMES)).to(dev, memory_format=torch.channels_last).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = DetectionLoss(model, {})
    plain = auto_batch_size(model, 640, dev, loss_fn=loss, amp=ctx.gpu)
    multi = auto_batch_size(model, max_random_imgsz(640, 32), dev, loss_fn=loss, amp=ctx.gpu)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    grads = any(p.grad is not None for p in model.parameters())
    num = {"batch_640": plain, "batch_multi_scale_960": multi, "state_changed": len(changed), "grads_left": grads}
    problems = [f"{len(changed)} state entries changed, e.g. {changed[0]}"] if changed else []
    problems += ["gradients left on the model"] if grads else []
    if ctx.gpu and not 1 <= multi < plain:
        problems.append("the multi-scale batch is not smaller than the plain one")
    rc, text = run_cli(ctx, "train_autobatch", [sys.executable, "train_dual.py", *train_argv(
        ctx, "autobatch", "--batch-size", "-1", "--epochs", "1", "--noval")], max(timeout - 30, 30))
    num["cli_rc"] = rc
    line = next((ln.strip() for ln in text.splitlines() if "AutoBatch:" in ln), "")
    num["cli_autobatch"] = line[:200]
    if rc != 0:
        problems.append("train_dual.py --batch-size -1: " + last_lines(text))
    elif ctx.gpu and not ("AutoBatch:" in text and "training with batch 64" in text):
        problems.append("no AutoBatch line or no clamp to the 64 training images")
    return not problems, num, "; ".join(problems)


def compare_outputs(ref, out, dtype: str, imgsz: int = IMG) -> dict:
    """Raw head outputs [B, 4+nc, A] (xywh pixels, class scores) compared anchor by anchor, so no NMS tie can
    decide the outcome. A box passes when its coordinates are within the dtype's share of the image size or
    its IoU with the reference reaches the dtype's minimum (small boxes: the first, large ones: the second);
    scores within the dtype's tolerance. Returns ok, the worst IoU, the worst coordinate and score errors."""
    import torch

    from utils.boxes import bbox_iou
    a, b = ref.detach().float().cpu(), out.detach().float().cpu()
    if a.shape != b.shape:
        return {"ok": False, "shapes": [list(a.shape), list(b.shape)]}
    ba, bb = a[:, :4].transpose(1, 2), b[:, :4].transpose(1, 2)
    err = (ba - bb).abs().amax(-1)
    iou = bbox_iou(ba, bb, xywh=True)
    boxes_ok = bool(((err <= ATOL_REL[dtype] * imgsz) | (iou >= IOU_MIN[dtype])).all())
    score = float((a[:, 4:] - b[:, 4:]).abs().max()) if a.shape[1] > 4 else 0.0
    finite = bool(torch.isfinite(b).all())
    return {"ok": boxes_ok and score <= SCORE_TOL[dtype] and finite, "min_iou": round(float(iou.min()), 5),
            "max_px": round(float(err.max()), 4), "max_score": round(score, 5)}


def _raw(backend, x):
    import torch
    with torch.no_grad():
        return backend(x).float()


def _val_images(ctx: Ctx, n: int, size: tuple[int, int] | None = None):
    import cv2
    files = sorted((ctx.work / "ds" / "images" / "val").glob("*.jpg"))[:n]
    ims = [cv2.imread(str(f)) for f in files]
    return [cv2.resize(im, size) for im in ims] if size else ims


def step_export(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    import torch

    from utils.data import letterbox
    from utils.engine.backend import Backend
    from utils.torch_utils import select_device
    dev = select_device(ctx.device)
    w = ctx.work / "export" / "model.pt"
    w.parent.mkdir(exist_ok=True)
    shutil.copy(ctx.weights("seeded"), w)  # a seeded head: plenty of boxes to compare
    num, problems = {}, []
    for tag, extra in (("fixed", ()), ("dynamic", ("--dynamic",))):
        rc, text = run_cli(ctx, f"export_{tag}", [sys.executable, "export.py", *export_argv(w, *extra)], timeout / 3)
        if rc != 0:
            problems.append(f"export.py {tag}: {last_lines(text)}")
            continue
        size = (IMG, IMG) if tag == "fixed" else (IMG - 32, IMG + 32)  # dynamic: another size than traced
        ims = [letterbox(im, size, auto=False)[0] for im in _val_images(ctx, 4)]
        x = torch.from_numpy(np.stack(ims)[..., ::-1].transpose(0, 3, 1, 2).copy()).to(dev).float() / 255
        ref = _raw(Backend(w, dev), x)
        for fmt in ("torchscript", "onnx"):
            try:
                b = Backend(w.with_suffix(f".{fmt}"), dev)
                n = compare_outputs(ref, _raw(b, x), "fp32")
                n["runs_on"] = str(b.device) if fmt == "torchscript" else str(b.session.get_providers()[0])
            except Exception as e:  # noqa: BLE001 -- report and go on
                n = {"ok": False, "error": str(e).splitlines()[0][:200]}
            num[f"{fmt}_{tag}"] = n
            if not n["ok"]:
                problems.append(f"{fmt} {tag} on {dev}: {n}")
    return not problems, num, "; ".join(problems)


def _predict_variants(ctx: Ctx, variants: list[tuple[bool, str | None]], deadline: float) -> tuple[dict, list]:
    """Predictor end to end twice over the same images (the second pass replays the graphs), timed; and the raw
    outputs of each variant (half, --cuda-graph mode) against eager of the same dtype (fp16 eager against fp32
    too). Eager variants come first in `variants`: they are the references. Stops starting variants at
    `deadline` (what did not run is listed)."""
    import torch

    from utils.engine.predict.predictor import Predictor
    ims = _val_images(ctx, 6, (IMG, IMG - 32))  # one input shape
    num, problems, ref = {}, [], {}
    w = ctx.weights("seeded")
    for half, mode in variants:
        dtype = "fp16" if half else "fp32"
        tag = f"{dtype}_{mode or 'eager'}"
        if time.time() > deadline:
            num[tag] = {"not_run": "step time limit"}
            continue
        try:
            p = Predictor(w, device=ctx.device, imgsz=IMG, conf_thres=0.05, half=half, cuda_graph=mode)
            for _ in range(2):
                t0 = time.perf_counter()
                n_boxes = sum(len(p.predict(im)) for im in ims)
                ms = (time.perf_counter() - t0) / len(ims) * 1e3
            outs = [p.inference(p.preprocess(im)[0]) for im in ims]
            row: dict = {"ms_per_image": round(ms, 2), "boxes": n_boxes}
            g = p.backend.graph
            if mode and ctx.gpu:
                row["graph_active"] = g is not None and getattr(g, "active", True)
                problems += [] if row["graph_active"] else [f"{tag}: fell back to eager"]
            if mode is None:
                ref[half] = outs
            base = ref.get(False) if mode is None and half else ref.get(half) if mode else None
            if base is not None:
                cmp = [compare_outputs(a, b, dtype) for a, b in zip(base, outs)]
                row["vs"] = "fp32_eager" if mode is None else f"{dtype}_eager"
                row.update(ok=all(c["ok"] for c in cmp), min_iou=min(c["min_iou"] for c in cmp),
                           max_px=max(c["max_px"] for c in cmp), max_score=max(c["max_score"] for c in cmp))
                problems += [] if row["ok"] else [f"{tag} vs {row['vs']}: {row}"]
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            problems.append(f"{tag}: {row['error']}")
        num[tag] = row
        if ctx.gpu:
            torch.cuda.empty_cache()
    return num, problems


def step_predict(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    num, problems = _predict_variants(ctx, [(False, None), (True, None), (False, "capture"), (True, "capture")],
                                      time.time() + timeout)
    return not problems, num, "; ".join(problems)


def _val_predictions(ctx: Ctx, weights: list[Path], tag: str, extra: tuple, batch: int):
    """val_dual.py's own parsing and run, keeping each image's detections (original pixels)."""
    import val_dual

    from utils.engine.config import ValJob
    from utils.engine.validator import run_validation
    opt = vars(val_dual.parse_opt(val_argv(ctx, weights, tag, *extra, batch=batch)))
    return run_validation(ValJob.from_args({**opt, "return_predictions": True}))


def _match_predictions(a: dict, b: dict, iou_min: float, conf: float = 0.1) -> dict:
    """Detections (conf >= `conf`) of two validation runs matched image by image."""
    boxes = unmatched = 0
    ious = []
    for k, pa in a.items():
        pb = b.get(k, pa[:0])
        pa, pb = pa[pa[:, 4] >= conf], pb[pb[:, 4] >= conf]
        m = match_detections((pa[:, :4].numpy(), pa[:, 5].numpy()), (pb[:, :4].numpy(), pb[:, 5].numpy()), iou_min)
        boxes, unmatched = boxes + len(pa), unmatched + m["unmatched"]
        ious += [m["min_iou"]] if m["min_iou"] is not None else []
    return {"boxes": boxes, "unmatched": unmatched, "min_iou": min(ious) if ious else None}


# (run, reference, IoU per box, share of boxes allowed to differ, mAP50-95 tolerance)
VAL_PAIRS = (("fp16_eager", "fp32_eager", 0.9, 0.05, MAP_TOL["fp16"]),
             ("fp32_capture", "fp32_eager", 0.9, 0.15, MAP_TOL["fp32"]),
             ("fp16_capture", "fp16_eager", 0.9, 0.15, MAP_TOL["fp32"]),
             ("fp32_capture_b16", "fp32_eager_b16", IOU_MIN["fp32"], 0.01, MAP_TOL["fp32"]),
             ("ensemble_compile", "ensemble_eager", IOU_MIN["fp16"], 0.01, MAP_TOL["fp32"]))


def _val_runs(ctx: Ctx, runs: dict, deadline: float) -> tuple[dict, list]:
    """Each validation run of `runs` ({tag: (weights, extra flags, batch)}, references first), then every pair
    of VAL_PAIRS whose two runs both ran compared. Runs are not started past `deadline`."""
    num, preds, problems = {}, {}, []
    for tag, (weights, extra, batch) in runs.items():
        if time.time() > deadline:
            num[tag] = {"not_run": "step time limit"}
            continue
        try:
            r = _val_predictions(ctx, weights, tag, extra, batch)
            num[tag] = {"map50": round(r.map50, 4), "map": round(r.map, 4), "seen": r.seen}
            preds[tag] = r.predictions
        except Exception as e:  # noqa: BLE001
            num[tag] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            problems.append(f"{tag}: {num[tag]['error']}")
    for tag, base, iou, share, tol in VAL_PAIRS:
        if tag not in preds or base not in preds:
            continue
        m = _match_predictions(preds[base], preds[tag], iou)
        num[tag].update(vs=base, map_diff=round(num[tag]["map"] - num[base]["map"], 4), **m)
        if (m["boxes"] == 0 or m["unmatched"] > share * m["boxes"] or abs(num[tag]["map_diff"]) > tol
                or num[tag]["seen"] != num[base]["seen"]):
            problems.append(f"{tag} vs {base}: {num[tag]}")
    return num, problems


def step_val(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    """Batch 2: the val set's 6 aspect ratios give 6 rect batch shapes, which --cuda-graph pads to 4 (grey at the
    bottom/right, so boxes near those edges may move: a looser comparison). Batch 16: one shape, no padding, so
    graphs must equal eager closely. The seeded checkpoint gives plenty of boxes to compare."""
    w, trained = ctx.weights("seeded"), ctx.weights("amp")
    runs = {"fp32_eager": ([w], (), 2), "fp16_eager": ([w], ("--half",), 2),
            "fp32_capture": ([w], ("--cuda-graph", "capture"), 2), "fp16_capture": ([w], ("--half", "--cuda-graph"), 2),
            "fp32_eager_b16": ([w], (), 16), "fp32_capture_b16": ([w], ("--cuda-graph",), 16),
            "ensemble_eager": ([w, trained], (), 16)}
    num, problems = _val_runs(ctx, runs, time.time() + timeout)
    return not problems, num, "; ".join(problems)


def step_compile(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    """torch.compile last (minutes per shape on a cold cache): training compiled for 1 epoch, then what time is
    left for Predictor fp16 and a two-model val ensemble under --cuda-graph compile (reduce-overhead) against
    eager; the ensemble runs at batch 16 (one shape: one compilation)."""
    t0 = time.time()
    deadline = t0 + timeout - 5
    ok, num, note = step_train(ctx, "compile", ("--compile", "--epochs", "1", "--noval"), timeout * 0.6)
    problems = [note] if not ok else []
    pnum, pprob = _predict_variants(ctx, [(True, None), (True, "compile")], deadline)
    num["predict"] = pnum
    w, trained = ctx.weights("seeded"), ctx.weights("amp")
    vnum, vprob = _val_runs(ctx, {"ensemble_eager": ([w, trained], (), 16),
                                  "ensemble_compile": ([w, trained], ("--cuda-graph", "compile"), 16)}, deadline)
    num["val"] = vnum
    problems += pprob + vprob
    return not problems, num, "; ".join(problems)


def error_lines(text: str, needle: str) -> tuple[int, bool]:
    """(how many times the program printed its one-line error containing `needle`, whether torchrun's failure
    summary carries it). Rank 0 prints `ERROR: ...`; torchrun's summary repeats it as `traceback : ERROR: ...`,
    which is not the program printing it twice."""
    lines = [ln.strip() for ln in text.splitlines()]
    printed = sum(ln.startswith("ERROR:") and needle in ln for ln in lines)
    return printed, any(ln.startswith("traceback :") and "ERROR:" in ln and needle in ln for ln in lines)


def step_torchrun(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    num, problems = {}, []
    t0 = time.time()
    rc, text = run_cli(ctx, "torchrun_train", torchrun("train_dual.py", 29541) + train_argv(
        ctx, "ddp", "--epochs", "1", "--sync-bn"), timeout * 0.45)
    num["train_rc"], num["train_s"] = rc, round(time.time() - t0, 1)
    if rc != 0 or not (ctx.work / "runs" / "ddp" / "weights" / "best.pt").is_file():
        problems.append("torchrun training: " + last_lines(text))
    rc, text = run_cli(ctx, "torchrun_mismatch", torchrun("train_dual.py", 29542) + train_argv(
        ctx, "mismatch", "--epochs", "1", device="0,1"), timeout * 0.2)
    hits, summary = error_lines(text, "names 2 GPU(s) but torchrun started 1 process(es)")
    num["mismatch"] = {"rc": rc, "lines": hits, "in_summary": summary}
    if rc == 0 or hits != 1 or not summary:
        problems.append(f"--device 0,1 with one process: rc {rc}, message printed {hits} time(s), "
                        f"{'' if summary else 'not '}in torchrun's failure summary")
    w = ctx.weights("seeded")  # plenty of boxes, so the metrics compared are not all zero
    out = {}
    for tag, prefix in (("single", [sys.executable, "tests/ddp_driver.py"]), ("sharded", torchrun("tests/ddp_driver.py", 29543))):
        f = ctx.work / f"val_{tag}.json"
        rc, text = run_cli(ctx, f"torchrun_val_{tag}", prefix + ["val", str(f)] + val_argv(ctx, [w], f"ddp_{tag}"),
                           timeout * 0.15)
        out[tag] = json.loads(f.read_text()) if rc == 0 and f.is_file() else None
        if out[tag] is None:
            problems.append(f"{tag} validation: {last_lines(text)}")
    if out.get("single") and out.get("sharded"):
        diff = {k: abs(out["single"][k] - out["sharded"][k]) for k in ("mp", "mr", "map50", "map")}
        num["val_single_vs_sharded_maxdiff"] = max(diff.values())
        if max(diff.values()) > 1e-6 or out["single"]["seen"] != out["sharded"]["seen"]:
            problems.append(f"sharded validation differs from one process: {diff}")
    return not problems, num, "; ".join(problems)


def step_speed(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    rc, text = run_cli(ctx, "speed", [sys.executable, "benchmarks/bench_gpu.py", *speed_argv(ctx)], timeout)
    md = ctx.out / "gpu_speed.md"
    rows = [ln for ln in md.read_text().splitlines() if ln.startswith("| yolov9")] if md.is_file() else []
    return rc == 0 and bool(rows), {"rc": rc, "rows": rows}, "" if rc == 0 else last_lines(text)


def step_pytest(ctx: Ctx, timeout: float) -> tuple[bool, dict, str]:
    rc, text = run_cli(ctx, "pytest_gpu", [sys.executable, "-m", "pytest", "-q", "tests/test_speed.py", "-k", "gpu",
                                           "-p", "no:cacheprovider"], timeout)
    tail = last_lines(text, 1)
    return rc == 0 and "skipped" not in tail, {"rc": rc, "summary": tail}, "" if rc == 0 else last_lines(text, 6)


# name: (function, extra args, time limit s, GPU only), in order of value: what a loan must not go without first.
# The limits add up to BUDGET_S - SETUP_S (tests/test_benchmarks.py checks it), so every step gets its full limit;
# a step may also use what the steps before it left unused, never what the steps after it are owed.
STEPS = {
    "train_amp": (step_train, ("amp", ()), 45, False),
    "predict": (step_predict, (), 35, False),
    "val": (step_val, (), 35, False),
    "speed": (step_speed, (), 80, True),
    "torchrun": (step_torchrun, (), 55, False),
    "export": (step_export, (), 25, False),
    "autobatch": (step_autobatch, (), 25, False),
    "compile": (step_compile, (), 30, True),
    "pytest_gpu": (step_pytest, (), 15, True),
}
STEP_MARGIN_S = 5  # of its limit, a step keeps this much for writing its result before the orchestrator's kill
_now = time.time  # the orchestrator's clock (a test replaces it)


def run_one(name: str, ctx: Ctx, timeout: float, result: Path) -> None:
    """One step in this process; its outcome goes to `result` (JSON)."""
    fn, args, _, _ = STEPS[name]
    try:
        ok, num, note = fn(ctx, *args, timeout) if args else fn(ctx, timeout)
    except Exception as e:  # noqa: BLE001 -- a failing step is a result, not a crash
        ok, num, note = False, {}, f"{type(e).__name__}: {e}"
        (ctx.logs / f"{name}.traceback.log").write_text(traceback.format_exc())
    result.write_text(json.dumps({"ok": bool(ok), "numbers": num, "note": note}, default=str))


# ---------------------------------------------------------------- orchestration

def make_data(work: Path) -> None:
    """64 training and 16 validation images; the validation images get 6 different aspect ratios, so
    rectangular batches come in several shapes."""
    import cv2
    import yaml

    from utils.data import generate_shapes
    generate_shapes(work / "ds", n_train=64, n_val=16, seed=3)
    for i, f in enumerate(sorted((work / "ds" / "images" / "val").glob("*.jpg"))):
        im = cv2.imread(str(f))
        cv2.imwrite(str(f), cv2.resize(im, [(160, 90), (120, 160), (160, 128), (100, 160), (160, 60), (70, 160)][i % 6]))
    (work / "data.yaml").write_text(yaml.safe_dump({"path": str(work / "ds"), "train": "images/train",
                                                    "val": "images/val", "names": NAMES}))


def environment(device: str) -> dict:
    import torch
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": "CPU"}
    if device != "cpu" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(int(device))
    return env


def step_commands(ctx: Ctx, name: str) -> list[tuple[str, Callable, list[str]]]:
    """(label, parser, argv) of every command line step `name` runs, for --dry-run."""
    import export
    import train_dual
    import val_dual
    from benchmarks import bench_gpu
    w = ctx.work / "w.pt"
    return {
        "train_amp": [("train_dual.py", train_dual.parse_opt, train_argv(ctx, "amp"))],
        "val": [("val_dual.py", val_dual.parse_opt, val_argv(ctx, [w], "v", "--half", "--cuda-graph", "capture"))],
        "speed": [("bench_gpu.py --speed", bench_gpu.parse_opt, speed_argv(ctx))],
        "torchrun": [("torchrun train_dual.py", train_dual.parse_opt, train_argv(ctx, "ddp", "--epochs", "1", "--sync-bn")),
                     ("torchrun val_dual.py", val_dual.parse_opt, val_argv(ctx, [w], "ddp"))],
        "export": [("export.py", export.parse_opt, export_argv(w)),
                   ("export.py --dynamic", export.parse_opt, export_argv(w, "--dynamic"))],
        "autobatch": [("train_dual.py autobatch", train_dual.parse_opt,
                       train_argv(ctx, "a", "--batch-size", "-1", "--epochs", "1", "--noval"))],
        "compile": [("train_dual.py --compile", train_dual.parse_opt,
                     train_argv(ctx, "compile", "--compile", "--epochs", "1", "--noval")),
                    ("val_dual.py ensemble", val_dual.parse_opt, val_argv(ctx, [w, w], "v", "--cuda-graph", "compile"))],
    }.get(name, [])


def dry_step(ctx: Ctx, name: str) -> tuple[bool, dict, str]:
    """A step of --dry-run: its command lines checked by the scripts' own parsers and the scripts it starts
    found; nothing runs."""
    bad, n = [], 0
    for label, parse, argv in step_commands(ctx, name):
        n += 1
        try:
            parse(argv)
        except SystemExit:
            bad.append(f"{label}: {' '.join(argv)}")
    if name == "predict":  # the Python API: the keywords the step passes
        import inspect

        from utils.engine.predict.predictor import Predictor
        n += 1
        try:
            inspect.signature(Predictor).bind("w.pt", device=ctx.device, imgsz=IMG, conf_thres=0.05, half=True,
                                              cuda_graph="capture")
        except TypeError as e:
            bad.append(f"Predictor(...): {e}")
    scripts = {"speed": "benchmarks/bench_gpu.py", "torchrun": "tests/ddp_driver.py", "pytest_gpu": "tests/test_speed.py"}
    if name in scripts and not (ROOT / scripts[name]).is_file():
        bad.append(f"missing {scripts[name]}")
    return not bad, {"command_lines": n}, "; ".join(bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The prepared GPU check (see the module docstring)")
    ap.add_argument("--device", default="0", help="GPU index, or cpu to check the script itself")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run, setup included")
    ap.add_argument("--only", default="", help="comma list of steps to run")
    ap.add_argument("--slow", type=float, default=1.0, help="multiply every time limit (a loaded CPU checking the script)")
    ap.add_argument("--dry-run", action="store_true", help="the whole run with each step only checking its command lines")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    opt = ap.parse_args(argv)
    out = Path(opt.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if opt.step:
        ctx = Ctx(str(opt.device), Path(opt.work), out, out / "gpu_check_logs")
        run_one(opt.step, ctx, opt.timeout, Path(opt.result))
        return 0
    names = [n for n in (opt.only.split(",") if opt.only else STEPS) if n]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        ap.error(f"--only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    budget = opt.budget * opt.slow
    t_start = _now()
    work = Path(opt.work) if opt.work else Path("<work>") if opt.dry_run else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Ctx(str(opt.device), work, out, out / "gpu_check_logs")
    if opt.dry_run:
        env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": "-", "cuda": "-",
               "device": "dry run (command lines only)"}
    else:
        ctx.logs.mkdir(exist_ok=True)
        make_data(work)
        env = environment(ctx.device)
    planned = sum(STEPS[n][2] for n in names) * opt.slow
    print(f"GPU check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}); work folder {work}\n"
          f"budget {budget:.0f} s: setup {_now() - t_start:.0f} s, step limits {planned:.0f} s "
          f"({', '.join(names)})", flush=True)
    results: dict[str, dict] = {}
    stem = "gpu_check_dry_run" if opt.dry_run else "gpu_check"  # a dry run never overwrites a GPU run's report
    deadline = t_start + budget
    for i, name in enumerate(names):
        _, _, limit, gpu_only = STEPS[name]
        limit *= opt.slow
        left = deadline - _now()
        owed = sum(STEPS[n][2] for n in names[i + 1:] if not (STEPS[n][3] and not ctx.gpu)) * opt.slow
        t0 = _now()
        if opt.dry_run:
            ok, num, note = dry_step(ctx, name)
            results[name] = {"status": "PASS" if ok else "FAIL", "seconds": round(_now() - t0, 1), "ok": ok,
                             "numbers": {**num, "limit_s": limit}, "note": note}
        elif gpu_only and not ctx.gpu:
            results[name] = {"status": "SKIP", "note": "needs a GPU"}
        elif left < min(limit, 15):
            results[name] = {"status": "SKIP", "note": f"time budget spent ({budget:.0f} s)"}
        else:
            timeout = min(left, max(limit, left - owed))  # its limit, plus what earlier steps left unused
            f = work / f"{name}.json"
            cmd = [sys.executable, __file__, "--step", name, "--device", ctx.device, "--out", str(out), "--work",
                   str(work), "--timeout", f"{max(timeout - STEP_MARGIN_S, 1):.0f}", "--result", str(f)]
            rc, text = run_cli(ctx, f"step_{name}", cmd, timeout)
            r = json.loads(f.read_text()) if f.is_file() else {"ok": False, "numbers": {"rc": rc}, "note": last_lines(text)}
            results[name] = {"status": "PASS" if r["ok"] else "FAIL", "seconds": round(_now() - t0, 1), **r}
        r = results[name]
        print(f"{r['status']:4s}  {name:12s} {r.get('seconds', 0):5.0f} s  {brief(name, r)[:110]}"
              + (f"\n      {r['note'][:300]}" if r.get("note") else ""), flush=True)
        write_report(out, env, results, _now() - t_start, pending=names[i + 1:], budget_s=budget, stem=stem)
    total = _now() - t_start
    write_report(out, env, results, total, budget_s=budget, stem=stem)
    print_summary(env, results, total, budget, out / f"{stem}.md")
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
