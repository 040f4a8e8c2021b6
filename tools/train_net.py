#!/usr/bin/env python
"""Fine-tune Faster R-CNN on Pascal VOC (VOC mAP), or Faster / Mask R-CNN on COCO (COCO box and
mask AP), from an exported ImageNet backbone.

    python tools/train_net.py --config-file configs/detection/faster_rcnn_R50_C4_voc.yaml --num-gpus 8 \\
        MODEL.WEIGHTS r50_saliencymix.pkl TRANSFER.METHOD saliencymix
    python tools/train_net.py ... --trials 5          # seeds SEED, SEED+1, ... into OUTPUT_DIR/trial_<k>
    python tools/train_net.py ... --eval-only MODEL.WEIGHTS OUTPUT_DIR/model_final.pth
    python tools/train_net.py ... --engine torchvision MODEL.WEIGHTS r50_saliencymix.pth
    python tools/train_net.py --config-file configs/detection/coco/mask_rcnn_R50_FPN_1x.yaml ...
    torchrun --nproc-per-node 8 tools/train_net.py ...      # or srun with one task per GPU

Detectron2 is used when it is installed; otherwise (or with ``--engine torchvision``) torchvision's
Faster R-CNN R50-FPN is fine-tuned from the exporter's ``--format torchvision`` weights with the
same schedule keys and evaluator (the engines, ``detection/detectron2_engine.py`` and
``detection/torchvision_engine/``, each offer ``train`` and ``evaluate``). Each run folder ends
with ``run_info.json`` and ``eval_results.json`` for ``tools/compare.py``. The config, the data,
the weights and the process layout are checked before any process starts: a mistake is one
``error:`` line.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

from detection import records
from detection.config import ENGINES, get_detection_cfg
from detection.run_checks import check_run
from helpers.distributed import configure_logging, default_argument_parser, launch, planned_world_size
from pretrain import checkpoint as ckpt
from pretrain.cli import UsageError, check_launch, merge_config, reports_usage_errors
from pretrain.data import world

logger = logging.getLogger("train_net")
DETECTRON2_INSTALLED = importlib.util.find_spec("detectron2") is not None
ENGINE_MODULES = {"detectron2": "detection.detectron2_engine", "torchvision": "detection.torchvision_engine"}


def argument_parser():
    parser = default_argument_parser(__doc__)
    parser.add_argument("--engine", choices=ENGINES, help="default: detectron2 when installed, else torchvision")
    parser.add_argument("--trials", type=int, default=1, help="runs with seeds SEED, SEED+1, ... in trial_<k> folders")
    return parser


def choose_engine(requested: str | None) -> str:
    if requested == "detectron2" and not DETECTRON2_INSTALLED:
        raise UsageError("--engine detectron2, but Detectron2 is not installed (see README: Detectron2)")
    if requested:
        return requested
    if DETECTRON2_INSTALLED:
        return "detectron2"
    print("notice: Detectron2 is not importable; using the torchvision engine (Faster R-CNN R50-FPN).")
    return "torchvision"


def setup(args, engine: str, trial: int):
    cfg = merge_config(get_detection_cfg(engine), args.config_file, args.opts)
    if args.trials > 1:
        cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / f"trial_{trial}")
        cfg.SEED = max(cfg.SEED, 0) + trial
    cfg.freeze()
    return cfg


@reports_usage_errors
def setup_trials(args) -> list:
    """Every trial's frozen config, checked with its data, weights and process layout."""
    args.engine = choose_engine(args.engine)
    check_launch(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {args.trials}")
    configs = [setup(args, args.engine, trial) for trial in range(args.trials)]
    check_run(configs[0], planned_world_size(args.num_gpus, args.num_machines), args.engine)
    return configs


def primary_results(results: dict) -> dict:
    """The first test dataset's results at the top level (as Detectron2 unwraps a single one),
    every dataset's under ``datasets`` when there are several."""
    if "bbox" in results:
        return results
    first = next(iter(results.values()))
    return {**first, "datasets": results}


def run(cfg, args) -> dict:
    """One trial with ``args.engine``: train then evaluate, or (``--eval-only``) evaluate."""
    engine = importlib.import_module(ENGINE_MODULES[args.engine])
    set_up_run_folder(cfg, args)
    if args.eval_only:
        return engine.evaluate(cfg, weights_to_evaluate(cfg, args.resume))
    return engine.train(cfg, resume=args.resume)


def set_up_run_folder(cfg, args) -> None:
    """Detectron2's ``default_setup`` (logging, ``config.yaml``, per-process seeds) for its
    engine; ``config.yaml`` for the torchvision engine, which seeds itself."""
    if args.engine == "detectron2":
        from detectron2.engine import default_setup

        default_setup(cfg, args)
    elif world()[0] == 0:
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())


def weights_to_evaluate(cfg, resume: bool) -> str | None:
    """``MODEL.WEIGHTS``, or with ``--resume`` the run folder's last checkpoint when it has one
    (Detectron2's ``resume_or_load``); None lets the engine pick its default."""
    last = ckpt.Checkpointer(Path(cfg.OUTPUT_DIR), keep_last=1).last() if resume else None
    return str(last) if last else (cfg.MODEL.WEIGHTS or None)


def detectron2_machine_group(local_world_size: int) -> None:
    """Detectron2's per-machine process group, which its own launcher would have made."""
    from detectron2.utils import comm

    comm.create_local_process_group(local_world_size)


def main(configs: list, args) -> list[dict]:
    """Every trial of one engine (``args.engine``)."""
    configure_logging()
    outcomes = []
    for cfg in configs:
        results = run(cfg, args)
        if world()[0] == 0:
            results = primary_results(results)
            records.write_run_info(cfg.OUTPUT_DIR, cfg, args.engine)
            records.write_eval_results(cfg.OUTPUT_DIR, results, iteration=cfg.SOLVER.MAX_ITER)
            bbox = results["bbox"]
            masks = f"  mask AP {results['segm']['AP']:.2f}" if "segm" in results else ""
            print(f"{cfg.OUTPUT_DIR}: AP {bbox['AP']:.2f}  AP50 {bbox['AP50']:.2f}  AP75 {bbox['AP75']:.2f}{masks}")
        outcomes.append(results)
    return outcomes


if __name__ == "__main__":
    arguments = argument_parser().parse_args()
    trials = setup_trials(arguments)
    launch(main, (trials, arguments), num_processes=arguments.num_gpus, num_machines=arguments.num_machines,
           machine_rank=arguments.machine_rank, dist_url=arguments.dist_url,
           after_init=detectron2_machine_group if arguments.engine == "detectron2" else None,
           saves_on_signal=not arguments.eval_only)
