"""The study folder's lock: one runner at a time runs a study's stages (local) or submits its
jobs (SLURM), or two of them would run, or queue, the same stages twice."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK = "study.lock"


class StudyBusy(RuntimeError):
    """Another runner holds the study folder."""


def hold_lock(output: Path, wait: bool = False):
    """An exclusive lock on the study folder, held until the returned handle is closed (or the
    process ends); ``wait``: wait for the holder to let go instead of raising ``StudyBusy``."""
    output.mkdir(parents=True, exist_ok=True)
    handle = open(output / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise StudyBusy(f"another study.py is running the study in {output} ({holder})") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
