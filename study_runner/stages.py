"""The study as a list of stages, each one run of a project tool with its normal command line,
in an order where every stage comes after the stages it needs:

    pretrain(arm) -> export(arm) -> detect(arm, trial) ... -> compare
                                 -> coco(arm, trial) ... -> compare.coco   (optional: COCO.ENABLED)
                  -> robustness(arm)
    pretrain(every arm) -> cost;  everything -> report

The study folder holds ``pretrain/<arm>/`` (the run, its exported backbone and FGSM result),
``detect/<arm>/trial_<k>/`` (VOC), ``coco/<arm>/trial_<k>/`` and ``coco/comparison.*`` (COCO),
the comparison and cost files, the study report, ``stages/`` (one record per stage) and
``logs/`` (one log per stage).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from fvcore.common.config import CfgNode

from study_runner.config import TRANSFERS

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
LAST_CHECKPOINT = "last_checkpoint"  # the pointer file both the pretraining and detection tools keep
STUDY_CONFIG = "study_config.yaml"  # the merged config, written into the study folder for the report stage
REPORT_JSON = "study_report.json"


@dataclass(frozen=True)
class Stage:
    name: str  # unique, also the stem of its record and log files
    kind: str  # one of study.config.STAGE_KINDS: picks its resources
    command: tuple[str, ...]
    done: Path  # the file the tool writes last: present means finished
    needs: tuple[str, ...] = ()
    run_dir: Path | None = None  # resumable: continue from its last checkpoint with --resume
    distributed: bool = False  # the tool takes --num-gpus / --num-machines / --machine-rank / --dist-url
    always: bool = False  # runs in every invocation once its needs have ended, whatever their outcome

    def resumable_now(self) -> bool:
        return self.run_dir is not None and (self.run_dir / LAST_CHECKPOINT).exists()

    def argv(self, resume: bool = False, machines: tuple[int, int, str] | None = None) -> list[str]:
        """The command to run: with ``--resume`` when asked, and with ``machines`` (count, this
        machine's rank, the rendezvous URL) for a multi-node run."""
        script, tool, *rest = self.command
        extra = ["--resume"] if resume else []
        if machines:
            count, rank, url = machines
            extra += ["--num-machines", str(count), "--machine-rank", str(rank), "--dist-url", url]
        return [script, tool, *extra, *rest]


def tool(name: str, *arguments) -> tuple[str, ...]:
    return (sys.executable, str(TOOLS / name), *map(str, arguments))


def detection_engine(cfg: CfgNode) -> str:
    if cfg.DETECT.ENGINE != "auto":
        return cfg.DETECT.ENGINE
    return "detectron2" if importlib.util.find_spec("detectron2") else "torchvision"


def pretrain_dir(cfg: CfgNode, method: str) -> Path:
    return Path(cfg.OUTPUT_DIR) / "pretrain" / method


def trial_dir(cfg: CfgNode, method: str, trial: int, transfer: str = "detect") -> Path:
    """A fine-tuning's run folder; ``transfer``: one of ``TRANSFERS`` (VOC's detect, coco)."""
    return Path(cfg.OUTPUT_DIR) / transfer / method / f"trial_{trial}"


def comparison_dir(cfg: CfgNode, transfer: str) -> Path:
    """Where a transfer's ``tools/compare.py`` report goes: VOC's in the study folder, COCO's in ``coco/``."""
    output = Path(cfg.OUTPUT_DIR)
    return output if transfer == "detect" else output / transfer


def backbone_path(cfg: CfgNode, method: str, engine: str) -> Path:
    return pretrain_dir(cfg, method) / ("backbone.pkl" if engine == "detectron2" else "backbone.pth")


def fgsm_result(cfg: CfgNode, method: str) -> Path:
    """Where tools/eval_robustness.py writes the result for the final weights."""
    return pretrain_dir(cfg, method) / f"model_final_fgsm_eps{cfg.ROBUSTNESS.EPSILON:g}.json"


def build_stages(cfg: CfgNode, cuda: bool) -> list[Stage]:
    """Every stage of the study in a runnable order. ``cuda``: whether the stages will find GPUs
    where their kind asks for some (``RESOURCES.<KIND>.GPUS_PER_NODE``); the detection tools are
    told to use the CPU otherwise."""
    output = Path(cfg.OUTPUT_DIR)
    engine = detection_engine(cfg)
    methods = list(cfg.STUDY.METHODS)
    transfers = {transfer: section for transfer, section in TRANSFERS.items() if cfg[section].ENABLED}
    stages: list[Stage] = []

    def gpus(kind: str) -> list[str]:
        return ["--num-gpus", str(max(cfg.RESOURCES[kind.upper()].GPUS_PER_NODE, 1))]

    for method in methods:
        run = pretrain_dir(cfg, method)
        data_root = ["DATA.ROOT", cfg.PRETRAIN.DATA_ROOT] if cfg.PRETRAIN.DATA_ROOT else []
        stages.append(Stage(
            f"pretrain.{method}", "pretrain",
            tool("pretrain_net.py", "--config-file", cfg.PRETRAIN.CONFIG.format(method=method), *gpus("pretrain"),
                 *data_root, *cfg.PRETRAIN.OPTS, "OUTPUT_DIR", run),
            run / "model_final.pth", run_dir=run, distributed=True))
        if cfg.ROBUSTNESS.ENABLED:
            stages.append(Stage(
                f"robustness.{method}", "robustness",
                tool("eval_robustness.py", "--config-file", run / "config.yaml", *gpus("robustness"),
                     "--epsilon", f"{cfg.ROBUSTNESS.EPSILON:g}", "MODEL.WEIGHTS", run / "model_final.pth"),
                fgsm_result(cfg, method), needs=(f"pretrain.{method}",), distributed=True))
        if not transfers:
            continue
        weights = backbone_path(cfg, method, engine)
        export_format = [] if engine == "detectron2" else ["--format", "torchvision"]
        stages.append(Stage(f"export.{method}", "export",
                            tool("convert_to_d2.py", run / "model_final.pth", weights, *export_format),
                            weights, needs=(f"pretrain.{method}",)))
        for transfer, section in transfers.items():
            on_gpu = cuda and cfg.RESOURCES[transfer.upper()].GPUS_PER_NODE > 0
            for trial, seed in enumerate(cfg[section].SEEDS):
                folder = trial_dir(cfg, method, trial, transfer)
                stages.append(Stage(
                    f"{transfer}.{method}.{trial}", transfer,
                    tool("train_net.py", "--config-file", cfg[section].CONFIG, "--engine", engine, *gpus(transfer),
                         *cfg[section].OPTS, "MODEL.WEIGHTS", weights, "TRANSFER.METHOD", method,
                         "OUTPUT_DIR", folder, "SEED", seed, *([] if on_gpu else ["MODEL.DEVICE", "cpu"])),
                    folder / "eval_results.json", needs=(f"export.{method}",), run_dir=folder, distributed=True))

    for transfer in transfers:
        folder = comparison_dir(cfg, transfer)
        stages.append(Stage("compare" if transfer == "detect" else f"compare.{transfer}", "report",
                            tool("compare.py", *(output / transfer / m for m in methods),
                                 "--baseline", cfg.STUDY.BASELINE, "--output", folder),
                            folder / "comparison.json",
                            needs=tuple(s.name for s in stages if s.kind == transfer)))
    if cfg.COST.ENABLED:
        stages.append(Stage("cost", "report",
                            tool("cost_report.py", *(pretrain_dir(cfg, m) for m in methods),
                                 "--output", output / "cost.json"),
                            output / "cost.json", needs=tuple(f"pretrain.{m}" for m in methods)))
    stages.append(Stage("report", "report",
                        tool("study.py", "--config-file", output / STUDY_CONFIG, "--report"),
                        output / REPORT_JSON, needs=tuple(s.name for s in stages), always=True))
    return stages
