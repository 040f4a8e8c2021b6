"""A tiny Pascal VOC-format tree for tests: textured backgrounds with coloured boxes of a few
classes, some objects marked difficult, split into trainval and test."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("red_box", "green_box", "blue_box")
COLOURS = ((40, 40, 220), (40, 200, 40), (220, 60, 40))  # BGR, one per class


def annotation_xml(image_id: str, width: int, height: int, objects: list[dict]) -> str:
    parts = [f"<annotation><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for obj in objects:
        x1, y1, x2, y2 = obj["bbox"]  # 1-based, inclusive, as VOC stores them
        parts.append(f"<object><name>{obj['name']}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(obj['difficult'])}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"


def write_voc_tree(root: Path, train: int = 12, test: int = 6, size=(96, 128), seed: int = 0) -> Path:
    """Write the tree under ``root`` and return it; every 5th object is difficult."""
    rng = np.random.default_rng(seed)
    height, width = size
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
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
            objects.append({"name": CLASSES[label], "bbox": (x1 + 1, y1 + 1, x1 + w, y1 + h),
                            "difficult": count % 5 == 4})
            count += 1
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        (root / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, width, height, objects))
    for split, names in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root
