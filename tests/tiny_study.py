"""A tiny study on the built-in data (seconds per stage), for the study runner's tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tool_process import run_tool

REPO = Path(__file__).resolve().parents[1]

# Checkpoints at the end of each epoch only (every 3 iterations here): a ResNet-50 checkpoint after
# every iteration doubled the time of a tiny pretraining (15.9 s against 8.2 s).
PRETRAIN_OPTS = ["DATA.IMAGE_SIZE", "32", "DATA.VAL_RESIZE", "36", "SOLVER.EPOCHS", "4", "SOLVER.STEP_EPOCHS", "(2, 3)",
                 "SOLVER.BATCH_SIZE", "10", "SOLVER.WARMUP_EPOCHS", "0.0", "DATA.NUM_WORKERS", "0", "LOG_PERIOD", "1",
                 "CHECKPOINT.EPOCH_END", "True"]
DETECT_OPTS = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
               "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
               "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0"]
# Small enough for a one-node test cluster of 2 CPUs.
SMALL_JOBS = {kind: {"CPUS_PER_NODE": 1, "MEM_GB": 1, "TIME_MINUTES": 10, "GPUS_PER_NODE": 0}
              for kind in ("PRETRAIN", "VERIFY", "EXPORT", "ROBUSTNESS", "DETECT", "REPORT")}


def make_data(folder: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools/make_demo_data.py"), "--output", str(folder),
                    "--train-per-class", "6", "--val-per-class", "2", "--detection-train", "8", "--detection-test",
                    "4", "--classification-size", "32", "--detection-size", "64"], check=True, capture_output=True)
    return folder


def write_config(path: Path, data: Path, output: Path, engine: str = "torchvision", **sections) -> Path:
    """A study config over configs/study/demo.yaml at tiny scale; ``sections`` override it."""
    config = {"_BASE_": str(REPO / "configs/study/demo.yaml"), "OUTPUT_DIR": str(output),
              "PRETRAIN": {"DATA_ROOT": str(data / "classification"), "OPTS": PRETRAIN_OPTS},
              "DETECT": {"ENGINE": engine, "OPTS": ["TRANSFER.VOC_ROOT", str(data / "detection"), *DETECT_OPTS]},
              "RESOURCES": SMALL_JOBS}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(config))
    return path


def study_command(config: Path, *arguments: str) -> list[str]:
    return [sys.executable, str(REPO / "tools/study.py"), "--config-file", str(config), *arguments]


def run_study(config: Path, *arguments: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_tool("tools/study.py", "--config-file", config, *arguments, timeout=timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
