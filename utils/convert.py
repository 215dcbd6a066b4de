"""Convert COCO JSON or Pascal VOC XML annotations to YOLO labels (+ a data YAML).

    python -m utils.convert --from coco --src instances_train.json --out datasets/mine --split train
    python -m utils.convert --from voc --src VOC/Annotations --out datasets/voc --split train [--names a,b]

Labels go to OUT/labels/SPLIT/<image stem>.txt; put (or --images copy) the images in OUT/images/SPLIT.
A data YAML (OUT/data.yaml) with the class names is written or updated with the split.
"""
from __future__ import annotations

import argparse
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from utils.general import LOGGER, UserError, cli


def _write_labels(out_dir: Path, split: str, per_image: dict[str, list]) -> Path:
    lb_dir = out_dir / "labels" / split
    lb_dir.mkdir(parents=True, exist_ok=True)
    for stem, rows in per_image.items():
        (lb_dir / f"{stem}.txt").write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows))
    return lb_dir


def existing_names(out_dir: Path) -> list[str] | None:
    """The class names of an existing OUT/data.yaml (None when there is none yet)."""
    f = out_dir / "data.yaml"
    if not f.is_file():
        return None
    old = (yaml.safe_load(f.read_text()) or {}).get("names")
    if old is None:
        return None
    return [str(old[k]) for k in sorted(old)] if isinstance(old, dict) else [str(n) for n in old]


def write_data_yaml(out_dir: Path, split: str, names: list[str]) -> Path:
    """Create or update OUT/data.yaml; names must agree with an existing file (converters check that before
    they write any label, so labels are never numbered against other names)."""
    f = out_dir / "data.yaml"
    data = {}
    if f.is_file():
        data = yaml.safe_load(f.read_text()) or {}
        old = existing_names(out_dir)
        if old is not None and old != list(names):
            raise UserError(f"{f}: existing names {old} differ from converted names {names}")
    data.update(path=str(out_dir.resolve()), names={i: n for i, n in enumerate(names)}, nc=len(names))
    data[split] = f"images/{split}"
    missing = []
    for key in ("train", "val"):  # keep the YAML loadable: the converted split stands in for a missing one
        data.setdefault(key, f"images/{split}")
        if key != split and data[key] == f"images/{split}":
            missing.append(key)
    notes = [f"{k}: images/{split} stands in until the {k} annotations are converted (--split {k})" for k in missing]
    f.write_text(yaml.safe_dump(data, sort_keys=False) + "".join(f"# {n}\n" for n in notes))
    for k in missing:
        LOGGER.warning(f"WARNING: {f}: no {k} split converted yet, so the {k} split is the {split} images "
                       f"({k}: images/{split}); convert the {k} annotations with --split {k}")
    return f


def _box_to_yolo(x1: float, y1: float, x2: float, y2: float, w: float, h: float) -> tuple | None:
    x1, x2 = max(0.0, min(x1, w)), max(0.0, min(x2, w))
    y1, y2 = max(0.0, min(y1, h)), max(0.0, min(y2, h))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)


def coco2yolo(json_file: str | Path, out_dir: str | Path, split: str = "train", images_dir: str | Path | None = None,
              skip_crowd: bool = True) -> list[str]:
    """COCO detection JSON -> YOLO labels. Category ids are mapped to contiguous 0..n-1 in id order."""
    json_file, out_dir = Path(json_file), Path(out_dir)
    try:
        coco = json.loads(json_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{json_file}: cannot read COCO JSON ({e})") from None
    if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
        raise UserError(f"{json_file}: not a COCO detection file (needs 'images' and 'categories')")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_map = {c["id"]: i for i, c in enumerate(cats)}
    names = [str(c["name"]) for c in cats]
    images = {im["id"]: im for im in coco["images"]}
    old = existing_names(out_dir)
    if old is not None and old != names:
        raise UserError(f"{out_dir / 'data.yaml'}: its names {old} differ from the categories of {json_file.name} "
                        f"{names}; nothing written (convert into another --out, or fix the data YAML's names)")
    per_image: dict[str, list] = {Path(im["file_name"]).stem: [] for im in coco["images"]}
    skipped = 0
    for a in coco.get("annotations", []):
        im = images.get(a.get("image_id"))
        if im is None or a.get("category_id") not in cat_map or (skip_crowd and a.get("iscrowd", 0)):
            skipped += 1
            continue
        x, y, bw, bh = (float(v) for v in a["bbox"])
        box = _box_to_yolo(x, y, x + bw, y + bh, float(im["width"]), float(im["height"]))
        if box is None:
            skipped += 1
            continue
        per_image[Path(im["file_name"]).stem].append((cat_map[a["category_id"]], *box))
    lb_dir = _write_labels(out_dir, split, per_image)
    if images_dir:
        _copy_images(Path(images_dir), out_dir / "images" / split, [im["file_name"] for im in coco["images"]])
    write_data_yaml(out_dir, split, names)
    LOGGER.info(f"COCO {json_file.name}: {len(per_image)} images, {len(names)} classes -> {lb_dir}"
                + (f" ({skipped} annotations skipped: crowd, unknown image/category or empty box)" if skipped else ""))
    return names


def _safe_parse_xml(f: Path) -> ET.Element:
    text = f.read_bytes()
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:  # refuse DTDs: no entity expansion attacks
        raise UserError(f"{f}: XML with DOCTYPE/ENTITY declarations is not accepted")
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise UserError(f"{f}: invalid XML ({e})") from None


def voc2yolo(src: str | Path | list, out_dir: str | Path, split: str = "train", names: list[str] | None = None,
             keep_difficult: bool = False, images_dir: str | Path | None = None) -> list[str]:
    """Pascal VOC XML files (a folder or list) -> YOLO labels.

    VOC pixel coordinates are 1-based inclusive, so a box spans edges [xmin - 1, xmax] in 0-based pixels.
    Names default to the sorted set of object names found.
    """
    files = sorted(Path(src).glob("*.xml")) if not isinstance(src, (list, tuple)) and Path(src).is_dir() else \
        [Path(p) for p in (src if isinstance(src, (list, tuple)) else [src])]
    if not files:
        raise UserError(f"{src}: no .xml files")
    parsed, difficult = [], 0
    for f in files:
        root = _safe_parse_xml(f)
        size = root.find("size")
        try:
            w, h = float(size.find("width").text), float(size.find("height").text)
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{f}: missing or invalid <size><width>/<height>") from None
        fname = root.findtext("filename") or f"{f.stem}.jpg"
        objs = []
        for o in root.iter("object"):
            if not keep_difficult and (o.findtext("difficult") or "0").strip() == "1":
                difficult += 1
                continue
            bb = o.find("bndbox")
            try:
                x1, y1, x2, y2 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                raise UserError(f"{f}: object without a valid <bndbox>") from None
            objs.append(((o.findtext("name") or "").strip(), x1 - 1, y1 - 1, x2, y2))
        parsed.append((fname, w, h, objs))
    names = _voc_names(Path(out_dir), names, sorted({o[0] for _, _, _, objs in parsed for o in objs}))
    idx = {n: i for i, n in enumerate(names)}
    per_image, unknown = {}, set()
    for fname, w, h, objs in parsed:
        rows = []
        for n, x1, y1, x2, y2 in objs:
            if n not in idx:
                unknown.add(n)
                continue
            box = _box_to_yolo(x1, y1, x2, y2, w, h)
            if box:
                rows.append((idx[n], *box))
        per_image[Path(fname).stem] = rows
    if unknown:
        LOGGER.warning(f"WARNING: objects of classes not in names were skipped: {sorted(unknown)}")
    lb_dir = _write_labels(Path(out_dir), split, per_image)
    if images_dir:
        _copy_images(Path(images_dir), Path(out_dir) / "images" / split, [p[0] for p in parsed])
    write_data_yaml(Path(out_dir), split, names)
    skipped = f" ({difficult} objects marked difficult skipped; --keep-difficult keeps them)" if difficult else ""
    LOGGER.info(f"VOC: {len(parsed)} files, {len(names)} classes -> {lb_dir}{skipped}")
    return names


def _voc_names(out_dir: Path, given: list[str] | None, found: list[str]) -> list[str]:
    """The class list to number VOC objects by, decided before any label is written: --names, else the existing
    data.yaml's names when they cover every class found (a later split keeps the first split's numbering),
    else the sorted names found."""
    old = existing_names(out_dir)
    f = out_dir / "data.yaml"
    if given is not None:
        if old is not None and old != list(given):
            raise UserError(f"{f}: its names {old} differ from --names {given}; nothing written (pass "
                            f"--names {','.join(old)} to number this split like the existing labels)")
        return list(given)
    if old is None:
        return found
    extra = [n for n in found if n not in old]
    if extra:
        raise UserError(f"{f}: classes {extra} of these files are not among its names {old}; nothing written "
                        f"(pass --names with the existing names plus the new ones, and convert the other splits "
                        f"again with the same --names)")
    if found != old:
        LOGGER.info(f"VOC: numbering classes by the names of {f} ({len(old)} classes)")
    return old


def _copy_images(src_dir: Path, dst_dir: Path, file_names: list[str]) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    missing = 0
    for name in file_names:
        s = src_dir / name
        if s.is_file():
            shutil.copy2(s, dst_dir / Path(name).name)
        else:
            missing += 1
    if missing:
        LOGGER.warning(f"WARNING: {missing} images not found in {src_dir}")


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert COCO JSON / Pascal VOC XML to YOLO labels")
    p.add_argument("--from", dest="fmt", required=True, choices=["coco", "voc"], help="source format")
    p.add_argument("--src", required=True, help="COCO JSON file, or VOC XML folder / file")
    p.add_argument("--out", required=True, help="output dataset root (labels/<split>, data.yaml)")
    p.add_argument("--split", default="train", help="split name, e.g. train or val")
    p.add_argument("--images", default=None, help="optional folder to copy the images from")
    p.add_argument("--names", default=None, help="VOC: comma-separated class names (default: sorted found names)")
    p.add_argument("--keep-difficult", action="store_true", help="VOC: keep objects marked difficult")
    return p.parse_args(argv)


@cli
def main(argv=None) -> None:
    opt = parse_opt(argv)
    if not Path(opt.src).exists():
        raise UserError(f"{opt.src}: not found")
    if opt.fmt == "coco":
        coco2yolo(opt.src, opt.out, opt.split, opt.images)
    else:
        names = [n.strip() for n in opt.names.split(",")] if opt.names else None
        voc2yolo(opt.src, opt.out, opt.split, names, opt.keep_difficult, opt.images)


if __name__ == "__main__":
    main()
