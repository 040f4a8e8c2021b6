"""tools/study.py with the local executor: a tiny study end to end, rerun, interrupted and
resumed, a failing stage, the paper study's dry run, bad configs and the report's gaps."""
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from detection import records as detection_records
from detection.coco import load_coco_records
from detection.voc import load_voc_split
from pretrain.export import convert
from study_runner import records
from study_runner.config import StudyConfigError, load_study_cfg
from study_runner.report import MISSING, write_report
from tiny_study import DETECT_OPTS, PRETRAIN_OPTS, REPO, explain, make_data, run_study, study_command, write_config
from tool_process import run_tool

METHODS = ("none", "saliencymix")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("study_data") / "data")


@pytest.fixture(scope="module")
def finished_study(data, tmp_path_factory):
    """A tiny study run once from start to end: (config, output folder, first run's result)."""
    folder = tmp_path_factory.mktemp("study")
    config = write_config(folder / "study.yaml", data, folder / "output")
    return config, folder / "output", run_study(config)


def outcome(output: Path) -> dict:
    """What a study measured, for comparing two runs of it (all but the wall-clock cost)."""
    report = json.loads((output / "study_report.json").read_text())
    return {table["name"]: [(row["method"], row["ours"]) for row in table["rows"]]
            for table in report["tables"] if table["name"] != "cost"}


def test_the_study_runs_every_stage_then_skips_them_all_when_run_again(finished_study):
    config, output, first = finished_study
    assert first.returncode == 0, explain(first)
    for method in METHODS:
        assert (output / "pretrain" / method / "model_final.pth").is_file()
        assert (output / "pretrain" / method / "backbone.pth").is_file()
        assert (output / "pretrain" / method / "model_final_fgsm_eps8.json").is_file()
        run = detection_records.read_run(output / "detect" / method / "trial_0")
        assert run["info"]["method"] == method and run["info"]["seed"] == 0
    for name in ("comparison.json", "cost.json", "study_report.md", "study_report.json",
                 "study_report_detection.png", "study_report_classification.png"):
        assert (output / name).is_file(), name
    assert "[1/11] pretrain.none started on 1 CPU core" in first.stdout
    assert "# SaliencyMix study report" in first.stdout  # the report stage's output, shown
    report = (output / "study_report.md").read_text()
    assert "| saliencymix | " in report and "78.48" in report and "23.68" in report  # the paper beside ours
    record = json.loads((output / "stages" / "pretrain.none.json").read_text())
    assert record["exit_status"] == 0 and record["executor"] == "local" and record["wall_seconds"] > 0
    assert record["command"][1].endswith("tools/pretrain_net.py") and "--num-gpus" in record["command"]

    measured = outcome(output)
    again = run_study(config)
    assert again.returncode == 0, explain(again)
    assert again.stdout.count("done already") == 10  # every stage but the report
    assert outcome(output) == measured

    status = run_study(config, "--status")
    assert status.returncode == 0, explain(status)
    assert "11 done" in status.stdout and "detect.saliencymix.0" in status.stdout


def test_a_study_stopped_in_the_middle_of_a_stage_resumes_to_the_same_results(finished_study, data, tmp_path):
    _, reference, first = finished_study
    assert first.returncode == 0, explain(first)
    # The pretrainings alone: what comes after them is what the other tests here run.
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", DETECT={"ENABLED": False},
                          ROBUSTNESS={"ENABLED": False})
    interrupted = tmp_path / "output" / "pretrain" / "saliencymix"
    runner = subprocess.Popen(study_command(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while not (interrupted / "last_checkpoint").exists():
        assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read().decode()[-3000:]
        time.sleep(0.02)
    runner.send_signal(signal.SIGTERM)
    output = runner.communicate(timeout=120)[0].decode()
    assert runner.returncode != 0 and not (interrupted / "model_final.pth").exists(), output[-3000:]
    status = run_study(config, "--status")
    assert re.search(r"pretrain\.saliencymix +interrupted", status.stdout), status.stdout

    resumed = run_study(config)
    assert resumed.returncode == 0, explain(resumed)
    assert "pretrain.saliencymix (resuming)" in resumed.stdout
    log = records.log_path(tmp_path / "output", "pretrain.saliencymix").read_text()
    assert f"resumed from {interrupted / 'checkpoint_'}" in log
    assert outcome(tmp_path / "output")["classification"] == outcome(reference)["classification"]
    ours = torch.load(interrupted / "model_final.pth", weights_only=True)["model"]
    uninterrupted = torch.load(reference / "pretrain" / "saliencymix" / "model_final.pth", weights_only=True)["model"]
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_arms_started_from_files_skip_pretraining_and_match_the_arms_trained_into_them(finished_study, data, tmp_path):
    """The tiny study's two trained classifiers, saved as their authors release such files (the
    official train.py checkpoint, a plain torchvision state dict), start a study of their own: no
    pretraining runs, the verify stage finds the error --eval-only reports and training logged, and
    FGSM, export and detection give the trained arms' figures; the report lists each file's sha256."""
    _, reference, first = finished_study
    assert first.returncode == 0, explain(first)
    released = tmp_path / "released"
    (released / "none").mkdir(parents=True)
    (released / "saliencymix").mkdir()
    trained = {method: torch.load(reference / "pretrain" / method / "model_final.pth", weights_only=True)["model"]
               for method in METHODS}
    torch.save({"epoch": 4, "arch": "resnet", "state_dict": {f"module.{k}": v for k, v in trained["none"].items()},
                "best_err1": 50.0, "best_err5": 0.0, "optimizer": {"state": {}, "param_groups": []}},
               released / "none" / "model_best.pth.tar", _use_new_zipfile_serialization=False)
    torch.save(trained["saliencymix"], released / "saliencymix" / "resnet50.pth")
    files = {"none": "none/model_best.pth.tar", "saliencymix": "saliencymix/resnet50.pth"}
    output = tmp_path / "output"
    config = write_config(tmp_path / "study.yaml", data, output, PRETRAIN={"WEIGHTS_ROOT": str(released), "WEIGHTS": files})

    result = run_study(config)
    assert result.returncode == 0, explain(result)
    started = re.findall(r"^\[\d+/10\] (\S+) started", result.stdout, flags=re.MULTILINE)
    assert sorted(started) == sorted([
        "verify.none", "robustness.none", "export.none", "detect.none.0", "verify.saliencymix",
        "robustness.saliencymix", "export.saliencymix", "detect.saliencymix.0", "compare", "report"])
    assert not (output / "pretrain" / "none" / "model_final.pth").exists()

    verified = json.loads((output / "pretrain" / "none" / "eval_results.json").read_text())
    eval_only = run_tool("tools/pretrain_net.py", "--config-file", REPO / "configs/demo/pretrain_none.yaml",
                         "--eval-only", "DATA.ROOT", data / "classification", *PRETRAIN_OPTS,
                         "MODEL.WEIGHTS", released / files["none"], "OUTPUT_DIR", tmp_path / "eval_only")
    assert eval_only.returncode == 0, eval_only.stderr[-3000:]
    assert json.loads(eval_only.stdout.strip().splitlines()[-1])["top1_error"] == verified["top1_error"]
    assert verified["form"].startswith("SaliencyMix / CutMix / PuzzleMix train.py checkpoint")
    # The same weights give the same figures as the trained arms did: classification, FGSM, detection.
    assert outcome(output) == outcome(reference)

    report = (output / "study_report.md").read_text()
    for method, name in files.items():
        sha256 = hashlib.sha256((released / name).read_bytes()).hexdigest()
        assert f"| {method} | `{released / name}` | `{sha256}` | verify.{method}, robustness.{method}, export.{method} |" in report
        record = json.loads((output / "stages" / f"export.{method}.json").read_text())
        assert record["weights"] == {"path": str(released / name), "sha256": sha256}
    assert "| none | " in report and "23.68" in report and "76.71" in report  # the paper's figures beside ours
    assert "DIFFERS from the stated 23.68 by " in report  # a tiny toy classifier is not the paper's
    assert "| none | missing | 1.00 | not trained here |" in report  # the cost table


def test_a_failed_stage_stops_only_the_stages_that_need_it(data, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "pretrain_none.yaml").write_text(f"_BASE_: {REPO / 'configs/demo/pretrain_none.yaml'}\n")
    # a config that passes every check before the study starts and fails in training (the check
    # before the study would refuse a wrong key or value, and nothing would run)
    (configs / "pretrain_broken.yaml").write_text(f"_BASE_: {REPO / 'configs/demo/pretrain_none.yaml'}\n"
                                                  "SOLVER:\n  BASE_LR: 1.0e+30\n")
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output",
                          STUDY={"METHODS": ["none", "broken"]}, DETECT={"ENABLED": False},
                          PRETRAIN={"CONFIG": str(configs / "pretrain_{method}.yaml")})
    result = run_study(config)
    assert result.returncode == 1, explain(result)
    assert "error: stage pretrain.broken failed (exit status 1); last lines of" in result.stdout
    assert "loss became" in result.stdout.split("error: stage pretrain.broken failed")[1]  # the log's tail
    assert "robustness.broken: blocked, it needs pretrain.broken" in result.stdout
    assert "cost: blocked" in result.stdout
    output = tmp_path / "output"
    assert (output / "pretrain" / "none" / "model_final_fgsm_eps8.json").is_file()  # the other arm finished
    assert (output / "study_report.md").is_file()  # the report of what is there
    status = run_study(config, "--status").stdout
    assert re.search(r"pretrain\.broken +failed", status) and re.search(r"robustness\.broken +pending", status)


def test_the_paper_study_dry_run_lists_every_stage_and_its_exact_command():
    result = run_study(REPO / "configs/study/paper_r50_voc.yaml", "--dry-run", "--executor", "slurm",
                       "OUTPUT_DIR", "/scratch/paper", "PRETRAIN.DATA_ROOT", "/data/imagenet")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    stages = [line.split("]")[1].split(":")[0].strip() for line in lines if line.startswith("[")]
    methods = ("none", "cutout", "mixup", "cutmix", "saliencymix", "saliencymix_official")
    expected = []
    for method in methods:
        expected += [f"pretrain.{method}", f"robustness.{method}", f"export.{method}",
                     *(f"detect.{method}.{trial}" for trial in range(5))]
    assert stages == [*expected, "compare", "cost", "report"]
    commands = {stage: lines[lines.index(next(l for l in lines if l.startswith("[") and f"] {stage}:" in l)) + 1]
                for stage in stages}
    python = sys.executable
    assert commands["pretrain.cutmix"] == (
        f"  $ {python} {REPO}/tools/pretrain_net.py --config-file {REPO}/configs/pretrain/r50_cutmix.yaml --num-gpus 8 "
        "DATA.ROOT /data/imagenet OUTPUT_DIR /scratch/paper/pretrain/cutmix")
    assert commands["detect.saliencymix.3"] == (
        f"  $ {python} {REPO}/tools/train_net.py --config-file {REPO}/configs/detection/faster_rcnn_R50_C4_voc.yaml "
        "--engine detectron2 --num-gpus 8 MODEL.WEIGHTS /scratch/paper/pretrain/saliencymix/backbone.pkl "
        "TRANSFER.METHOD saliencymix OUTPUT_DIR /scratch/paper/detect/saliencymix/trial_3 SEED 3")
    assert commands["export.none"] == (f"  $ {python} {REPO}/tools/convert_to_d2.py /scratch/paper/pretrain/none/"
                                       "model_final.pth /scratch/paper/pretrain/none/backbone.pkl")
    assert commands["robustness.mixup"].endswith("--epsilon 8 MODEL.WEIGHTS /scratch/paper/pretrain/mixup/model_final.pth")
    assert commands["compare"].endswith("--baseline none --output /scratch/paper")
    jobs = {stage: lines[lines.index(commands[stage]) + 1] for stage in ("pretrain.none", "detect.none.0", "report")}
    assert "--nodes=1 " in jobs["pretrain.none"] and "--gpus-per-node=8" in jobs["pretrain.none"]
    assert "--time=1440" in jobs["pretrain.none"] and "--signal=USR2@120" in jobs["pretrain.none"]
    assert "--dependency=afterok:<job of export.none> --kill-on-invalid-dep=yes" in jobs["detect.none.0"]
    assert "--dependency=afterany:<job of pretrain.none>:<job of robustness.none>:" in jobs["report"]
    assert not Path("/scratch/paper").exists()  # a dry run writes nothing


def test_the_released_study_dry_run_lists_its_stages_and_no_pretraining(tmp_path):
    """configs/study/released_r50_voc.yaml with the five files in place: no pretrain stage and no
    training command; each file verified on ImageNet val (only when a validation folder is
    given), attacked, exported and fine-tuned five times."""
    methods = ("none", "cutout", "mixup", "cutmix", "saliencymix")
    for method in methods:
        (tmp_path / "released" / method).mkdir(parents=True)
        (tmp_path / "released" / method / "model_best.pth.tar").write_bytes(b"placeholder: a dry run reads no file")
    common = ("--dry-run", "--executor", "slurm", "OUTPUT_DIR", "/scratch/released", "PRETRAIN.WEIGHTS_ROOT",
              str(tmp_path / "released"))
    result = run_study(REPO / "configs/study/released_r50_voc.yaml", *common, "PRETRAIN.DATA_ROOT", "/data/imagenet")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    stages = [line.split("]")[1].split(":")[0].strip() for line in lines if line.startswith("[")]
    expected = []
    for method in methods:
        expected += [f"verify.{method}", f"robustness.{method}", f"export.{method}",
                     *(f"detect.{method}.{trial}" for trial in range(5))]
    assert stages == [*expected, "compare", "report"]  # no cost stage: nothing is trained
    commands = [line for line in lines if line.startswith("  $ ")]
    assert all("--eval-only" in command for command in commands if "tools/pretrain_net.py" in command)
    source = tmp_path / "released" / "saliencymix" / "model_best.pth.tar"
    python = sys.executable
    assert (f"  $ {python} {REPO}/tools/pretrain_net.py --config-file {REPO}/configs/pretrain/r50_saliencymix.yaml "
            f"--eval-only --num-gpus 1 DATA.ROOT /data/imagenet MODEL.WEIGHTS {source} "
            "OUTPUT_DIR /scratch/released/pretrain/saliencymix") in commands
    assert (f"  $ {python} {REPO}/tools/convert_to_d2.py {source} /scratch/released/pretrain/saliencymix/backbone.pkl"
            in commands)
    assert (f"  $ {python} {REPO}/tools/train_net.py --config-file {REPO}/configs/detection/faster_rcnn_R50_C4_voc.yaml "
            "--engine detectron2 --num-gpus 8 MODEL.WEIGHTS /scratch/released/pretrain/saliencymix/backbone.pkl "
            "TRANSFER.METHOD saliencymix OUTPUT_DIR /scratch/released/detect/saliencymix/trial_4 SEED 4") in commands
    export_job = lines[lines.index(next(l for l in lines if "] export.none:" in l)) + 2]
    assert "--dependency" not in export_job and "--gpus-per-node" not in export_job  # needs nothing, CPU only
    assert "--gpus-per-node=1" in lines[lines.index(next(l for l in lines if "] verify.none:" in l)) + 2]

    without_val = run_study(REPO / "configs/study/released_r50_voc.yaml", *common)
    assert without_val.returncode == 0, explain(without_val)
    assert "tools/pretrain_net.py" not in without_val.stdout and "verify." not in without_val.stdout
    assert "robustness." not in without_val.stdout and "export.cutmix: to run" in without_val.stdout

    (tmp_path / "released" / "mixup" / "model_best.pth.tar").unlink()
    missing = run_study(REPO / "configs/study/released_r50_voc.yaml", *common)
    assert missing.returncode == 2 and missing.stderr == (
        f"error: PRETRAIN.WEIGHTS: arm 'mixup' starts from {tmp_path / 'released/mixup/model_best.pth.tar'}, which "
        f"does not exist (PRETRAIN.WEIGHTS_ROOT {tmp_path / 'released'}; README: released backbones)\n")


@pytest.mark.parametrize("overrides, message", [
    (["STUDY.NOT_A_KEY", "1"], "the command line: Non-existent key: STUDY.NOT_A_KEY"),
    (["STUDY.METHODS", "['none', 'saliencymixx']"], "r50_saliencymixx.yaml (arm 'saliencymixx') does not exist"),
    (["STUDY.BASELINE", "cutmixx"], "STUDY.BASELINE 'cutmixx' is not among STUDY.METHODS"),
    (["DETECT.ENGINE", "mmdet"], "DETECT.ENGINE 'mmdet' is unknown"),
    (["RESOURCES.PRETRAIN.NODES", "2"], "RESOURCES.PRETRAIN.NODES is 2, but the local executor runs on this machine"),
    (["STUDY.PAPER", "imagenet_resnet18"], "STUDY.PAPER 'imagenet_resnet18' is unknown"),
    # what the stages will read is checked before any runs (or is queued, hours before it would start)
    (["PRETRAIN.DATA_ROOT", "/data/imagenet"], "stage pretrain.none (" ),
    (["PRETRAIN.DATA_ROOT", "/data/imagenet"], "dataset root /data/imagenet (DATA.ROOT or $IMAGENET_ROOT) is not a folder"),
])
def test_a_bad_study_config_is_one_clear_error(overrides, message, tmp_path):
    result = run_study(REPO / "configs/study/paper_r50_voc.yaml", "OUTPUT_DIR", str(tmp_path / "out"),
                       "DETECT.ENGINE", "torchvision", *overrides)
    assert result.returncode == 2, explain(result)
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    ([], "PRETRAIN.WEIGHTS_ROOT is empty: give the folder that holds the weights files (arm 'none': "
         "none/model_best.pth.tar)"),
    (["PRETRAIN.WEIGHTS_ROOT", "/data/released", "STUDY.METHODS", "['none', 'cutmix']"],
     "PRETRAIN.WEIGHTS names arm 'cutout', which is not among STUDY.METHODS ['none', 'cutmix']"),
    (["PRETRAIN.WEIGHTS_ROOT", "/data/released", "PRETRAIN.WEIGHTS.mixup", "''"],
     "PRETRAIN.WEIGHTS: arm 'mixup' needs a file name, got ''"),
])
def test_a_bad_choice_of_weights_files_is_one_clear_error(overrides, message):
    with pytest.raises(StudyConfigError) as error:
        load_study_cfg(REPO / "configs/study/released_r50_voc.yaml", overrides)
    assert str(error.value) == message


def test_the_report_of_an_empty_study_shows_every_figure_as_missing(tmp_path):
    cfg = load_study_cfg(REPO / "configs/study/paper_r50_voc.yaml", ["OUTPUT_DIR", str(tmp_path)])
    report = write_report(cfg)
    for table in report["tables"]:
        assert all(row["ours"] is None for row in table["rows"]), table["name"]
        assert (tmp_path / f"study_report_{table['name']}.png").stat().st_size > 0
    markdown = (tmp_path / "study_report.md").read_text()
    assert f"| none | {MISSING} | 23.68 |" in markdown and f"| saliencymix | {MISSING} | 78.48 |" in markdown
    assert f"| saliencymix_official | {MISSING} | 21.26 |" in markdown  # as published, beside the paper too
    assert f"| saliencymix_official | {MISSING} | 78.48 |" in markdown
    assert "0.00" not in markdown


def test_the_study_runs_with_detectron2_when_installed(data, tmp_path):
    pytest.importorskip("detectron2")
    config = write_config(tmp_path / "study.yaml", data, tmp_path / "output", engine="detectron2",
                          ROBUSTNESS={"ENABLED": False}, COST={"ENABLED": False})
    result = run_study(config)
    assert result.returncode == 0, explain(result)
    for method in METHODS:
        assert (tmp_path / "output" / "pretrain" / method / "backbone.pkl").is_file()
        run = detection_records.read_run(tmp_path / "output" / "detect" / method / "trial_0")
        assert run["info"]["engine"] == "detectron2"




def test_the_optional_coco_stage_fine_tunes_every_arm_and_reports_box_and_mask_ap(data, tmp_path):
    """COCO alone (no VOC, FGSM or cost stages) on the demo data's COCO-format copy, from
    randomly initialised ResNet-50s put where the pretraining and export stages leave theirs
    (so those stages are done already)."""
    output = tmp_path / "output"
    for seed, method in enumerate(METHODS):
        folder = output / "pretrain" / method
        folder.mkdir(parents=True)
        torch.manual_seed(seed)
        torch.save({"model": torchvision.models.resnet50().state_dict()}, folder / "model_final.pth")
        convert(folder / "model_final.pth", folder / "backbone.pth", fmt="torchvision")
    # One iteration, every detection kept: the scores are low, but there must be detections to score.
    coco_opts = ["TRANSFER.COCO_ROOT", str(data / "detection_coco"), *DETECT_OPTS, "SOLVER.MAX_ITER", "1",
                 "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    config = write_config(tmp_path / "study.yaml", data, output, DETECT={"ENABLED": False},
                          ROBUSTNESS={"ENABLED": False}, COST={"ENABLED": False},
                          COCO={"ENABLED": True, "OPTS": coco_opts})
    result = run_study(config)
    assert result.returncode == 0, explain(result)
    assert result.stdout.count("done already") == 4  # the pretrainings and exports put in place
    for method in METHODS:
        run = detection_records.read_run(output / "coco" / method / "trial_0")
        assert run["info"]["dataset_kind"] == "coco" and run["info"]["method"] == method
        assert run["info"]["test_datasets"] == ["demo_coco_test"] and "segm" in run["results"]
    comparison = json.loads((output / "coco" / "comparison.json").read_text())
    assert comparison["dataset_kind"] == "coco" and {"AP", "segm_AP"} <= set(comparison["metrics"])
    assert "compare.coco" in result.stdout and not (output / "comparison.json").exists()
    report = json.loads((output / "study_report.json").read_text())
    coco = next(table for table in report["tables"] if table["name"] == "coco")
    saliencymix = next(row for row in coco["rows"] if row["method"] == "saliencymix")
    assert saliencymix["ours"] == comparison["methods"]["saliencymix"]["mean"]["AP"]
    assert saliencymix["mask_ap"] and saliencymix["gain"].endswith("[n/a]")  # one trial: no interval
    assert "## COCO box AP (%)" in (output / "study_report.md").read_text()


def test_the_demo_data_holds_the_detection_set_in_coco_format_too(data):
    """The same images, classes and boxes as the VOC tree, each object with its polygon mask."""
    classes = json.loads((data / "manifest.json").read_text())["classes"]
    for split in ("trainval", "test"):
        voc = load_voc_split(data / "detection", split, classes)
        coco = load_coco_records(data / "detection_coco" / "annotations" / f"instances_{split}.json",
                                 data / "detection_coco" / split)
        assert [Path(record["file_name"]).name for record in coco] == [Path(record["file_name"]).name for record in voc]
        for voc_record, coco_record in zip(voc, coco):
            assert Path(coco_record["file_name"]).read_bytes() == Path(voc_record["file_name"]).read_bytes()
            assert [a["category_id"] for a in coco_record["annotations"]] == [a["category_id"] for a in voc_record["annotations"]]
            for voc_object, coco_object in zip(voc_record["annotations"], coco_record["annotations"]):
                assert coco_object["bbox"] == pytest.approx(voc_object["bbox"], abs=1.0)  # the outline's bounds
                assert len(coco_object["segmentation"]) == 1


def test_a_finished_trial_without_a_score_stops_the_report_with_one_error_line(tmp_path):
    """A detector that found nothing has AP null (as Detectron2's evaluators give it): the report
    names the file instead of printing a traceback."""
    trial = tmp_path / "output" / "detect" / "none" / "trial_0"
    trial.mkdir(parents=True)
    (trial / detection_records.RUN_INFO).write_text(json.dumps({"method": "none", "engine": "torchvision"}))
    (trial / detection_records.EVAL_RESULTS).write_text(json.dumps({"bbox": {"AP": None, "AP50": None, "AP75": None}}))
    config = write_config(tmp_path / "study.yaml", tmp_path / "data", tmp_path / "output")
    result = run_study(config, "--report")
    assert result.returncode == 1, explain(result)
    assert result.stderr.startswith("error: ") and str(trial / detection_records.EVAL_RESULTS) in result.stderr
    assert "Traceback" not in result.stderr
