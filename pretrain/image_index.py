"""An ImageFolder's file list (torchvision's: sorted class folders, their image files) held in
three numpy arrays: the paths' bytes end to end, where each path starts, and the labels.

ImageNet's 1.28M paths and labels as Python objects take ~200 MB per process, and every loader
worker copies them page by page as reference counts touch them (8 processes x 8 workers: ~14 GB
per node). Arrays are never touched that way; saved as ``.npy`` files and memory-mapped, they
are one copy in the page cache for every process of the node. A trainer builds its index once
(rank 0, into the run folder) and every process and every later attempt of the run reads it,
instead of each walking the shared file system at each start.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from pretrain.atomic_file import atomic_write, atomic_write_json

FILES = ("paths", "offsets", "labels")
ABOUT = "index.json"  # the folder it lists, its classes and image count: written last


@dataclass(frozen=True)
class ImageIndex:
    folder: str
    classes: list[str]
    paths: np.ndarray  # uint8: every path's UTF-8 bytes, end to end
    offsets: np.ndarray  # int64, one more than images: path i is paths[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int16 (int32 beyond 32767 classes)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return self.paths[self.offsets[index]:self.offsets[index + 1]].tobytes().decode()

    def label(self, index: int) -> int:
        return int(self.labels[index])


def build_index(folder: Path) -> ImageIndex:
    """Walk ``folder`` as ``torchvision.datasets.ImageFolder`` does (same classes, order, files)."""
    classes, class_to_index = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_index, extensions=IMG_EXTENSIONS)
    encoded = [path.encode() for path, _ in samples]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(path) for path in encoded], out=offsets[1:])
    label_type = np.int16 if len(classes) <= np.iinfo(np.int16).max else np.int32
    return ImageIndex(str(folder), classes, np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets,
                      np.array([label for _, label in samples], dtype=label_type))


def save_index(index: ImageIndex, cache: Path) -> None:
    for name in FILES:
        atomic_write(cache / f"{name}.npy", lambda stream, name=name: np.save(stream, getattr(index, name)))
    atomic_write_json(cache / ABOUT, {"folder": index.folder, "classes": index.classes, "images": len(index)})


def load_index(cache: Path, folder: Path) -> ImageIndex | None:
    """The index saved in ``cache`` for ``folder``, memory-mapped; None when there is none (or
    it lists another folder)."""
    about_path = cache / ABOUT
    if not about_path.is_file():
        return None
    about = json.loads(about_path.read_text())
    if about["folder"] != str(folder):
        return None
    arrays = {name: np.load(cache / f"{name}.npy", mmap_mode="r") for name in FILES}
    if len(arrays["labels"]) != about["images"]:
        raise ValueError(f"the image index in {cache} is incomplete; delete the folder to rebuild it")
    return ImageIndex(about["folder"], about["classes"], **arrays)
