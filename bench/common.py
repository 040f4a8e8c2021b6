"""What both benchmarks share: the mixers they measure (with the overhead each may add, as a
fraction of a ResNet-50 training step) and the batch they measure them on."""
import torch

from pretrain.config import IMAGENET_MEAN, IMAGENET_STD

MIXERS = {  # label -> (build_mixer arguments, allowed overhead or None)
    "none": (dict(name="none"), None),
    "cutout": (dict(name="cutout"), None),
    "mixup": (dict(name="mixup"), None),
    "cutmix": (dict(name="cutmix"), None),
    "saliencymix box=batch": (dict(name="saliencymix", box="batch", mean=IMAGENET_MEAN, std=IMAGENET_STD), 0.01),
    "saliencymix box=sample": (dict(name="saliencymix", box="sample", mean=IMAGENET_MEAN, std=IMAGENET_STD), 0.02),
}


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels as the training loader hands them to a mixer (ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std
