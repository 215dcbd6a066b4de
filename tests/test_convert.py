"""COCO JSON / Pascal VOC XML -> YOLO labels round trip (hand-written annotations)."""
import json
import re
import cv2
import numpy as np
import pytest
import yaml

from utils.convert import coco2yolo, main, voc2yolo
from utils.data import YOLODataset, load_data_config
from utils.general import UserError

COCO = {
    "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100},
               {"id": 9, "file_name": "sub/b.jpg", "width": 50, "height": 80},
               {"id": 11, "file_name": "empty.jpg", "width": 64, "height": 64}],
    "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 20, 50, 40], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [100, 0, 100, 100], "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [5, 10, 20, 30], "iscrowd": 0},
        {"id": 4, "image_id": 9, "category_id": 3, "bbox": [0, 0, 50, 80], "iscrowd": 1},  # crowd: skipped
        {"id": 5, "image_id": 9, "category_id": 1, "bbox": [40, 70, 30, 30], "iscrowd": 0},  # clipped to image
    ],
}


def test_coco_round_trip(tmp_path):
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(COCO))
    imgs = tmp_path / "raw"
    (imgs / "sub").mkdir(parents=True)
    for im in COCO["images"]:
        cv2.imwrite(str(imgs / im["file_name"]), np.zeros((im["height"], im["width"], 3), np.uint8))
    out = tmp_path / "out"
    names = coco2yolo(src, out, "train", images_dir=imgs)
    assert names == ["person", "car", "dog"]  # contiguous ids in category-id order
    d = load_data_config(out / "data.yaml")
    assert d.names == names and d.train == [out / "images" / "train"]
    ds = YOLODataset(d.train, imgsz=64, nc=d.nc)
    assert len(ds) == 3 and ds.counts.backgrounds == 1
    cat = {18: 2, 1: 0, 3: 1}
    by_name = {f.split("/")[-1]: (lb, s) for f, lb, s in zip(ds.im_files, ds.labels, ds.shapes)}
    for im in COCO["images"]:
        lb, (w, h) = by_name[im["file_name"].split("/")[-1]]
        expect = []
        for a in COCO["annotations"]:
            if a["image_id"] == im["id"] and not a["iscrowd"]:
                x, y, bw, bh = a["bbox"]
                x2, y2 = min(x + bw, im["width"]), min(y + bh, im["height"])
                expect.append([cat[a["category_id"]], x, y, x2 - x, y2 - y])
        # back from normalised centre format to COCO pixel xywh
        got = [[c, (xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h] for c, xc, yc, bw, bh in lb.tolist()]
        np.testing.assert_allclose(np.array(got).reshape(-1, 5), np.array(expect).reshape(-1, 5), atol=1e-3)


VOC_XML = """<annotation>
  <folder>VOC</folder><filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJ = ("<object><name>{n}</name><difficult>{d}</difficult>"
       "<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def test_voc_round_trip_and_cli(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    objs = {"x1": [("cat", 0, 1, 1, 100, 50), ("bird", 0, 51, 21, 80, 60), ("cat", 1, 2, 2, 10, 10)],
            "x2": [("bird", 0, 11, 11, 30, 40)]}
    sizes = {"x1": (100, 60), "x2": (40, 40)}
    for name, ob in objs.items():
        body = "".join(OBJ.format(n=n, d=d, x1=a, y1=b, x2=c, y2=e) for n, d, a, b, c, e in ob)
        (ann / f"{name}.xml").write_text(VOC_XML.format(name=name, w=sizes[name][0], h=sizes[name][1], objects=body))
    out = tmp_path / "out"
    main(["--from", "voc", "--src", str(ann), "--out", str(out), "--split", "val"])
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "bird", 1: "cat"}
    for name, ob in objs.items():
        w, h = sizes[name]
        rows = [list(map(float, r.split())) for r in (out / "labels" / "val" / f"{name}.txt").read_text().splitlines()]
        # VOC 1-based inclusive pixels -> 0-based edges [xmin-1, xmax]; difficult objects skipped
        expect = [[{"bird": 0, "cat": 1}[n], (a - 1 + c) / 2 / w, (b - 1 + e) / 2 / h, (c - a + 1) / w, (e - b + 1) / h]
                  for n, d, a, b, c, e in ob if not d]
        np.testing.assert_allclose(rows, expect, atol=1e-6)
    # keep_difficult and explicit names
    voc2yolo(ann, tmp_path / "o2", names=["cat"], keep_difficult=True)
    assert len((tmp_path / "o2" / "labels" / "train" / "x1.txt").read_text().splitlines()) == 2


def test_converter_rejects_bad_input(tmp_path, capsys):
    evil = tmp_path / "evil.xml"
    evil.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><annotation>&x;</annotation>')
    with pytest.raises(UserError, match="DOCTYPE"):
        voc2yolo([evil], tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="not a COCO"):
        coco2yolo(bad, tmp_path / "o")
    with pytest.raises(SystemExit) as e:  # the CLI reports one line, no traceback
        main(["--from", "coco", "--src", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err


def test_missing_split_stand_in_is_said(tmp_path, caplog):
    """Converting one split writes the other as a stand-in so the YAML loads; that is said (log + YAML comment)
    until the other split is converted too."""
    import logging
    caplog.set_level(logging.WARNING)
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(COCO))
    out = tmp_path / "out"
    coco2yolo(src, out, "train")
    text = (out / "data.yaml").read_text()
    assert yaml.safe_load(text)["val"] == "images/train"
    assert "# val: images/train stands in until the val annotations are converted (--split val)" in text
    assert [r.getMessage() for r in caplog.records] == [
        f"WARNING: {out / 'data.yaml'}: no val split converted yet, so the val split is the train images "
        f"(val: images/train); convert the val annotations with --split val"]
    caplog.clear()
    coco2yolo(src, out, "val")
    text = (out / "data.yaml").read_text()
    assert yaml.safe_load(text)["val"] == "images/val" and "stands in" not in text and not caplog.records


def _voc_split(folder, objs, size=(100, 60)):
    folder.mkdir(parents=True)
    for name, ob in objs.items():
        body = "".join(OBJ.format(n=n, d=d, x1=10, y1=10, x2=50, y2=40) for n, d in ob)
        (folder / f"{name}.xml").write_text(VOC_XML.format(name=name, w=size[0], h=size[1], objects=body))


def test_voc_later_split_numbered_like_the_first_or_refused_before_writing(tmp_path, caplog):
    """A val split with fewer classes than train keeps train's numbering; one with a new class (or --names that
    differ) is refused before any label is written, and the error says what to pass to --names."""
    import logging
    out = tmp_path / "out"
    _voc_split(tmp_path / "train", {"t1": [("bird", 0), ("cat", 0)], "t2": [("dog", 0), ("cat", 1)]})
    _voc_split(tmp_path / "val", {"v1": [("cat", 0), ("cat", 1), ("dog", 1)]})  # no bird: sorted found = [cat]
    _voc_split(tmp_path / "test", {"s1": [("cow", 0)]})
    with caplog.at_level(logging.INFO):
        voc2yolo(tmp_path / "train", out, "train")
    assert "1 objects marked difficult skipped; --keep-difficult keeps them" in caplog.text
    assert voc2yolo(tmp_path / "val", out, "val") == ["bird", "cat", "dog"]
    assert (out / "labels" / "val" / "v1.txt").read_text().split()[0] == "1"  # cat stays class 1
    for split, names, words in (("test", None, "classes ['cow'] of these files are not among its names"),
                                ("test", ["cow"], "pass --names bird,cat,dog")):
        with pytest.raises(UserError, match=re.escape(words)) as e:
            voc2yolo(tmp_path / split, out, split, names=names)
        assert "--names" in str(e.value) and "nothing written" in str(e.value)
        assert not (out / "labels" / split).exists()


def test_coco_with_other_categories_is_refused_before_writing(tmp_path):
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(COCO))
    out = tmp_path / "out"
    coco2yolo(src, out, "train")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**COCO, "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "bus"},
                                                        {"id": 18, "name": "dog"}]}))
    with pytest.raises(UserError, match="differ from the categories of other.json"):
        coco2yolo(other, out, "val")
    assert not (out / "labels" / "val").exists()
