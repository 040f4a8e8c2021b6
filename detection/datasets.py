"""Which VOC-format folder, split, metric year and classes a dataset name stands for.

Detectron2's built-in names (``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``,
...) resolve under ``$DETECTRON2_DATASETS`` (default ``datasets``) as Detectron2 resolves them;
with ``TRANSFER.VOC_ROOT`` set, ``<TRANSFER.DATASET_NAME>_<split>`` names that tree's splits.
Both engines resolve names here, so they read the same images.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

BUILTIN_VOC = re.compile(r"^voc_(2007|2012)_(train|val|trainval|test)$")


@dataclass(frozen=True)
class VOCDataset:
    name: str
    root: Path
    split: str
    year: int
    class_names: tuple[str, ...]


def resolve(name: str, cfg) -> VOCDataset:
    """The VOC tree behind dataset ``name`` under ``cfg``'s TRANSFER settings."""
    from detection.voc import VOC_CLASSES

    transfer = cfg.TRANSFER
    prefix = f"{transfer.DATASET_NAME}_"
    if transfer.VOC_ROOT and name.startswith(prefix):
        classes = tuple(transfer.CLASS_NAMES) or tuple(VOC_CLASSES)
        return VOCDataset(name, Path(transfer.VOC_ROOT), name[len(prefix):], int(transfer.YEAR), classes)
    match = BUILTIN_VOC.match(name)
    if match:
        year, split = match.groups()
        root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / f"VOC{year}"
        return VOCDataset(name, root, split, int(year), tuple(VOC_CLASSES))
    known = f"{prefix}<split> (TRANSFER.VOC_ROOT {transfer.VOC_ROOT!r})" if transfer.VOC_ROOT else \
        "set TRANSFER.VOC_ROOT and name its splits <TRANSFER.DATASET_NAME>_<split>"
    raise KeyError(f"unknown dataset {name!r}: not a built-in VOC name (voc_2007_trainval, ...); {known}")


def check_class_count(dataset: VOCDataset, cfg) -> VOCDataset:
    """``dataset``, refusing a class list of another size than the box predictor's."""
    if len(dataset.class_names) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                         f"{dataset.name} has {len(dataset.class_names)} classes")
    return dataset
