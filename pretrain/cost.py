"""Training cost per method from pretraining run folders, as the paper's cost table gives it:
wall time per epoch, and that time relative to training without mixing.

A run's time comes from its ``metrics.json`` lines, each of which holds the wall seconds and the
iterations of one logging window (evaluation excluded); a resumed run simply adds windows. The
method and the setup come from the ``config.yaml`` that ``tools/pretrain_net.py`` writes.

Each row also gives the share of the step time spent waiting for the loader (the windows'
``data_time``): above ``INPUT_BOUND`` the run was input-bound, and its time per epoch measures
the loader, not the method.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from fvcore.common.config import CfgNode

from pretrain.run_folder import read_config, read_metrics

BASELINE = "none"
# Keys that must agree between runs for their times to be comparable.
SETUP_KEYS = ("MODEL.ARCH", "DATA.DATASET", "DATA.IMAGE_SIZE", "SOLVER.BATCH_SIZE")
# ImageNet ResNet-50 training time (hours) per method, as the paper reports it.
PAPER_HOURS = {"none": 0.83, "cutout": 0.84, "mixup": 0.87, "cutmix": 0.89, "saliencymix": 0.91}
INPUT_BOUND = 0.10  # share of the step time spent waiting for data


@dataclass
class RunCost:
    run: Path
    method: str
    setup: dict
    seconds_per_epoch: float
    epochs_timed: float
    data_wait: float  # share of the timed seconds spent waiting for the loader


def method_label(cfg: CfgNode) -> str:
    """The mixer's name, with the SaliencyMix box policy and saliency input where they are not
    the defaults (the shared box, the pixels), so that such runs get rows of their own."""
    name = cfg.MIX.NAME.lower()
    if name != "saliencymix":
        return name
    details = []
    if cfg.MIX.BOX != "batch":
        details.append(f"{cfg.MIX.BOX} box")
    if cfg.MIX.SALIENCY_ON != "pixels":
        details.append(f"{cfg.MIX.SALIENCY_ON} saliency")
    return f"{name} ({', '.join(details)})" if details else name


def read_run(run: Path) -> RunCost:
    cfg = read_config(run)
    seconds = iterations = waited = 0.0
    per_epoch = None
    for record in read_metrics(run):
        if "window_seconds" in record:
            seconds += record["window_seconds"]
            iterations += record["window_iterations"]
            waited += record.get("data_time", 0.0) * record["window_iterations"]
            per_epoch = record["iterations_per_epoch"]
    if not iterations:
        raise ValueError(f"{run / 'metrics.json'} has no timed training windows (window_seconds); "
                         "train longer than LOG_PERIOD iterations")
    setup = {key: cfg[key.split(".")[0]][key.split(".")[1]] for key in SETUP_KEYS}
    return RunCost(run, method_label(cfg), setup, seconds / iterations * per_epoch, iterations / per_epoch,
                   waited / seconds if seconds else 0.0)


def data_wait_text(row: dict, explain: bool = False) -> str:
    """A cost row's share of the step spent waiting for data, marked where it passed
    ``INPUT_BOUND`` (``explain``: with why that matters, for the study report)."""
    mark = " (input-bound: the loader's time, not the method's)" if explain else " (input-bound)"
    return f"{row['data_wait']:.1%}" + (mark if row["input_bound"] else "")


def cost_table(runs: list[RunCost]) -> list[dict]:
    """One row per method (runs of a method averaged): seconds per epoch and the ratio to the
    no-mixing baseline, beside the paper's ratio, and the share of it spent waiting for data."""
    if not runs:
        raise ValueError("no runs given")
    for key in SETUP_KEYS:
        values = {str(run.setup[key]) for run in runs}
        if len(values) > 1:
            detail = ", ".join(f"{run.run}: {run.setup[key]}" for run in runs)
            raise ValueError(f"the runs differ in {key} ({detail}); their times are not comparable")
    by_method: dict[str, list[RunCost]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    if BASELINE not in by_method:
        raise ValueError(f"no run without mixing (MIX.NAME {BASELINE}) among {[str(r.run) for r in runs]}: "
                         "the cost is relative to it")
    baseline = statistics.mean(run.seconds_per_epoch for run in by_method[BASELINE])
    rows = []
    for method, group in sorted(by_method.items(), key=lambda item: (item[0] != BASELINE, item[0])):
        seconds = statistics.mean(run.seconds_per_epoch for run in group)
        paper = PAPER_HOURS.get(method)
        data_wait = max(run.data_wait for run in group)
        rows.append({"method": method, "runs": len(group), "epochs_timed": sum(run.epochs_timed for run in group),
                     "seconds_per_epoch": seconds, "relative": seconds / baseline,
                     "paper_relative": paper / PAPER_HOURS[BASELINE] if paper else None,
                     "data_wait": data_wait, "input_bound": data_wait > INPUT_BOUND})
    return rows
