"""The gain report of ``tools/compare.py``: detection runs grouped by test dataset (VOC and COCO
runs never in one group) and, within a group, by pretraining method: mean ± std per metric and
method, and each method's gain over a baseline with a 95% Welch confidence interval. Plain
functions over the dicts of ``detection.records.read_run``.

The metrics are the box AP, AP50 and AP75 every run has (VOC's), and COCO's APs / APm / APl and
mask (``segm_``) metrics where every run of the group has them as numbers.

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

REQUIRED_METRICS = ("AP", "AP50", "AP75")  # box AP of every run, VOC or COCO
SIZE_METRICS = ("APs", "APm", "APl")  # COCO's, by object size
MASK_PREFIX = "segm_"  # mask metrics: segm_AP, segm_AP50, ...
# One printed table each, so that tables stay narrow: boxes, boxes by size, masks, masks by size.
METRIC_TABLES = (REQUIRED_METRICS, SIZE_METRICS, *(tuple(MASK_PREFIX + metric for metric in table)
                                                   for table in (REQUIRED_METRICS, SIZE_METRICS)))
METRICS = tuple(metric for table in METRIC_TABLES for metric in table)
HEADLINE = {"voc": "AP50", "coco": "AP"}  # per dataset kind: the chart's metric, the first gain column
NOT_AVAILABLE = "n/a"
OUTPUT_KINDS = ("csv", "json", "png")

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
    """The run's metrics (``METRICS``) that are numbers; box AP, AP50 and AP75 must be."""
    results = run["results"]
    scores = {}
    for metric in METRICS:
        task, name = ("segm", metric[len(MASK_PREFIX):]) if metric.startswith(MASK_PREFIX) else ("bbox", metric)
        value = results.get(task, {}).get(name)
        if _is_number(value):
            scores[metric] = float(value)
        elif metric in REQUIRED_METRICS:
            raise ValueError(f"{Path(run['dir']) / EVAL_RESULTS}: bbox {metric} is {value!r}, "
                             "expected a finite number")
    return scores


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_runs(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Every finished run under ``paths`` (``read_run``'s dicts); errors name the folder."""
    runs = [read_run(folder) for folder in find_run_dirs(paths)]
    for run in runs:
        run_scores(run)  # fail now, naming the file, rather than mid-report
    return runs


def test_set(run: dict) -> str:
    """The test dataset(s) a run was scored on, the name of its comparison group."""
    return "+".join(run["info"]["test_datasets"])


def group_by_dataset(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs per test dataset, in order of first appearance; a name scored as VOC in one run and
    as COCO in another is refused (their scores do not compare)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(test_set(run), []).append(run)
    for name, group in groups.items():
        kinds = {run["info"]["dataset_kind"]: run["dir"] for run in group}
        if len(kinds) > 1:
            raise ValueError(f"runs tested on {name} were scored differently: "
                             f"{'; '.join(f'{kind} in {folder}' for kind, folder in sorted(kinds.items()))}")
    return groups


def group_by_method(runs: list[dict], baseline: str) -> dict[str, list[dict]]:
    """Runs per pretraining method, the baseline first and the others alphabetically."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(str(run["info"].get("method", "unknown")), []).append(run)
    if baseline not in groups:
        raise ValueError(f"baseline method {baseline!r} is not among the runs; available methods: "
                         f"{', '.join(sorted(groups))} (runs tested on {test_set(runs[0])}; choose one with --baseline)")
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


def shared_metrics(runs: list[dict]) -> tuple[list[str], list[str]]:
    """The metrics every run has as a number, and a warning per metric that only some runs have."""
    scores = [(run["dir"], run_scores(run)) for run in runs]
    shared = [metric for metric in METRICS if all(metric in values for _, values in scores)]
    warnings = []
    for metric in METRICS:
        lacking = [folder for folder, values in scores if metric not in values]
        if metric not in shared and len(lacking) < len(runs):
            warnings.append(f"{metric} is not a number in {', '.join(lacking)}: left out of the comparison")
    return shared, warnings


def summarize_method(runs: list[dict], metrics: list[str]) -> dict:
    """Trials, per-run scores and dirs, mean and std per metric of one method's runs."""
    per_run = [{"dir": run["dir"], "seed": run["info"].get("seed"),
                **{metric: run_scores(run)[metric] for metric in metrics}} for run in runs]
    stats = {metric: mean_and_std([row[metric] for row in per_run]) for metric in metrics}
    return {"trials": len(runs), "runs": per_run,
            "mean": {metric: mean for metric, (mean, _) in stats.items()},
            "std": {metric: std for metric, (_, std) in stats.items()}}


def compare_runs(runs: list[dict], baseline: str = "none", confidence: float = CONFIDENCE) -> dict:
    """The report of runs on one test dataset (see ``group_by_dataset``) as a JSON-ready dict:
    the dataset and its kind, the metrics, per method its summary and its gain over ``baseline``
    per metric (None for the baseline itself), plus the warnings."""
    datasets = group_by_dataset(runs)
    if len(datasets) > 1:
        raise ValueError(f"runs tested on different datasets ({', '.join(datasets)}) do not compare: "
                         f"compare each dataset's runs on their own")
    groups = group_by_method(runs, baseline)
    metrics, metric_warnings = shared_metrics(runs)
    methods = {method: summarize_method(group, metrics) for method, group in groups.items()}
    for method, summary in methods.items():
        summary["is_baseline"] = method == baseline
        summary["gain"] = None if method == baseline else {
            metric: welch_interval([row[metric] for row in summary["runs"]],
                                   [row[metric] for row in methods[baseline]["runs"]], confidence)
            for metric in metrics}
    return {"test_datasets": runs[0]["info"]["test_datasets"], "dataset_kind": runs[0]["info"]["dataset_kind"],
            "baseline": baseline, "confidence": confidence, "metrics": metrics, "methods": methods,
            "warnings": single_trial_warnings(groups) + protocol_warnings(runs) + metric_warnings}


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def format_mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {NOT_AVAILABLE if std is None else f'{std:.2f}'}"


def format_gain(gain: dict) -> str:
    """``+1.77 [+1.40, +2.14]``, or ``+1.77 [n/a]`` without an interval."""
    if gain["low"] is None:
        return f"{_signed(gain['gain'])} [{NOT_AVAILABLE}]"
    return f"{_signed(gain['gain'])} [{_signed(gain['low'])}, {_signed(gain['high'])}]"


def headline_metric(report: dict) -> str:
    return HEADLINE[report["dataset_kind"]]


def format_table(report: dict) -> str:
    """The printed tables, one per ``METRIC_TABLES`` entry the report has metrics of: a row per
    method with trials, mean ± std and the gains (the headline metric's gain first)."""
    tables = [_format_metrics_table(report, metrics) for table in METRIC_TABLES
              if (metrics := [metric for metric in table if metric in report["metrics"]])]
    return "\n\n".join(tables) + f"\ngain: difference of means over {report['baseline']!r}, Welch t-interval"


def _format_metrics_table(report: dict, metrics: list[str]) -> str:
    confidence = f"{100 * report['confidence']:g}% CI"
    gain_columns = sorted(metrics, key=lambda metric: metric != headline_metric(report))
    header = ["method", "trials", *metrics, *(f"gain {metric} [{confidence}]" for metric in gain_columns)]
    rows = []
    for method, summary in report["methods"].items():
        scores = [format_mean_std(summary["mean"][metric], summary["std"][metric]) for metric in metrics]
        if summary["is_baseline"]:
            gains = ["(baseline)"] * len(gain_columns)
        else:
            gains = [format_gain(summary["gain"][metric]) for metric in gain_columns]
        rows.append([method, str(summary["trials"]), *scores, *gains])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the files


def default_output_dir(runs: list[dict]) -> Path:
    """The deepest folder holding all the runs (their common parent): beside the runs compared."""
    return Path(os.path.commonpath([str(Path(run["dir"]).resolve().parent) for run in runs]))


def csv_rows(report: dict) -> list[list]:
    """The table for a spreadsheet: full precision, one column per number, ``n/a`` when absent."""
    def cell(value):
        return NOT_AVAILABLE if value is None else value

    metrics = report["metrics"]
    header = ["method", "is_baseline", "trials"]
    header += [f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std")]
    header += [f"gain_{metric}{suffix}" for metric in metrics for suffix in ("", "_low", "_high", "_df")]
    rows = [header]
    for method, summary in report["methods"].items():
        row = [method, summary["is_baseline"], summary["trials"]]
        row += [cell(summary[stat][metric]) for metric in metrics for stat in ("mean", "std")]
        gain = summary["gain"] or {metric: {} for metric in metrics}
        row += [cell(gain[metric].get(part)) for metric in metrics for part in ("gain", "low", "high", "df")]
        rows.append(row)
    return rows


def write_csv(report: dict, path: Path) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(csv_rows(report))
    atomic_write(path, lambda stream: stream.write(text.getvalue().encode()))


def write_chart(report: dict, path: Path) -> None:
    """Bar chart of the mean headline metric (VOC AP50, COCO box AP) per method with std error bars and each trial as a dot beside; the
    baseline grey and hatched with a dashed line at its mean, every other bar labelled with its
    gain and interval. The y axis is zoomed on the scores: the gains are tenths of a point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chart_metric = headline_metric(report)
    names, summaries = list(report["methods"]), list(report["methods"].values())
    means = [summary["mean"][chart_metric] for summary in summaries]
    stds = [summary["std"][chart_metric] or 0.0 for summary in summaries]
    trial_values = [[row[chart_metric] for row in summary["runs"]] for summary in summaries]

    figure = Figure(figsize=(max(4.0, 1.6 * len(summaries) + 1.5), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(summaries))
    colours = ["0.7" if summary["is_baseline"] else "tab:blue" for summary in summaries]
    axes.bar(positions, means, yerr=stds, capsize=6, color=colours, edgecolor="black",
             hatch=["//" if summary["is_baseline"] else "" for summary in summaries])
    for position, values in zip(positions, trial_values):
        axes.plot([position + 0.25] * len(values), values, "o", color="black", markersize=3, alpha=0.6)
    baseline_mean = report["methods"][report["baseline"]]["mean"][chart_metric]
    axes.axhline(baseline_mean, color="0.4", linestyle="--", linewidth=1)

    low = min(min(values) for values in trial_values + [[m - s for m, s in zip(means, stds)]])
    high = max(max(values) for values in trial_values + [[m + s for m, s in zip(means, stds)]])
    margin = max(0.5, 0.25 * (high - low))
    axes.set_ylim(low - margin, high + 1.6 * margin)
    for position, summary, top in zip(positions, summaries, [m + s for m, s in zip(means, stds)]):
        label = "baseline" if summary["is_baseline"] else format_gain(summary["gain"][chart_metric])
        axes.annotate(label, (position, max(top, *trial_values[position])), xytext=(0, 6),
                      textcoords="offset points", ha="center", fontsize=8)
    axes.set_xticks(list(positions), [f"{name}\n({summary['trials']} trial{'s' * (summary['trials'] > 1)})"
                                      for name, summary in zip(names, summaries)])
    axes.set_ylabel(f"{report['dataset_kind'].upper()} {chart_metric} (%)")
    axes.set_title(f"{chart_metric}: mean ± std over trials; gain over {report['baseline']!r} "
                   f"[{100 * report['confidence']:g}% CI]", fontsize=9)

    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=120))


def write_report(report: dict, output_dir: str | os.PathLike, suffix: str = "") -> dict[str, Path]:
    """``comparison<suffix>.csv``, ``.json`` and ``.png`` in ``output_dir``, each written atomically."""
    paths = {kind: Path(output_dir) / f"comparison{suffix}.{kind}" for kind in OUTPUT_KINDS}
    write_csv(report, paths["csv"])
    atomic_write_json(paths["json"], report)
    write_chart(report, paths["png"])
    return paths
