"""ImageNet-layout data: the paper's transforms, a loader that survives corrupt files, and a
distributed sampler that can resume in the middle of an epoch.

Augmentation randomness is drawn per sample from ``(seed, epoch, index)``, not from whichever
worker process happens to load the sample, so a resumed run sees exactly the batches an
uninterrupted run would have seen, whatever the number of workers.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets, transforms

logger = logging.getLogger(__name__)

# AlexNet's PCA of ImageNet RGB pixels, used for its lighting noise (and by the official code).
_LIGHTING_EIGENVALUES = (0.2175, 0.0188, 0.0045)
_LIGHTING_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                          (-0.5808, -0.0045, -0.8140),
                          (-0.5836, -0.6948, 0.4203))
DATA_ROOT_ENV = "IMAGENET_ROOT"


class Lighting:
    """AlexNet PCA lighting noise on a [0, 1] tensor: add ``V (alpha * lambda)`` per image."""

    def __init__(self, alpha_std: float):
        self.alpha_std = alpha_std
        self.eigenvalues = torch.tensor(_LIGHTING_EIGENVALUES)
        self.eigenvectors = torch.tensor(_LIGHTING_EIGENVECTORS)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.alpha_std == 0:
            return image
        alpha = torch.randn(3) * self.alpha_std
        shift = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + shift.view(3, 1, 1)


def train_transform(cfg) -> transforms.Compose:
    steps = [transforms.RandomResizedCrop(cfg.DATA.IMAGE_SIZE, scale=tuple(cfg.DATA.CROP_SCALE)),
             transforms.RandomHorizontalFlip()]
    if cfg.DATA.COLOR_JITTER:
        jitter = cfg.DATA.COLOR_JITTER
        steps.append(transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    steps += [transforms.ToTensor(), Lighting(cfg.DATA.LIGHTING_STD),
              transforms.Normalize(cfg.DATA.MEAN, cfg.DATA.STD)]
    return transforms.Compose(steps)


def val_transform(cfg) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(cfg.DATA.VAL_RESIZE), transforms.CenterCrop(cfg.DATA.IMAGE_SIZE),
                               transforms.ToTensor(), transforms.Normalize(cfg.DATA.MEAN, cfg.DATA.STD)])


def resolve_data_root(cfg) -> Path:
    """``DATA.ROOT``, or ``$IMAGENET_ROOT`` when the config leaves it empty."""
    root = cfg.DATA.ROOT or os.environ.get(DATA_ROOT_ENV, "")
    if not root:
        raise ValueError(f"no dataset root: set DATA.ROOT in the config or ${DATA_ROOT_ENV}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root {path} (DATA.ROOT / ${DATA_ROOT_ENV}) is not a folder")
    return path


class RobustImageFolder(datasets.ImageFolder):
    """An ImageFolder whose unreadable images are logged with their path and replaced by the
    next readable one; each item carries how many were replaced so the trainer can count them
    across worker processes. Each sample's random augmentation is seeded by
    ``(seed, epoch, index)``."""

    def __init__(self, root: Path, transform, seed: int, max_retries: int):
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        super().__init__(str(root), transform=transform)
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        replaced = 0
        while True:
            path, label = self.samples[index]
            try:
                image = self.loader(path)
                break
            except Exception as error:  # any decoder failure: truncated, corrupt, not an image
                replaced += 1
                logger.warning("unreadable image %s (%s); using the next one instead", path, error)
                if replaced > self.max_retries:
                    raise RuntimeError(f"{replaced} unreadable images in a row, the last {path}") from error
                index = (index + 1) % len(self.samples)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            image = self.transform(image)
        return image, label, replaced


class ResumableDistributedSampler(Sampler[int]):
    """This process's share of a seeded per-epoch shuffle (as ``DistributedSampler`` deals it,
    dropping the tail so every process gets the same count), able to start part-way through
    an epoch so that a resumed run continues with the very next batch."""

    def __init__(self, size: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.per_replica = size // num_replicas
        if self.per_replica == 0:
            raise ValueError(f"{size} images cannot be shared among {num_replicas} processes")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch``'s order from this process's ``start``-th sample on."""
        self.epoch = epoch
        self.start = start

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        mine = order[self.rank:self.per_replica * self.num_replicas:self.num_replicas]
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_replica - self.start


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``: each image evaluated exactly once."""

    def __init__(self, size: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_process_batch(total: int, world_size: int, what: str) -> int:
    if total % world_size:
        raise ValueError(f"{what} {total} does not divide among {world_size} processes")
    return total // world_size


def build_train_loader(cfg, pin_memory: bool) -> tuple[RobustImageFolder, ResumableDistributedSampler, DataLoader]:
    rank, world_size = world()
    dataset = RobustImageFolder(resolve_data_root(cfg) / cfg.DATA.TRAIN_DIR, train_transform(cfg),
                                cfg.SEED, cfg.DATA.MAX_BAD_IMAGE_RETRIES)
    sampler = ResumableDistributedSampler(len(dataset), world_size, rank, cfg.SEED)
    batch = per_process_batch(cfg.SOLVER.BATCH_SIZE, world_size, "SOLVER.BATCH_SIZE")
    if sampler.per_replica < batch:
        raise ValueError(f"{len(dataset)} training images give fewer than one batch of {batch} per process")
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.DATA.NUM_WORKERS,
                        pin_memory=pin_memory, drop_last=True)
    return dataset, sampler, loader


def iterations_per_epoch(dataset_size: int, cfg) -> int:
    _, world_size = world()
    return (dataset_size // world_size) // per_process_batch(cfg.SOLVER.BATCH_SIZE, world_size, "SOLVER.BATCH_SIZE")


def build_val_loader(cfg, pin_memory: bool) -> DataLoader:
    rank, world_size = world()
    dataset = RobustImageFolder(resolve_data_root(cfg) / cfg.DATA.VAL_DIR, val_transform(cfg),
                                cfg.SEED, cfg.DATA.MAX_BAD_IMAGE_RETRIES)
    batch = max(1, math.ceil(cfg.TEST.BATCH_SIZE / world_size))
    return DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset), world_size, rank),
                      num_workers=cfg.DATA.NUM_WORKERS, pin_memory=pin_memory)
