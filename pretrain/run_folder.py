"""Reading a finished ``tools/pretrain_net.py`` run folder: its ``config.yaml`` and the JSON lines of
its ``metrics.json``, with errors that name the file and line. The cost report and the convergence
summary both read runs through here."""
from __future__ import annotations

import json
from pathlib import Path

from fvcore.common.config import CfgNode

from pretrain.config import get_cfg


def read_config(run: Path) -> CfgNode:
    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run} is not a tools/pretrain_net.py run folder")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def read_metrics(run: Path) -> list[dict]:
    """Every record of ``metrics.json``, in the order written."""
    path = run / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run} is not a tools/pretrain_net.py run folder")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
    return records
