"""Training and detection on a CPU shared with other work: time alone vs beside a busy neighbour.

Why: on a machine shared with another process a job should slow down about as much as the CPU it loses, not
several times more. The neighbour is a single-thread busy loop (`--neighbour loop`) or a one-thread training
(`--neighbour train`); it starts before the job and is stopped after it, and the CPU time it got during the job
is read from /proc. The job is the quick start shortened to --epochs (`python train_dual.py`: yolov9-t-MMQA on
the bundled shapes, 128 px, batch 16), detect_dual.py on a generated clip, or `forward`: 20 batch-1 forwards
of gelan-t at 288x640 with all intra-op threads (timed inside the process: no start-up), or `predict`: 20
`Predictor.predict` calls on one 640x272 image (the API's single-image path).

Settings, interleaved in every round:
- `this checkout`: the defaults of this code (OpenMP threads sleep when they wait; thread and loader-worker
  counts from the cores the process may use, utils/threads.py);
- `spin-waiting`: the same code with GNU OpenMP's own waiting (GOMP_SPINCOUNT=300000, what the runtime does when
  no policy is set: a thread spins ~3 ms at the end of every parallel region before it sleeps);
- `base`: an older checkout (--base, e.g. `git worktree add /tmp/base <commit>`) run as it was.

`proportional` = cores / (cores - neighbour's cores): the slowdown if the job lost exactly the CPU the
neighbour used; `excess` = measured slowdown / proportional (1.0 is the goal).

Usage:
    python benchmarks/bench_shared_cpu.py --jobs train detect --neighbour loop --rounds 2 [--epochs 3] \
        [--base /tmp/base] [--md benchmarks/results/shared_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import write_md  # noqa: E402

LOOP = "while True:\n    pass\n"


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children, from /proc (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(v) for v in fields[11:15]) / ticks  # utime stime cutime cstime


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its live descendants (loader workers included)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += _cpu_seconds(p)
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def neighbour_cmd(kind: str, tmp: Path) -> tuple[list[str], dict]:
    from utils.threads import user_environ
    env = user_environ()
    if kind == "loop":
        return [sys.executable, "-c", LOOP], env
    env = dict(env, OMP_NUM_THREADS="1")  # a one-thread training, as a second user would start one
    return ([sys.executable, str(ROOT / "train_dual.py"), "--epochs", "1000", "--workers", "0", "--noplots",
             "--project", str(tmp / "neighbour"), "--name", "n", "--exist-ok", "--device", "cpu"], env)


FORWARD = """
import sys, time, torch
from utils.engine.backend import Backend
b = Backend(sys.argv[1], "cpu", fuse=True, main_only=True)
x = torch.rand(1, 3, 288, 640).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    for _ in range(3):
        b(x)
    t = time.perf_counter()
    for _ in range(20):
        b(x)
print("SECONDS", time.perf_counter() - t)
"""


PREDICT = """
import sys, time, numpy as np
from utils.engine.predict.predictor import Predictor
p = Predictor(sys.argv[1], device="cpu", imgsz=640)
im = np.random.default_rng(0).integers(0, 255, (272, 640, 3), dtype=np.uint8)
for _ in range(3):
    p.predict(im)
t = time.perf_counter()
for _ in range(20):
    p.predict(im)
print("SECONDS", time.perf_counter() - t)
"""


def job_cmd(job: str, tree: Path, tmp: Path, opt, clip: Path | None, weights: Path | None) -> list[str]:
    if job in ("forward", "predict"):
        return [sys.executable, "-c", FORWARD if job == "forward" else PREDICT, str(weights)]
    if job == "train":
        return [sys.executable, str(tree / "train_dual.py"), "--epochs", str(opt.epochs), "--noplots",
                "--project", str(tmp / "train"), "--name", "r", "--exist-ok", "--device", "cpu"]
    return [sys.executable, str(tree / "detect_dual.py"), "--weights", str(weights), "--source", str(clip),
            "--project", str(tmp / "detect"), "--name", "r", "--exist-ok", "--device", "cpu"]


def run_once(cmd: list[str], env: dict, cwd: Path, neighbour: tuple | None) -> dict:
    """Wall seconds of `cmd` (and the neighbour's cores during it, when one runs)."""
    nb = None
    if neighbour is not None:
        # its own session, as another user's program: with the kernel's autogroup scheduling (a default on desktop
        # and server kernels) CPU time is shared between sessions first, then among a session's threads
        nb = subprocess.Popen(neighbour[0], env=neighbour[1], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)  # let it start (a benchmark may wait; tests never do)
    try:
        c0 = _tree_cpu_seconds(nb.pid) if nb else 0.0
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        c1 = _tree_cpu_seconds(nb.pid) if nb else 0.0
    finally:
        if nb is not None:
            nb.terminate()
            nb.wait()
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    timed = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("SECONDS ")]
    return {"wall": timed[-1] if timed else wall, "nb_cores": (c1 - c0) / wall if nb else 0.0}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=["forward", "detect", "train"], choices=["forward", "predict", "detect", "train"])
    ap.add_argument("--neighbour", default="loop", choices=["loop", "train"])
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the shortened quick start")
    ap.add_argument("--frames", type=int, default=150, help="frames of the detection clip (640x272)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--base", default="", help="older checkout to run as well")
    ap.add_argument("--no-spin", action="store_true", help="skip the spin-waiting setting")
    ap.add_argument("--md", default="")
    opt = ap.parse_args(argv)
    from utils.threads import user_environ, usable_cores
    cores = usable_cores()
    load0 = os.getloadavg()[0]
    trees = {"this checkout": (ROOT, {})}
    if not opt.no_spin:
        trees["spin-waiting"] = (ROOT, {"GOMP_SPINCOUNT": "300000"})
    if opt.base:
        trees["base"] = (Path(opt.base).resolve(), {})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_shared_") as td:
        tmp = Path(td)
        clip = weights = None
        if {"detect", "forward", "predict"} & set(opt.jobs):
            import torch
            from models.yolo import DetectionModel
            from utils.checkpoint import make_checkpoint, save_checkpoint
            from utils.data.shapes_video import write_shapes_video
            clip = tmp / "clip.mp4"
            write_shapes_video(clip, frames=opt.frames, size=(640, 272), seed=0)
            torch.manual_seed(0)
            weights = save_checkpoint(make_checkpoint(DetectionModel("gelan-t.yaml", nc=80),
                                                      names=[f"c{i}" for i in range(80)]), tmp / "gelan-t.pt")
        for tree, _ in trees.values():  # the bundled dataset, generated once per checkout (not timed)
            subprocess.run([sys.executable, "-c", "from utils.data import load_data_config as f; "
                            "f('data/shapes.yaml')"], cwd=tree, check=True, capture_output=True)
        results: dict[tuple, list[dict]] = {}
        for rnd in range(opt.rounds):
            for job in opt.jobs:
                for name, (tree, extra) in trees.items():
                    for cond in ("alone", "beside"):
                        print(f"round {rnd + 1}/{opt.rounds}: {job}, {name}, {cond} (load "
                              f"{os.getloadavg()[0]:.1f}) ...", file=sys.stderr, flush=True)
                        nb = neighbour_cmd(opt.neighbour, tmp) if cond == "beside" else None
                        env = dict(user_environ(), **extra)
                        res = run_once(job_cmd(job, tree, tmp, opt, clip, weights), env, tree, nb)
                        results.setdefault((job, name, cond), []).append(res)
        for job in opt.jobs:
            for name in trees:
                alone = statistics.median(r["wall"] for r in results[(job, name, "alone")])
                beside = statistics.median(r["wall"] for r in results[(job, name, "beside")])
                nbc = statistics.median(r["nb_cores"] for r in results[(job, name, "beside")])
                prop = cores / max(cores - nbc, 1e-3)
                rows.append({"job": job, "setting": name, "alone": alone, "beside": beside, "nb_cores": nbc,
                             "slowdown": beside / alone, "proportional": prop, "excess": beside / alone / prop,
                             "all": [(round(a["wall"]), round(b["wall"])) for a, b in
                                     zip(results[(job, name, "alone")], results[(job, name, "beside")])]})
    text = report(rows, opt, cores, load0, os.getloadavg()[0])
    print(text)
    if opt.md:
        write_md(opt.md, text + "\n")
    return rows


def report(rows: list[dict], opt, cores: int, load0: float, load1: float) -> str:
    from benchmarks.bench_video import cpu_name
    what = {"loop": "a single-thread busy loop", "train": "a one-thread training (OMP_NUM_THREADS=1, --workers 0)"}
    head = (f"{cpu_name()}, {cores} usable cores; neighbour: {what[opt.neighbour]}; train = `train_dual.py --epochs "
            f"{opt.epochs}` (quick start), detect = detect_dual.py on a {opt.frames}-frame 640x272 clip (gelan-t), "
            f"forward = 20 gelan-t forwards at 288x640, predict = 20 Predictor.predict calls on a 640x272 image "
            f"(both timed in the process); "
            f"median of {opt.rounds} interleaved rounds; load average {load0:.1f} before, {load1:.1f} after "
            f"(other jobs share the machine).\n\n")
    lines = ["| job | setting | alone s | beside s | slowdown | neighbour cores | proportional | excess | "
             "(alone, beside) s per round |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['setting']} | {r['alone']:.1f} | {r['beside']:.1f} | {r['slowdown']:.2f} | "
                     f"{r['nb_cores']:.2f} | {r['proportional']:.2f} | {r['excess']:.2f} | "
                     f"{', '.join(f'({a}, {b})' for a, b in r['all'])} |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    main()
