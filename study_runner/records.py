"""What the study folder remembers of each stage, so that ``--status`` and a rerun work from any
login node: one JSON file per stage (``stages/<name>.json``: the command, the executor and SLURM
job id, host and pid, start and end times, exit status, wall seconds), written atomically by
whoever runs or submits the stage, and one log per stage (``logs/<name>.log``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pretrain.atomic_file import atomic_write_json

RECORDS = "stages"
LOGS = "logs"


def record_path(output: Path, name: str) -> Path:
    return Path(output) / RECORDS / f"{name}.json"


def log_path(output: Path, name: str) -> Path:
    return Path(output) / LOGS / f"{name}.log"


def read_record(output: Path, name: str) -> dict:
    """The stage's record, ``{}`` for a stage never started."""
    path = record_path(output, name)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"stage record {path} is not valid JSON ({error}); delete it to forget the stage") from None


def update_record(output: Path, name: str, **fields) -> dict:
    """Merge ``fields`` into the record (the submitter and the job each add their own)."""
    record = {**read_record(output, name), "name": name, **fields}
    atomic_write_json(record_path(output, name), record)
    return record


def now() -> str:
    """UTC, so that times written on different hosts compare as strings."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log (progress-bar carriage returns folded)."""
    if not path.is_file():
        return f"(no log at {path})"
    with open(path, "rb") as stream:
        stream.seek(max(0, path.stat().st_size - 64 * 1024))
        text = stream.read().decode(errors="replace")
    folded = (line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
    kept = [line for line in folded if line.strip()]
    return "\n".join(kept[-lines:])
