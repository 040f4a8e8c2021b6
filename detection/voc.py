"""Pascal VOC-format trees: reading the split lists, annotation XMLs and dataset dicts, and
writing them (for synthetic and converted datasets).

One reader for everything that needs VOC ground truth (the evaluator, the Detectron2 dataset
registration, the torchvision engine), so that all of them see the same boxes and fail with the
same clear errors. Nothing here imports Detectron2.

A tree holds ``Annotations/{id}.xml``, ``JPEGImages/{id}.jpg`` and
``ImageSets/Main/{split}.txt`` (one image id per line).

Boxes follow Detectron2's reading of VOC: the XML coordinates are 1-based inclusive pixel
indices, and Detectron2 turns ``(xmin, ymin, xmax, ymax)`` into ``(xmin - 1, ymin - 1, xmax,
ymax)`` (absolute XYXY, so a box from 1 to W covers the whole image from 0 to W).
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from typing import Sequence

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

BOX_MODE_XYXY_ABS = 0  # the value of detectron2.structures.BoxMode.XYXY_ABS (an IntEnum)

COORDINATE_FIELDS = ("xmin", "ymin", "xmax", "ymax")


def split_file(root, split: str) -> str:
    return os.path.join(os.fspath(root), "ImageSets", "Main", f"{split}.txt")


def annotation_file(root, image_id: str) -> str:
    return os.path.join(os.fspath(root), "Annotations", f"{image_id}.xml")


def image_file(root, image_id: str) -> str:
    """Built with ``os.path.join`` exactly as Detectron2 builds it, so dataset dicts compare equal."""
    return os.path.join(os.fspath(root), "JPEGImages", f"{image_id}.jpg")


def read_split_ids(root, split: str) -> list[str]:
    """The image ids listed in ``root/ImageSets/Main/{split}.txt``, blank lines skipped."""
    path = split_file(root, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VOC split file {path} does not exist")
    with open(path) as handle:
        ids = [line.strip() for line in handle if line.strip()]
    if not ids:
        raise ValueError(f"VOC split file {path} lists no image ids")
    return ids


def parse_annotation(xml_path, class_names: Sequence[str]) -> dict:
    """One annotation XML as ``{"image_id", "width", "height", "objects"}``.

    Each object is ``{"name", "category_id", "bbox", "difficult"}`` with ``bbox`` in
    Detectron2's convention (see the module docstring). ``<difficult>`` is optional (absent
    means not difficult, as some VOC-format datasets omit it); every other field Detectron2
    reads is required. Any problem raises ``ValueError`` naming the file and the field.
    """
    xml_path = os.fspath(xml_path)
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as error:
        raise ValueError(f"{xml_path}: malformed XML ({error})") from None
    root = tree.getroot()
    return {
        "image_id": os.path.splitext(os.path.basename(xml_path))[0],
        "width": _integer(root, "size/width", xml_path),
        "height": _integer(root, "size/height", xml_path),
        "objects": [_parse_object(element, index, class_names, xml_path)
                    for index, element in enumerate(root.findall("object"))],
    }


def load_voc_split(root, split: str, class_names: Sequence[str]) -> list[dict]:
    """Detectron2 dataset dicts of a split, equal to Detectron2's ``load_voc_instances``.

    Like Detectron2, difficult objects are kept (it trains on them); unlike it, every
    annotation also carries ``"difficult"`` (Detectron2's mappers ignore the extra key), so a
    consumer may drop them. A listed image missing from ``JPEGImages`` raises
    ``FileNotFoundError`` naming its path here rather than mid-training.
    """
    dicts = []
    for image_id in read_split_ids(root, split):
        annotation = parse_annotation(annotation_file(root, image_id), class_names)
        file_name = image_file(root, image_id)
        if not os.path.isfile(file_name):
            raise FileNotFoundError(f"image {file_name} listed in {split_file(root, split)} does not exist")
        dicts.append({
            "file_name": file_name,
            "image_id": image_id,
            "height": annotation["height"],
            "width": annotation["width"],
            "annotations": [_dataset_annotation(obj) for obj in annotation["objects"]],
        })
    return dicts


def _dataset_annotation(obj: dict) -> dict:
    return {"bbox": list(obj["bbox"]), "bbox_mode": BOX_MODE_XYXY_ABS,
            "category_id": obj["category_id"], "difficult": obj["difficult"]}


def _parse_object(element: ET.Element, index: int, class_names: Sequence[str], xml_path: str) -> dict:
    name = _text(element, "name", xml_path, f"object {index}")
    if name not in class_names:
        raise ValueError(f"{xml_path}: object {index} has class {name!r}, which is not in the "
                         f"class list {list(class_names)}")
    where = f"object {index} ({name})"
    x1, y1, x2, y2 = (_coordinate(element, f"bndbox/{field}", xml_path, where) for field in COORDINATE_FIELDS)
    return {
        "name": name,
        "category_id": class_names.index(name),
        "bbox": [x1 - 1.0, y1 - 1.0, x2, y2],
        "difficult": _difficult(element, xml_path, where),
    }


def _text(element: ET.Element, path: str, xml_path: str, where: str = "") -> str:
    """The stripped text of a required child, or a ValueError naming the file and field."""
    child = element.find(path)
    label = f"{where} <{path}>" if where else f"<{path}>"
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_path}: missing or empty {label}")
    return child.text.strip()


def _integer(element: ET.Element, path: str, xml_path: str) -> int:
    text = _text(element, path, xml_path)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{xml_path}: <{path}> is {text!r}, not an integer") from None


def _coordinate(element: ET.Element, path: str, xml_path: str, where: str) -> float:
    text = _text(element, path, xml_path, where)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{xml_path}: {where} <{path}> is {text!r}, not a finite number")
    return value


def _difficult(element: ET.Element, xml_path: str, where: str) -> bool:
    child = element.find("difficult")
    if child is None or child.text is None or not child.text.strip():
        return False
    try:
        return bool(int(child.text))
    except ValueError:
        raise ValueError(f"{xml_path}: {where} <difficult> is {child.text.strip()!r}, "
                         f"not an integer") from None


# ----------------------------------------------------------------------------------- writing

def annotation_element(width: int, height: int, objects: Sequence[tuple]) -> ET.Element:
    """A VOC annotation of ``objects`` given as ``(class name, (xmin, ymin, xmax, ymax), difficult)``
    with the XML's own 1-based inclusive coordinates, holding every field the devkit reads."""
    annotation = ET.Element("annotation")
    size = ET.SubElement(annotation, "size")
    for field, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, field).text = str(value)
    for name, box, difficult in objects:
        element = ET.SubElement(annotation, "object")
        for field, value in (("name", name), ("pose", "Unspecified"), ("truncated", 0),
                             ("difficult", int(difficult))):
            ET.SubElement(element, field).text = str(value)
        bndbox = ET.SubElement(element, "bndbox")
        for field, value in zip(COORDINATE_FIELDS, box):
            ET.SubElement(bndbox, field).text = str(value)
    return annotation


def write_annotation(root, image_id: str, width: int, height: int, objects: Sequence[tuple]) -> str:
    """Write ``Annotations/{image_id}.xml`` (see :func:`annotation_element`); returns its path."""
    path = annotation_file(root, image_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ET.ElementTree(annotation_element(width, height, objects)).write(path)
    return path


def write_split(root, split: str, image_ids: Sequence[str]) -> str:
    """Write ``ImageSets/Main/{split}.txt``; returns its path."""
    path = split_file(root, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as stream:
        stream.write("".join(f"{image_id}\n" for image_id in image_ids))
    return path
