"""Reading COCO-format sets (detection/coco.py) and resolving their names (detection/datasets.py):
the dataset dicts both engines train on, and errors that name the file and the record."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from coco_tree import CLASSES, write_coco_tree
from detection.coco import coco_categories, coco_json, load_coco_records
from detection.config import get_detection_cfg
from detection.datasets import COCODataset, check_class_count, resolve
from tool_process import run_tool


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_coco_tree(tmp_path_factory.mktemp("coco"), train=4, test=3)


def test_records_are_the_json_in_xyxy_with_contiguous_categories(tree):
    json_file = tree / "annotations" / "instances_train.json"
    records = load_coco_records(json_file, tree / "train")
    api = COCO(str(json_file))
    assert [record["image_id"] for record in records] == sorted(api.getImgIds())
    for record in records:
        image = api.imgs[record["image_id"]]
        assert record["file_name"] == str(tree / "train" / image["file_name"])
        assert (record["height"], record["width"]) == (image["height"], image["width"])
        expected = api.loadAnns(api.getAnnIds(imgIds=[record["image_id"]]))
        assert len(record["annotations"]) == len(expected) > 0
        for annotation, source in zip(record["annotations"], expected):
            x, y, w, h = source["bbox"]
            assert annotation["bbox"] == [x, y, x + w, y + h] and annotation["bbox_mode"] == 0
            assert CLASSES[annotation["category_id"]] == api.cats[source["category_id"]]["name"]
            assert annotation["segmentation"] == source["segmentation"] and annotation["iscrowd"] == 0


def test_category_ids_map_to_contiguous_indices_in_id_order(tmp_path):
    data = coco_json(["a", "b"], [("x.jpg", 10, 10, [("a", [(0, 0), (5, 0), (5, 5)]), ("b", [(1, 1), (4, 1), (4, 4)])])])
    data["categories"] = [{"id": 90, "name": "a"}, {"id": 7, "name": "b"}]
    data["annotations"][0]["category_id"], data["annotations"][1]["category_id"] = 90, 7
    data["annotations"][1]["segmentation"] = {"counts": "abc", "size": [10, 10]}  # a crowd's RLE
    data["annotations"][1]["iscrowd"] = 1
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    (tmp_path / "x.jpg").write_bytes(b"")
    assert coco_categories(path) == [{"id": 7, "name": "b"}, {"id": 90, "name": "a"}]
    first, crowd = load_coco_records(path, tmp_path)[0]["annotations"]
    assert first["category_id"] == 1 and crowd["category_id"] == 0
    assert crowd["iscrowd"] == 1 and "segmentation" not in crowd


def test_names_resolve_to_the_coco_root_splits_and_builtin_paths(tree, monkeypatch):
    cfg = get_detection_cfg("torchvision")
    cfg.merge_from_list(["TRANSFER.COCO_ROOT", str(tree), "TRANSFER.DATASET_NAME", "tiny",
                         "MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    assert check_class_count(resolve("tiny_val", cfg), cfg) == COCODataset(
        "tiny_val", tree / "annotations" / "instances_val.json", tree / "val", CLASSES)
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data")
    builtin = resolve("coco_2017_train", cfg)
    assert (builtin.json_file, builtin.image_root) == (Path("/data/coco/annotations/instances_train2017.json"),
                                                       Path("/data/coco/train2017"))
    with pytest.raises(ValueError, match="NUM_CLASSES is 3 but dataset coco_2017_train has 80 classes"):
        check_class_count(builtin, cfg)
    with pytest.raises(KeyError, match="TRANSFER.COCO_ROOT"):
        resolve("other_val", cfg)
    with pytest.raises(FileNotFoundError, match="instances_test.json does not exist"):
        resolve("tiny_test", cfg)
    cfg.TRANSFER.VOC_ROOT = str(tree)
    with pytest.raises(ValueError, match="both set"):
        resolve("tiny_val", cfg)


def _first_annotation(data):
    return data["annotations"][0]


BREAKAGES = {
    "missing key": (lambda data: _first_annotation(data).pop("bbox"), "annotation 1 has no bbox"),
    "unknown image id": (lambda data: _first_annotation(data).update(image_id=999),
                         "annotation 1 has image_id 999, which no image has"),
    "category missing": (lambda data: data["categories"].pop(), r"annotation \d+ has category_id 3, which is not"),
    "bad bbox": (lambda data: _first_annotation(data).update(bbox=[1, 2, -3, 4]), "annotation 1 has bbox"),
    "odd polygon": (lambda data: _first_annotation(data)["segmentation"][0].pop(), "annotation 1 has a bad polygon 0"),
    "two points": (lambda data: _first_annotation(data).update(segmentation=[[0, 0, 5, 5]]),
                   "annotation 1 has a bad polygon 0"),
    "non-finite": (lambda data: _first_annotation(data)["segmentation"][0].__setitem__(1, math.nan),
                   "annotation 1 has a bad polygon 0"),
    "duplicate image": (lambda data: data["images"][1].update(id=1), "image 1: the id must be an integer that no other"),
    "duplicate annotation": (lambda data: data["annotations"][1].update(id=1), "annotation 1: the id must be"),
    "image without size": (lambda data: data["images"][0].pop("height"), "image 1 has no height"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_malformed_json_names_the_file_and_the_record(tree, tmp_path, breakage):
    data = json.loads((tree / "annotations" / "instances_train.json").read_text())
    data["categories"].sort(key=lambda category: category["id"])
    change, message = BREAKAGES[breakage]
    change(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        load_coco_records(path, tree / "train")
    assert str(path) in str(error.value)


def test_unreadable_json_and_missing_images_name_the_file(tree, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        load_coco_records(path, tree / "train")
    with pytest.raises(FileNotFoundError, match=r"val/000000.jpg \(image 1 of .*instances_val.json\) does not exist"):
        load_coco_records(tree / "annotations" / "instances_val.json", tmp_path / "val")


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("breakage, message", [
    ("unknown image id", "annotation 1 has image_id 999, which no image has"),
    ("missing json", "instances_train.json does not exist"),
])
def test_train_net_names_the_bad_json_before_starting(tree, tmp_path, breakage, message):
    root = tmp_path / "coco"
    shutil.copytree(tree, root)
    json_file = root / "annotations" / "instances_train.json"
    if breakage == "missing json":
        json_file.unlink()
    else:
        data = json.loads(json_file.read_text())
        BREAKAGES[breakage][0](data)
        json_file.write_text(json.dumps(data))
    run = run_tool("tools/train_net.py", "--engine", "torchvision",
                   "--config-file", REPO / "configs/detection/coco/mask_rcnn_R50_FPN_1x.yaml",
                   "TRANSFER.COCO_ROOT", root, "TRANSFER.DATASET_NAME", "tiny",
                   "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
                   "MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", tmp_path / "run")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: dataset tiny_train: ") and message in run.stderr and str(json_file) in run.stderr
    assert not (tmp_path / "run").exists()
