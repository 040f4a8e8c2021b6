"""The figures the SaliencyMix paper (ICLR 2021) reports, per benchmark, keyed by arm name: what
the study report sets beside ours. An arm without a published figure shows it as missing."""
from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.cost import PAPER_HOURS
from pretrain.robustness import PAPER_FGSM_ACCURACY


@dataclass(frozen=True)
class PaperTable:
    title: str
    top1_error: dict[str, float]
    top5_error: dict[str, float] = field(default_factory=dict)
    voc_ap50: dict[str, float] = field(default_factory=dict)  # Faster R-CNN fine-tuned on VOC, mAP
    fgsm_accuracy: dict[str, float] = field(default_factory=dict)  # top-1 % on FGSM-attacked ImageNet val
    cost_hours: dict[str, float] = field(default_factory=dict)  # training time per method


# Study arms that run one of the paper's methods another way, shown beside its published figures:
# "saliencymix" runs SaliencyMix as the paper describes it, "saliencymix_official" as the official
# code does (configs/pretrain/r50_saliencymix_official.yaml).
PUBLISHED_AS = {"saliencymix_official": "saliencymix"}


# ImageNet top-1 error (%) that released backbones outside the paper state for themselves, keyed by
# the study arm that starts from them: torchvision's ResNet-50 weights (IMAGENET1K_V1: 76.130% top-1;
# IMAGENET1K_V2: 80.858%, evaluated at resize 232).
RELEASED_TOP1_ERROR = {"torchvision_v1": 23.87, "torchvision_v2": 19.142}


def published(figures: dict[str, float], arm: str) -> float | None:
    """The paper's figure for ``arm``, or for the method the arm runs another way."""
    return figures.get(PUBLISHED_AS.get(arm, arm))


def stated_top1_error(paper: PaperTable | None, arm: str) -> float | None:
    """The top-1 error the weights an arm starts from should show: the paper's, or the release's own."""
    return (paper and published(paper.top1_error, arm)) or RELEASED_TOP1_ERROR.get(arm)


def _cifar(title: str, none: float, cutout: float, cutmix: float, saliencymix: float) -> PaperTable:
    return PaperTable(title, {"none": none, "cutout": cutout, "cutmix": cutmix, "saliencymix": saliencymix})


PAPER_TABLES = {
    "imagenet_resnet50": PaperTable(
        "ImageNet, ResNet-50",
        top1_error={"none": 23.68, "cutout": 22.93, "mixup": 22.58, "cutmix": 21.40, "saliencymix": 21.26},
        top5_error={"none": 7.05, "cutout": 6.66, "mixup": 6.40, "cutmix": 5.92, "saliencymix": 5.76},
        voc_ap50={"none": 76.71, "cutout": 77.17, "mixup": 77.98, "cutmix": 78.31, "saliencymix": 78.48},
        fgsm_accuracy=dict(PAPER_FGSM_ACCURACY),
        cost_hours=dict(PAPER_HOURS)),
    "imagenet_resnet101": PaperTable(
        "ImageNet, ResNet-101",
        top1_error={"none": 21.87, "cutout": 20.72, "mixup": 20.52, "cutmix": 20.17, "saliencymix": 20.09},
        top5_error={"none": 6.29, "cutout": 5.51, "mixup": 5.28, "cutmix": 5.24, "saliencymix": 5.15}),
    # CIFAR, top-1 error (mean of the paper's runs); "+" is the standard crop-and-flip augmentation.
    "cifar10_resnet18": _cifar("CIFAR-10, ResNet-18", 10.63, 9.31, 9.44, 7.59),
    "cifar10+_resnet18": _cifar("CIFAR-10+, ResNet-18", 4.72, 3.99, 3.78, 3.65),
    "cifar100_resnet18": _cifar("CIFAR-100, ResNet-18", 36.68, 34.98, 34.42, 28.73),
    "cifar100+_resnet18": _cifar("CIFAR-100+, ResNet-18", 22.46, 21.96, 19.42, 19.29),
    "cifar10+_resnet50": _cifar("CIFAR-10+, ResNet-50", 4.98, 3.86, 3.61, 3.46),
    "cifar100+_resnet50": _cifar("CIFAR-100+, ResNet-50", 21.58, 21.38, 18.72, 18.57),
    "cifar10+_wideresnet28_10": _cifar("CIFAR-10+, WideResNet-28-10", 3.87, 3.08, 2.87, 2.76),
    "cifar100+_wideresnet28_10": _cifar("CIFAR-100+, WideResNet-28-10", 18.80, 18.41, 16.66, 16.56),
}
