"""Detectron2 dataset registration for VOC-format trees of your own (``TRANSFER.VOC_ROOT``).

Detectron2 registers its built-in VOC names itself; the names a config uses under
``TRANSFER.DATASET_NAME`` are registered here, reading the tree with ``detection.voc``.
"""
from __future__ import annotations

from functools import partial

from detectron2.data import DatasetCatalog, MetadataCatalog

from detection.datasets import resolve
from detection.voc import load_voc_split


def register_config_datasets(cfg) -> list[str]:
    """Register (again, if the tree changed) every custom VOC name the config trains or tests on."""
    registered = []
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        dataset = resolve(name, cfg)
        if not cfg.TRANSFER.VOC_ROOT or not name.startswith(f"{cfg.TRANSFER.DATASET_NAME}_"):
            continue  # a built-in Detectron2 name
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, partial(load_voc_split, dataset.root, dataset.split, dataset.class_names))
        MetadataCatalog.get(name).set(thing_classes=list(dataset.class_names), dirname=str(dataset.root),
                                      year=dataset.year, split=dataset.split, evaluator_type="pascal_voc")
        registered.append(name)
    return registered
