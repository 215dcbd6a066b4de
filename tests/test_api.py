"""The Python API (Trainer/train(TrainConfig), run_validation, Predictor): documented calls use real names and
keywords, and wrong keywords or sizes are one UserError, never silently ignored or replaced by a default."""
from __future__ import annotations

import ast
import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest

from helpers import SHAPE_NAMES, seeded_tiny_checkpoint
from utils.general import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return seeded_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny.pt", SHAPE_NAMES)


def test_validation_refuses_unknown_keywords_and_bad_sizes(weights):
    from utils.engine.validator import run_validation
    with pytest.raises(UserError, match=r"unknown argument\(s\) plot \(plot: did you mean plots\?\)"):
        run_validation(weights=str(weights), plot=False)
    for kw, words in ((dict(imgsz=0), "--imgsz 0: must be a whole number >= 1"),
                      (dict(batch_size=0), "--batch-size 0"), (dict(conf_thres=1.5), "--conf-thres 1.5")):
        with pytest.raises(UserError, match=re.escape(words)):
            run_validation(weights=str(weights), **kw)


def test_train_config_refuses_unknown_keywords_and_bad_values():
    from utils.engine.config import TrainConfig
    with pytest.raises(UserError, match=r"unknown argument\(s\) epoch \(epoch: did you mean epochs\?\)"):
        TrainConfig.from_args({"epoch": 3})
    for kw in (dict(imgsz=0), dict(epochs=-1), dict(cache="foo")):
        with pytest.raises(UserError):
            TrainConfig(**kw)  # made directly, as the documented call does: checked the same way


def test_cache_typo_fails_before_the_scan_and_leaves_no_run_folder(tmp_path, capsys):
    import train_dual
    with pytest.raises(SystemExit) as e:
        train_dual.main(["--cache", "foo", "--project", str(tmp_path / "runs"), "--epochs", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 1 and err == ["ERROR: --cache foo: use 'ram' (the default of a bare --cache) or 'disk'"]
    assert not (tmp_path / "runs").exists()


def test_predictor_refuses_size_zero_and_says_folder(weights, tmp_path):
    from utils.engine import Predictor
    for bad in (0, (0, 64), -32):
        with pytest.raises(UserError, match="whole numbers of pixels, all positive"):
            Predictor(weights, device="cpu", imgsz=bad)
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))}: is a folder; give a weights file"):
        Predictor(tmp_path, device="cpu")
    det = Predictor(weights, device="cpu", imgsz=64)
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))}: is a folder; predict\\(\\) takes one image"):
        det(tmp_path)


def _python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)


def _accepted(obj) -> set[str] | None:
    """Keyword names a documented callable accepts (None: it takes **kwargs it checks itself)."""
    from utils.engine.config import ValJob, ValOptions
    from utils.engine.validator import run_validation
    if obj is run_validation:  # keywords become a ValJob (checked by ValJob.from_args)
        return {f.name for f in fields(ValJob)} | {f.name for f in fields(ValOptions)}
    params = inspect.signature(obj).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def test_documented_python_calls_use_real_names_and_keywords():
    """Every ```python block of README/docs: imports resolve, and calls of imported names pass keywords the
    callable accepts (so the documented training, validation and detection calls cannot rot)."""
    import importlib
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [(d.name, b) for d in docs for b in _python_blocks(d)]
    documented, problems = set(), []
    for name, code in blocks:
        tree = ast.parse(code)
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(mod, a.name):
                        problems.append(f"{name}: {node.module} has no {a.name}")
                    else:
                        imported[a.asname or a.name] = getattr(mod, a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                documented.add(node.func.id)
                ok = _accepted(imported[node.func.id])
                bad = [k.arg for k in node.keywords if k.arg and ok is not None and k.arg not in ok]
                problems += [f"{name}: {node.func.id}({k}=...) is not accepted" for k in bad]
    assert not problems, problems
    assert {"Predictor", "TrainConfig", "train", "run_validation"} <= documented  # the three jobs are documented
