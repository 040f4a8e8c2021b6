"""Faster R-CNN and Mask R-CNN R50-FPN fine-tuning on VOC or COCO-format sets with torchvision,
for machines without Detectron2 (design notes: ``detection/README.md``). Nothing here imports
Detectron2."""
from detection.torchvision_engine.inference import evaluate
from detection.torchvision_engine.training import TorchvisionTrainer, train

__all__ = ["TorchvisionTrainer", "evaluate", "train"]
