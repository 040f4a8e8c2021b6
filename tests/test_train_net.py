"""tools/train_net.py end to end on a tiny VOC-format tree: Detectron2 (when installed) and the
torchvision engine, from a backbone exported by tools/convert_to_d2.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from detection import records
from pretrain.export import convert
from tool_process import run_tool
from voc_tree import CLASSES, write_voc_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["TRANSFER.VOC_ROOT", None, "TRANSFER.DATASET_NAME", "tiny_voc", "TRANSFER.CLASS_NAMES", str(list(CLASSES)),
        "DATASETS.TRAIN", "('tiny_voc_trainval',)", "DATASETS.TEST", "('tiny_voc_test',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(CLASSES)), "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005",
        "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False", "TRANSFER.METHOD", "saliencymix"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A VOC tree and a ResNet-50 backbone exported in both formats from a checkpoint of ours."""
    folder = tmp_path_factory.mktemp("transfer")
    checkpoint = folder / "model_final.pth"
    torch.save({"model": torchvision.models.resnet50().state_dict(), "iteration": 10}, checkpoint)
    convert(checkpoint, folder / "backbone.pkl")
    convert(checkpoint, folder / "backbone.pth", fmt="torchvision")
    return {"voc": write_voc_tree(folder / "voc"), "pkl": folder / "backbone.pkl", "pth": folder / "backbone.pth"}


def train_net(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_tool("tools/train_net.py", *arguments, timeout=timeout)


def overrides(voc: Path, output: Path, weights: Path) -> list[str]:
    values = list(TINY)
    values[1] = str(voc)
    return [*values, "OUTPUT_DIR", str(output), "MODEL.WEIGHTS", str(weights)]


def assert_finished_run(output: Path, engine: str) -> dict:
    run = records.read_run(output)
    assert run["info"]["engine"] == engine and run["info"]["method"] == "saliencymix"
    assert run["info"]["train_datasets"] == ["tiny_voc_trainval"] and run["info"]["max_iter"] == 3
    assert run["info"]["dataset_kind"] == "voc"
    assert run["info"]["architecture"].endswith(f"({engine.replace('detectron2', 'Detectron2')})")
    for metric in ("AP", "AP50", "AP75"):
        assert 0 <= run["results"]["bbox"][metric] <= 100
    return run


# Few proposals and sampled RoIs: a C4 head runs res5 on every RoI, which a CPU feels.
SMALL_HEADS = ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
               "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
               "MODEL.RPN.POST_NMS_TOPK_TEST", "32"]
# Parts of the detector that are not in an ImageNet backbone, so start untrained.
NEW_HEADS = ("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.box_head.", "roi_heads.res5.norm.",
             "backbone.fpn_")


def weights_missing_from_checkpoint(log: str) -> list[str]:
    """The names fvcore lists as 'not found in the checkpoint' (it only logs them)."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "not found in the checkpoint" in line]
    missing = []
    for start in starts:
        for line in lines[start + 1:]:
            if line.startswith(("[", "W", "/")) or not line.strip():
                break
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("config", ["faster_rcnn_R50_C4_voc.yaml", "faster_rcnn_R50_FPN_voc.yaml",
                                    "faster_rcnn_R50_C4_voc_18k_frozen_bn.yaml"])
def test_detectron2_trains_from_the_exported_pickle_and_evaluates(exported, tmp_path, config):
    pytest.importorskip("detectron2")
    run = train_net("--config-file", str(REPO / "configs/detection" / config),
                    *overrides(exported["voc"], tmp_path, exported["pkl"]), *SMALL_HEADS)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert_finished_run(tmp_path, "detectron2")
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "config.yaml").is_file()
    # Every exported backbone tensor reached the model: only new heads start from scratch.
    missing = weights_missing_from_checkpoint(log)
    assert missing and all(name.startswith(NEW_HEADS) for name in missing), missing
    assert "not used by the model" not in log


def test_torchvision_engine_through_the_same_command(exported, tmp_path):
    run = train_net("--engine", "torchvision", "--config-file", str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml"),
                    *overrides(exported["voc"], tmp_path, exported["pth"]))
    assert run.returncode == 0, run.stderr[-4000:]
    assert_finished_run(tmp_path, "torchvision")


def test_the_torchvision_engine_refuses_a_c4_config_it_would_train_as_fpn(exported, tmp_path):
    run = train_net("--engine", "torchvision", "--config-file", str(REPO / "configs/detection/faster_rcnn_R50_C4_voc.yaml"),
                    *overrides(exported["voc"], tmp_path, exported["pth"]))
    assert run.returncode == 2 and run.stderr.startswith("error: MODEL.BACKBONE.NAME is 'build_resnet_backbone' "
                                                         "(Detectron2 default), but the torchvision engine"), run.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_trials_get_their_own_folders_and_seeds(exported, tmp_path):
    run = train_net("--engine", "torchvision", "--trials", "2", "--config-file",
                    str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml"),
                    *overrides(exported["voc"], tmp_path, exported["pth"]), "SEED", "7", "SOLVER.MAX_ITER", "1",
                    "SOLVER.STEPS", "()")
    assert run.returncode == 0, run.stderr[-4000:]
    seeds = [records.read_run(tmp_path / f"trial_{k}")["info"]["seed"] for k in range(2)]
    assert seeds == [7, 8]


def test_class_count_mismatch_is_named(exported, tmp_path):
    run = train_net("--engine", "torchvision", "--config-file", str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml"),
                    *overrides(exported["voc"], tmp_path, exported["pth"]), "MODEL.ROI_HEADS.NUM_CLASSES", "20")
    assert run.returncode != 0 and "NUM_CLASSES is 20 but dataset tiny_voc_trainval has 3 classes" in run.stderr
    assert not (tmp_path / records.RUN_INFO).exists()


def test_unknown_dataset_name_is_named(exported, tmp_path):
    run = train_net("--engine", "torchvision", "--config-file", str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml"),
                    *overrides(exported["voc"], tmp_path, exported["pth"]), "DATASETS.TEST", "('lvis_v1_val',)")
    assert run.returncode != 0 and "unknown dataset 'lvis_v1_val'" in run.stderr


@pytest.mark.parametrize("engine", ["detectron2", "torchvision"])
def test_a_yaml_transfer_section_merges_into_either_engines_config(engine):
    if engine == "detectron2":
        pytest.importorskip("detectron2")
    from detection.config import get_detection_cfg

    cfg = get_detection_cfg(engine)
    cfg.merge_from_file(str(REPO / "configs/demo/detection.yaml"))
    assert cfg.TRANSFER.DATASET_NAME == "demo_voc" and len(cfg.TRANSFER.CLASS_NAMES) == 5


def test_detectron2_under_torchrun_runs_as_one_process_group(exported, tmp_path):
    """Evaluation only: Detectron2's DDP wrapper asks for a GPU per process, so a CPU cannot train
    with two; evaluation shards the test set over the processes and gathers their outputs."""
    pytest.importorskip("detectron2")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(REPO / "tools/train_net.py"), "--engine", "detectron2", "--eval-only", "--config-file",
                          str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml"),
                          *overrides(exported["voc"], tmp_path, exported["pkl"]), *SMALL_HEADS],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "Rank of current process: 0. World size: 2" in log  # (the other rank logs to its file only)
    assert "Start inference on 3 batches" in log  # each process: 3 of the 6 test images
    assert_finished_run(tmp_path, "detectron2")
