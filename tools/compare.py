#!/usr/bin/env python
"""The AP gain report: finished detection runs grouped by test dataset and, within one, by
pretraining method (the TRANSFER.METHOD recorded in each run's run_info.json), with per method
the number of trials, mean ± std of each metric (VOC: AP, AP50, AP75; COCO: also APs, APm, APl,
and the mask segm_AP... of Mask R-CNN runs), and the gain over the baseline method with a 95%
Welch confidence interval. VOC and COCO runs are never compared with each other.

    python tools/compare.py output/detection                        # every run below it
    python tools/compare.py runs/r50_none runs/r50_saliencymix --baseline none --output report/

A RUN_DIR is a run folder (it holds run_info.json and eval_results.json) or any folder above
run folders, e.g. a multi-trial run whose trial_0, trial_1, ... are used. It prints the tables
and writes comparison.csv, comparison.json and comparison.png; when the runs were tested on
several datasets, one table and one set of files per dataset: comparison_<dataset>.csv, ....
Warnings (a method with a single trial, runs that disagree on dataset or schedule) are printed
and recorded in the JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from pretrain.cli import UsageError, reports_usage_errors
from detection.report import (
    compare_runs,
    default_output_dir,
    format_table,
    group_by_dataset,
    load_runs,
    write_report,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a finished run folder, or a folder whose subfolders (at any depth) "
                             "holding run_info.json are used, e.g. the trial_N folders of a "
                             "multi-trial run; a folder given twice counts once")
    parser.add_argument("--baseline", default="none",
                        help="method the gains are measured against (default: none, the plain "
                             "baseline)")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="folder for comparison.csv/.json/.png (default: the deepest folder "
                             "holding all the runs, i.e. their common parent)")
    return parser.parse_args(argv)


@reports_usage_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    written = []
    try:
        runs = load_runs(args.run_dirs)
        datasets = group_by_dataset(runs)
        for dataset, dataset_runs in datasets.items():
            report = compare_runs(dataset_runs, args.baseline)
            if len(datasets) > 1:
                print(f"\n{dataset} ({report['dataset_kind'].upper()} metrics)")
            print(format_table(report))
            for warning in report["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
            suffix = f"_{dataset}" if len(datasets) > 1 else ""
            written += write_report(report, args.output or default_output_dir(runs), suffix).values()
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
