"""Training engine end to end on a tiny generated dataset: artifacts, checkpoints, resume, overfit, DDP."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from helpers import limit, shapes_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--cfg", "gelan-t.yaml", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes_yaml(tmp_path_factory.mktemp("shapes"), n_train=24, n_val=8)


def run_train(args, cwd, timeout=300, env=None):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train_dual.py"), *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=limit(timeout))


def read_results(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [r for r in rows[1:] if r]


def test_one_epoch_writes_every_artifact(tiny_data, tmp_path):
    r = run_train([*TINY, "--data", str(tiny_data), "--epochs", "1", "--project", str(tmp_path), "--name", "exp"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "exp"
    for f in ("opt.yaml", "hyp.yaml", "results.csv", "results.png", "labels.jpg", "train_batch0.jpg",
              "train_batch1.jpg", "train_batch2.jpg", "weights/last.pt", "weights/best.pt"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    header, rows = read_results(run / "results.csv")
    assert header == ["epoch", "train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision",
                      "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/cls_loss",
                      "val/dfl_loss", "x/lr0", "x/lr1", "x/lr2"]
    assert [r[0] for r in rows] == ["0"]
    vals = [float(x) for x in rows[0][1:]]
    assert all(v == v for v in vals)  # no NaN
    assert vals[0] > 0 and vals[7] > 0  # real train box loss and real validation box loss
    last = torch.load(run / "weights/last.pt", weights_only=True)
    best = torch.load(run / "weights/best.pt", weights_only=True)
    assert last["optimizer"] is not None and last["epoch"] == 0 and last["names"][0] == "circle"
    assert best["optimizer"] is None and best["ema"] is None
    assert all(v.dtype == torch.float16 for v in best["model"].values() if v.is_floating_point())
    assert "Transferred" not in r.stderr + r.stdout
    assert not list((run / "weights").glob("*.tmp"))
    # the trained checkpoint is reloadable into a model that runs
    from utils.checkpoint import load_model
    m = load_model(run / "weights/best.pt")
    y, _ = m(torch.rand(1, 3, 64, 96))
    assert y.shape[1] == 4 + 5


def test_resume_after_interrupt_and_extend(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*TINY, "--data", str(tiny_data), "--epochs", "3", "--project", str(tmp_path), "--name", "exp", "--noplots"]
    p = subprocess.Popen([sys.executable, str(ROOT / "train_dual.py"), *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    csv_path = tmp_path / "exp" / "results.csv"
    t0 = time.time()
    while time.time() - t0 < limit(240) and p.poll() is None:
        if csv_path.exists() and len(read_results(csv_path)[1]) >= 1:
            break
        time.sleep(0.2)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=limit(240))[0]
    assert "Traceback" not in out, out[-3000:]
    last = tmp_path / "exp" / "weights" / "last.pt"
    assert last.is_file()
    ck = torch.load(last, weights_only=True)
    done = ck["epoch"] + 1
    assert 0 <= done <= 3
    if done < 3:
        r = run_train(["--resume", str(last)], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    _, rows = read_results(csv_path)
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    # a finished run can be extended
    r = run_train(["--resume", str(last), "--epochs", "4"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = read_results(csv_path)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    # resuming a finished run without --epochs is a clear one-line error
    r = run_train(["--resume", str(last)], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "already finished" in r.stderr


def test_auto_optimizer_recorded_and_kept_on_resume(tiny_data, tmp_path):
    """--optimizer auto (default) on 24 images resolves to AdamW; opt.yaml, hyp.yaml and the checkpoint hold the
    resolved values and --resume uses them as given instead of deciding again. Explicit SGD is upstream's."""
    base = [*TINY, "--data", str(tiny_data), "--project", str(tmp_path), "--noplots"]
    r = run_train([*base, "--epochs", "1", "--name", "auto"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "optimizer: AdamW lr0=0.002 momentum=0.9 warmup_bias_lr=0.0" in log and "short schedule" in log
    run = tmp_path / "auto"
    opt = yaml.safe_load((run / "opt.yaml").read_text())
    hyp = yaml.safe_load((run / "hyp.yaml").read_text())
    assert opt["optimizer"] == "AdamW"
    assert (hyp["lr0"], hyp["momentum"], hyp["warmup_bias_lr"], hyp["warmup_max_frac"]) == (0.002, 0.9, 0.0, 0.05)
    ck = torch.load(run / "weights/last.pt", weights_only=True)
    assert ck["opt"]["optimizer"] == "AdamW" and ck["hyp"]["lr0"] == 0.002 and ck["hyp"]["momentum"] == 0.9
    groups = ck["optimizer"]["param_groups"]
    assert all(g["betas"][0] == 0.9 and g["initial_lr"] == 0.002 for g in groups)

    r = run_train(["--resume", str(run / "weights/last.pt"), "--epochs", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "optimizer: AdamW lr0=0.002" in log and "--optimizer AdamW: hyperparameter file values" in log
    ck = torch.load(run / "weights/last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["opt"]["optimizer"] == "AdamW" and ck["hyp"]["lr0"] == 0.002
    assert all(g["initial_lr"] == 0.002 for g in ck["optimizer"]["param_groups"])

    r = run_train([*base, "--epochs", "1", "--name", "sgd", "--optimizer", "SGD"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    upstream = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    hyp = yaml.safe_load((tmp_path / "sgd" / "hyp.yaml").read_text())
    assert hyp == {k: float(v) for k, v in upstream.items()}  # batch 8 x accumulate 8 = 64: decay unscaled
    ck = torch.load(tmp_path / "sgd" / "weights/last.pt", weights_only=True)
    assert ck["opt"]["optimizer"] == "SGD"
    assert all(g["nesterov"] and g["initial_lr"] == 0.01 for g in ck["optimizer"]["param_groups"])


def test_overfit_four_images_halves_loss():
    from models.yolo import DetectionModel
    from utils.loss import DetectionLoss
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "models/detect/gelan-t.yaml").read_text())
    cfg["nc"] = 2
    model = DetectionModel(cfg).train()
    loss_fn = DetectionLoss(model, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    imgs = torch.rand(4, 3, 64, 64) * 0.2
    targets = torch.tensor([[0, 0, 0.3, 0.3, 0.3, 0.3], [1, 1, 0.6, 0.5, 0.4, 0.5],
                            [2, 0, 0.5, 0.5, 0.5, 0.5], [3, 1, 0.4, 0.6, 0.3, 0.4]])
    for t in targets:  # draw the objects so there is something to learn
        b, c, x, y, w, h = t.tolist()
        x1, y1, x2, y2 = int((x - w / 2) * 64), int((y - h / 2) * 64), int((x + w / 2) * 64), int((y + h / 2) * 64)
        imgs[int(b), int(c), y1:y2, x1:x2] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _ = loss_fn(model(imgs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_hyp_and_data_are_one_line_errors(tiny_data, tmp_path):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("lr0: 0.01\n")
    r = run_train([*TINY, "--data", str(tiny_data), "--hyp", str(hyp), "--epochs", "1", "--project", str(tmp_path)], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and "missing hyperparameter" in errors[0]
    r = run_train([*TINY, "--data", str(tmp_path / "nope.yaml"), "--epochs", "1", "--project", str(tmp_path)], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ERROR:") and "nope.yaml" in r.stderr


def test_freezing_every_layer_is_one_line_before_any_folder(tiny_data, tmp_path, capsys):
    import train_dual
    for n in ("23", "99"):  # gelan-t has 23 layers (0..22): --freeze 23 leaves nothing to train
        with pytest.raises(SystemExit) as e:
            train_dual.main([*TINY, "--data", str(tiny_data), "--epochs", "1", "--project", str(tmp_path / "runs"),
                             "--freeze", n])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 1 and len(err) == 1, err
        assert err[0].startswith(f"ERROR: --freeze {n}: ") and "23-layer model" in err[0]
        assert "nothing to train" in err[0]
    assert not (tmp_path / "runs").exists()


def _train_in_process(args):
    import train_dual
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import Trainer
    trainer = Trainer(TrainConfig.from_args(train_dual.parse_opt([str(a) for a in args])))
    return trainer, trainer.run()


def test_ctrl_c_in_final_validation_resumes_into_finishing(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C while best.pt is validated at the end: --resume finishes the run (strip, validation, plots)
    instead of calling it finished; the epochs are not trained again."""
    from utils.engine import validator
    real = validator.Validator.run

    def interrupted_final(self, model, loader):  # the final validation is the verbose one
        if self.opt.verbose:
            raise KeyboardInterrupt
        return real(self, model, loader)

    monkeypatch.setattr(validator.Validator, "run", interrupted_final)
    with pytest.raises((SystemExit, KeyboardInterrupt)) as e:  # train_dual.py exits 130 either way
        _train_in_process([*TINY, "--data", tiny_data, "--epochs", "1", "--project", tmp_path, "--name", "exp",
                           "--no-tensorboard"])
    run = tmp_path / "exp"
    assert getattr(e.value, "code", 130) == 130 and not (run / "results.png").exists()
    monkeypatch.setattr(validator.Validator, "run", real)
    stamp = (run / "results.csv").read_text()
    trainer, result = _train_in_process(["--resume", run / "weights" / "last.pt"])
    assert result is not None and result.seen == 8  # best.pt validated
    assert (run / "results.png").is_file() and (run / "confusion_matrix.png").is_file()
    assert (run / "results.csv").read_text() == stamp  # nothing trained again
    best = torch.load(run / "weights" / "best.pt", weights_only=True)
    assert best["optimizer"] is None and all(v.dtype == torch.float16 for v in best["model"].values()
                                             if v.is_floating_point())
    assert sorted(f.name for f in (run / "weights").iterdir()) == ["best.pt", "last.pt"]
    r = run_train(["--resume", str(run / "weights" / "last.pt")], tmp_path)  # now it is finished
    assert r.returncode == 1 and "already finished" in r.stderr


def _nan_at(monkeypatch, bad):
    """Make the training loss NaN at the training steps (counted from 0) for which bad(step) is true."""
    from utils.engine.train import trainer as trainer_mod
    real = trainer_mod.DetectionLoss
    steps = iter(range(10**6))

    class NaNLoss(real):
        def __call__(self, preds, targets):
            loss, items = super().__call__(preds, targets)
            if torch.is_grad_enabled() and bad(next(steps)):  # training steps only, not validation
                loss = loss * float("nan")
            return loss, items
    monkeypatch.setattr(trainer_mod, "DetectionLoss", NaNLoss)


def test_nonfinite_loss_is_skipped_then_stops(tiny_data, tmp_path, monkeypatch, caplog):
    from utils.general import UserError
    base = [*TINY, "--data", tiny_data, "--epochs", "1", "--project", tmp_path, "--noplots"]
    _nan_at(monkeypatch, lambda step: step == 1)
    _train_in_process([*base, "--name", "skip"])
    assert "non-finite loss" in caplog.text
    base[base.index("--epochs") + 1] = "5"  # 3 batches per epoch: 10 bad steps in a row span epochs
    _nan_at(monkeypatch, lambda step: True)
    with pytest.raises(UserError, match="not finite"):
        _train_in_process([*base, "--name", "stop"])
    ck = torch.load(tmp_path / "stop" / "weights" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_weight_decay_is_never_rescaled_by_resume(tiny_data, tmp_path):
    """hyp.yaml and checkpoints keep the file's weight_decay; the optimizer gets the batch-scaled value."""
    from utils.engine.train.trainer import load_hyp
    wd = load_hyp("hyp.scratch-high.yaml")["weight_decay"]
    scaled = wd * 8 * 8 / 64  # batch 8, accumulate round(64 / 8) = 8, nominal 64
    args = [*TINY, "--data", tiny_data, "--epochs", "1", "--project", tmp_path, "--name", "exp", "--noplots",
            "--noval"]
    trainer, _ = _train_in_process(args)
    last = tmp_path / "exp" / "weights" / "last.pt"
    for epochs in (2, 3):  # resume twice
        trainer, _ = _train_in_process(["--resume", last, "--epochs", epochs])
        assert trainer.optimizer.param_groups[1]["weight_decay"] == pytest.approx(scaled)
        assert trainer.hyp["weight_decay"] == wd
        assert torch.load(last, weights_only=True)["hyp"]["weight_decay"] == wd
        assert yaml.safe_load((tmp_path / "exp" / "hyp.yaml").read_text())["weight_decay"] == wd
    assert trainer.cfg.epochs == 3 and trainer.cfg.resume == str(last)


def test_train_config_is_read_only_and_resume_makes_a_new_one(tmp_path):
    import dataclasses
    from utils.engine.config import TrainConfig
    from utils.general import UserError
    cfg = TrainConfig.from_args({"epochs": 5, "device": "cpu", "freeze": [3]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 6
    path = tmp_path / "exp" / "weights" / "last.pt"
    resumed = TrainConfig(device="cuda", workers=2).for_resume({**cfg.as_dict(), "batch_size": 4}, path)
    assert resumed is not cfg and cfg.device == "cpu" and cfg.resume == ""
    assert (resumed.device, resumed.workers, resumed.epochs, resumed.batch_size) == ("cuda", 2, 5, 4)
    assert resumed.save_dir == str(tmp_path / "exp") and resumed.freeze == (3,)
    filled = TrainConfig().with_defaults({"epochs": 7})
    assert (filled.epochs, filled.imgsz, filled.batch_size) == (7, 640, 16)
    assert TrainConfig(epochs=2).with_defaults({"epochs": 7}).epochs == 2  # the command line wins
    with pytest.raises(UserError, match="optimizer"):
        TrainConfig.from_args({"optimizer": "Lion"})
    with pytest.raises(UserError, match="unknown key"):
        TrainConfig().with_defaults({"epoch": 3})


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_processes_cpu(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train_dual.py"), *TINY, "--device", "cpu", "--data", str(tiny_data), "--epochs", "1",
           "--project", str(tmp_path), "--name", "ddp", "--noplots"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=limit(400))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("ddp"))
    assert runs == ["ddp"]  # one set of artifacts
    _, rows = read_results(tmp_path / "ddp" / "results.csv")
    assert len(rows) == 1
    assert (tmp_path / "ddp" / "weights" / "last.pt").is_file()


def _event_images(run: Path) -> dict[str, list]:
    """{tag: [(step, image event)]} over every event file of a run folder (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [(e.step, e) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_tensorboard_events_match_results_csv(tiny_data, tmp_path, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _train_in_process([*TINY, "--data", tiny_data, "--epochs", "2", "--project", tmp_path, "--name", "tb"])
    run = tmp_path / "tb"
    assert list(run.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    header, rows = read_results(run / "results.csv")
    tags = set(acc.Tags()["scalars"])
    assert set(header[1:]) | {"metrics/fitness"} == tags
    for col_i, tag in enumerate(header[1:], start=1):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1]
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(float(row[col_i]), rel=1e-5, abs=1e-9), tag
    fit = [e.value for e in acc.Scalars("metrics/fitness")]
    assert fit == pytest.approx([0.1 * float(r[6]) + 0.9 * float(r[7]) for r in rows], rel=1e-5, abs=1e-9)
    images = _event_images(run)
    # one validation batch (8 images, batch 16): only the plots that exist are logged, without OpenCV read errors
    assert set(images) == {"train_batch0", "train_batch1", "train_batch2", "val_batch0_labels", "val_batch0_pred",
                           "PR_curve", "confusion_matrix"}
    for tag, events in images.items():
        assert len(events) == 1, tag
        step, im = events[0]
        assert im.encoded_image_string[:3] == b"\xff\xd8\xff", tag  # stored as JPEG, not as raw-size PNG
        decoded = cv2.imdecode(np.frombuffer(im.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape[:2] == (im.height, im.width) and max(decoded.shape[:2]) <= 1024, tag
        assert step == (0 if tag.startswith("train_batch") else 1), tag
    # extending the run with --resume logs new scalars, but not the first epoch's train mosaics again
    _train_in_process(["--resume", run / "weights" / "last.pt", "--epochs", "3"])
    images = _event_images(run)
    assert [s for s, _ in images["train_batch0"]] == [0] and [s for s, _ in images["PR_curve"]] == [1, 2]
    # --noplots: no plot files, so nothing is read (no OpenCV "can't open/read file" lines) and no images logged
    _train_in_process([*TINY, "--data", tiny_data, "--epochs", "1", "--project", tmp_path, "--name", "noplots",
                       "--noplots"])
    assert list((tmp_path / "noplots").glob("events.out.tfevents.*")) and not _event_images(tmp_path / "noplots")
    err = capfd.readouterr().err
    assert "can't open/read file" not in err, [ln for ln in err.splitlines() if "imread" in ln]
    # --no-tensorboard writes no event file
    _train_in_process([*TINY, "--data", tiny_data, "--epochs", "1", "--project", tmp_path, "--name", "off",
                       "--no-tensorboard", "--noplots"])
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))
