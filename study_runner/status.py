"""Where each stage stands, from its output, its record and (for SLURM jobs) the queue:

    done         its output file exists
    running      its process is alive (local) or its job runs (SLURM)
    queued       its job waits in the SLURM queue (for resources or for the stages it needs)
    failed       its last attempt ended with a non-zero exit status, or without its output
    interrupted  its last attempt was stopped (a signal, a killed, requeued or cancelled job) before it ended
    cancelled    its job left the queue without starting (scancel, or a stage it needs failed)
    pending      never started
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from study_runner import records
from study_runner.stages import Stage

RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_state(stage: Stage, record: dict, queue: dict[str, str]) -> str:
    """One of the states above; ``queue`` maps live SLURM job ids to their state."""
    if record.get("executor") == "slurm" and record.get("job_id") in queue:
        # a job runs stages one after another (a pretraining, then its export): this one runs once it has started
        started = (record.get("started_at") or "") >= record.get("submitted_at", "")
        return "running" if queue[record["job_id"]] in RUNNING_STATES and started else "queued"
    open_attempt = bool(record.get("started_at")) and not record.get("ended_at")
    if (open_attempt and record.get("executor") == "local" and record.get("host") == socket.gethostname()
            and process_alive(record["pid"])):
        return "running"
    if stage.done.exists():
        return "done"
    if record.get("submitted_at", "") > (record.get("started_at") or ""):
        return "cancelled"
    if record.get("interrupted"):  # a stop signal (the tool saved first), a kill, a requeue
        return "interrupted"
    if record.get("exit_status") is not None:
        return "failed"
    return "interrupted" if record else "pending"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"


def status_rows(stages: list[Stage], output: Path, queue: dict[str, str]) -> list[dict]:
    rows = []
    for stage in stages:
        record = records.read_record(output, stage.name)
        rows.append({"stage": stage.name, "state": stage_state(stage, record, queue),
                     "job": record.get("job_id") or "-", "attempts": record.get("attempts", 0),
                     "exit": "-" if record.get("exit_status") is None else str(record["exit_status"]),
                     "wall": format_seconds(record.get("wall_seconds")),
                     "log": str(records.log_path(output, stage.name))})
    return rows


def format_status(rows: list[dict]) -> str:
    columns = ("stage", "state", "job", "attempts", "exit", "wall", "log")
    table = [list(columns)] + [[str(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines.append(", ".join(f"{count} {state}" for state, count in sorted(counts.items())))
    return "\n".join(lines)
