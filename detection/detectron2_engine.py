"""Fine-tuning and evaluation with Detectron2: its ``DefaultTrainer`` with the VOC evaluator (VOC
sets) or its ``COCOEvaluator`` (COCO sets: boxes, and masks with ``MODEL.MASK_ON``), and the
extra-norm C4 box head the transfer configs name."""
from __future__ import annotations

import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

from detection.datasets import COCODataset, resolve
from detection.evaluation import VOCDetectionEvaluator
from detection.register import register_config_datasets
from detection.roi_heads import Res5ROIHeadsExtraNorm

ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


class TransferTrainer(DefaultTrainer):
    """``DefaultTrainer`` scoring VOC sets with ``VOCDetectionEvaluator`` and COCO sets with
    ``COCOEvaluator`` (pycocotools' AP in percent, Detectron2's result shape); ``train()`` returns the
    evaluation its ``EvalHook`` runs after the last iteration (``DefaultTrainer.train`` returns
    it only when ``TEST.EXPECTED_RESULTS`` is set)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        dataset = resolve(dataset_name, cfg)
        if isinstance(dataset, COCODataset):
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            return COCOEvaluator(dataset_name, tasks=tasks,
                                 output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        return VOCDetectionEvaluator(dataset.root, dataset.split, dataset.year, dataset.class_names)

    def build_hooks(self) -> list:
        """Detectron2's hooks, its ``EvalHook`` (periodic and final evaluation) keeping the results."""
        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.test_and_keep_results)
                if isinstance(hook, hooks.EvalHook) else hook for hook in super().build_hooks()]

    def test_and_keep_results(self) -> dict:
        self.results = self.test(self.cfg, self.model)
        return self.results

    def train(self) -> dict:
        super().train()
        return self.results


def train(cfg, resume: bool = False) -> dict:
    """Fine-tune into ``OUTPUT_DIR`` (with ``resume``, from its last checkpoint); the final
    evaluation, as ``evaluate`` returns it."""
    register_config_datasets(cfg)
    trainer = TransferTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer.train()


def evaluate(cfg, weights: str | None = None) -> dict:
    """The AP of ``weights`` on every ``DATASETS.TEST`` dataset: ``{dataset: results}``, or
    the single dataset's results unwrapped (``DefaultTrainer.test``)."""
    register_config_datasets(cfg)
    model = TransferTrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(weights)
    return TransferTrainer.test(cfg, model)
