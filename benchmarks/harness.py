"""Measurement harness shared by the benchmarks: fresh worker processes and their peak RSS growth (Linux /proc)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(key: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None where /proc is unavailable)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def mem_baseline() -> float:
    """Start a peak-memory window: release freed heap, reset the kernel's high-water mark, return RSS now.

    Without the reset, ru_maxrss would still hold earlier peaks (model construction, imports) and hide a
    smaller forward's peak.
    """
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_mib("VmRSS") or _maxrss_mib()
    except OSError:
        return _maxrss_mib()  # fallback: growth beyond the earlier high-water mark (a lower bound)


def mem_peak_growth(base: float) -> float:
    """Peak RSS since mem_baseline() minus the RSS at that point, in MiB."""
    hwm = _status_mib("VmHWM")
    return (hwm if hwm is not None else _maxrss_mib()) - base


def run_worker(script: str | Path, kind: str, cfg: dict, timeout: float) -> dict:
    """Run `python <script> --_worker kind cfg` in a fresh interpreter and parse its RESULT line.

    A fresh process per measurement keeps peak-memory readings and warm caches independent.
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--_worker", kind, json.dumps(cfg)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cfg.get("omp_passive"):
        # OpenMP threads that spin while waiting starve each other when the CPUs are shared
        # (measured here: yolov9-t @320 13 s instead of 0.45 s at load 8 on 2 cores); workers must not spin.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"rc={r.returncode}: {tail[0][:200]}"}


def random_targets(batch: int, nc: int, per_image: int = 4, seed: int = 0):
    """[batch * per_image, 6] training targets (image, class, xc, yc, w, h), normalised boxes inside the image."""
    import torch
    g = torch.Generator().manual_seed(seed)
    n = batch * per_image
    idx = torch.arange(batch).repeat_interleave(per_image).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    wh = 0.05 + 0.4 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    return torch.cat([idx[:, None], cls[:, None], xy, wh], 1)


def write_md(path: str | Path, text: str) -> Path:
    """Write a benchmark's markdown result (creating its folder), e.g. into benchmarks/results/."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
