#!/usr/bin/env python
"""Built-in data for the demo: a classification set in the ImageNet folder layout and a detection
set in the Pascal VOC layout, with the same object classes (shapes in random colours) drawn at random
positions and scales on cluttered, textured backgrounds, so that where the object lies matters.

    python tools/make_demo_data.py --output output/demo/data            # deterministic by --seed

Writes ``classification/{train,val}/<class>/*.jpg`` and ``detection/`` (``JPEGImages/``,
``Annotations/``, ``ImageSets/Main/{trainval,test}.txt``), the same detection set in COCO format
with each shape's polygon mask in ``detection_coco/`` (``annotations/instances_{trainval,test}.json``,
the images in ``trainval/`` and ``test/``), then ``manifest.json`` (the settings) last.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np


from detection.coco import write_coco_json
from detection.voc import image_file, write_annotation, write_split

# The classes are shapes; every object gets a random saturated colour, so that no class can be
# told from its colour alone and a classifier has to learn shape.
CLASS_NAMES = ("disc", "square", "triangle", "ring", "cross")


def object_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random saturated, bright BGR colour: any hue, for any class."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(150, 256)]]], np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def cluttered_background(rng: np.random.Generator, size: int, clutter: tuple[int, int]) -> np.ndarray:
    """Smooth coloured noise with ``clutter`` (a range) muted blobs and lines: texture without the
    objects' saturated colours."""
    coarse = rng.integers(70, 170, (size // 8 + 1, size // 8 + 1, 3)).astype(np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, 40, (size, size, 3)).astype(np.uint8))
    for _ in range(rng.integers(*clutter)):
        colour = tuple(int(c) for c in rng.integers(60, 160, 3))
        centre = tuple(int(c) for c in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(2, size // 8)), colour, -1)
        else:
            end = tuple(int(c) for c in rng.integers(0, size, 2))
            cv2.line(image, centre, end, colour, int(rng.integers(1, 3)))
    return image


def draw_object(image: np.ndarray, shape: str, x1: int, y1: int, side: int, rng: np.random.Generator) -> None:
    """Draw one object of class ``shape`` filling the square ``(x1, y1, side)`` in a random colour."""
    colour = object_colour(rng)
    x2, y2 = x1 + side - 1, y1 + side - 1
    cx, cy, r = x1 + side // 2, y1 + side // 2, side // 2
    if shape == "disc":
        cv2.circle(image, (cx, cy), r, colour, -1)
    elif shape == "square":
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, -1)
    elif shape == "triangle":
        cv2.fillPoly(image, [np.array([(cx, y1), (x1, y2), (x2, y2)], np.int32)], colour)
    elif shape == "ring":
        cv2.circle(image, (cx, cy), r - max(1, side // 10), colour, max(2, side // 5))
    else:  # cross
        bar = max(2, side // 4)
        cv2.rectangle(image, (cx - bar // 2, y1), (cx + bar // 2, y2), colour, -1)
        cv2.rectangle(image, (x1, cy - bar // 2), (x2, cy + bar // 2), colour, -1)


def shape_polygon(shape: str, x1: int, y1: int, side: int) -> list[tuple[float, float]]:
    """The outline of what ``draw_object`` fills, in continuous pixel coordinates (pixel ``i``
    spans ``[i, i + 1)``): the COCO polygon mask of the object. The ring is a keyhole, its outer
    circle then its inner one backwards (a COCO polygon has no holes), reaching half a pixel past
    the nominal thickness each way (the pixels whose centres it covers). At the detection set's
    sizes the masks match the drawn pixels with IoU 1 (squares, crosses), above 0.95 (discs,
    triangles) and above 0.8 (rings)."""
    x2, y2 = x1 + side, y1 + side
    cx, cy, r = x1 + side // 2, y1 + side // 2, side // 2

    def circle(radius: float, points: int = 32) -> list[tuple[float, float]]:
        return [(cx + 0.5 + radius * math.cos(2 * math.pi * (k + 0.5) / points),
                 cy + 0.5 + radius * math.sin(2 * math.pi * (k + 0.5) / points)) for k in range(points + 1)]

    if shape == "disc":
        return circle(r)[:-1]
    if shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if shape == "triangle":
        return [(cx + 0.5, y1), (x2, y2), (x1, y2)]
    if shape == "ring":
        radius, thickness = r - max(1, side // 10), max(2, side // 5)
        return circle(radius + thickness / 2 + 0.5) + circle(radius - thickness / 2 - 0.5)[::-1]
    bar = max(2, side // 4)  # cross: the outline of the union of its two bars
    left, right, top, bottom = cx - bar // 2, cx + bar // 2 + 1, cy - bar // 2, cy + bar // 2 + 1
    return [(left, y1), (right, y1), (right, top), (x2, top), (x2, bottom), (right, bottom), (right, y2),
            (left, y2), (left, bottom), (x1, bottom), (x1, top), (left, top)]


def place(rng: np.random.Generator, size: int, scale: tuple[float, float], taken: list) -> tuple[int, int, int]:
    """A square ``(x1, y1, side)`` inside the image that overlaps no earlier one by much."""
    for _ in range(50):
        side = int(size * rng.uniform(*scale))
        x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if all(_overlap((x1, y1, side), other) < 0.3 for other in taken):
            return x1, y1, side
    return x1, y1, side


def _overlap(a, b) -> float:
    ax, ay, aside = a
    bx, by, bside = b
    w = max(0, min(ax + aside, bx + bside) - max(ax, bx))
    h = max(0, min(ay + aside, by + bside) - max(ay, by))
    return w * h / min(aside * aside, bside * bside)


def write_classification(root: Path, rng: np.random.Generator, per_class: dict[str, int], size: int) -> None:
    for split, count in per_class.items():
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / f"{label:02d}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = cluttered_background(rng, size, (1, 4))
                x1, y1, side = place(rng, size, (0.5, 0.8), [])
                draw_object(image, name, x1, y1, side, rng)
                cv2.imwrite(str(folder / f"{index:05d}.jpg"), image)


def write_detection(root: Path, rng: np.random.Generator, per_split: dict[str, int], size: int,
                    coco_root: Path) -> None:
    """The VOC tree under ``root`` and the same images and objects as a COCO-format set under ``coco_root``."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    next_id = 0
    for split, count in per_split.items():
        ids, coco_images = [], []
        (coco_root / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image_id = f"{next_id:06d}"
            next_id += 1
            image = cluttered_background(rng, size, (4, 9))
            objects, taken, polygons = [], [], []
            for _ in range(rng.integers(1, 4)):
                name = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
                x1, y1, side = place(rng, size, (0.18, 0.42), taken)
                taken.append((x1, y1, side))
                draw_object(image, name, x1, y1, side, rng)
                objects.append((name, (x1 + 1, y1 + 1, x1 + side, y1 + side), False))  # VOC: 1-based
                polygons.append((name, shape_polygon(name, x1, y1, side)))
            cv2.imwrite(image_file(root, image_id), image)
            write_annotation(root, image_id, size, size, objects)
            ids.append(image_id)
            shutil.copyfile(image_file(root, image_id), coco_root / split / f"{image_id}.jpg")
            coco_images.append((f"{image_id}.jpg", size, size, polygons))
        write_split(root, split, ids)
        write_coco_json(coco_root / "annotations" / f"instances_{split}.json", CLASS_NAMES, coco_images)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo/data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--detection-train", type=int, default=400)
    parser.add_argument("--detection-test", type=int, default=100)
    parser.add_argument("--classification-size", type=int, default=64)
    parser.add_argument("--detection-size", type=int, default=128)
    args = parser.parse_args(argv)
    output = Path(args.output)
    rng = np.random.default_rng(args.seed)
    write_classification(output / "classification", rng,
                         {"train": args.train_per_class, "val": args.val_per_class}, args.classification_size)
    write_detection(output / "detection", rng, {"trainval": args.detection_train, "test": args.detection_test},
                    args.detection_size, output / "detection_coco")
    # Written last: its presence says the folder is complete (the demo skips the stage then).
    (output / "manifest.json").write_text(json.dumps({"classes": list(CLASS_NAMES), **vars(args)}, indent=2) + "\n")
    print(f"wrote {output}: {len(CLASS_NAMES)} classes; classification {args.train_per_class}/{args.val_per_class} "
          f"per class at {args.classification_size} px; detection {args.detection_train}/{args.detection_test} "
          f"images at {args.detection_size} px")
    return output


if __name__ == "__main__":
    main()
