"""Detectron2 dataset registration for sets of your own (``TRANSFER.VOC_ROOT``, ``TRANSFER.COCO_ROOT``).

Detectron2 registers its built-in VOC and COCO names itself; the names a config uses under
``TRANSFER.DATASET_NAME`` are registered here, read with ``detection.voc`` or ``detection.coco``
(whose errors name the file and record). A COCO set's metadata is what Detectron2's
``COCOEvaluator`` reads: the json (its ground truth), the classes and the id mapping.
"""
from __future__ import annotations

from functools import partial

from detectron2.data import DatasetCatalog, MetadataCatalog

from detection.coco import coco_categories, load_coco_records
from detection.datasets import COCODataset, is_own_set, resolve
from detection.voc import load_voc_split


def register_config_datasets(cfg) -> list[str]:
    """Register (again, if the set changed) every custom name the config trains or tests on."""
    registered = []
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        if not is_own_set(name, cfg):
            continue  # a built-in Detectron2 name
        dataset = resolve(name, cfg)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if isinstance(dataset, COCODataset):
            DatasetCatalog.register(name, partial(load_coco_records, dataset.json_file, dataset.image_root))
            ids = [category["id"] for category in coco_categories(dataset.json_file)]
            MetadataCatalog.get(name).set(
                thing_classes=list(dataset.class_names), json_file=str(dataset.json_file),
                image_root=str(dataset.image_root), evaluator_type="coco",
                thing_dataset_id_to_contiguous_id={coco_id: index for index, coco_id in enumerate(ids)})
        else:
            DatasetCatalog.register(name, partial(load_voc_split, dataset.root, dataset.split, dataset.class_names))
            MetadataCatalog.get(name).set(thing_classes=list(dataset.class_names), dirname=str(dataset.root),
                                          year=dataset.year, split=dataset.split, evaluator_type="pascal_voc")
        registered.append(name)
    return registered
