"""The SLURM executor, through submitit: a job per stage, with the resources of its kind, but
an arm's export runs at the end of its pretraining's job (a 4-second job would wait in the
queue on the critical path) and the trials of one arm's transfer form one job array. Jobs are
submitted with ``afterok`` dependencies on the jobs of the stages they need, so the whole study
is queued at once (the report waits with ``afterany``); each stage keeps its own record and
log. Jobs whose dependency failed are cancelled by SLURM (``kill-on-invalid-dep``). Submission
holds the study's lock, so two invocations at once queue each stage once.

Stop signals: on SIGUSR2 (the time-limit or preemption warning) submitit calls
``StageJob.checkpoint``, which passes the signal to the tool, waits for it to save and end,
and has the job requeued; on SIGTERM (preemption with ``PreemptMode=REQUEUE``, ``scontrol
requeue``) the tool saves and ends, and SLURM requeues the job itself. Either way the next
attempt resumes from that checkpoint.

Each job runs one task per node; that task starts the tool with ``--num-gpus`` processes and,
across nodes, ``--num-machines / --machine-rank / --dist-url`` from the job's SLURM environment,
the launch that both Detectron2's and our tools already understand. The task's step is given
``--cpus-per-task`` explicitly: from Slurm 22.05 until 23.11 it is not inherited from the job,
and a site that binds tasks to cores would run all the tool's processes on one CPU.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fvcore.common.config import CfgNode

from helpers.distributed import rendezvous_port
from study_runner import execute, records
from study_runner.config import TRANSFERS
from study_runner.lock import hold_lock
from study_runner.stages import Stage

SUBMITIT_FOLDER = "slurm"  # submitit's job files and per-job stdout/stderr, under the study folder
SIGNAL_DELAY_SECONDS = 120  # SLURM warns the job this long before its time limit (at most a quarter of it)
MAX_TIMEOUTS = 1000  # requeues after a time limit (submitit's default, 3, would end a 300-epoch run early)
QUEUE_TIMEOUT_SECONDS = 30
POLL_SECONDS = 10
JOB_PREFIX = "smix"


class SlurmUnavailable(RuntimeError):
    """SLURM's commands are missing or do not answer."""


class SubmissionRefused(RuntimeError):
    """sbatch refused a stage's job; the message names the stage and gives SLURM's reason."""


class StageJob:
    """What one SLURM job runs (submitit pickles it): its stages one after another (an arm's
    pretraining, then its export), on every node of the job. ``save_seconds``: how long the
    tool may take to save on the warning before the job is requeued (within the job's
    ``--signal`` delay). A requeued job skips the stages it has finished."""

    def __init__(self, stages: list[Stage], output: Path, save_seconds: float):
        self.stages = stages
        self.output = output
        self.save_seconds = save_seconds

    def __call__(self) -> int:
        import submitit

        environment = submitit.JobEnvironment()
        signal.signal(signal.SIGTERM, self._pass_on)  # submitit's own handler only logs it
        for stage in self.stages:
            self._run(stage, environment)
        return 0

    def _run(self, stage: Stage, environment) -> None:
        record = records.read_record(self.output, stage.name)
        if not stage.always and stage.done.exists() and record.get("exit_status") == 0:
            print(f"stage {stage.name} is done already ({stage.done}); nothing to run", flush=True)
            return  # a requeue after the tool had finished
        owner = record.get("job_id")
        if record.get("executor") == "slurm" and owner not in (None, environment.job_id) and owner in live_jobs():
            # the job must end FAILED: it and the jobs that need it are a second submission's
            raise RuntimeError(f"stage {stage.name} belongs to job {owner}, still in the queue; job "
                               f"{environment.job_id} leaves its folder alone")
        machines = None
        if environment.num_nodes > 1:
            url = f"tcp://{environment.hostnames[0]}:{rendezvous_port(environment.job_id)}"
            machines = (environment.num_nodes, environment.node, url)
        status = execute.run_stage(stage, self.output, executor="slurm", echo=False, job_id=environment.job_id,
                                   machines=machines)
        if status != 0 or (environment.node == 0 and not stage.done.exists()):
            # the job must end FAILED, so that SLURM cancels the jobs that need this stage (a job
            # being requeued, whose tool saved on SIGTERM, is requeued whatever its exit)
            raise RuntimeError(f"stage {stage.name} failed (exit status {status}); "
                               f"see {records.log_path(self.output, stage.name)}")

    def _pass_on(self, signum, _frame) -> None:
        """SIGTERM (preemption, a requeue, scancel): the tool saves and ends, and so does the job."""
        execute.forward_to_tool(signum)

    def checkpoint(self):
        """Called by submitit on the time-limit or preemption warning (SIGUSR2): the tool
        saves and ends (a trainer does; any other tool may finish meanwhile), then submitit
        requeues the same job, whose next attempt resumes the stage from that checkpoint."""
        import submitit

        execute.forward_to_tool(signal.SIGUSR2, wait_seconds=self.save_seconds)
        return submitit.helpers.DelayedSubmission(self)


@dataclass
class PlannedJob:
    """One sbatch submission: ``stages`` run one after another in one job, or with ``array``
    each in a task of one job array; the resources are the first stage's kind's."""
    stages: list[Stage]
    array: bool = False


def plan_jobs(stages: list[Stage]) -> list[PlannedJob]:
    """The jobs that run ``stages`` (those to submit, in the study's order): an export joins
    the job of the pretraining it needs, the trials of one arm's transfer share a job array."""
    jobs: list[PlannedJob] = []
    pretraining_job: dict[str, PlannedJob] = {}
    trials_job: dict[tuple, PlannedJob] = {}
    for stage in stages:
        if stage.kind == "export" and len(stage.needs) == 1 and stage.needs[0] in pretraining_job:
            pretraining_job[stage.needs[0]].stages.append(stage)
        elif stage.kind in TRANSFERS and (stage.kind, stage.needs) in trials_job:
            trials_job[stage.kind, stage.needs].stages.append(stage)
        else:
            job = PlannedJob([stage], array=stage.kind in TRANSFERS)
            jobs.append(job)
            if stage.kind == "pretrain":
                pretraining_job[stage.name] = job
            if job.array:
                trials_job[stage.kind, stage.needs] = job
    return jobs


def array_job(job_id: str) -> str:
    """The job an array task belongs to (``123`` of ``123_4``): what a dependency names."""
    task = re.fullmatch(r"(\d+)_\d+", job_id)
    return task.group(1) if task else job_id


def job_parameters(cfg: CfgNode, stage: Stage, dependencies: list[str]) -> dict:
    """The sbatch parameters of ``stage``'s job (submitit's names), and the srun options of its
    step (``srun_args``, not an sbatch option)."""
    node = cfg.RESOURCES[stage.kind.upper()]
    extra = {}
    for item in node.SBATCH:
        key, _, value = str(item).partition("=")
        extra[key.strip().lstrip("-")] = value.strip() if value else True
    if dependencies:
        kind = "afterany" if stage.always else "afterok"
        extra["dependency"] = f"{kind}:{':'.join(dict.fromkeys(map(array_job, dependencies)))}"
        extra["kill-on-invalid-dep"] = "yes"
    parameters = {"job_name": f"{JOB_PREFIX}.{stage.name}", "nodes": node.NODES, "ntasks_per_node": 1,
                  "cpus_per_task": node.CPUS_PER_NODE, "mem": f"{node.MEM_GB}GB", "time": node.TIME_MINUTES,
                  "signal_delay_s": min(SIGNAL_DELAY_SECONDS, node.TIME_MINUTES * 15), "additional_parameters": extra,
                  "srun_args": [f"--cpus-per-task={node.CPUS_PER_NODE}"]}
    if node.GPUS_PER_NODE:
        parameters["gpus_per_node"] = node.GPUS_PER_NODE
    for key in ("PARTITION", "ACCOUNT", "QOS"):
        value = node[key] or cfg.RESOURCES[key]  # a kind's own, or what every kind inherits
        if value:
            parameters[key.lower()] = value
    return parameters


def describe(parameters: dict) -> str:
    """The job's parameters as sbatch options (``--nodes=1 --gpus-per-node=8 ...``)."""
    flat = {("signal" if key == "signal_delay_s" else key): (f"USR2@{value}" if key == "signal_delay_s" else value)
            for key, value in parameters.items() if key not in ("additional_parameters", "srun_args")}
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
    try:  # --array: one line per array task, pending ones too
        listing = subprocess.run(["squeue", "--me", "--array", "--noheader", "--format=%i|%T"], capture_output=True,
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
    """Queue every stage that is neither done nor already queued, holding the study's lock (a
    second invocation waits, then finds them queued); returns stage -> job id for the stages
    this study now has in the queue. A report job still waiting is submitted again when
    stages it needs were queued anew. ``SubmissionRefused`` when sbatch refuses a job (the
    jobs already queued stay, and a rerun keeps them)."""
    with hold_lock(output, wait=True):
        queue = live_jobs()
        job_of: dict[str, str] = {}
        to_submit: list[Stage] = []
        for stage in stages:
            record = records.read_record(output, stage.name)
            if not stage.always and stage.done.exists():
                continue
            queued = record.get("executor") == "slurm" and record.get("job_id") in queue
            if queued and not (stage.always and set(stage.needs) & {s.name for s in to_submit}):
                job_of[stage.name] = record["job_id"]
                print(f"{stage.name}: {queue[record['job_id']].lower()} already as job {record['job_id']}", flush=True)
                continue
            if queued:  # the report, waiting on jobs that are gone: it waits on the new ones instead
                subprocess.run(["scancel", record["job_id"]], check=True, timeout=QUEUE_TIMEOUT_SECONDS)
                print(f"{stage.name}: cancelled job {record['job_id']}, to wait on the new jobs", flush=True)
            to_submit.append(stage)
        for job in plan_jobs(to_submit):
            inside = {stage.name for stage in job.stages}
            needs = dict.fromkeys(need for stage in job.stages for need in stage.needs if need not in inside)
            job_of.update(submit_job(cfg, job, output, [job_of[need] for need in needs if need in job_of]))
    return job_of


def submit_job(cfg: CfgNode, job: PlannedJob, output: Path, dependencies: list[str]) -> dict[str, str]:
    """One planned job (an array: one task per stage), each stage recorded; stage -> job id."""
    import submitit
    from submitit.core.utils import FailedJobError

    first = job.stages[0]
    parameters = job_parameters(cfg, first, dependencies)
    executor = submitit.SlurmExecutor(folder=output / SUBMITIT_FOLDER, max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(**parameters)
    save_seconds = parameters["signal_delay_s"] * 3 / 4  # the requeue must come before the time limit
    runs = [[stage] for stage in job.stages] if job.array else [job.stages]
    try:
        if job.array:
            with executor.batch():
                submitted = [executor.submit(StageJob(run, output, save_seconds)) for run in runs]
        else:
            submitted = [executor.submit(StageJob(runs[0], output, save_seconds))]
    except FailedJobError as error:
        reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or "no reason given"
        raise SubmissionRefused(f"sbatch refused the job of stage {first.name} ({describe(parameters)}): "
                                f"{reason}") from None
    job_of = {}
    after = f" after {', '.join(dict.fromkeys(map(array_job, dependencies)))}" if dependencies else ""
    for run, submission in zip(runs, submitted):
        for index, stage in enumerate(run):
            records.update_record(output, stage.name, kind=stage.kind, executor="slurm", job_id=submission.job_id,
                                  submitted_at=records.now(), command=stage.argv(stage.resumable_now()),
                                  log=str(records.log_path(output, stage.name)))
            job_of[stage.name] = submission.job_id
            place = f", after {run[index - 1].name} in the same job" if index else after
            print(f"{stage.name}: submitted as job {submission.job_id}{place}", flush=True)
    return job_of


def wait_for(job_ids: list[str], poll_seconds: float = POLL_SECONDS) -> None:
    """Until none of ``job_ids`` is in the queue any more."""
    waiting = set(job_ids)
    while waiting:
        waiting &= set(live_jobs())
        if waiting:
            time.sleep(poll_seconds)
