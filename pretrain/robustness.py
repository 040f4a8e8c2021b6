"""Top-1 accuracy under the fast gradient sign method (FGSM), the white-box attack of the
paper's robustness table.

The attack works on the image as the camera gives it: a [0, 1] tensor is perturbed by
``epsilon / 255`` times the sign of the loss gradient, clipped back to [0, 1], and only then
normalised for the network, so ``epsilon`` is in pixel units of the 0-255 image.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from helpers.distributed import all_reduce_sum

# ImageNet ResNet-50 top-1 accuracy (%) under FGSM, as the paper reports it.
PAPER_FGSM_ACCURACY = {"none": 8.2, "cutout": 11.5, "mixup": 24.4, "cutmix": 31.0, "saliencymix": 32.96}


class Normalized(nn.Module):
    """``model`` behind the mean/std normalisation, so that it takes [0, 1] images."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
         epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean logits, adversarial images): one step of ``epsilon / 255`` along the sign of the
    gradient of the cross-entropy with the true labels, clipped to [0, 1]."""
    images = images.detach().requires_grad_(True)
    logits = model(images)
    (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), images)
    adversarial = (images.detach() + epsilon / 255 * gradient.sign()).clamp_(0, 1)
    return logits.detach(), adversarial


def evaluate_fgsm(model: nn.Module, loader, prepare, epsilon: float, device: torch.device) -> dict:
    """Top-1 accuracy (%) on clean and on FGSM-attacked images, every image of the (sharded)
    loader counted once over all processes. ``model`` takes [0, 1] images (see ``Normalized``)."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be at least 0, got {epsilon}")
    model.eval().requires_grad_(False)
    clean = attacked = total = 0
    for batch, labels, _ in loader:
        images, labels, _, _ = prepare(batch, labels)
        labels = labels.to(device)
        logits, adversarial = fgsm(model, images, labels, epsilon)
        with torch.no_grad():
            attacked += int((model(adversarial).argmax(1) == labels).sum())
        clean += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    clean, attacked, total = all_reduce_sum([clean, attacked, total], device)
    if total == 0:
        raise ValueError("the validation set is empty")
    return {"epsilon": epsilon, "clean_top1_accuracy": 100.0 * clean / total,
            "fgsm_top1_accuracy": 100.0 * attacked / total, "images": int(total)}
