"""pretrain.convergence: whether a pretraining run trained stably and reached its plateau, read
from the records tools/pretrain_net.py leaves (config.yaml, metrics.json lines)."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from pretrain import convergence
from pretrain.config import get_cfg

EPOCHS, PER_EPOCH, LOG_PERIOD = 10, 20, 5


def write_run(folder, losses, errors, warmup_epochs=1.0, classes=5, standard_error=None):
    """A run folder: one loss window per LOG_PERIOD iterations (each with ``standard_error`` where
    given, as tools/pretrain_net.py logs it), one evaluation per epoch (as many epochs as ``errors``)."""
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = classes
    cfg.SOLVER.EPOCHS = len(errors)
    cfg.SOLVER.WARMUP_EPOCHS = warmup_epochs
    cfg.LOG_PERIOD = LOG_PERIOD
    folder.mkdir()
    (folder / "config.yaml").write_text(cfg.dump())
    lines = []
    for index, loss in enumerate(losses):
        iteration = (index + 1) * LOG_PERIOD
        lines.append({"iteration": iteration, "loss": loss, "iterations_per_epoch": PER_EPOCH,
                      "window_iterations": LOG_PERIOD, "window_seconds": 1.0})
        if standard_error is not None:
            lines[-1]["loss_standard_error"] = standard_error
        if iteration % PER_EPOCH == 0:
            lines.append({"iteration": iteration, "epoch": iteration / PER_EPOCH,
                          "top1_error": errors[iteration // PER_EPOCH - 1]})
    (folder / "metrics.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def decaying(start, end, count):
    return [end + (start - end) * math.exp(-4 * k / count) for k in range(count)]


WINDOWS = EPOCHS * PER_EPOCH // LOG_PERIOD


def test_a_converged_run_is_stable_flat_and_plateaued(tmp_path):
    errors = [70, 50, 35, 25, 20, 18, 17, 16.5, 16.5, 16.0]
    summary = convergence.summarize(write_run(tmp_path / "run", decaying(1.6, 0.3, WINDOWS), errors))
    assert summary["chance_loss"] == pytest.approx(math.log(5))
    assert summary["stable"] and summary["loss_not_rising"] and summary["plateaued"]
    assert summary["top1_error_at_four_fifths"] == 16.5 and summary["final_top1_error"] == 16.0
    assert convergence.verdict(summary) == "stable, loss flat or falling, plateaued"


def test_a_spike_after_warmup_a_rising_loss_and_a_late_improvement_are_named(tmp_path):
    losses = decaying(1.6, 0.8, WINDOWS)
    losses[10] = 4.0  # after the 1-epoch warm-up (4 windows)
    losses[-4:] = [1.2, 1.3, 1.4, 1.5]  # the last tenth above the tenth before
    errors = [70, 60, 55, 50, 45, 40, 35, 30, 25, 20]
    summary = convergence.summarize(write_run(tmp_path / "run", losses, errors))
    assert summary["peak_loss_after_warmup"] == 4.0
    assert not summary["stable"] and not summary["loss_not_rising"] and not summary["plateaued"]
    assert convergence.verdict(summary) == "loss spiked after warm-up, loss rising at the end, still improving"


def test_the_plateau_is_judged_on_the_line_through_the_last_fifths_evaluations(tmp_path):
    head = [70, 50, 35, 25, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.8, 2.6]  # 20 epochs: 16 .. 20 judged
    noisy = head + [2.4, 1.0, 2.4, 2.4, 0.8]  # 1.6 points apart at the ends, a fitted fall of 0.72
    summary = convergence.summarize(write_run(tmp_path / "noisy", decaying(1.6, 0.3, 2 * WINDOWS), noisy))
    assert summary["top1_error_at_four_fifths"] == 2.4 and summary["final_top1_error"] == 0.8
    assert summary["top1_improvement_over_last_fifth"] == pytest.approx(0.72)
    assert summary["plateaued"]
    falling = head + [8.8, 7.6, 6.4, 6.2, 6.6]  # ends 2.2 apart, a fitted fall of 2.32: still learning
    summary = convergence.summarize(write_run(tmp_path / "falling", decaying(1.6, 0.3, 2 * WINDOWS), falling))
    assert summary["top1_improvement_over_last_fifth"] == pytest.approx(2.32)
    assert not summary["plateaued"]


def test_a_rise_the_noise_of_the_loss_windows_explains_is_not_a_rising_loss(tmp_path):
    losses = decaying(1.6, 0.6, WINDOWS)
    last_fifth = WINDOWS // 5
    # A mixing arm's windows: mixed and plain batches alternate, the last tenth a little higher
    losses[-last_fifth:] = [0.5, 0.8, 0.6, 0.45, 0.7, 0.5, 0.8, 0.6]
    summary = convergence.summarize(write_run(tmp_path / "noisy", losses, [50] * EPOCHS))
    assert summary["final_loss"] > statistics.mean(losses[-last_fifth:-last_fifth // 2])
    assert summary["loss_not_rising"]
    losses[-last_fifth:] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85]  # a steady climb
    summary = convergence.summarize(write_run(tmp_path / "climbing", losses, [50] * EPOCHS))
    assert summary["loss_rise_over_last_fifth"] == pytest.approx(0.35)  # the line from the first window to the last
    assert not summary["loss_not_rising"]
    climbing = write_run(tmp_path / "climbing, logged errors", losses, [50] * EPOCHS, standard_error=0.02)
    assert not convergence.summarize(climbing)["loss_not_rising"]


def test_the_rise_is_weighed_against_the_windows_logged_errors_where_there_are_some(tmp_path):
    losses = decaying(1.6, 0.6, WINDOWS)
    # Windows of half-mixed batches that happen to end high: a line through them rises by 3.6
    # standard errors of its residuals, by 1.5 of those the windows' own spreads give
    losses[-8:] = [0.66, 0.70, 0.75, 0.66, 0.72, 0.87, 0.80, 0.90]
    bare = convergence.summarize(write_run(tmp_path / "bare", losses, [50] * EPOCHS))
    logged = convergence.summarize(write_run(tmp_path / "logged", losses, [50] * EPOCHS, standard_error=0.13))
    assert bare["loss_rise_over_last_fifth"] == pytest.approx(logged["loss_rise_over_last_fifth"])
    assert not bare["loss_not_rising"] and logged["loss_not_rising"]


def test_stable_is_measured_against_the_starting_loss(tmp_path):
    losses = decaying(1.9, 0.5, WINDOWS)  # an untrained network a little worse than uniform
    losses[10] = 1.8  # after the warm-up: above ln 5, below the start
    summary = convergence.summarize(write_run(tmp_path / "below", losses, [50] * EPOCHS))
    assert summary["first_loss"] == pytest.approx(1.9) and summary["peak_loss_after_warmup"] == 1.8
    assert summary["stable"]
    losses[10] = 1.95
    assert not convergence.summarize(write_run(tmp_path / "above", losses, [50] * EPOCHS))["stable"]


def test_a_window_above_the_starting_loss_by_less_than_its_noise_is_no_spike(tmp_path):
    losses = decaying(1.77, 0.5, WINDOWS)
    losses[10] = 1.79  # 0.02 above the start, whose window mean is uncertain by 0.05
    summary = convergence.summarize(write_run(tmp_path / "noisy", losses, [50] * EPOCHS, standard_error=0.05))
    assert summary["peak_loss_after_warmup"] == 1.79 and summary["stable"]
    losses[10] = 1.77 + 2 * math.hypot(0.05, 0.05) + 0.01  # beyond twice the error of the difference
    assert not convergence.summarize(write_run(tmp_path / "spike", losses, [50] * EPOCHS, standard_error=0.05))["stable"]
    losses[10] = 1.79  # the same small rise, logged without errors: held to the bare start
    assert not convergence.summarize(write_run(tmp_path / "bare", losses, [50] * EPOCHS))["stable"]


def test_a_spike_inside_the_warmup_is_allowed(tmp_path):
    losses = decaying(1.6, 0.5, WINDOWS)
    losses[1] = 6.0  # iteration 10, inside the 1-epoch warm-up
    summary = convergence.summarize(write_run(tmp_path / "run", losses, [50] * EPOCHS))
    assert summary["stable"] and summary["peak_loss_after_warmup"] < 1.6


def test_without_an_evaluation_before_the_last_fifth_the_plateau_is_unknown(tmp_path):
    folder = write_run(tmp_path / "run", decaying(1.6, 0.5, WINDOWS), [50] * EPOCHS)
    records = [json.loads(line) for line in (folder / "metrics.json").read_text().splitlines()]
    kept = [r for r in records if "top1_error" not in r or r["iteration"] == EPOCHS * PER_EPOCH]
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in kept))
    summary = convergence.summarize(folder)
    assert summary["plateaued"] is None and "plateau unknown" in convergence.verdict(summary)


def test_a_folder_without_records_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        convergence.summarize(tmp_path)
