"""Top-1 / top-5 error of a classifier on the validation split, every image counted once over all
processes: what training reports each epoch, and what ``tools/pretrain_net.py --eval-only``
reports of a weights file (a checkpoint of ours or a released ResNet, see ``helpers.weights``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from helpers.distributed import all_reduce_sum, local_device
from helpers.weights import ResNetSource, WeightsError, read_classifier_state
from pretrain.cli import UsageError
from pretrain.data import build_val_loader, unreadable_paths
from pretrain.device_pipeline import batch_preparer
from pretrain.models import build_model

EVAL_RESULTS = "eval_results.json"  # what --eval-only writes into OUTPUT_DIR (Detectron2's tools use the name too)


def model_description(cfg) -> str:
    return f"MODEL.ARCH {cfg.MODEL.ARCH} with MODEL.NUM_CLASSES {cfg.MODEL.NUM_CLASSES}"


def check_weights(cfg, path: Path) -> None:
    """Refuse, before any process starts, a weights file that does not fit ``cfg``'s model
    (another depth, another class count, not a ResNet): a usage error naming the file."""
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        read_classifier_state(path, model, model_description(cfg))
    except WeightsError as error:
        raise UsageError(str(error)) from None


def load_classifier(cfg, path: Path) -> tuple[nn.Module, ResNetSource]:
    """``cfg``'s model (on the CPU) with the weights of ``path``, and what was read."""
    model = build_model(cfg)
    source = read_classifier_state(path, model, model_description(cfg))
    model.load_state_dict(source.state)
    return model, source


@torch.no_grad()
def classification_errors(model: nn.Module, loader, prepare, device: torch.device,
                          memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Top-1 and top-5 error (percent) of ``model`` (in eval mode) over this process's share of
    the validation loader (its batches made the network's input by ``prepare``, see
    ``pretrain.device_pipeline.batch_preparer``), summed over all processes; ranked on float32
    logits (bf16 ties would blur the ranking)."""
    correct1 = correct5 = total = replaced_total = 0
    for batch, labels, unreadable in loader:
        images, labels, undecodable, _ = prepare(batch, labels)
        images = images.contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels.unsqueeze(1)
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += labels.numel()
        replaced_total += len(unreadable_paths(unreadable)) + len(undecodable)
    correct1, correct5, total, replaced_total = all_reduce_sum([correct1, correct5, total, replaced_total], device)
    if total == 0:
        raise ValueError("the validation set is empty")
    return {"top1_error": 100.0 * (1 - correct1 / total), "top5_error": 100.0 * (1 - correct5 / total),
            "val_images": int(total), "bad_val_images": int(replaced_total)}


def evaluate_weights(cfg, path: Path) -> dict:
    """The error of the weights in ``path`` on ``cfg``'s validation split, with ``cfg``'s
    evaluation transform (``DATA.VAL_RESIZE``, centre crop ``DATA.IMAGE_SIZE``)."""
    device = local_device()
    memory_format = torch.channels_last if cfg.MODEL.CHANNELS_LAST else torch.contiguous_format
    model, source = load_classifier(cfg, path)
    model = model.to(device, memory_format=memory_format).eval()
    loader = build_val_loader(cfg, pin_memory=device.type == "cuda")
    prepare = batch_preparer(cfg, train=False, device=device)
    return {"weights": str(path), "form": source.form, "arch": cfg.MODEL.ARCH, "num_classes": cfg.MODEL.NUM_CLASSES,
            "val_resize": cfg.DATA.VAL_RESIZE, "image_size": cfg.DATA.IMAGE_SIZE,
            **classification_errors(model, loader, prepare, device, memory_format)}
