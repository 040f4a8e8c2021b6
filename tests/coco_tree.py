"""A tiny COCO-format set for tests, laid out as ``TRANSFER.COCO_ROOT`` expects
(``annotations/instances_{train,val}.json``, images in ``train/`` and ``val/``): textured
backgrounds with filled shapes of three classes, each annotated with its polygon mask."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detection.coco import write_coco_json

CLASSES = ("red_square", "green_triangle", "blue_diamond")
COLOURS = ((40, 40, 220), (40, 200, 40), (220, 60, 40))  # BGR, one per class


def shape_polygon(label: int, x1: int, y1: int, side: int) -> list[tuple[int, int]]:
    """The outline of class ``label``'s shape filling the square ``(x1, y1, side)``."""
    x2, y2, cx, cy = x1 + side, y1 + side, x1 + side // 2, y1 + side // 2
    return [[(x1, y1), (x2, y1), (x2, y2), (x1, y2)],
            [(cx, y1), (x2, y2), (x1, y2)],
            [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]][label]


def write_coco_tree(root: Path, train: int = 12, test: int = 6, size=(96, 128), seed: int = 0) -> Path:
    """Write ``train`` images in split ``train`` and ``test`` in split ``val`` under ``root``;
    returns ``root``."""
    rng = np.random.default_rng(seed)
    height, width = size
    for split, count in (("train", train), ("val", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images = []
        for index in range(count):
            image = (rng.random((height, width, 3)) * 90 + 60).astype(np.uint8)
            objects = []
            for _ in range(rng.integers(1, 3)):
                label, side = int(rng.integers(len(CLASSES))), int(rng.integers(24, 44))
                x1, y1 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
                polygon = shape_polygon(label, x1, y1, side)
                cv2.fillPoly(image, [np.array(polygon, np.int32)], COLOURS[label])
                objects.append((CLASSES[label], polygon))
            file_name = f"{index:06d}.jpg"
            cv2.imwrite(str(root / split / file_name), image)
            images.append((file_name, width, height, objects))
        write_coco_json(root / "annotations" / f"instances_{split}.json", CLASSES, images)
    return root
