"""What the stages will read, checked before any stage runs or any job is queued, as each tool
checks it at its own start: every arm's pretraining config with its data folders, and every
transfer's config with its datasets. On a cluster a mistake found by the tool would surface
hours later, after the jobs before it had run."""
from __future__ import annotations

from fvcore.common.config import CfgNode

from detection.config import get_detection_cfg
from detection.run_checks import check_run
from pretrain.cli import UsageError, merge_config
from pretrain.config import get_cfg
from pretrain.validate import check_pretrain_cfg
from study_runner.config import TRANSFERS, StudyConfigError, weights_file
from study_runner.stages import data_root_options, detection_engine, processes_per_node


def processes(cfg: CfgNode, kind: str) -> int:
    """The processes a kind's tool will run, over all its nodes (what batches are shared by)."""
    return cfg.RESOURCES[kind.upper()].NODES * processes_per_node(cfg, kind)


def check_inputs(cfg: CfgNode) -> None:
    """``StudyConfigError`` naming the stage and what it could not use."""
    data_root = data_root_options(cfg)
    for method in cfg.STUDY.METHODS:
        from_file = weights_file(cfg, method) is not None
        if from_file and not data_root:
            continue  # no verify stage: the file is only exported
        stage, kind = (f"verify.{method}", "verify") if from_file else (f"pretrain.{method}", "pretrain")
        config = cfg.PRETRAIN.CONFIG.format(method=method)
        try:
            pretraining = merge_config(get_cfg(), config, [*data_root, *cfg.PRETRAIN.OPTS])
            check_pretrain_cfg(pretraining, train=not from_file, world_size=processes(cfg, kind))
        except UsageError as error:
            raise StudyConfigError(f"stage {stage} ({config}): {error}") from None
    for transfer, section in TRANSFERS.items():
        if not cfg[section].ENABLED:
            continue
        try:
            engine = detection_engine(cfg)
            detection = merge_config(get_detection_cfg(engine), cfg[section].CONFIG, list(cfg[section].OPTS))
            check_run(detection, processes(cfg, transfer), engine)
        except UsageError as error:
            raise StudyConfigError(f"the {transfer} stages ({cfg[section].CONFIG}): {error}") from None
