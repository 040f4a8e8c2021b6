"""The study report: one table per measurement, each arm's figure beside the paper's, read from
whatever the study folder holds so far (a figure not measured yet is missing, never zero):

- ImageNet (or CIFAR) top-1 / top-5 error of the finished pretrainings, with whether each trained
  stably and reached its plateau (``pretrain.convergence``), and of the weights files arms start
  from, each against the error its authors state (a gap over 0.3 points flags a bad download);
- VOC AP50 / AP / AP75, mean ± std over the finished trials, and the gain over the baseline
  with its 95% Welch interval (the statistics of ``tools/compare.py``), beside the top-1 error of
  the backbone that was transferred;
- with the COCO stage, COCO box (and mask) AP the same way;
- top-1 accuracy under FGSM at the configured epsilon;
- training time per epoch relative to the baseline (the figures of ``tools/cost_report.py``);
- the weights file (path and sha256) each arm's stages read, so a result says which file it came from.

Written as ``study_report.md``, ``study_report.json`` and one bar chart per table.
"""
from __future__ import annotations

import json
from pathlib import Path

from fvcore.common.config import CfgNode

from detection.report import compare_runs, format_gain, format_mean_std, load_runs
from pretrain import convergence
from pretrain.atomic_file import atomic_write, atomic_write_json
from pretrain.cost import cost_table, data_wait_text, read_run
from pretrain.run_folder import read_metrics
from study_runner import records
from study_runner.config import weights_file
from study_runner.paper import PAPER_TABLES, PaperTable, published, stated_top1_error
from study_runner.stages import REPORT_JSON, build_stages, fgsm_result, pretrain_dir, verify_result

MISSING = "missing"
NOT_TRAINED = "not trained here"  # an arm started from a weights file
VERIFY_TOLERANCE = 0.3  # top-1 points between a weights file's error here and the error its authors state
REPORT_MARKDOWN = "study_report.md"


def final_evaluation(run: Path) -> dict | None:
    """The last evaluation a finished pretraining logged (``metrics.json``), or None."""
    if not (run / "model_final.pth").is_file() or not (run / "metrics.json").is_file():
        return None
    evaluations = [record for record in read_metrics(run) if "top1_error" in record]
    return evaluations[-1] if evaluations else None


def row(method: str, ours: float | None, paper: float | None, **columns) -> dict:
    return {"method": method, "ours": ours, "paper": paper, **columns}


def arm_evaluation(cfg: CfgNode, method: str) -> dict | None:
    """The error of an arm's classifier: its pretraining's last evaluation, or its weights file's
    on the validation set (the verify stage), or None."""
    if weights_file(cfg, method) is None:
        return final_evaluation(pretrain_dir(cfg, method))
    path = verify_result(cfg, method)
    return json.loads(path.read_text()) if path.is_file() else None


def file_check(ours: float | None, stated: float | None) -> str | None:
    """Whether a weights file shows the error its authors state: a gap over ``VERIFY_TOLERANCE``
    points means a wrong or corrupted download (or another evaluation transform)."""
    if ours is None:
        return None
    if stated is None:
        return "no stated error to check against"
    if abs(ours - stated) <= VERIFY_TOLERANCE:
        return f"as stated ({stated:.2f}, within {VERIFY_TOLERANCE})"
    return f"DIFFERS from the stated {stated:.2f} by {ours - stated:+.2f}: a wrong or corrupted file?"


def classification_table(cfg: CfgNode, paper: PaperTable | None) -> dict:
    rows = []
    for method in cfg.STUDY.METHODS:
        source = weights_file(cfg, method)
        result = arm_evaluation(cfg, method) or {}
        health = training_health(pretrain_dir(cfg, method)) if result and source is None else {}
        training = convergence.verdict(health) if health else NOT_TRAINED if source else None
        rows.append(row(method, result.get("top1_error"), paper and published(paper.top1_error, method),
                        top5_ours=result.get("top5_error"), top5_paper=paper and published(paper.top5_error, method),
                        weights=f"file {cfg.PRETRAIN.WEIGHTS[method]}" if source else "trained here",
                        check=file_check(result.get("top1_error"), stated_top1_error(paper, method)) if source else "n/a",
                        error_at_four_fifths=health.get("top1_error_at_four_fifths"),
                        fall_over_last_fifth=health.get("top1_improvement_over_last_fifth"),
                        final_loss=health.get("final_loss"), first_loss=health.get("first_loss"),
                        peak_loss=health.get("peak_loss_after_warmup"), training=training))
    from_files = {"weights": "weights", "check": "file against its stated error"} if cfg.PRETRAIN.WEIGHTS else {}
    return {"name": "classification", "title": "Classification top-1 error (%), lower is better",
            "value": "top-1 error (%)",
            "columns": {"top5_ours": "top-5 error", "top5_paper": "paper top-5", **from_files,
                        "error_at_four_fifths": "top-1 at 4/5 of training",
                        "fall_over_last_fifth": "top-1 fall over the last fifth (fitted)", "final_loss": "final train loss",
                        "first_loss": "starting loss", "peak_loss": "peak loss after warm-up",
                        "training": "training"},
            "rows": rows}


def training_health(run: Path) -> dict:
    """``pretrain.convergence``'s summary of a finished run; empty where its records say nothing."""
    try:
        return convergence.summarize(run)
    except (FileNotFoundError, ValueError):
        return {}


def backbone_error(cfg: CfgNode, method: str) -> float | None:
    """The top-1 error of the backbone an arm transfers, to read beside its detector's AP."""
    return (arm_evaluation(cfg, method) or {}).get("top1_error")


def transfer_summaries(cfg: CfgNode, transfer: str) -> dict[str, dict]:
    """``compare_runs``' summary per arm of the finished trials of ``transfer`` (detect, coco)."""
    finished = sorted(result.parent for method in cfg.STUDY.METHODS
                      for result in (Path(cfg.OUTPUT_DIR) / transfer / method).glob("trial_*/eval_results.json"))
    if not finished:
        return {}
    runs = load_runs(finished)
    methods_run = sorted({run["info"]["method"] for run in runs})
    has_baseline = cfg.STUDY.BASELINE in methods_run
    summaries = compare_runs(runs, cfg.STUDY.BASELINE if has_baseline else methods_run[0])["methods"]
    if not has_baseline:  # no gain without the baseline's trials
        summaries = {method: {**summary, "gain": None} for method, summary in summaries.items()}
    return summaries


def detection_table(cfg: CfgNode, paper: PaperTable | None) -> dict:
    summaries = transfer_summaries(cfg, "detect")
    baseline_paper = paper and published(paper.voc_ap50, cfg.STUDY.BASELINE)
    rows = []
    for method in cfg.STUDY.METHODS:
        summary = summaries.get(method)
        paper_value = paper and published(paper.voc_ap50, method)
        gain = summary["gain"]["AP50"] if summary and summary["gain"] else None
        rows.append(row(
            method, summary and summary["mean"]["AP50"], paper_value,
            trials=f"{summary['trials'] if summary else 0}/{len(cfg.DETECT.SEEDS)}",
            backbone_top1=backbone_error(cfg, method),
            ap50=summary and format_mean_std(summary["mean"]["AP50"], summary["std"]["AP50"]),
            ap=summary and format_mean_std(summary["mean"]["AP"], summary["std"]["AP"]),
            ap75=summary and format_mean_std(summary["mean"]["AP75"], summary["std"]["AP75"]),
            gain="baseline" if method == cfg.STUDY.BASELINE else format_gain(gain) if gain else None,
            paper_gain=paper_gain(method, paper_value, baseline_paper, cfg.STUDY.BASELINE)))
    return {"name": "detection", "title": "VOC detection AP50 (%), mean over trials, higher is better",
            "value": "AP50", "columns": {"trials": "trials", "backbone_top1": "backbone top-1 error",
                                         "ap50": "AP50 mean ± std", "ap": "AP", "ap75": "AP75",
                                         "gain": "gain AP50 [95% CI]", "paper_gain": "paper gain"},
            "rows": rows}


def coco_table(cfg: CfgNode) -> dict:
    """COCO box AP (and mask AP with Mask R-CNN), mean ± std over trials, and the gains; the
    paper has no COCO figures."""
    summaries = transfer_summaries(cfg, "coco")
    rows = []
    for method in cfg.STUDY.METHODS:
        summary = summaries.get(method) or {"trials": 0, "mean": {}, "std": {}, "gain": None}
        means = {metric: format_mean_std(mean, summary["std"][metric]) for metric, mean in summary["mean"].items()}
        gains = {metric: format_gain(gain) for metric, gain in (summary["gain"] or {}).items()}
        if method == cfg.STUDY.BASELINE:
            gains = {"AP": "baseline", "segm_AP": "baseline"}
        rows.append(row(method, summary["mean"].get("AP"), None, trials=f"{summary['trials']}/{len(cfg.COCO.SEEDS)}",
                        backbone_top1=backbone_error(cfg, method),
                        ap=means.get("AP"), ap50=means.get("AP50"), ap75=means.get("AP75"),
                        mask_ap=means.get("segm_AP"), gain=gains.get("AP"), mask_gain=gains.get("segm_AP")))
    return {"name": "coco", "title": "COCO box AP (%), mean over trials, higher is better", "value": "box AP",
            "columns": {"trials": "trials", "backbone_top1": "backbone top-1 error", "ap": "box AP mean ± std", "ap50": "AP50", "ap75": "AP75",
                        "mask_ap": "mask AP", "gain": "gain box AP [95% CI]", "mask_gain": "gain mask AP [95% CI]"},
            "rows": rows}


def paper_gain(method: str, value: float | None, baseline_value: float | None, baseline: str) -> str | None:
    if method == baseline:
        return "baseline"
    return None if value is None or baseline_value is None else f"{value - baseline_value:+.2f}"


def robustness_table(cfg: CfgNode, paper: PaperTable | None) -> dict:
    rows = []
    for method in cfg.STUDY.METHODS:
        path = fgsm_result(cfg, method)
        result = json.loads(path.read_text()) if path.is_file() else {}
        rows.append(row(method, result.get("fgsm_top1_accuracy"), paper and published(paper.fgsm_accuracy, method),
                        clean=result.get("clean_top1_accuracy")))
    return {"name": "robustness",
            "title": f"Top-1 accuracy (%) under FGSM, epsilon {cfg.ROBUSTNESS.EPSILON:g}/255, higher is better",
            "value": "FGSM accuracy", "columns": {"clean": "clean accuracy"}, "rows": rows}


def cost_rows(cfg: CfgNode) -> dict[str, dict]:
    """The cost report's row per arm (its baseline is the run without mixing), when it can be made."""
    finished = {m: pretrain_dir(cfg, m) for m in cfg.STUDY.METHODS if (pretrain_dir(cfg, m) / "model_final.pth").is_file()}
    try:
        runs = {method: read_run(folder) for method, folder in finished.items()}
        by_label = {table_row["method"]: table_row for table_row in cost_table(list(runs.values()))}
    except (FileNotFoundError, ValueError):
        return {}
    return {method: by_label[run.method] for method, run in runs.items()}


def cost_table_rows(cfg: CfgNode, paper: PaperTable | None) -> dict:
    measured = cost_rows(cfg)
    baseline_hours = paper and published(paper.cost_hours, cfg.STUDY.BASELINE)
    rows = []
    for method in cfg.STUDY.METHODS:
        cost = measured.get(method, {})
        hours = paper and published(paper.cost_hours, method)
        rows.append(row(method, cost.get("relative"), hours / baseline_hours if hours and baseline_hours else None,
                        seconds_per_epoch=NOT_TRAINED if weights_file(cfg, method) else cost.get("seconds_per_epoch"),
                        data_wait=None if cost.get("data_wait") is None else data_wait_text(cost, explain=True)))
    return {"name": "cost", "title": f"Training time per epoch relative to {cfg.STUDY.BASELINE!r}",
            "value": "relative time", "columns": {"seconds_per_epoch": "s / epoch", "data_wait": "waiting for data"},
            "rows": rows}


def weights_files(cfg: CfgNode) -> list[dict]:
    """Which weights file (path and sha256, as each stage's record keeps them) every arm's stages
    read: one row per arm and file content, so a file that changed during the study shows twice."""
    used: dict[tuple, list[str]] = {}
    for stage in build_stages(cfg, cuda=False):
        weights = records.read_record(Path(cfg.OUTPUT_DIR), stage.name).get("weights")
        if stage.weights is not None and weights:
            used.setdefault((stage.arm, weights["path"], weights["sha256"]), []).append(stage.name)
    return [{"method": arm, "path": path, "sha256": sha256, "stages": stages}
            for (arm, path, sha256), stages in used.items()]


def build_report(cfg: CfgNode) -> dict:
    paper = PAPER_TABLES.get(cfg.STUDY.PAPER)
    tables = [classification_table(cfg, paper)]
    if cfg.ROBUSTNESS.ENABLED:
        tables.append(robustness_table(cfg, paper))
    if cfg.COST.ENABLED:
        tables.append(cost_table_rows(cfg, paper))
    if cfg.DETECT.ENABLED:  # last: what was transferred, each backbone's error beside its detector's AP
        tables.append(detection_table(cfg, paper))
    if cfg.COCO.ENABLED:
        tables.append(coco_table(cfg))
    return {"study": cfg.OUTPUT_DIR, "note": cfg.STUDY.NOTE, "paper": paper.title if paper else None,
            "baseline": cfg.STUDY.BASELINE, "tables": tables, "weights": weights_files(cfg)}


def cell(value) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_markdown(report: dict) -> str:
    lines = ["# SaliencyMix study report", "", f"Study folder: `{report['study']}`"]
    if report["note"]:
        lines += ["", report["note"]]
    source = f"the paper ({report['paper']})" if report["paper"] else "no published figures chosen (STUDY.PAPER)"
    lines += ["", f"Paper column: {source}. `{MISSING}`: not measured (yet)."]
    for table in report["tables"]:
        header = ["arm", f"ours: {table['value']}", "paper", *table["columns"].values()]
        lines += ["", f"## {table['title']}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for entry in table["rows"]:
            values = [entry["method"], cell(entry["ours"]), cell(entry["paper"]),
                      *(cell(entry[key]) for key in table["columns"])]
            lines.append("| " + " | ".join(values) + " |")
        lines += ["", f"![{table['name']}]({chart_name(table)})"]
    if report["weights"]:
        lines += ["", "## Weights files", "", "The file each arm's stages read, as their records keep it.", "",
                  "| arm | file | sha256 | stages |", "|---|---|---|---|"]
        lines += [f"| {entry['method']} | `{entry['path']}` | `{entry['sha256']}` | {', '.join(entry['stages'])} |"
                  for entry in report["weights"]]
    return "\n".join(lines) + "\n"


def chart_name(table: dict) -> str:
    return f"study_report_{table['name']}.png"


def write_chart(table: dict, path: Path) -> None:
    """Ours beside the paper's per arm; a missing figure is a labelled gap, not a zero bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = table["rows"]
    figure = Figure(figsize=(max(4.5, 1.3 * len(rows) + 1.5), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.38
    present = [v for entry in rows for v in (entry["ours"], entry["paper"]) if v is not None]
    for offset, key, colour, label in ((-width / 2, "ours", "tab:blue", "ours"),
                                       (width / 2, "paper", "0.7", "paper")):
        for index, entry in enumerate(rows):
            value = entry[key]
            if value is None:
                axes.annotate(MISSING, (index + offset, 0), xytext=(0, 3), textcoords="offset points",
                              ha="center", va="bottom", rotation=90, fontsize=7, color="0.4")
            else:
                axes.bar(index + offset, value, width, color=colour, edgecolor="black",
                         label=label if index == next(i for i, e in enumerate(rows) if e[key] is not None) else None)
                axes.annotate(f"{value:.2f}", (index + offset, value), xytext=(0, 2), textcoords="offset points",
                              ha="center", fontsize=7)
    axes.set_xticks(range(len(rows)), [entry["method"] for entry in rows])
    axes.set_ylabel(table["value"])
    axes.set_ylim(0, 1.15 * max(present) if present else 1)
    axes.set_title(table["title"], fontsize=9)
    if present:
        axes.legend(fontsize=8)
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=110))


def write_report(cfg: CfgNode) -> dict:
    """Build the report from the study folder and write its files; returns the report."""
    output = Path(cfg.OUTPUT_DIR)
    report = build_report(cfg)
    for table in report["tables"]:
        write_chart(table, output / chart_name(table))
    atomic_write(output / REPORT_MARKDOWN, lambda stream: stream.write(format_markdown(report).encode()))
    atomic_write_json(output / REPORT_JSON, report)
    return report
