"""Tests of ``detection.voc`` (reading VOC-format trees) and ``detection.evaluation`` (VOC mAP).

Everything runs on tiny VOC-format trees written into a temporary folder. Boxes in the trees
are the XML's 1-based inclusive pixel coordinates; a model's box for the same object is
``(xmin - 1, ymin - 1, xmax, ymax)``, the dataset dicts' ``bbox``. The tests marked with
Detectron2 compare against Detectron2's own loader and evaluator and skip without it.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from detection.evaluation import VOCDetectionEvaluator, round_like_text
from detection.voc import (VOC_CLASSES, annotation_element, image_file, load_voc_split, parse_annotation,
                           read_split_ids, write_annotation, write_split)

CLASSES = ("cat", "dog", "person")
SPLIT = "test"
IMAGE_SIZE = (64, 48)  # width, height
# image id -> [(class, (xmin, ymin, xmax, ymax) 1-based, difficult)]
TINY_TREE = {
    "000001": [("cat", (10, 10, 40, 40), False), ("dog", (30, 5, 60, 30), False)],
    "000002": [("cat", (5, 5, 20, 30), False), ("cat", (25, 10, 55, 40), True)],
    "000003": [("person", (1, 1, 64, 48), False), ("dog", (10, 20, 30, 45), True)],
    "000004": [("dog", (2, 3, 22, 23), False), ("person", (30, 10, 50, 45), False)],
    "000005": [],
}
CAT_A = ("000001", "cat", (9, 9, 40, 40))  # the two non-difficult cats as model boxes
CAT_B = ("000002", "cat", (4, 4, 20, 30))
CAT_DIFFICULT = ("000002", "cat", (24, 9, 55, 40))


def write_voc_tree(root: Path, tree: dict, split: str = SPLIT, size=IMAGE_SIZE) -> Path:
    """A VOC-format tree: a small real JPEG and an annotation XML per image, and the split list."""
    os.makedirs(root / "JPEGImages", exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for image_id, objects in tree.items():
        write_annotation(root, image_id, size[0], size[1], objects)
        assert cv2.imwrite(image_file(root, image_id), pixels)
    write_split(root, split, list(tree))
    return root


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    return write_voc_tree(tmp_path / "voc", TINY_TREE)


# ---------------------------------------------------------------------------------------------
# Model outputs in both supported formats

def dict_output(detections) -> dict:
    """torchvision style; ``detections`` are (class name, model box, score)."""
    boxes = torch.tensor([box for _, box, _ in detections], dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor([score for _, _, score in detections], dtype=torch.float32)
    labels = torch.tensor([CLASSES.index(name) for name, _, _ in detections], dtype=torch.int64)
    return {"boxes": boxes, "scores": scores, "labels": labels}


def instances_output(detections) -> dict:
    """Detectron2 style without Detectron2: ``{"instances": <object with pred_boxes.tensor ...>}``."""
    arrays = dict_output(detections)
    instances = SimpleNamespace(pred_boxes=SimpleNamespace(tensor=arrays["boxes"]),
                                scores=arrays["scores"], pred_classes=arrays["labels"])
    return {"instances": instances}


OUTPUT_FORMATS = {"dict": dict_output, "instances": instances_output}


def evaluate(root: Path, year: int, detections, output_format=dict_output) -> dict:
    """Evaluate (image id, class name, model box, score) detections, one image per process() call."""
    evaluator = VOCDetectionEvaluator(root, SPLIT, year, CLASSES)
    evaluator.reset()
    for image_id in read_split_ids(root, SPLIT):
        mine = [(name, box, score) for i, name, box, score in detections if i == image_id]
        evaluator.process([{"image_id": image_id}], [output_format(mine)])
    return evaluator.evaluate()


def perfect_detections(root: Path, include_difficult: bool = False):
    return [(record["image_id"], CLASSES[a["category_id"]], tuple(a["bbox"]), 0.9)
            for record in load_voc_split(root, SPLIT, CLASSES)
            for a in record["annotations"] if include_difficult or not a["difficult"]]


# ---------------------------------------------------------------------------------------------
# Reading VOC trees

def test_voc_classes_are_the_twenty_in_standard_order():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird") and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_CLASSES.index("person") == 14


def test_parse_annotation_converts_to_detectron2_boxes(tiny_tree):
    parsed = parse_annotation(tiny_tree / "Annotations" / "000002.xml", CLASSES)
    assert parsed == {
        "image_id": "000002", "width": 64, "height": 48,
        "objects": [
            {"name": "cat", "category_id": 0, "bbox": [4.0, 4.0, 20.0, 30.0], "difficult": False},
            {"name": "cat", "category_id": 0, "bbox": [24.0, 9.0, 55.0, 40.0], "difficult": True},
        ],
    }


def test_load_voc_split_gives_dataset_dicts_with_difficult_objects_kept(tiny_tree):
    dicts = load_voc_split(tiny_tree, SPLIT, CLASSES)
    assert [d["image_id"] for d in dicts] == list(TINY_TREE)
    second = dicts[1]
    assert second["file_name"] == str(tiny_tree / "JPEGImages" / "000002.jpg")
    assert (second["height"], second["width"]) == (48, 64)
    assert second["annotations"] == [
        {"bbox": [4.0, 4.0, 20.0, 30.0], "bbox_mode": 0, "category_id": 0, "difficult": False},
        {"bbox": [24.0, 9.0, 55.0, 40.0], "bbox_mode": 0, "category_id": 0, "difficult": True},
    ]
    assert dicts[4]["annotations"] == []


def test_difficult_tag_is_optional(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(ET.tostring(annotation_element(64, 48, [("dog", (1, 2, 3, 4), False)]), encoding="unicode").replace("<difficult>0</difficult>", ""))
    assert parse_annotation(xml, CLASSES)["objects"][0]["difficult"] is False


@pytest.mark.parametrize("broken, message", [
    (lambda xml: xml[:-20], "malformed XML"),
    (lambda xml: xml.replace("<xmin>5</xmin>", ""), "<bndbox/xmin>"),
    (lambda xml: xml.replace("<ymax>30</ymax>", "<ymax>3O</ymax>"), "'3O'"),
    (lambda xml: xml.replace("<width>64</width>", "<width>wide</width>"), "'wide'"),
    (lambda xml: xml.replace("<name>cat</name>", "<name></name>", 1), "<name>"),
    (lambda xml: xml.replace("<difficult>1</difficult>", "<difficult>yes</difficult>"), "'yes'"),
])
def test_a_broken_annotation_is_an_error_naming_the_file_and_field(tiny_tree, broken, message):
    xml = tiny_tree / "Annotations" / "000002.xml"
    xml.write_text(broken(xml.read_text()))
    for read in (lambda: parse_annotation(xml, CLASSES), lambda: load_voc_split(tiny_tree, SPLIT, CLASSES),
                 lambda: evaluate(tiny_tree, 2007, [])):
        with pytest.raises(ValueError, match=re.escape(str(xml))) as error:
            read()
        assert message in str(error.value)


def test_a_class_outside_the_list_is_an_error_naming_it_and_the_file(tiny_tree):
    with pytest.raises(ValueError, match=r"000003\.xml.*'person'"):
        load_voc_split(tiny_tree, SPLIT, ("cat", "dog"))


def test_a_missing_image_is_an_error_naming_its_path(tiny_tree):
    image = tiny_tree / "JPEGImages" / "000004.jpg"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(image))):
        load_voc_split(tiny_tree, SPLIT, CLASSES)


def test_a_missing_annotation_is_an_error_naming_its_path(tiny_tree):
    xml = tiny_tree / "Annotations" / "000004.xml"
    xml.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(xml))):
        load_voc_split(tiny_tree, SPLIT, CLASSES)


def test_a_missing_or_empty_split_is_an_error_naming_the_file(tiny_tree):
    split_path = tiny_tree / "ImageSets" / "Main" / "val.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(split_path))):
        read_split_ids(tiny_tree, "val")
    split_path.write_text("\n\n")
    with pytest.raises(ValueError, match=re.escape(str(split_path))):
        VOCDetectionEvaluator(tiny_tree, "val", 2007, CLASSES)


# ---------------------------------------------------------------------------------------------
# The evaluator on constructed cases

@pytest.mark.parametrize("year", [2007, 2012])
@pytest.mark.parametrize("output_format", OUTPUT_FORMATS.values(), ids=OUTPUT_FORMATS.keys())
def test_perfect_detections_give_100(tiny_tree, year, output_format):
    results = evaluate(tiny_tree, year, perfect_detections(tiny_tree), output_format)
    assert results["bbox"] == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    assert results["per_class_AP50"] == pytest.approx({name: 100.0 for name in CLASSES})


@pytest.mark.parametrize("year", [2007, 2012])
def test_no_detections_give_0(tiny_tree, year):
    results = evaluate(tiny_tree, year, [])
    assert results == {"bbox": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0},
                       "per_class_AP50": {name: 0.0 for name in CLASSES}}


@pytest.mark.parametrize("year, expected", [(2012, 5 / 6), (2007, (6 + 5 * 2 / 3) / 11)])
def test_a_duplicate_detection_is_a_false_positive(tiny_tree, year, expected):
    # Ranked: cat A (TP), cat A again (FP: A is taken), cat B (TP). Recall 1/2, 1/2, 1;
    # precision 1, 1/2, 2/3. Area: 1/2 * 1 + 1/2 * 2/3. 11-point: levels 0..0.5 reach
    # precision 1, levels 0.6..1 reach 2/3.
    (a_image, _, a_box), (b_image, _, b_box) = CAT_A, CAT_B
    shifted = tuple(v + 1 for v in a_box)  # IoU 0.88 with A
    detections = [(a_image, "cat", a_box, 0.9), (a_image, "cat", shifted, 0.8), (b_image, "cat", b_box, 0.7)]
    results = evaluate(tiny_tree, year, detections)
    assert results["per_class_AP50"]["cat"] == pytest.approx(100 * expected)
    without_duplicate = evaluate(tiny_tree, year, [detections[0], detections[2]])
    assert without_duplicate["per_class_AP50"]["cat"] == pytest.approx(100.0)


def test_the_11_point_and_area_metrics_differ_where_they_should(tiny_tree):
    # Ranked: cat A (TP), a box on empty image 000005 (FP); cat B missed. Recall 1/2, 1/2,
    # precision 1, 1/2. Area: 1/2 * 1 = 0.5. 11-point: the six levels 0..0.5 reach precision 1,
    # the five above 1/2 reach nothing: 6/11.
    detections = [(CAT_A[0], "cat", CAT_A[2], 0.9), ("000005", "cat", (0, 0, 10, 10), 0.8)]
    assert evaluate(tiny_tree, 2012, detections)["per_class_AP50"]["cat"] == pytest.approx(50.0)
    assert evaluate(tiny_tree, 2007, detections)["per_class_AP50"]["cat"] == pytest.approx(600 / 11)


@pytest.mark.parametrize("year", [2007, 2012])
def test_detections_of_difficult_objects_neither_help_nor_hurt(tiny_tree, year):
    perfect = perfect_detections(tiny_tree)
    with_difficult = perfect_detections(tiny_tree, include_difficult=True)
    assert len(with_difficult) == len(perfect) + 2
    on_top = [(i, name, box, 0.95 if (i, name, box) == CAT_DIFFICULT else score) for i, name, box, score in with_difficult]
    assert evaluate(tiny_tree, year, on_top)["bbox"] == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    # The difficult cat is not a positive either: finding A alone (and the difficult cat) is half the recall.
    half = [(CAT_A[0], "cat", CAT_A[2], 0.9), (CAT_DIFFICULT[0], "cat", CAT_DIFFICULT[2], 0.95)]
    expected = 50.0 if year == 2012 else 600 / 11
    assert evaluate(tiny_tree, year, half)["per_class_AP50"]["cat"] == pytest.approx(expected)


def test_per_class_ap50_and_the_iou_thresholds(tiny_tree):
    # Perfect cats; the dog boxes are stretched down to an IoU of 26/44 and 21/36 (about 0.59):
    # counted at the thresholds 0.50 and 0.55, missed from 0.60 on.
    detections = [d for d in perfect_detections(tiny_tree) if d[1] == "cat"]
    detections += [("000001", "dog", (29, 4, 60, 30 + 18), 0.9), ("000004", "dog", (1, 2, 22, 23 + 15), 0.9)]
    results = evaluate(tiny_tree, 2012, detections)
    assert results["per_class_AP50"] == pytest.approx({"cat": 100.0, "dog": 100.0, "person": 0.0})
    assert results["bbox"]["AP50"] == pytest.approx(200 / 3)
    assert results["bbox"]["AP75"] == pytest.approx(100 / 3)
    assert results["bbox"]["AP"] == pytest.approx((2 * 200 / 3 + 8 * 100 / 3) / 10)


def test_both_output_formats_give_the_same_result(tiny_tree):
    detections = random_detections(tiny_tree, np.random.default_rng(1), CLASSES)
    results = {name: evaluate(tiny_tree, 2012, detections, form) for name, form in OUTPUT_FORMATS.items()}
    assert results["dict"] == results["instances"]
    assert 0.0 < results["dict"]["bbox"]["AP50"] < 100.0


def test_process_rejects_unknown_images_and_class_ids(tiny_tree):
    evaluator = VOCDetectionEvaluator(tiny_tree, SPLIT, 2007, CLASSES)
    with pytest.raises(ValueError, match="'000099'"):
        evaluator.process([{"image_id": "000099"}], [dict_output([])])
    bad_label = dict_output([("cat", (1, 1, 5, 5), 0.5)]) | {"labels": torch.tensor([3])}
    with pytest.raises(ValueError, match="class id 3"):
        evaluator.process([{"image_id": "000001"}], [bad_label])


def test_reset_forgets_earlier_detections(tiny_tree):
    evaluator = VOCDetectionEvaluator(tiny_tree, SPLIT, 2012, CLASSES)
    evaluator.process([{"image_id": CAT_A[0]}], [dict_output([("cat", CAT_A[2], 0.9)])])
    evaluator.reset()
    assert evaluator.evaluate()["bbox"]["AP50"] == 0.0


def test_round_like_text_equals_python_formatting():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.random(20000), rng.random(20000).astype(np.float32).astype(np.float64),
                             np.arange(0, 2, 0.0005), [0.0125, 0.1235, 2.5, -0.05, -1.25]])
    for decimals in (1, 3):
        expected = np.array([float(f"{v:.{decimals}f}") for v in values])
        np.testing.assert_array_equal(round_like_text(values, decimals), expected)
    boxes = np.array([[0.25, 1.75, 2.5, -0.35], [0.05, 10.45, 3.15, 7.0]])
    expected = [[float(f"{v:.1f}") for v in row] for row in boxes]
    np.testing.assert_array_equal(round_like_text(boxes, 1), expected)


def test_a_class_without_positives_gets_the_devkit_value_and_a_warning(tiny_tree, caplog):
    # No non-difficult car anywhere: recall is 0 / 0. The devkit (and Detectron2) then give 0
    # with the 11-point metric and NaN for the area metric once the class has a detection.
    class_names = CLASSES + ("car",)
    for year, expected in ((2007, 0.0), (2012, np.nan)):
        evaluator = VOCDetectionEvaluator(tiny_tree, SPLIT, year, class_names)
        car = {"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "scores": torch.tensor([0.5]),
               "labels": torch.tensor([3])}
        evaluator.process([{"image_id": "000001"}], [car])
        with caplog.at_level("WARNING", logger="detection.evaluation"):
            results = evaluator.evaluate()
        np.testing.assert_equal(results["per_class_AP50"]["car"], expected)
        assert "car" in caplog.text


# ---------------------------------------------------------------------------------------------
# Random trees and detections (also used against Detectron2)

def random_tree(rng: np.random.Generator, num_images: int, class_names) -> dict:
    """Integer boxes, 0-4 objects per image, about one in six difficult; every class present."""
    tree = {}
    for index in range(num_images):
        objects = []
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.integers(1, 40, size=2)
            w, h = rng.integers(4, 24, size=2)
            objects.append((class_names[rng.integers(len(class_names))], (x1, y1, x1 + w, y1 + h),
                            bool(rng.random() < 1 / 6)))
        objects.append((class_names[index % len(class_names)], (3, 4, 30, 40), False))
        tree[f"{index:06d}"] = objects
    return tree


def random_detections(root: Path, rng: np.random.Generator, class_names, per_image: int = 8):
    """Jittered ground truth (sometimes twice: duplicates) and random boxes, float32 coordinates;
    scores on a coarse grid so that ties are frequent, which exercises the tie-breaking order."""
    detections = []
    for record in load_voc_split(root, SPLIT, class_names):
        image_id = record["image_id"]
        for a in record["annotations"]:
            for _ in range(rng.integers(0, 3)):
                jitter = rng.integers(-2, 3, size=4) + (rng.random(4) < 0.3) * rng.random(4).round(2)
                detections.append((image_id, class_names[a["category_id"]],
                                   tuple(np.asarray(a["bbox"]) + jitter), float(rng.integers(10, 40) / 40)))
        for _ in range(rng.integers(0, per_image)):
            x1, y1 = rng.random(2) * 40
            box = (x1, y1, x1 + rng.random() * 25 + 1, y1 + rng.random() * 25 + 1)
            detections.append((image_id, class_names[rng.integers(len(class_names))], box, float(rng.random())))
    return detections


# ---------------------------------------------------------------------------------------------
# Distributed: detections gathered on rank 0

def distributed_worker(rank: int, world_size: int, init_file: str, root: str, detections, result_dir: str):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        evaluator = VOCDetectionEvaluator(root, SPLIT, 2012, CLASSES)
        image_ids = read_split_ids(root, SPLIT)
        share = len(image_ids) // world_size
        for image_id in image_ids[rank * share:(rank + 1) * share if rank < world_size - 1 else None]:
            mine = [(name, box, score) for i, name, box, score in detections if i == image_id]
            evaluator.process([{"image_id": image_id}], [dict_output(mine)])
        torch.save(evaluator.evaluate(), Path(result_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_evaluation_gathers_on_rank_0(tmp_path):
    root = write_voc_tree(tmp_path / "voc", random_tree(np.random.default_rng(3), 12, CLASSES))
    detections = random_detections(root, np.random.default_rng(4), CLASSES)
    torch.multiprocessing.spawn(distributed_worker, nprocs=2,
                                args=(2, str(tmp_path / "init"), str(root), detections, str(tmp_path)))
    assert torch.load(tmp_path / "rank0.pt") == evaluate(root, 2012, detections)
    assert torch.load(tmp_path / "rank1.pt") == {}


# ---------------------------------------------------------------------------------------------
# Against Detectron2 (skipped without it)

def register_with_detectron2(root: Path, year: int, class_names, name: str) -> str:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_pascal_voc

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        from detectron2.data import MetadataCatalog
        MetadataCatalog.remove(name)
    register_pascal_voc(name, str(root), SPLIT, year, class_names)
    return name


def detectron2_outputs(detections, image_ids, class_names):
    """The same detections as real Detectron2 ``{"instances": Instances}``, one per image."""
    from detectron2.structures import Boxes, Instances

    outputs = {}
    for image_id in image_ids:
        mine = [(name, box, score) for i, name, box, score in detections if i == image_id]
        instances = Instances((IMAGE_SIZE[1], IMAGE_SIZE[0]))
        instances.pred_boxes = Boxes(torch.tensor([box for _, box, _ in mine], dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.tensor([score for _, _, score in mine], dtype=torch.float32)
        instances.pred_classes = torch.tensor([class_names.index(n) for n, _, _ in mine], dtype=torch.int64)
        outputs[image_id] = {"instances": instances}
    return outputs


@pytest.mark.parametrize("year", [2007, 2012])
def test_agrees_with_detectron2_on_random_detections(tmp_path, year):
    pytest.importorskip("detectron2")
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    class_names = ("cat", "dog", "person", "car")
    rng = np.random.default_rng(year)
    root = write_voc_tree(tmp_path / "voc", random_tree(rng, 40, class_names))
    detections = random_detections(root, rng, class_names)
    image_ids = read_split_ids(root, SPLIT)
    outputs = detectron2_outputs(detections, image_ids, class_names)
    theirs = PascalVOCDetectionEvaluator(register_with_detectron2(root, year, class_names, f"tiny_voc_{tmp_path.name}"))
    ours = VOCDetectionEvaluator(root, SPLIT, year, class_names)
    for evaluator in (theirs, ours):
        evaluator.reset()
        for start in range(0, len(image_ids), 3):  # batches of 3 images
            batch = image_ids[start:start + 3]
            evaluator.process([{"image_id": i} for i in batch], [outputs[i] for i in batch])
    expected, actual = theirs.evaluate()["bbox"], ours.evaluate()
    assert set(expected) == set(actual["bbox"]) == {"AP", "AP50", "AP75"}
    for metric, value in expected.items():
        assert abs(actual["bbox"][metric] - value) < 1e-4, (metric, actual["bbox"][metric], value)
    assert np.mean(list(actual["per_class_AP50"].values())) == pytest.approx(actual["bbox"]["AP50"])
    assert 5.0 < expected["AP"] < 95.0  # a meaningful comparison, not all-or-nothing


def test_load_voc_split_equals_detectron2s_loader(tiny_tree):
    pytest.importorskip("detectron2")
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    ours = load_voc_split(tiny_tree, SPLIT, CLASSES)
    for record in ours:
        for annotation in record["annotations"]:
            del annotation["difficult"]  # the one key Detectron2's loader does not write
    assert ours == load_voc_instances(str(tiny_tree), SPLIT, CLASSES)


def test_plugs_into_detectron2_inference_on_dataset(tiny_tree):
    pytest.importorskip("detectron2")
    from detectron2.evaluation import inference_on_dataset

    detections = random_detections(tiny_tree, np.random.default_rng(5), CLASSES)
    outputs = {image_id: dict_output([(n, b, s) for i, n, b, s in detections if i == image_id])
               for image_id in TINY_TREE}
    batches = [[{"image_id": "000001"}, {"image_id": "000002"}], [{"image_id": i} for i in list(TINY_TREE)[2:]]]
    expected = evaluate(tiny_tree, 2007, detections)
    for evaluator in (VOCDetectionEvaluator(tiny_tree, SPLIT, 2007, CLASSES),
                      [VOCDetectionEvaluator(tiny_tree, SPLIT, 2007, CLASSES)]):
        results = inference_on_dataset(lambda inputs: [outputs[i["image_id"]] for i in inputs], batches, evaluator)
        assert results == expected
