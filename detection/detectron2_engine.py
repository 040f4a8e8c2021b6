"""Fine-tuning and evaluation with Detectron2: its ``DefaultTrainer`` with the VOC evaluator (VOC
sets) or its ``COCOEvaluator`` (COCO sets: boxes, and masks with ``MODEL.MASK_ON``), the
extra-norm C4 box head the transfer configs name, a save-and-stop on SLURM's stop signals, and
metrics that a resumed run does not count twice."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from detection.datasets import COCODataset, resolve
from detection.evaluation import VOCDetectionEvaluator
from detection.register import register_config_datasets
from detection.roi_heads import Res5ROIHeadsExtraNorm
from helpers import preemption
from helpers.distributed import report_cpus
from helpers.metrics_file import drop_records_after

ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
METRICS_FILE = "metrics.json"  # Detectron2's JSONWriter's


class TransferTrainer(DefaultTrainer):
    """``DefaultTrainer`` scoring VOC sets with ``VOCDetectionEvaluator`` and COCO sets with
    ``COCOEvaluator`` (pycocotools' AP in percent, Detectron2's result shape); ``train()`` returns the
    evaluation its ``EvalHook`` runs after the last iteration (``DefaultTrainer.train`` returns
    it only when ``TEST.EXPECTED_RESULTS`` is set). ``resumes_at``: the iteration a resumed run
    starts from, which TensorBoard forgets later steps from."""

    def __init__(self, cfg, resumes_at: int = 0):
        self.resumes_at = resumes_at  # before DefaultTrainer builds the writers
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        dataset = resolve(dataset_name, cfg)
        if isinstance(dataset, COCODataset):
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            return COCOEvaluator(dataset_name, tasks=tasks,
                                 output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        return VOCDetectionEvaluator(dataset.root, dataset.split, dataset.year, dataset.class_names)

    def build_hooks(self) -> list:
        """Detectron2's hooks, its ``EvalHook`` (periodic and final evaluation) keeping the
        results, then the stop on a signal (after the writers have logged the iteration)."""
        return [*(hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.test_and_keep_results)
                  if isinstance(hook, hooks.EvalHook) else hook for hook in super().build_hooks()), StopOnSignal()]

    def build_writers(self) -> list:
        """Detectron2's ``default_writers``, TensorBoard's purging the steps a resumed run trains again."""
        output = self.cfg.OUTPUT_DIR
        return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(output, METRICS_FILE)),
                TensorboardXWriter(output, purge_step=self.resumes_at or None)]

    def test_and_keep_results(self) -> dict:
        self.results = self.test(self.cfg, self.model)
        return self.results

    def train(self) -> dict:
        super().train()
        return self.results


class StopOnSignal(hooks.HookBase):
    """SLURM's stop signals (helpers/preemption.py): at the iteration every process agrees on,
    Detectron2's checkpoint is saved there and the run ends, to be resumed with ``--resume``."""

    def before_train(self):
        self.agreement = preemption.StopAgreement()

    def after_step(self):
        trainer = self.trainer
        signal_name, _ = self.agreement.poll()
        if not signal_name or trainer.iter + 1 >= trainer.max_iter:  # the last iteration ends the run anyway
            return
        name = f"model_{trainer.iter:07d}"  # PeriodicCheckpointer's name and content: resumes at iter + 1
        trainer.checkpointer.save(name, iteration=trainer.iter)
        self.agreement.end_run(Path(trainer.cfg.OUTPUT_DIR) / f"{name}.pth", signal_name, trainer.iter + 1)

    def after_train(self):
        self.agreement.close()


def resume_iteration(cfg) -> int:
    """The iteration a resumed run starts from: one past its last checkpoint's (0 without one)."""
    checkpointer = DetectionCheckpointer(None, save_dir=cfg.OUTPUT_DIR)
    if not checkpointer.has_checkpoint():
        return 0
    state = torch.load(checkpointer.get_checkpoint_file(), map_location="cpu", mmap=True, weights_only=True)
    return state.get("iteration", -1) + 1


def train(cfg, resume: bool = False) -> dict:
    """Fine-tune into ``OUTPUT_DIR`` (with ``resume``, from its last checkpoint, forgetting the
    metrics an earlier attempt logged after it); the final evaluation, as ``evaluate`` returns it."""
    register_config_datasets(cfg)
    report_cpus(cfg.DATALOADER.NUM_WORKERS)
    resumes_at = resume_iteration(cfg) if resume else 0
    if resumes_at and comm.is_main_process():
        drop_records_after(Path(cfg.OUTPUT_DIR) / METRICS_FILE, resumes_at - 1)
    trainer = TransferTrainer(cfg, resumes_at)
    trainer.resume_or_load(resume=resume)
    return trainer.train()


def evaluate(cfg, weights: str | None = None) -> dict:
    """The AP of ``weights`` on every ``DATASETS.TEST`` dataset: ``{dataset: results}``, or
    the single dataset's results unwrapped (``DefaultTrainer.test``)."""
    register_config_datasets(cfg)
    model = TransferTrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(weights)
    return TransferTrainer.test(cfg, model)
