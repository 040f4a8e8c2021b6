"""A tiny Pascal VOC-format tree for tests: textured backgrounds with coloured boxes of a few
classes, some objects marked difficult, split into trainval and test."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detection.voc import image_file, write_annotation, write_split

CLASSES = ("red_box", "green_box", "blue_box")
COLOURS = ((40, 40, 220), (40, 200, 40), (220, 60, 40))  # BGR, one per class


def write_voc_tree(root: Path, train: int = 12, test: int = 6, size=(96, 128), seed: int = 0) -> Path:
    """Write the tree under ``root`` and return it; every 5th object is difficult."""
    rng = np.random.default_rng(seed)
    height, width = size
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    ids = {"trainval": [f"{i:06d}" for i in range(train)], "test": [f"{train + i:06d}" for i in range(test)]}
    count = 0
    for image_id in ids["trainval"] + ids["test"]:
        image = (rng.random((height, width, 3)) * 90 + 60).astype(np.uint8)
        objects = []
        for _ in range(rng.integers(1, 3)):
            label = int(rng.integers(len(CLASSES)))
            w, h = rng.integers(20, 44), rng.integers(20, 40)
            x1, y1 = rng.integers(0, width - w), rng.integers(0, height - h)
            image[y1:y1 + h, x1:x1 + w] = COLOURS[label]
            objects.append((CLASSES[label], (x1 + 1, y1 + 1, x1 + w, y1 + h), count % 5 == 4))
            count += 1
        cv2.imwrite(image_file(root, image_id), image)
        write_annotation(root, image_id, width, height, objects)
    for split, names in ids.items():
        write_split(root, split, names)
    return root
