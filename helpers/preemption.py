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
_WAITER = "stop-signal-waiter"  # the thread that takes the blocked signals


def _note(signum, _frame) -> None:
    _received.append(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """From now on SIGUSR2 and SIGTERM do not end this process, the processes it starts, nor the
    data loader workers they start: they are noted, for the trainer to act on at its next
    iteration boundary (elsewhere than on Linux, SLURM's platform: in this process only).

    On Linux the signals are blocked in this thread, and so in every thread and process started
    from it (a blocked signal mask survives fork and exec), and a thread of this process waits
    for them. Loader workers start from a forkserver that imports this module: forked from a
    process with one thread, not from a rank with gloo's threads running (which hung a worker
    about once in a dozen runs), and with ``_keep_workers_running`` in place."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note)  # also reached by threads started before this call
    if sys.platform != "linux" or any(thread.name == _WAITER for thread in threading.enumerate()):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    threading.Thread(target=_note_blocked_signals, name=_WAITER, daemon=True).start()
    multiprocessing.set_start_method("forkserver", force=True)
    multiprocessing.set_forkserver_preload(["__main__", __name__])


def _note_blocked_signals() -> None:
    while True:
        _note(signal.sigwait(set(STOP_SIGNALS)), None)


def _keep_workers_running() -> None:
    """A PyTorch loader worker starts by installing a C handler that ends it on SIGTERM; it never
    runs while the signal is blocked, so a worker of a trainer that stops on signals keeps
    SLURM's SIGTERM pending and goes on. Its parent still ends it with SIGTERM (the loader
    shutting down, multiprocessing at exit): after PyTorch's handlers, such a worker hands
    SIGTERM to a thread that ends the worker when its parent sent it. Patches PyTorch's private
    ``_set_worker_signal_handlers``, at import so that the forkserver passes it on."""
    from torch.utils.data._utils import signal_handling

    install = signal_handling._set_worker_signal_handlers
    if getattr(install, "keeps_workers_running", False):
        return

    def install_then_hand_over() -> None:
        install()
        if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            parent = multiprocessing.parent_process()
            threading.Thread(target=_end_when_the_parent_asks, args=(parent.pid,), daemon=True).start()

    install_then_hand_over.keeps_workers_running = True
    signal_handling._set_worker_signal_handlers = install_then_hand_over


def _end_when_the_parent_asks(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


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


if sys.platform == "linux":
    _keep_workers_running()
