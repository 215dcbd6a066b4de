"""Reliability end to end: messy data through train_dual.py + val_dual.py, broken configuration, hostile files,
disk full / unwritable run folders. Every bad file is generated here (nothing binary is committed).

Interrupted runs (SIGKILL mid-epoch / mid-save, resume) live in tests/test_reliability_kill.py.
"""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import limit
from utils.data import generate_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--cfg", "gelan-t.yaml", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--seed", "1"]
NAMES = ["circle", "rectangle", "triangle", "star", "cross"]
GOOD = "0 0.5 0.5 0.4 0.3\n"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "YOLO_DEBUG": "0"}


def run_script(script: str, args: list, cwd: Path, timeout: int = 300, env: dict | None = None):
    e = {**os.environ, **ENV, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=limit(timeout))


def error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]


def assert_one_line_error(r, *words: str) -> str:
    """Exit code != 0, no traceback, exactly one 'ERROR:' line containing every word."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    errs = error_lines(r)
    assert len(errs) == 1, out[-3000:]
    for w in words:
        assert w in errs[0], (w, errs[0])
    return errs[0]


# ---------------------------------------------------------------------------------------------- messy data

def _img(rng, w=96, h=72) -> np.ndarray:
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), (255, 255, 255), -1)
    return img


def _write(path: Path, arr: np.ndarray) -> None:
    """cv2.imencode + write_bytes: works for non-ASCII paths too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    path.write_bytes(buf.tobytes())


def plant_messy(root: Path, split: str, seed: int = 0) -> dict:
    """Add one of every kind of broken image/label to root/{images,labels}/split.

    Returns what the summary must count: {'images', 'backgrounds', 'corrupt', 'duplicates'} added by the planted
    files, plus 'reported': file name -> word the (single) warning about it must contain.
    """
    rng = np.random.default_rng(seed)
    im, lb = root / "images" / split, root / "labels" / split
    im.mkdir(parents=True, exist_ok=True)
    lb.mkdir(parents=True, exist_ok=True)
    reported: dict[str, str] = {}

    def label(stem: str, text: str) -> None:
        (lb / f"{stem}.txt").write_text(text, encoding="utf-8")

    # --- broken images (dropped: corrupt) ---
    full = cv2.imencode(".jpg", _img(rng))[1].tobytes()
    (im / "trunc.jpg").write_bytes(full[: len(full) // 2])
    reported["trunc.jpg"] = "truncated"
    (im / "zero.jpg").write_bytes(b"")
    reported["zero.jpg"] = "zero-byte"
    (im / "text.jpg").write_text("I am a text file, not a JPEG\n")
    reported["text.jpg"] = "unreadable"
    _write(im / "onepx.png", np.full((1, 1, 3), 128, np.uint8))
    reported["onepx.png"] = "too small"
    for s in ("trunc", "zero", "text", "onepx"):
        label(s, GOOD)
    # --- odd but valid images (kept) ---
    _write(im / "gray.png", cv2.cvtColor(_img(rng), cv2.COLOR_BGR2GRAY))
    _write(im / "rgba.png", cv2.cvtColor(_img(rng), cv2.COLOR_BGR2BGRA))
    _write(im / "deep16.png", _img(rng).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    Image.fromarray(_img(rng, 80, 48)).save(im / "exif.jpg", exif=exif.tobytes(), quality=90)
    _write(im / "wide.png", np.tile(_img(rng, 200, 20), (1, 20, 1)))  # 4000 x 20
    _write(im / "with space.jpg", _img(rng))
    _write(im / "naïve ünïcödé 猫.jpg", _img(rng))
    for s in ("gray", "rgba", "deep16", "exif", "with space", "naïve ünïcödé 猫"):
        label(s, GOOD)
    label("wide", "1 0.5 0.5 0.3 0.8\n")
    # --- bad label files (image dropped: corrupt) ---
    bad = {
        "lb_nonnum": ("0 0.5 abc 0.2 0.2\n", "non-numeric"),
        "lb_4col": ("0 0.5 0.5 0.2\n", "4 columns"),
        "lb_nan": ("0 nan 0.5 0.2 0.2\n", "NaN"),
        "lb_inf": ("0 0.5 0.5 inf 0.2\n", "NaN or inf"),
        "lb_over1": ("0 1.4 0.5 0.2 0.2\n", "outside [0, 1]"),
        "lb_below0": ("0 0.5 -0.3 0.2 0.2\n", "outside [0, 1]"),
        "lb_negsize": ("0 0.5 0.5 -0.2 0.2\n", "negative box size"),
        "lb_clsbig": (f"{len(NAMES)} 0.5 0.5 0.2 0.2\n", "outside 0..4"),
        "lb_clsneg": ("-1 0.5 0.5 0.2 0.2\n", "outside 0..4"),
        "lb_clsfrac": ("1.5 0.5 0.5 0.2 0.2\n", "not an integer"),
    }
    for stem, (text, why) in bad.items():
        _write(im / f"{stem}.png", _img(rng))
        label(stem, GOOD + text)  # one bad row spoils the file even after good rows
        reported[f"{stem}.txt"] = why
    # --- label files that are repaired or mean background (kept) ---
    kept_lb = {
        "lb_7col": "2 0.1 0.1 0.5 0.1 0.3 0.6\n",  # a polygon (3 points) -> its bounding box
        "lb_zerosize": GOOD + "1 0.5 0.5 0.0 0.2\n",  # zero-size row removed, image kept
        "lb_zeroonly": "1 0.3 0.3 0.2 0.0\n",  # only a zero-size row -> background
        "lb_dup": GOOD + GOOD + "1 0.2 0.2 0.1 0.1\n" + GOOD,  # 2 duplicate rows
        "lb_empty": "",  # background
        "lb_blank": "\n \n",  # background
    }
    for stem, text in kept_lb.items():
        _write(im / f"{stem}.png", _img(rng))
        label(stem, text)
    reported["lb_zerosize.txt"] = "zero-size"
    reported["lb_zeroonly.txt"] = "zero-size"
    reported["lb_dup.txt"] = "2 duplicate"
    _write(im / "lb_missing.png", _img(rng))  # no label file at all -> background
    label("ghost_a", GOOD)  # labels without images
    label("ghost_b", GOOD)
    return {"images": 6 + 1 + len(kept_lb) + 1, "backgrounds": 4, "corrupt": 4 + len(bad), "duplicates": 2,
            "reported": reported}


def _generated_counts(root: Path, split: str) -> tuple[int, int]:
    files = sorted((root / "labels" / split).glob(f"{split}_*.txt"))
    return len(files), sum(not f.read_text().strip() for f in files)


def _summary(text: str, prefix: str) -> tuple[int, int, int, int]:
    m = re.findall(rf"{prefix}(\d+) images, (\d+) backgrounds, (\d+) corrupt, (\d+) duplicates removed", text)
    assert len(m) == 1, (prefix, m, text[-3000:])
    return tuple(int(x) for x in m[0])


def _check_reported_once(text: str, prefix: str, reported: dict) -> None:
    warn = [ln for ln in text.splitlines() if ln.startswith(f"{prefix}WARNING:")]
    for name, why in reported.items():
        hits = [ln for ln in warn if f"{os.sep}{name}:" in ln]
        assert len(hits) == 1, (name, hits)
        assert why in hits[0], (name, why, hits[0])
    assert not [ln for ln in warn if re.match(rf"{prefix}WARNING: (train|val|test): ", ln)]  # no double prefix
    orphans = [ln for ln in warn if "label files have no image" in ln]
    assert len(orphans) == 1 and "2 label files" in orphans[0]


@pytest.fixture(scope="module")
def messy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    ds = root / "ds"
    generate_shapes(ds, n_train=16, n_val=6, seed=5)
    exp = {s: plant_messy(ds, s, seed=i) for i, s in enumerate(("train", "val"))}
    data = root / "messy.yaml"
    data.write_text(yaml.safe_dump({"path": str(ds), "train": "images/train", "val": "images/val", "names": NAMES}))
    return data, ds, exp


def test_messy_data_train_then_val(messy_data, tmp_path):
    data, ds, exp = messy_data
    r = run_script("train_dual.py", [*TINY, "--data", data, "--epochs", "1", "--project", tmp_path, "--name", "m"],
                   tmp_path, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    for split, prefix in (("train", "train: "), ("val", "val: ")):
        n_gen, n_gen_bg = _generated_counts(ds, split)
        e = exp[split]
        assert _summary(out, prefix) == (n_gen + e["images"], n_gen_bg + e["backgrounds"], e["corrupt"],
                                         e["duplicates"])
        _check_reported_once(out, prefix, e["reported"])
    best = tmp_path / "m" / "weights" / "best.pt"
    ck = torch.load(best, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert (tmp_path / "m" / "train_batch0.jpg").is_file()  # plots survive odd file names

    r = run_script("val_dual.py", ["--weights", best, "--data", data, "--imgsz", 64, "--batch-size", 8,
                                   "--workers", 0, "--project", tmp_path, "--name", "v"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    n_gen, n_gen_bg = _generated_counts(ds, "val")
    e = exp["val"]
    assert _summary(out, "val: ") == (n_gen + e["images"], n_gen_bg + e["backgrounds"], e["corrupt"], e["duplicates"])
    _check_reported_once(out, "val: ", e["reported"])
    assert re.search(r"\ball\s+\d+\s+\d+", out), out[-2000:]  # the metrics table was printed


# ---------------------------------------------------------------------------------------------- configuration

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    generate_shapes(root / "ds", n_train=8, n_val=4, seed=2)
    data = root / "small.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "ds"), "train": "images/train", "val": "images/val",
                                    "names": NAMES}))
    return data


@pytest.fixture()
def run_cli(monkeypatch, capsys):
    """Run a script's main in-process (fast: no torch import per case) as the shell would: -> (exit code, stderr)."""
    import importlib
    monkeypatch.delenv("YOLO_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine

    def call(script: str, argv: list) -> tuple[int, str]:
        mod = importlib.import_module(script)
        from utils.general import cli
        fn = mod.main if hasattr(mod.main, "__wrapped__") else cli(mod.main)
        capsys.readouterr()
        try:
            fn([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    yield call
    torch.set_num_threads(threads)


def one_error(code: int, err: str, *words: str) -> str:
    assert code not in (0, None), err[-2000:]
    errs = [ln for ln in err.splitlines() if ln.startswith("ERROR:")]
    assert len(errs) == 1, err[-2000:]
    for w in words:
        assert w in errs[0], (w, errs[0])
    return errs[0]


BAD_DATA = {  # name -> (YAML text (path filled in), words the error must contain)
    "no_val": ("path: {p}\ntrain: images/train\nnames: [a, b, c, d, e]\n", ["missing 'val'"]),
    "no_train": ("path: {p}\nval: images/val\nnames: [a, b, c, d, e]\n", ["missing 'train'"]),
    "no_names": ("path: {p}\ntrain: images/train\nval: images/val\n", ["'names'"]),
    "wrong_path": ("path: {p}\ntrain: images/nowhere\nval: images/val\nnames: [a, b, c, d, e]\n",
                   ["train path not found", "nowhere"]),
    "nc_mismatch": ("path: {p}\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b, c, d, e]\n",
                    ["nc=3", "5 names"]),
    "syntax": ("path: {p}\ntrain: [images/train\nval: images/val\n", ["invalid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_yaml_one_error_line(case, small_data, tmp_path, run_cli):
    text, words = BAD_DATA[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text.format(p=small_data.parent / "ds"))
    code, err = run_cli("train_dual", [*TINY, "--data", f, "--epochs", 1, "--project", tmp_path / "runs"])
    one_error(code, err, f.name, *words)
    if case in ("syntax", "no_val"):  # val_dual.py reads data YAMLs through the same code (train's path: unused)
        w = tmp_path / "w.pt"
        w.write_bytes(b"x")  # never loaded: the data YAML is read before the weights
        code, err = run_cli("val_dual", ["--weights", w, "--data", f, "--project", tmp_path / "val"])
        one_error(code, err, f.name, *words)


def test_bad_model_yaml_and_hyp_one_error_line(small_data, tmp_path, run_cli):
    cfg = yaml.safe_load((ROOT / "models/detect/gelan-t.yaml").read_text())
    cfg["backbone"][1][2] = "NoSuchBlock"
    bad_cfg = tmp_path / "bad-model.yaml"
    bad_cfg.write_text(yaml.safe_dump(cfg))
    base = ["--imgsz", 64, "--batch-size", 8, "--workers", 0, "--data", small_data, "--epochs", 1,
            "--project", tmp_path / "runs", "--noplots"]
    code, err = run_cli("train_dual", ["--cfg", bad_cfg, *base])
    one_error(code, err, "unknown module", "NoSuchBlock")
    code, err = run_cli("train_dual", ["--cfg", tmp_path / "missing-model.yaml", *base])
    one_error(code, err, "missing-model.yaml", "not found")
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    del hyp["dfl"]
    bad_hyp = tmp_path / "hyp.yaml"
    bad_hyp.write_text(yaml.safe_dump(hyp))
    code, err = run_cli("train_dual", ["--cfg", "gelan-t.yaml", "--hyp", bad_hyp, *base])
    one_error(code, err, "hyp.yaml", "missing hyperparameter", "dfl")
    bad_hyp.write_text("lr0: [0.01\n")
    code, err = run_cli("train_dual", ["--cfg", "gelan-t.yaml", "--hyp", bad_hyp, *base])
    one_error(code, err, "invalid YAML")


def test_cli_error_has_no_traceback(tmp_path):
    """A real process: the user sees one line and exit code 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [oops\n")
    args = [*TINY, "--data", bad, "--epochs", 1, "--project", tmp_path]
    r = run_script("train_dual.py", args, tmp_path)
    assert_one_line_error(r, "bad.yaml", "invalid YAML")
    assert r.returncode == 1


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    """YOLO_DEBUG=1 (what --debug sets) lets the UserError through with its traceback."""
    import train_dual
    from utils.general import UserError
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [oops\n")
    monkeypatch.setenv("YOLO_DEBUG", "1")
    with pytest.raises(UserError, match="invalid YAML"):
        train_dual.main([*TINY, "--data", str(bad), "--epochs", "1", "--project", str(tmp_path)])
    monkeypatch.setattr(sys, "argv", ["train_dual.py", "--debug"])
    monkeypatch.delenv("YOLO_DEBUG")
    with pytest.raises(UserError, match="invalid YAML"):
        train_dual.main([*TINY, "--data", str(bad), "--epochs", "1", "--project", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- hostile files

class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_code_running_checkpoint_is_refused(small_data, tmp_path, run_cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model_yaml": {}, "model": _Evil(marker), "epoch": 0}, evil)
    assert not marker.exists()
    img = tmp_path / "img.jpg"
    _write(img, _img(np.random.default_rng(0)))
    calls = {
        "train_dual": [*TINY, "--weights", evil, "--data", small_data, "--epochs", 1, "--project", tmp_path / "t",
                       "--noplots"],
        "val_dual": ["--weights", evil, "--data", small_data, "--imgsz", 64, "--project", tmp_path / "v"],
        "detect_dual": ["--weights", evil, "--source", img, "--imgsz", 64, "--project", tmp_path / "d"],
    }
    for script, argv in calls.items():
        code, err = run_cli(script, argv)
        one_error(code, err, "evil.pt", "a checkpoint of another project (it pickles code: posix.system)")
        assert not marker.exists(), script
    # the same file fed to --resume
    code, err = run_cli("train_dual", ["--resume", evil])
    one_error(code, err, "evil.pt")
    assert not marker.exists()


def test_not_a_checkpoint_says_what_the_file_is(small_data, tmp_path, run_cli):
    """Files that are not checkpoints of this project: one line saying what the file is and what to do, never
    torch's text about re-running with weights_only=False."""
    import warnings
    from models.yolo import DetectionModel
    from utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from utils.general import UserError
    conv = torch.nn.Conv2d(3, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(conv, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "onnx.pt"), dynamo=False)
        torch.jit.save(torch.jit.trace(conv, torch.zeros(1, 3, 8, 8)), str(tmp_path / "torchscript.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    whole = save_checkpoint(make_checkpoint(DetectionModel("gelan-t.yaml", nc=2)), tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"model": conv}, tmp_path / "pickled.pt")
    torch.save(conv.state_dict(), tmp_path / "state_dict.pt")
    cases = {
        "empty.pt": "empty file (0 bytes), not a checkpoint",
        "random.pt": "not a checkpoint (neither a torch zip archive nor an ONNX model",
        "onnx.pt": "an ONNX model, not a checkpoint: name it .onnx",
        "torchscript.pt": "a TorchScript file, not a checkpoint: name it .torchscript",
        "truncated.pt": "a truncated or damaged zip archive",
        "pickled.pt": "a checkpoint of another project (it pickles code: torch.nn.modules.conv.Conv2d)",
        "state_dict.pt": "a torch file but not a checkpoint of this project (it holds weight, bias",
    }
    for name, words in cases.items():
        with pytest.raises(UserError) as e:
            load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: {words}"), msg
        assert "weights_only" not in msg and "Re-running" not in msg and "EOFError" not in msg, msg
    code, err = run_cli("val_dual", ["--weights", tmp_path / "empty.pt", "--data", small_data,
                                     "--project", tmp_path / "v"])
    one_error(code, err, "empty.pt: empty file (0 bytes)")


@pytest.mark.parametrize("download", [
    "bash -c 'touch {m}'",
    "import pathlib\npathlib.Path('{m}').write_text('x')\n",
])
def test_download_key_is_never_executed(download, tmp_path, run_cli):
    marker = tmp_path / "pwned"
    f = tmp_path / "dl.yaml"
    f.write_text(yaml.safe_dump({"path": str(tmp_path / "absent"), "train": "images/train", "val": "images/val",
                                 "names": ["a"], "download": download.format(m=marker)}))
    code, err = run_cli("train_dual", [*TINY, "--data", f, "--epochs", 1, "--project", tmp_path / "runs"])
    one_error(code, err, "dl.yaml", "never runs", "fetch the data yourself")
    w = tmp_path / "w.pt"
    w.write_bytes(b"x")  # never loaded: the data YAML is read before the weights
    code, err = run_cli("val_dual", ["--weights", w, "--data", f, "--project", tmp_path / "val"])
    one_error(code, err, "dl.yaml", "never runs")
    assert not marker.exists()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def test_txt_list_outside_dataset_is_only_read(tmp_path):
    """A .txt split listing images of another folder: label cache and --cache disk files stay in our dataset."""
    ext = tmp_path / "external"
    generate_shapes(ext, n_train=8, n_val=4, seed=7)
    ds = tmp_path / "mine"
    ds.mkdir()
    for split in ("train", "val"):
        files = sorted((ext / "images" / split).glob("*.jpg"))
        # relative paths that climb out of the dataset folder, and absolute ones
        lines = [os.path.relpath(f, ds) if i % 2 else str(f) for i, f in enumerate(files)]
        (ds / f"{split}.txt").write_text("\n".join(lines) + "\n")
    data = ds / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(ds), "train": "train.txt", "val": "val.txt", "names": NAMES}))
    before = _snapshot(ext)
    r = run_script("train_dual.py", [*TINY, "--data", data, "--epochs", 1, "--cache", "disk", "--noplots",
                                     "--project", tmp_path / "runs", "--name", "x"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert _snapshot(ext) == before  # nothing written, nothing touched
    assert (ds / "train.cache").is_file() and (ds / "val.cache").is_file()
    npy = sorted((ds / "train.npy-cache").glob("*.npy"))
    assert len(npy) == 8
    assert np.load(npy[0], allow_pickle=False).dtype == np.uint8
    assert "Cached images (disk" in r.stdout + r.stderr
    # reading the split again hits our cache and still writes nothing outside
    from utils.data import YOLODataset
    again = YOLODataset(ds / "train.txt", imgsz=64, nc=len(NAMES), cache="disk", augment=True)  # as training reads
    assert again.cache_file == str(ds / "train.cache") and again.counts.images == 8
    assert sorted(again.npy_files) == [str(f) for f in npy]
    assert _snapshot(ext) == before


# ---------------------------------------------------------------------------------------------- disk full

def _tiny_ckpt(v: float) -> dict:
    return {"model_yaml": {"nc": 1}, "model": {"w": torch.full((1000,), v)}, "epoch": 0}


@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_disk_full_keeps_previous_checkpoint(where, tmp_path, monkeypatch):
    import utils.checkpoint as C
    from utils.general import UserError
    path = tmp_path / "weights" / "last.pt"
    C.save_checkpoint(_tiny_ckpt(1.0), path)
    good = path.read_bytes()

    def full(*a, **k):
        if where == "torch.save":
            a[1].write(b"partial bytes")  # some data got out before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "torch.save":
        monkeypatch.setattr(C.torch, "save", full)
    else:
        monkeypatch.setattr(C.os, "replace", full)
    with pytest.raises(UserError) as ei:
        C.save_checkpoint(_tiny_ckpt(2.0), path)
    msg = str(ei.value)
    assert "last.pt" in msg and "No space left on device" in msg and "previous file is unchanged" in msg
    assert "\n" not in msg
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["model"]["w"][0] == 1.0


def test_errno_without_text_is_readable(tmp_path, monkeypatch):
    import utils.checkpoint as C
    from utils.general import UserError

    def full(*a, **k):
        raise OSError(errno.ENOSPC)  # no strerror given

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(UserError, match="No space left on device"):
        C.save_checkpoint(_tiny_ckpt(1.0), tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


def test_stale_temp_files_are_cleaned(tmp_path):
    import utils.checkpoint as C
    w = tmp_path / "weights"
    w.mkdir()
    stale = w / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1, 1))
    other = w / ".best.pt.zzz.tmp"  # another target's temp: left alone by a last.pt save
    other.write_bytes(b"x")
    os.utime(other, (1, 1))
    C.save_checkpoint(_tiny_ckpt(1.0), w / "last.pt")
    assert not stale.exists() and other.exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (w / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0o600
    assert torch.load(w / "last.pt", weights_only=True)["epoch"] == 0


def test_checkpoint_folder_that_cannot_be_created(tmp_path):
    import utils.checkpoint as C
    from utils.general import UserError
    f = tmp_path / "file"
    f.write_text("a regular file")
    with pytest.raises(UserError, match="could not write checkpoint"):
        C.save_checkpoint(_tiny_ckpt(1.0), f / "weights" / "last.pt")


def test_run_folder_under_a_regular_file(small_data, tmp_path, run_cli):
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    code, err = run_cli("train_dual", [*TINY, "--data", small_data, "--epochs", 1, "--noplots",
                                       "--project", blocker / "runs"])
    one_error(code, err, "blocker", "cannot create")
    img = tmp_path / "img.jpg"
    _write(img, _img(np.random.default_rng(0)))
    w = tmp_path / "w.pt"
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    m = DetectionModel("gelan-t.yaml", nc=len(NAMES))
    save_checkpoint(make_checkpoint(m, names=NAMES), w)
    code, err = run_cli("val_dual", ["--weights", w, "--data", small_data, "--imgsz", 64, "--workers", 0,
                                     "--project", blocker / "val"])
    one_error(code, err, "blocker", "cannot create")
    code, err = run_cli("detect_dual", ["--weights", w, "--source", img, "--imgsz", 64, "--project", blocker / "det"])
    one_error(code, err, "blocker", "cannot create")
    assert blocker.read_text() == "I am a file"
