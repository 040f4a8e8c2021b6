"""The gain report of ``tools/compare.py``: detection runs grouped by pretraining method, mean ±
std of AP / AP50 / AP75 per method, and each method's gain over a baseline with a 95% Welch
confidence interval. Plain functions over the dicts of ``detection.records.read_run``.

Detection scores move by a few tenths between seeds (in the VOC transfer protocol the std of
AP50 over seeds is about 0.2), so a gain only means something next to its interval
(``detection.stats``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from detection.records import EVAL_RESULTS, PROTOCOL_KEYS, RUN_INFO, read_run
from detection.stats import CONFIDENCE, mean_and_std, welch_interval
from pretrain.atomic_file import atomic_write, atomic_write_json

METRICS = ("AP", "AP50", "AP75")
CHART_METRIC = "AP50"
GAIN_COLUMNS = ("AP50", "AP", "AP75")  # the headline gain first
NOT_AVAILABLE = "n/a"
OUTPUT_NAMES = {"csv": "comparison.csv", "json": "comparison.json", "png": "comparison.png"}

# ------------------------------------------------------------------------------ the runs


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The run folders named by ``paths``: a folder with ``run_info.json`` is a run; any other
    folder stands for every folder below it that has one (e.g. ``trial_0``, ``trial_1`` of a
    multi-trial run). A folder given twice, or also through its parent, counts once."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run folder")
        if (path / RUN_INFO).is_file():
            runs = [path]
        else:
            runs = sorted(info.parent for info in path.rglob(RUN_INFO)) or [path]  # [path]: read_run names it
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def run_scores(run: dict) -> dict[str, float]:
    """AP, AP50 and AP75 of a run, as numbers."""
    bbox = run["results"]["bbox"]
    scores = {}
    for metric in METRICS:
        value = bbox.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{Path(run['dir']) / EVAL_RESULTS}: bbox {metric} is {value!r}, "
                             "expected a finite number")
        scores[metric] = float(value)
    return scores


def load_runs(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Every finished run under ``paths`` (``read_run``'s dicts); errors name the folder."""
    runs = [read_run(folder) for folder in find_run_dirs(paths)]
    for run in runs:
        run_scores(run)  # fail now, naming the file, rather than mid-report
    return runs


def group_by_method(runs: list[dict], baseline: str) -> dict[str, list[dict]]:
    """Runs per pretraining method, the baseline first and the others alphabetically."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(str(run["info"].get("method", "unknown")), []).append(run)
    if baseline not in groups:
        raise ValueError(f"baseline method {baseline!r} is not among the runs; available methods: "
                         f"{', '.join(sorted(groups))} (choose one with --baseline)")
    return {method: groups[method] for method in [baseline, *sorted(set(groups) - {baseline})]}


def protocol_warnings(runs: list[dict]) -> list[str]:
    """One warning per ``PROTOCOL_KEYS`` setting on which the runs disagree: scores of runs
    trained or tested differently do not compare. It names every value, and the runs of each
    value but the most common one (those are all the others)."""
    warnings = []
    for key in PROTOCOL_KEYS:
        runs_by_value: dict[str, list[str]] = {}
        for run in runs:
            value = json.dumps(run["info"][key], sort_keys=True) if key in run["info"] else "(missing)"
            runs_by_value.setdefault(value, []).append(run["dir"])
        if len(runs_by_value) > 1:
            common, *others = sorted(runs_by_value.items(), key=lambda item: -len(item[1]))
            details = [f"{value} in {', '.join(dirs)}" for value, dirs in others]
            details.append(f"{common[0]} in the other {len(common[1])} run{'s' * (len(common[1]) > 1)}")
            warnings.append(f"runs disagree on {key}: {'; '.join(details)}")
    return warnings


def single_trial_warnings(groups: dict[str, list[dict]]) -> list[str]:
    """One warning per method with a single run: it has no std and no confidence interval."""
    return [f"method {method!r} has a single trial ({runs[0]['dir']}): no std and no confidence "
            f"interval ({NOT_AVAILABLE})" for method, runs in groups.items() if len(runs) == 1]


# ----------------------------------------------------------------------------- the report


def summarize_method(runs: list[dict]) -> dict:
    """Trials, per-run scores and dirs, mean and std per metric of one method's runs."""
    per_run = [{"dir": run["dir"], "seed": run["info"].get("seed"), **run_scores(run)} for run in runs]
    stats = {metric: mean_and_std([row[metric] for row in per_run]) for metric in METRICS}
    return {"trials": len(runs), "runs": per_run,
            "mean": {metric: mean for metric, (mean, _) in stats.items()},
            "std": {metric: std for metric, (_, std) in stats.items()}}


def compare_runs(runs: list[dict], baseline: str = "none", confidence: float = CONFIDENCE) -> dict:
    """The whole report as a JSON-ready dict: per method its summary and its gain over
    ``baseline`` per metric (None for the baseline itself), plus the warnings."""
    groups = group_by_method(runs, baseline)
    methods = {method: summarize_method(group) for method, group in groups.items()}
    for method, summary in methods.items():
        summary["is_baseline"] = method == baseline
        summary["gain"] = None if method == baseline else {
            metric: welch_interval([row[metric] for row in summary["runs"]],
                                   [row[metric] for row in methods[baseline]["runs"]], confidence)
            for metric in METRICS}
    return {"baseline": baseline, "confidence": confidence, "metrics": list(METRICS),
            "methods": methods, "warnings": single_trial_warnings(groups) + protocol_warnings(runs)}


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def format_mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {NOT_AVAILABLE if std is None else f'{std:.2f}'}"


def format_gain(gain: dict) -> str:
    """``+1.77 [+1.40, +2.14]``, or ``+1.77 [n/a]`` without an interval."""
    if gain["low"] is None:
        return f"{_signed(gain['gain'])} [{NOT_AVAILABLE}]"
    return f"{_signed(gain['gain'])} [{_signed(gain['low'])}, {_signed(gain['high'])}]"


def format_table(report: dict) -> str:
    """The printed table: a row per method with trials, mean ± std and the gains."""
    confidence = f"{100 * report['confidence']:g}% CI"
    header = ["method", "trials", *METRICS, *(f"gain {metric} [{confidence}]" for metric in GAIN_COLUMNS)]
    rows = []
    for method, summary in report["methods"].items():
        scores = [format_mean_std(summary["mean"][metric], summary["std"][metric]) for metric in METRICS]
        if summary["is_baseline"]:
            gains = ["(baseline)"] * len(GAIN_COLUMNS)
        else:
            gains = [format_gain(summary["gain"][metric]) for metric in GAIN_COLUMNS]
        rows.append([method, str(summary["trials"]), *scores, *gains])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"gain: difference of means over {report['baseline']!r}, Welch t-interval")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the files


def default_output_dir(runs: list[dict]) -> Path:
    """The deepest folder holding all the runs (their common parent): beside the runs compared."""
    return Path(os.path.commonpath([str(Path(run["dir"]).resolve().parent) for run in runs]))


def csv_rows(report: dict) -> list[list]:
    """The table for a spreadsheet: full precision, one column per number, ``n/a`` when absent."""
    def cell(value):
        return NOT_AVAILABLE if value is None else value

    header = ["method", "is_baseline", "trials"]
    header += [f"{metric}_{stat}" for metric in METRICS for stat in ("mean", "std")]
    header += [f"gain_{metric}{suffix}" for metric in METRICS for suffix in ("", "_low", "_high", "_df")]
    rows = [header]
    for method, summary in report["methods"].items():
        row = [method, summary["is_baseline"], summary["trials"]]
        row += [cell(summary[stat][metric]) for metric in METRICS for stat in ("mean", "std")]
        gain = summary["gain"] or {metric: {} for metric in METRICS}
        row += [cell(gain[metric].get(part)) for metric in METRICS for part in ("gain", "low", "high", "df")]
        rows.append(row)
    return rows


def write_csv(report: dict, path: Path) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(csv_rows(report))
    atomic_write(path, lambda stream: stream.write(text.getvalue().encode()))


def write_chart(report: dict, path: Path) -> None:
    """Bar chart of mean AP50 per method with std error bars and each trial as a dot beside; the
    baseline grey and hatched with a dashed line at its mean, every other bar labelled with its
    gain and interval. The y axis is zoomed on the scores: the gains are tenths of a point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, summaries = list(report["methods"]), list(report["methods"].values())
    means = [summary["mean"][CHART_METRIC] for summary in summaries]
    stds = [summary["std"][CHART_METRIC] or 0.0 for summary in summaries]
    trial_values = [[row[CHART_METRIC] for row in summary["runs"]] for summary in summaries]

    figure = Figure(figsize=(max(4.0, 1.6 * len(summaries) + 1.5), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(summaries))
    colours = ["0.7" if summary["is_baseline"] else "tab:blue" for summary in summaries]
    axes.bar(positions, means, yerr=stds, capsize=6, color=colours, edgecolor="black",
             hatch=["//" if summary["is_baseline"] else "" for summary in summaries])
    for position, values in zip(positions, trial_values):
        axes.plot([position + 0.25] * len(values), values, "o", color="black", markersize=3, alpha=0.6)
    baseline_mean = report["methods"][report["baseline"]]["mean"][CHART_METRIC]
    axes.axhline(baseline_mean, color="0.4", linestyle="--", linewidth=1)

    low = min(min(values) for values in trial_values + [[m - s for m, s in zip(means, stds)]])
    high = max(max(values) for values in trial_values + [[m + s for m, s in zip(means, stds)]])
    margin = max(0.5, 0.25 * (high - low))
    axes.set_ylim(low - margin, high + 1.6 * margin)
    for position, summary, top in zip(positions, summaries, [m + s for m, s in zip(means, stds)]):
        label = "baseline" if summary["is_baseline"] else format_gain(summary["gain"][CHART_METRIC])
        axes.annotate(label, (position, max(top, *trial_values[position])), xytext=(0, 6),
                      textcoords="offset points", ha="center", fontsize=8)
    axes.set_xticks(list(positions), [f"{name}\n({summary['trials']} trial{'s' * (summary['trials'] > 1)})"
                                      for name, summary in zip(names, summaries)])
    axes.set_ylabel(f"VOC {CHART_METRIC} (%)")
    axes.set_title(f"{CHART_METRIC}: mean ± std over trials; gain over {report['baseline']!r} "
                   f"[{100 * report['confidence']:g}% CI]", fontsize=9)

    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=120))


def write_report(report: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """``comparison.csv``, ``.json`` and ``.png`` in ``output_dir``, each written atomically."""
    paths = {kind: Path(output_dir) / name for kind, name in OUTPUT_NAMES.items()}
    write_csv(report, paths["csv"])
    atomic_write_json(paths["json"], report)
    write_chart(report, paths["png"])
    return paths
