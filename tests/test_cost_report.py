"""tools/cost_report.py on fabricated run folders: time per epoch from the timed logging
windows, the ratio to the no-mixing baseline, and the errors for runs it cannot compare."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.config import get_cfg
from pretrain.cost import cost_table, read_run
from tool_process import run_tool

REPO = Path(__file__).resolve().parents[1]


def report(*runs: Path) -> list[dict]:
    return cost_table([read_run(run) for run in runs])


def fabricate_run(folder: Path, method: str, seconds_per_iteration: float, iterations_per_epoch: int = 50,
                  windows: int = 6, log_period: int = 20, data_time: float = 0.0, **overrides) -> Path:
    """A run folder as tools/pretrain_net.py leaves it: config.yaml, and metrics.json with training
    windows interleaved with evaluation lines (which carry no time)."""
    folder.mkdir(parents=True)
    cfg = get_cfg()
    cfg.MIX.NAME = method
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    (folder / "config.yaml").write_text(cfg.dump())
    lines = []
    for window in range(1, windows + 1):
        iteration = window * log_period
        lines.append({"iteration": iteration, "loss": 2.0, "lr": 0.1, "images_per_second": 1.0, "data_time": data_time,
                      "epoch": iteration / iterations_per_epoch, "iterations_per_epoch": iterations_per_epoch,
                      "window_iterations": log_period, "window_seconds": log_period * seconds_per_iteration})
        if window == 3:
            lines.append({"iteration": iteration, "epoch": 1.0, "top1_error": 50.0})
    (folder / "metrics.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_cost_report_gives_seconds_per_epoch_and_ratio_to_the_baseline(tmp_path):
    runs = [fabricate_run(tmp_path / "none_a", "none", 0.50),
            fabricate_run(tmp_path / "none_b", "none", 0.70),
            fabricate_run(tmp_path / "salmix", "saliencymix", 0.66),
            fabricate_run(tmp_path / "salmix_sample", "saliencymix", 0.90, MIX__BOX="sample"),
            fabricate_run(tmp_path / "salmix_official", "saliencymix", 0.72, MIX__SALIENCY_ON="official"),
            fabricate_run(tmp_path / "cutmix", "cutmix", 0.63)]
    finished = run_tool("tools/cost_report.py", *runs, "--output", tmp_path / "c.json")
    assert finished.returncode == 0, finished.stderr
    printed = finished.stdout
    rows = report(*runs)
    by_method = {row["method"]: row for row in rows}
    assert [row["method"] for row in rows][0] == "none"
    assert by_method["none"]["runs"] == 2 and by_method["none"]["seconds_per_epoch"] == pytest.approx(30.0)
    assert by_method["none"]["epochs_timed"] == pytest.approx(2 * 120 / 50)
    assert by_method["saliencymix"]["seconds_per_epoch"] == pytest.approx(33.0)
    assert by_method["saliencymix"]["relative"] == pytest.approx(1.1)
    assert by_method["saliencymix (sample box)"]["relative"] == pytest.approx(1.5)
    assert by_method["saliencymix (official saliency)"]["relative"] == pytest.approx(1.2)
    assert by_method["saliencymix"]["paper_relative"] == pytest.approx(0.91 / 0.83)
    assert by_method["saliencymix (sample box)"]["paper_relative"] is None
    assert json.loads((tmp_path / "c.json").read_text()) == rows
    assert "saliencymix" in printed and "1.100" in printed and "1.096" in printed


def test_cost_report_refuses_runs_it_cannot_compare(tmp_path):
    salmix = fabricate_run(tmp_path / "salmix", "saliencymix", 0.6)
    with pytest.raises(ValueError, match="no run without mixing"):
        report(salmix)
    other = fabricate_run(tmp_path / "none", "none", 0.5, SOLVER__BATCH_SIZE=128)
    with pytest.raises(ValueError, match="differ in SOLVER.BATCH_SIZE"):
        report(salmix, other)
    untimed = fabricate_run(tmp_path / "untimed", "none", 0.5, windows=0)
    with pytest.raises(ValueError, match="no timed training windows"):
        report(untimed)
    (salmix / "metrics.json").write_text('{"iteration": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.json:2: not a JSON line"):
        report(salmix)
    finished = run_tool("tools/cost_report.py", other, tmp_path / "nowhere")
    assert finished.returncode != 0 and "nowhere/config.yaml does not exist" in finished.stderr


def test_an_arm_that_waited_for_data_over_a_tenth_of_its_steps_is_marked_input_bound(tmp_path):
    """The windows' data_time (seconds per iteration) against their wall time: the cost of an
    input-bound arm measures its loader."""
    runs = [fabricate_run(tmp_path / "none", "none", 0.50, data_time=0.02),
            fabricate_run(tmp_path / "salmix", "saliencymix", 0.50, data_time=0.10)]
    rows = {row["method"]: row for row in report(*runs)}
    assert rows["none"]["data_wait"] == pytest.approx(0.04) and not rows["none"]["input_bound"]
    assert rows["saliencymix"]["data_wait"] == pytest.approx(0.2) and rows["saliencymix"]["input_bound"]
    printed = run_tool("tools/cost_report.py", *runs).stdout
    assert "4.0%" in printed and "20.0% (input-bound)" in printed
