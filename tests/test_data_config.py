"""Data YAML parsing: key variants, names/nc, path resolution, download never executed, synthetic sets."""
from pathlib import Path

import numpy as np
import cv2
import pytest

from utils.data import config as config_mod
from utils.data import load_data_config
from utils.data.synthetic import SYNTHETIC_GENERATORS, generate_shapes
from utils.general import ROOT, UserError


def make_split(root: Path, split: str, n: int = 2) -> None:
    for i in range(n):
        f = root / "images" / split / f"{split}{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(f), np.zeros((20, 30, 3), np.uint8))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_basic_and_names_dict(tmp_path):
    make_split(tmp_path, "train")
    make_split(tmp_path, "val")
    f = write_yaml(tmp_path / "d.yaml", f"path: {tmp_path}\ntrain: images/train\nval: images/val\n"
                                        "names:\n  0: cat\n  1: dog\nnc: 2\n")
    d = load_data_config(f)
    assert d.names == ["cat", "dog"] and d.nc == 2
    assert d.train == [tmp_path / "images" / "train"] and d.test is None
    assert d.path == tmp_path and d.yaml_file == str(f)


def test_key_variants_relative_to_yaml_and_lists(tmp_path):
    make_split(tmp_path, "train")
    make_split(tmp_path, "val")
    make_split(tmp_path, "extra")
    (tmp_path / "list.txt").write_text("images/val/val0.png\n")
    f = write_yaml(tmp_path / "d.yaml", "train: [images/train, images/extra]\nvalidation: list.txt\n"
                                        "class_list: [a, b, c]\nclass_num: 3\n")
    d = load_data_config(f)
    assert d.train == [tmp_path / "images" / "train", tmp_path / "images" / "extra"]
    assert d.val == [tmp_path / "list.txt"] and d.names == ["a", "b", "c"]
    # split relative to `path` first, then to the YAML's folder
    sub = tmp_path / "root"
    make_split(sub, "train")
    f2 = write_yaml(tmp_path / "d2.yaml", "path: root\ntrain: images/train\nval: images/val\nnames: [x]\n")
    d2 = load_data_config(f2)
    assert d2.train == [sub / "images" / "train"] and d2.val == [tmp_path / "images" / "val"]


@pytest.mark.parametrize("text,match", [
    ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", "nc=3 but 2 names"),
    ("train: images/train\nval: images/val\n", "needs 'names'"),
    ("val: images/val\nnames: [a]\n", "missing 'train'"),
    ("train: images/train\nnames: [a]\n", "missing 'val'"),
    ("train: images/nowhere\nval: images/val\nnames: [a]\n", "train path not found"),
    ("train: [unclosed\n", "invalid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("train: images/train\nval: images/val\nnames: [a]\nsynthetic: evil\n", "unknown synthetic generator"),
])
def test_user_errors(tmp_path, text, match):
    make_split(tmp_path, "train")
    make_split(tmp_path, "val")
    with pytest.raises(UserError, match=match):
        load_data_config(write_yaml(tmp_path / "d.yaml", text))


def test_validation_needs_only_its_split(tmp_path, one_thread):
    """A machine holding only the val images (the YAML's train path missing, or no train key) validates; a
    training with the same YAML still says the train path is missing."""
    from helpers import seeded_tiny_checkpoint
    from utils.engine.validator import run_validation
    generate_shapes(tmp_path / "ds", n_train=0, n_val=3, seed=1, nc=2)
    w = seeded_tiny_checkpoint(tmp_path / "w.pt", ["circle", "rectangle"])
    head = f"path: {tmp_path / 'ds'}\nnames: [circle, rectangle]\nval: images/val\n"
    for text in (head + "train: images/train_elsewhere\n", head):
        f = write_yaml(tmp_path / "d.yaml", text)
        r = run_validation(data=str(f), weights=str(w), imgsz=64, workers=0, project=str(tmp_path / "val"),
                           plots=False)
        assert r.seen == 3
        d = load_data_config(f, need=("val",))
        assert d.train is None and d.val == [tmp_path / "ds" / "images" / "val"]
        with pytest.raises(UserError, match="train"):  # training needs it
            load_data_config(f)
        with pytest.raises(UserError, match="missing 'test' split"):  # the split asked for must be there
            run_validation(data=str(f), weights=str(w), imgsz=64, task="test", workers=0,
                           project=str(tmp_path / "val"))
    assert load_data_config(f, need=()).names == ["circle", "rectangle"]  # names only (detect's --data)


def test_missing_yaml_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data_config(tmp_path / "none.yaml")


def test_download_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    f = write_yaml(tmp_path / "d.yaml", f"train: images/train\nval: images/val\nnames: [a]\n"
                                        f"download: |\n  import pathlib; pathlib.Path('{marker}').write_text('x')\n")
    with pytest.raises(UserError, match="never runs"):
        load_data_config(f)
    assert not marker.exists()
    make_split(tmp_path, "train")
    make_split(tmp_path, "val")
    d = load_data_config(f)  # data present: download key simply ignored
    assert d.download_ignored and not marker.exists()


def test_synthetic_generated_when_missing(tmp_path, monkeypatch):
    calls = []

    def small(root):
        calls.append(root)
        return generate_shapes(root, n_train=6, n_val=3, seed=1)

    monkeypatch.setitem(SYNTHETIC_GENERATORS, "shapes", small)
    f = write_yaml(tmp_path / "s.yaml", "path: gen/shapes\ntrain: images/train\nval: images/val\n"
                                        "synthetic: shapes\nnames: [circle, rectangle, triangle, star, cross]\n")
    d = load_data_config(f)
    assert calls == [tmp_path / "gen" / "shapes"]
    assert len(list(d.train[0].glob("*.jpg"))) == 6 and len(list(d.val[0].glob("*.jpg"))) == 3
    load_data_config(f)
    assert len(calls) == 1  # second load reuses the generated set


def test_bundled_shapes_yaml_points_into_root_datasets():
    text = (ROOT / "data" / "shapes.yaml").read_text()
    import yaml
    raw = yaml.safe_load(text)
    assert raw["synthetic"] == "shapes" and "download" not in raw
    assert config_mod._resolve_root(raw["path"], ROOT / "data") == ROOT / "datasets" / "shapes"
    assert len(raw["names"]) == 5
