"""Training data: ImageNet-layout folders (a loader that survives corrupt files) or CIFAR, the
paper's transforms, and a distributed sampler that can resume in the middle of an epoch.

Augmentation randomness is drawn per sample from ``(seed, epoch, index)``, not from whichever
worker process happens to load the sample, so a resumed run sees exactly the batches an
uninterrupted run would have seen, whatever the number of workers. The training sampler hands
the datasets ``(epoch, index)`` keys: the epoch travels with each index, so persistent workers
(which keep their own copy of the dataset) never use a stale epoch.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets.folder import default_loader

from pretrain.cifar import CifarSplit, read_cifar
from pretrain.config import LIGHTING_EIGENVALUES, LIGHTING_EIGENVECTORS
from pretrain.device_pipeline import TrainDraw, collate_encoded, no_draw, read_encoded
from pretrain.image_index import ImageIndex, build_index, load_index, save_index

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "IMAGENET_ROOT"


class Lighting:
    """AlexNet PCA lighting noise on a [0, 1] tensor: add ``V (alpha * lambda)`` per image."""

    def __init__(self, alpha_std: float):
        self.alpha_std = alpha_std
        self.eigenvalues = torch.tensor(LIGHTING_EIGENVALUES)
        self.eigenvectors = torch.tensor(LIGHTING_EIGENVECTORS)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.alpha_std == 0:
            return image
        alpha = torch.randn(3) * self.alpha_std
        shift = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + shift.view(3, 1, 1)


AUGMENTATIONS = ("imagenet", "crop_flip", "none")
DATASETS = ("imagefolder", "cifar10", "cifar100")


def train_transform(cfg) -> transforms.Compose:
    """``DATA.AUGMENT``: the paper's ImageNet recipe, the CIFAR papers' 4-pixel-padded random
    crop and flip (the "+" of their tables), or none."""
    augment = cfg.DATA.AUGMENT
    if augment == "imagenet":
        steps = [transforms.RandomResizedCrop(cfg.DATA.IMAGE_SIZE, scale=tuple(cfg.DATA.CROP_SCALE)),
                 transforms.RandomHorizontalFlip()]
        if cfg.DATA.COLOR_JITTER:
            jitter = cfg.DATA.COLOR_JITTER
            steps.append(transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        steps += [transforms.ToTensor(), Lighting(cfg.DATA.LIGHTING_STD)]
    elif augment == "crop_flip":
        steps = [transforms.RandomCrop(cfg.DATA.IMAGE_SIZE, padding=4), transforms.RandomHorizontalFlip(),
                 transforms.ToTensor()]
    elif augment == "none":
        steps = [transforms.ToTensor()]
    else:
        raise ValueError(f"unknown DATA.AUGMENT {augment!r}; choose one of {AUGMENTATIONS}")
    return transforms.Compose([*steps, transforms.Normalize(cfg.DATA.MEAN, cfg.DATA.STD)])


def val_transform(cfg, normalize: bool = True) -> transforms.Compose:
    """Resize and centre-crop an ImageFolder image (CIFAR images are used as they are); without
    ``normalize`` the tensor stays in [0, 1], for attacks that work in pixel space."""
    steps = []
    if cfg.DATA.DATASET == "imagefolder":
        steps += [transforms.Resize(cfg.DATA.VAL_RESIZE), transforms.CenterCrop(cfg.DATA.IMAGE_SIZE)]
    steps.append(transforms.ToTensor())
    if normalize:
        steps.append(transforms.Normalize(cfg.DATA.MEAN, cfg.DATA.STD))
    return transforms.Compose(steps)


def seeded(transform, image, seed: int, epoch: int, index: int) -> torch.Tensor:
    """``transform(image)`` with its randomness drawn from ``(seed, epoch, index)``. Only the CPU
    generator, where the transforms draw, is seeded and restored: ``torch.manual_seed`` also
    seeds every accelerator's, 140 us an image."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    try:
        return transform(image)
    finally:
        torch.set_rng_state(state)


def resolve_data_root(cfg) -> Path:
    """``DATA.ROOT``, or ``$IMAGENET_ROOT`` when the config leaves it empty (ImageFolder only)."""
    fallback = os.environ.get(DATA_ROOT_ENV, "") if cfg.DATA.DATASET == "imagefolder" else ""
    root = cfg.DATA.ROOT or fallback
    if not root:
        raise ValueError(f"no dataset root: set DATA.ROOT in the config (or ${DATA_ROOT_ENV} for an ImageFolder)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root {path} (DATA.ROOT or ${DATA_ROOT_ENV}) is not a folder")
    return path


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """``(epoch, index)`` from a training sampler's key, or a plain index (epoch 0)."""
    return key if isinstance(key, tuple) else (0, key)


def unreadable_paths(batch_field: list[str]) -> list[str]:
    """The unreadable files a loaded batch replaced (the items' newline-joined third field)."""
    return [path for joined in batch_field if joined for path in joined.split("\n")]


class RobustImageFolder(Dataset):
    """An ImageFolder (listed by ``pretrain.image_index``) whose unreadable images are logged
    with their path and replaced by the next readable one; each item carries the paths it
    replaced (newline-joined, a string so the default collate keeps it) so the trainer can list
    them across worker processes. Each sample's random augmentation is seeded by
    ``(seed, epoch, index)``. ``load`` reads a file: PIL's loader, or (``DATA.BACKEND device``)
    its bytes for the training device to decode."""

    def __init__(self, index: ImageIndex, transform, seed: int, max_retries: int, load=default_loader):
        self.index = index
        self.load = load
        self.classes = index.classes
        self.transform = transform
        self.seed = seed
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = split_key(key)
        unreadable = []
        while True:
            path, label = self.index.path(index), self.index.label(index)
            try:
                image = self.load(path)
                break
            except Exception as error:  # any decoder failure: truncated, corrupt, not an image
                unreadable.append(path)
                logger.warning("unreadable image %s (%s); using the next one instead", path, error)
                if len(unreadable) > self.max_retries:
                    raise RuntimeError(f"{len(unreadable)} unreadable images in a row, the last {path}") from error
                index = (index + 1) % len(self.index)
        return seeded(self.transform, image, self.seed, epoch, index), label, "\n".join(unreadable)


class CifarDataset(Dataset):
    """A CIFAR split held in memory, with the ``(image, label, unreadable)`` items and per-sample
    seeding of ``RobustImageFolder`` (no file can be unreadable, so ``unreadable`` is empty)."""

    def __init__(self, split: CifarSplit, transform, seed: int):
        self.images, self.targets, self.classes = split.images, split.labels, split.classes
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = split_key(key)
        image = Image.fromarray(self.images[index])
        return seeded(self.transform, image, self.seed, epoch, index), int(self.targets[index]), ""


def shared_index(folder: Path, cache: Path | None) -> ImageIndex:
    """``folder``'s image index: listed once by rank 0 into ``cache`` (or found there from an
    earlier attempt of the run) and read by every process; without ``cache``, listed here."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if cache is None:
        return build_index(folder)
    if world()[0] == 0 and load_index(cache, folder) is None:
        save_index(build_index(folder), cache)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return load_index(cache, folder)


def build_dataset(cfg, train: bool, transform, index_cache: Path | None = None,
                  load=default_loader) -> RobustImageFolder | CifarDataset:
    """The training or validation split named by ``DATA.DATASET``, checked against
    ``MODEL.NUM_CLASSES``; an ImageFolder's index is kept under ``index_cache`` when given."""
    if cfg.DATA.DATASET not in DATASETS:
        raise ValueError(f"unknown DATA.DATASET {cfg.DATA.DATASET!r}; choose one of {DATASETS}")
    root = resolve_data_root(cfg)
    if cfg.DATA.DATASET == "imagefolder":
        split = cfg.DATA.TRAIN_DIR if train else cfg.DATA.VAL_DIR
        index = shared_index(root / split, index_cache / ("train" if train else "val") if index_cache else None)
        dataset = RobustImageFolder(index, transform, cfg.SEED, cfg.DATA.MAX_BAD_IMAGE_RETRIES, load)
    else:
        dataset = CifarDataset(read_cifar(root, cfg.DATA.DATASET, train), transform, cfg.SEED)
    if len(dataset.classes) > cfg.MODEL.NUM_CLASSES:
        raise ValueError(f"{root} has {len(dataset.classes)} classes but MODEL.NUM_CLASSES is "
                         f"{cfg.MODEL.NUM_CLASSES}")
    return dataset


class ResumableDistributedSampler(Sampler[int]):
    """This process's share of a seeded per-epoch shuffle (as ``DistributedSampler`` deals it,
    dropping the tail so every process gets the same count), able to start part-way through
    an epoch so that a resumed run continues with the very next batch. It yields
    ``(epoch, index)`` keys, which the datasets seed each sample's augmentation with."""

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
        return iter([(self.epoch, index) for index in mine[self.start:]])

    def __len__(self) -> int:
        return self.per_replica - self.start


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous share of ``size`` items, sizes differing by at most one
    (Detectron2's ``InferenceSampler``): each image evaluated exactly once, and the shares
    concatenated in rank order are the dataset's order."""

    def __init__(self, size: int, num_replicas: int, rank: int):
        sizes = [size // num_replicas + (index < size % num_replicas) for index in range(num_replicas)]
        begin = sum(sizes[:rank])
        self.indices = list(range(begin, begin + sizes[rank]))

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


def backend_dataset(cfg, train: bool, normalize: bool = True, index_cache: Path | None = None):
    """The split as ``DATA.BACKEND`` loads it, and its collate function (None: the default):
    PIL's transformed tensors, or each file's bytes with its drawn parameters."""
    if cfg.DATA.BACKEND == "device":
        draw = TrainDraw(cfg) if train else no_draw
        return build_dataset(cfg, train, draw, index_cache, read_encoded), collate_encoded
    transform = train_transform(cfg) if train else val_transform(cfg, normalize)
    return build_dataset(cfg, train, transform, index_cache), None


def build_train_loader(cfg, pin_memory: bool,
                       index_cache: Path | None = None) -> tuple[Dataset, ResumableDistributedSampler, DataLoader]:
    rank, world_size = world()
    dataset, collate = backend_dataset(cfg, True, index_cache=index_cache)
    sampler = ResumableDistributedSampler(len(dataset), world_size, rank, cfg.SEED)
    batch = per_process_batch(cfg.SOLVER.BATCH_SIZE, world_size, "SOLVER.BATCH_SIZE")
    if sampler.per_replica < batch:
        raise ValueError(f"{len(dataset)} training images give fewer than one batch of {batch} per process")
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.DATA.NUM_WORKERS,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=cfg.DATA.NUM_WORKERS > 0,
                        collate_fn=collate)
    return dataset, sampler, loader


def build_val_loader(cfg, pin_memory: bool, normalize: bool = True, index_cache: Path | None = None) -> DataLoader:
    """This process's share of the validation split (see ``val_transform`` for ``normalize``). Its
    workers persist between evaluations: starting them again took 1.5 s of each 4.5 s evaluation
    of the demo's 500 images (one core)."""
    rank, world_size = world()
    dataset, collate = backend_dataset(cfg, False, normalize, index_cache)
    batch = max(1, math.ceil(cfg.TEST.BATCH_SIZE / world_size))
    return DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset), world_size, rank),
                      num_workers=cfg.DATA.NUM_WORKERS, pin_memory=pin_memory,
                      persistent_workers=cfg.DATA.NUM_WORKERS > 0, collate_fn=collate)
