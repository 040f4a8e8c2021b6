"""Did a pretraining run train stably and reach its plateau? A comparison of backbones means
something only if every arm did: an undertrained arm loses for its schedule, not its method.

Read from a finished run folder (``metrics.json``, ``config.yaml``). The last two verdicts fit a
least-squares line over the last fifth of training rather than comparing two points: a single
evaluation on a few hundred images, or a single loss window of a mixing arm (half its batches
mixed), moves by more than the change they judge.

- stable: no training-loss window after the warm-up above the starting loss (the first window's:
  what the untrained network scored; ln of the number of classes where it predicts uniformly) by
  more than twice the standard error of their difference (from each window's
  ``loss_standard_error``; runs logged without it are held to the bare starting loss);
- loss not rising: the line through the loss windows of the last fifth does not rise by more than
  twice its standard error (a rise the noise of the windows does not explain). That error comes
  from the windows' logged standard errors where they were logged: a dozen windows are too few
  to measure their own scatter (an example from the demo: docs/pretraining.md, convergence
  checks); runs logged without them fall back on the line's residuals;
- plateaued: the line through the validation top-1 errors from the evaluation at or before four
  fifths of training to the final one falls by at most ``PLATEAU_POINTS`` over that span (with
  those two evaluations alone, their difference); this needs an evaluation before the last fifth
  (``TEST.EVAL_PERIOD``).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from scipy import stats

from pretrain.run_folder import read_config, read_metrics

LAST_FIFTH = 0.8
PLATEAU_POINTS = 1.0  # percentage points of top-1 error
RISE_STANDARD_ERRORS = 2.0


def summarize(run: Path) -> dict:
    """The figures and verdicts above for one run folder."""
    cfg = read_config(run)
    records = read_metrics(run)
    windows = [record for record in records if "loss" in record]
    if not windows:
        raise ValueError(f"{run / 'metrics.json'} has no training-loss lines")
    per_epoch = windows[-1]["iterations_per_epoch"]
    total = cfg.SOLVER.EPOCHS * per_epoch
    warmup = cfg.SOLVER.WARMUP_EPOCHS * per_epoch
    after_warmup = [w for w in windows if w["iteration"] > warmup + cfg.LOG_PERIOD]
    evaluations = {record["iteration"]: record["top1_error"] for record in records if "top1_error" in record}
    before_last_fifth = [it for it in evaluations if it <= LAST_FIFTH * total]
    last_fifth = [w for w in windows if w["iteration"] > LAST_FIFTH * total]
    summary = {
        "chance_loss": math.log(cfg.MODEL.NUM_CLASSES),
        "first_loss": windows[0]["loss"],
        "peak_loss_after_warmup": max(w["loss"] for w in after_warmup) if after_warmup else None,
        "final_loss": mean_loss(windows, 0.9 * total, total),
        "loss_rise_over_last_fifth": None,
        "top1_error_at_four_fifths": evaluations[max(before_last_fifth)] if before_last_fifth else None,
        "final_top1_error": evaluations[max(evaluations)] if evaluations else None,
        "top1_improvement_over_last_fifth": None,
        "chance_top1_error": 100.0 * (1 - 1 / cfg.MODEL.NUM_CLASSES),
    }
    summary["stable"] = all(w["loss"] <= spike_threshold(windows[0], w) for w in after_warmup)
    summary["loss_not_rising"] = True
    if len(last_fifth) >= 3:
        iterations = [w["iteration"] for w in last_fifth]
        line = stats.linregress(iterations, [w["loss"] for w in last_fifth])
        summary["loss_rise_over_last_fifth"] = float(line.slope) * (iterations[-1] - iterations[0])
        summary["loss_not_rising"] = bool(line.slope <= RISE_STANDARD_ERRORS * slope_error(last_fifth, line))
    summary["plateaued"] = None
    if before_last_fifth:
        judged = {it: error for it, error in evaluations.items() if it >= max(before_last_fifth)}
        if len(judged) >= 2:
            line = stats.linregress(list(judged), list(judged.values()))
            summary["top1_improvement_over_last_fifth"] = -float(line.slope) * (max(judged) - min(judged))
            summary["plateaued"] = summary["top1_improvement_over_last_fifth"] <= PLATEAU_POINTS
    return summary


def slope_error(windows: list[dict], line) -> float:
    """The standard error of the least-squares slope through ``windows``: propagated from their
    logged standard errors where every window has one, else estimated from the residuals."""
    if not all("loss_standard_error" in w for w in windows):
        return float(line.stderr)
    centre = statistics.mean(w["iteration"] for w in windows)
    spread = sum((w["iteration"] - centre) ** 2 for w in windows)
    return math.sqrt(sum(((w["iteration"] - centre) * w["loss_standard_error"]) ** 2 for w in windows)) / spread


def spike_threshold(first: dict, window: dict) -> float:
    """The loss above which ``window`` rose over the starting loss by more than the noise of the
    two window means (each averages a few batches; half a mixing arm's are mixed)."""
    spread = math.hypot(first.get("loss_standard_error", 0.0), window.get("loss_standard_error", 0.0))
    return first["loss"] + RISE_STANDARD_ERRORS * spread


def mean_loss(windows: list[dict], start: float, end: float) -> float | None:
    """The mean loss of the logging windows that end in ``(start, end]``."""
    losses = [w["loss"] for w in windows if start < w["iteration"] <= end]
    return statistics.mean(losses) if losses else None


def verdict(summary: dict) -> str:
    """One short line: what holds and what does not."""
    words = ["stable" if summary["stable"] else "loss spiked after warm-up",
             "loss flat or falling" if summary["loss_not_rising"] else "loss rising at the end"]
    words.append({True: "plateaued", False: "still improving",
                  None: "plateau unknown (no evaluation before the last fifth)"}[summary["plateaued"]])
    return ", ".join(words)
