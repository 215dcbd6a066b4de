"""Small shared helpers: logging, user-facing errors, the CLI wrapper, run folders, size rounding.

Box geometry lives in utils/boxes.py."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # repository root

logging.basicConfig(format="%(message)s", level=logging.INFO)
LOGGER = logging.getLogger("yolov9mqa")


class UserError(Exception):
    """A mistake in user input (paths, YAML, flags): reported as one line, never as a traceback."""


def debug_enabled() -> bool:
    return os.environ.get("YOLO_DEBUG", "0") not in ("", "0", "false", "False")


def cli(main: Callable) -> Callable:
    """Wrap a script's main so user mistakes end with one clear line and exit code 1.

    Set YOLO_DEBUG=1 (or pass --debug) to see the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if "--debug" in sys.argv:
            sys.argv.remove("--debug")
            os.environ["YOLO_DEBUG"] = "1"
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if debug_enabled():
                raise
            report_error(f"ERROR: {e}")
            sys.exit(1)
        except KeyboardInterrupt:
            print("Interrupted.", file=sys.stderr)
            sys.exit(130)

    return wrapper


def report_error(line: str) -> None:
    """Print a user error once per job, not once per process. Under torchrun every rank writes it to the error
    file torchrun reads (TORCHELASTIC_ERROR_FILE), so torchrun's failure summary, the last thing it prints,
    ends with this line instead of "To enable traceback see ..."; only global rank 0 (or a rank that
    cannot hand the line to torchrun) also prints it to stderr."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            error_file = None
    if int(os.environ.get("RANK", "0") or 0) <= 0 or not error_file:
        print(line, file=sys.stderr)


def os_reason(e: OSError) -> str:
    """Readable reason even for OSError(errno.ENOSPC) raised without its text."""
    code = e.errno if isinstance(e.errno, int) else None
    if code is None and len(e.args) == 1 and isinstance(e.args[0], int):
        code = e.args[0]
    return e.strerror or (os.strerror(code) if code is not None else "") or str(e) or type(e).__name__


def file_mode() -> int:
    """Mode a plain open() would give (0o666 minus the umask): mkstemp makes 0o600 files, too strict for files
    shared with other users/containers. The umask is read, not set, so other threads are unaffected."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write a file whole or not at all: into a temp file beside it, flushed, then renamed over it. A failure
    (full disk, read-only folder) is one UserError naming the file and the reason; the previous file is left
    as it was and no temp file stays behind. Render into memory first (figures, tables): some writers
    (matplotlib's JPEG path) truncate silently when the disk fills, this one never does."""
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        kept = "; the previous file is unchanged" if existed else ""
        raise UserError(f"{path}: could not write ({os_reason(e)}){kept}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = False) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem = path.name
        used = {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()
        n = 2
        while f"{stem}{n}" in used:
            n += 1
        path = path.with_name(f"{stem}{n}")
    if mkdir:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a parent is a regular file, read-only or full disk
            raise UserError(f"{path}: cannot create output folder ({e.strerror or e})") from None
    return path


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of divisor that is >= x."""
    divisor = int(divisor)
    return int(np.ceil(x / divisor) * divisor)


def check_img_size(imgsz: int | list, stride: int = 32) -> int | list:
    """Round image size(s) up to a multiple of the model stride, warning if changed."""
    if isinstance(imgsz, (list, tuple)):
        out = [max(make_divisible(x, stride), stride) for x in imgsz]
        changed = out != list(imgsz)  # a tuple never equals a list: compare the values
    else:
        out = max(make_divisible(imgsz, stride), stride)
        changed = out != imgsz
    if changed:
        LOGGER.warning(f"WARNING: image size {imgsz} must be a multiple of stride {stride}, using {out}")
    return out


def _whole_number(v) -> int | None:
    """v as an int when it plainly is one (7, 7.0, np.int64(7), "7"), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        v = v.strip()
        return int(v) if v.isdigit() else None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


def image_hw(imgsz: int | tuple | list, flag: str = "--imgsz") -> tuple[int, int]:
    """One size or (h, w) -> (h, w): the one reading of an image-size argument for detection and export.
    Whole numbers in any spelling (128, 128.0, "128") are accepted; anything else is one clear error."""
    items = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz]
    sz = [_whole_number(v) for v in items]
    if len(sz) == 1:
        sz *= 2
    if len(sz) != 2 or any(v is None or v < 1 for v in sz):
        raise UserError(f"{flag} {imgsz!r}: give one size or two (h w), whole numbers of pixels, all positive")
    return sz[0], sz[1]
