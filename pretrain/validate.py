"""A pretraining config checked as a whole before any process starts: every key the run will
read is given a value it can use, and the data it names exists."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pretrain.cifar import LAYOUTS
from pretrain.cli import UsageError, check_choice
from pretrain.data import AUGMENTATIONS, DATASETS, resolve_data_root
from pretrain.device_pipeline import BACKENDS
from pretrain.engine import AMP_DTYPES, SCHEDULES, build_lr_schedule
from pretrain.mix import build_mixer_from_config
from pretrain.models import build_model


def check_pretrain_cfg(cfg, train: bool = True, world_size: int = 1) -> None:
    """Raise ``UsageError`` naming the first key or path that cannot work (``train``: the
    training split and schedule are needed too; ``world_size``: the processes that will share
    the batches)."""
    check_choice("DATA.DATASET", cfg.DATA.DATASET, DATASETS)
    check_choice("DATA.AUGMENT", cfg.DATA.AUGMENT, AUGMENTATIONS)
    check_choice("DATA.BACKEND", cfg.DATA.BACKEND, BACKENDS)
    if cfg.DATA.BACKEND == "device" and (cfg.DATA.DATASET, cfg.DATA.AUGMENT) != ("imagefolder", "imagenet"):
        raise UsageError(f"DATA.BACKEND device decodes ImageFolder JPEGs with the imagenet augmentation; this config "
                         f"has DATA.DATASET {cfg.DATA.DATASET!r} and DATA.AUGMENT {cfg.DATA.AUGMENT!r}: use "
                         "DATA.BACKEND pil")
    check_choice("SOLVER.SCHEDULE", cfg.SOLVER.SCHEDULE, SCHEDULES)
    check_choice("SOLVER.AMP_DTYPE", cfg.SOLVER.AMP_DTYPE, tuple(AMP_DTYPES))
    for key, value in (("MODEL.NUM_CLASSES", cfg.MODEL.NUM_CLASSES), ("SOLVER.BATCH_SIZE", cfg.SOLVER.BATCH_SIZE),
                       ("TEST.BATCH_SIZE", cfg.TEST.BATCH_SIZE), ("SOLVER.EPOCHS", cfg.SOLVER.EPOCHS)):
        if value < 1:
            raise UsageError(f"{key} is {value}; it must be at least 1")
    if not cfg.SOLVER.HEAD_LR_FACTOR > 0:
        raise UsageError(f"SOLVER.HEAD_LR_FACTOR is {cfg.SOLVER.HEAD_LR_FACTOR}; it must be above 0")
    if train and cfg.SOLVER.BATCH_SIZE % world_size:
        raise UsageError(f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} does not divide among {world_size} processes")
    for section, build in (("MODEL", lambda: build_model(cfg)),
                           ("MIX", lambda: build_mixer_from_config(cfg, torch.Generator())),
                           ("SOLVER", lambda: build_lr_schedule(cfg, iterations_per_epoch=1000))):
        try:
            with torch.device("meta"):
                build()
        except ValueError as error:  # the builders name the value and the choices
            raise UsageError(f"{section}: {error}") from None
    check_data(cfg, train)


def check_data(cfg, train: bool) -> None:
    try:
        root = resolve_data_root(cfg)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if cfg.DATA.DATASET == "imagefolder":
        for key in (("DATA.TRAIN_DIR",) if train else ()) + ("DATA.VAL_DIR",):
            folder = root / cfg.DATA[key.split(".")[1]]
            if not folder.is_dir():
                raise UsageError(f"{key}: image folder {folder} does not exist (under DATA.ROOT {root})")
        if train:
            check_same_classes(root / cfg.DATA.TRAIN_DIR, root / cfg.DATA.VAL_DIR)
        return
    layout = LAYOUTS[cfg.DATA.DATASET]
    candidates = (root / layout.folder / layout.meta_file, root / layout.meta_file, root / layout.archive)
    if not any(Path(path).is_file() for path in candidates):
        raise UsageError(f"DATA.ROOT {root} holds no {cfg.DATA.DATASET}: expected {root / layout.folder}/ or "
                         f"{root / layout.archive} (nothing is downloaded)")


def class_folders(folder: Path) -> list[str]:
    """An ImageFolder's classes in label order (torchvision's ``find_classes``: sorted folder names)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def check_same_classes(train: Path, val: Path) -> None:
    """Validation labels mean what training labels mean: a class folder missing from one side
    would shift every later label by one, and the error would be measured against wrong labels."""
    trained, validated = class_folders(train), class_folders(val)
    if trained == validated:
        return
    missing = sorted(set(trained) - set(validated))
    extra = sorted(set(validated) - set(trained))

    def listing(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"

    raise UsageError(f"the class folders of {val} differ from those of {train}, so their labels would not match: "
                     f"missing from validation: {listing(missing)}; not in training: {listing(extra)}")
