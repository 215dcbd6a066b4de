"""A CPU shared with other work: OpenMP threads sleep instead of spinning (set before torch loads its runtime),
and thread / worker counts follow the cores the process may use (affinity and cgroup quota)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import limit
from utils import threads

ROOT = Path(__file__).resolve().parents[1]


def _spin_count(code: str, **env_vars: str) -> int:
    """GNU OpenMP's spin count as the runtime reports it (OMP_DISPLAY_ENV=VERBOSE) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES + ("OMP_NUM_THREADS",)}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT), **env_vars)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit(120))
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", r.stderr)
    if m is None:
        pytest.skip("torch's OpenMP runtime is not GNU OpenMP (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    return int(m.group(1))


def test_entry_scripts_start_openmp_without_spin_waiting():
    # val_dual imports torch at module level: the package's __init__ must have run first
    assert _spin_count("import val_dual") == 0
    # a user's own choice stands (here: spin 5 minutes, OMP_WAIT_POLICY=ACTIVE)
    assert _spin_count("import utils, torch", OMP_WAIT_POLICY="ACTIVE") > 10**9


def test_configure_openmp_respects_the_user(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    env: dict = {}
    assert threads.configure_openmp(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(user)
        assert threads.configure_openmp(env) == {} and env == user
    # a quota below the affinity mask: the runtime would start one thread per core of the mask
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    env = {}
    threads.configure_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    env = {"OMP_NUM_THREADS": "2"}
    threads.configure_openmp(env)
    assert env["OMP_NUM_THREADS"] == "2"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_tightest_on_the_path(tmp_path):
    root = tmp_path / "cg"
    _write(tmp_path / "self", "0::/jobs/a\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "jobs" / "cpu.max", "250000 100000\n")
    _write(root / "jobs" / "a" / "cpu.max", "150000 100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(1.5)
    _write(root / "jobs" / "a" / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(2.5)
    _write(root / "jobs" / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") is None


def test_cgroup_v1_quota_and_container_root(tmp_path):
    root = tmp_path / "cg"
    _write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    # inside a container the own cgroup is mounted as the root: /docker/abc does not exist below it
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(0.5)
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") is None
    assert threads.cgroup_cpu_limit(root, tmp_path / "missing") is None


@pytest.mark.parametrize("mask,limit,expect", [(4, None, 4), (4, 1.5, 1), (4, 0.5, 1), (2, 8.0, 2), (8, 3.0, 3)])
def test_usable_cores_affinity_capped_by_quota(monkeypatch, mask, limit, expect):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(mask)), raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: limit)
    assert threads.usable_cores() == expect


def test_loader_workers_follow_usable_cores(monkeypatch, tmp_path):
    import cv2
    import numpy as np
    from utils.data import loader
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.full((32, 32, 3), 100 + i, np.uint8))
        (tmp_path / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    img = tmp_path / "images"
    monkeypatch.setattr(loader, "usable_cores", lambda: 1)
    dl, _ = loader.create_dataloader(str(img), 32, 4, workers=8, nc=1, names=["a"], persistent=False)
    assert dl.num_workers == 1


class _Kernel:
    """Stand-in for the kernel's accounting: cumulative (run s, wait s, idle s) advanced by the test."""

    def __init__(self):
        self.t, self.run, self.wait, self.idle = 0.0, 0.0, 0.0, 0.0

    def advance(self, dt: float, run_cores: float, wait_cores: float, idle_cores: float) -> None:
        self.t += dt
        self.run, self.wait, self.idle = (self.run + dt * run_cores, self.wait + dt * wait_cores,
                                          self.idle + dt * idle_cores)


def test_governor_follows_the_cpu_it_gets():
    k, set_to = _Kernel(), []
    g = threads.ThreadGovernor(set_to.append, 2, 2, period=2.0, clock=lambda: k.t,
                               sample=lambda: (k.run, k.wait, k.idle))
    k.advance(1.0, 2.0, 0.0, 0.0)
    assert g.step() == 2 and set_to == []  # within the period: no judgement yet
    k.advance(1.0, 1.9, 0.2, 0.0)  # alone: threads hardly wait
    assert g.step() == 2
    k.advance(2.0, 1.0, 1.0, 0.0)  # a neighbour holds a core: our threads wait half the time they want one
    assert g.step() == 1 and set_to == [1]
    k.advance(2.0, 1.0, 0.0, 0.9)  # the period after a change is not judged
    assert g.step() == 1
    k.advance(2.0, 1.0, 0.3, 0.0)  # still busy beside the neighbour: no core idle, stay
    assert g.step() == 1
    k.advance(2.0, 1.0, 0.0, 0.95)  # the neighbour left: a core stands idle
    assert g.step() == 2 and set_to == [1, 2]
    k.advance(2.0, 2.0, 0.0, 0.0)
    k.advance(2.0, 1.5, 0.2, 0.0)  # losing a little (12% waiting): keep both threads
    assert g.step() == 2 and g.changes == [(2, 1), (1, 2)]
    g.threads = 1
    g.restore()
    assert g.threads == 2 and set_to[-1] == 2


def test_governor_without_accounting_never_acts():
    set_to = []
    t = [0.0]
    g = threads.ThreadGovernor(set_to.append, 2, 2, clock=lambda: t[0], sample=lambda: None)
    for _ in range(5):
        t[0] += 3
        assert g.step() == 2
    assert set_to == []


def test_cpu_time_sample_reads_the_kernel_files(tmp_path):
    for tid, text in (("11", "2000000000 500000000 7\n"), ("12", "1000000000 250000000 3\n"), ("13", "junk\n")):
        _write(tmp_path / "task" / tid / "schedstat", text)
    tck = os.sysconf("SC_CLK_TCK")
    _write(tmp_path / "stat", f"cpu  100 0 50 {3 * tck} {tck} 0 0 0 0 0\ncpu0 1 2 3 4 5\n")
    assert threads.cpu_time_sample(tmp_path / "task", tmp_path / "stat") == pytest.approx((3.0, 0.75, 4.0))
    assert threads.cpu_time_sample(tmp_path / "none", tmp_path / "stat") is None
    live = threads.cpu_time_sample()  # this process on this machine (Linux)
    assert live is None or (live[0] > 0 and live[1] >= 0 and live[2] >= 0)


def test_cpu_training_steps_the_governor_and_restores_threads(tmp_path, monkeypatch):
    import train_dual
    from helpers import shapes_yaml
    from utils.engine.config import TrainConfig
    from utils.engine.train import trainer as trainer_mod
    calls = []

    class Recorder:
        def step(self):
            calls.append("step")

        def restore(self):
            calls.append("restore")

    monkeypatch.setattr(trainer_mod, "cpu_thread_governor", lambda: Recorder())
    data = shapes_yaml(tmp_path / "shapes", n_train=16, n_val=4)
    args = ["--cfg", "gelan-t.yaml", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--epochs", "1",
            "--data", str(data), "--project", str(tmp_path), "--name", "g", "--noplots", "--no-tensorboard",
            "--device", "cpu"]
    trainer_mod.Trainer(TrainConfig.from_args(train_dual.parse_opt(args))).run()
    assert calls == ["step", "step", "restore"]  # one step per batch (16 images / 8), restored when training ends


@pytest.mark.parametrize("omp", [None, "1", "64", "0", "two"])
def test_torch_default_threads_known_before_torch(omp):
    """The early OpenVINO compilation guesses torch's thread count without importing torch: the guess is what
    a fresh interpreter's torch then reports (OMP_NUM_THREADS when it is a positive integer, at most the cores,
    else torch's own default; a value torch cannot use is ignored by both)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), **({"OMP_NUM_THREADS": omp} if omp is not None else {}))
    code = "from utils.threads import torch_default_threads as g; n = g(); import torch; print(n, torch.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit(120))
    assert r.returncode == 0, r.stderr[-2000:]
    guess, actual = map(int, r.stdout.split())
    assert guess == actual and (omp != "1" or guess == 1)


def test_physical_cores_counts_each_core_once(tmp_path):
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):  # 2 cores with 2 hyper-threads each
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(siblings + "\n")
    (tmp_path / "cpufreq").mkdir()  # not a CPU
    assert threads.physical_cores(tmp_path) == 2
    assert threads.physical_cores(tmp_path / "missing") == (os.cpu_count() or 1)
