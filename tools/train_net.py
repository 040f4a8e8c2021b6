#!/usr/bin/env python
"""Fine-tune Faster R-CNN on Pascal VOC from an exported ImageNet backbone and evaluate VOC mAP.

    python tools/train_net.py --config-file configs/detection/faster_rcnn_R50_C4_voc.yaml --num-gpus 8 \\
        MODEL.WEIGHTS r50_saliencymix.pkl TRANSFER.METHOD saliencymix
    python tools/train_net.py ... --trials 5          # seeds SEED, SEED+1, ... into OUTPUT_DIR/trial_<k>
    python tools/train_net.py ... --eval-only MODEL.WEIGHTS OUTPUT_DIR/model_final.pth
    python tools/train_net.py ... --engine torchvision MODEL.WEIGHTS r50_saliencymix.pth

Detectron2 is used when it is installed; otherwise (or with ``--engine torchvision``) torchvision's
Faster R-CNN R50-FPN is fine-tuned from the exporter's ``--format torchvision`` weights with the
same schedule keys and evaluator. Each run folder ends with ``run_info.json`` and
``eval_results.json`` for ``tools/compare.py``.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection import records  # noqa: E402
from detection.config import ENGINES, get_detection_cfg  # noqa: E402
from detection.datasets import resolve  # noqa: E402
from pretrain.data import world  # noqa: E402

logger = logging.getLogger("train_net")
DETECTRON2_INSTALLED = importlib.util.find_spec("detectron2") is not None


def argument_parser():
    if DETECTRON2_INSTALLED:
        from detectron2.engine import default_argument_parser

        parser = default_argument_parser(epilog=__doc__)
    else:
        from pretrain.distributed import default_argument_parser

        parser = default_argument_parser(__doc__)
    parser.add_argument("--engine", choices=ENGINES, help="default: detectron2 when installed, else torchvision")
    parser.add_argument("--trials", type=int, default=1, help="runs with seeds SEED, SEED+1, ... in trial_<k> folders")
    return parser


def choose_engine(requested: str | None) -> str:
    if requested == "detectron2" and not DETECTRON2_INSTALLED:
        raise SystemExit("error: --engine detectron2, but Detectron2 is not installed (see README: Detectron2)")
    if requested:
        return requested
    if DETECTRON2_INSTALLED:
        return "detectron2"
    print("notice: Detectron2 is not importable; using the torchvision engine (Faster R-CNN R50-FPN).")
    return "torchvision"


def setup(args, engine: str, trial: int):
    cfg = get_detection_cfg(engine)
    config_file = Path(args.config_file)
    if not config_file.is_file():
        raise SystemExit(f"error: config file {config_file} does not exist")
    cfg.merge_from_file(str(config_file))
    if len(args.opts) % 2:
        raise SystemExit(f"error: config overrides come in KEY VALUE pairs, got {args.opts}")
    cfg.merge_from_list(args.opts)
    if args.trials > 1:
        cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / f"trial_{trial}")
        cfg.SEED = max(cfg.SEED, 0) + trial
    check_class_count(cfg)
    cfg.freeze()
    return cfg


def check_class_count(cfg) -> None:
    """The box predictor's size must match the datasets' classes; say so before any training."""
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        classes = resolve(name, cfg).class_names
        if len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise SystemExit(f"error: MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but "
                             f"dataset {name} has {len(classes)} classes")


def primary_results(results: dict) -> dict:
    """The first test dataset's results at the top level (as Detectron2 unwraps a single one),
    every dataset's under ``datasets`` when there are several."""
    if "bbox" in results:
        return results
    first = next(iter(results.values()))
    return {**first, "datasets": results}


def run_detectron2(cfg, args) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultTrainer, default_setup

    import detection.roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
    from detection.evaluation import VOCDetectionEvaluator
    from detection.register import register_config_datasets

    class VOCTransferTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            dataset = resolve(dataset_name, cfg)
            return VOCDetectionEvaluator(dataset.root, dataset.split, dataset.year, dataset.class_names)

    default_setup(cfg, args)
    register_config_datasets(cfg)
    if args.eval_only:
        model = VOCTransferTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return VOCTransferTrainer.test(cfg, model)
    trainer = VOCTransferTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer keeps its final evaluation (its EvalHook runs one at the end) here; it
    # returns it from train() only when TEST.EXPECTED_RESULTS is set.
    return trainer._last_eval_results


def run_torchvision(cfg, args) -> dict:
    from detection import torchvision_engine

    if world()[0] == 0:
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())
    if args.eval_only:
        return torchvision_engine.evaluate(cfg, cfg.MODEL.WEIGHTS or None)
    torchvision_engine.train(cfg, resume=args.resume)
    return torchvision_engine.evaluate(cfg)


def main(args) -> list[dict]:
    """Every trial of one engine (``args.engine``, already chosen by ``choose_engine``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = args.engine
    if args.trials < 1:
        raise SystemExit(f"error: --trials must be at least 1, got {args.trials}")
    outcomes = []
    for trial in range(args.trials):
        cfg = setup(args, engine, trial)
        results = (run_detectron2 if engine == "detectron2" else run_torchvision)(cfg, args)
        if world()[0] == 0:
            results = primary_results(results)
            records.write_run_info(cfg.OUTPUT_DIR, cfg, engine)
            records.write_eval_results(cfg.OUTPUT_DIR, results, iteration=cfg.SOLVER.MAX_ITER)
            bbox = results["bbox"]
            print(f"{cfg.OUTPUT_DIR}: AP {bbox['AP']:.2f}  AP50 {bbox['AP50']:.2f}  AP75 {bbox['AP75']:.2f}")
        outcomes.append(results)
    return outcomes


if __name__ == "__main__":
    arguments = argument_parser().parse_args()
    arguments.engine = choose_engine(arguments.engine)
    if arguments.engine == "detectron2":
        from detectron2.engine import launch as detectron2_launch

        detectron2_launch(main, arguments.num_gpus, num_machines=arguments.num_machines,
                          machine_rank=arguments.machine_rank, dist_url=arguments.dist_url, args=(arguments,))
    else:
        from pretrain.distributed import launch

        launch(main, (arguments,), num_processes=arguments.num_gpus, num_machines=arguments.num_machines,
               machine_rank=arguments.machine_rank, dist_url=arguments.dist_url)
