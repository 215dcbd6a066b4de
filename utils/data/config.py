"""Data YAML loading: resolve split paths, names/nc, synthetic datasets; never execute `download:`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.general import LOGGER, ROOT, UserError

from .synthetic import SYNTHETIC_GENERATORS, shapes_complete

SPLITS = ("train", "val", "test")
# Key spellings other tools use -> ours
KEY_ALIASES = {"validation": "val", "valid": "val", "class_list": "names", "class_names": "names",
               "class_num": "nc", "num_classes": "nc", "testing": "test"}


@dataclass(frozen=True)
class DataConfig:
    """A data YAML, resolved once: split paths exist, names and nc agree. Read-only."""

    yaml_file: str
    path: Path
    train: list[Path] | None  # None only when the caller did not need it (e.g. val_dual.py on a val-only copy)
    val: list[Path] | None
    test: list[Path] | None
    names: list[str]
    train_defaults: dict = field(default_factory=dict)  # e.g. epochs/imgsz for a short bundled run
    coco_json: str | None = None
    download_ignored: bool = False  # a `download:` key was present and (as always) not executed

    @property
    def nc(self) -> int:
        return len(self.names)

    def split(self, name: str) -> list[Path] | None:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _find_yaml(path: str | Path) -> Path:
    """Accept an existing path, or a bare name of a bundled YAML (e.g. 'shapes.yaml' -> ROOT/data/)."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    for cand in (ROOT / "data" / p, ROOT / "data" / p.name, ROOT / p):
        if cand.is_file():
            return cand.resolve()
    raise UserError(f"{path}: data YAML not found")


def _parse_names(names: Any, nc: Any, yaml_file: Path) -> list[str]:
    """names may be a list or {id: name}; nc optional but must agree when given."""
    if isinstance(names, dict):
        try:
            ids = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise UserError(f"{yaml_file}: 'names' keys must be integer class ids") from None
        if ids and (min(ids) < 0):
            raise UserError(f"{yaml_file}: 'names' has a negative class id")
        n = max(ids) + 1 if ids else 0
        missing = [i for i in range(n) if i not in ids]
        if missing:
            LOGGER.warning(f"WARNING: {yaml_file}: names has no entry for class ids {missing}, using 'class<id>'")
        out = [ids.get(i, f"class{i}") for i in range(n)]
    elif isinstance(names, (list, tuple)):
        out = [str(v) for v in names]
    elif names is None:
        if nc is None:
            raise UserError(f"{yaml_file}: needs 'names' (list or {{id: name}}) or 'nc'")
        out = []
    else:
        raise UserError(f"{yaml_file}: 'names' must be a list or a mapping id -> name, got {type(names).__name__}")
    if nc is not None:
        try:
            nc_i = int(nc)
        except (TypeError, ValueError):
            raise UserError(f"{yaml_file}: 'nc' must be an integer, got {nc!r}") from None
        if not out:
            out = [str(i) for i in range(nc_i)]
        elif nc_i != len(out):
            raise UserError(f"{yaml_file}: nc={nc_i} but {len(out)} names are given")
    if not out:
        raise UserError(f"{yaml_file}: no class names")
    return out


def _resolve_root(value: Any, yaml_dir: Path) -> Path:
    """Dataset root: absolute as is; relative against the YAML's folder, else ROOT, else the cwd."""
    if value in (None, ""):
        return yaml_dir
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return p
    for base in (yaml_dir, ROOT, Path.cwd()):
        if (base / p).exists():
            return (base / p).resolve()
    return (yaml_dir / p).resolve()


def _resolve_split(value: Any, root: Path, yaml_dir: Path, key: str, yaml_file: Path) -> list[Path] | None:
    """A split is a folder, a .txt list, an image, or a list of them; relative -> root, then YAML folder."""
    if value in (None, "", []):
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        p = Path(str(item)).expanduser()
        cands = [p] if p.is_absolute() else [root / p, yaml_dir / p]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            raise UserError(f"{yaml_file}: {key} path not found: {cands[0]}")
        out.append(found.resolve())
    return out


def _download_hint(download: Any, yaml_file: Path, missing: Path) -> str:
    text = str(download).strip().splitlines()
    hint = text[0][:200] if text else ""
    kind = "a script" if len(text) > 1 or "import " in str(download) else "a URL/command"
    return (f"{yaml_file}: dataset not found at {missing}. This project never runs the YAML's 'download:' "
            f"({kind}: {hint!r}); fetch the data yourself and place it so the train/val paths exist")


def load_data_config(path: str | Path, need: tuple[str, ...] = ("train", "val")) -> DataConfig:
    """Read and check a data YAML.

    `need`: the splits this job reads; they must be given and exist (training: train and val; validation: the
    split it validates; class names only: none). Other splits are resolved when present, else None, so a
    machine holding only the val images can validate. Key variants from other tools (validation, class_list,
    class_num) are accepted. A whitelisted `synthetic:` generator (e.g. 'shapes') creates the dataset when its
    folders are missing.
    """
    yaml_file = _find_yaml(path)
    try:
        raw = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{yaml_file}: invalid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{yaml_file}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{yaml_file}: expected a mapping with train/val/names keys")
    data: dict[str, Any] = {}
    for k, v in raw.items():
        k2 = KEY_ALIASES.get(str(k), str(k))
        if k2 in data and k2 != k:
            continue  # the canonical key wins over an alias
        data[k2] = v
    for key in need:
        if data.get(key) in (None, ""):
            raise UserError(f"{yaml_file}: missing '{key}' split")
    names = _parse_names(data.get("names"), data.get("nc"), yaml_file)
    yaml_dir = yaml_file.parent
    root = _resolve_root(data.get("path"), yaml_dir)

    synth = data.get("synthetic")
    if synth is not None:
        if not isinstance(synth, str) or synth not in SYNTHETIC_GENERATORS:
            raise UserError(f"{yaml_file}: unknown synthetic generator {synth!r}; "
                            f"known: {sorted(SYNTHETIC_GENERATORS)}")
        if not shapes_complete(root):
            LOGGER.info(f"Generating synthetic '{synth}' dataset into {root} (first use, no download)...")
            SYNTHETIC_GENERATORS[synth](root)

    splits: dict[str, list[Path] | None] = {}
    for key in SPLITS:
        try:
            splits[key] = _resolve_split(data.get(key), root, yaml_dir, key, yaml_file)
        except UserError:
            if key in need:
                if "download" in data:
                    raise UserError(_download_hint(data["download"], yaml_file, root)) from None
                raise
            if key == "test":
                LOGGER.warning(f"WARNING: {yaml_file}: test split not found, ignoring it")
            splits[key] = None
    defaults = data.get("train_defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"{yaml_file}: train_defaults must be a mapping (e.g. epochs: 20)")
    coco_json = data.get("coco_json")
    return DataConfig(yaml_file=str(yaml_file), path=root, train=splits["train"], val=splits["val"],
                      test=splits["test"], names=names, train_defaults=dict(defaults),
                      coco_json=str(coco_json) if coco_json else None, download_ignored="download" in data)
