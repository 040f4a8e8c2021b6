"""Running one stage: its tool as a child process (with ``--resume`` when its run folder holds a
checkpoint), output appended to the stage's log, and the attempt written to its record. The
same code runs under both executors: in the study runner's process (local) or inside a SLURM job.
A stop signal forwarded to the running tool (``forward_to_tool``) makes a trainer save and exit
with ``RESUME_EXIT_STATUS`` (helpers/preemption.py).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.preemption import RESUME_EXIT_STATUS
from helpers.weights import file_sha256
from study_runner import records
from study_runner.stages import REPO, Stage

STOP_GRACE_SECONDS = 30


def _child_setup() -> None:
    """In the child, before the tool starts: ignore SIGUSR2, SLURM's early warning of a time
    limit or preemption, which reaches every process of the job. A trainer acts on it (saves
    and exits, helpers/preemption.py); any other tool goes on until the job requeues."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class _RunningTool:
    process: subprocess.Popen
    output: threading.Thread  # copies its output; ends when the tool and every process it started have
    forwarded: str | None = None  # the first stop signal passed on to it


_running: dict[int, _RunningTool] = {}  # the tools this process runs now, by the thread that runs each


def forward_to_tool(signum: int, wait_seconds: float = 0.0) -> list[int | None]:
    """Pass ``signum`` to every running tool and every process each started, then wait up to
    ``wait_seconds`` in all for them to end: their exit statuses, None for one still running.
    Safe in a signal handler: it never waits on a tool's process itself."""
    tools = list(_running.values())
    for tool in tools:
        tool.forwarded = tool.forwarded or signal.Signals(signum).name
        try:
            os.killpg(tool.process.pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_seconds
    for tool in tools:
        tool.output.join(max(deadline - time.monotonic(), 0.0))
    return [tool.process.poll() for tool in tools]


def _copy_output(source, stream, echo: bool) -> None:
    for chunk in iter(lambda: source.read1(65536), b""):
        stream.write(chunk)
        stream.flush()
        if echo:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


def stop(process: subprocess.Popen) -> None:
    """End the tool and every process it started (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_command(argv: list[str], log: Path, echo: bool, forwarded: list[str] | None = None,
                environment: dict[str, str] | None = None) -> int:
    """Run ``argv`` from the repository root, appending its output to ``log`` (and to our
    stdout with ``echo``); ``environment``: variables set for it. Any exception here (a
    signal's handler included) ends the tool. ``forwarded`` receives the stop signal passed on
    to the tool, if one was."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as stream:
        stream.write(f"\n==== {records.now()} on {socket.gethostname()}\n$ {shlex.join(argv)}\n".encode())
        stream.flush()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                   start_new_session=True, preexec_fn=_child_setup,
                                   env={**os.environ, **environment} if environment else None)
        output = threading.Thread(target=_copy_output, args=(process.stdout, stream, echo), daemon=True)
        output.start()
        tool = _running[threading.get_ident()] = _RunningTool(process, output)
        try:
            output.join()  # a signal handler may wait on it too (forward_to_tool)
            return process.wait()
        finally:
            stop(process)
            output.join()
            if forwarded is not None and tool.forwarded:
                forwarded.append(tool.forwarded)
            del _running[threading.get_ident()]


def weights_used(stage: Stage) -> dict | None:
    """The weights file the stage reads and its sha256 as it starts (None where it reads none,
    or the file is missing: then the tool says so)."""
    if stage.weights is None or not stage.weights.is_file():
        return None
    return {"path": str(stage.weights), "sha256": file_sha256(stage.weights)}


def run_stage(stage: Stage, output: Path, executor: str, echo: bool, job_id: str | None = None,
              machines: tuple[int, int, str] | None = None, resources: dict | None = None,
              environment: dict[str, str] | None = None) -> int:
    """One attempt at ``stage``; returns the tool's exit status. On a multi-node job every
    node runs this; only node 0 (``machines[1] == 0``) keeps the record and the main log.
    ``resources``: what the local executor gives the stage (kept in its record), through
    ``environment`` (variables set for the tool)."""
    resume = stage.resumable_now()
    argv = stage.argv(resume, machines)
    node = machines[1] if machines else 0
    log = records.log_path(output, stage.name if node == 0 else f"{stage.name}.node{node}")
    recording = node == 0
    previous = records.read_record(output, stage.name) if recording else {}
    if recording:
        records.update_record(output, stage.name, kind=stage.kind, command=argv, executor=executor, job_id=job_id,
                              host=socket.gethostname(), pid=os.getpid(), started_at=records.now(), ended_at=None,
                              exit_status=None, interrupted=None, resumed=resume, log=str(log),
                              attempts=previous.get("attempts", 0) + 1, weights=weights_used(stage),
                              resources=resources)
    start = time.monotonic()
    total = previous.get("wall_seconds", 0.0)
    signals: list[str] = []  # the stop signal the tool got, once it has ended
    try:
        status = run_command(argv, log, echo, signals, environment)
    except BaseException as error:  # a signal's handler (Ctrl-C, SLURM's requeue) stopped us
        if recording:
            records.update_record(output, stage.name, ended_at=records.now(),
                                  interrupted=signals[0] if signals else type(error).__name__,
                                  wall_seconds=total + time.monotonic() - start)
        raise
    if recording:
        # a tool stopped by a signal passed on to it, or one that saved on a signal of its own
        stopped = signals[0] if signals else ("a stop signal" if status == RESUME_EXIT_STATUS else None)
        saved = {"interrupted": stopped} if stopped else {}
        records.update_record(output, stage.name, ended_at=records.now(), exit_status=status,
                              wall_seconds=total + time.monotonic() - start, **saved)
    return status
