"""What a finished detection run leaves in its output folder for ``tools/compare.py``:
``run_info.json`` (how it was trained) and ``eval_results.json`` (what it scored)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from detection.datasets import resolve
from pretrain.atomic_file import atomic_write_json

RUN_INFO = "run_info.json"
EVAL_RESULTS = "eval_results.json"
# Settings that must agree between runs for their scores to be comparable.
PROTOCOL_KEYS = ("engine", "train_datasets", "test_datasets", "max_iter", "steps", "ims_per_batch", "base_lr")


def write_run_info(output_dir: str | Path, cfg, engine: str) -> dict:
    """How the run was trained, and ``dataset_kind`` ("voc" or "coco"): how the test dataset whose
    results ``eval_results.json`` holds at its top level (the first) was scored."""
    info = {"method": cfg.TRANSFER.METHOD or "unknown", "weights": cfg.MODEL.WEIGHTS, "engine": engine,
            "architecture": built_architecture(cfg, engine),
            "train_datasets": list(cfg.DATASETS.TRAIN), "test_datasets": list(cfg.DATASETS.TEST),
            "dataset_kind": resolve(cfg.DATASETS.TEST[0], cfg).kind,
            "max_iter": cfg.SOLVER.MAX_ITER, "steps": list(cfg.SOLVER.STEPS),
            "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "base_lr": cfg.SOLVER.BASE_LR, "seed": cfg.SEED}
    atomic_write_json(Path(output_dir) / RUN_INFO, info)
    return info


def built_architecture(cfg, engine: str) -> str:
    """The model the engine built: torchvision's R-CNN FPN, or Detectron2's parts by registry name."""
    model = cfg.MODEL
    if engine == "torchvision":
        return f"{'Mask' if model.MASK_ON else 'Faster'} R-CNN R{model.RESNETS.DEPTH}-FPN (torchvision)"
    return (f"{model.META_ARCHITECTURE} R{model.RESNETS.DEPTH}: {model.BACKBONE.NAME}, {model.ROI_HEADS.NAME}"
            f"{', mask head' if model.MASK_ON else ''} (Detectron2)")


def write_eval_results(output_dir: str | Path, results: dict, iteration: int) -> None:
    """``results`` as the evaluator returns them: ``{"bbox": {"AP", "AP50", "AP75", ...}, ...}``
    (COCO: also APs, APm, APl, and ``"segm"`` for masks). A metric that cannot be computed (COCO's
    NaN, e.g. APl without large objects) is written as null: JSON has no NaN."""
    atomic_write_json(Path(output_dir) / EVAL_RESULTS, _nan_to_null({"iteration": iteration, **results}))


def _nan_to_null(value):
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_run(output_dir: str | Path) -> dict:
    """``{"dir", "info", "results"}`` of a finished run; errors name the missing or bad file."""
    folder = Path(output_dir)
    run = {"dir": str(folder)}
    for key, name in (("info", RUN_INFO), ("results", EVAL_RESULTS)):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {folder} a finished detection run?")
        try:
            run[key] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    run["info"].setdefault("dataset_kind", "voc")  # runs from before COCO transfer are VOC runs
    if "bbox" not in run["results"] or "AP50" not in run["results"]["bbox"]:
        raise ValueError(f"{folder / EVAL_RESULTS} has no bbox AP50")
    return run
