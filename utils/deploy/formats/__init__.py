"""The export formats, one module each in this package, found by name: export.py, the backend loader, the
tests' format matrix and the docs' table all iterate `all_formats()`. Adding a runtime = adding one module
that defines `FORMAT` (see base.py for what a format provides)."""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

from utils.deploy.formats.base import (ExportJob, ExportOptions, Format, LoadOptions, NumpyRunner, Runner,  # noqa: F401
                                       check_detector_output, size_mb)
from utils.general import UserError

_NOT_FORMATS = {"base"}


@lru_cache(maxsize=None)
def all_formats() -> tuple[Format, ...]:
    """Every format of this package in table order (importing them is cheap: runtimes load on use)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_FORMATS or info.name.startswith("_"):
            continue
        fmt = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FORMAT", None)
        if isinstance(fmt, Format):
            found.append(fmt)
    return tuple(sorted(found, key=lambda f: f.order))


def names() -> list[str]:
    return [f.name for f in all_formats()]


def get(name: str) -> Format:
    for f in all_formats():
        if f.name == name.lower():
            return f
    raise UserError(f"export.py: unknown format '{name}' (choose from {', '.join(names())})")


def runnable_names() -> list[str]:
    """Formats whose files this machine can run (Core ML, say, runs only on Apple devices)."""
    return [f.name for f in all_formats() if f.runs_here and f.load is not None]


def for_path(path: str | Path) -> Format | None:
    """The format a weights path is in, by its name (`.onnx`, `*_openvino_model/`), or for a folder of
    another name by what it holds (an OpenVINO .xml, an NCNN .param); None if it is none of them."""
    p = Path(path)
    for f in all_formats():
        if f.matches(p):
            return f
    if p.is_dir():
        for f in all_formats():
            if f.folder and f.marker and any(p.glob(f.marker)):
                return f
    return None


def accepted_suffixes() -> str:
    """For messages: '.pt, .torchscript, .onnx, *_openvino_model/, ...'."""
    return ", ".join([".pt"] + [f"*{f.suffix}/" if f.folder else f.suffix for f in all_formats()])


def check_packages(formats: list[Format], int8: bool = False) -> None:
    """One line naming every missing pip package of the formats export.py was asked for, before any work."""
    need: dict[str, list[str]] = {}
    for f in formats:
        for pip in f.missing("export", int8=int8 and f.export_int8 is not None):
            need.setdefault(pip, []).append(f.name)
    if need:
        what = ", ".join(f"{pip} (for {' and '.join(fs)})" for pip, fs in need.items())
        raise UserError(f"export.py --include {' '.join(f.name for f in formats)}{' --int8' if int8 else ''}: "
                        f"needs {what}; install with: pip install {' '.join(need)}")


def check_runtime(fmt: Format, path: Path) -> None:
    """One line when the runtime that runs `path` is missing."""
    missing = fmt.missing("run")
    if missing:
        raise UserError(f"{path}: running {fmt.title} models needs {', '.join(missing)} (pip install {' '.join(missing)})")


def table() -> str:
    """The formats as a markdown table (docs/deployment.md holds it; tests/test_format_registry.py checks)."""
    rows = ["| format | `--include` | file | `--half` | `--int8` | runs on | pip packages (export / run) |",
            "|---|---|---|---|---|---|---|"]
    for f in all_formats():
        file = f"`best{f.suffix}/`" if f.folder else f"`best{f.suffix}`"
        pkgs = " / ".join(", ".join(p for _, p in side) or "-" for side in (f.export_packages, f.run_packages))
        int8 = f"`best-int8{f.suffix}{'/' if f.folder else ''}`" if f.export_int8 else "-"
        where = f.runs_on + ("" if f.runs_here else " (not runnable on Linux)")
        rows.append(f"| {f.title} | `{f.name}` | {file} | {f.half} | {int8} | {where} | {pkgs} |")
    return "\n".join(rows)
