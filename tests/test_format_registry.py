"""The export-format registry: one module per runtime, found by name; export.py, the backend loader and the
docs table all iterate it, so a new runtime is one new module."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import export as export_cli
from helpers import seeded_tiny_checkpoint
from utils.deploy import export, formats
from utils.deploy.formats import base
from utils.engine.backend import Backend
from utils.general import ROOT, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_every_format_once():
    fs = formats.all_formats()
    names = [f.name for f in fs]
    assert {"torchscript", "onnx", "openvino"} <= set(names)
    assert len(set(names)) == len(names) and len({f.suffix for f in fs}) == len(fs)
    assert [f.order for f in fs] == sorted(f.order for f in fs)
    assert export.include_choices() == names + ["reparam"]
    for f in fs:
        assert f.runs_here is False or f.load is not None, f.name


def test_paths_map_to_their_format(tmp_path):
    assert formats.for_path("a/best.onnx").name == "onnx"
    assert formats.for_path("best.TorchScript").name == "torchscript"
    assert formats.for_path("x/best_openvino_model").name == "openvino"
    assert formats.for_path("x/best_openvino_model/best.xml").name == "openvino"
    renamed = tmp_path / "my model"
    renamed.mkdir()
    assert formats.for_path(renamed) is None  # an empty folder is nothing
    (renamed / "m.xml").write_text("<net/>")
    assert formats.for_path(renamed).name == "openvino"  # a renamed IR folder, recognised by what it holds
    assert formats.for_path("best.h5") is None
    with pytest.raises(UserError, match=r"best.h5: unsupported weights format '.h5' \(use \.pt, \.torchscript, \.onnx, "
                                        r"\*_openvino_model/"):
        Backend(tmp_path / "best.h5")


def test_missing_packages_are_named_before_any_work(tmp_path, monkeypatch, capsys):
    """`--include openvino` needs onnx too (it is converted from the ONNX graph): both missing packages in one
    line, with the pip command, and nothing written."""
    w = seeded_tiny_checkpoint(tmp_path / "w.pt", ["a", "b"])
    real = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda n: None if n in ("onnx", "openvino") else real(n))
    with pytest.raises(SystemExit) as e:
        export_cli.cli(export_cli.main)(["--weights", str(w), "--include", "torchscript", "openvino", "--imgsz", "64"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 1 and err == ["ERROR: export.py --include torchscript openvino: needs onnx (for openvino), "
                                         "openvino (for openvino); install with: pip install onnx openvino"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_docs_table_is_the_registry():
    text = (ROOT / "docs" / "deployment.md").read_text()
    start, end = text.index("<!-- formats-table -->\n"), text.index("\n<!-- /formats-table -->")
    assert text[start + len("<!-- formats-table -->\n"):end] == formats.table()
    for f in formats.all_formats():
        assert f"--include {f.name}" in text or f"`{f.name}`" in text


PLUGIN = '''
"""A stand-in runtime: the torch.export program saved with torch.export.save, run by torch."""
import json
from pathlib import Path

import torch

from utils.deploy.formats.base import Format, Runner


def export(job, f: Path) -> Path:
    torch.export.save(job.exported_program(), str(f), extra_files={"meta.json": json.dumps(job.meta_for(FORMAT))})
    return f


class PlainRunner(Runner):
    def __init__(self, path, opts):
        extra = {"meta.json": ""}
        self.module = torch.export.load(str(path), extra_files=extra).module()
        self.meta = json.loads(extra["meta.json"])

    def __call__(self, im):
        return self.module(im.cpu()).to(im.device)


FORMAT = Format(name="plainexport", title="Plain torch.export", order=999, suffix=".pt2", folder=False,
                export=export, load=PlainRunner, runs_on="anywhere torch runs")
'''


def test_a_new_runtime_is_one_module(tmp_path, monkeypatch):
    """A module dropped into the package's search path is a format for export.py, the loader and the table."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "plainexport.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(plugin_dir)])
    formats.all_formats.cache_clear()
    try:
        assert "plainexport" in formats.names() and "plainexport" in formats.table()
        assert "plainexport: not supported" in _help_of("--half")  # export.py's help lists what --half means per format
        w = seeded_tiny_checkpoint(tmp_path / "w.pt", ["a", "b", "c"])
        out = export.run(w, include=("plainexport",), imgsz=(64, 96), dynamic=True)
        assert out["plainexport"] == tmp_path / "w.pt2"
        b = Backend(out["plainexport"])
        assert b.format == "plainexport" and b.names == ["a", "b", "c"] and b.fixed_imgsz == (64, 96)  # not dynamic
        x = torch.rand(1, 3, 64, 96)
        torch.testing.assert_close(b(x), Backend(w)(x), atol=1e-4, rtol=1e-4)
    finally:
        formats.all_formats.cache_clear()
        sys.modules.pop("utils.deploy.formats.plainexport", None)


def _help_of(flag: str) -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        export_cli.parse_opt(["--help"])
    text = " ".join(out.getvalue().split())
    return text[text.index(f"{flag} "):]


def test_export_help_follows_the_registry():
    int8 = [f.name for f in formats.all_formats() if f.export_int8]
    assert {"onnx", "openvino", "litert"} <= set(int8)
    assert f"INT8 copies of the {'/'.join(int8)} exports" in _help_of("--int8")
    assert "CUDA only" not in _help_of("--half").split("litert:")[1].split(";")[0]


@pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None, reason="openvino not installed")
def test_openvino_load_error_keeps_the_reason(tmp_path):
    """OpenVINO puts the reason on its message's last line ("bin file cannot be found"): the one-line error keeps it."""
    import openvino as ov
    import torch.nn as nn
    d = tmp_path / "x_openvino_model"
    d.mkdir()
    ov.save_model(ov.convert_model(nn.Conv2d(3, 7, 3), example_input=torch.rand(1, 3, 8, 8)), str(d / "x.xml"))
    (d / "x.bin").unlink()
    with pytest.raises(UserError, match=r"x.xml: not a loadable OpenVINO model \(Exception from .* \.\.\. .*bin file "
                                        r"cannot be found!\)$") as e:
        Backend(d)
    assert "\n" not in str(e.value)
