"""Starting from a file: what --weights transfers (said honestly), and what --resume keeps, ignores and checks."""
from __future__ import annotations

import logging

import pytest
import torch
import yaml

from helpers import SHAPE_NAMES, shapes_yaml
from models.yolo import DetectionModel
from utils.checkpoint import transfer_weights
from utils.general import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--cfg", "gelan-t.yaml", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--noplots", "--noval"]


def _moved(model, state) -> tuple[int, int]:
    """(weight tensors, parameter elements) of `model` now equal to the file's: counted from the values."""
    own = model.state_dict()
    same = [k for k, v in own.items() if not k.endswith("num_batches_tracked") and k in state
            and state[k].shape == v.shape and torch.equal(state[k], v)]
    params = dict(model.named_parameters())
    return len(same), sum(params[k].numel() for k in same if k in params)


def test_other_class_count_moves_all_but_the_class_branch(caplog):
    torch.manual_seed(0)
    state = DetectionModel("yolov9-t.yaml", nc=80).state_dict()
    model = DetectionModel("yolov9-t.yaml", nc=3)
    with caplog.at_level(logging.INFO):
        t = transfer_weights(model, state, source="src.pt", file_nc=80)
    tensors, params = _moved(model, state)
    assert (t.tensors, t.params) == (tensors, params)
    own = model.state_dict()
    weights = [k for k in own if not k.endswith("num_batches_tracked")]
    assert t.total_tensors == len(weights) and t.total_params == sum(p.numel() for p in model.parameters())
    fresh = [k for k in weights if not (k in state and state[k].shape == own[k].shape)]
    assert fresh and all(".cv3." in k or ".cv5." in k for k in fresh)  # class branches of both heads only
    assert t.fresh == ("layer 29 DualDDetect: class branch (the file has 80 classes, this model 3)",)
    assert 0.5 < t.fraction < 1 and "WARNING" not in caplog.text
    assert f"Transferred {tensors}/{len(weights)} weight tensors" in caplog.text


def test_another_architecture_moves_nothing_and_warns(caplog):
    """gelan-s from a yolov9-t-MMQA file: only BatchNorm counters would 'match'; they are not counted."""
    state = DetectionModel("yolov9-t-MMQA.yaml", nc=5).state_dict()
    model = DetectionModel("gelan-s.yaml", nc=5)
    counters = sum(k.endswith("num_batches_tracked") and k in state for k in model.state_dict())
    assert counters > 100  # what the old count reported as transferred
    with caplog.at_level(logging.INFO):
        t = transfer_weights(model, state, source="mmqa.pt", file_nc=5)
    assert (t.tensors, t.params) == _moved(model, state) == (0, 0)
    assert "WARNING: only 0.0% of this model's parameters came from mmqa.pt" in caplog.text
    assert "every layer" in caplog.text


def test_mmqa_from_a_convolution_only_file_names_the_attention():
    state = DetectionModel("yolov9-t.yaml", nc=5).state_dict()
    model = DetectionModel("yolov9-t-MMQA.yaml", nc=5)
    t = transfer_weights(model, state, file_nc=5)
    mmqa = [i for i, m in enumerate(model.model) if type(m).__name__ == "MMQARepNCSPELAN4"]
    assert mmqa and list(t.fresh) == [f"layer {i} MMQARepNCSPELAN4: Mobile MQA attention" for i in mmqa]
    assert (t.tensors, t.params) == _moved(model, state) and t.fraction > 0.5


def _train(args):
    import train_dual
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import Trainer
    trainer = Trainer(TrainConfig.from_args(train_dual.parse_opt([str(a) for a in args])))
    return trainer, trainer.run()


def test_resume_names_ignored_flags_keeps_tensorboard_off_and_checks_classes(tmp_path, caplog):
    data = shapes_yaml(tmp_path, n_train=8, n_val=4)
    _train([*TINY, "--data", data, "--epochs", "1", "--project", tmp_path, "--name", "exp", "--no-tensorboard"])
    run, last = tmp_path / "exp", tmp_path / "exp" / "weights" / "last.pt"
    with caplog.at_level(logging.WARNING):
        trainer, _ = _train(["--resume", last, "--epochs", "2", "--imgsz", "128", "--batch-size", "4", "--rect"])
    assert (trainer.cfg.imgsz, trainer.cfg.batch_size, trainer.cfg.rect) == (64, 8, False)
    warned = [r.getMessage() for r in caplog.records if "--resume continues" in r.getMessage()]
    assert len(warned) == 1 and "--imgsz 128 (the run's: 64)" in warned[0]
    assert "--batch-size 4 (the run's: 8)" in warned[0] and "--rect (the run's: off)" in warned[0]
    assert "--epochs" not in warned[0]  # --epochs extends the run: used, not ignored
    assert not list(run.glob("events.out.tfevents.*"))  # started with --no-tensorboard: still off

    # the data YAML now has another class count: refused before any step, results untouched
    cfg = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**cfg, "names": SHAPE_NAMES[:4]}))
    before = (run / "results.csv").read_text()
    with pytest.raises(UserError, match=r"4 classes now, but .*last\.pt was trained on 5 \(circle"):
        _train(["--resume", last, "--epochs", "3"])
    assert (run / "results.csv").read_text() == before


def test_exported_files_as_weights_say_what_to_do(tmp_path, capsys):
    """--weights best.onnx (named right) must not be told to 'name it .onnx'; a folder is called a folder."""
    import warnings

    import train_dual
    conv = torch.nn.Conv2d(3, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(conv, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "best.onnx"), dynamo=False)
        torch.jit.save(torch.jit.trace(conv, torch.zeros(1, 3, 8, 8)), str(tmp_path / "best.torchscript"))
    (tmp_path / "best_openvino_model").mkdir()
    data = shapes_yaml(tmp_path, n_train=2, n_val=2)
    for name, words in (("best.onnx", "an ONNX model (an export for inference), not a checkpoint: detect_dual.py "
                                      "and val_dual.py run it; training, --resume and export.py start from a .pt"),
                        ("best.torchscript", "a TorchScript file (an export for inference)"),
                        ("best_openvino_model", "a folder, not a checkpoint file")):
        with pytest.raises(SystemExit) as e:
            train_dual.main(["--weights", str(tmp_path / name), "--data", str(data), "--epochs", "1",
                             "--project", str(tmp_path / "runs"), "--workers", "0"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 1 and len(err) == 1, err
        assert err[0].startswith(f"ERROR: {tmp_path / name}: {words}") and "name it" not in err[0], err
    assert not (tmp_path / "runs").exists()
