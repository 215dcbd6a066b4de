"""Upstream-style pickled checkpoints: safe conversion round-trip, and refusal of pickles that run code."""
from __future__ import annotations

import copy
import os
import pickle
import zipfile

import pytest
import torch

from models.yolo import DetectionModel
from utils.checkpoint import load_checkpoint, load_model
from utils.general import UserError
from utils.deploy.upstream import convert, main, safe_load
from helpers import perturb_bn


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dual():
    m = perturb_bn(DetectionModel("yolov9-t", nc=4), 0)
    m.names = ["cat", "dog", "car", "bus"]
    return m


def _globals(path) -> set[str]:
    """GLOBAL references in the pickle: proves the file names upstream-style module paths."""
    import pickletools
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_pickled_model_objects_round_trip(dual, tmp_path):
    src = tmp_path / "yolov9-t.pt"
    # exactly how upstream writes checkpoints: pickled model objects (ours live at the same module paths)
    torch.save({"model": dual, "ema": None, "optimizer": None, "epoch": -1, "best_fitness": None}, src)
    refs = _globals(src)
    assert "models.yolo DetectionModel" in refs and "models.common Conv" in refs
    with pytest.raises(UserError):  # this project's own loader refuses pickled classes
        load_checkpoint(src)

    out = main(["--weights", str(src), "--out", str(tmp_path / "converted.pt")])
    ck = load_checkpoint(out)  # weights_only load works: plain data only
    ref = dual.state_dict()
    assert set(ck["model"]) == set(ref)
    assert all(torch.equal(ck["model"][k], ref[k]) for k in ref)
    assert ck["names"] == dual.names and ck["model_yaml"]["yaml_file"] == "yolov9-t.yaml"

    model = load_model(out)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x)[0], dual.eval()(x)[0])


def test_ema_entry_preferred(dual, tmp_path):
    ema = copy.deepcopy(dual)
    with torch.no_grad():
        ema.model[0].conv.weight.mul_(0.5)
    src = tmp_path / "train.pt"
    torch.save({"model": dual, "ema": ema, "optimizer": None, "epoch": 3}, src)
    ck = load_checkpoint(convert(src))
    assert torch.equal(ck["model"]["model.0.conv.weight"], ema.model[0].conv.weight)


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_refused(tmp_path):
    pwned = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(pwned)), "ema": None}, bad)
    with pytest.raises(UserError, match=r"refused: (posix|nt|os)\.system"):
        convert(bad, tmp_path / "out.pt")
    assert not pwned.exists()
    assert not (tmp_path / "out.pt").exists()


def test_other_code_globals_refused(tmp_path):
    class Eval:
        def __reduce__(self):
            return eval, ("1+1",)

    f = tmp_path / "eval.pt"
    torch.save({"model": Eval()}, f)
    with pytest.raises(UserError, match=r"refused: builtins\.eval"):
        safe_load(f)
    g = tmp_path / "raw.pkl"
    g.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="not a torch zip"):
        safe_load(g)
