#!/usr/bin/env python
"""ImageNet (or CIFAR) pretraining with a batch mixer (none, cutout, mixup, cutmix, saliencymix).

    python tools/pretrain_net.py --config-file configs/pretrain/r50_saliencymix.yaml --num-gpus 8
    python tools/pretrain_net.py --config-file ... --resume                      # continue the run
    python tools/pretrain_net.py --config-file ... --eval-only MODEL.WEIGHTS run/model_best.pth
    python tools/pretrain_net.py --config-file configs/pretrain/r50_cutmix.yaml --eval-only \
        MODEL.WEIGHTS ResNet50_CutMix/model_best.pth.tar OUTPUT_DIR output/verify/cutmix   # a released file
    torchrun --nnodes 2 --nproc-per-node 8 ... tools/pretrain_net.py --config-file ...   # multi-node
    srun --ntasks-per-node 8 ... tools/pretrain_net.py --config-file ...                 # one process per SLURM task
    python tools/pretrain_net.py --config-file configs/pretrain/cifar/cifar10_resnet18_saliencymix.yaml DATA.ROOT ~/cifar

Trailing ``KEY VALUE`` pairs override the config (``SOLVER.BATCH_SIZE 512 DATA.ROOT /data``).
On a machine without GPUs, ``--num-gpus N`` runs N CPU processes (gloo). The config, the data
and the process layout are checked before any process starts: a mistake is one ``error:`` line.

``--eval-only`` needs the validation folder only: it reports the top-1 / top-5 error of
MODEL.WEIGHTS (default: the run's last checkpoint; any form of ResNet weights that
tools/convert_to_d2.py reads) with the config's evaluation transform, and writes it to
``OUTPUT_DIR/eval_results.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from helpers.distributed import configure_logging, default_argument_parser, launch, planned_world_size
from pretrain.atomic_file import atomic_write_json
from pretrain.checkpoint import weights_to_evaluate
from pretrain.cli import check_launch, merge_config, reports_usage_errors
from pretrain.config import get_cfg
from pretrain.data import world
from pretrain.engine import PretrainTrainer
from pretrain.evaluation import EVAL_RESULTS, check_weights, evaluate_weights
from pretrain.validate import check_pretrain_cfg


@reports_usage_errors
def setup(args):
    """The frozen config, checked with the data and the process layout it will run with."""
    check_launch(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)
    cfg = merge_config(get_cfg(), args.config_file, args.opts)
    check_pretrain_cfg(cfg, train=not args.eval_only, world_size=planned_world_size(args.num_gpus, args.num_machines))
    if args.eval_only:
        check_weights(cfg, weights_to_evaluate(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR))
    cfg.freeze()
    return cfg


def main(cfg, args) -> dict:
    configure_logging()
    if args.eval_only:
        return evaluate_only(cfg)
    trainer = PretrainTrainer(cfg, resume=args.resume)
    if trainer.rank == 0:
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())
    result = trainer.train()
    if trainer.rank == 0:
        print(json.dumps({"iteration": trainer.iteration, **result}))
    return result


def evaluate_only(cfg) -> dict:
    """The error of MODEL.WEIGHTS (or the run's last checkpoint), printed and written to
    ``OUTPUT_DIR/eval_results.json`` with the settings that gave it (a run folder's config.yaml,
    which records its training, is left as it is)."""
    result = evaluate_weights(cfg, weights_to_evaluate(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR))
    if world()[0] == 0:
        atomic_write_json(Path(cfg.OUTPUT_DIR) / EVAL_RESULTS, result)
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    arguments = default_argument_parser(__doc__).parse_args()
    config = setup(arguments)
    launch(main, (config, arguments), num_processes=arguments.num_gpus, num_machines=arguments.num_machines,
           machine_rank=arguments.machine_rank, dist_url=arguments.dist_url, saves_on_signal=not arguments.eval_only)
