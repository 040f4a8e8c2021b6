"""The local executor: every stage one after another on this machine. Finished stages are
skipped, a stage whose run folder holds a checkpoint resumes, and a failed stage stops only the
stages that need it; the runner exits non-zero at the end if any stage failed."""
from __future__ import annotations

import shlex
import signal
import time
from pathlib import Path

from study_runner import records
from study_runner.execute import run_stage
from study_runner.lock import hold_lock
from study_runner.stages import Stage


def _raise_on(signum, _frame):
    raise SystemExit(128 + signum)


def run_local(stages: list[Stage], output: Path) -> int:
    """Run what is left of the study; 0 when every stage ended done."""
    lock = hold_lock(output)  # noqa: F841  (held until the process ends)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_on)  # so the running tool is stopped and its record closed
    outcome: dict[str, str] = {}
    total = len(stages)
    for index, stage in enumerate(stages, 1):
        header = f"[{index}/{total}] {stage.name}"
        if not stage.always and stage.done.exists():
            print(f"{header}: done already ({stage.done}), skipped", flush=True)
            outcome[stage.name] = "done"
            continue
        broken = [need for need in stage.needs if outcome.get(need) in ("failed", "blocked")]
        if broken and not stage.always:
            print(f"{header}: blocked, it needs {', '.join(broken)}", flush=True)
            outcome[stage.name] = "blocked"
            continue
        resuming = " (resuming)" if stage.resumable_now() else ""
        print(f"{header}{resuming}\n  $ {shlex.join(stage.argv(bool(resuming)))}", flush=True)
        start = time.monotonic()
        status = run_stage(stage, output, executor="local", echo=True)
        if status == 0 and stage.done.exists():
            outcome[stage.name] = "done"
            print(f"  done in {time.monotonic() - start:.0f} s", flush=True)
        else:
            outcome[stage.name] = "failed"
            print(failure_message(stage, output, status), flush=True)
    return summarize(outcome, stages, output)


def failure_message(stage: Stage, output: Path, status: int) -> str:
    log = records.log_path(output, stage.name)
    reason = (f"exit status {status}" if status != 0 else f"exit status 0 but {stage.done} was not written")
    tail = "\n".join(f"    | {line}" for line in records.log_tail(log).splitlines())
    return f"error: stage {stage.name} failed ({reason}); last lines of {log}:\n{tail}"


def summarize(outcome: dict[str, str], stages: list[Stage], output: Path) -> int:
    failed = [s for s in stages if outcome.get(s.name) == "failed"]
    blocked = [s.name for s in stages if outcome.get(s.name) == "blocked"]
    if not failed:
        print(f"study finished: every stage done ({output})", flush=True)
        return 0
    for stage in failed:
        record = records.read_record(output, stage.name)
        print(f"error: stage {stage.name} failed (exit status {record.get('exit_status')}); "
              f"log: {records.log_path(output, stage.name)}", flush=True)
    if blocked:
        print(f"not run, as they need a failed stage: {', '.join(blocked)}", flush=True)
    print("fix the cause and run the same command again: finished stages are kept", flush=True)
    return 1
