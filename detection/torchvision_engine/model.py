"""torchvision's Faster R-CNN or Mask R-CNN R50-FPN built from a Detectron2-style config, and its weights."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.run_checks import check_torchvision_architecture
from helpers.distributed import local_device
from helpers.weights import (
    BLOCKS_PER_DEPTH,
    WeightsError,
    check_backbone,
    is_batch_counter,
    load_resnet_state_dict,
    resnet_depth,
)
from pretrain import checkpoint as ckpt

logger = logging.getLogger(__name__)

SUPPORTED_DEPTHS = tuple(BLOCKS_PER_DEPTH)  # the exporter's bottleneck ResNets
NORM_LAYERS = ("FrozenBN", "BN", "SyncBN")
BACKBONE_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))  # stem, res2 .. res5


def build_model(cfg) -> FasterRCNN:
    """The detector with its backbone loaded from ``MODEL.WEIGHTS`` (random when empty)."""
    model = build_detector(cfg)
    if cfg.MODEL.WEIGHTS:
        load_backbone(model, Path(cfg.MODEL.WEIGHTS), resnet_depth_of(cfg))
    else:
        logger.warning("MODEL.WEIGHTS is empty: the backbone starts from random weights")
    return model


def build_detector(cfg) -> FasterRCNN:
    """torchvision's Faster R-CNN R50-FPN for ``cfg`` (Mask R-CNN, a ``FasterRCNN`` with a mask
    head, with ``MODEL.MASK_ON``), randomly initialised (nothing downloaded)."""
    check_torchvision_architecture(cfg)
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"MODEL.BACKBONE.FREEZE_AT {freeze_at} must be in 0..5 (stem, res2 .. res5)")
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{resnet_depth_of(cfg)}",
                                   weights=None, norm_layer=backbone_norm_layer(cfg),
                                   trainable_layers=5 - freeze_at)
    freeze_stage_batchnorm(backbone.body, freeze_at)
    mean, std = pixel_statistics(cfg)
    detector = MaskRCNN if cfg.MODEL.MASK_ON else FasterRCNN
    return detector(
        backbone, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1,  # + the background
        min_size=training_min_sizes(cfg), max_size=cfg.INPUT.MAX_SIZE_TRAIN, image_mean=mean, image_std=std,
        rpn_batch_size_per_image=cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE,
        rpn_post_nms_top_n_train=cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN,
        rpn_post_nms_top_n_test=cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
        box_batch_size_per_image=cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        box_score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        box_nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE)


def resnet_depth_of(cfg) -> int:
    """``MODEL.RESNETS.DEPTH``: a bottleneck ResNet, as the exporter writes."""
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in SUPPORTED_DEPTHS:
        raise ValueError(f"MODEL.RESNETS.DEPTH {depth}: the torchvision engine builds ResNet-{SUPPORTED_DEPTHS}")
    return depth


def backbone_norm_layer(cfg) -> type[nn.Module]:
    """The ResNet's norm for ``MODEL.RESNETS.NORM``; SyncBN is converted later, when training
    on several GPUs."""
    norm = cfg.MODEL.RESNETS.NORM
    if norm not in NORM_LAYERS:
        raise ValueError(f"MODEL.RESNETS.NORM {norm!r} is not supported by the torchvision engine; "
                         f"choose one of {NORM_LAYERS}")
    return FrozenBatchNorm2d if norm == "FrozenBN" else nn.BatchNorm2d


def freeze_stage_batchnorm(body: nn.Module, freeze_at: int) -> None:
    """Frozen BN in the stages ``FREEZE_AT`` freezes (their weights are already frozen by
    torchvision): their statistics must not drift with the training batches either, as
    Detectron2 converts them."""
    for stage in BACKBONE_STAGES[:freeze_at]:
        for name in stage:
            setattr(body, name, with_frozen_batchnorm(getattr(body, name)))


def with_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d in it replaced by a FrozenBatchNorm2d."""
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d(module.num_features, module.eps)
    for name, child in module.named_children():
        setattr(module, name, with_frozen_batchnorm(child))
    return module


def pixel_statistics(cfg) -> tuple[list[float], list[float]]:
    """``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` (0-255, in ``INPUT.FORMAT`` order) as torchvision's
    transform wants them: [0, 1] RGB."""
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"MODEL.PIXEL_MEAN {mean} and MODEL.PIXEL_STD {std} need 3 values each")
    if cfg.INPUT.FORMAT == "BGR":
        mean, std = mean[::-1], std[::-1]
    elif cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r}: the torchvision engine reads RGB or BGR")
    return [value / 255 for value in mean], [value / 255 for value in std]


def training_min_sizes(cfg) -> tuple[int, ...]:
    """The shorter-side sizes torchvision's transform picks from at random per image, as
    Detectron2's ``ResizeShortestEdge`` samples ``INPUT.MIN_SIZE_TRAIN``."""
    sizes = tuple(cfg.INPUT.MIN_SIZE_TRAIN)
    sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if sampling == "choice":
        return sizes
    if sampling == "range" and len(sizes) == 2:
        return tuple(range(sizes[0], sizes[1] + 1))
    raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING {sampling!r} with INPUT.MIN_SIZE_TRAIN {sizes}: "
                     "use 'choice', or 'range' with two sizes")


@contextmanager
def inference_sizes(model: FasterRCNN, cfg):
    """Resize to ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` inside the block, then back to training's."""
    transform = model.transform
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (cfg.INPUT.MIN_SIZE_TEST,), cfg.INPUT.MAX_SIZE_TEST
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


def select_device(name: str) -> torch.device:
    """``MODEL.DEVICE``; this process's GPU for a plain ``cuda``; the CPU when CUDA is absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %r but CUDA is not available: running on the CPU", name)
        return torch.device("cpu")
    return local_device() if device.type == "cuda" and device.index is None else device


def load_backbone(model: FasterRCNN, path: Path, depth: int) -> int:
    """Load the exported ResNet into ``backbone.body``: every ResNet tensor but the classifier
    must land (a frozen BN has no batch counter to receive). Returns how many did."""
    body = model.backbone.body
    weights = read_backbone_weights(path, depth)
    expected = body.state_dict()
    loadable = {name: tensor for name, tensor in weights.items() if name in expected}
    unplaced = [name for name in weights if name not in expected and not is_batch_counter(name)]
    missing = [name for name in body.load_state_dict(loadable, strict=False).missing_keys
               if not is_batch_counter(name)]
    if unplaced or missing:
        raise ValueError(f"MODEL.WEIGHTS {path}: tensors with no place in backbone.body: {unplaced[:10]}; "
                         f"backbone.body tensors not in the file: {missing[:10]}")
    logger.info("loaded %d backbone tensors from %s into backbone.body (classifier skipped, %d BN batch "
                "counters not needed)", len(loadable), path, len(weights) - len(loadable))
    return len(loadable)


def read_backbone_weights(path: Path, depth: int) -> dict[str, torch.Tensor]:
    """The checked ResNet tensors of an exporter ``--format torchvision`` file (or one of our
    pretraining checkpoints), without the classifier."""
    if path.suffix == ".pkl":
        raise ValueError(f"MODEL.WEIGHTS {path} is a Detectron2 pickle; the torchvision engine reads the "
                         f"exporter's torchvision format: tools/convert_to_d2.py CHECKPOINT OUT.pth --format torchvision")
    try:
        state = load_resnet_state_dict(path).state
    except WeightsError as error:
        raise ValueError(f"MODEL.WEIGHTS: {error}") from None
    try:
        found = resnet_depth(state)
        if found != depth:
            raise WeightsError(f"holds a ResNet-{found}, but MODEL.RESNETS.DEPTH is {depth}")
        check_backbone(state, depth)
    except WeightsError as error:
        raise ValueError(f"MODEL.WEIGHTS {path}: {error}") from None
    return {name: tensor for name, tensor in state.items() if not name.startswith("fc.")}


def load_detector_weights(model: FasterRCNN, path: Path) -> None:
    """A checkpoint of this engine (or its bare model state dict) into ``model``."""
    if path.suffix == ".pkl":
        raise ValueError(f"{path} is a Detectron2 pickle: evaluate it with the Detectron2 engine")
    state = ckpt.load(path)
    state = state.get("model", state)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch
        raise ValueError(f"{path} does not fit this config's detector: {error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} is not a checkpoint of the torchvision engine's detector for this config: "
                         f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
