#!/usr/bin/env python
"""Top-1 accuracy of a pretrained classifier on the validation set, clean and under an FGSM attack.

    python tools/eval_robustness.py --config-file output/pretrain/r50_saliencymix/config.yaml
    python tools/eval_robustness.py --config-file RUN/config.yaml --epsilon 4 MODEL.WEIGHTS RUN/model_best.pth
    python tools/eval_robustness.py --config-file RUN/config.yaml --num-gpus 8

The weights are MODEL.WEIGHTS (any form of ResNet weights that tools/convert_to_d2.py reads,
released files included), or else the run folder's newest checkpoint. ``--epsilon`` is in
pixel units of the 0-255 image (default 8, i.e. 8/255); the perturbation is applied to the image
before normalisation and clipped to the valid range. The result is written to ``--output``, by
default beside the weights as ``<weights>_fgsm_eps<epsilon>.json``, and printed, with the
paper's figure for the method.
"""
from __future__ import annotations

from pathlib import Path

from helpers.distributed import configure_logging, default_argument_parser, launch, local_device, planned_world_size
from pretrain.atomic_file import atomic_write_json
from pretrain.checkpoint import weights_to_evaluate
from pretrain.cli import check_launch, merge_config, reports_usage_errors
from pretrain.config import get_cfg
from pretrain.data import build_val_loader, world
from pretrain.device_pipeline import batch_preparer
from pretrain.evaluation import check_weights, load_classifier
from pretrain.robustness import PAPER_FGSM_ACCURACY, Normalized, evaluate_fgsm
from pretrain.validate import check_pretrain_cfg

DEFAULT_EPSILON = 8.0


def result_path(weights: Path, epsilon: float) -> Path:
    return weights.with_name(f"{weights.stem}_fgsm_eps{epsilon:g}.json")


@reports_usage_errors
def setup(args):
    """The frozen config and the weights to attack, checked before any process starts."""
    check_launch(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)
    cfg = merge_config(get_cfg(), args.config_file, args.opts)
    check_pretrain_cfg(cfg, train=False, world_size=planned_world_size(args.num_gpus, args.num_machines))
    check_weights(cfg, weights_to_evaluate(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR))
    cfg.freeze()
    return cfg


def main(cfg, args) -> dict:
    configure_logging()
    weights = weights_to_evaluate(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR)
    device = local_device()
    model = Normalized(load_classifier(cfg, weights)[0], cfg.DATA.MEAN, cfg.DATA.STD).to(device)
    loader = build_val_loader(cfg, pin_memory=device.type == "cuda", normalize=False)
    prepare = batch_preparer(cfg, train=False, device=device, normalize=False)
    result = {"weights": str(weights), "method": cfg.MIX.NAME, "arch": cfg.MODEL.ARCH,
              "dataset": cfg.DATA.DATASET, **evaluate_fgsm(model, loader, prepare, args.epsilon, device)}
    if world()[0] == 0:
        output = args.output or result_path(weights, args.epsilon)
        atomic_write_json(output, result)
        print(f"{cfg.MIX.NAME} {cfg.MODEL.ARCH} on {result['images']} images: top-1 accuracy "
              f"{result['clean_top1_accuracy']:.2f}% clean, {result['fgsm_top1_accuracy']:.2f}% under FGSM "
              f"(epsilon {args.epsilon:g}/255)")
        if cfg.DATA.DATASET == "imagefolder" and cfg.MIX.NAME in PAPER_FGSM_ACCURACY:
            print(f"the paper (ImageNet, ResNet-50): {PAPER_FGSM_ACCURACY[cfg.MIX.NAME]}% under FGSM")
        print(f"wrote {output}")
    return result


if __name__ == "__main__":
    parser = default_argument_parser(__doc__, training=False)
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                        help="the attack's step in pixel units of the 0-255 image (default 8)")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="where to write the result (default: <weights>_fgsm_eps<epsilon>.json beside the weights)")
    arguments = parser.parse_args()
    launch(main, (setup(arguments), arguments), num_processes=arguments.num_gpus, num_machines=arguments.num_machines,
           machine_rank=arguments.machine_rank, dist_url=arguments.dist_url)
