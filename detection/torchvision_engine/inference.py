"""VOC mAP of torchvision's detector on every ``DATASETS.TEST`` dataset."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN

from detection.datasets import VOCDataset, check_class_count, resolve
from detection.evaluation import VOCDetectionEvaluator
from detection.torchvision_engine.data import inference_loader
from detection.torchvision_engine.model import build_detector, inference_sizes, load_detector_weights, select_device
from pretrain import checkpoint as ckpt

logger = logging.getLogger(__name__)


def evaluate(cfg, weights: str | None = None) -> dict:
    """VOC mAP of a checkpoint of this engine (default ``OUTPUT_DIR/model_final.pth``) on every
    ``DATASETS.TEST`` dataset: like Detectron2's ``DefaultTrainer.test``, ``{dataset: results}``
    in ``DATASETS.TEST`` order, or the single dataset's results unwrapped."""
    device = select_device(cfg.MODEL.DEVICE)
    model = build_detector(cfg)
    load_detector_weights(model, Path(weights) if weights else Path(cfg.OUTPUT_DIR) / ckpt.FINAL_NAME)
    return evaluate_model(model.to(device), cfg, device)


def evaluate_model(model: FasterRCNN, cfg, device: torch.device) -> dict:
    """``model`` on each ``DATASETS.TEST`` dataset at the test sizes; see ``evaluate``."""
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the VOC splits to evaluate on")
    results = OrderedDict((name, evaluate_dataset(model, check_class_count(resolve(name, cfg), cfg), cfg, device))
                          for name in cfg.DATASETS.TEST)
    return next(iter(results.values())) if len(results) == 1 else results


@torch.no_grad()
def evaluate_dataset(model: FasterRCNN, dataset: VOCDataset, cfg, device: torch.device) -> dict:
    """Each process runs its share of the images; the evaluator gathers the detections and
    scores them on rank 0 (other processes get ``{}``)."""
    loader = inference_loader(dataset, cfg)
    evaluator = VOCDetectionEvaluator(dataset.root, dataset.split, dataset.year, dataset.class_names)
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    with inference_sizes(model, cfg):
        for images, inputs in loader:
            outputs = model([image.to(device) for image in images])
            evaluator.process(inputs, [{"boxes": output["boxes"], "scores": output["scores"],
                                        "labels": output["labels"] - 1} for output in outputs])
    model.train(was_training)
    logger.info("%s: inference on %d images in %.1f s", dataset.name, len(loader), time.perf_counter() - began)
    results = evaluator.evaluate()
    if results:
        bbox = results["bbox"]
        logger.info("%s: AP %.2f  AP50 %.2f  AP75 %.2f", dataset.name, bbox["AP"], bbox["AP50"], bbox["AP75"])
    return results


def flatten_results(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"bbox": {"AP": ..}}`` -> ``{"bbox/AP": ..}``, as Detectron2 writes them to metrics.json."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten_results(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
