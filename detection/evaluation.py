"""Pascal VOC mAP, numerically equal to Detectron2's ``PascalVOCDetectionEvaluator`` but vectorised.

``VOCDetectionEvaluator`` follows Detectron2's ``DatasetEvaluator`` protocol (``reset()``,
``process(inputs, outputs)``, ``evaluate()``) by duck typing, so it plugs into Detectron2's
``inference_on_dataset`` (alone or in a list) and works without Detectron2 installed.

Semantics are those of Detectron2's port of the VOC devkit, reproduced on purpose:

- Detections are compared as Detectron2 writes them to its text files and reads them back:
  ``xmin + 1`` and ``ymin + 1`` (computed in the boxes' own dtype; the inverse of the ``- 1``
  applied when loading, so they meet the 1-based XML boxes), coordinates rounded to 1 decimal
  and scores to 3. That rounding decides score ties and IoUs that land on a threshold.
- Per class, detections are ranked by ``np.argsort(-score)`` over the same order Detectron2
  accumulates them in (processing order, ranks concatenated), so ties break identically.
- IoU uses the devkit's inclusive pixels (``+ 1`` in widths and heights). A detection is tested
  against its best-overlapping ground truth of the class in its image: overlap not above the
  threshold, or a ground truth already taken, makes it a false positive; a difficult ground
  truth makes it neither. Difficult objects are not counted as positives.
- VOC 2007 uses the 11-point interpolated AP at recalls ``np.arange(0, 1.1, 0.1)``, any other
  year the area under the interpolated precision-recall curve.
- AP is the mean over the IoU thresholds 0.50, 0.55, ..., 0.95 of the class-mean AP; AP50 and
  AP75 are the class means at 0.50 and 0.75; all in percent.
- A class with no non-difficult ground truth in the split gets the devkit's value: 0 with the
  11-point metric or without detections, NaN for the area metric with detections (0 / 0 recall).

Where it differs from Detectron2: annotations are parsed once per evaluator and the whole
evaluation runs on arrays; an ``image_id`` outside the split or a class id outside
``class_names`` raises at ``process`` instead of failing (or being dropped) later.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist

from detection.voc import VOC_CLASSES, annotation_file, parse_annotation, read_split_ids, split_file
from helpers.distributed import all_gather_objects

IOU_THRESHOLDS_PERCENT = tuple(range(50, 100, 5))
ELEVEN_RECALL_LEVELS = np.arange(0.0, 1.1, 0.1)  # Detectron2's grid, float quirks included
SCORE_DECIMALS = 3  # Detectron2 writes scores with "{:.3f}" ...
BOX_DECIMALS = 1  # ... and box coordinates with "{:.1f}"

logger = logging.getLogger(__name__)


class Detections(NamedTuple):
    """Detections as parallel arrays: split image index, class id, score, devkit box (1-based xmin/ymin)."""
    images: np.ndarray  # (D,) int64
    labels: np.ndarray  # (D,) int64
    scores: np.ndarray  # (D,) float64
    boxes: np.ndarray  # (D, 4) float64

    @staticmethod
    def concatenate(parts: Sequence["Detections"]) -> "Detections":
        if not parts:
            return Detections(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))
        return Detections(*(np.concatenate(column) for column in zip(*parts)))


class GroundTruth(NamedTuple):
    """Ground-truth boxes grouped by (class, image): group ``label * num_images + image`` is
    ``boxes[starts[group]:starts[group + 1]]``, in XML order within the group."""
    boxes: np.ndarray  # (M, 4) float64, 1-based devkit coordinates
    difficult: np.ndarray  # (M,) bool
    starts: np.ndarray  # (num_classes * num_images + 1,) int64
    positives: np.ndarray  # (num_classes,) non-difficult objects per class


class VOCDetectionEvaluator:
    """VOC mAP of detections on the split ``split`` of the VOC-format tree ``dataset_root``.

    ``outputs`` passed to ``process`` are, per input, one of:

    - Detectron2's ``{"instances": Instances}`` or an ``Instances``-like object with
      ``pred_boxes`` (a ``Boxes`` with ``.tensor``, or a tensor), ``scores``, ``pred_classes``;
    - a torchvision-style dict of tensors ``boxes`` / ``scores`` / ``labels``. Its labels
      index ``class_names`` directly (0 is the first class): subtract 1 from the labels of a
      torchvision model that reserves 0 for the background.

    Boxes are absolute XYXY in the image's pixel space (Detectron2's convention). ``year``
    2007 selects the 11-point metric. ``evaluate()`` returns, on the main process,
    ``{"bbox": {"AP", "AP50", "AP75"}, "per_class_AP50": {class_name: AP50}}`` in percent:
    ``"bbox"`` is exactly what Detectron2's evaluator returns, and the per-class figures sit
    under their own top-level key, a flat ``{name: float}`` that Detectron2's
    ``print_csv_format``, ``flatten_results_dict`` and ``verify_results`` all accept.
    Other processes return ``{}``. Under ``torch.distributed`` every process must call
    ``evaluate()``: every process's detections are gathered, in rank order, and rank 0 scores them.
    """

    def __init__(self, dataset_root, split: str, year: int, class_names: Sequence[str] = VOC_CLASSES):
        self._root = os.fspath(dataset_root)
        self._split = split
        self._class_names = tuple(class_names)
        self._eleven_point = int(year) == 2007
        self._image_ids = read_split_ids(self._root, split)
        self._image_index = {image_id: index for index, image_id in enumerate(self._image_ids)}
        self._ground_truth: GroundTruth | None = None  # parsed on the first evaluate(), then kept
        self.reset()

    def reset(self) -> None:
        self._detections: list[Detections] = []

    def process(self, inputs, outputs) -> None:
        for model_input, output in zip(inputs, outputs):
            image_id = str(model_input["image_id"])
            self._detections.append(self._image_detections(image_id, output))

    def evaluate(self) -> dict:
        gathered = all_gather_objects(Detections.concatenate(self._detections))
        if dist.is_initialized() and dist.get_rank() != 0:
            return {}
        detections = Detections.concatenate(gathered)
        ap = average_precisions(as_written_by_detectron2(detections), self._loaded_ground_truth(),
                                len(self._image_ids), self._eleven_point)
        return self._summary(ap)

    def _loaded_ground_truth(self) -> GroundTruth:
        if self._ground_truth is None:
            self._ground_truth = load_ground_truth(self._root, self._image_ids, self._class_names)
            self._warn_about_classes_without_positives()
        return self._ground_truth

    def _image_detections(self, image_id: str, output) -> Detections:
        if image_id not in self._image_index:
            raise ValueError(f"image_id {image_id!r} is not listed in {split_file(self._root, self._split)}")
        boxes, scores, labels = prediction_arrays(output)
        if boxes.shape != (len(scores), 4) or labels.shape != scores.shape:
            raise ValueError(f"image {image_id!r}: expected boxes (N, 4), scores (N,) and labels (N,), "
                             f"got {boxes.shape}, {scores.shape} and {labels.shape}")
        outside = (labels < 0) | (labels >= len(self._class_names))
        if outside.any():
            raise ValueError(f"image {image_id!r}: class id {int(labels[outside][0])} is outside the "
                             f"{len(self._class_names)} classes {list(self._class_names)}")
        one_based = boxes.copy()
        one_based[:, :2] += 1  # in the boxes' dtype, as Detectron2 adds it before writing
        return Detections(np.full(len(scores), self._image_index[image_id], np.int64),
                          labels.astype(np.int64), scores.astype(np.float64), one_based.astype(np.float64))

    def _summary(self, ap: np.ndarray) -> dict:
        class_mean = ap.mean(axis=1)  # one value per IoU threshold
        at = {threshold: value for threshold, value in zip(IOU_THRESHOLDS_PERCENT, class_mean)}
        return {
            "bbox": {"AP": float(class_mean.mean()), "AP50": float(at[50]), "AP75": float(at[75])},
            "per_class_AP50": {name: float(value) for name, value in zip(self._class_names, ap[0])},
        }

    def _warn_about_classes_without_positives(self) -> None:
        empty = [name for name, count in zip(self._class_names, self._ground_truth.positives) if count == 0]
        if empty:
            logger.warning("%s: no non-difficult ground truth for %s: AP is the devkit's 0 (11-point) "
                           "or NaN (area, once the class has a detection)",
                           split_file(self._root, self._split), ", ".join(empty))


def prediction_arrays(output) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, scores, labels) of one image's output, in any of the supported formats."""
    if isinstance(output, Mapping) and "instances" in output:
        output = output["instances"]
    if isinstance(output, Mapping):
        missing = [key for key in ("boxes", "scores", "labels") if key not in output]
        if missing:
            raise KeyError(f"detection output dict lacks {missing}; it has {sorted(output)}")
        return as_numpy(output["boxes"]).reshape(-1, 4), as_numpy(output["scores"]), as_numpy(output["labels"])
    if hasattr(output, "pred_boxes"):
        boxes = getattr(output.pred_boxes, "tensor", output.pred_boxes)
        return as_numpy(boxes).reshape(-1, 4), as_numpy(output.scores), as_numpy(output.pred_classes)
    raise TypeError(f"unsupported detection output {type(output).__name__}: expected Instances "
                    "(pred_boxes, scores, pred_classes), {'instances': Instances} or a dict of boxes, scores, labels")


def as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.numpy()
    return np.asarray(values)


def load_ground_truth(root: str, image_ids: Sequence[str], class_names: Sequence[str]) -> GroundTruth:
    """Parse every annotation of the split once and group its boxes by (class, image)."""
    boxes, difficult, groups = [], [], []
    for index, image_id in enumerate(image_ids):
        for obj in parse_annotation(annotation_file(root, image_id), class_names)["objects"]:
            x1, y1, x2, y2 = obj["bbox"]
            boxes.append((x1 + 1.0, y1 + 1.0, x2, y2))  # back to the XML's 1-based values
            difficult.append(obj["difficult"])
            groups.append(obj["category_id"] * len(image_ids) + index)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    difficult = np.asarray(difficult, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups, minlength=len(class_names) * len(image_ids))
    labels = groups // len(image_ids)
    positives = np.bincount(labels[~difficult], minlength=len(class_names))
    return GroundTruth(boxes[order], difficult[order], np.concatenate(([0], np.cumsum(counts))), positives)


def as_written_by_detectron2(detections: Detections) -> Detections:
    """Scores and boxes after Detectron2's round trip through "{:.3f}" / "{:.1f}" text."""
    return detections._replace(scores=round_like_text(detections.scores, SCORE_DECIMALS),
                               boxes=round_like_text(detections.boxes, BOX_DECIMALS))


def round_like_text(values: np.ndarray, decimals: int) -> np.ndarray:
    """``float(f"{v:.{decimals}f}")`` for every value, vectorised.

    Scaling, ``rint`` (half to even, like the formatting of the exact binary value) and
    dividing back gives the same double unless ``v * 10**decimals`` had to be rounded right
    next to a half; those rare values are formatted one by one.
    """
    scale = 10.0 ** decimals
    scaled = values * scale
    rounded = np.rint(scaled) / scale
    near_half = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6
    for index in zip(*np.nonzero(near_half)):
        rounded[index] = float(f"{values[index]:.{decimals}f}")
    return rounded


def average_precisions(detections: Detections, ground_truth: GroundTruth, num_images: int,
                       eleven_point: bool) -> np.ndarray:
    """AP in percent, shape (IoU thresholds, classes)."""
    num_classes = len(ground_truth.positives)
    overlap, best = best_overlaps(detections, ground_truth, num_images)
    ranked = [rank_by_score(np.flatnonzero(detections.labels == label), detections.scores)
              for label in range(num_classes)]
    order = np.concatenate(ranked)  # class after class, each from its highest score down
    bounds = np.cumsum([0] + [len(indices) for indices in ranked])
    ap = np.zeros((len(IOU_THRESHOLDS_PERCENT), num_classes))
    for row, percent in enumerate(IOU_THRESHOLDS_PERCENT):
        true, false = true_false_positives(overlap[order], best[order], ground_truth.difficult, percent / 100.0)
        for label in range(num_classes):
            ranks = slice(bounds[label], bounds[label + 1])
            ap[row, label] = 100.0 * average_precision(true[ranks], false[ranks],
                                                       ground_truth.positives[label], eleven_point)
    return ap


def rank_by_score(indices: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``indices`` from the highest score down, ties broken by ``np.argsort(-score)`` as Detectron2."""
    return indices[np.argsort(-scores[indices])]


def best_overlaps(detections: Detections, ground_truth: GroundTruth, num_images: int):
    """Per detection: the highest devkit IoU with a ground truth of its class in its image
    (-inf when there is none) and that ground truth's index (the first one on ties, -1 if none)."""
    groups = detections.labels * num_images + detections.images
    first_truth = ground_truth.starts[groups]
    counts = ground_truth.starts[groups + 1] - first_truth
    pair_detection = np.repeat(np.arange(len(groups)), counts)
    pair_offsets = np.cumsum(counts) - counts  # where each detection's pairs begin
    pair_truth = first_truth[pair_detection] + np.arange(len(pair_detection)) - pair_offsets[pair_detection]
    iou = devkit_iou(detections.boxes[pair_detection], ground_truth.boxes[pair_truth])

    overlap = np.full(len(groups), -np.inf)
    best = np.full(len(groups), -1, dtype=np.int64)
    has_truth = counts > 0
    if has_truth.any():
        overlap[has_truth] = np.maximum.reduceat(iou, pair_offsets[has_truth])
        no_match = np.iinfo(np.int64).max
        candidates = np.where(iou == overlap[pair_detection], pair_truth, no_match)
        first_best = np.minimum.reduceat(candidates, pair_offsets[has_truth])
        best[has_truth] = np.where(first_best == no_match, -1, first_best)  # NaN overlaps match nothing
    return overlap, best


def devkit_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Row-wise IoU of 1-based inclusive boxes, in the devkit's operation order (bit-equal
    results matter: integer boxes often land exactly on a threshold)."""
    width = np.maximum(np.minimum(others[:, 2], boxes[:, 2]) - np.maximum(others[:, 0], boxes[:, 0]) + 1.0, 0.0)
    height = np.maximum(np.minimum(others[:, 3], boxes[:, 3]) - np.maximum(others[:, 1], boxes[:, 1]) + 1.0, 0.0)
    intersection = width * height
    union = ((boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
             + (others[:, 2] - others[:, 0] + 1.0) * (others[:, 3] - others[:, 1] + 1.0)
             - intersection)
    with np.errstate(divide="ignore", invalid="ignore"):
        return intersection / union


def true_false_positives(overlap: np.ndarray, best: np.ndarray, difficult: np.ndarray, threshold: float):
    """0/1 flags of ranked detections: overlapping a ground truth above ``threshold`` makes the
    first (best-ranked) claimant of that ground truth a true positive and later ones false
    positives (duplicates); a difficult ground truth makes its claimants neither."""
    hit = overlap > threshold
    hit_difficult = np.zeros_like(hit)
    hit_difficult[hit] = difficult[best[hit]]
    claims = np.flatnonzero(hit & ~hit_difficult)
    _, first_claims = np.unique(best[claims], return_index=True)
    true = np.zeros(len(overlap))
    true[claims[first_claims]] = 1.0
    false = (~hit).astype(np.float64)
    false[claims] = 1.0 - true[claims]
    return true, false


def average_precision(true: np.ndarray, false: np.ndarray, positives: int, eleven_point: bool) -> float:
    """The devkit's AP of ranked 0/1 true/false-positive flags."""
    true_count = np.cumsum(true)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = true_count / float(positives)
    precision = true_count / np.maximum(true_count + np.cumsum(false), np.finfo(np.float64).eps)
    if eleven_point:
        return eleven_point_ap(recall, precision)
    return area_ap(recall, precision)


def eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Mean over 11 recall levels of the best precision at a recall at least that level (0 if none)."""
    reached = recall[None, :] >= ELEVEN_RECALL_LEVELS[:, None]
    best = np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0)
    return float(sum(best / 11.0))


def area_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (the best precision at any higher recall), summed
    over the points where recall changes, with recall sentinels 0 and 1."""
    recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    step = np.diff(recall)
    changed = step != 0
    return float(np.sum(step[changed] * envelope[1:][changed]))
