"""The SLURM executor, through submitit: one job per stage, with the resources of its kind,
submitted with ``afterok`` dependencies on the jobs of the stages it needs, so the whole study
is queued at once (the report waits with ``afterany``). Jobs whose dependency failed are
cancelled by SLURM (``kill-on-invalid-dep``). A job warned of its time limit or of preemption
is requeued by submitit and its stage resumes from the last checkpoint.

Each job runs one task per node; that task starts the tool with ``--num-gpus`` processes and,
across nodes, ``--num-machines / --machine-rank / --dist-url`` from the job's SLURM environment,
the launch that both Detectron2's and our tools already understand.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from fvcore.common.config import CfgNode

from pretrain.distributed import rendezvous_port
from study_runner import records
from study_runner.execute import run_stage
from study_runner.stages import Stage

SUBMITIT_FOLDER = "slurm"  # submitit's job files and per-job stdout/stderr, under the study folder
SIGNAL_DELAY_SECONDS = 120  # SLURM warns the job this long before its time limit (at most a quarter of it)
MAX_TIMEOUTS = 1000  # requeues after a time limit (submitit's default, 3, would end a 300-epoch run early)
QUEUE_TIMEOUT_SECONDS = 30
POLL_SECONDS = 10
JOB_PREFIX = "smix"


class SlurmUnavailable(RuntimeError):
    """SLURM's commands are missing or do not answer."""


class StageJob:
    """What one SLURM job runs (submitit pickles it): the stage, on every node of the job."""

    def __init__(self, stage: Stage, output: Path):
        self.stage = stage
        self.output = output

    def __call__(self) -> int:
        import submitit

        environment = submitit.JobEnvironment()
        machines = None
        if environment.num_nodes > 1:
            url = f"tcp://{environment.hostnames[0]}:{rendezvous_port(environment.job_id)}"
            machines = (environment.num_nodes, environment.node, url)
        status = run_stage(self.stage, self.output, executor="slurm", echo=False, job_id=environment.job_id,
                           machines=machines)
        if status != 0 or (environment.node == 0 and not self.stage.done.exists()):
            # the job must end FAILED, so that SLURM cancels the jobs that need this stage
            raise RuntimeError(f"stage {self.stage.name} failed (exit status {status}); "
                               f"see {records.log_path(self.output, self.stage.name)}")
        return status

    def checkpoint(self):
        """Called by submitit on the time-limit or preemption warning: requeue the same job;
        its next run resumes the stage from the tool's last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def job_parameters(cfg: CfgNode, stage: Stage, dependencies: list[str]) -> dict:
    """The sbatch parameters of ``stage``'s job (submitit's names)."""
    node = cfg.RESOURCES[stage.kind.upper()]
    extra = {}
    for item in node.SBATCH:
        key, _, value = str(item).partition("=")
        extra[key.strip().lstrip("-")] = value.strip() if value else True
    if dependencies:
        kind = "afterany" if stage.always else "afterok"
        extra["dependency"] = f"{kind}:{':'.join(dependencies)}"
        extra["kill-on-invalid-dep"] = "yes"
    parameters = {"job_name": f"{JOB_PREFIX}.{stage.name}", "nodes": node.NODES, "ntasks_per_node": 1,
                  "cpus_per_task": node.CPUS_PER_NODE, "mem": f"{node.MEM_GB}GB", "time": node.TIME_MINUTES,
                  "signal_delay_s": min(SIGNAL_DELAY_SECONDS, node.TIME_MINUTES * 15), "additional_parameters": extra}
    if node.GPUS_PER_NODE:
        parameters["gpus_per_node"] = node.GPUS_PER_NODE
    for key in ("PARTITION", "ACCOUNT", "QOS"):
        if node[key]:
            parameters[key.lower()] = node[key]
    return parameters


def describe(parameters: dict) -> str:
    """The job's parameters as sbatch options (``--nodes=1 --gpus-per-node=8 ...``)."""
    flat = {("signal" if key == "signal_delay_s" else key): (f"USR2@{value}" if key == "signal_delay_s" else value)
            for key, value in parameters.items() if key != "additional_parameters"}
    flat.update(parameters.get("additional_parameters", {}))
    return " ".join(f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}")
                    for key, value in flat.items())


def require_slurm() -> None:
    for command in ("sbatch", "squeue", "scontrol"):
        if shutil.which(command) is None:
            raise SlurmUnavailable(f"the SLURM command {command!r} is not on PATH: run on a login node of "
                                   "the cluster, or use --executor local")


def live_jobs() -> dict[str, str]:
    """This user's jobs in the queue: job id -> state (PENDING, RUNNING, ...)."""
    require_slurm()
    try:
        listing = subprocess.run(["squeue", "--me", "--noheader", "--format=%i|%T"], capture_output=True,
                                 text=True, timeout=QUEUE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"squeue did not answer within {QUEUE_TIMEOUT_SECONDS} s") from None
    if listing.returncode != 0:
        raise SlurmUnavailable(f"squeue failed: {listing.stderr.strip()}")
    jobs = {}
    for line in listing.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        jobs[job] = state
    return jobs


def submit_study(cfg: CfgNode, stages: list[Stage], output: Path) -> dict[str, str]:
    """Queue every stage that is neither done nor already queued; returns stage -> job id for
    the stages this study now has in the queue."""
    import submitit

    queue = live_jobs()
    job_of: dict[str, str] = {}
    for stage in stages:
        record = records.read_record(output, stage.name)
        if not stage.always and stage.done.exists():
            continue
        if record.get("executor") == "slurm" and record.get("job_id") in queue:
            job_of[stage.name] = record["job_id"]
            print(f"{stage.name}: {queue[record['job_id']].lower()} already as job {record['job_id']}", flush=True)
            continue
        dependencies = [job_of[need] for need in stage.needs if need in job_of]
        executor = submitit.SlurmExecutor(folder=output / SUBMITIT_FOLDER, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(**job_parameters(cfg, stage, dependencies))
        job = executor.submit(StageJob(stage, output))
        job_of[stage.name] = job.job_id
        records.update_record(output, stage.name, kind=stage.kind, executor="slurm", job_id=job.job_id,
                              submitted_at=records.now(), command=stage.argv(stage.resumable_now()),
                              log=str(records.log_path(output, stage.name)))
        after = f" after {', '.join(dependencies)}" if dependencies else ""
        print(f"{stage.name}: submitted as job {job.job_id}{after}", flush=True)
    return job_of


def wait_for(job_ids: list[str], poll_seconds: float = POLL_SECONDS) -> None:
    """Until none of ``job_ids`` is in the queue any more."""
    waiting = set(job_ids)
    while waiting:
        waiting &= set(live_jobs())
        if waiting:
            time.sleep(poll_seconds)
