"""Synthetic CIFAR data in the real archive format: pickled dicts of a uint8 (N, 3072) 'data'
array (red, green, blue planes of 32 x 32) and a label list, in ``cifar-10-batches-py/`` or
``cifar-100-python/``, optionally packed as the downloadable ``.tar.gz``."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from pretrain.cifar import LAYOUTS
from pretrain.config import get_cfg

RECIPE = Path(__file__).resolve().parents[1] / "configs/pretrain/cifar/cifar10_resnet18_saliencymix.yaml"

# One saturated colour per class (RGB) for the square that carries the label.
COLOURS = ((230, 40, 40), (40, 200, 40), (40, 60, 230), (230, 210, 30), (200, 40, 200))


def synthetic_images(labels: np.ndarray, rng: np.random.Generator, contrast: float = 1.0) -> np.ndarray:
    """(N, 32, 32, 3) noisy grey backgrounds, each with a 12-pixel square of its class's colour
    (blended towards the background grey by ``1 - contrast``)."""
    images = rng.integers(60, 160, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    for image, label in zip(images, labels):
        top, left = rng.integers(0, 20, size=2)
        colour = 110 + contrast * (np.array(COLOURS[label % len(COLOURS)]) - 110)
        image[top:top + 12, left:left + 12] = colour.round().astype(np.uint8)
    return images


def write_cifar(root: Path, dataset: str = "cifar10", train: int = 60, test: int = 20, classes: int = 5,
                seed: int = 0, archive: bool = False, contrast: float = 1.0) -> Path:
    """Write the dataset's files under ``root`` (labels in 0..classes-1) and return ``root``."""
    layout = LAYOUTS[dataset]
    rng = np.random.default_rng(seed)
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class_{index}" for index in range(layout.num_classes)]
    meta = {layout.names_key: names}
    if dataset == "cifar100":
        meta["coarse_label_names"] = [f"superclass_{index}" for index in range(20)]
    write_pickle(folder / layout.meta_file, meta)
    for files, count in ((layout.train_files, train), (layout.test_files, test)):
        for index, file in enumerate(files):
            labels = rng.integers(0, classes, size=count // len(files) + (index < count % len(files)))
            images = synthetic_images(labels, rng, contrast)
            batch = {"batch_label": f"{file} of {len(files)}", layout.label_key: labels.tolist(),
                     "data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
                     "filenames": [f"image_{n}.png" for n in range(len(labels))]}
            if dataset == "cifar100":
                batch["coarse_labels"] = (labels % 20).tolist()
            write_pickle(folder / file, batch)
    if archive:
        with tarfile.open(root / layout.archive, "w:gz") as tar:
            tar.add(folder, arcname=layout.folder)
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    return root


def write_pickle(path: Path, value: object) -> None:
    path.write_bytes(pickle.dumps(value, protocol=2))


def cifar_cfg(root: Path, output: Path, *overrides: str):
    """The paper's CIFAR-10 recipe reading ``root`` and writing to ``output``, with ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    cfg.merge_from_file(str(RECIPE))
    cfg.merge_from_list(["DATA.ROOT", str(root), "OUTPUT_DIR", str(output), "DATA.NUM_WORKERS", "0", *overrides])
    return cfg
