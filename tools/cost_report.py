#!/usr/bin/env python
"""Training cost per method: wall time per epoch and its ratio to training without mixing.

    python tools/cost_report.py output/pretrain/r50_none output/pretrain/r50_saliencymix ...
    python tools/cost_report.py output/pretrain/r50_* --output cost.json

Each RUN_DIR is a tools/pretrain_net.py run folder (its config.yaml names the method, its
metrics.json holds the timed logging windows). Runs of one method are averaged; the runs must
share the model, dataset, image size and batch size. The paper's ratios are printed beside.
"""
from __future__ import annotations

import argparse
from pathlib import Path


from pretrain.atomic_file import atomic_write_json
from pretrain.cli import UsageError, reports_usage_errors
from pretrain.cost import cost_table, data_wait_text, read_run


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<26}{'runs':>5}{'epochs timed':>14}{'s / epoch':>12}{'h / epoch':>11}"
             f"{'relative':>10}{'paper':>8}{'data wait':>11}"]
    for row in rows:
        paper = f"{row['paper_relative']:.3f}" if row["paper_relative"] else "-"
        wait = data_wait_text(row)
        lines.append(f"{row['method']:<26}{row['runs']:>5}{row['epochs_timed']:>14.2f}"
                     f"{row['seconds_per_epoch']:>12.1f}{row['seconds_per_epoch'] / 3600:>11.4f}"
                     f"{row['relative']:>10.3f}{paper:>8}{wait:>11}")
    return "\n".join(lines)


@reports_usage_errors
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--output", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = cost_table([read_run(run) for run in args.runs])
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(format_table(rows))
    if args.output:
        atomic_write_json(args.output, rows)
        print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()
