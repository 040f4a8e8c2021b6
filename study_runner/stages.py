"""The study as a list of stages, each one run of a project tool with its normal command line,
in an order where every stage comes after the stages it needs:

    pretrain(arm) -> export(arm) -> detect(arm, trial) ... -> compare
                                 -> coco(arm, trial) ... -> compare.coco   (optional: COCO.ENABLED)
                  -> robustness(arm)
    pretrain(every arm) -> cost;  everything -> report

An arm that starts from a weights file (``PRETRAIN.WEIGHTS``: a released backbone) has no
pretrain stage: its export needs nothing, and with ``PRETRAIN.DATA_ROOT`` its file is evaluated
on the validation set (``verify(arm)``: ``tools/pretrain_net.py --eval-only``) and attacked
with FGSM. Every stage that reads a weights file names it (``Stage.weights``), and its record
keeps the file's sha256.

The study folder holds ``pretrain/<arm>/`` (the run or the file's evaluation, the exported
backbone and the FGSM result), ``detect/<arm>/trial_<k>/`` (VOC), ``coco/<arm>/trial_<k>/`` and
``coco/comparison.*`` (COCO), the comparison and cost files, the study report, ``stages/`` (one
record per stage) and ``logs/`` (one log per stage).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from fvcore.common.config import CfgNode

from detection import records as detection_records
from pretrain.checkpoint import FINAL_NAME
from pretrain.evaluation import EVAL_RESULTS
from study_runner.config import TRANSFERS, trained_arms, weights_file

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
    arm: str | None = None  # the study arm it works for (None: the whole study)
    weights: Path | None = None  # the weights file it reads (its sha256 goes into the stage's record)

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
    """Where tools/eval_robustness.py writes the result for the arm's classifier: beside the
    final weights of a pretraining (the tool's default), in the arm's folder for a file."""
    name = "model_final_" if weights_file(cfg, method) is None else ""
    return pretrain_dir(cfg, method) / f"{name}fgsm_eps{cfg.ROBUSTNESS.EPSILON:g}.json"


def verify_result(cfg: CfgNode, method: str) -> Path:
    """Where ``tools/pretrain_net.py --eval-only`` writes the error of an arm's weights file."""
    return pretrain_dir(cfg, method) / EVAL_RESULTS


def processes_per_node(cfg: CfgNode, kind: str) -> int:
    """A kind's tool processes per node: one per GPU, or one on a node without GPUs."""
    return max(cfg.RESOURCES[kind.upper()].GPUS_PER_NODE, 1)


def data_root_options(cfg: CfgNode) -> list[str]:
    """``DATA.ROOT`` for every pretraining and file evaluation, when the study sets one."""
    return ["DATA.ROOT", cfg.PRETRAIN.DATA_ROOT] if cfg.PRETRAIN.DATA_ROOT else []


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
        return ["--num-gpus", str(processes_per_node(cfg, kind))]

    data_root = data_root_options(cfg)
    epsilon = f"{cfg.ROBUSTNESS.EPSILON:g}"
    for method in methods:
        run = pretrain_dir(cfg, method)
        config = cfg.PRETRAIN.CONFIG.format(method=method)
        from_file = weights_file(cfg, method)
        classifier = from_file or run / FINAL_NAME  # the arm's classifier: its file, or its pretraining's weights
        origin = () if from_file else (f"pretrain.{method}",)
        if not from_file:
            stages.append(Stage(
                f"pretrain.{method}", "pretrain",
                tool("pretrain_net.py", "--config-file", config, *gpus("pretrain"), *data_root, *cfg.PRETRAIN.OPTS,
                     "OUTPUT_DIR", run),
                classifier, run_dir=run, distributed=True, arm=method))
            if cfg.ROBUSTNESS.ENABLED:
                stages.append(Stage(
                    f"robustness.{method}", "robustness",
                    tool("eval_robustness.py", "--config-file", run / "config.yaml", *gpus("robustness"),
                         "--epsilon", epsilon, "MODEL.WEIGHTS", classifier),
                    fgsm_result(cfg, method), needs=origin, distributed=True, arm=method, weights=classifier))
        elif data_root:  # the file on the validation set, with the arm's evaluation transform
            evaluation = (*data_root, *cfg.PRETRAIN.OPTS, "MODEL.WEIGHTS", classifier)
            stages.append(Stage(
                f"verify.{method}", "verify",
                tool("pretrain_net.py", "--config-file", config, "--eval-only", *gpus("verify"), *evaluation,
                     "OUTPUT_DIR", run),
                verify_result(cfg, method), distributed=True, arm=method, weights=classifier))
            if cfg.ROBUSTNESS.ENABLED:
                stages.append(Stage(
                    f"robustness.{method}", "robustness",
                    tool("eval_robustness.py", "--config-file", config, *gpus("robustness"), "--epsilon", epsilon,
                         "--output", fgsm_result(cfg, method), *evaluation),
                    fgsm_result(cfg, method), distributed=True, arm=method, weights=classifier))
        if not transfers:
            continue
        weights = backbone_path(cfg, method, engine)
        export_format = [] if engine == "detectron2" else ["--format", "torchvision"]
        stages.append(Stage(f"export.{method}", "export",
                            tool("convert_to_d2.py", classifier, weights, *export_format),
                            weights, needs=origin, arm=method, weights=classifier))
        for transfer, section in transfers.items():
            on_gpu = cuda and cfg.RESOURCES[transfer.upper()].GPUS_PER_NODE > 0
            for trial, seed in enumerate(cfg[section].SEEDS):
                folder = trial_dir(cfg, method, trial, transfer)
                stages.append(Stage(
                    f"{transfer}.{method}.{trial}", transfer,
                    tool("train_net.py", "--config-file", cfg[section].CONFIG, "--engine", engine, *gpus(transfer),
                         *cfg[section].OPTS, "MODEL.WEIGHTS", weights, "TRANSFER.METHOD", method,
                         "OUTPUT_DIR", folder, "SEED", seed, *([] if on_gpu else ["MODEL.DEVICE", "cpu"])),
                    folder / detection_records.EVAL_RESULTS, needs=(f"export.{method}",), run_dir=folder, distributed=True, arm=method,
                    weights=weights))

    for transfer in transfers:
        folder = comparison_dir(cfg, transfer)
        stages.append(Stage("compare" if transfer == "detect" else f"compare.{transfer}", "report",
                            tool("compare.py", *(output / transfer / m for m in methods),
                                 "--baseline", cfg.STUDY.BASELINE, "--output", folder),
                            folder / "comparison.json",
                            needs=tuple(s.name for s in stages if s.kind == transfer)))
    trained = trained_arms(cfg)
    if cfg.COST.ENABLED and cfg.STUDY.BASELINE in trained:  # the cost is relative to the baseline's training
        stages.append(Stage("cost", "report",
                            tool("cost_report.py", *(pretrain_dir(cfg, m) for m in trained),
                                 "--output", output / "cost.json"),
                            output / "cost.json", needs=tuple(f"pretrain.{m}" for m in trained)))
    stages.append(Stage("report", "report",
                        tool("study.py", "--config-file", output / STUDY_CONFIG, "--report"),
                        output / REPORT_JSON, needs=tuple(s.name for s in stages), always=True))
    return stages
