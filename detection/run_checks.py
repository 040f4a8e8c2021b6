"""A fine-tuning config checked before any process starts (by tools/train_net.py) or any job is
queued (by the study runner): the model its engine can build, its datasets, weights and device;
a mistake is a ``UsageError`` naming the key or file."""
from __future__ import annotations

import torch

from detection.coco import load_coco_records
from detection.datasets import VOCDataset, check_class_count, is_own_set, resolve
from pretrain.cli import UsageError, check_file

# What the torchvision engine builds, under Detectron2's names; a key a config leaves out has
# Detectron2's default (a C4 model: build_resnet_backbone, Res5ROIHeads).
TORCHVISION_ARCHITECTURE = {"META_ARCHITECTURE": ("GeneralizedRCNN", "GeneralizedRCNN"),
                            "BACKBONE.NAME": ("build_resnet_fpn_backbone", "build_resnet_backbone"),
                            "ROI_HEADS.NAME": ("StandardROIHeads", "Res5ROIHeads")}


def check_torchvision_architecture(cfg) -> None:
    """Refuse a config asking for a model the torchvision engine does not build (a C4 one):
    trained as R50-FPN, it would be reported under the config's name."""
    for key, (built, default) in TORCHVISION_ARCHITECTURE.items():
        node = cfg.MODEL
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        asked = node if isinstance(node, str) else default
        if asked != built:
            raise UsageError(f"MODEL.{key} is {asked!r}{'' if isinstance(node, str) else ' (Detectron2 default)'}, "
                             f"but the torchvision engine builds {built} only (R-CNN with a ResNet-FPN backbone): "
                             "fine-tune this config with Detectron2, or choose an FPN config")


def check_run(cfg, world_size: int, engine: str) -> None:
    """The architecture (the torchvision engine builds FPN models only), the datasets (their
    files and class count), the weights (when given) and the device."""
    if engine == "torchvision":
        check_torchvision_architecture(cfg)
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        try:
            dataset = resolve(name, cfg)
        except KeyError as error:
            raise UsageError(str(error).strip("'\"")) from None
        except (FileNotFoundError, ValueError) as error:  # a COCO_ROOT json's categories
            raise UsageError(f"dataset {name}: {error}") from None
        check_dataset_files(dataset, cfg)
        try:
            check_class_count(dataset, cfg)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS:
        check_file("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)
    if world_size > 1 and torch.device(cfg.MODEL.DEVICE).index is not None:
        raise UsageError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}, which puts all {world_size} processes on one GPU; "
                         f"use MODEL.DEVICE {torch.device(cfg.MODEL.DEVICE).type} (each process takes its own)")


def check_dataset_files(dataset, cfg) -> None:
    """A VOC split file; a COCO json and image folder, a set of your own (``TRANSFER.COCO_ROOT``)
    read in full, so that a malformed record is named now (built-in sets are only looked for)."""
    if isinstance(dataset, VOCDataset):
        split_file = dataset.root / "ImageSets" / "Main" / f"{dataset.split}.txt"
        if not split_file.is_file():
            raise UsageError(f"dataset {dataset.name}: {split_file} does not exist "
                             f"(TRANSFER.VOC_ROOT or $DETECTRON2_DATASETS)")
        return
    for path in (dataset.json_file, dataset.image_root):
        if not path.exists():
            raise UsageError(f"dataset {dataset.name}: {path} does not exist (TRANSFER.COCO_ROOT or $DETECTRON2_DATASETS)")
    if is_own_set(dataset.name, cfg):
        try:
            load_coco_records(dataset.json_file, dataset.image_root)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"dataset {dataset.name}: {error}") from None
