"""Which dataset a name stands for: a VOC-format tree (folder, split, metric year, classes) or a
COCO-format json with its image folder and classes.

Detectron2's built-in names (``voc_2007_trainval``, ``voc_2007_test``, ..., ``coco_2017_train``,
``coco_2017_val``, ...) resolve under ``$DETECTRON2_DATASETS`` (default ``datasets``) as
Detectron2 resolves them. A set of your own is named ``<TRANSFER.DATASET_NAME>_<split>``: with
``TRANSFER.VOC_ROOT`` that VOC tree's split, with ``TRANSFER.COCO_ROOT`` (laid out like COCO)
``annotations/instances_<split>.json`` and the images in ``<split>/``. Both engines resolve names
here, so they read the same images.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

BUILTIN_VOC = re.compile(r"^voc_(2007|2012)_(train|val|trainval|test)$")
# Detectron2's built-in COCO instance names with annotations: (image folder, json) under $DETECTRON2_DATASETS.
BUILTIN_COCO = {
    "coco_2014_train": ("coco/train2014", "coco/annotations/instances_train2014.json"),
    "coco_2014_val": ("coco/val2014", "coco/annotations/instances_val2014.json"),
    "coco_2014_minival": ("coco/val2014", "coco/annotations/instances_minival2014.json"),
    "coco_2014_valminusminival": ("coco/val2014", "coco/annotations/instances_valminusminival2014.json"),
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "coco_2017_val_100": ("coco/val2017", "coco/annotations/instances_val2017_100.json"),
}


@dataclass(frozen=True)
class VOCDataset:
    kind: ClassVar[str] = "voc"  # how it is scored: VOC mAP
    name: str
    root: Path
    split: str
    year: int
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class COCODataset:
    kind: ClassVar[str] = "coco"  # how it is scored: COCO box (and mask) AP
    name: str
    json_file: Path
    image_root: Path
    class_names: tuple[str, ...]  # the json's categories in id order (contiguous class i is the i-th)


def resolve(name: str, cfg) -> VOCDataset | COCODataset:
    """The dataset behind ``name`` under ``cfg``'s TRANSFER settings. A custom COCO set's classes
    are read from its json (``FileNotFoundError``/``ValueError`` naming it if that fails)."""
    from detection.coco import COCO_CLASSES, coco_categories
    from detection.voc import VOC_CLASSES

    transfer = cfg.TRANSFER
    prefix = f"{transfer.DATASET_NAME}_"
    if transfer.VOC_ROOT and transfer.COCO_ROOT:
        raise ValueError(f"TRANSFER.VOC_ROOT ({transfer.VOC_ROOT}) and TRANSFER.COCO_ROOT ({transfer.COCO_ROOT}) "
                         f"are both set; a config names one set of its own")
    if is_own_set(name, cfg) and transfer.VOC_ROOT:
        classes = tuple(transfer.CLASS_NAMES) or tuple(VOC_CLASSES)
        return VOCDataset(name, Path(transfer.VOC_ROOT), name[len(prefix):], int(transfer.YEAR), classes)
    if is_own_set(name, cfg):
        split = name[len(prefix):]
        json_file = Path(transfer.COCO_ROOT) / "annotations" / f"instances_{split}.json"
        classes = tuple(category["name"] for category in coco_categories(json_file))
        return COCODataset(name, json_file, Path(transfer.COCO_ROOT) / split, classes)
    match = BUILTIN_VOC.match(name)
    datasets_root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    if match:
        year, split = match.groups()
        return VOCDataset(name, datasets_root / f"VOC{year}", split, int(year), tuple(VOC_CLASSES))
    if name in BUILTIN_COCO:
        image_root, json_file = BUILTIN_COCO[name]
        return COCODataset(name, datasets_root / json_file, datasets_root / image_root, COCO_CLASSES)
    own = [f"TRANSFER.{key} {transfer[key]!r}" for key in ("VOC_ROOT", "COCO_ROOT") if transfer[key]]
    known = f"{prefix}<split> ({own[0]})" if own else \
        "set TRANSFER.VOC_ROOT or TRANSFER.COCO_ROOT and name its splits <TRANSFER.DATASET_NAME>_<split>"
    raise KeyError(f"unknown dataset {name!r}: not a built-in VOC or COCO name (voc_2007_trainval, "
                   f"coco_2017_train, ...); {known}")


def is_own_set(name: str, cfg) -> bool:
    """Whether ``name`` is a split of the config's own set (``TRANSFER.VOC_ROOT`` or
    ``TRANSFER.COCO_ROOT``) rather than a built-in name Detectron2 registers itself."""
    transfer = cfg.TRANSFER
    return bool(transfer.VOC_ROOT or transfer.COCO_ROOT) and name.startswith(f"{transfer.DATASET_NAME}_")


def check_class_count(dataset: VOCDataset | COCODataset, cfg) -> VOCDataset | COCODataset:
    """``dataset``, refusing a class list of another size than the box predictor's."""
    if len(dataset.class_names) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                         f"{dataset.name} has {len(dataset.class_names)} classes")
    return dataset
