#!/usr/bin/env python
"""The whole study in one command: pretrain every arm, export each backbone, fine-tune each on
VOC (and, with COCO.ENABLED, on COCO) for every seed, attack each classifier with FGSM, compare
the detectors, time the training, and write one report that sets every figure beside the paper's.

    python tools/study.py --config-file configs/study/paper_r50_voc.yaml --executor slurm
    python tools/study.py --config-file configs/study/paper_r50_voc.yaml --dry-run     # stages, commands, jobs
    python tools/study.py --config-file configs/study/paper_r50_voc.yaml --status      # where each stage stands
    python tools/study.py --config-file configs/study/demo.yaml                         # what `make demo` runs
    python tools/study.py --config-file configs/study/released_r50_voc.yaml \
        PRETRAIN.WEIGHTS_ROOT /data/released PRETRAIN.DATA_ROOT /data/imagenet       # from the authors' files

Each stage runs a project tool with its normal command line (at the top of its log, and in
``--dry-run``: any stage can be rerun by hand). Arms listed under PRETRAIN.WEIGHTS start from a weights file instead of a
pretraining. Run again, the study skips finished stages, resumes interrupted ones from their
last checkpoint and retries failed ones. ``--executor local`` runs them here, independent stages at
once as the machine's GPUs and cores allow (``RESOURCES.<KIND>``, ``--gpus``, ``--cpus``);
``--executor slurm`` queues a job per stage (an export in its pretraining's job, an arm's trials in one job
array) with dependencies and returns (``--wait`` waits).
Trailing ``KEY VALUE`` pairs override the study config (``DETECT.SEEDS "[0, 1]"``).
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from study_runner import records
from study_runner.config import STAGE_KINDS, TRANSFERS, StudyConfigError, load_study_cfg
from study_runner.local import Budget, check_budget, run_local
from study_runner.lock import StudyBusy
from study_runner.preflight import check_inputs
from study_runner.report import REPORT_MARKDOWN, format_markdown, write_report
from study_runner.slurm import (
    SlurmUnavailable,
    SubmissionRefused,
    array_job,
    describe,
    job_parameters,
    live_jobs,
    plan_jobs,
    submit_study,
    wait_for,
)
from study_runner.stages import STUDY_CONFIG, build_stages, detection_engine
from study_runner.status import format_status, status_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a study config (configs/study/)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="local: on this machine, independent stages at once within --gpus/--cpus (default); "
                             "slurm: jobs with dependencies")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the stages, their commands and jobs; run nothing")
    action.add_argument("--status", action="store_true",
                        help="print where every stage stands and write the report of what is done so far")
    action.add_argument("--report", action="store_true", help="only write the study report (the last stage)")
    parser.add_argument("--wait", action="store_true", help="slurm: wait until the study's jobs have left the queue")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="local: the GPUs the study may use at once (default: all this machine has)")
    parser.add_argument("--cpus", type=int, metavar="N",
                        help="local: the CPU cores the study may use at once (default: all this process may use)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the study config")
    return parser.parse_args(argv)


def check_executor(cfg, executor: str, dry_run: bool) -> None:
    if executor == "local":
        for kind in STAGE_KINDS:
            nodes = cfg.RESOURCES[kind.upper()].NODES
            if nodes > 1:
                raise StudyConfigError(f"RESOURCES.{kind.upper()}.NODES is {nodes}, but the local executor runs "
                                       "on this machine only: use --executor slurm, or set it to 1")
    if (not dry_run and transfers_enabled(cfg) and detection_engine(cfg) == "detectron2"
            and importlib.util.find_spec("detectron2") is None):
        raise StudyConfigError("DETECT.ENGINE is detectron2, but Detectron2 is not installed (README: "
                               "Detectron2); or set DETECT.ENGINE torchvision")


def transfers_enabled(cfg) -> bool:
    return any(cfg[section].ENABLED for section in TRANSFERS.values())


def stages_for(cfg, executor: str, budget: Budget | None):
    """The stages, told whether they will find GPUs: here (local: in the budget), or on the
    nodes (slurm: where their kind's resources ask for some)."""
    return build_stages(cfg, cuda=executor == "slurm" or bool(budget and budget.gpus))


def dry_run(cfg, stages, executor: str) -> None:
    print(f"study {cfg.OUTPUT_DIR}: {len(stages)} stages, executor {executor}, "
          f"detection engine {detection_engine(cfg) if transfers_enabled(cfg) else '-'}")
    for index, stage in enumerate(stages, 1):
        needs = f" (after {', '.join(stage.needs)})" if stage.needs else ""
        state = "done" if stage.done.exists() and not stage.always else "to run"
        print(f"[{index}/{len(stages)}] {stage.name}: {state}{needs}")
        print(f"  $ {shlex.join(stage.argv(stage.resumable_now()))}")
        if executor == "slurm":
            dependencies = ["<job of " + need + ">" for need in stage.needs]
            print(f"  sbatch {describe(job_parameters(cfg, stage, dependencies))}")
    if executor == "slurm":
        jobs = plan_jobs([stage for stage in stages if stage.always or not stage.done.exists()])
        print(f"{len(jobs)} SLURM jobs (an export in its pretraining's job, an arm's trials in one job array):")
        for job in jobs:
            print(f"  {' + '.join(stage.name for stage in job.stages)}{' (array)' if job.array else ''}")


def show_status(cfg, stages) -> None:
    output = Path(cfg.OUTPUT_DIR)
    uses_slurm = any(records.read_record(output, s.name).get("executor") == "slurm" for s in stages)
    queue = {}
    if uses_slurm:
        try:
            queue = live_jobs()
        except SlurmUnavailable as error:
            print(f"warning: {error}; job states are from the study folder only", file=sys.stderr)
    print(format_status(status_rows(stages, output, queue)))
    if output.is_dir():
        write_report(cfg)
        print(f"report of what is done so far: {output / REPORT_MARKDOWN}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_study_cfg(args.config_file, args.opts)
        check_executor(cfg, args.executor, args.dry_run or args.status or args.report)
    except StudyConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(cfg.OUTPUT_DIR)
    if args.report:
        try:
            report = write_report(cfg)
        except ValueError as error:  # a finished run whose records cannot be scored, e.g. AP null (no detections)
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(format_markdown(report))
        print(f"wrote {output / REPORT_MARKDOWN}")
        return 0
    try:
        budget = Budget.of_this_machine(args.gpus, args.cpus) if args.executor == "local" else None
        stages = stages_for(cfg, args.executor, budget)
        if budget:
            check_budget(stages, cfg, budget)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(cfg, stages, args.executor)
        return 0
    if args.status:
        show_status(cfg, stages)
        return 0
    try:
        check_inputs(cfg)
    except StudyConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    (output / STUDY_CONFIG).write_text(cfg.dump())
    try:
        if args.executor == "local":
            return run_local(stages, cfg, budget)
        jobs = submit_study(cfg, stages, output)
        if not args.wait:
            print(f"{len(jobs)} stages in {len(set(map(array_job, jobs.values())))} jobs in the queue; "
                  "follow them with --status")
            return 0
        wait_for(list(jobs.values()))
        rows = status_rows(stages, output, {})
        print(format_status(rows))
        return 0 if all(row["state"] == "done" for row in rows) else 1
    except (StudyBusy, SlurmUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SubmissionRefused as error:
        print(f"error: {error}\nthe jobs listed above stay queued; fix the cause and run the same command again "
              "(they are kept), or scancel them", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
