#!/usr/bin/env python
"""ImageNet (or CIFAR) pretraining with a batch mixer (none, cutout, mixup, cutmix, saliencymix).

    python tools/pretrain.py --config-file configs/pretrain/r50_saliencymix.yaml --num-gpus 8
    python tools/pretrain.py --config-file ... --resume                      # continue the run
    python tools/pretrain.py --config-file ... --eval-only MODEL.WEIGHTS run/model_best.pth
    torchrun --nnodes 2 --nproc-per-node 8 ... tools/pretrain.py --config-file ...   # multi-node
    python tools/pretrain.py --config-file configs/pretrain/cifar/cifar10_resnet18_saliencymix.yaml DATA.ROOT ~/cifar

Trailing ``KEY VALUE`` pairs override the config (``SOLVER.BATCH_SIZE 512 DATA.ROOT /data``).
On a machine without GPUs, ``--num-gpus N`` runs N CPU processes (gloo).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import weights_to_evaluate  # noqa: E402
from pretrain.config import setup_cfg  # noqa: E402
from pretrain.distributed import default_argument_parser, launch  # noqa: E402
from pretrain.engine import PretrainTrainer  # noqa: E402


def main(args) -> dict:
    cfg = setup_cfg(args.config_file, args.opts)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = PretrainTrainer(cfg, resume=args.resume and not args.eval_only)
    if trainer.rank == 0:
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())
    if args.eval_only:
        weights = weights_to_evaluate(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR)
        trainer.load_weights(weights)
        result = trainer.evaluate()
        if trainer.rank == 0:
            print(json.dumps({"weights": str(weights), **result}))
        return result
    result = trainer.train()
    if trainer.rank == 0:
        print(json.dumps({"iteration": trainer.iteration, **result}))
    return result


if __name__ == "__main__":
    arguments = default_argument_parser(__doc__).parse_args()
    launch(main, (arguments,), num_processes=arguments.num_gpus, num_machines=arguments.num_machines,
           machine_rank=arguments.machine_rank, dist_url=arguments.dist_url)
