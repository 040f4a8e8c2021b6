"""Files that are either written whole or not at all (checkpoints, exported weights, results)."""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the destination folder, then rename it into place:
    a crash or error never leaves a partial file, nor clobbers an existing one. (``os.open``
    rather than ``tempfile``, so the file gets the usual umask permissions, not 0600.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, value) -> None:
    """``value`` as indented JSON, written atomically."""
    atomic_write(path, lambda stream: stream.write((json.dumps(value, indent=2) + "\n").encode()))
