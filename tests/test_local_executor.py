"""The local executor runs independent stages at once within the machine's budget, each after the
stages it needs, and a study interrupted with two stages running resumes both. The stages are
real processes (tests/stage_tool.py) that work for a few seconds, and save and exit 75 on SIGTERM
as the trainers do."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import stage_tool
from helpers.preemption import RESUME_EXIT_STATUS
from study_runner import records
from study_runner.local import progress
from study_runner.stages import LAST_CHECKPOINT

REPO = Path(__file__).resolve().parents[1]


def plan(tmp_path: Path, cpus: int, cores: dict, stages: list[dict]) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"output": str(tmp_path / "study"), "cpus": cpus, "cores": cores, "stages": stages}))
    return path


def command(plan_file: Path) -> list[str]:
    return [sys.executable, str(REPO / "tests/local_study.py"), str(plan_file)]


def ran(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "study" / name / "done.json").read_text())


def test_the_stand_in_tool_saves_as_the_trainers_do():
    assert (stage_tool.RESUME_EXIT_STATUS, stage_tool.LAST_CHECKPOINT) == (RESUME_EXIT_STATUS, LAST_CHECKPOINT)


def test_independent_stages_overlap_and_a_stage_starts_after_its_needs_end(tmp_path):
    stages = [{"name": "a", "kind": "pretrain", "seconds": 3}, {"name": "b", "kind": "pretrain", "seconds": 3},
              {"name": "c", "kind": "export", "seconds": 0.5, "needs": ["a"]}]
    result = subprocess.run(command(plan(tmp_path, 2, {"pretrain": 1, "export": 1}, stages)), capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    a, b, c = (ran(tmp_path, name) for name in "abc")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # side by side
    assert c["start"] >= a["end"]
    output = tmp_path / "study"
    record = records.read_record(output, "a")
    assert record["resources"] == {"gpus": [], "cpus": 1} and a["threads"] == "1"
    assert records.read_record(output, "b")["started_at"] < records.read_record(output, "a")["ended_at"]
    assert "[1/3] a started on 1 CPU core" in result.stdout and "[3/3] c started" in result.stdout
    assert "study finished: every stage done" in result.stdout


def test_the_stages_running_at_once_never_use_more_cores_than_the_budget(tmp_path):
    stages = [{"name": f"s{i}", "kind": kind, "seconds": 1.5}
              for i, kind in enumerate(["detect", "pretrain", "pretrain", "detect", "pretrain"])]
    result = subprocess.run(command(plan(tmp_path, 3, {"pretrain": 1, "detect": 2}, stages)), capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    spans = [(ran(tmp_path, s["name"]), records.read_record(tmp_path / "study", s["name"])["resources"]["cpus"])
             for s in stages]
    assert sorted(cores for _, cores in spans) == [1, 1, 1, 2, 2]
    for moment in sorted(times["start"] for times, _ in spans):
        in_use = sum(cores for times, cores in spans if times["start"] <= moment < times["end"])
        assert in_use <= 3, (moment, spans)
    assert max(sum(1 for t, _ in spans if t["start"] <= m < t["end"]) for m in (t["start"] for t, _ in spans)) >= 2


def test_a_study_interrupted_with_two_stages_running_resumes_both(tmp_path):
    stages = [{"name": "a", "kind": "pretrain", "seconds": 60}, {"name": "b", "kind": "pretrain", "seconds": 60}]
    plan_file = plan(tmp_path, 2, {"pretrain": 1}, stages)
    runner = subprocess.Popen(command(plan_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO)
    deadline = time.monotonic() + 60
    while not all((tmp_path / "study" / name / "started").exists() for name in "ab"):
        assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read()
        time.sleep(0.05)
    runner.send_signal(signal.SIGINT)  # Ctrl-C
    output = runner.communicate(timeout=60)[0]
    assert runner.returncode != 0, output
    assert "stopping a, b" in output
    for name in "ab":
        record = records.read_record(tmp_path / "study", name)
        assert record["exit_status"] == RESUME_EXIT_STATUS and record["interrupted"] == "SIGTERM", record

    for stage in stages:
        stage["seconds"] = 0.5
    plan_file = plan(tmp_path, 2, {"pretrain": 1}, stages)
    again = subprocess.run(command(plan_file), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[1/2] a (resuming) started" in again.stdout and "[2/2] b (resuming) started" in again.stdout
    for name in "ab":
        assert ran(tmp_path, name)["resumed"]
        assert records.read_record(tmp_path / "study", name)["attempts"] == 2


def test_the_status_line_shows_how_far_each_trainer_is_from_its_log(tmp_path):
    log = tmp_path / "stage.log"
    assert progress(log) is None  # not started yet
    log.write_text("INFO pretrain.engine: epoch 1.08  iteration 100/1488  loss 1.2\n"
                   "INFO pretrain.engine: iteration 186: top-1 error 40.20% on 500 images\n")
    assert progress(log) == "epoch 1.08  iteration 100/1488"  # not the evaluation's line
    with open(log, "a") as stream:
        stream.write("INFO detection: iter 49/150  loss 0.9  lr 0.005\n")  # the torchvision engine
        stream.write("[d2.utils.events]:  eta: 0:00:41  iter: 59  total_loss: 0.8\n")  # Detectron2
    assert progress(log) == "iter: 59"
