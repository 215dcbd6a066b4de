"""GPU cost of the model zoo under AMP: forward latency at 640 (batch 1 and 16), peak CUDA memory,
which SDPA kernel runs (forward and backward), and AMP training images/s at 640 batch 8.

Why: on a GPU the faithful Mobile MQA model's 2.1 TFLOPs of attention per image land on fused
flash/memory-efficient kernels; this script shows what that costs next to yolov9-c and the cheap
variants, and proves which kernel ran (torch.profiler op names), measured side by side in one process.

Latency = median of CUDA-event-timed forwards of the fused eval model after warm-up (fp32 weights,
fp16 autocast = AMP). Peak MiB = torch.cuda.max_memory_allocated during the timed forwards minus the
memory held before them (weights and input). Training = AMP forward + DetectionLoss + backward +
GradScaler SGD step on random images and targets.

Every model is timed as detect, val and training run it: channels_last (NHWC) weights, and NHWC images in
training.

--speed runs the speed tables instead: batch-1 fp16 latency eager vs CUDA-graph replay
(utils/engine/graphs.GraphRunner) vs torch.compile(mode="reduce-overhead") next to the batch-16 per-image
time, with the max |graph - eager| output difference; and AMP training img/s at batch 8 vs the autobatch
size (utils/engine/autobatch, 60% of memory) with and without torch.compile, next to the data loader's img/s
(mosaic at 640, --loader-workers) so the loader is never a hidden bottleneck.

Usage (needs a CUDA device):
    python benchmarks/bench_gpu.py [--models yolov9-c,...] [--train-models ...] [--md out.md] [--json out.json]
        [--csv out.csv]
    python benchmarks/bench_gpu.py --speed [--models ...] [--train-models ...] [--md benchmarks/results/gpu_speed.md]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import random_targets, write_md  # noqa: E402

LATENCY_MODELS = ["yolov9-c", "gelan-c", "yolov9-c-MMQARepNCSPELAN4", "yolov9-c-MMQA-P4P5", "yolov9-c-MMQA-P4P5-kv4",
                  "yolov9-c-MMQA-P3P4P5", "yolov9-t", "yolov9-t-MMQA"]
TRAIN_MODELS = ["yolov9-c", "yolov9-c-MMQARepNCSPELAN4", "yolov9-c-MMQA-P4P5"]
SEED = "yolov9-c-MMQARepNCSPELAN4"


def _build(name: str, device, train: bool = False):
    """The model as detect, val and training run it: channels_last (NHWC) weights, fused for inference."""
    import torch
    from models.yolo import DetectionModel
    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml")
    model = model.train() if train else model.eval().fuse()
    return model.to(device, memory_format=torch.channels_last)  # after fusing: fused weights are new tensors


def forward_cost(model, batch: int, imgsz: int, amp: bool, warmup: int, runs: int) -> dict:
    """Median CUDA-event latency (ms) and peak activation memory (MiB) of repeated forwards."""
    import torch
    device = next(model.parameters()).device
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "peak_mib": (torch.cuda.max_memory_allocated(device) - held) / 2**20,
            "runs": runs}


def train_cost(model, batch: int, imgsz: int, warmup: int, steps: int, channels_last: bool = True,
               forward=None) -> dict:
    """AMP training images/s and peak memory (MiB, weights included) of a full optimizer step.

    channels_last: NHWC images, as the trainer feeds them (the model is NHWC from `_build`); forward: e.g. a
    compiled model.
    """
    import torch
    from utils.loss import DetectionLoss
    device = next(model.parameters()).device
    loss_fn = DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    imgs = torch.rand(batch, 3, imgsz, imgsz, device=device)
    if channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    targets = random_targets(batch, model.nc).to(device)
    fwd = forward or model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss, _ = loss_fn(fwd(imgs), targets)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return {"img_s": batch * steps / (start.elapsed_time(end) / 1000), "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "batch": batch, "steps": steps, "step": step}


def sdpa_ops(fn) -> dict:
    """Profiler names of the SDPA ops and attention CUDA kernels that one call of fn executes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    events = prof.key_averages()
    ops = sorted({e.key for e in events if e.key.startswith("aten::") and ("scaled_dot_product" in e.key or "attention" in e.key)})
    kernels = sorted({e.key for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                      and any(h in e.key.lower() for h in ("flash", "fmha", "attention", "attn"))})
    return {"ops": ops, "kernels": [k[:90] for k in kernels]}


def _median_ms(fn, x, warmup: int, runs: int) -> float:
    import torch
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize(x.device)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_latency(name: str, device, imgsz: int, runs: int, compile_: bool = True) -> dict:
    """fp16 (--half) batch-1 latency: eager, CUDA-graph replay, torch.compile reduce-overhead; b16 per image."""
    import torch
    from utils.engine.graphs import CompiledForward, GraphRunner, main_output
    model = _build(name, device).half()
    fn = main_output(model)
    x1 = torch.rand(1, 3, imgsz, imgsz, device=device).half()
    x16 = torch.rand(16, 3, imgsz, imgsz, device=device).half()
    row: dict = {"model": name}
    with torch.inference_mode():
        row["eager_b1"] = _median_ms(fn, x1, 5, runs)
        row["eager_b16_per_img"] = _median_ms(fn, x16, 3, max(runs // 3, 5)) / 16
        ref = fn(x1).float()
        runner = GraphRunner(fn, capture_after=1)
        row["graph_b1"] = _median_ms(runner, x1, 3, runs)
        row["graph_maxdiff"] = float((runner(x1).float() - ref).abs().max())
        try:
            if not compile_:
                raise RuntimeError("skipped (--no-compile)")
            comp = CompiledForward(fn, mode="reduce-overhead")
            t0 = time.perf_counter()
            comp(x1), comp(x1), comp(x1)
            row["compile_s"] = time.perf_counter() - t0
            row["compile_b1"] = _median_ms(comp, x1, 3, runs) if comp.active else None
            row["compile_maxdiff"] = float((comp(x1).float() - ref).abs().max()) if comp.active else None
        except Exception as e:  # noqa: BLE001 -- report, keep the table
            row["compile_b1"], row["compile_error"] = None, str(e).splitlines()[0][:120]
    del model, runner
    torch.cuda.empty_cache()
    return row


def train_speed(name: str, device, imgsz: int, base_batch: int, steps: int, compile_: bool = True) -> dict:
    """AMP training img/s (channels_last, as the trainer runs): at base_batch, and at the autobatch size eager and
    compiled."""
    import torch
    from utils.engine.train.autobatch import cuda_batch_size
    from utils.engine.graphs import CompiledForward
    from utils.loss import DetectionLoss
    row: dict = {"model": name}
    model = _build(name, device, train=True)
    row["base"] = {k: v for k, v in train_cost(model, base_batch, imgsz, warmup=3, steps=steps).items() if k != "step"}
    ab = cuda_batch_size(model, imgsz, device, 0.6, loss_fn=DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5}))
    row["autobatch"] = {"batch": ab.batch, "summary": ab.summary()}
    row["cl_auto"] = {k: v for k, v in train_cost(model, ab.batch, imgsz, warmup=3, steps=steps, channels_last=True).items()
                      if k != "step"}
    try:
        if not compile_:
            raise RuntimeError("skipped (--no-compile)")
        fwd = CompiledForward(model)
        t0 = time.perf_counter()
        res = train_cost(model, ab.batch, imgsz, warmup=3, steps=steps, channels_last=True, forward=fwd)
        row["compile_auto"] = {k: v for k, v in res.items() if k != "step"}
        row["compile_auto"]["active"] = fwd.active
        row["compile_auto"]["total_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        row["compile_auto"] = {"error": str(e).splitlines()[0][:120]}
    del model
    torch.cuda.empty_cache()
    return row


def speed_main(opt, device, env: dict) -> list[str]:
    """The --speed tables (see the module docstring)."""
    import yaml
    from benchmarks.bench_data import bench as loader_throughput
    from utils.data import load_data_config
    from utils.general import LOGGER
    lat = []
    for name in [m for m in opt.models.split(",") if m]:
        lat.append(graph_latency(name, device, opt.imgsz, opt.runs, not opt.no_compile))
        LOGGER.info(json.dumps(lat[-1]))
    tr = []
    for name in [m for m in opt.train_models.split(",") if m]:
        tr.append(train_speed(name, device, opt.imgsz, opt.train_batch, steps=10, compile_=not opt.no_compile))
        LOGGER.info(json.dumps(tr[-1], default=str))
    data = load_data_config(ROOT / "data" / "shapes.yaml")
    hyp = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-high.yaml").read_text())
    loader = {w: loader_throughput(data.train, data.nc, opt.imgsz, w, 16, 20, hyp) for w in opt.loader_workers}

    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"
    lines = [f"# GPU speed ({env['device']}, {env['date']})", "", f"torch {env['torch']}, CUDA {env['cuda']}", "",
             f"## Batch-1 fp16 latency @{opt.imgsz} (ms, median CUDA events)", "",
             "| model | eager b1 | b16 per image | eager b1 / b16 | CUDA graph b1 | graph / b16 | max abs diff | "
             "compile r-o b1 | compile / b16 | compile s |", "|---|" + "---:|" * 9]
    for r in lat:
        b16 = r["eager_b16_per_img"]
        cb = r.get("compile_b1")
        lines.append(f"| {r['model']} | {f(r['eager_b1'])} | {f(b16, 2)} | {f(r['eager_b1'] / b16)} | {f(r['graph_b1'])} | "
                     f"{f(r['graph_b1'] / b16)} | {r['graph_maxdiff']:.1e} | {f(cb)} | {f(cb / b16 if cb else None)} | "
                     f"{f(r.get('compile_s'), 0)} |")
    lines += ["", f"## AMP training @{opt.imgsz} (img/s)", "",
              f"| model | batch {opt.train_batch} | autobatch | @auto | + compile @auto | x batch {opt.train_batch} | peak MiB @auto |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in tr:
        c = r["compile_auto"]
        best = max(r["cl_auto"]["img_s"], c.get("img_s", 0))
        lines.append(f"| {r['model']} | {f(r['base']['img_s'])} | {r['autobatch']['batch']} | {f(r['cl_auto']['img_s'])} | "
                     f"{f(c.get('img_s')) if c.get('active', False) else c.get('error', 'eager fallback')} | {best / r['base']['img_s']:.2f} | "
                     f"{f(r['cl_auto']['peak_mib'], 0)} |")
    lines += [""] + [f"- {r['model']}: {r['autobatch']['summary']}" for r in tr]
    lines += ["", f"Data loader (shapes set, mosaic at {opt.imgsz}, batch 16): "
              + ", ".join(f"{w} workers {v:.0f} img/s" for w, v in loader.items())]
    return lines


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="GPU AMP latency, memory, SDPA kernels and training img/s of the zoo")
    ap.add_argument("--models", default=",".join(LATENCY_MODELS), help="comma list for the latency table")
    ap.add_argument("--train-models", default=",".join(TRAIN_MODELS), help="comma list for training img/s")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batches", default="1,16", help="inference batch sizes")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=30, help="timed forwards per cell (batch 1; fewer for larger batches)")
    ap.add_argument("--device", default="0")
    ap.add_argument("--md", default="", help="write the tables as markdown")
    ap.add_argument("--json", default="", help="write the raw numbers as JSON")
    ap.add_argument("--csv", default="", help="write one row per model and measurement as CSV")
    ap.add_argument("--speed", action="store_true", help="speed tables: CUDA graphs, compile, autobatch, loader")
    ap.add_argument("--no-compile", action="store_true", help="--speed: skip the torch.compile columns (slow to compile)")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[4, 8, 16], help="--speed: loader workers")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opt = parse_opt(argv)
    import torch
    from utils.general import LOGGER, UserError
    from utils.torch_utils import select_device
    if not torch.cuda.is_available():
        raise UserError("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    device = select_device(opt.device)  # also the current device: default streams and events live on it
    if device.type != "cuda":
        raise UserError(f"bench_gpu.py --device {opt.device}: needs a CUDA device")
    # fixed shapes: let cuDNN pick its fastest convolutions (autobatch turns this off while it probes memory:
    # the autotuner's trial workspaces would inflate the peaks it measures)
    torch.backends.cudnn.benchmark = True
    batches = [int(b) for b in opt.batches.split(",") if b]
    env = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    LOGGER.info(f"{env}")
    if opt.speed:
        lines = speed_main(opt, device, env)
        print("\n".join(lines))
        if opt.md:
            write_md(opt.md, "\n".join(lines) + "\n")
        return
    out: dict = {"env": env, "latency": [], "train": [], "kernels": {}}

    for name in [m for m in opt.models.split(",") if m]:
        model = _build(name, device)
        row = {"model": name}
        for b in batches:
            runs = opt.runs if b == 1 else max(opt.runs // 2, 5)
            row[f"amp_b{b}"] = forward_cost(model, b, opt.imgsz, True, warmup=5, runs=runs)
        row["fp32_b1"] = forward_cost(model, 1, opt.imgsz, False, warmup=3, runs=max(opt.runs // 2, 5))
        if name == SEED:
            x = torch.rand(1, 3, opt.imgsz, opt.imgsz, device=device)
            with torch.inference_mode():
                with torch.autocast("cuda", dtype=torch.float16):
                    out["kernels"]["inference AMP"] = sdpa_ops(functools.partial(model, x))
                out["kernels"]["inference fp32"] = sdpa_ops(functools.partial(model, x))
            from models.attention import MultiQueryAttentionLayerWithDownSampling as MQA
            MQA.explicit_default = True  # the materialising reference, same weights
            try:
                row["explicit_amp_b1"] = forward_cost(model, 1, opt.imgsz, True, warmup=2, runs=5)
            except torch.OutOfMemoryError:
                row["explicit_amp_b1"] = "out of memory"
            finally:
                MQA.explicit_default = False
        out["latency"].append(row)
        LOGGER.info(json.dumps(row))
        del model
        torch.cuda.empty_cache()

    for name in [m for m in opt.train_models.split(",") if m]:
        model = _build(name, device, train=True)
        res = train_cost(model, opt.train_batch, opt.imgsz, warmup=3, steps=10)
        step = res.pop("step")
        if name == SEED:
            out["kernels"]["training step AMP"] = sdpa_ops(step)
        out["train"].append({"model": name, **res})
        LOGGER.info(json.dumps(out["train"][-1]))
        del model, step
        torch.cuda.empty_cache()

    lines = format_md(out, opt.imgsz, batches)
    print("\n".join(lines))
    if opt.md:
        write_md(opt.md, "\n".join(lines) + "\n")
    if opt.json:
        Path(opt.json).write_text(json.dumps(out, indent=1, default=str))
    if opt.csv:
        write_csv(out, Path(opt.csv))


def write_csv(out: dict, path: Path) -> None:
    """Flat rows: model, measurement (amp_b1, amp_b16, fp32_b1, explicit_amp_b1, train_amp), ms or img/s, peak MiB."""
    import csv
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "measurement", "ms", "img_s", "peak_mib", "batch", "device", "date"])
        env = out["env"]
        for r in out["latency"]:
            for k, v in r.items():
                if isinstance(v, dict):
                    batch = int(k.rsplit("_b", 1)[1])
                    w.writerow([r["model"], k, f"{v['ms']:.3f}", "", f"{v['peak_mib']:.1f}", batch, env["device"], env["date"]])
        for t in out["train"]:
            w.writerow([t["model"], "train_amp", "", f"{t['img_s']:.2f}", f"{t['peak_mib']:.1f}", t["batch"],
                        env["device"], env["date"]])


def format_md(out: dict, imgsz: int, batches: list[int]) -> list[str]:
    env = out["env"]
    base = next((r for r in out["latency"] if r["model"] == "yolov9-c"), None)
    lines = [f"# Model zoo on GPU ({env['device']}, {env['date']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; fused eval models, fp32 weights, "
             f"AMP = fp16 autocast; latency = median CUDA-event time after warm-up; peak MiB = CUDA memory allocated "
             f"beyond weights and input during the forwards.", "",
             "| model | " + " | ".join(f"AMP ms b{b} @{imgsz} | peak MiB b{b}" for b in batches)
             + f" | fp32 ms b1 | x yolov9-c (AMP b1) | x yolov9-c (AMP b{batches[-1]}) |",
             "|---|" + "---:|" * (2 * len(batches) + 3)]
    for r in out["latency"]:
        cells = []
        for b in batches:
            c = r[f"amp_b{b}"]
            cells += [f"{c['ms']:.1f}", f"{c['peak_mib']:.0f}"]
        ratio = [f"{r[f'amp_b{b}']['ms'] / base[f'amp_b{b}']['ms']:.2f}" if base else "-" for b in (1, batches[-1])]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['fp32_b1']['ms']:.1f} | " + " | ".join(ratio) + " |")
    for r in out["latency"]:
        e = r.get("explicit_amp_b1")
        if isinstance(e, dict):
            lines += ["", f"{r['model']} with the materialising (explicit matmul) attention, AMP b1: {e['ms']:.1f} ms, "
                      f"peak {e['peak_mib']:.0f} MiB (fused SDPA: {r['amp_b1']['ms']:.1f} ms, {r['amp_b1']['peak_mib']:.0f} MiB)."]
        elif e:
            lines += ["", f"{r['model']} with the materialising attention, AMP b1: {e}."]
    if out["train"]:
        lines += ["", f"## AMP training @{imgsz}", "", "| model | batch | img/s | peak MiB |", "|---|---:|---:|---:|"]
        lines += [f"| {t['model']} | {t['batch']} | {t['img_s']:.1f} | {t['peak_mib']:.0f} |" for t in out["train"]]
    if out["kernels"]:
        lines += ["", "## SDPA kernels that ran (torch.profiler)", ""]
        for k, v in out["kernels"].items():
            lines.append(f"- {k}: ops {', '.join(v['ops']) or '-'}; CUDA kernels {', '.join(v['kernels'][:4]) or '-'}")
    return lines


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
