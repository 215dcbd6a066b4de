"""The accuracy check that export.py runs with --data (and always with --int8): every written file that runs on
this machine, INT8 copies included, validated on the same val images as the .pt and printed as one short table
(format, file, size, mAP50, mAP50-95, change against the .pt). A file that loses more than its limit fails the
export with one line and a non-zero exit, and is removed so that nobody deploys it by mistake (--allow-drop keeps
it and only warns).

Limits, in points of mAP50-95 (0.01 mAP):
- INT8 files against the fp32 file of their own runtime (what quantization alone cost): 1.0 by default.
  Measured drops of a sound INT8 model here are 0.2-0.4 point; a collapsed one (a wrong scale, the box decoding
  quantized) loses tens of points, so 1.0 separates them with room for small val sets.
- float files (fp32 exports, fp16 on CUDA) against the .pt: 0.3 by default. They differ from the .pt by
  float reassociation (or fp16 rounding) only, measured within 0.05 point, so anything near 0.3 is an export bug.
The .pt is validated with the exports' own letterbox (square at the export size for fixed-size files), so the
comparison measures the file, not the difference between rectangular and square batches.

Validation itself lives in the engine (utils.engine.validator.validate_files), which export.py passes in:
utils/deploy does not import the engine.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from utils.deploy import formats
from utils.general import LOGGER, UserError

INT8_MAX_DROP = 1.0  # points of mAP50-95 an INT8 file may lose against its fp32 file
FLOAT_MAX_DROP = 0.3  # points a float export may lose against the .pt


@dataclass(frozen=True)
class Limits:
    """The check's thresholds (points of mAP50-95) and whether a failure only warns (allow)."""
    int8: float = INT8_MAX_DROP
    float: float = FLOAT_MAX_DROP
    allow: bool = False


@dataclass
class Row:
    """One validated file: `ref` is the key of the row it is judged against (None for the .pt itself)."""
    key: str
    title: str
    path: Path
    ref: str | None
    limit: float | None
    map50: float = math.nan
    map: float = math.nan

    def drop(self, rows: dict[str, "Row"]) -> float:
        """Points of mAP50-95 lost against the reference row (negative: gained)."""
        return (rows[self.ref].map - self.map) * 100 if self.ref else 0.0

    def failed(self, rows: dict[str, "Row"]) -> bool:
        return self.limit is not None and not self.drop(rows) <= self.limit  # NaN fails too


def plan(out: dict[str, Path], pt: Path, limits: Limits) -> tuple[list[Row], list[str]]:
    """The rows to validate (the .pt first, then every written file this machine can run) and a note for each
    file skipped (its runtime is elsewhere or not installed)."""
    rows = [Row("pt", "PyTorch", pt, None, None)]
    notes = []
    for key, path in out.items():
        if path.suffix == ".pt":  # --include reparam: the single-head checkpoint, a float model
            rows.append(Row(key, "PyTorch (reparam)", path, "pt", limits.float))
            continue
        int8 = key.endswith("-int8")
        fmt = formats.get(key.removesuffix("-int8"))
        if not fmt.runs_here or fmt.load is None:
            notes.append(f"{path.name}: not checked ({fmt.title} runs on {fmt.runs_on})")
            continue
        missing = fmt.missing("run")
        if missing:
            notes.append(f"{path.name}: not checked (running it needs {', '.join(missing)})")
            continue
        ref = fmt.name if int8 and fmt.name in out else "pt"
        rows.append(Row(key, fmt.title + (" INT8" if int8 else ""), path, ref, limits.int8 if int8 else limits.float))
    return rows, notes


def table(rows: list[Row]) -> str:
    """The check as one fixed-width table, one line per file."""
    by_key = {r.key: r for r in rows}
    pt = by_key["pt"]
    head = ("format", "file", "MB", "mAP50", "mAP50-95", "vs .pt", "check")
    lines = []
    for r in rows:
        if r.ref is None:
            verdict = "reference"
        else:
            against = ".pt" if r.ref == "pt" else by_key[r.ref].path.name
            verdict = (f"{'FAILED' if r.failed(by_key) else 'ok'}: {-r.drop(by_key):+.2f} vs {against}, "
                       f"limit -{r.limit:.1f}")
        lines.append((r.title, r.path.name, f"{formats.size_mb(r.path):.1f}", f"{r.map50:.4f}", f"{r.map:.4f}",
                      "-" if r.ref is None else f"{(r.map - pt.map) * 100:+.2f}", verdict))
    width = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    right = {2, 3, 4, 5}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, width))).rstrip()
    return "\n".join(fmt(x) for x in [head, *lines])


def check(out: dict[str, Path], pt: Path, validate: Callable[[Sequence[Path]], tuple[list[tuple[float, float]], str]],
          limits: Limits = Limits()) -> list[Row]:
    """Validate `pt` and the exports in `out` ({key: path} as export.run returns it) with `validate` (paths ->
    ([(mAP50, mAP50-95)] in order, a description of the images used)), print the table, and fail (UserError,
    after removing the failed files) when a file lost more than its limit, unless limits.allow."""
    rows, notes = plan(out, pt, limits)
    maps, where = validate([r.path for r in rows])
    for r, (m50, m) in zip(rows, maps):
        r.map50, r.map = float(m50), float(m)
    by_key = {r.key: r for r in rows}
    LOGGER.info(f"\nAccuracy check on {where}:\n{table(rows)}" + "".join(f"\n{n}" for n in notes))
    failed = [r for r in rows if r.failed(by_key)]
    if not failed:
        return rows
    what = "; ".join(f"{r.path.name} lost {r.drop(by_key):.2f} points of mAP50-95 against "
                     f"{by_key[r.ref].path.name} (limit {r.limit:g})" for r in failed)
    if limits.allow:
        LOGGER.warning(f"WARNING: accuracy check FAILED, files kept (--allow-drop): {what}")
        return rows
    for r in failed:
        shutil.rmtree(r.path) if r.path.is_dir() else r.path.unlink(missing_ok=True)
    raise UserError(f"accuracy check FAILED: {what}; removed {', '.join(r.path.name for r in failed)} "
                    f"(--allow-drop keeps failed files, --int8-max-drop / --max-drop set the limits)")
