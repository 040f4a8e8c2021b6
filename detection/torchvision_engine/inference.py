"""VOC mAP or COCO box (and mask) AP of torchvision's detector on every ``DATASETS.TEST`` dataset."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN

from detection.coco_evaluation import COCOEvaluator
from detection.datasets import COCODataset, VOCDataset, check_class_count, resolve
from detection.evaluation import VOCDetectionEvaluator
from detection.torchvision_engine.data import inference_loader
from detection.torchvision_engine.model import build_detector, inference_sizes, load_detector_weights, select_device
from pretrain import checkpoint as ckpt

logger = logging.getLogger(__name__)


def evaluate(cfg, weights: str | None = None) -> dict:
    """The VOC mAP or COCO AP of a checkpoint of this engine (default
    ``OUTPUT_DIR/model_final.pth``) on every ``DATASETS.TEST`` dataset: like Detectron2's
    ``DefaultTrainer.test``, ``{dataset: results}`` in ``DATASETS.TEST`` order, or the single
    dataset's results unwrapped."""
    device = select_device(cfg.MODEL.DEVICE)
    model = build_detector(cfg)
    load_detector_weights(model, Path(weights) if weights else Path(cfg.OUTPUT_DIR) / ckpt.FINAL_NAME)
    return evaluate_model(model.to(device), cfg, device)


def evaluate_model(model: FasterRCNN, cfg, device: torch.device) -> dict:
    """``model`` on each ``DATASETS.TEST`` dataset at the test sizes; see ``evaluate``."""
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the datasets to evaluate on")
    results = OrderedDict((name, evaluate_dataset(model, check_class_count(resolve(name, cfg), cfg), cfg, device))
                          for name in cfg.DATASETS.TEST)
    return next(iter(results.values())) if len(results) == 1 else results


@torch.no_grad()
def evaluate_dataset(model: FasterRCNN, dataset: VOCDataset | COCODataset, cfg, device: torch.device) -> dict:
    """Each process runs its share of the images; the evaluator gathers the detections and
    scores them on rank 0 (other processes get ``{}``)."""
    loader = inference_loader(dataset, cfg)
    evaluator = dataset_evaluator(dataset, cfg)
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    with inference_sizes(model, cfg):
        for images, inputs in loader:
            outputs = model([image.to(device) for image in images])
            evaluator.process(inputs, [{**output, "labels": output["labels"] - 1} for output in outputs])
    model.train(was_training)
    logger.info("%s: inference on %d images in %.1f s", dataset.name, len(loader), time.perf_counter() - began)
    results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        if task in results:
            ap = results[task]
            logger.info("%s %s: AP %.2f  AP50 %.2f  AP75 %.2f", dataset.name, task, ap["AP"], ap["AP50"], ap["AP75"])
    return results


def dataset_evaluator(dataset: VOCDataset | COCODataset, cfg):
    """The VOC evaluator for a VOC tree; for a COCO-format set pycocotools' box AP, and mask AP
    with ``MODEL.MASK_ON``, its detections written to ``OUTPUT_DIR/inference`` as Detectron2's are."""
    if isinstance(dataset, VOCDataset):
        return VOCDetectionEvaluator(dataset.root, dataset.split, dataset.year, dataset.class_names)
    return COCOEvaluator(dataset.json_file, ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
                         output_dir=Path(cfg.OUTPUT_DIR) / "inference")


def flatten_results(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"bbox": {"AP": ..}}`` -> ``{"bbox/AP": ..}``, as Detectron2 writes them to metrics.json."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten_results(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
