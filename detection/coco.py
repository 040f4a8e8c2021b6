"""COCO-format instance sets: reading a json and its image folder into Detectron2 dataset dicts,
and writing one (for synthetic sets).

One validating reader for both engines, so that a malformed json fails before training with an
error naming the file and the record (image id, annotation id, category id) rather than deep in
a data loader or in pycocotools. Nothing here imports Detectron2.

The dicts follow Detectron2's ``load_coco_json`` with two differences: boxes are absolute XYXY
(``BoxMode.XYXY_ABS``, as ``detection.voc`` gives them) rather than COCO's XYWH, and a malformed
polygon is an error rather than an instance silently dropped. ``segmentation`` holds polygons
only: a crowd region's RLE is left to the evaluator, which reads the json itself (training skips
crowd regions), and a non-crowd RLE is refused.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from detection.voc import BOX_MODE_XYXY_ABS

# The 80 COCO 2014/2017 instance categories in id order: the class list of the built-in names,
# known without reading their (large) json.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")


def load_coco_records(json_file, image_root) -> list[dict]:
    """Detectron2 dataset dicts of ``json_file``'s images (in image-id order) under ``image_root``.

    Each annotation is ``{"bbox" (XYXY), "bbox_mode", "category_id" (contiguous, categories
    sorted by id), "iscrowd"}`` plus ``"segmentation"`` (flat polygons) when it has polygons.
    Raises ``ValueError`` naming the file and record for anything malformed, and
    ``FileNotFoundError`` for the json or a listed image that does not exist.
    """
    json_file = os.fspath(json_file)
    data = _read(json_file)
    contiguous = {category["id"]: index for index, category in enumerate(_categories(data, json_file))}
    images = {}
    for image in _records(data, "images", json_file):
        where = f"image {image.get('id')!r}"
        _require(image, IMAGE_KEYS, json_file, where)
        if not isinstance(image["id"], int) or image["id"] in images:
            raise ValueError(f"{json_file}: {where}: the id must be an integer that no other image has")
        for key in ("height", "width"):
            if not isinstance(image[key], int) or image[key] <= 0:
                raise ValueError(f"{json_file}: {where}: {key} is {image[key]!r}, not a positive integer")
        images[image["id"]] = {"file_name": os.path.join(os.fspath(image_root), image["file_name"]),
                               "image_id": image["id"], "height": image["height"], "width": image["width"],
                               "annotations": []}
    annotation_ids = set()
    for annotation in _records(data, "annotations", json_file):
        where = f"annotation {annotation.get('id')!r}"
        _require(annotation, ANNOTATION_KEYS, json_file, where)
        if not isinstance(annotation["id"], int) or annotation["id"] in annotation_ids:
            raise ValueError(f"{json_file}: {where}: the id must be an integer that no other annotation has")
        annotation_ids.add(annotation["id"])
        if not isinstance(annotation["image_id"], int) or annotation["image_id"] not in images:
            raise ValueError(f"{json_file}: {where} has image_id {annotation['image_id']!r}, which no image has")
        if not isinstance(annotation["category_id"], int) or annotation["category_id"] not in contiguous:
            raise ValueError(f"{json_file}: {where} has category_id {annotation['category_id']!r}, which is not "
                             f"among the categories {sorted(contiguous)}")
        images[annotation["image_id"]]["annotations"].append(
            _dataset_annotation(annotation, contiguous[annotation["category_id"]], json_file, where))
    records = [images[image_id] for image_id in sorted(images)]
    for record in records:
        if not os.path.isfile(record["file_name"]):
            raise FileNotFoundError(f"image {record['file_name']} (image {record['image_id']} of {json_file}) "
                                    f"does not exist")
    return records


def coco_categories(json_file) -> list[dict]:
    """The json's categories sorted by id, ``{"id", "name"}`` each: contiguous class ``i`` is
    COCO category ``categories[i]["id"]``."""
    json_file = os.fspath(json_file)
    return [{"id": category["id"], "name": category["name"]} for category in _categories(_read(json_file), json_file)]


def _read(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json {json_file} does not exist")
    try:
        with open(json_file) as stream:
            data = json.load(stream)
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_file}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: the top level must be an object with images, annotations and categories")
    return data


def _records(data: dict, key: str, json_file: str) -> list[dict]:
    records = data.get(key)
    if not isinstance(records, list):
        raise ValueError(f"{json_file}: missing or non-list {key!r}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{json_file}: {key}[{index}] is not an object")
    return records


def _require(record: dict, keys: Sequence[str], json_file: str, where: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"{json_file}: {where} has no {', '.join(missing)}")


def _categories(data: dict, json_file: str) -> list[dict]:
    categories = _records(data, "categories", json_file)
    if not categories:
        raise ValueError(f"{json_file}: 'categories' is empty")
    seen = set()
    for category in categories:
        where = f"category {category.get('id')!r}"
        _require(category, CATEGORY_KEYS, json_file, where)
        if not isinstance(category["id"], int) or category["id"] in seen:
            raise ValueError(f"{json_file}: {where}: the id must be an integer that no other category has")
        seen.add(category["id"])
    return sorted(categories, key=lambda category: category["id"])


def _dataset_annotation(annotation: dict, category: int, json_file: str, where: str) -> dict:
    box = annotation["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(_finite(value) for value in box)) \
            or box[2] < 0 or box[3] < 0:
        raise ValueError(f"{json_file}: {where} has bbox {box!r}; expected [x, y, width, height], "
                         f"finite numbers with width and height >= 0")
    x, y, width, height = (float(value) for value in box)
    iscrowd = annotation.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise ValueError(f"{json_file}: {where} has iscrowd {iscrowd!r}; expected 0 or 1")
    record = {"bbox": [x, y, x + width, y + height], "bbox_mode": BOX_MODE_XYXY_ABS,
              "category_id": category, "iscrowd": iscrowd}
    polygons = _polygons(annotation.get("segmentation"), iscrowd, json_file, where)
    if polygons:
        record["segmentation"] = polygons
    return record


def _polygons(segmentation, iscrowd: int, json_file: str, where: str) -> list[list[float]]:
    """The annotation's polygons as float lists; none for no segmentation or a crowd RLE."""
    if segmentation is None:
        return []
    if isinstance(segmentation, dict):
        if iscrowd:
            return []
        raise ValueError(f"{json_file}: {where} has an RLE segmentation but is not a crowd (iscrowd 0); "
                         f"only polygons are read for instances")
    if not isinstance(segmentation, list):
        raise ValueError(f"{json_file}: {where} has segmentation {segmentation!r}; expected a list of polygons")
    for index, polygon in enumerate(segmentation):
        if not (isinstance(polygon, list) and all(_finite(value) for value in polygon)) \
                or len(polygon) % 2 or len(polygon) < 6:
            raise ValueError(f"{json_file}: {where} has a bad polygon {index} in its segmentation: expected "
                             f"[x, y, x, y, ...] of at least 3 points, finite numbers; got {polygon!r:.200}")
    return [[float(value) for value in polygon] for polygon in segmentation]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------- writing

def coco_json(class_names: Sequence[str], images: Sequence[tuple]) -> dict:
    """A COCO instance json of ``images``, each ``(file_name, width, height, objects)`` with
    objects ``(class name, polygon)``, a polygon being ``[(x, y), ...]`` in pixels. Ids count
    from 1 (images, annotations and categories in the given order); each box is its polygon's
    bounds and each area its polygon's (the area the COCO metrics' size ranges use)."""
    categories = [{"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(class_names)]
    entries, annotations = [], []
    for image_id, (file_name, width, height, objects) in enumerate(images, start=1):
        entries.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        for name, polygon in objects:
            xs, ys = [float(x) for x, _ in polygon], [float(y) for _, y in polygon]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": class_names.index(name) + 1,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "area": _polygon_area(xs, ys), "iscrowd": 0,
                "segmentation": [[value for point in zip(xs, ys) for value in point]],
            })
    return {"images": entries, "annotations": annotations, "categories": categories}


def write_coco_json(path, class_names: Sequence[str], images: Sequence[tuple]) -> Path:
    """Write :func:`coco_json` of ``images`` to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_json(class_names, images)))
    return path


def _polygon_area(xs: list[float], ys: list[float]) -> float:
    """The shoelace formula."""
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
