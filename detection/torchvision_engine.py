"""Faster R-CNN R50-FPN fine-tuning on VOC with torchvision, for machines without Detectron2.

It reads the same config keys as the Detectron2 engine where they mean the same thing, the same
VOC trees (``detection.datasets`` / ``detection.voc``) and scores with the same evaluator, so
its runs are comparable with each other; they are not numerically comparable with Detectron2
runs (a different detector implementation). ``tools/train_net.py`` calls ``train(cfg, resume)``
then ``evaluate(cfg)``; nothing here imports Detectron2.

Decisions, each following Detectron2 where it has one:

- Normalisation in the backbone follows ``MODEL.RESNETS.NORM`` (Detectron2's default
  ``FrozenBN``): ``FrozenBN`` is torchvision's ``FrozenBatchNorm2d``, ``BN`` is ``BatchNorm2d``,
  ``SyncBN`` is ``SyncBatchNorm`` when training on several GPUs (``BatchNorm2d`` otherwise: one
  process has nothing to synchronise with, and SyncBN needs CUDA). ``MODEL.BACKBONE.FREEZE_AT``
  freezes the stem and the first stages as Detectron2 does, turning their BN into frozen BN.
  The transfer protocol's base config (``SyncBN``, ``FREEZE_AT 0``) thus fine-tunes the whole
  backbone with its BN; the 18k variant freezes BN, the stem and res2. With
  ``TEST.PRECISE_BN.ENABLED`` the BN statistics are recomputed before evaluations and before
  the final checkpoint, as Detectron2's ``PreciseBN`` hook does.
- Difficult objects are trained on, as Detectron2's VOC loader keeps them; training skips only
  images without any annotation (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``). Boxes are clipped to
  the image and empty ones dropped, as Detectron2's dataset mapper does.
- The backbone always receives RGB: the exporter's torchvision weights were trained on RGB, so
  with ``INPUT.FORMAT BGR`` the pixel statistics are reordered to RGB rather than the image.
- ``evaluate`` returns, like Detectron2's ``DefaultTrainer.test``, ``{dataset: results}`` in
  ``DATASETS.TEST`` order, or the single dataset's results unwrapped.
- Logs, ``metrics.json`` rows (iteration index counted from 0, median losses over the window,
  Detectron2's loss names) and the ``last_checkpoint`` pointer follow Detectron2's run folder;
  checkpoints are ``checkpoint_<iteration>.pth`` (every one kept) and ``model_final.pth``.

The Detectron2 keys read beyond ``detection.config``'s are listed, with Detectron2's defaults, in
``DETECTRON2_DEFAULTS``. Not carried over: the C4 head (this engine is always R50-FPN), the RPN
top-k settings (per level here, so a C4 config's values would not mean the same; torchvision's
defaults apply) and aspect-ratio grouping of batches (it only saves padding).
"""
from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import secrets
import statistics
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import cv2
import torch
import torch.distributed as dist
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.datasets import VOCDataset, resolve
from detection.evaluation import VOCDetectionEvaluator
from detection.voc import load_voc_split
from pretrain import checkpoint as ckpt
from pretrain.data import per_process_batch, world
from pretrain.distributed import all_gather_objects, all_reduce_sum, local_device
from pretrain.export import (BLOCKS_PER_DEPTH, ExportError, check_backbone, load_resnet_state_dict,
                             resnet_depth)

logger = logging.getLogger(__name__)

ENGINE = "torchvision"
LOG_PERIOD = 20  # iterations per log line and metrics.json row, as Detectron2's writers
METRICS_FILE = "metrics.json"
KEEP_ALL_CHECKPOINTS = sys.maxsize  # Detectron2's PeriodicCheckpointer deletes none
EMPTY_BOX_SIDE = 1e-5  # Detectron2's filter_empty_instances threshold
PRECISE_BN_STREAM = 1  # seed offset: PreciseBN draws its images apart from the training stream

# Keys of Detectron2's config that this engine honours but detection.config does not define
# for it: a YAML may set them; otherwise Detectron2's default applies.
DETECTRON2_DEFAULTS = {
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.BACKBONE.FREEZE_AT": 2,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "TEST.DETECTIONS_PER_IMAGE": 100,
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.NESTEROV": False,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.WEIGHT_DECAY_BIAS": None,
    "SOLVER.BIAS_LR_FACTOR": 1.0,
    "TEST.PRECISE_BN.ENABLED": False,
    "TEST.PRECISE_BN.NUM_ITER": 200,
}
SUPPORTED_DEPTHS = tuple(BLOCKS_PER_DEPTH)  # the exporter's bottleneck ResNets
NORM_LAYERS = ("FrozenBN", "BN", "SyncBN")
BACKBONE_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))  # stem, res2 .. res5
NORM_MODULES = (nn.BatchNorm2d, nn.SyncBatchNorm)  # the trainable norms this detector can hold
# torchvision's loss names -> Detectron2's, so both engines' metrics.json read alike.
DETECTRON2_LOSS_NAMES = {"loss_classifier": "loss_cls", "loss_box_reg": "loss_box_reg",
                         "loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_loc"}


def detectron2_key(cfg, key: str):
    """``cfg``'s value of a key in ``DETECTRON2_DEFAULTS``, or Detectron2's default."""
    node = cfg
    for part in key.split("."):
        if part not in node:
            return DETECTRON2_DEFAULTS[key]
        node = node[part]
    return node


# ------------------------------------------------------------------------------------- model
def build_model(cfg) -> FasterRCNN:
    """The detector with its backbone loaded from ``MODEL.WEIGHTS`` (random when empty)."""
    model = build_detector(cfg)
    if cfg.MODEL.WEIGHTS:
        load_backbone(model, Path(cfg.MODEL.WEIGHTS), resnet_depth_of(cfg))
    else:
        logger.warning("MODEL.WEIGHTS is empty: the backbone starts from random weights")
    return model


def build_detector(cfg) -> FasterRCNN:
    """torchvision's Faster R-CNN R50-FPN for ``cfg``, randomly initialised (nothing downloaded)."""
    freeze_at = detectron2_key(cfg, "MODEL.BACKBONE.FREEZE_AT")
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"MODEL.BACKBONE.FREEZE_AT {freeze_at} must be in 0..5 (stem, res2 .. res5)")
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{resnet_depth_of(cfg)}",
                                   weights=None, norm_layer=backbone_norm_layer(cfg),
                                   trainable_layers=5 - freeze_at)
    freeze_stage_batchnorm(backbone.body, freeze_at)
    mean, std = pixel_statistics(cfg)
    return FasterRCNN(
        backbone, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1,  # + the background
        min_size=training_min_sizes(cfg), max_size=cfg.INPUT.MAX_SIZE_TRAIN, image_mean=mean, image_std=std,
        rpn_batch_size_per_image=detectron2_key(cfg, "MODEL.RPN.BATCH_SIZE_PER_IMAGE"),
        box_batch_size_per_image=detectron2_key(cfg, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"),
        box_score_thresh=detectron2_key(cfg, "MODEL.ROI_HEADS.SCORE_THRESH_TEST"),
        box_nms_thresh=detectron2_key(cfg, "MODEL.ROI_HEADS.NMS_THRESH_TEST"),
        box_detections_per_img=detectron2_key(cfg, "TEST.DETECTIONS_PER_IMAGE"))


def resnet_depth_of(cfg) -> int:
    """``MODEL.RESNETS.DEPTH``: a bottleneck ResNet, as the exporter writes."""
    depth = detectron2_key(cfg, "MODEL.RESNETS.DEPTH")
    if depth not in SUPPORTED_DEPTHS:
        raise ValueError(f"MODEL.RESNETS.DEPTH {depth}: the torchvision engine builds ResNet-{SUPPORTED_DEPTHS}")
    return depth


def backbone_norm_layer(cfg) -> type[nn.Module]:
    """The ResNet's norm for ``MODEL.RESNETS.NORM``; SyncBN is converted later, when training
    on several GPUs."""
    norm = detectron2_key(cfg, "MODEL.RESNETS.NORM")
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
    sampling = detectron2_key(cfg, "INPUT.MIN_SIZE_TRAIN_SAMPLING")
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


def is_batch_counter(name: str) -> bool:
    """BN's ``num_batches_tracked``: frozen BN has none, and an export may lack it."""
    return name.endswith("num_batches_tracked")


def read_backbone_weights(path: Path, depth: int) -> dict[str, torch.Tensor]:
    """The checked ResNet tensors of an exporter ``--format torchvision`` file (or one of our
    pretraining checkpoints), without the classifier."""
    if path.suffix == ".pkl":
        raise ValueError(f"MODEL.WEIGHTS {path} is a Detectron2 pickle; the torchvision engine reads the "
                         f"exporter's torchvision format: tools/convert_to_d2.py CHECKPOINT OUT.pth --format torchvision")
    try:
        state = load_resnet_state_dict(path).state
    except ExportError as error:
        raise ValueError(f"MODEL.WEIGHTS: {error}") from None
    try:
        found = resnet_depth(state)
        if found != depth:
            raise ExportError(f"holds a ResNet-{found}, but MODEL.RESNETS.DEPTH is {depth}")
        check_backbone(state, depth)
    except ExportError as error:
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


# -------------------------------------------------------------------------------------- data
def read_image(record: dict) -> torch.Tensor:
    """The record's image as a float [0, 1] RGB CHW tensor, checked against its annotation size."""
    path = record["file_name"]
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if image.shape[:2] != (record["height"], record["width"]):
        raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                         f"{record['width']}x{record['height']}")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)


def training_target(record: dict, flip: bool) -> dict[str, torch.Tensor]:
    """Boxes (XYXY, mirrored when ``flip``, clipped, empty ones dropped) and labels (class + 1:
    torchvision's 0 is the background) of every object, difficult ones included."""
    annotations = record["annotations"]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([a["category_id"] + 1 for a in annotations], dtype=torch.int64)
    width, height = record["width"], record["height"]
    if flip:
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) > EMPTY_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) > EMPTY_BOX_SIDE)
    return {"boxes": boxes[keep], "labels": labels[keep]}


class VOCTrainingImages(Dataset):
    """Training images and targets; indexed by ``(index, flip)`` pairs from ``TrainingSampler``,
    so that the augmentation is drawn with the order, not in the worker processes."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, dict]:
        index, flip = key
        record = self.records[index]
        image = read_image(record)
        return (image.flip(-1) if flip else image), training_target(record, flip)


class VOCTestImages(Dataset):
    """Test images with their dataset dicts (for ``image_id``)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return read_image(self.records[index]), self.records[index]


class TrainingSampler(Sampler):
    """Detectron2's ``TrainingSampler``: an endless stream of seeded random permutations of the
    dataset, dealt round-robin to the processes, with a flip coin drawn for every sample.
    ``start`` skips the samples all processes consumed before, so a resumed run continues the
    very stream an uninterrupted one would have seen, whatever the worker count."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int, flip: bool, start: int = 0):
        self.size, self.seed, self.flip, self.start = size, seed, flip, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        return itertools.islice(self._stream(), self.start + self.rank, None, self.world_size)

    def _stream(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(self.size, generator=generator).tolist()
            coins = (torch.rand(self.size, generator=generator) < 0.5).tolist()
            yield from zip(order, (coin and self.flip for coin in coins))


def own_generator(seed: int) -> torch.Generator:
    """A loader's own source for its worker seeds: left to the global one, each loader would
    shift the training's random draws (box sampling, sizes), and a resumed run would diverge."""
    return torch.Generator().manual_seed(seed)


def collate_lists(batch: list[tuple]) -> tuple[list, list]:
    """Images of different sizes stay a list; torchvision's transform batches them."""
    images, others = zip(*batch)
    return list(images), list(others)


def checked_dataset(name: str, cfg) -> VOCDataset:
    """``resolve(name)``, refusing a class list of another size than the box predictor's."""
    dataset = resolve(name, cfg)
    if len(dataset.class_names) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                         f"{name} has {len(dataset.class_names)} classes")
    return dataset


def training_records(cfg) -> list[dict]:
    """Dataset dicts of every ``DATASETS.TRAIN`` name, concatenated; images without any
    annotation left out as Detectron2 does."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name the VOC splits to train on")
    records = []
    for name in cfg.DATASETS.TRAIN:
        dataset = checked_dataset(name, cfg)
        records += load_voc_split(dataset.root, dataset.split, dataset.class_names)
    if detectron2_key(cfg, "DATALOADER.FILTER_EMPTY_ANNOTATIONS"):
        annotated = [record for record in records if record["annotations"]]
        logger.info("removed %d images without annotations; %d training images left",
                    len(records) - len(annotated), len(annotated))
        records = annotated
    if not records:
        raise ValueError(f"no annotated training images in DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    return records


def horizontal_flip_enabled(cfg) -> bool:
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "none"):
        raise ValueError(f"INPUT.RANDOM_FLIP {cfg.INPUT.RANDOM_FLIP!r}: the torchvision engine supports "
                         "'horizontal' and 'none'")
    return cfg.INPUT.RANDOM_FLIP == "horizontal"


def training_batches(cfg, seed: int, start: int, device: torch.device):
    """Endless (images, targets) batches of ``SOLVER.IMS_PER_BATCH / processes`` images on
    ``device``, from sample ``start`` of the seeded stream on."""
    rank, world_size = world()
    batch = per_process_batch(cfg.SOLVER.IMS_PER_BATCH, world_size, "SOLVER.IMS_PER_BATCH")
    dataset = VOCTrainingImages(training_records(cfg))
    sampler = TrainingSampler(len(dataset), seed, rank, world_size, horizontal_flip_enabled(cfg), start)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
                        collate_fn=collate_lists, pin_memory=device.type == "cuda",
                        generator=own_generator(seed + rank))
    for images, targets in loader:
        yield ([image.to(device, non_blocking=True) for image in images],
               [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets])


# --------------------------------------------------------------------- schedule and optimizer
def lr_multiplier(cfg, iteration: int) -> float:
    """The factor on ``BASE_LR`` at 0-based ``iteration``, as Detectron2's ``WarmupMultiStepLR``:
    x ``GAMMA`` at each of ``STEPS`` reached (steps beyond ``MAX_ITER`` ignored), ramped up from
    ``WARMUP_FACTOR`` over the first ``WARMUP_ITERS``."""
    solver = cfg.SOLVER
    steps = [step for step in solver.STEPS if step <= solver.MAX_ITER]

    def decay(at: int) -> float:
        return solver.GAMMA ** bisect.bisect_right(steps, at)

    warmup_iters = min(solver.WARMUP_ITERS, solver.MAX_ITER)
    if iteration >= warmup_iters:
        return decay(iteration)
    start = solver.WARMUP_FACTOR * decay(0)
    method = detectron2_key(cfg, "SOLVER.WARMUP_METHOD")
    if method == "constant":
        return start
    if method != "linear":
        raise ValueError(f"SOLVER.WARMUP_METHOD {method!r}: choose linear or constant")
    return start + (decay(warmup_iters) - start) * iteration / warmup_iters


def check_schedule(cfg) -> None:
    """Refuse a schedule this engine would not follow; warn about steps past the end."""
    name = detectron2_key(cfg, "SOLVER.LR_SCHEDULER_NAME")
    if name != "WarmupMultiStepLR":
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME {name!r}: the torchvision engine runs WarmupMultiStepLR")
    late = [step for step in cfg.SOLVER.STEPS if step > cfg.SOLVER.MAX_ITER]
    if late:
        logger.warning("SOLVER.STEPS %s lie beyond SOLVER.MAX_ITER %d and are ignored", late, cfg.SOLVER.MAX_ITER)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.SGD:
    """SGD over the trainable parameters, with Detectron2's parameter groups: norm layers get
    ``WEIGHT_DECAY_NORM``, biases ``BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS`` when set."""
    solver = cfg.SOLVER
    bias_decay = detectron2_key(cfg, "SOLVER.WEIGHT_DECAY_BIAS")
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            decay = (detectron2_key(cfg, "SOLVER.WEIGHT_DECAY_NORM") if isinstance(module, NORM_MODULES)
                     else solver.WEIGHT_DECAY)
            factor = 1.0
            if name == "bias":
                factor = detectron2_key(cfg, "SOLVER.BIAS_LR_FACTOR")
                decay = decay if bias_decay is None else bias_decay
            groups.setdefault((factor, decay), []).append(parameter)
    return torch.optim.SGD([{"params": params, "lr_factor": factor, "weight_decay": decay}
                            for (factor, decay), params in groups.items()],
                           lr=solver.BASE_LR, momentum=solver.MOMENTUM,
                           nesterov=detectron2_key(cfg, "SOLVER.NESTEROV"))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg, iteration: int) -> float:
    """Set every group's lr for ``iteration``; returns the base lr's value."""
    lr = cfg.SOLVER.BASE_LR * lr_multiplier(cfg, iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_factor"]
    return lr


# ---------------------------------------------------------------------------------- training
def train(cfg, resume: bool = False) -> None:
    """Fine-tune for ``SOLVER.MAX_ITER`` iterations into ``OUTPUT_DIR``; with ``resume``, continue
    from its last checkpoint (a folder without one starts from ``MODEL.WEIGHTS``)."""
    rank, world_size = world()
    device = select_device(cfg.MODEL.DEVICE)
    check_schedule(cfg)
    output_dir = Path(cfg.OUTPUT_DIR)
    checkpointer = ckpt.Checkpointer(output_dir, KEEP_ALL_CHECKPOINTS)
    last = checkpointer.last() if resume else None
    state = read_training_checkpoint(last) if last else None
    seed = state["seed"] if state else resolve_seed(cfg.SEED)
    torch.manual_seed(seed + rank)
    model = (build_detector(cfg) if state else build_model(cfg)).to(device)
    model = with_synchronized_batchnorm(model, cfg, device, world_size)
    optimizer = build_optimizer(cfg, model)
    start = restore_training_state(state, model, optimizer, last, device) if state else 0
    network = across_processes(model, device, world_size)
    batches = training_batches(cfg, seed, start * cfg.SOLVER.IMS_PER_BATCH, device)
    model.train()
    window: list[dict[str, float]] = []
    for iteration in range(start, cfg.SOLVER.MAX_ITER):
        began = time.perf_counter()
        lr = set_learning_rate(optimizer, cfg, iteration)
        images, targets = next(batches)
        loaded = time.perf_counter()
        losses = training_step(network, optimizer, images, targets, iteration, checkpointer)
        window.append({**losses, "lr": lr, "time": time.perf_counter() - began, "data_time": loaded - began})
        done = iteration + 1
        if done % LOG_PERIOD == 0 or done == cfg.SOLVER.MAX_ITER:
            write_training_metrics(window, iteration, cfg, output_dir, rank)
            window = []
        after_step(done, model, optimizer, seed, cfg, device, checkpointer)
    if start >= cfg.SOLVER.MAX_ITER and rank == 0:
        logger.info("%s is already at iteration %d of %d: nothing to train", last, start, cfg.SOLVER.MAX_ITER)
    if dist.is_initialized():
        dist.barrier()  # every process's evaluate() must find rank 0's model_final.pth written


def select_device(name: str) -> torch.device:
    """``MODEL.DEVICE``; this process's GPU for a plain ``cuda``; the CPU when CUDA is absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %r but CUDA is not available: running on the CPU", name)
        return torch.device("cpu")
    return local_device() if device.type == "cuda" and device.index is None else device


def resolve_seed(configured: int) -> int:
    """``SEED``, or when negative one drawn by rank 0 and shared, so all processes agree."""
    if configured >= 0:
        return configured
    seed = all_gather_objects(secrets.randbelow(2 ** 31))[0]
    logger.info("SEED is %d: using the random seed %d", configured, seed)
    return seed


def with_synchronized_batchnorm(model: nn.Module, cfg, device: torch.device, world_size: int) -> nn.Module:
    """SyncBN across the processes when ``MODEL.RESNETS.NORM`` asks for it and they are GPUs."""
    if detectron2_key(cfg, "MODEL.RESNETS.NORM") != "SyncBN" or world_size == 1:
        return model
    if device.type != "cuda":
        logger.warning("MODEL.RESNETS.NORM SyncBN needs CUDA: each CPU process normalises its own batch")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def across_processes(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """DDP when several processes train; buffers are made equal once, not at every forward, so
    each process's BN keeps its own running statistics (Detectron2's ``broadcast_buffers=False``)."""
    if world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def training_step(network: nn.Module, optimizer: torch.optim.Optimizer, images: list, targets: list,
                  iteration: int, checkpointer: ckpt.Checkpointer) -> dict[str, float]:
    """One SGD step; the losses averaged over the processes, under Detectron2's names. A NaN or
    infinite loss stops every process before the step, so no checkpoint holds its damage."""
    losses = network(images, targets)
    total = sum(losses.values())
    names = ["total_loss", *(DETECTRON2_LOSS_NAMES.get(name, name) for name in losses)]
    values = all_reduce_sum(torch.stack([total, *losses.values()]).detach(), total.device)  # one readback
    averaged = {name: value / world()[1] for name, value in zip(names, values)}
    if not math.isfinite(averaged["total_loss"]):
        raise FloatingPointError(f"loss became {averaged} at iteration {iteration}; training stopped. "
                                 f"Last checkpoint: {checkpointer.last() or 'none written yet'}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return averaged


def after_step(done: int, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int, cfg,
               device: torch.device, checkpointer: ckpt.Checkpointer) -> None:
    """Detectron2's hooks in their order: PreciseBN, then the checkpoint, then the evaluation.
    The final evaluation is left to ``evaluate``."""
    final = done == cfg.SOLVER.MAX_ITER
    eval_due = cfg.TEST.EVAL_PERIOD > 0 and done % cfg.TEST.EVAL_PERIOD == 0 and not final
    if final or eval_due:
        recompute_batchnorm_statistics(model, cfg, seed, device)
    if final or (cfg.SOLVER.CHECKPOINT_PERIOD > 0 and done % cfg.SOLVER.CHECKPOINT_PERIOD == 0):
        name = ckpt.FINAL_NAME if final else ckpt.checkpoint_name(done)
        save_training_checkpoint(checkpointer, name, model, optimizer, done, seed, cfg, device)
    if eval_due:
        results = evaluate_model(model, cfg, device)
        if world()[0] == 0:
            append_metrics(Path(cfg.OUTPUT_DIR), {"iteration": done - 1, **flatten_results(results)})


class DetectorOnBatch(nn.Module):
    """fvcore's ``update_bn_stats`` calls ``model(batch)``; the detector wants images, targets."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: tuple[list, list]):
        return self.detector(*batch)


def recompute_batchnorm_statistics(model: nn.Module, cfg, seed: int, device: torch.device) -> None:
    """Detectron2's PreciseBN: BN statistics averaged over ``NUM_ITER`` training batches with
    the weights fixed (only with ``TEST.PRECISE_BN.ENABLED`` and a BN that is not frozen)."""
    if not detectron2_key(cfg, "TEST.PRECISE_BN.ENABLED"):
        return
    batches = training_batches(cfg, seed + PRECISE_BN_STREAM, 0, device)
    update_bn_stats(DetectorOnBatch(model), batches, detectron2_key(cfg, "TEST.PRECISE_BN.NUM_ITER"))
    batches.close()


def write_training_metrics(window: list[dict[str, float]], iteration: int, cfg, output_dir: Path,
                           rank: int) -> None:
    """Rank 0's log line and ``metrics.json`` row: medians over the window (losses, times) and
    the last iteration's lr, at Detectron2's 0-based iteration index."""
    if rank != 0:
        return
    row = {"iteration": iteration}
    for name in window[-1]:
        row[name] = window[-1][name] if name == "lr" else statistics.median(step[name] for step in window)
    append_metrics(output_dir, row)
    losses = "  ".join(f"{name} {row[name]:.4g}" for name in row if name.startswith(("total_loss", "loss_")))
    remaining = (cfg.SOLVER.MAX_ITER - iteration - 1) * row["time"]
    logger.info("iter %d/%d  %s  lr %.4g  %.3f s/it (data %.3f s)  eta %s", iteration + 1, cfg.SOLVER.MAX_ITER,
                losses, row["lr"], row["time"], row["data_time"], timedelta(seconds=round(remaining)))


def append_metrics(output_dir: Path, row: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / METRICS_FILE, "a") as stream:
        stream.write(json.dumps(row) + "\n")


def save_training_checkpoint(checkpointer: ckpt.Checkpointer, name: str, model: nn.Module,
                             optimizer: torch.optim.Optimizer, done: int, seed: int, cfg,
                             device: torch.device) -> None:
    """Everything needed to continue after ``done`` iterations (a collective call: every
    process contributes its random state); rank 0 writes it."""
    state = {"engine": ENGINE, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "iteration": done, "seed": seed, "rng": all_gather_objects(random_state(device)),
             "world_size": world()[1], "cfg": cfg.dump()}
    if world()[0] == 0:
        path = checkpointer.save(name, state)
        logger.info("saved %s at iteration %d", path, done)


def random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators training draws from (sizes on the CPU; box sampling on the device)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def read_training_checkpoint(path: Path) -> dict:
    state = ckpt.load(path)
    if not isinstance(state, dict) or state.get("engine") != ENGINE:
        raise ValueError(f"{path} was not written by the torchvision engine; it cannot be resumed here")
    return state


def restore_training_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path,
                           device: torch.device) -> int:
    """Model, optimizer and (with the same process count) random state; the iteration reached."""
    rank, world_size = world()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["world_size"] == world_size:
        set_random_state(state["rng"][rank], device)
    else:
        logger.warning("%s was written by %d processes, this run has %d: the random draws restart",
                       path, state["world_size"], world_size)
    logger.info("resumed from %s at iteration %d", path, state["iteration"])
    return state["iteration"]


# -------------------------------------------------------------------------------- evaluation
def evaluate(cfg, weights: str | None = None) -> dict:
    """VOC mAP of a checkpoint of this engine (default ``OUTPUT_DIR/model_final.pth``) on every
    ``DATASETS.TEST`` dataset: ``{dataset: results}``, or the results alone for one dataset."""
    device = select_device(cfg.MODEL.DEVICE)
    model = build_detector(cfg)
    load_detector_weights(model, Path(weights) if weights else Path(cfg.OUTPUT_DIR) / ckpt.FINAL_NAME)
    return evaluate_model(model.to(device), cfg, device)


def evaluate_model(model: FasterRCNN, cfg, device: torch.device) -> dict:
    """``model`` on each ``DATASETS.TEST`` dataset at the test sizes; see ``evaluate``."""
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the VOC splits to evaluate on")
    results = OrderedDict((name, evaluate_dataset(model, checked_dataset(name, cfg), cfg, device))
                          for name in cfg.DATASETS.TEST)
    return next(iter(results.values())) if len(results) == 1 else results


@torch.no_grad()
def evaluate_dataset(model: FasterRCNN, dataset: VOCDataset, cfg, device: torch.device) -> dict:
    """This process's contiguous share of the images, one at a time as Detectron2's inference
    loader; the evaluator gathers the detections and scores them on rank 0."""
    rank, world_size = world()
    records = load_voc_split(dataset.root, dataset.split, dataset.class_names)
    evaluator = VOCDetectionEvaluator(dataset.root, dataset.split, dataset.year, dataset.class_names)
    loader = DataLoader(VOCTestImages(records), batch_size=1, sampler=shard(len(records), rank, world_size),
                        num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=collate_lists, generator=own_generator(rank))
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    with inference_sizes(model, cfg):
        for images, inputs in loader:
            outputs = model([image.to(device) for image in images])
            evaluator.process(inputs, [{"boxes": output["boxes"], "scores": output["scores"],
                                        "labels": output["labels"] - 1} for output in outputs])
    model.train(was_training)
    logger.info("%s: inference on %d images in %.1f s", dataset.name, len(loader), time.perf_counter() - began)
    results = evaluator.evaluate()
    if results:
        bbox = results["bbox"]
        logger.info("%s: AP %.2f  AP50 %.2f  AP75 %.2f", dataset.name, bbox["AP"], bbox["AP50"], bbox["AP75"])
    return results


def shard(size: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``size`` items, sizes differing by at most one
    (Detectron2's ``InferenceSampler``: every image evaluated exactly once)."""
    sizes = [size // world_size + (index < size % world_size) for index in range(world_size)]
    begin = sum(sizes[:rank])
    return list(range(begin, begin + sizes[rank]))


def flatten_results(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"bbox": {"AP": ..}}`` -> ``{"bbox/AP": ..}``, as Detectron2 writes them to metrics.json."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten_results(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
