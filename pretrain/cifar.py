"""CIFAR-10 and CIFAR-100 from the standard python-pickle archives in a local folder.

``DATA.ROOT`` may hold the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or
the archive as downloaded (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), or be the
extracted folder itself. Nothing is downloaded. The pickles are read by an unpickler that
accepts only what the archives hold (dicts, lists, strings, numbers and NumPy arrays), so a
tampered file cannot run code.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDE = 32


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                           tuple(f"data_batch_{index}" for index in range(1, 6)), ("test_batch",),
                           "batches.meta", "labels", "label_names", 10),
    "cifar100": CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",),
                            "meta", "fine_labels", "fine_label_names", 100),
}

# The globals a NumPy array's pickle refers to (NumPy 1 and 2 module names; ``_codecs.encode``
# turns the array's bytes back from the latin-1 text that protocol-2 pickles store them as).
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class CifarFormatError(ValueError):
    """A CIFAR file that is missing or not in the archive's format."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR file never holds")
        return super().find_class(module, name)


@dataclass
class CifarSplit:
    """Images as an (N, 32, 32, 3) uint8 array, labels as int64, and the class names."""
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


def read_cifar(root: Path, dataset: str, train: bool) -> CifarSplit:
    """The train or test split of ``dataset`` (cifar10 or cifar100) found under ``root``."""
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; choose one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[dataset]
    source = _open_source(Path(root), layout)
    meta = source.read(layout.meta_file)
    classes = [str(name) for name in _entry(meta, layout.names_key, source.name(layout.meta_file))]
    if len(classes) != layout.num_classes:
        raise CifarFormatError(f"{source.name(layout.meta_file)}: {len(classes)} class names, "
                               f"{dataset} has {layout.num_classes}")
    images, labels = [], []
    for file in layout.train_files if train else layout.test_files:
        batch_images, batch_labels = _batch(source.read(file), layout, source.name(file))
        images.append(batch_images)
        labels.append(batch_labels)
    return CifarSplit(np.concatenate(images), np.concatenate(labels), classes)


def _batch(batch: dict, layout: CifarLayout, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(_entry(batch, "data", name))
    labels = np.asarray(_entry(batch, layout.label_key, name), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise CifarFormatError(f"{name}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {3 * SIDE * SIDE})")
    if labels.shape != (len(data),):
        raise CifarFormatError(f"{name}: {labels.size} labels for {len(data)} images")
    if len(labels) and not 0 <= labels.min() <= labels.max() < layout.num_classes:
        raise CifarFormatError(f"{name}: labels outside 0..{layout.num_classes - 1}")
    # Each row is the red plane, then green, then blue, each 32 rows of 32 pixels.
    return data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def _entry(mapping: object, key: str, name: str):
    if not isinstance(mapping, dict) or key not in mapping:
        keys = sorted(map(str, mapping)) if isinstance(mapping, dict) else type(mapping).__name__
        raise CifarFormatError(f"{name}: no '{key}' entry (has {keys})")
    return mapping[key]


def _unpickle(raw: bytes, name: str) -> object:
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as error:
        raise CifarFormatError(f"{name}: not a CIFAR pickle ({error})") from None


class _FolderSource:
    def __init__(self, folder: Path):
        self.folder = folder

    def name(self, file: str) -> str:
        return str(self.folder / file)

    def read(self, file: str) -> object:
        path = self.folder / file
        if not path.is_file():
            raise CifarFormatError(f"{path} does not exist")
        return _unpickle(path.read_bytes(), str(path))


class _ArchiveSource:
    def __init__(self, archive: Path, folder: str):
        self.archive = archive
        self.folder = folder
        try:
            with tarfile.open(archive) as tar:
                self.members = {member.name: tar.extractfile(member).read()
                                for member in tar.getmembers() if member.isfile()}
        except (tarfile.TarError, OSError) as error:
            raise CifarFormatError(f"{archive}: not a readable tar archive ({error})") from None

    def name(self, file: str) -> str:
        return f"{self.archive}:{self.folder}/{file}"

    def read(self, file: str) -> object:
        raw = self.members.get(f"{self.folder}/{file}")
        if raw is None:
            raise CifarFormatError(f"{self.archive} has no {self.folder}/{file}")
        return _unpickle(raw, self.name(file))


def _open_source(root: Path, layout: CifarLayout) -> _FolderSource | _ArchiveSource:
    for folder in (root / layout.folder, root):
        if (folder / layout.meta_file).is_file():
            return _FolderSource(folder)
    if (root / layout.archive).is_file():
        return _ArchiveSource(root / layout.archive, layout.folder)
    raise CifarFormatError(f"no CIFAR data in {root}: expected {root / layout.folder}/ or "
                           f"{root / layout.archive} (DATA.ROOT; nothing is downloaded)")
