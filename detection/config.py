"""Detection transfer configuration: Detectron2's config plus the keys this project adds.

Without Detectron2 (the torchvision engine) the same YAML files load into an fvcore ``CfgNode``
that holds every Detectron2 key the torchvision engine reads, with Detectron2's defaults and
value types (so a YAML Detectron2 accepts is accepted here), and accepts the Detectron2-only
keys (model internals) without using them.
"""
from __future__ import annotations

from fvcore.common.config import CfgNode as CN

ENGINES = ("detectron2", "torchvision")
# torchvision's ImageNet statistics in 0-255 RGB: what our exported backbones were trained with.
TORCHVISION_PIXEL_MEAN = (123.675, 116.280, 103.530)
TORCHVISION_PIXEL_STD = (58.395, 57.120, 57.375)


def add_transfer_config(cfg: CN) -> CN:
    """The keys of this project, on top of Detectron2's. The new node has ``cfg``'s own class:
    a YAML ``TRANSFER:`` section merges only into a node of the class it is loaded as."""
    cfg.TRANSFER = type(cfg)()
    cfg.TRANSFER.METHOD = ""  # how MODEL.WEIGHTS was pretrained (none, saliencymix, ...): for tools/compare.py
    cfg.TRANSFER.VOC_ROOT = ""  # a VOC-format tree of your own; empty: Detectron2's built-in VOC names
    cfg.TRANSFER.COCO_ROOT = ""  # or a COCO-format set: annotations/instances_<split>.json, images in <split>/
    cfg.TRANSFER.DATASET_NAME = "custom_voc"  # its splits are registered as <DATASET_NAME>_<split>
    cfg.TRANSFER.CLASS_NAMES = []  # a VOC tree's classes; empty: the 20 Pascal VOC classes (COCO: the json's)
    cfg.TRANSFER.YEAR = 2007  # its metric: 2007 is VOC's 11-point AP, later years the area
    return cfg


def torchvision_engine_defaults() -> CN:
    """Detectron2's defaults (``detectron2/config/defaults.py``) for the keys the torchvision
    engine reads."""
    cfg = CN()
    cfg.OUTPUT_DIR = "./output"
    cfg.SEED = -1
    cfg.MODEL = CN()
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cuda"
    cfg.MODEL.MASK_ON = False  # True: Mask R-CNN (a mask head beside the box head)
    cfg.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    cfg.MODEL.RESNETS = CN()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.BACKBONE = CN()
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RPN = CN()
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000  # proposals kept per image
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.ROI_HEADS = CN()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    cfg.INPUT = CN()
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_SIZE_TRAIN = (800,)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.DATASETS = CN()
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER = CN()
    cfg.DATALOADER.NUM_WORKERS = 4
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    cfg.SOLVER = CN()
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.NESTEROV = False
    cfg.SOLVER.WEIGHT_DECAY = 0.0001
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = None  # None: WEIGHT_DECAY
    cfg.SOLVER.BIAS_LR_FACTOR = 1.0
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.STEPS = (30000,)
    cfg.SOLVER.MAX_ITER = 40000
    cfg.SOLVER.WARMUP_FACTOR = 1.0 / 1000
    cfg.SOLVER.WARMUP_ITERS = 1000
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    cfg.TEST = CN()
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    cfg.TEST.PRECISE_BN = CN()
    cfg.TEST.PRECISE_BN.ENABLED = False
    cfg.TEST.PRECISE_BN.NUM_ITER = 200
    cfg.set_new_allowed(True)  # Detectron2-only keys of the shared YAML files are accepted, unused
    return cfg


def get_detection_cfg(engine: str) -> CN:
    """A fresh config for ``engine`` with this project's keys."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "detectron2":
        from detectron2.config import get_cfg

        cfg = get_cfg()
    else:
        cfg = torchvision_engine_defaults()
    return add_transfer_config(cfg)
