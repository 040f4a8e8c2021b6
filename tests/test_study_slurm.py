"""tools/study.py with the SLURM executor, against a real SLURM: they run wherever a controller
answers ``sinfo`` (start one on this machine, as root, with tests/slurm/start_local_cluster.sh and
export the SLURM_CONF it prints), and are skipped otherwise."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from study_runner.config import get_study_cfg
from study_runner.slurm import describe, job_parameters, live_jobs
from study_runner.stages import Stage
from tiny_study import PRETRAIN_OPTS, REPO, explain, make_data, run_study, write_config


def slurm_unavailable() -> str | None:
    if shutil.which("sinfo") is None:
        return "no SLURM here (sinfo is not on PATH; see tests/slurm/start_local_cluster.sh)"
    try:
        answer = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "no SLURM controller answered sinfo within 5 s"
    return None if answer.returncode == 0 else f"sinfo failed: {answer.stderr.strip()}"


needs_slurm = pytest.mark.skipif(slurm_unavailable() is not None, reason=str(slurm_unavailable()))


def test_job_parameters_carry_the_resources_dependencies_and_extra_sbatch_options():
    cfg = get_study_cfg()
    cfg.RESOURCES.DETECT.PARTITION = "gpu"
    cfg.RESOURCES.ACCOUNT = "lab"  # every kind's
    cfg.RESOURCES.QOS = "normal"
    cfg.RESOURCES.DETECT.QOS = "high"  # but its own first
    cfg.RESOURCES.DETECT.SBATCH = ["constraint=a100", "--exclusive"]
    stage = Stage("detect.none.0", "detect", ("python", "tools/train_net.py"), Path("/x"))
    parameters = job_parameters(cfg, stage, ["11", "12"])
    assert parameters["gpus_per_node"] == 8 and parameters["nodes"] == 1 and parameters["time"] == 720
    assert parameters["partition"] == "gpu" and parameters["qos"] == "high" and parameters["account"] == "lab"
    assert parameters["srun_args"] == ["--cpus-per-task=64"]  # the step's CPUs, not inherited from 22.05 to 23.11
    assert describe(parameters).endswith("--constraint=a100 --exclusive --dependency=afterok:11:12 "
                                         "--kill-on-invalid-dep=yes")
    report = Stage("report", "report", ("python", "tools/study.py"), Path("/y"), always=True)
    assert job_parameters(cfg, report, ["3"])["additional_parameters"]["dependency"] == "afterany:3"
    assert "gpus_per_node" not in job_parameters(cfg, report, [])  # CPU-only jobs ask for no GPU
    assert job_parameters(cfg, report, [])["qos"] == "normal" and "partition" not in job_parameters(cfg, report, [])


def test_a_multi_node_stage_gets_the_launchers_machine_flags():
    stage = Stage("pretrain.none", "pretrain", ("python", "tools/pretrain_net.py", "--config-file", "c.yaml",
                                                "--num-gpus", "8", "OUTPUT_DIR", "o"), Path("o/model_final.pth"))
    assert stage.argv(resume=True, machines=(4, 2, "tcp://node0:23456")) == [
        "python", "tools/pretrain_net.py", "--resume", "--num-machines", "4", "--machine-rank", "2",
        "--dist-url", "tcp://node0:23456", "--config-file", "c.yaml", "--num-gpus", "8", "OUTPUT_DIR", "o"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("slurm_data") / "data")


def states(config: Path) -> dict[str, str]:
    status = run_study(config, "--executor", "slurm", "--status")
    assert status.returncode == 0, explain(status)
    found = re.findall(r"^(\S+)\s+(done|running|queued|failed|interrupted|cancelled|pending)\s", status.stdout, re.MULTILINE)
    return {stage: state for stage, state in found if not stage.isdigit()}  # not the "10 done" tally


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@needs_slurm
def test_a_tiny_study_runs_through_slurm_with_exports_in_their_pretrainings_jobs_and_trials_in_arrays(data, tmp_path):
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", DETECT={"SEEDS": [0, 1]})
    submitted = run_study(config, "--executor", "slurm")
    assert submitted.returncode == 0, explain(submitted)
    job_of = dict(re.findall(r"^(\S+): submitted as job (\d+(?:_\d+)?)", submitted.stdout, re.MULTILINE))
    assert len(job_of) == 13 and job_of["export.none"] == job_of["pretrain.none"], submitted.stdout
    trials = [job_of[f"detect.saliencymix.{trial}"] for trial in (0, 1)]
    assert trials[0].split("_")[0] == trials[1].split("_")[0] and trials[0] != trials[1]  # one array, two tasks
    assert len({job.split("_")[0] for job in job_of.values()}) == 9  # 13 stages, 9 sbatch submissions
    queued = states(config)
    assert set(queued.values()) <= {"queued", "running", "done"} and len(queued) == 13, queued

    waited = run_study(config, "--executor", "slurm", "--wait")  # finds every stage queued already
    assert waited.returncode == 0, explain(waited)
    assert "submitted" not in waited.stdout and "already as job" in waited.stdout
    assert set(states(config).values()) == {"done"}
    record = json.loads((tmp_path / "output" / "stages" / "detect.saliencymix.0.json").read_text())
    assert record["executor"] == "slurm" and record["job_id"] and record["exit_status"] == 0
    report = json.loads((tmp_path / "output" / "study_report.json").read_text())
    assert all(row["ours"] is not None for table in report["tables"] for row in table["rows"])


@needs_slurm
def test_arms_started_from_files_run_through_slurm_without_pretraining(data, tmp_path):
    """Each file verified, attacked, exported and fine-tuned in jobs of their own kinds (verify on
    RESOURCES.VERIFY); no pretraining job, no cost job (nothing is trained)."""
    import torchvision

    files = {}
    for seed, method in enumerate(("none", "saliencymix")):
        torch.manual_seed(seed)
        files[method] = f"{method}/resnet50.pth"
        (tmp_path / "released" / method).mkdir(parents=True)
        torch.save(torchvision.models.resnet50(num_classes=5).state_dict(), tmp_path / "released" / files[method])
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output",
                          PRETRAIN={"WEIGHTS_ROOT": str(tmp_path / "released"), "WEIGHTS": files})
    result = run_study(config, "--executor", "slurm", "--wait")
    assert result.returncode == 0, explain(result)
    assert "pretrain." not in result.stdout and "cost:" not in result.stdout
    assert "verify.saliencymix: submitted as job" in result.stdout
    assert states(config) == {
        stage: "done" for method in files for stage in (f"verify.{method}", f"robustness.{method}",
                                                         f"export.{method}", f"detect.{method}.0")} | {
        "compare": "done", "report": "done"}
    record = json.loads((tmp_path / "output" / "stages" / "verify.none.json").read_text())
    assert record["executor"] == "slurm" and record["exit_status"] == 0
    assert record["weights"]["path"] == str(tmp_path / "released" / files["none"]) and len(record["weights"]["sha256"]) == 64
    report = json.loads((tmp_path / "output" / "study_report.json").read_text())
    classification = next(table for table in report["tables"] if table["name"] == "classification")
    assert all(row["ours"] is not None and row["training"] == "not trained here" for row in classification["rows"])


@needs_slurm
def test_a_job_cancelled_with_scancel_is_rerun_by_the_next_invocation(data, tmp_path):
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output",
                          DETECT={"SEEDS": [0]}, ROBUSTNESS={"ENABLED": False})
    submitted = run_study(config, "--executor", "slurm")
    assert submitted.returncode == 0, explain(submitted)
    job = re.search(r"pretrain\.saliencymix: submitted as job (\d+)", submitted.stdout).group(1)
    run = tmp_path / "output" / "pretrain" / "saliencymix"
    wait_until(lambda: (run / "last_checkpoint").exists(), 300, "the first checkpoint")
    subprocess.run(["scancel", job], check=True)
    wait_until(lambda: not set(live_jobs()) & set(re.findall(r"job (\d+)", submitted.stdout)), 300,
               "the study's jobs to leave the queue")
    after = states(config)
    assert after["pretrain.none"] == "done" and after["detect.none.0"] == "done", after
    assert after["pretrain.saliencymix"] in ("interrupted", "failed"), after
    assert after["export.saliencymix"] == "cancelled" and after["compare"] == "cancelled", after

    rerun = run_study(config, "--executor", "slurm", "--wait")
    assert rerun.returncode == 0, explain(rerun)
    assert "pretrain.none: submitted" not in rerun.stdout  # finished stages are not submitted again
    assert "pretrain.saliencymix: submitted as job" in rerun.stdout
    assert "resumed from" in (tmp_path / "output" / "logs" / "pretrain.saliencymix.log").read_text()
    assert set(states(config).values()) == {"done"}


@needs_slurm
def test_a_job_that_reaches_its_time_limit_is_requeued_and_resumes(data, tmp_path):
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", STUDY={"METHODS": ["none"]},
                          DETECT={"ENABLED": False}, ROBUSTNESS={"ENABLED": False}, COST={"ENABLED": False})
    long_run = ["PRETRAIN.OPTS", json.dumps(_long_pretraining())]
    result = run_study(config, "--executor", "slurm", "--wait", "RESOURCES.PRETRAIN.TIME_MINUTES", "1", *long_run,
                       timeout=1200)
    assert result.returncode == 0, explain(result)
    record = json.loads((tmp_path / "output" / "stages" / "pretrain.none.json").read_text())
    assert record["attempts"] >= 2 and record["exit_status"] == 0, record
    log = (tmp_path / "output" / "logs" / "pretrain.none.log").read_text()
    assert "resumed from" in log and (tmp_path / "output" / "pretrain" / "none" / "model_final.pth").is_file()


def _long_pretraining() -> list[str]:
    """The tiny pretraining, long enough (two minutes or more) to outlast a one-minute job."""
    from tiny_study import PRETRAIN_OPTS

    options = dict(zip(PRETRAIN_OPTS[::2], PRETRAIN_OPTS[1::2]))
    options["SOLVER.EPOCHS"] = "100"
    return [item for pair in options.items() for item in pair]


@needs_slurm
def test_pretraining_runs_one_process_per_task_of_an_srun_step(tmp_path):
    data = make_data(tmp_path / "data")
    run = subprocess.run(["srun", "--ntasks", "2", "--cpus-per-task", "1", "--mem-per-cpu", "1024", "--time", "10",
                          sys.executable, str(REPO / "tools/pretrain_net.py"), "--config-file",
                          str(REPO / "configs/demo/pretrain_none.yaml"), "DATA.ROOT", str(data / "classification"),
                          "OUTPUT_DIR", str(tmp_path / "run"), "SOLVER.EPOCHS", "2", "SOLVER.STEP_EPOCHS", "(1,)",
                          "SOLVER.BATCH_SIZE", "10", "DATA.IMAGE_SIZE", "32", "DATA.VAL_RESIZE", "36",
                          "DATA.NUM_WORKERS", "0", "SOLVER.WARMUP_EPOCHS", "0.0"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]["torch"]) == 2


def binds_cores() -> bool:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return bool(re.search(r"^TaskPlugin\s*=.*task/affinity", config, re.MULTILINE))


@needs_slurm
def test_a_stage_job_may_use_the_cpus_it_asks_for_when_the_cluster_binds_tasks_to_cores(tmp_path):
    """Slurm 22.05 to 23.11 do not pass the job's --cpus-per-task on to srun: with task/affinity
    and TaskPluginParam=Cores, the step of a job asking for 2 CPUs runs on 1 unless told."""
    import submitit

    cfg = get_study_cfg()
    cfg.RESOURCES.PRETRAIN.merge_from_list(["CPUS_PER_NODE", 2, "GPUS_PER_NODE", 0, "MEM_GB", 1, "TIME_MINUTES", 5])
    stage = Stage("pretrain.none", "pretrain", ("python",), tmp_path / "done")
    seen = {}
    for name, parameters in (("study", job_parameters(cfg, stage, [])),
                             ("without srun_args", {**job_parameters(cfg, stage, []), "srun_args": []})):
        executor = submitit.SlurmExecutor(folder=tmp_path / name.replace(" ", "_"))
        executor.update_parameters(**parameters)
        seen[name] = len(executor.submit(os.sched_getaffinity, 0).result())  # the CPUs the job's step may use
    assert seen["study"] == 2, seen
    if binds_cores():
        assert seen["without srun_args"] == 1, seen


@needs_slurm
def test_a_submission_sbatch_refuses_ends_in_one_error_line_naming_the_stage(data, tmp_path):
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", STUDY={"METHODS": ["none"]},
                          DETECT={"ENABLED": False}, COST={"ENABLED": False})
    result = run_study(config, "--executor", "slurm", "RESOURCES.ROBUSTNESS.GPUS_PER_NODE", "1")  # no GPU here
    queued = re.findall(r"submitted as job (\d+)", result.stdout)
    subprocess.run(["scancel", *queued], check=False)
    assert result.returncode == 1, explain(result)
    assert "pretrain.none: submitted as job" in result.stdout and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage robustness.none" in errors[0] and "gres" in errors[0].lower(), result.stderr


@needs_slurm
def test_two_invocations_at_once_submit_each_stage_once(data, tmp_path):
    from tiny_study import study_command

    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", DETECT={"SEEDS": [0]})
    invocations = [subprocess.Popen(study_command(config, "--executor", "slurm"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in invocations]
    job_of = {stage: job for stdout, _ in outputs
              for stage, job in re.findall(r"^(\S+): submitted as job (\d+(?:_\d+)?)", stdout, re.MULTILINE)}
    try:
        assert all(process.returncode == 0 for process in invocations), outputs
        submitted = [stage for stdout, _ in outputs
                     for stage in re.findall(r"^(\S+): submitted as job", stdout, re.MULTILINE)]
        assert len(submitted) == len(set(submitted)) and {"pretrain.none", "detect.saliencymix.0", "report"} <= set(submitted)
        assert any("already as job" in stdout for stdout, _ in outputs)

        # a pretraining cancelled before it ran is submitted again, and the report still waiting
        # is submitted again after it (it would otherwise wait on the cancelled job only)
        subprocess.run(["scancel", job_of["pretrain.none"]], check=True)
        wait_until(lambda: job_of["pretrain.none"] not in live_jobs(), 60, "the cancelled job to leave the queue")
        rerun = run_study(config, "--executor", "slurm")
        assert rerun.returncode == 0, explain(rerun)
        job_of.update(re.findall(r"^(\S+): submitted as job (\d+(?:_\d+)?)", rerun.stdout, re.MULTILINE))
        assert re.search(r"^report: cancelled job \d+, to wait on the new jobs", rerun.stdout, re.MULTILINE), rerun.stdout
        assert re.search(r"^pretrain\.none: submitted as job", rerun.stdout, re.MULTILINE)
        assert re.search(r"^report: submitted as job", rerun.stdout, re.MULTILINE)
    finally:
        subprocess.run(["scancel", *job_of.values()], check=False)


@needs_slurm
@pytest.mark.parametrize("how", ["scancel --signal=USR2", "scontrol requeue"])
def test_a_warned_or_preempted_pretraining_saves_requeues_and_ends_as_an_uninterrupted_run(data, tmp_path, how):
    """USR2 (the time-limit or preemption warning) or SIGTERM (a requeue, as PreemptMode=REQUEUE
    preempts): the tool saves at the next iteration, the job is requeued and resumes there."""
    options = dict(zip(PRETRAIN_OPTS[::2], PRETRAIN_OPTS[1::2]))
    options.update({"SOLVER.EPOCHS": "12", "SOLVER.STEP_EPOCHS": "(8,)"})  # 36 iterations
    opts = [item for pair in options.items() for item in pair]
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", STUDY={"METHODS": ["none"]},
                          PRETRAIN={"OPTS": opts}, DETECT={"ENABLED": False}, ROBUSTNESS={"ENABLED": False},
                          COST={"ENABLED": False})
    submitted = run_study(config, "--executor", "slurm")
    assert submitted.returncode == 0, explain(submitted)
    job = re.search(r"pretrain\.none: submitted as job (\d+)", submitted.stdout).group(1)
    run = tmp_path / "output" / "pretrain" / "none"
    wait_until(lambda: (run / "metrics.json").exists() and len((run / "metrics.json").read_text().splitlines()) >= 8,
               300, "eight metrics rows")
    subprocess.run(how.split() + [job], check=True)
    waited = run_study(config, "--executor", "slurm", "--wait", timeout=900)
    assert waited.returncode == 0, explain(waited)

    record = json.loads((tmp_path / "output" / "stages" / "pretrain.none.json").read_text())
    assert record["attempts"] == 2 and record["exit_status"] == 0, record
    log = (tmp_path / "output" / "logs" / "pretrain.none.log").read_text()
    signal_name = "SIGUSR2" if "USR2" in how else "SIGTERM"
    stopped = re.search(rf"stopped at iteration (\d+) on {signal_name}: saved", log)
    resumed = re.search(r"resumed from \S+ at iteration (\d+)", log)
    assert stopped and resumed and stopped.group(1) == resumed.group(1), log[-3000:]  # nothing trained twice
    rows = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    logged = [row["iteration"] for row in rows if "loss" in row]
    assert logged == sorted(set(logged)) and sum(row.get("window_iterations", 0) for row in rows) == 36

    # the stage's command, into another folder, on as many CPUs as the job (CPU numerics depend on
    # the thread count)
    reference = tmp_path / "uninterrupted"
    command = [*record["command"][:-1], str(reference)]
    assert record["command"][-2] == "OUTPUT_DIR"
    uninterrupted = subprocess.run(["srun", "--ntasks", "1", "--cpus-per-task", "1", "--mem", "1024", "--time", "10",
                                    *(part for part in command if part != "--resume")],
                                   capture_output=True, text=True, timeout=900, cwd=REPO)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    actual = torch.load(run / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
