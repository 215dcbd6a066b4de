"""Distributed training and validation on CPU (gloo) under torchrun: the DDP step equals one process on the
global batch, two "nodes" on one machine split every epoch's images exactly, an elastic restart resumes from
last.pt, sharded validation equals single-process validation, and launch mistakes give one clear line."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import limit
from utils.data import generate_shapes

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "ddp_driver.py"
NAMES = ["circle", "rectangle", "triangle", "star", "cross"]
TINY = ["--cfg", "gelan-t.yaml", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--seed", "1",
        "--device", "cpu", "--noplots", "--no-tensorboard"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**e, **ENV, **extra}


def make_data(root: Path, n_train: int = 16, n_val: int = 8) -> Path:
    generate_shapes(root / "ds", n_train=n_train, n_val=n_val, seed=3)
    data = root / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "ds"), "train": "images/train", "val": "images/val",
                                    "names": NAMES}))
    return data


def run(cmd: list, cwd: Path, timeout: float = 300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=limit(timeout))


def epochs_in_csv(path: Path) -> list[int]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [int(r[0]) for r in list(csv.reader(f))[1:] if r]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp(min=1e-30))


# ---------------------------------------------------------------- --rect under DDP: whole rect batches per rank
def test_rect_training_under_ddp_gives_each_rank_whole_rect_batches(tmp_path, monkeypatch):
    """--rect with torchrun: each rank's loader batches must hold images of one rect shape (a DistributedSampler
    interleaves images, so a batch mixed shapes of different rect batches and torch.stack failed), each batch
    the one a single process forms, every image seen, and both ranks the same number of steps."""
    import cv2

    from utils.data import create_dataloader
    data = make_data(tmp_path, n_train=9, n_val=2)
    for i, f in enumerate(sorted((tmp_path / "ds" / "images" / "train").glob("*.jpg"))):  # 3 aspect ratios
        cv2.imwrite(str(f), cv2.resize(cv2.imread(str(f)), [(160, 60), (60, 160), (160, 160)][i % 3]))
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    monkeypatch.setenv("WORLD_SIZE", "2")
    single, ds = create_dataloader(tmp_path / "ds" / "images" / "train", 64, 2, 32, hyp=hyp, augment=True, rect=True)
    shape_of = {p: tuple(b[0].shape[2:]) for b in single for p in b[2]}  # the single-process rect shape per image
    assert len(set(shape_of.values())) > 1
    seen, steps = set(), []
    for rank in (0, 1):
        loader, _ = create_dataloader(tmp_path / "ds" / "images" / "train", 64, 2, 32, hyp=hyp, augment=True,
                                      rect=True, rank=rank)
        batches = list(loader)
        steps.append(len(batches))
        for imgs, _, paths, _ in batches:
            assert all(shape_of[p] == tuple(imgs.shape[2:]) for p in paths)
            seen.update(paths)
    assert steps == [3, 3] and seen == set(shape_of)


# ---------------------------------------------------------------- 1. one DDP step == one process, global batch
def test_one_step_two_ranks_sync_bn_equals_one_process_batch_8(tmp_path):
    data = make_data(tmp_path, n_train=8, n_val=24)
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    # nbs = batch: accumulate 1, so the first batch is an optimizer step; small loss gains keep the gradient
    # norm under the clip (10), otherwise clipping would hide a wrong gradient scale; a large lr makes the step
    # visible in every parameter
    hyp.update(nbs=8, box=0.015, cls=0.001, dfl=0.003, lr0=0.5)
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    args = [tmp_path / "out_{}.pt", data, tmp_path / "hyp.yaml", tmp_path / "runs"]
    r = run([sys.executable, DRIVER, "step", str(args[0]).format("single"), *args[1:], "0"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", free_port(), DRIVER, "step",
             str(args[0]).format("ddp"), *args[1:], "1"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    one = torch.load(tmp_path / "out_single.pt", weights_only=True)
    two = torch.load(tmp_path / "out_ddp.pt", weights_only=True)
    assert two["world"] == 2
    # the AMP decision is made once for all ranks: rank 1's failed check turns AMP off on rank 0 too
    assert two["amp"] == [(True, False), (False, False)] and one["amp"] == [(False, False)]
    from utils.engine.train.trainer import GRAD_CLIP
    assert 0.1 < one["norm"] < GRAD_CLIP  # not clipped: the update is proportional to the gradient
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-6)
    changed = 0
    for k, a in one["after"].items():
        b = two["after"][k]
        if not a.is_floating_point():
            assert torch.equal(a, b), k  # num_batches_tracked
            continue
        assert torch.equal(one["before"][k], two["before"][k]), k  # same initial model on both sides
        assert rel(a, b) <= 1e-5, k  # parameters and BN running statistics (SyncBN over the 2 ranks)
        step = a.double() - one["before"][k].double()
        if step.norm() > 0:
            changed += 1
            assert rel(step, b.double() - two["before"][k].double()) <= 1e-5, k  # the step itself
    assert changed > 1000
    # the trainer's (sharded) validation of the EMA model equals a plain single-process validation
    # (3 val batches of 8: rank 0 validates 2, rank 1 one; the losses are averaged over all 3)
    assert two["val_batches"] == 2 and two["val_single"]["seen"] == 24 and two["val_single"]["box"] > 0
    for k, v in two["val_single"].items():
        assert two["val_sharded"][k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------- --compile, --image-weights, accumulation
def test_ddp_compile_falls_back_together_image_weights_off_and_accumulation_reduces_once(tmp_path):
    """Two ranks (gloo). --compile whose backward fails on rank 1 only: the ranks agree before the first step and
    both train eager (an eager retry inside the step broke DDP). --image-weights: off on every rank (each rank
    resampled with its own RNG). Accumulation over 2 micro-batches: gradients all-reduced only at the micro-batch
    that ends in an optimizer step (steps 1 and 3 of 0-3), and both ranks end with the same weights."""
    data = make_data(tmp_path, n_train=16, n_val=4)
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    hyp.update(nbs=16)
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    r = run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", free_port(), DRIVER, "paths", tmp_path / "out.pt",
             data, tmp_path / "hyp.yaml", tmp_path / "runs"], tmp_path, timeout=600, YOLO_DDP_TIMEOUT="300")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    ranks = torch.load(tmp_path / "out.pt", weights_only=True)
    assert [x["eager"] for x in ranks] == [True, True]
    assert [x["image_weights"] for x in ranks] == [False, False]
    assert [x["reduced_at"] for x in ranks] == [[1, 3], [1, 3]]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert out.count("torch.compile failed on another rank; every rank trains eager") == 1  # rank 0's word
    assert out.count("--image-weights is not supported under torchrun") == 1


# ---------------------------------------------------------------- 2. two nodes on one machine
def test_two_nodes_split_every_epoch_and_only_rank0_writes(tmp_path):
    data = make_data(tmp_path, n_train=16, n_val=8)
    port, log = free_port(), tmp_path / "indices"
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"  # each "machine" has its own working folder
        cwd.mkdir()
        cmd = [*TORCHRUN, "--nnodes", "2", "--node-rank", node, "--nproc-per-node", "1", "--master-addr",
               "127.0.0.1", "--master-port", port, ROOT / "train_dual.py", *TINY, "--data", data, "--epochs", "2",
               "--project", "runs/train", "--name", "exp"]
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env(YOLO_SAMPLER_LOG=str(log)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=limit(300))[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    drawn = {}
    for rank in (0, 1):
        for line in (log / f"rank{rank}.txt").read_text().splitlines():
            epoch, idx = line.split()
            drawn.setdefault(int(epoch), []).append([int(i) for i in idx.split(",")])
    assert sorted(drawn) == [0, 1]
    for epoch, per_rank in drawn.items():
        assert len(per_rank) == 2 and all(len(x) == 8 for x in per_rank)
        assert sorted(per_rank[0] + per_rank[1]) == list(range(16)), epoch  # every image exactly once
    assert drawn[0][0] != drawn[1][0]  # reshuffled per epoch
    assert not (tmp_path / "node1" / "runs").exists()  # global rank 1 wrote nothing
    run_dir = tmp_path / "node0" / "runs" / "train" / "exp"
    assert epochs_in_csv(run_dir / "results.csv") == [0, 1]
    assert (run_dir / "weights" / "best.pt").is_file() and (run_dir / "weights" / "last.pt").is_file()
    assert [p.name for p in (tmp_path / "node0" / "runs" / "train").iterdir()] == ["exp"]


# ---------------------------------------------------------------- 3. elastic restart
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _local_rank(pid: int) -> str | None:
    try:
        env_vars = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env_vars:
        if kv.startswith(b"LOCAL_RANK="):
            return kv.split(b"=", 1)[1].decode()
    return None


def test_elastic_restart_after_sigkill_resumes_from_last_pt(tmp_path):
    from utils.checkpoint import load_checkpoint, model_from_checkpoint
    data = make_data(tmp_path, n_train=16, n_val=8)
    cmd = [*TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", ROOT / "train_dual.py", *TINY, "--data", data,
           "--epochs", "3", "--project", tmp_path, "--name", "exp"]
    p = subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stdout.read(64), "")), daemon=True)
    reader.start()
    csv_path, last = tmp_path / "exp" / "results.csv", tmp_path / "exp" / "weights" / "last.pt"
    victim, t0 = None, time.time()
    # kill local rank 1 once epoch 0 is saved and epoch 1 has trained a batch (progress bar "1/2")
    while victim is None and time.time() - t0 < limit(200) and p.poll() is None:
        if epochs_in_csv(csv_path) == [0] and last.exists() and " 1/2 " in "".join(chunks):
            victim = next((c for c in _children(p.pid) if _local_rank(c) == "1"), None)
        time.sleep(0.02)
    assert victim is not None, "".join(chunks)[-3000:]
    os.kill(victim, signal.SIGKILL)
    p.wait(timeout=limit(300))
    reader.join(timeout=limit(30))
    out = "".join(chunks)
    (tmp_path / "torchrun.log").write_text(out)
    assert p.returncode == 0, out[-3000:]
    assert "Restart 1 of the worker group: continuing" in out and "Resuming training from" in out
    assert epochs_in_csv(csv_path) == [0, 1, 2]  # every epoch exactly once
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("exp")) == ["exp"]
    ck = load_checkpoint(tmp_path / "exp" / "weights" / "best.pt")
    y, _ = model_from_checkpoint(ck).eval()(torch.rand(1, 3, 64, 64))
    assert y.shape[1] == 4 + len(NAMES)
    assert load_checkpoint(last)["epoch"] == 2


# ---------------------------------------------------------------- 4. sharded val_dual.py
def test_val_dual_sharded_equals_single_process(tmp_path):
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    data = make_data(tmp_path, n_train=1, n_val=9)
    torch.manual_seed(0)
    model = DetectionModel("gelan-t.yaml", nc=len(NAMES))
    model.names = NAMES
    weights = tmp_path / "w.pt"
    save_checkpoint(make_checkpoint(model, epoch=0, names=NAMES), weights)
    common = ["--weights", weights, "--data", data, "--imgsz", "64", "--batch-size", "2", "--device", "cpu",
              "--workers", "0", "--save-json", "--save-txt", "--save-conf", "--project", tmp_path, "--exist-ok"]
    r = run([sys.executable, DRIVER, "val", tmp_path / "single.json", *common, "--name", "single"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", free_port(), DRIVER, "val",
             tmp_path / "ddp.json", *common, "--name", "ddp"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("single", "ddp"))
    assert two["seen"] == one["seen"] == 9 and two["nt"] == one["nt"]
    for k in ("mp", "mr", "map50", "map", "box", "cls", "dfl"):
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
    assert two["maps"] == pytest.approx(one["maps"], abs=1e-6)

    def key(d):
        return (d["image_id"], d["category_id"], d["score"], d["bbox"])

    pj = [json.loads((tmp_path / n / "predictions.json").read_text()) for n in ("single", "ddp")]
    assert len(pj[0]) > 0 and sorted(pj[0], key=key) == sorted(pj[1], key=key)  # every image once, from rank 0
    assert len({d["image_id"] for d in pj[1]}) == 9
    txt = [{f.name: f.read_text() for f in (tmp_path / n / "labels").glob("*.txt")} for n in ("single", "ddp")]
    assert len(txt[0]) == 9 and txt[0] == txt[1]  # each rank wrote its own images' txt


# ---------------------------------------------------------------- 4b. one scan per node
def test_one_scan_per_node_other_ranks_map_the_store(tmp_path):
    """Local rank 0 checks the split and writes the label store; rank 1 waits at a barrier (no polling) and maps
    that file: nothing checked twice, the same labels on both ranks."""
    generate_shapes(tmp_path / "ds", n_train=24, n_val=1, seed=3)
    images = tmp_path / "ds" / "images" / "train"
    r = run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", free_port(), DRIVER, "scan", tmp_path / "scan.json",
             images], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    zero, one = json.loads((tmp_path / "scan.json").read_text())
    assert zero["verified"] == 24 and one["verified"] == 0  # one scan for the node
    assert zero["stats"] == [24] and one["stats"] == []  # rank 1 trusts the store rank 0 just checked
    assert zero["store"] == one["store"] == str(tmp_path / "ds" / "labels" / "train.cache")
    assert zero["pid"] != one["pid"] and zero["labels"] == one["labels"] and zero["files"] == one["files"]
    assert len(zero["files"]) == 24


# ---------------------------------------------------------------- 5. clear errors instead of hangs
def test_launch_mistakes_give_one_clear_line(tmp_path, capsys, monkeypatch):
    import train_dual
    import val_dual
    from utils.general import cli
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    data = make_data(tmp_path, n_train=4, n_val=2)
    for script, argv, pattern in (
            (train_dual.main, ["--data", str(data), "--device", "0,1"],
             r"--device 0,1: 2 GPUs need one process each; launch with `python -m torch.distributed.run "
             r"--nproc-per-node 2 train_dual.py"),
            (train_dual.main, ["--data", str(data), "--device", "cpu", "--sync-bn"], r"--sync-bn needs distributed"),
            (cli(val_dual.main), ["--data", str(data), "--weights", __file__, "--device", "0,1"],
             r"--nproc-per-node 2 val_dual.py")):
        with pytest.raises(SystemExit) as e:
            script(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith("ERROR: ") and re.search(pattern, err[0])

    # a total batch the world size does not divide: rank 0 says so once, every rank exits
    r = run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", free_port(), ROOT / "train_dual.py", *TINY,
             "--batch-size", "7", "--data", data, "--epochs", "1", "--project", tmp_path / "runs"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    line = "ERROR: --batch-size 7 is the total over 2 processes: use a multiple of 2"
    assert [ln for ln in out.splitlines() if ln.startswith("ERROR:")] == [line], out[-3000:]  # printed once
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out

    # a --device list no process can use (no CUDA here; no GPU 98 on a CUDA machine): the flag as typed, printed
    # once (rank 0), and the last thing torchrun prints, its failure summary, ends with the same line
    r = run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", free_port(), ROOT / "train_dual.py", *TINY,
             "--device", "98,99", "--data", data, "--epochs", "1", "--project", tmp_path / "runs"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1
    printed = [ln for ln in out.splitlines() if ln.startswith("ERROR:")]
    assert len(printed) == 1 and printed[0].startswith("ERROR: --device 98,99: "), out[-3000:]
    summary = [ln.strip() for ln in r.stderr.splitlines() if ln.strip() and set(ln.strip()) != {"="}]
    assert summary[-1] == f"traceback : {printed[0]}", out[-3000:]

    # rank 0 of 2 whose partner never starts: a clear line after YOLO_DDP_TIMEOUT, not a hang
    t0 = time.time()
    r = run([sys.executable, ROOT / "train_dual.py", *TINY, "--data", data, "--epochs", "1", "--project",
             tmp_path / "runs"], tmp_path, timeout=120, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), YOLO_DDP_TIMEOUT="4")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert r.returncode == 1 and len(lines) == 1, (r.stdout + r.stderr)[-3000:]
    assert "rank 0 of 2" in lines[0] and "did not form within 4 s" in lines[0]
    assert "Traceback" not in r.stderr and time.time() - t0 < limit(90)


def test_survivor_of_a_killed_rank_stops_with_one_line(tmp_path):
    """Two ranks started by hand (no torchrun agent to clean up): rank 1 is killed mid-epoch, rank 0 must not
    wait for it; it stops with one clear line."""
    data = make_data(tmp_path, n_train=16, n_val=8)
    port = str(free_port())
    procs = []
    for r in (0, 1):
        e = env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, YOLO_DDP_TIMEOUT="60")
        cmd = [sys.executable, ROOT / "train_dual.py", *TINY, "--data", data, "--epochs", "3", "--project",
               tmp_path / "runs"]
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: procs[0].stdout.read(64), "")), daemon=True)
    reader.start()
    t0 = time.time()
    while " 1/2 " not in "".join(chunks) and procs[0].poll() is None and time.time() - t0 < limit(200):
        time.sleep(0.02)  # poll until rank 0 has trained a batch of epoch 1
    assert procs[0].poll() is None, "".join(chunks)[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    procs[1].communicate(timeout=limit(60))
    t1 = time.time()
    procs[0].wait(timeout=limit(120))
    reader.join(timeout=limit(30))
    out = "".join(chunks)
    errs = [ln for ln in out.splitlines() if ln.startswith("ERROR:")]
    assert procs[0].returncode == 1 and len(errs) == 1, out[-3000:]
    assert "rank 0 of 2: lost contact with the other processes" in errs[0]
    assert "Traceback" not in out and time.time() - t1 < limit(70)
