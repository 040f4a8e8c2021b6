"""Tests of ``detection.report`` and ``tools/compare.py``, the mAP gain report, on fabricated
run folders whose scores are chosen so that every mean, std and gain is easy by hand.

The fabricated runs (AP, AP50, AP75), in percent:
  none        (49.0, 76.5, 53.0) (49.4, 76.9, 53.6) (49.2, 76.7, 53.3)
              means 49.2 / 76.7 / 53.3, stds 0.2 / 0.2 / 0.3
  saliencymix (50.0, 78.3, 54.0) (50.6, 78.7, 54.4) (50.3, 78.5, 54.2)
              means 50.3 / 78.5 / 54.2, stds 0.3 / 0.2 / 0.2; gains +1.1 / +1.8 / +0.9
  cutmix      (50.1, 78.1, 54.1), a single trial: gains +0.9 / +1.4 / +0.8, no interval
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from detection.records import EVAL_RESULTS, RUN_INFO
from detection.report import (
    compare_runs,
    default_output_dir,
    find_run_dirs,
    format_table,
    load_runs,
    write_report,
)
from detection.stats import t_quantile, welch_interval
from tool_process import run_tool

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "compare.py"

SCORES = {
    "none": [(49.0, 76.5, 53.0), (49.4, 76.9, 53.6), (49.2, 76.7, 53.3)],
    "saliencymix": [(50.0, 78.3, 54.0), (50.6, 78.7, 54.4), (50.3, 78.5, 54.2)],
    "cutmix": [(50.1, 78.1, 54.1)],
}
PROTOCOL = {"engine": "detectron2", "train_datasets": ["voc_2007_trainval", "voc_2012_trainval"],
            "test_datasets": ["voc_2007_test"], "max_iter": 24000, "steps": [18000, 22000],
            "ims_per_batch": 16, "base_lr": 0.02}
T_975_DF4 = 2.776445  # Student-t table: t_{0.975} with 4 degrees of freedom


def make_run(folder: Path, method: str, scores: tuple[float, float, float], seed: int = 0,
             **protocol) -> Path:
    """A finished run folder as ``detection.records`` writes it."""
    folder.mkdir(parents=True)
    info = {"method": method, "weights": f"{method}.pkl", **PROTOCOL, **protocol, "seed": seed}
    (folder / RUN_INFO).write_text(json.dumps(info))
    ap, ap50, ap75 = scores
    results = {"iteration": 23999, "bbox": {"AP": ap, "AP50": ap50, "AP75": ap75}, "AP50-car": 80.0}
    (folder / EVAL_RESULTS).write_text(json.dumps(results))
    return folder


@pytest.fixture
def runs_root(tmp_path) -> Path:
    """``runs/<method>/trial_<i>`` for the methods above (cutmix: a plain run folder)."""
    root = tmp_path / "runs"
    for method, trials in SCORES.items():
        if len(trials) == 1:
            make_run(root / method, method, trials[0])
        for seed, scores in enumerate(trials if len(trials) > 1 else []):
            make_run(root / method / f"trial_{seed}", method, scores, seed=seed)
    return root


@pytest.fixture
def report(runs_root) -> dict:
    return compare_runs(load_runs([runs_root]))


# ------------------------------------------------------------------------ the t quantile


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262),
                                          (20, 2.086), (math.inf, 1.960)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.995])
def test_t_quantile_matches_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


@pytest.mark.parametrize("df", [0.7, 2.5, 4.959, 13.3])
def test_t_quantile_fractional_df_integrates_to_p(df):
    """The density of t integrated (trapezoid rule, independent of the code under test) from 0
    to the 0.975 quantile holds 0.475 of the mass; the quantile lies between its integer
    neighbours'."""
    quantile = t_quantile(0.975, df)
    x = np.linspace(0.0, quantile, 400_001)
    density = (math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
               * (1 + x ** 2 / df) ** (-(df + 1) / 2))
    assert 0.5 + np.trapezoid(density, x) == pytest.approx(0.975, abs=1e-6)
    assert t_quantile(0.975, math.ceil(df)) < quantile < t_quantile(0.975, max(math.floor(df), 0.5))


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be positive"):
        t_quantile(0.975, 0)


# -------------------------------------------------------------------------- the statistics


def test_welch_interval_equal_spreads_has_pooled_df():
    """Equal n and std: Welch's df is 2 (n - 1) = 4 and the interval is the textbook one."""
    interval = welch_interval([78.3, 78.7, 78.5], [76.5, 76.9, 76.7])
    half_width = T_975_DF4 * math.sqrt(0.2 ** 2 / 3 + 0.2 ** 2 / 3)
    assert interval["gain"] == pytest.approx(1.8)
    assert interval["df"] == pytest.approx(4.0)
    assert interval["low"] == pytest.approx(1.8 - half_width, abs=1e-5)
    assert interval["high"] == pytest.approx(1.8 + half_width, abs=1e-5)


def test_welch_interval_unequal_spreads_uses_welch_satterthwaite():
    sample, reference = [78.2, 78.6, 78.4, 78.8], [76.5, 76.9, 76.7]  # variances 0.2/3 and 0.04
    variance_of_means = (0.2 / 3 / 4, 0.04 / 3)
    df = sum(variance_of_means) ** 2 / (variance_of_means[0] ** 2 / 3 + variance_of_means[1] ** 2 / 2)
    half_width = t_quantile(0.975, df) * math.sqrt(sum(variance_of_means))
    interval = welch_interval(sample, reference)
    assert interval["df"] == pytest.approx(df) and 4.9 < df < 5.0
    assert (interval["low"], interval["high"]) == pytest.approx((1.8 - half_width, 1.8 + half_width))


def test_welch_interval_needs_two_values_per_group():
    assert welch_interval([78.1], [76.5, 76.9]) == pytest.approx(
        {"gain": 78.1 - 76.7, "low": None, "high": None, "df": None})


def test_welch_interval_without_any_spread_is_the_gain_itself():
    assert welch_interval([78.0, 78.0], [77.0, 77.0]) == {"gain": 1.0, "low": 1.0, "high": 1.0, "df": None}


def test_report_means_stds_and_gains(report):
    methods = report["methods"]
    assert list(methods) == ["none", "cutmix", "saliencymix"]  # baseline first
    assert [methods[m]["trials"] for m in methods] == [3, 1, 3]
    assert methods["none"]["mean"] == pytest.approx({"AP": 49.2, "AP50": 76.7, "AP75": 53.3})
    assert methods["none"]["std"] == pytest.approx({"AP": 0.2, "AP50": 0.2, "AP75": 0.3})
    assert methods["saliencymix"]["mean"] == pytest.approx({"AP": 50.3, "AP50": 78.5, "AP75": 54.2})
    assert methods["saliencymix"]["std"] == pytest.approx({"AP": 0.3, "AP50": 0.2, "AP75": 0.2})
    gains = {metric: gain["gain"] for metric, gain in methods["saliencymix"]["gain"].items()}
    assert gains == pytest.approx({"AP": 1.1, "AP50": 1.8, "AP75": 0.9})
    half_width = T_975_DF4 * math.sqrt(2 * 0.2 ** 2 / 3)
    ap50 = methods["saliencymix"]["gain"]["AP50"]
    assert (ap50["low"], ap50["high"]) == pytest.approx((1.8 - half_width, 1.8 + half_width), abs=1e-5)
    assert methods["none"]["gain"] is None and methods["none"]["is_baseline"]


def test_single_trial_group_warns_and_shows_not_available(report, runs_root):
    cutmix = report["methods"]["cutmix"]
    assert cutmix["std"] == {"AP": None, "AP50": None, "AP75": None}
    assert cutmix["gain"]["AP50"] == pytest.approx({"gain": 1.4, "low": None, "high": None, "df": None})
    assert report["warnings"] == [f"method 'cutmix' has a single trial ({runs_root / 'cutmix'}): "
                                  "no std and no confidence interval (n/a)"]
    cutmix_row = next(line for line in format_table(report).splitlines() if line.startswith("cutmix"))
    assert "78.10 ± n/a" in cutmix_row and "+1.40 [n/a]" in cutmix_row


def test_protocol_disagreement_names_key_values_and_runs(tmp_path):
    runs = [make_run(tmp_path / f"none_{seed}", "none", SCORES["none"][seed], seed=seed) for seed in range(3)]
    runs.append(make_run(tmp_path / "short", "saliencymix", SCORES["saliencymix"][0], max_iter=18000,
                         steps=[12000, 16000]))
    report = compare_runs(load_runs(runs))
    disagreements = [warning for warning in report["warnings"] if warning.startswith("runs disagree")]
    assert disagreements == [
        f"runs disagree on max_iter: 18000 in {tmp_path / 'short'}; 24000 in the other 3 runs",
        f"runs disagree on steps: [12000, 16000] in {tmp_path / 'short'}; [18000, 22000] in the other 3 runs",
    ]


def test_missing_baseline_names_the_available_methods(runs_root):
    with pytest.raises(ValueError, match=r"baseline method 'moco' is not among the runs; "
                                         r"available methods: cutmix, none, saliencymix"):
        compare_runs(load_runs([runs_root]), baseline="moco")


def test_other_baseline(runs_root):
    report = compare_runs(load_runs([runs_root]), baseline="saliencymix")
    assert list(report["methods"])[0] == "saliencymix"
    assert report["methods"]["none"]["gain"]["AP50"]["gain"] == pytest.approx(-1.8)


# ------------------------------------------------------------------------------- the runs


def test_parent_folder_and_duplicates_count_each_run_once(runs_root):
    trial = runs_root / "none" / "trial_1"
    folders = find_run_dirs([runs_root, trial, runs_root / "none", str(trial) + "/"])
    assert len(folders) == len({folder.resolve() for folder in folders}) == 7
    assert [folder.resolve() for folder in folders].count(trial.resolve()) == 1


def test_non_run_folder_errors_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"is {tmp_path / 'empty'} a finished detection run"):
        load_runs([tmp_path / "empty"])
    unfinished = make_run(tmp_path / "unfinished", "none", (1.0, 2.0, 3.0))
    (unfinished / EVAL_RESULTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"{unfinished / EVAL_RESULTS} is missing"):
        load_runs([tmp_path])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}: no such run folder"):
        load_runs([tmp_path / "nowhere"])


def test_score_that_is_not_a_number_errors_naming_file_and_key(tmp_path):
    run = make_run(tmp_path / "run", "none", (1.0, 2.0, 3.0))
    (run / EVAL_RESULTS).write_text(json.dumps({"iteration": 1, "bbox": {"AP": 1.0, "AP50": 2.0}}))
    with pytest.raises(ValueError, match=f"{run / EVAL_RESULTS}: bbox AP75 is None"):
        load_runs([run])


def test_default_output_dir_is_the_common_parent(runs_root):
    assert default_output_dir(load_runs([runs_root])) == runs_root.resolve()
    assert default_output_dir(load_runs([runs_root / "none"])) == (runs_root / "none").resolve()


# ------------------------------------------------------------------------------ the files


def test_files_are_written_and_match_the_report(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert {path.name for path in (tmp_path / "out").iterdir()} == {
        "comparison.csv", "comparison.json", "comparison.png"}  # no temporary file left over
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads(paths["json"].read_text())
    saliencymix = saved["methods"]["saliencymix"]
    assert saliencymix["mean"]["AP50"] == pytest.approx(78.5)
    half_width = T_975_DF4 * math.sqrt(2 * 0.04 / 3)
    assert saliencymix["gain"]["AP50"]["low"] == pytest.approx(1.8 - half_width, abs=1e-5)
    assert [run["AP50"] for run in saliencymix["runs"]] == [78.3, 78.7, 78.5]
    assert [run["seed"] for run in saliencymix["runs"]] == [0, 1, 2]
    assert saved["methods"]["cutmix"]["runs"][0]["dir"] == report["methods"]["cutmix"]["runs"][0]["dir"]
    assert saved["warnings"] == report["warnings"] and saved["baseline"] == "none"

    rows = {row["method"]: row for row in csv.DictReader(paths["csv"].open())}
    assert list(rows) == ["none", "cutmix", "saliencymix"]
    assert float(rows["saliencymix"]["gain_AP50"]) == pytest.approx(1.8)
    assert float(rows["saliencymix"]["AP_std"]) == pytest.approx(0.3)
    assert rows["cutmix"]["AP50_std"] == rows["cutmix"]["gain_AP50_low"] == "n/a"


# -------------------------------------------------------------------------------- the CLI


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return run_tool(CLI, *args, cwd=cwd, timeout=120)


def test_cli_end_to_end(runs_root, tmp_path):
    result = run_cli(runs_root, runs_root / "none" / "trial_0", "--output", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["method", "trials", "AP", "AP50", "AP75"]
    assert " ".join(lines[2].split()) == ("none 3 49.20 ± 0.20 76.70 ± 0.20 53.30 ± 0.30 "
                                         "(baseline) (baseline) (baseline)")
    assert " ".join(lines[4].split()) == ("saliencymix 3 50.30 ± 0.30 78.50 ± 0.20 54.20 ± 0.20 "
                                         "+1.80 [+1.35, +2.25] +1.10 [+0.49, +1.71] +0.90 [+0.29, +1.51]")
    assert result.stderr.startswith("warning: method 'cutmix' has a single trial")
    for name in ("comparison.csv", "comparison.json", "comparison.png"):
        assert f"wrote {tmp_path / 'report' / name}" in result.stdout
        assert (tmp_path / "report" / name).is_file()


def test_cli_writes_beside_the_runs_by_default(runs_root):
    result = run_cli(runs_root / "none", runs_root / "saliencymix", cwd=runs_root.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads((runs_root / "comparison.json").read_text())["methods"]["saliencymix"]["trials"] == 3


def test_cli_errors_name_the_folder_and_the_methods(runs_root, tmp_path):
    (tmp_path / "notes").mkdir()
    result = run_cli(runs_root, tmp_path / "notes")
    assert result.returncode == 2  # bad input: one error line, exit status 2
    assert result.stderr == (f"error: {tmp_path / 'notes' / RUN_INFO} is missing: "
                             f"is {tmp_path / 'notes'} a finished detection run?\n")
    result = run_cli(runs_root / "saliencymix")
    assert result.returncode == 2  # bad input: one error line, exit status 2
    assert "available methods: saliencymix" in result.stderr


# ------------------------------------------------------------------------- COCO beside VOC

# COCO runs (box and mask AP), means by hand: box AP 38.2 / 39.1, mask AP 34.6 / 35.1.
COCO_SCORES = {"none": [(38.0, 34.5), (38.4, 34.7)], "saliencymix": [(39.0, 35.0), (39.2, 35.2)]}
COCO_PROTOCOL = {"train_datasets": ["coco_2017_train"], "test_datasets": ["coco_2017_val"], "max_iter": 90000,
                 "steps": [60000, 80000], "dataset_kind": "coco"}


def make_coco_run(folder: Path, method: str, box_ap: float, mask_ap: float | None, seed: int = 0) -> Path:
    """A COCO run folder: APl is null (no large objects), the other metrics offsets of AP."""
    make_run(folder, method, (box_ap, box_ap + 20, box_ap + 3), seed=seed, **COCO_PROTOCOL)
    def task(ap):
        return {"AP": ap, "AP50": ap + 20, "AP75": ap + 3, "APs": ap - 15, "APm": ap + 2, "APl": None,
                "AP-shape": ap}
    results = {"iteration": 89999, "bbox": task(box_ap), **({"segm": task(mask_ap)} if mask_ap is not None else {})}
    (folder / EVAL_RESULTS).write_text(json.dumps(results))
    return folder


@pytest.fixture
def coco_root(runs_root) -> Path:
    """``runs_root`` (VOC) with ``coco/<method>/trial_<i>`` beside it."""
    for method, trials in COCO_SCORES.items():
        for seed, (box_ap, mask_ap) in enumerate(trials):
            make_coco_run(runs_root / "coco" / method / f"trial_{seed}", method, box_ap, mask_ap, seed=seed)
    return runs_root


def test_coco_report_has_box_and_mask_metrics_each_with_its_gain(coco_root):
    report = compare_runs(load_runs([coco_root / "coco"]))
    assert report["dataset_kind"] == "coco" and report["test_datasets"] == ["coco_2017_val"]
    # APl is null in every run: not a metric of this group; the rest, boxes and masks, are.
    assert report["metrics"] == ["AP", "AP50", "AP75", "APs", "APm", "segm_AP", "segm_AP50", "segm_AP75",
                                 "segm_APs", "segm_APm"]
    saliencymix = report["methods"]["saliencymix"]
    assert saliencymix["mean"]["AP"] == pytest.approx(39.1) and saliencymix["mean"]["segm_AP"] == pytest.approx(35.1)
    assert saliencymix["gain"]["AP"]["gain"] == pytest.approx(0.9)
    assert saliencymix["gain"]["segm_APs"]["gain"] == pytest.approx(0.5)
    half_width = t_quantile(0.975, 2) * math.sqrt(0.02 / 2 + 0.02 / 2)  # both variances 0.02, two trials each
    assert (saliencymix["gain"]["segm_AP"]["low"], saliencymix["gain"]["segm_AP"]["high"]) == pytest.approx(
        (0.5 - half_width, 0.5 + half_width))
    assert not [warning for warning in report["warnings"] if "not a number" in warning]
    tables = format_table(report).split("\n\n")
    assert len(tables) == 4  # three metrics per table
    assert tables[0].splitlines()[0].split()[:8] == ["method", "trials", "AP", "AP50", "AP75", "gain", "AP", "[95%"]
    assert tables[3].splitlines()[0].split()[2:4] == ["segm_APs", "segm_APm"]


def test_a_metric_only_some_runs_have_is_left_out_with_a_warning(tmp_path):
    runs = [make_coco_run(tmp_path / "none", "none", 38.0, 34.5),
            make_coco_run(tmp_path / "box_only", "saliencymix", 39.0, None)]
    report = compare_runs(load_runs(runs))
    assert report["metrics"] == ["AP", "AP50", "AP75", "APs", "APm"]
    assert f"segm_AP is not a number in {tmp_path / 'box_only'}: left out of the comparison" in report["warnings"]


def test_voc_and_coco_runs_are_never_compared_together(coco_root, tmp_path):
    with pytest.raises(ValueError, match=r"runs tested on different datasets \(coco_2017_val, voc_2007_test\) do not compare"):
        compare_runs(load_runs([coco_root]))
    voc_named = make_run(tmp_path / "voc_named", "none", (1.0, 2.0, 3.0), test_datasets=["coco_2017_val"])
    with pytest.raises(ValueError, match=f"coco_2017_val were scored differently: coco in .*; voc in {voc_named}"):
        compare_runs(load_runs([coco_root / "coco", voc_named]))


def test_cli_prints_and_writes_one_report_per_test_dataset(coco_root, tmp_path):
    result = run_cli(coco_root, "--output", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "\nvoc_2007_test (VOC metrics)\n" in result.stdout and "\ncoco_2017_val (COCO metrics)\n" in result.stdout
    voc = json.loads((tmp_path / "report" / "comparison_voc_2007_test.json").read_text())
    coco = json.loads((tmp_path / "report" / "comparison_coco_2017_val.json").read_text())
    assert voc["metrics"] == ["AP", "AP50", "AP75"] and voc["methods"]["saliencymix"]["trials"] == 3
    assert coco["dataset_kind"] == "coco" and set(coco["methods"]) == {"none", "saliencymix"}
    rows = {row["method"]: row for row in csv.DictReader((tmp_path / "report" / "comparison_coco_2017_val.csv").open())}
    assert float(rows["saliencymix"]["gain_segm_AP"]) == pytest.approx(0.5)
    assert (tmp_path / "report" / "comparison_coco_2017_val.png").is_file()
    assert not (tmp_path / "report" / "comparison.json").exists()
