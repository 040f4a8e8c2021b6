"""Study configuration: which arms to pretrain, how to transfer them, and where each kind of stage
runs. An fvcore ``CfgNode`` like every other config here (YAML files chain with ``_BASE_``,
command-line ``KEY VALUE`` pairs override them).
"""
from __future__ import annotations

from pathlib import Path

from fvcore.common.config import CfgNode as CN

from pretrain.cli import UsageError, merge_config
from study_runner.paper import PAPER_TABLES

PAPER_METHODS = ("none", "cutout", "mixup", "cutmix", "saliencymix")
# Each kind of stage has its own resources (its SLURM jobs'; the local executor uses
# GPUS_PER_NODE as --num-gpus).
STAGE_KINDS = ("pretrain", "verify", "export", "robustness", "detect", "coco", "report")
TRANSFERS = {"detect": "DETECT", "coco": "COCO"}  # the transfer stages' kinds and their config sections
ENGINES = ("auto", "detectron2", "torchvision")


def resources(nodes: int, gpus_per_node: int, cpus_per_node: int, mem_gb: int, time_minutes: int) -> CN:
    node = CN()
    node.NODES = nodes
    node.GPUS_PER_NODE = gpus_per_node  # --num-gpus of the tool; 0: one CPU process per node
    node.CPUS_PER_NODE = cpus_per_node
    node.MEM_GB = mem_gb  # per node
    node.TIME_MINUTES = time_minutes  # SLURM time limit; a job that reaches it is requeued and resumes
    node.PARTITION = ""  # empty: RESOURCES.PARTITION
    node.ACCOUNT = ""  # empty: RESOURCES.ACCOUNT
    node.QOS = ""  # empty: RESOURCES.QOS
    node.SBATCH = []  # extra sbatch parameters as "key=value" (e.g. "constraint=a100"), or "flag"
    return node


def get_study_cfg() -> CN:
    """The paper's study (ResNet-50, five arms, VOC with 5 trials) on 8-GPU nodes."""
    cfg = CN()
    cfg.OUTPUT_DIR = "output/study"

    cfg.STUDY = CN()
    cfg.STUDY.METHODS = list(PAPER_METHODS)  # arm names; each has a pretraining config (below)
    cfg.STUDY.BASELINE = "none"  # the arm gains and costs are measured against
    cfg.STUDY.PAPER = "imagenet_resnet50"  # the published figures set beside ours: one of study.paper.PAPER_TABLES, or ""
    cfg.STUDY.NOTE = ""  # a line at the top of the report (what this study is, how to read it)

    cfg.PRETRAIN = CN()
    cfg.PRETRAIN.CONFIG = "configs/pretrain/r50_{method}.yaml"  # {method}: the arm name
    cfg.PRETRAIN.DATA_ROOT = ""  # DATA.ROOT of every pretraining; empty: the configs' own
    cfg.PRETRAIN.OPTS = []  # KEY VALUE overrides for every pretraining (and every evaluation of an arm's file)
    # Arms that start from a weights file instead of a pretraining (released backbones): arm -> file,
    # relative to WEIGHTS_ROOT (any form tools/convert_to_d2.py reads). Such an arm has no pretrain
    # stage; with DATA_ROOT its file is evaluated on the validation set (verify.<arm>) and attacked
    # with FGSM, with the arm's PRETRAIN.CONFIG (its evaluation transform).
    cfg.PRETRAIN.WEIGHTS_ROOT = ""
    cfg.PRETRAIN.WEIGHTS = CN(new_allowed=True)

    cfg.DETECT = CN()
    cfg.DETECT.ENABLED = True
    cfg.DETECT.CONFIG = "configs/detection/faster_rcnn_R50_C4_voc.yaml"
    cfg.DETECT.ENGINE = "detectron2"  # of every transfer (VOC and COCO): detectron2 | torchvision | auto (Detectron2 when installed)
    cfg.DETECT.SEEDS = [0, 1, 2, 3, 4]  # one trial per seed
    cfg.DETECT.OPTS = []  # KEY VALUE overrides for every fine-tuning

    cfg.COCO = CN()  # the optional COCO transfer, beside VOC: same backbones, same engine
    cfg.COCO.ENABLED = False
    cfg.COCO.CONFIG = "configs/detection/coco/mask_rcnn_R50_FPN_1x.yaml"
    cfg.COCO.SEEDS = [0]  # one trial per seed
    cfg.COCO.OPTS = []  # KEY VALUE overrides for every fine-tuning

    cfg.ROBUSTNESS = CN()
    cfg.ROBUSTNESS.ENABLED = True
    cfg.ROBUSTNESS.EPSILON = 8.0  # FGSM step in pixel units of the 0-255 image

    cfg.COST = CN()
    cfg.COST.ENABLED = True

    cfg.RESOURCES = CN()
    # Where every kind's jobs go unless its own section says otherwise (a site's GPU partition,
    # its account and quality of service; empty: the cluster's default).
    cfg.RESOURCES.PARTITION = ""
    cfg.RESOURCES.ACCOUNT = ""
    cfg.RESOURCES.QOS = ""
    cfg.RESOURCES.PRETRAIN = resources(1, 8, 64, 480, 24 * 60)
    cfg.RESOURCES.VERIFY = resources(1, 1, 10, 64, 60)  # an arm's weights file on the validation set
    cfg.RESOURCES.EXPORT = resources(1, 0, 4, 32, 30)
    cfg.RESOURCES.ROBUSTNESS = resources(1, 1, 10, 64, 4 * 60)
    cfg.RESOURCES.DETECT = resources(1, 8, 64, 480, 12 * 60)
    cfg.RESOURCES.COCO = resources(1, 8, 64, 480, 24 * 60)
    cfg.RESOURCES.REPORT = resources(1, 0, 2, 8, 30)  # the comparison, the cost report, the study report
    return cfg


class StudyConfigError(UsageError):
    """A study config that cannot run; the message names the key and what is allowed."""


def load_study_cfg(config_file: str | Path, opts: list[str]) -> CN:
    """The defaults merged with ``config_file`` and ``KEY VALUE`` overrides, checked, with every
    path made absolute (relative paths are taken from the current folder), frozen."""
    try:
        cfg = merge_config(get_study_cfg(), config_file, opts)
    except UsageError as error:
        raise StudyConfigError(str(error)) from None
    check(cfg)
    cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR).resolve())
    for key, template in (("PRETRAIN", cfg.PRETRAIN.CONFIG), ("DETECT", cfg.DETECT.CONFIG), ("COCO", cfg.COCO.CONFIG)):
        cfg[key].CONFIG = str(Path(template).resolve())
    for key in ("DATA_ROOT", "WEIGHTS_ROOT"):
        if cfg.PRETRAIN[key]:
            cfg.PRETRAIN[key] = str(Path(cfg.PRETRAIN[key]).expanduser().resolve())
    cfg.freeze()
    check_weights_files(cfg)
    return cfg


def weights_file(cfg: CN, method: str) -> Path | None:
    """The weights file ``method`` starts from (``PRETRAIN.WEIGHTS``), or None for an arm
    pretrained in the study."""
    name = cfg.PRETRAIN.WEIGHTS.get(method)
    return Path(cfg.PRETRAIN.WEIGHTS_ROOT).expanduser() / name if name else None


def trained_arms(cfg: CN) -> list[str]:
    return [method for method in cfg.STUDY.METHODS if weights_file(cfg, method) is None]


def check_weights_files(cfg: CN) -> None:
    """Every arm's weights file is where the config says (nothing is downloaded)."""
    for method in cfg.PRETRAIN.WEIGHTS:
        path = weights_file(cfg, method)
        if not path.is_file():
            raise StudyConfigError(f"PRETRAIN.WEIGHTS: arm {method!r} starts from {path}, which does not exist "
                                   f"(PRETRAIN.WEIGHTS_ROOT {cfg.PRETRAIN.WEIGHTS_ROOT or '(empty)'}; README: "
                                   "released backbones)")


def check(cfg: CN) -> None:
    methods = list(cfg.STUDY.METHODS)
    if not methods:
        raise StudyConfigError("STUDY.METHODS is empty: name at least one arm")
    if len(set(methods)) != len(methods):
        raise StudyConfigError(f"STUDY.METHODS names an arm twice: {methods}")
    for method in methods:
        if not method or "/" in method or method.startswith("."):
            raise StudyConfigError(f"STUDY.METHODS: {method!r} is not a usable folder name")
    if cfg.STUDY.BASELINE not in methods:
        raise StudyConfigError(f"STUDY.BASELINE {cfg.STUDY.BASELINE!r} is not among STUDY.METHODS {methods}")
    if cfg.STUDY.PAPER and cfg.STUDY.PAPER not in PAPER_TABLES:
        raise StudyConfigError(f"STUDY.PAPER {cfg.STUDY.PAPER!r} is unknown; choose one of "
                               f"{sorted(PAPER_TABLES)} or ''")
    for method, name in cfg.PRETRAIN.WEIGHTS.items():
        if method not in methods:
            raise StudyConfigError(f"PRETRAIN.WEIGHTS names arm {method!r}, which is not among STUDY.METHODS {methods}")
        if not isinstance(name, str) or not name:
            raise StudyConfigError(f"PRETRAIN.WEIGHTS: arm {method!r} needs a file name, got {name!r}")
        if not cfg.PRETRAIN.WEIGHTS_ROOT and not Path(name).is_absolute():
            raise StudyConfigError(f"PRETRAIN.WEIGHTS_ROOT is empty: give the folder that holds the weights files "
                                   f"(arm {method!r}: {name})")
    if "{method}" not in cfg.PRETRAIN.CONFIG and len(trained_arms(cfg)) > 1:
        raise StudyConfigError(f"PRETRAIN.CONFIG {cfg.PRETRAIN.CONFIG!r} has no {{method}}: every arm "
                               "would train the same config")
    for method in methods:
        config = Path(cfg.PRETRAIN.CONFIG.format(method=method))
        if not config.is_file():
            raise StudyConfigError(f"PRETRAIN.CONFIG: {config} (arm {method!r}) does not exist")
    for section in TRANSFERS.values():
        if cfg[section].ENABLED:
            if not Path(cfg[section].CONFIG).is_file():
                raise StudyConfigError(f"{section}.CONFIG: {cfg[section].CONFIG} does not exist")
            if not cfg[section].SEEDS:
                raise StudyConfigError(f"{section}.SEEDS is empty: give one seed per trial, or {section}.ENABLED False")
    if cfg.DETECT.ENGINE not in ENGINES:
        raise StudyConfigError(f"DETECT.ENGINE {cfg.DETECT.ENGINE!r} is unknown; choose one of {ENGINES}")
    for key in ("PRETRAIN.OPTS", "DETECT.OPTS", "COCO.OPTS"):
        section, name = key.split(".")
        if len(cfg[section][name]) % 2:
            raise StudyConfigError(f"{key} must hold KEY VALUE pairs, got {list(cfg[section][name])}")
    for kind in STAGE_KINDS:
        node = cfg.RESOURCES[kind.upper()]
        for name in ("NODES", "CPUS_PER_NODE", "MEM_GB", "TIME_MINUTES"):
            if node[name] < 1:
                raise StudyConfigError(f"RESOURCES.{kind.upper()}.{name} must be at least 1, got {node[name]}")
        if node.GPUS_PER_NODE < 0:
            raise StudyConfigError(f"RESOURCES.{kind.upper()}.GPUS_PER_NODE must be 0 or more, "
                                   f"got {node.GPUS_PER_NODE}")
