#!/usr/bin/env python
"""Speed of ``detection.evaluation.VOCDetectionEvaluator`` against Detectron2's
``PascalVOCDetectionEvaluator``, side by side in one run on the same model outputs and the same
synthetic VOC tree (annotation XMLs and the split list: neither evaluator opens an image).

Target: ours >= 5x faster on 5,000 images x 20 classes, with AP / AP50 / AP75 equal to 1e-4.
Each evaluator is timed over ``process()`` of every image plus ``evaluate()``, twice:

- cold: the first evaluation, annotation XMLs parsed (ours: a fresh evaluator; Detectron2: its
  module-level ``parse_rec`` cache cleared);
- warm: annotations already parsed (ours: the same evaluator after ``reset()``; Detectron2: its
  cache filled). A trainer builds a new evaluator for every evaluation, so in periodic
  evaluation ours always runs cold while Detectron2 runs warm after its first one: the
  "ours cold vs Detectron2 warm" line is the conservative figure.

Without Detectron2 only ours is timed (and the run says so).

    python bench/bench_voc_eval.py                      # 5,000 images x 20 classes, VOC 2007 metric
    python bench/bench_voc_eval.py --images 1000 --year 2012
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from detection.evaluation import VOCDetectionEvaluator
from detection.voc import VOC_CLASSES, write_annotation, write_split

SPLIT = "test"
IMAGE_SIZE = (500, 375)  # width, height: a typical VOC image
SPEEDUP_TARGET = 5.0
TOLERANCE = 1e-4
BATCH_SIZE = 8  # images per process() call


def write_tree(root: Path, rng: np.random.Generator, num_images: int) -> dict[str, list]:
    """Annotation XMLs and the split list; returns image id -> [(class id, 1-based box, difficult)]."""
    width, height = IMAGE_SIZE
    tree = {}
    for index in range(num_images):
        objects = []
        for _ in range(rng.integers(1, 7)):
            w, h = rng.integers(20, 250), rng.integers(20, 250)
            x1, y1 = rng.integers(1, width - w), rng.integers(1, height - min(h, height - 2))
            objects.append((int(rng.integers(len(VOC_CLASSES))), (x1, y1, x1 + w, min(y1 + h, height)),
                            bool(rng.random() < 0.1)))
        image_id = f"{index:06d}"
        write_annotation(root, image_id, width, height,
                         [(VOC_CLASSES[label], box, difficult) for label, box, difficult in objects])
        tree[image_id] = objects
    write_split(root, SPLIT, list(tree))
    return tree


def synthetic_outputs(tree: dict, rng: np.random.Generator) -> dict[str, dict]:
    """Per image, torchvision-style float32 outputs: 1-3 jittered copies of each ground truth
    (scored high) and 15-40 random boxes (scored lower), so about 20-50 detections an image."""
    outputs = {}
    for image_id, objects in tree.items():
        boxes, scores, labels = [], [], []
        for label, (x1, y1, x2, y2), _ in objects:
            size = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1], dtype=np.float64)
            for _ in range(rng.integers(1, 4)):
                boxes.append(np.array([x1 - 1, y1 - 1, x2, y2]) + rng.normal(0, 0.08, 4) * size)
                scores.append(rng.uniform(0.3, 1.0))
                labels.append(label)
        for _ in range(rng.integers(15, 41)):
            x1, y1 = rng.uniform(0, IMAGE_SIZE[0] - 20), rng.uniform(0, IMAGE_SIZE[1] - 20)
            boxes.append([x1, y1, x1 + rng.uniform(10, 200), y1 + rng.uniform(10, 200)])
            scores.append(rng.uniform(0.0, 0.8))
            labels.append(int(rng.integers(len(VOC_CLASSES))))
        outputs[image_id] = {"boxes": torch.tensor(np.asarray(boxes), dtype=torch.float32),
                             "scores": torch.tensor(scores, dtype=torch.float32),
                             "labels": torch.tensor(labels, dtype=torch.int64)}
    return outputs


def as_detectron2_instances(outputs: dict[str, dict]) -> dict[str, dict]:
    """The same outputs as Detectron2 models return them, ``{"instances": Instances}``."""
    from detectron2.structures import Boxes, Instances

    converted = {}
    for image_id, output in outputs.items():
        instances = Instances((IMAGE_SIZE[1], IMAGE_SIZE[0]))
        instances.pred_boxes = Boxes(output["boxes"])
        instances.scores = output["scores"]
        instances.pred_classes = output["labels"]
        converted[image_id] = {"instances": instances}
    return converted


def timed_evaluation(evaluator, outputs: dict[str, dict]) -> tuple[dict, float]:
    """Results and seconds of reset(), process() over every image in batches, evaluate()."""
    image_ids = list(outputs)
    start = time.perf_counter()
    evaluator.reset()
    for first in range(0, len(image_ids), BATCH_SIZE):
        batch = image_ids[first:first + BATCH_SIZE]
        evaluator.process([{"image_id": i} for i in batch], [outputs[i] for i in batch])
    results = evaluator.evaluate()
    return results, time.perf_counter() - start


def detectron2_evaluator(root: Path, year: int):
    """Detectron2's evaluator on ``root`` with its annotation cache emptied, or None without Detectron2."""
    try:
        from detectron2.data.datasets import register_pascal_voc
        from detectron2.evaluation import PascalVOCDetectionEvaluator, pascal_voc_evaluation
    except ImportError:
        return None
    name = f"bench_voc_{root.parent.name}_{year}"
    register_pascal_voc(name, str(root), SPLIT, year, VOC_CLASSES)
    pascal_voc_evaluation.parse_rec.cache_clear()
    return PascalVOCDetectionEvaluator(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--year", type=int, default=2007, help="2007: 11-point metric; other years: area")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_voc_eval_") as folder:
        root = Path(folder) / "voc"
        tree = write_tree(root, rng, args.images)
        outputs = synthetic_outputs(tree, rng)
        detections = sum(len(o["scores"]) for o in outputs.values())
        print(f"{args.images} images x {len(VOC_CLASSES)} classes, {sum(map(len, tree.values()))} objects, "
              f"{detections} detections ({detections / args.images:.1f} per image), VOC {args.year} metric")

        theirs = detectron2_evaluator(root, args.year)
        if theirs is not None:
            outputs = as_detectron2_instances(outputs)  # both evaluators read the very same objects
        ours = VOCDetectionEvaluator(root, SPLIT, args.year, VOC_CLASSES)
        timings = {}
        results = {}
        for state in ("cold", "warm"):
            results["ours"], timings["ours", state] = timed_evaluation(ours, outputs)
            if theirs is not None:
                results["detectron2"], timings["detectron2", state] = timed_evaluation(theirs, outputs)

    print(f"ours        cold {timings['ours', 'cold']:8.2f} s   warm {timings['ours', 'warm']:8.2f} s")
    print(f"ours: {format_metrics(results['ours']['bbox'])}")
    if theirs is None:
        print("Detectron2 is not importable: only our evaluator was timed, no speed-up or difference measured")
        return
    print(f"detectron2  cold {timings['detectron2', 'cold']:8.2f} s   warm {timings['detectron2', 'warm']:8.2f} s")
    print(f"detectron2: {format_metrics(results['detectron2']['bbox'])}")
    for label, mine, reference in (("cold vs cold", "cold", "cold"), ("warm vs warm", "warm", "warm"),
                                   ("ours cold vs detectron2 warm", "cold", "warm")):
        speedup = timings["detectron2", reference] / timings["ours", mine]
        print(f"speed-up {label:<30}{speedup:7.1f}x  target >= {SPEEDUP_TARGET:g}x: "
              f"{'met' if speedup >= SPEEDUP_TARGET else 'NOT met'}")
    difference = max(abs(results["ours"]["bbox"][k] - results["detectron2"]["bbox"][k]) for k in ("AP", "AP50", "AP75"))
    print(f"max |difference| of AP, AP50, AP75: {difference:.2e}  "
          f"tolerance {TOLERANCE:g}: {'met' if difference <= TOLERANCE else 'NOT met'}")


def format_metrics(bbox: dict) -> str:
    return ", ".join(f"{key} {bbox[key]:.4f}" for key in ("AP", "AP50", "AP75"))


if __name__ == "__main__":
    main()
