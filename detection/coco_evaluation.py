"""COCO box and mask AP with pycocotools, shaped like Detectron2's ``COCOEvaluator`` results, for
the torchvision engine (which runs without Detectron2).

``COCOEvaluator`` follows Detectron2's ``DatasetEvaluator`` protocol (``reset()``,
``process(inputs, outputs)``, ``evaluate()``) and Detectron2's choices:

- Detections become COCO results as Detectron2's ``instances_to_coco_json`` writes them: XYWH
  boxes, masks thresholded at 0.5 (``>=``, as Detectron2 pastes them) and RLE-encoded, the
  contiguous class index mapped back to the json's category id (categories sorted by id).
- Masks are scored without the result's box, so that COCOeval takes a mask's area from the mask
  (small / medium / large) rather than from its box, as Detectron2 does.
- Every image of the json counts (missed images lower recall); AP, AP50, AP75, APs, APm, APl
  and a per-category ``AP-<name>`` are in percent, NaN where COCOeval has no value; without any
  detection every metric is NaN.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation import as_numpy
from helpers.distributed import all_gather_objects
from pretrain.atomic_file import atomic_write_json

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the order of COCOeval.stats
TASKS = ("bbox", "segm")
MASK_THRESHOLD = 0.5
RESULTS_FILE = "coco_instances_results.json"


class COCOEvaluator:
    """Box (and with ``"segm"`` in ``tasks``, mask) AP of detections on the COCO-format
    ``json_file``.

    ``outputs`` passed to ``process`` are, per input (a dataset dict with the COCO
    ``image_id``), dicts of tensors or arrays: ``boxes`` (N, 4) absolute XYXY, ``scores`` (N,),
    ``labels`` (N,) contiguous class indices (0 is the json's first category by id: subtract 1
    from the labels of a torchvision model that reserves 0 for the background) and, for
    ``"segm"``, ``masks`` (N, 1, H, W) or (N, H, W) at the image's size, probabilities or 0/1.

    ``evaluate()`` returns, on the main process, ``{task: {"AP", "AP50", "AP75", "APs", "APm",
    "APl", "AP-<category>"...}}``; other processes return ``{}``. Under ``torch.distributed``
    every process must call it: every process's results are gathered, in rank order, and rank 0
    scores them. With ``output_dir`` rank 0 also writes them there as ``coco_instances_results.json``.
    """

    def __init__(self, json_file, tasks: Sequence[str] = ("bbox",), output_dir=None):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"COCO evaluation tasks {list(tasks)}: choose among {TASKS}")
        self._json_file = Path(json_file)
        self._tasks = tuple(tasks)
        self._output_dir = Path(output_dir) if output_dir else None
        self._ground_truth: COCO | None = None  # read on the first evaluate(), on rank 0 only, then kept
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []  # COCO results, "category_id" still the contiguous index
        self._processed = 0

    def process(self, inputs, outputs) -> None:
        for model_input, output in zip(inputs, outputs):
            self._results += self._image_results(int(model_input["image_id"]), output)
            self._processed += 1

    def evaluate(self) -> dict:
        gathered = all_gather_objects((self._processed, self._results))
        if dist.is_initialized() and dist.get_rank() != 0:
            return {}
        if sum(processed for processed, _ in gathered) == 0:
            logger.warning("%s: no image was processed; nothing to evaluate", self._json_file)
            return {}
        results = self._with_category_ids([result for _, part in gathered for result in part])
        if self._output_dir:
            atomic_write_json(self._output_dir / RESULTS_FILE, results)
        return {task: self._task_results(task, results) for task in self._tasks}

    # ------------------------------------------------------------------------------ detections
    def _image_results(self, image_id: int, output) -> list[dict]:
        if not isinstance(output, Mapping):
            raise TypeError(f"image {image_id}: expected a dict of boxes, scores, labels (and masks), "
                            f"got {type(output).__name__}")
        needed = ("boxes", "scores", "labels", "masks") if "segm" in self._tasks else ("boxes", "scores", "labels")
        missing = [key for key in needed if key not in output]
        if missing:
            raise KeyError(f"image {image_id}: the detection output lacks {missing}; it has {sorted(output)}")
        boxes = as_numpy(output["boxes"]).reshape(-1, 4).astype(np.float64)
        scores, labels = as_numpy(output["scores"]), as_numpy(output["labels"])
        if labels.shape != scores.shape or len(boxes) != len(scores):
            raise ValueError(f"image {image_id}: expected boxes (N, 4), scores (N,) and labels (N,), "
                             f"got {boxes.shape}, {scores.shape} and {labels.shape}")
        boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
        results = [{"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": float(score)}
                   for box, score, label in zip(boxes, scores, labels)]
        if "segm" in self._tasks:
            for result, rle in zip(results, encoded_masks(output["masks"], len(results), image_id)):
                result["segmentation"] = rle
        return results

    def _with_category_ids(self, results: list[dict]) -> list[dict]:
        """Contiguous indices -> the json's category ids; unknown images or classes named."""
        ground_truth = self._loaded_ground_truth()
        category_ids = sorted(ground_truth.getCatIds())
        known_images = set(ground_truth.getImgIds())
        for result in results:
            if result["image_id"] not in known_images:
                raise ValueError(f"image_id {result['image_id']} is not an image of {self._json_file}")
            if not 0 <= result["category_id"] < len(category_ids):
                raise ValueError(f"image {result['image_id']}: class index {result['category_id']} is outside "
                                 f"the {len(category_ids)} categories of {self._json_file}")
        return [{**result, "category_id": category_ids[result["category_id"]]} for result in results]

    # ------------------------------------------------------------------------------ scoring
    def _task_results(self, task: str, results: list[dict]) -> dict[str, float]:
        if not results:
            logger.warning("%s: no detections; every %s metric is NaN", self._json_file, task)
            return {metric: float("nan") for metric in METRICS}
        drop = "bbox" if task == "segm" else "segmentation"  # a mask's area from the mask, not its box
        ground_truth = self._loaded_ground_truth()
        with printing_to_log():
            detections = ground_truth.loadRes([{key: value for key, value in result.items() if key != drop}
                                               for result in results])
            evaluation = COCOeval(ground_truth, detections, task)
            evaluation.evaluate()
            evaluation.accumulate()
        logger.info("%s, %s:", self._json_file, task)
        with printing_to_log(logging.INFO):
            evaluation.summarize()
        summary = {metric: float(value * 100) if value >= 0 else float("nan")
                   for metric, value in zip(METRICS, evaluation.stats)}
        return {**summary, **self._per_category_ap(evaluation)}

    def _per_category_ap(self, evaluation: COCOeval) -> dict[str, float]:
        """Each category's AP over IoU 0.50:0.95, all areas, 100 detections (Detectron2's
        ``AP-<name>``); NaN for a category without ground truth."""
        precision = evaluation.eval["precision"]  # (IoU, recall, category, area, max detections)
        names = [category["name"] for category in self._loaded_ground_truth().loadCats(evaluation.params.catIds)]
        per_category = {}
        for index, name in enumerate(names):
            values = precision[:, :, index, 0, -1]
            values = values[values > -1]
            per_category[f"AP-{name}"] = float(values.mean() * 100) if values.size else float("nan")
        return per_category

    def _loaded_ground_truth(self) -> COCO:
        if self._ground_truth is None:
            if not self._json_file.is_file():
                raise FileNotFoundError(f"COCO annotation file {self._json_file} does not exist")
            with printing_to_log():
                self._ground_truth = COCO(str(self._json_file))
            self._check_ground_truth()
        return self._ground_truth

    def _check_ground_truth(self) -> None:
        """What COCOeval reads from every annotation and would otherwise miss with a bare KeyError."""
        needed = ("area", "segmentation") if "segm" in self._tasks else ("area",)
        for annotation in self._ground_truth.dataset["annotations"]:
            missing = [key for key in needed if key not in annotation]
            if missing:
                raise ValueError(f"{self._json_file}: annotation {annotation.get('id')!r} has no "
                                 f"{' and '.join(missing)}, which COCO evaluation ({', '.join(self._tasks)}) needs")


def encoded_masks(masks, count: int, image_id: int) -> list[dict]:
    """COCO RLEs (``counts`` as text, so they travel as JSON) of masks thresholded at 0.5."""
    if isinstance(masks, torch.Tensor):
        binary = (masks.detach() >= MASK_THRESHOLD).cpu().numpy()
    else:
        binary = np.asarray(masks) >= MASK_THRESHOLD
    if binary.ndim == 4 and binary.shape[1] == 1:
        binary = binary[:, 0]
    if binary.ndim != 3 or len(binary) != count:
        raise ValueError(f"image {image_id}: expected {count} masks (N, 1, H, W) or (N, H, W), got {binary.shape}")
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8))) if count else []
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


@contextlib.contextmanager
def printing_to_log(level: int = logging.DEBUG):
    """What pycocotools prints inside the block (progress, the summary table) goes to this
    module's log at ``level`` instead of stdout."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        yield
    if printed.getvalue().strip():
        logger.log(level, "%s", printed.getvalue().rstrip())
