"""The local executor: the study on this machine, independent stages at once (``make -j`` style).

Each stage takes what its kind asks for (``RESOURCES.<KIND>``: ``GPUS_PER_NODE`` GPUs where the
machine has GPUs, ``CPUS_PER_NODE`` cores, at most the whole budget), given to it as
``CUDA_VISIBLE_DEVICES`` and thread counts. In the study's order, the runner starts every stage
whose needs have ended and whose share fits in what is free. Finished stages are skipped, a stage
whose run folder holds a checkpoint resumes, and a failed stage stops only the stages that need
it. Ctrl-C or SIGTERM stops every running stage (a trainer saves first), and the same command
resumes them. The runner exits non-zero at the end if any stage failed.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from study_runner import records
from study_runner.execute import STOP_GRACE_SECONDS, forward_to_tool, run_stage
from study_runner.lock import hold_lock
from study_runner.stages import Stage, processes_per_node

STATUS_SECONDS = {True: 2.0, False: 60.0}  # how often the status line is shown: on a terminal, in a log
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# How far a stage is, from its log: the pretraining's "epoch 1.08  iteration 100/1488", the
# torchvision engine's "iter 49/150", Detectron2's "iter: 49".
PROGRESS = re.compile(r"(?:epoch [\d.]+\s+)?iteration \d+/\d+|\biter \d+/\d+|\biter: \d+")


@dataclass
class Budget:
    """What the study may use on this machine at once: GPU indices and CPU cores."""
    gpus: list[int]
    cpus: int

    @classmethod
    def of_this_machine(cls, gpus: int | None = None, cpus: int | None = None) -> Budget:
        """All this machine's GPUs and the cores this process may use, or the first ``gpus``
        GPUs and ``cpus`` cores of them."""
        import torch

        present = torch.cuda.device_count()
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        for name, asked, there in (("--gpus", gpus, present), ("--cpus", cpus, usable)):
            if asked is not None and not 0 <= asked <= there:
                raise ValueError(f"{name} {asked}: this machine has {there}")
        if cpus == 0:
            raise ValueError("--cpus 0: every stage needs at least one core")
        return cls(list(range(present if gpus is None else gpus)), usable if cpus is None else cpus)


@dataclass(frozen=True)
class Share:
    """What one stage is given."""
    gpus: tuple[int, ...]
    cpus: int

    def environment(self, processes: int, cuda: bool) -> dict[str, str]:
        """The stage's variables: its GPUs (none for a stage that asks for none, on a machine
        with GPUs) and threads per process."""
        threads = str(max(self.cpus // processes, 1))
        gpus = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if cuda else {}
        return {**gpus, **dict.fromkeys(THREAD_VARIABLES, threads)}


class Machine:
    """The budget, minus the shares of the stages running now."""

    def __init__(self, budget: Budget, cfg):
        self.free_gpus = list(budget.gpus)
        self.free_cpus = budget.cpus
        self.budget = budget
        self.cfg = cfg
        self.cuda = bool(budget.gpus)

    def demand(self, stage: Stage) -> tuple[int, int]:
        """How many GPUs and cores ``stage`` asks for, the cores cut to the whole budget (so that
        it can run, alone if need be)."""
        kind = self.cfg.RESOURCES[stage.kind.upper()]
        return (kind.GPUS_PER_NODE if self.cuda else 0), min(kind.CPUS_PER_NODE, self.budget.cpus)

    def take(self, stage: Stage) -> Share | None:
        """The stage's share if it fits in what is free now (then it is no longer free)."""
        gpus, cpus = self.demand(stage)
        if gpus > len(self.free_gpus) or cpus > self.free_cpus:
            return None
        given, self.free_gpus = tuple(self.free_gpus[:gpus]), self.free_gpus[gpus:]
        self.free_cpus -= cpus
        return Share(given, cpus)

    def give_back(self, share: Share) -> None:
        self.free_gpus = sorted(self.free_gpus + list(share.gpus))
        self.free_cpus += share.cpus

    def environment(self, stage: Stage, share: Share) -> dict[str, str]:
        """The variables that give ``stage`` its share."""
        processes = processes_per_node(self.cfg, stage.kind) if stage.distributed else 1
        return share.environment(processes, self.cuda)


def check_budget(stages: list[Stage], cfg, budget: Budget) -> None:
    """Every stage can run within ``budget``: a kind asking for more GPUs than the budget has
    would wait forever."""
    if not budget.gpus:
        return
    for kind in sorted({stage.kind for stage in stages}):
        wanted = cfg.RESOURCES[kind.upper()].GPUS_PER_NODE
        if wanted > len(budget.gpus):
            raise ValueError(f"RESOURCES.{kind.upper()}.GPUS_PER_NODE is {wanted}, but the study may use "
                             f"{len(budget.gpus)} GPUs here (--gpus): lower it, or give more GPUs")


@dataclass
class _Running:
    stage: Stage
    share: Share
    started: float
    header: str

    @property
    def echoes(self) -> bool:
        """The study report is the study's answer: its output is shown, every other tool's goes
        to its log only."""
        return self.stage.name == "report"


def _raise_on(signum, _frame):
    raise SystemExit(128 + signum)


def run_local(stages: list[Stage], cfg, budget: Budget) -> int:
    """Run what is left of the study within ``budget`` (which ``check_budget`` accepted); 0
    when every stage ended done."""
    output = Path(cfg.OUTPUT_DIR)
    lock = hold_lock(output)  # noqa: F841  (held until the process ends)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_on)  # so the running tools are stopped and their records closed
    machine = Machine(budget, cfg)
    status = StatusLine(output)
    outcome: dict[str, str] = {}
    running: dict[str, _Running] = {}
    ended: queue.Queue[tuple[str, int]] = queue.Queue()
    waiting = list(enumerate(stages, 1))
    total = len(stages)
    names = {stage.name for stage in stages}

    def start_what_fits() -> None:
        for entry in list(waiting):
            index, stage = entry
            if any(need in names and need not in outcome for need in stage.needs):
                continue
            header = f"[{index}/{total}] {stage.name}"
            if not stage.always and stage.done.exists():
                status.say(f"{header}: done already ({stage.done}), skipped")
                outcome[stage.name] = "done"
            elif not stage.always and (broken := [n for n in stage.needs if outcome.get(n) in ("failed", "blocked")]):
                status.say(f"{header}: blocked, it needs {', '.join(broken)}")
                outcome[stage.name] = "blocked"
            elif share := machine.take(stage):
                resuming = " (resuming)" if stage.resumable_now() else ""
                log = records.log_path(output, stage.name)
                status.say(f"{header}{resuming} started on {describe(share)}; log: {log}")
                run = running[stage.name] = _Running(stage, share, time.monotonic(), header)
                threading.Thread(target=_run, args=(run, output, machine.environment(stage, share), ended),
                                 daemon=True).start()
            else:
                continue
            waiting.remove(entry)

    try:
        start_what_fits()
        while running:
            status.show({name: run for name, run in running.items() if not run.echoes})
            try:
                name, exit_status = ended.get(timeout=status.period)
            except queue.Empty:
                continue
            finished = running.pop(name)
            machine.give_back(finished.share)
            stage = finished.stage
            if exit_status == 0 and stage.done.exists():
                outcome[name] = "done"
                status.say(f"{finished.header}: done in {time.monotonic() - finished.started:.0f} s")
            else:
                outcome[name] = "failed"
                status.say(failure_message(stage, output, exit_status))
            start_what_fits()
    except BaseException:  # Ctrl-C, SIGTERM: every running tool stops (a trainer saves) and keeps its record
        status.say(f"stopping {', '.join(running) or 'nothing'}; run the same command again to resume")
        if None in forward_to_tool(signal.SIGTERM, wait_seconds=STOP_GRACE_SECONDS):
            forward_to_tool(signal.SIGKILL)
        for _ in running:  # their records are closed once their threads end
            ended.get(timeout=2 * STOP_GRACE_SECONDS)
        raise
    return summarize(outcome, stages, output)


def _run(run: _Running, output: Path, environment: dict[str, str], ended: queue.Queue) -> None:
    """In a thread of its own: one attempt at the stage, its exit status to ``ended``."""
    resources = {"gpus": list(run.share.gpus), "cpus": run.share.cpus}
    try:
        exit_status = run_stage(run.stage, output, executor="local", echo=run.echoes, resources=resources,
                                environment=environment)
    except Exception as error:  # noqa: BLE001  (an attempt that could not start fails its stage only)
        print(f"error: stage {run.stage.name}: {error}", file=sys.stderr, flush=True)
        exit_status = 1
    ended.put((run.stage.name, exit_status))


def describe(share: Share) -> str:
    cores = f"{share.cpus} CPU core{'s' if share.cpus != 1 else ''}"
    return f"GPU {','.join(map(str, share.gpus))} and {cores}" if share.gpus else cores


class StatusLine:
    """One line per stage starting and ending, and between them which stages run and how far
    each is: redrawn in place on a terminal, a line a minute in a log."""

    def __init__(self, output: Path):
        self.output = output
        self.terminal = sys.stdout.isatty()
        self.period = STATUS_SECONDS[self.terminal]
        self.shown = False
        self.last = time.monotonic()

    def say(self, line: str) -> None:
        self._clear()
        print(line, flush=True)

    def show(self, running: dict[str, _Running]) -> None:
        now = time.monotonic()
        if not running or (not self.terminal and now - self.last < self.period):
            return
        self.last = now
        parts = [f"{name} ({progress(records.log_path(self.output, name)) or f'{now - run.started:.0f} s'})"
                 for name, run in running.items()]
        line = f"running: {', '.join(parts)}"
        if self.terminal:
            self._clear()
            width = os.get_terminal_size().columns - 1
            sys.stdout.write(line[:width])
            sys.stdout.flush()
            self.shown = True
        else:
            print(line, flush=True)

    def _clear(self) -> None:
        if self.shown:
            sys.stdout.write("\r\033[K")
            self.shown = False


def progress(log: Path) -> str | None:
    """The last iteration count a stage's log shows ("iteration 17/24"), or None."""
    try:
        with open(log, "rb") as stream:
            stream.seek(max(stream.seek(0, os.SEEK_END) - 4096, 0))
            tail = stream.read().decode(errors="replace")
    except OSError:
        return None
    found = PROGRESS.findall(tail)
    return found[-1] if found else None


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
