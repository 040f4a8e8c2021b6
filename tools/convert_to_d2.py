#!/usr/bin/env python
"""Export a pretrained torchvision ResNet for Detectron2, or with ``--format torchvision`` as a
plain torchvision state dict (what the torchvision detection engine reads), after checking every
backbone tensor's name and shape. It reads a checkpoint of tools/pretrain_net.py and the forms
the authors and libraries release ResNets in (the official SaliencyMix / CutMix / PuzzleMix
model_best.pth.tar, Co-Mixup's, torchvision's and timm's state dicts and model.safetensors,
mmpretrain / OpenMixup checkpoints), and says which form it found. It keeps the name
Detectron2 users look for (a converter "to d2") although it writes both formats.

    python tools/convert_to_d2.py output/pretrain/model_final.pth r50_saliencymix.pkl
    python tools/convert_to_d2.py ResNet50_SaliencyMix_21.26/model_best.pth.tar r50_saliencymix.pkl
    python tools/convert_to_d2.py checkpoint.pth resnet50.pth --format torchvision

Detectron2 needs, for torchvision weights: INPUT.FORMAT RGB, MODEL.PIXEL_MEAN
[123.675, 116.280, 103.530], MODEL.PIXEL_STD [58.395, 57.120, 57.375] and
MODEL.RESNETS.STRIDE_IN_1X1 False.
"""
from __future__ import annotations

import argparse


from pretrain.cli import UsageError, reports_usage_errors
from pretrain.export import FORMATS, convert
from helpers.weights import WeightsError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a ResNet-50/101/152 in any form listed above "
                                      "(DataParallel/DDP/compile prefixes ok)")
    parser.add_argument("output", help="file to write (*.pkl for the Detectron2 format)")
    parser.add_argument("--format", choices=FORMATS, default="detectron2",
                        help="detectron2: pickle of the backbone for MODEL.WEIGHTS (default); "
                             "torchvision: state dict with the classifier, for "
                             "torchvision.models.resnetXX().load_state_dict(strict=True)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling (runs code from the file) when the input "
                             "holds objects other than tensors, numbers and strings")
    return parser.parse_args(argv)


@reports_usage_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        print(convert(args.input, args.output, args.format, args.trust_pickle))
    except WeightsError as exc:  # a missing, unreadable or incomplete input, named in the message
        raise UsageError(str(exc)) from None


if __name__ == "__main__":
    main()
