"""Interrupted runs: SIGKILL mid-epoch and while a checkpoint is being written, then --resume.

Guarantees checked: last.pt is loadable (weights_only) whenever it exists, a killed save never replaces the
previous file, a leftover temp file breaks nothing (and is cleaned up), and results.csv ends with every
epoch exactly once. (SIGINT handling is covered by tests/test_train.py.)
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

from helpers import limit
from utils.data import generate_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--cfg", "gelan-t.yaml", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--seed", "1"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# Test harness only: torch.save writes half of the checkpoint, pauses, then the rest, so the test can kill the
# process while a half-written temp file sits in the weights folder (a real save is too quick to hit reliably).
SLOW_SAVE_LAUNCHER = """
import io, os, runpy, sys, time
import torch
_orig = torch.save
def slow_save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)):
        return _orig(obj, f, *a, **k)
    buf = io.BytesIO()
    _orig(obj, buf, *a, **k)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep(float(os.environ.get("SLOW_SAVE_S", "2")))
    f.write(data[len(data) // 2:])
torch.save = slow_save
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def start(args: list, cwd: Path, slow_save: bool = False) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    if slow_save:
        launcher = cwd / "slow_save_launcher.py"
        launcher.write_text(SLOW_SAVE_LAUNCHER)
        cmd = [sys.executable, str(launcher), str(ROOT / "train_dual.py"), *map(str, args)]
    else:
        cmd = [sys.executable, str(ROOT / "train_dual.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def epochs_in_csv(path: Path) -> list[int]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [int(r[0]) for r in rows[1:] if r]


def wait_for(cond, p: subprocess.Popen, timeout: float = 240, poll: float = 0.02) -> bool:
    t0 = time.time()
    while time.time() - t0 < limit(timeout):
        if cond():
            return True
        if p.poll() is not None:
            return False
        time.sleep(poll)
    return False


class Output:
    """Collects a process's merged stdout/stderr in a thread, so a test can wait for a line to appear."""

    def __init__(self, p: subprocess.Popen):
        self.p, self.chunks = p, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.p.stdout.read(64), ""):
            self.chunks.append(chunk)

    def text(self) -> str:
        return "".join(self.chunks)


def kill(p: subprocess.Popen, output: Output | None = None) -> str:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    if output is None:
        return p.communicate(timeout=limit(60))[0]
    p.wait(timeout=limit(60))
    output.thread.join(timeout=limit(60))
    return output.text()


def load_ok(path: Path) -> dict:
    ck = torch.load(path, weights_only=True)  # must never raise for an existing last.pt
    assert {"model", "model_yaml", "epoch", "optimizer"} <= set(ck)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    return ck


def temps(wdir: Path) -> list[Path]:
    return sorted(wdir.glob(".*.tmp")) if wdir.is_dir() else []


def size(f: Path) -> int:
    try:
        return f.stat().st_size
    except OSError:  # renamed away between listing and stat
        return 0


def test_sigkill_mid_epoch_and_mid_save_then_resume(tmp_path):
    generate_shapes(tmp_path / "ds", n_train=24, n_val=8, seed=3)
    data = tmp_path / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val",
                                    "names": ["circle", "rectangle", "triangle", "star", "cross"]}))
    run = tmp_path / "exp"
    wdir, last, csv_path = run / "weights", run / "weights" / "last.pt", run / "results.csv"
    args = [*TINY, "--data", data, "--epochs", 3, "--project", tmp_path, "--name", "exp", "--noplots"]

    # 1) SIGKILL during epoch 1 (epoch 0 finished and saved; the progress bar shows a batch of epoch "1/2")
    p = start(args, tmp_path)
    output = Output(p)
    ok = wait_for(lambda: epochs_in_csv(csv_path) and (wdir / "best.pt").exists() and last.exists()
                  and " 1/2 " in output.text(), p)
    out = kill(p, output)
    assert ok, out[-3000:]
    assert p.returncode == -signal.SIGKILL, out[-2000:]
    ck = load_ok(last)
    assert ck["epoch"] in (0, 1)

    # 2) resume, SIGKILL while the next last.pt is half written
    before = last.read_bytes()
    p = start(["--resume", last], tmp_path, slow_save=True)
    ok = wait_for(lambda: any(t.name.startswith(".last.pt.") and size(t) > 0 for t in temps(wdir)), p)
    out = kill(p)
    assert ok, out[-3000:]
    assert p.returncode == -signal.SIGKILL
    left = [t for t in temps(wdir) if t.name.startswith(".last.pt.")]
    assert left and max(size(t) for t in left) > 0  # the half-written temp file is left behind...
    assert last.read_bytes() == before  # ...and the previous checkpoint is untouched
    done = load_ok(last)["epoch"] + 1
    assert epochs_in_csv(csv_path)[:done] == list(range(done))

    # 3) resume again: finishes despite the leftover temp file, which gets cleaned up
    env = {**os.environ, **ENV}
    r = subprocess.run([sys.executable, str(ROOT / "train_dual.py"), "--resume", str(last)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=limit(400))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert epochs_in_csv(csv_path) == [0, 1, 2]  # no duplicate, no missing epoch
    assert temps(wdir) == []
    assert load_ok(last)["epoch"] == 2
    best = torch.load(wdir / "best.pt", weights_only=True)
    assert best["optimizer"] is None  # final, stripped
    assert sorted(x.name for x in run.iterdir() if x.name.startswith("exp")) == []  # resumed in place
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("exp")) == ["exp"]
