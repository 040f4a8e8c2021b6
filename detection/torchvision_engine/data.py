"""VOC or COCO-format images and targets for torchvision's detector, in Detectron2's order and
augmentation."""
from __future__ import annotations

import itertools
import logging

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detection.coco import load_coco_records
from detection.datasets import COCODataset, VOCDataset, check_class_count, resolve
from detection.voc import load_voc_split
from pretrain.data import ShardSampler, per_process_batch, world

logger = logging.getLogger(__name__)

EMPTY_BOX_SIDE = 1e-5  # Detectron2's filter_empty_instances threshold


def read_image(record: dict) -> torch.Tensor:
    """The record's image as a float [0, 1] RGB CHW tensor, checked against its annotation size."""
    path = record["file_name"]
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if image.shape[:2] != (record["height"], record["width"]):
        raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                         f"{record['width']}x{record['height']}")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)


def training_target(record: dict, flip: bool, with_masks: bool = False) -> dict[str, torch.Tensor]:
    """Boxes (XYXY, mirrored when ``flip``, clipped, empty ones dropped), labels (class + 1:
    torchvision's 0 is the background) and with ``with_masks`` masks (see ``instance_masks``) of
    every object, difficult ones included; crowd regions are left out, as Detectron2's mapper does."""
    annotations = [annotation for annotation in record["annotations"] if not annotation.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([a["category_id"] + 1 for a in annotations], dtype=torch.int64)
    width, height = record["width"], record["height"]
    if flip:
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) > EMPTY_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) > EMPTY_BOX_SIDE)
    target = {"boxes": boxes[keep], "labels": labels[keep]}
    if with_masks:
        masks = instance_masks(annotations, height, width)
        target["masks"] = (masks.flip(-1) if flip else masks)[keep]
    return target


def instance_masks(annotations: list[dict], height: int, width: int) -> torch.Tensor:
    """(N, height, width) uint8 masks of the annotations' polygons, rasterised by pycocotools as
    Detectron2 rasterises them."""
    masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(annotation["segmentation"], height, width)))
             for annotation in annotations]
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)


class TrainingImages(Dataset):
    """Training images and targets (with ``with_masks``, masks too); indexed by ``(index, flip)``
    pairs from ``TrainingSampler``, so that the augmentation is drawn with the order, not in the
    worker processes."""

    def __init__(self, records: list[dict], with_masks: bool = False):
        self.records = records
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, dict]:
        index, flip = key
        record = self.records[index]
        image = read_image(record)
        return (image.flip(-1) if flip else image), training_target(record, flip, self.with_masks)


class InferenceImages(Dataset):
    """Test images with their dataset dicts (for ``image_id``)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return read_image(self.records[index]), self.records[index]


class TrainingSampler(Sampler):
    """Detectron2's ``TrainingSampler``: an endless stream of seeded random permutations of the
    dataset, dealt round-robin to the processes, with a flip coin drawn for every sample.
    ``start`` skips the samples all processes consumed before, so a resumed run continues the
    very stream an uninterrupted one would have seen, whatever the worker count."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int, flip: bool, start: int = 0):
        self.size, self.seed, self.flip, self.start = size, seed, flip, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        return itertools.islice(self._stream(), self.start + self.rank, None, self.world_size)

    def _stream(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(self.size, generator=generator).tolist()
            coins = (torch.rand(self.size, generator=generator) < 0.5).tolist()
            yield from zip(order, (coin and self.flip for coin in coins))


def own_generator(seed: int) -> torch.Generator:
    """A loader's own source for its worker seeds: left to the global one, each loader would
    shift the training's random draws (box sampling, sizes), and a resumed run would diverge."""
    return torch.Generator().manual_seed(seed)


def collate_lists(batch: list[tuple]) -> tuple[list, list]:
    """Images of different sizes stay a list; torchvision's transform batches them."""
    images, others = zip(*batch)
    return list(images), list(others)


def dataset_records(dataset: VOCDataset | COCODataset) -> list[dict]:
    """The dataset dicts of a VOC split or a COCO-format json."""
    if isinstance(dataset, COCODataset):
        return load_coco_records(dataset.json_file, dataset.image_root)
    return load_voc_split(dataset.root, dataset.split, dataset.class_names)


def check_masks(dataset: VOCDataset | COCODataset, records: list[dict]) -> None:
    """Mask R-CNN trains on a polygon for every object but crowd regions."""
    if isinstance(dataset, VOCDataset):
        raise ValueError(f"MODEL.MASK_ON is set but dataset {dataset.name} is a VOC tree, which has no "
                         f"instance masks: train Mask R-CNN on a COCO-format set")
    for record in records:
        for index, annotation in enumerate(record["annotations"]):
            if not annotation["iscrowd"] and "segmentation" not in annotation:
                raise ValueError(f"MODEL.MASK_ON is set but object {index} of image {record['image_id']} "
                                 f"({record['file_name']}) in {dataset.json_file} has no polygon segmentation")


def training_records(cfg) -> list[dict]:
    """Dataset dicts of every ``DATASETS.TRAIN`` name, concatenated; images without any
    annotation but crowd regions left out as Detectron2 does."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name the datasets to train on")
    records = []
    for name in cfg.DATASETS.TRAIN:
        dataset = check_class_count(resolve(name, cfg), cfg)
        loaded = dataset_records(dataset)
        if cfg.MODEL.MASK_ON:
            check_masks(dataset, loaded)
        records += loaded
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        annotated = [record for record in records
                     if any(not annotation.get("iscrowd", 0) for annotation in record["annotations"])]
        logger.info("removed %d images without annotations (crowd regions aside); %d training images left",
                    len(records) - len(annotated), len(annotated))
        records = annotated
    if not records:
        raise ValueError(f"no annotated training images in DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    return records


def horizontal_flip_enabled(cfg) -> bool:
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "none"):
        raise ValueError(f"INPUT.RANDOM_FLIP {cfg.INPUT.RANDOM_FLIP!r}: the torchvision engine supports "
                         "'horizontal' and 'none'")
    return cfg.INPUT.RANDOM_FLIP == "horizontal"


def training_batches(cfg, seed: int, start: int, device: torch.device):
    """Endless (images, targets) batches of ``SOLVER.IMS_PER_BATCH / processes`` images on
    ``device``, from sample ``start`` of the seeded stream on."""
    rank, world_size = world()
    batch = per_process_batch(cfg.SOLVER.IMS_PER_BATCH, world_size, "SOLVER.IMS_PER_BATCH")
    dataset = TrainingImages(training_records(cfg), cfg.MODEL.MASK_ON)
    sampler = TrainingSampler(len(dataset), seed, rank, world_size, horizontal_flip_enabled(cfg), start)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
                        collate_fn=collate_lists, pin_memory=device.type == "cuda",
                        generator=own_generator(seed + rank))
    for images, targets in loader:
        yield ([image.to(device, non_blocking=True) for image in images],
               [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets])


def inference_loader(dataset: VOCDataset | COCODataset, cfg) -> DataLoader:
    """This process's contiguous share of the test images (Detectron2's ``InferenceSampler``),
    one at a time as Detectron2's inference loader."""
    rank, world_size = world()
    records = dataset_records(dataset)
    return DataLoader(InferenceImages(records), batch_size=1, sampler=ShardSampler(len(records), world_size, rank),
                      num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=collate_lists, generator=own_generator(rank))
