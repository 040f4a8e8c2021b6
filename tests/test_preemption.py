"""SLURM's stop signals, sent as SLURM sends them (to every process of the tool), end each trainer
with a checkpoint at the next iteration and exit status 75; the resumed run ends where an
uninterrupted one does and logs every iteration once. The same on a real cluster:
tests/test_study_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from helpers.metrics_file import drop_records_after
from helpers.preemption import RESUME_EXIT_STATUS
from pretrain import checkpoint as ckpt
from pretrain.export import convert
from test_pretrain import cli_overrides, imagenet  # noqa: F401  (a fixture)
from test_train_net import TINY
from voc_tree import write_voc_tree

REPO = Path(__file__).resolve().parents[1]
STOP_SIGNALS = [signal.SIGUSR2, signal.SIGTERM]


def records(output: Path) -> list[dict]:
    path = output / "metrics.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_tool(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def signalled_run(command: list[str], output: Path, signum: int, after_records: int) -> tuple[int, str, int]:
    """Run ``command`` and, once ``metrics.json`` holds ``after_records`` rows, send ``signum`` to
    every process of it (its process group, as SLURM signals a job step). Its exit status, its
    output, and the iteration of the last row logged before the signal."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while len(records(output)) < after_records:
        assert process.poll() is None, process.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "the run logged too few rows"
        time.sleep(0.05)
    logged = records(output)[-1]["iteration"]
    os.killpg(process.pid, signum)
    text, _ = process.communicate(timeout=300)
    return process.returncode, text, logged


def assert_logged_once(rows: list[dict]) -> None:
    training = [row["iteration"] for row in rows if "loss" in row or "total_loss" in row]
    assert training == sorted(set(training)), training


def test_a_resumed_run_forgets_what_an_earlier_attempt_logged_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("".join(json.dumps({"iteration": i, "loss": 1.0}) + "\n" for i in (1, 2, 3, 4))
                    + '{"iteration": 5, "lo')  # a write the kill interrupted
    assert drop_records_after(path, 2) == 3
    with open(path, "a") as stream:  # a writer opened before the cut goes on at the new end
        stream.write(json.dumps({"iteration": 3, "loss": 2.0}) + "\n")
    assert [row["iteration"] for row in records(tmp_path)] == [1, 2, 3]
    assert drop_records_after(path, 10) == 0 and drop_records_after(tmp_path / "none.json", 0) == 0


@pytest.fixture(scope="module")
def uninterrupted_pretraining(imagenet, tmp_path_factory) -> Path:  # noqa: F811
    output = tmp_path_factory.mktemp("uninterrupted")
    run = run_tool(pretraining_command(imagenet, output))
    assert run.returncode == 0, run.stderr[-3000:]
    return output


def pretraining_command(root: Path, output: Path, *extra: str) -> list[str]:
    """Two processes (gloo) with two loader workers each, 4 iterations per epoch, 4 epochs."""
    return [sys.executable, str(REPO / "tools/pretrain_net.py"), *extra, "--config-file",
            str(REPO / "configs/pretrain/r50_saliencymix.yaml"), "--num-gpus", "2", *cli_overrides(root, output),
            "SOLVER.EPOCHS", "4", "SOLVER.STEP_EPOCHS", "(3,)", "LOG_PERIOD", "1", "DATA.NUM_WORKERS", "2",
            "CHECKPOINT.PERIOD", "0", "CHECKPOINT.EPOCH_END", "False", "TEST.EVAL_PERIOD", "2"]


def test_pretraining_saves_on_each_stop_signal_and_resumes_to_the_same_weights_and_metrics(
        imagenet, uninterrupted_pretraining, tmp_path):  # noqa: F811
    """Stopped by SIGUSR2, resumed, stopped again by SIGTERM, resumed to the end."""
    saved = 0
    for signum, after_records in zip(STOP_SIGNALS, (5, 10)):
        extra = ("--resume",) if saved else ()
        status, text, logged = signalled_run(pretraining_command(imagenet, tmp_path, *extra), tmp_path, signum,
                                             after_records)
        assert status == RESUME_EXIT_STATUS, text[-4000:]
        previous, saved = saved, ckpt.load(ckpt.Checkpointer(tmp_path, 1).last())["iteration"]
        assert f"on {signum.name}: saved" in text and previous < saved < 16
        assert saved <= logged + 2  # the agreement between processes lags one iteration: none is trained twice
        assert records(tmp_path)[-1]["iteration"] == saved  # the iterations since the last row are logged too

    resumed = run_tool(pretraining_command(imagenet, tmp_path, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = ckpt.load(uninterrupted_pretraining / ckpt.FINAL_NAME)["model"]
    actual = ckpt.load(tmp_path / ckpt.FINAL_NAME)["model"]
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    rows, reference = records(tmp_path), records(uninterrupted_pretraining)
    assert_logged_once(rows)
    evaluations = [(row["iteration"], row["top1_error"]) for row in rows if "top1_error" in row]
    assert evaluations == [(row["iteration"], row["top1_error"]) for row in reference if "top1_error" in row]
    assert sum(row.get("window_iterations", 0) for row in rows) == 16  # the cost report's count


@pytest.fixture(scope="module")
def transfer(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("transfer")
    checkpoint = folder / "model_final.pth"
    torch.save({"model": torchvision.models.resnet50().state_dict()}, checkpoint)
    convert(checkpoint, folder / "backbone.pkl")
    convert(checkpoint, folder / "backbone.pth", fmt="torchvision")
    return {"voc": write_voc_tree(folder / "voc"), "detectron2": folder / "backbone.pkl",
            "torchvision": folder / "backbone.pth"}


def fine_tuning_command(transfer: dict, engine: str, output: Path, *extra: str) -> list[str]:
    options = list(TINY)
    options[1] = str(transfer["voc"])
    options += ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "OUTPUT_DIR", str(output),
                "MODEL.WEIGHTS", str(transfer[engine])]
    return [sys.executable, str(REPO / "tools/train_net.py"), *extra, "--engine", engine, "--config-file",
            str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml"), *options]


@pytest.mark.parametrize("engine", ["torchvision", "detectron2"])
def test_fine_tuning_saves_on_a_stop_signal_and_resumes_from_there(transfer, tmp_path, engine):
    if engine == "detectron2":
        pytest.importorskip("detectron2")
    process = subprocess.Popen(fine_tuning_command(transfer, engine, tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    lines = []
    for line in process.stdout:  # the trainer is set up (and listening) once it has counted its CPUs
        lines.append(line)
        if "may run on" in line:
            os.killpg(process.pid, signal.SIGUSR2)
            break
    text = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == RESUME_EXIT_STATUS, text[-4000:]
    assert "on SIGUSR2: saved" in text
    assert not (tmp_path / "model_final.pth").exists()

    resumed = run_tool(fine_tuning_command(transfer, engine, tmp_path, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    saved = (tmp_path / "last_checkpoint").read_text().strip()
    assert saved == "model_final.pth" and "resum" in (resumed.stdout + resumed.stderr).lower()
    assert (tmp_path / "eval_results.json").is_file()
    assert_logged_once(records(tmp_path))
