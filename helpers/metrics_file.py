"""``metrics.json`` (one JSON object per line, each with its ``iteration``) as a resumed run must
leave it: a run killed after its last checkpoint logged iterations it will train again, and
the cost report and convergence checks would count them twice."""
from __future__ import annotations

import json
import os
from pathlib import Path


def drop_records_after(path: Path, iteration: int) -> int:
    """Cut ``path`` before its first record past ``iteration`` (or its first unreadable line, a
    write the kill interrupted); the number of lines dropped. The file is truncated in place,
    so writers that hold it open for appending go on at its new end."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as stream:
        lines = stream.readlines()
    kept_bytes = 0
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
            past = record["iteration"] > iteration or not line.endswith(b"\n")
        except (ValueError, KeyError, TypeError):
            past = True
        if past:
            os.truncate(path, kept_bytes)
            return len(lines) - index
        kept_bytes += len(line)
    return 0
