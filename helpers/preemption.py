"""Ending a training cleanly when the cluster takes its machines back.

SLURM warns a job of its time limit or of preemption with SIGUSR2 (``--signal=USR2@N``), and a
site that preempts with ``PreemptMode=REQUEUE`` (or ``scontrol requeue``) sends SIGTERM, then
SIGKILL after a grace time; both reach every process of the job. A trainer's processes note
the signal (``stop_on_signals``), agree on it at an iteration boundary (``StopAgreement``),
save a checkpoint there together and leave with ``Preempted``: exit status
``RESUME_EXIT_STATUS``, which tells the study runner that the run saved and resumes with
``--resume``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
RESUME_EXIT_STATUS = 75  # EX_TEMPFAIL: saved on a signal, run again with --resume

_received: list[str] = []  # the names of the stop signals this process got, first first


def _note(signum, _frame) -> None:
    _received.append(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """From now on SIGUSR2 and SIGTERM do not end this process nor the data loader workers it
    starts: they are noted, for the trainer to act on at its next iteration boundary. The
    workers are forked so that they inherit this (a spawned worker would start with the default,
    which ends it; a process started with the spawn method, as ``launch`` starts its ranks,
    would spawn its own workers too)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note)
    if sys.platform == "linux":  # SLURM's platform; elsewhere no signal reaches a tool's every process
        multiprocessing.set_start_method("fork", force=True)
        _keep_noting_in_loader_workers()


def _keep_noting_in_loader_workers() -> None:
    """A PyTorch loader worker starts by installing C handlers, one of which ends it on any
    SIGTERM, and SLURM's reaches every process of the job: the trainer would then fail on a
    dead worker instead of saving. After them, the worker hands SIGTERM to a thread of its
    own, which ends the worker when its parent sends it (the loader shutting it down, as
    PyTorch's handler does) and notes it otherwise."""
    from torch.utils.data._utils import signal_handling

    install = signal_handling._set_worker_signal_handlers
    if getattr(install, "notes_stop_signals", False):
        return

    def install_then_note() -> None:
        install()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the worker's only thread, and its next ones
        threading.Thread(target=_end_when_the_parent_asks, args=(os.getppid(),), daemon=True).start()

    install_then_note.notes_stop_signals = True
    signal_handling._set_worker_signal_handlers = install_then_note


def _end_when_the_parent_asks(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
        _received.append(signal.SIGTERM.name)


def received() -> str | None:
    """The first stop signal this process got, or None."""
    return _received[0] if _received else None


class Preempted(SystemExit):
    """A trainer saved ``checkpoint`` on a stop signal and ended; every process of the tool
    exits with ``RESUME_EXIT_STATUS`` (and no traceback)."""

    def __init__(self, checkpoint, signal_name: str):
        super().__init__(RESUME_EXIT_STATUS)
        self.checkpoint = checkpoint
        self.signal_name = signal_name

    def __str__(self) -> str:
        return f"{self.signal_name}: saved {self.checkpoint}; continue with --resume"


class StopAgreement:
    """Whether any process of the run got a stop signal (and whether rank 0 finds a checkpoint
    due), answered alike in every process at the same iteration so that they save together.
    The flags travel over a gloo group of their own, one iteration behind, so the training
    step waits for neither the network nor the GPU."""

    def __init__(self):
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo") if several else None
        self.flags = torch.zeros(2)  # [a stop signal somewhere, rank 0's checkpoint due]
        self.pending = None

    def poll(self, checkpoint_due: bool = False) -> tuple[str | None, bool]:
        """Call once per iteration in every process (``checkpoint_due``: rank 0's own view,
        e.g. by its clock): the signal that stops the run here (its name, ``"a stop signal"``
        when another process got it) or None, and whether to checkpoint here."""
        if self.group is None:
            return received(), checkpoint_due
        stop = due = False
        if self.pending is not None:
            self.pending.wait()
            stop, due = bool(self.flags[0]), bool(self.flags[1])
        if stop:
            self.pending = None
            return received() or "a stop signal", due
        self.flags[0] = 1.0 if received() else 0.0
        self.flags[1] = 1.0 if checkpoint_due and dist.get_rank() == 0 else 0.0
        self.pending = dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return None, due

    def close(self) -> None:
        """Finish the exchange in flight (before the process group goes away)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def end_run(self, checkpoint, signal_name: str, iteration: int) -> None:
        """Once every process has saved its part of ``checkpoint`` after ``iteration``
        iterations: wait until rank 0 has written it, say so once, and end every process with
        ``RESUME_EXIT_STATUS``."""
        if self.group is not None:
            dist.barrier(group=self.group)
        stopped = Preempted(checkpoint, signal_name)
        if self.group is None or dist.get_rank() == 0:
            logger.warning("stopped at iteration %d on %s", iteration, stopped)
        raise stopped
