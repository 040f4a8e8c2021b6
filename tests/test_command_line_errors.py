"""Bad input at every tool's command line: one line, ``error: ...``, naming the key or path and
what is allowed, exit status 2, no traceback, nothing written to OUTPUT_DIR."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from tool_process import run_tool
from voc_tree import CLASSES, write_voc_tree

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "configs/demo/pretrain_none.yaml")
DETECT = str(REPO / "configs/detection/faster_rcnn_R50_FPN_voc.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A two-class ImageFolder (train/ and val/) and a tiny VOC tree."""
    root = tmp_path_factory.mktemp("cli")
    for split in ("train", "val"):
        for label in range(2):
            folder = root / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(4):
                cv2.imwrite(str(folder / f"{index}.png"), np.full((16, 16, 3), 60 * label + index, np.uint8))
    torch.save(torchvision.models.resnet50().state_dict(), root / "resnet50_1000_classes.pth")
    return {"images": root / "images", "voc": write_voc_tree(root / "voc", train=2, test=2),
            "resnet50_1000_classes": root / "resnet50_1000_classes.pth"}


def pretrain_options(data, output: Path) -> list[str]:
    return ["DATA.ROOT", str(data["images"]), "MODEL.NUM_CLASSES", "2", "OUTPUT_DIR", str(output)]


def detect_options(data, output: Path) -> list[str]:
    return ["TRANSFER.VOC_ROOT", str(data["voc"]), "TRANSFER.DATASET_NAME", "tiny", "TRANSFER.CLASS_NAMES",
            str(list(CLASSES)), "DATASETS.TRAIN", "('tiny_trainval',)", "DATASETS.TEST", "('tiny_test',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(CLASSES)), "OUTPUT_DIR", str(output)]


# case: (tool, flags, KEY VALUE overrides after the test data's, the error's text)
CASES = {
    "unknown key": ("pretrain_net.py", ["--config-file", PRETRAIN], ["SOLVER.NOT_A_KEY", "1"],
                    "the command line: Non-existent key: SOLVER.NOT_A_KEY"),
    "unknown mixer": ("pretrain_net.py", ["--config-file", PRETRAIN], ["MIX.NAME", "saliencymixx"],
                      "MIX: unknown mixing method 'saliencymixx'; choose one of ('none', 'cutout'"),
    "unknown box mode": ("pretrain_net.py", ["--config-file", PRETRAIN], ["MIX.NAME", "saliencymix", "MIX.BOX", "image"],
                         "MIX: unknown box mode 'image'"),
    "head lr factor": ("pretrain_net.py", ["--config-file", PRETRAIN], ["SOLVER.HEAD_LR_FACTOR", "0.0"],
                       "SOLVER.HEAD_LR_FACTOR is 0.0; it must be above 0"),
    "missing data root": ("pretrain_net.py", ["--config-file", PRETRAIN], ["DATA.ROOT", "/no/such/imagenet"],
                          "dataset root /no/such/imagenet (DATA.ROOT or $IMAGENET_ROOT) is not a folder"),
    "device backend on cifar": ("pretrain_net.py", ["--config-file", PRETRAIN],
                                ["DATA.BACKEND", "device", "DATA.AUGMENT", "crop_flip"],
                                "DATA.BACKEND device decodes ImageFolder JPEGs with the imagenet augmentation"),
    "unknown backend": ("pretrain_net.py", ["--config-file", PRETRAIN], ["DATA.BACKEND", "dali"],
                        "DATA.BACKEND is 'dali'; choose one of pil, device"),
    "bad num-gpus": ("pretrain_net.py", ["--config-file", PRETRAIN, "--num-gpus", "0"], [],
                     "--num-gpus is 0; give 1 or more"),
    "batch across processes": ("pretrain_net.py", ["--config-file", PRETRAIN, "--num-gpus", "3"],
                               ["SOLVER.BATCH_SIZE", "32"], "SOLVER.BATCH_SIZE 32 does not divide among 3 processes"),
    "missing eval weights": ("pretrain_net.py", ["--config-file", PRETRAIN, "--eval-only"], ["MODEL.WEIGHTS", "/no/w.pth"],
                             "MODEL.WEIGHTS /no/w.pth does not exist"),
    "eval weights of another class count": (
        "pretrain_net.py", ["--config-file", PRETRAIN, "--eval-only"], ["MODEL.WEIGHTS", "{resnet50_1000_classes}"],
        "resnet50_1000_classes.pth: does not fit MODEL.ARCH resnet50 with MODEL.NUM_CLASSES 2: wrong shape "
        "fc.weight: (1000, 2048), expected (2, 2048); wrong shape fc.bias: (1000,), expected (2,)"),
    "detection unknown key": ("train_net.py", ["--engine", "torchvision", "--config-file", DETECT],
                              ["SOLVER.NOPE", "1"], "the command line: Non-existent key: SOLVER.NOPE"),
    "detection missing weights": ("train_net.py", ["--engine", "torchvision", "--config-file", DETECT],
                                  ["MODEL.WEIGHTS", "/no/backbone.pth"], "MODEL.WEIGHTS: /no/backbone.pth does not exist"),
    "detection missing data": ("train_net.py", ["--engine", "torchvision", "--config-file", DETECT],
                               ["TRANSFER.VOC_ROOT", "/no/voc"],
                               "dataset tiny_trainval: /no/voc/ImageSets/Main/trainval.txt does not exist"),
    "detection device per process": ("train_net.py", ["--engine", "torchvision", "--config-file", DETECT,
                                                      "--num-gpus", "2"], ["MODEL.DEVICE", "cuda:1"],
                                     "MODEL.DEVICE is 'cuda:1', which puts all 2 processes on one GPU"),
    "detection trials": ("train_net.py", ["--engine", "torchvision", "--config-file", DETECT, "--trials", "0"], [],
                         "--trials must be at least 1, got 0"),
    "robustness missing weights": ("eval_robustness.py", ["--config-file", PRETRAIN], ["MODEL.WEIGHTS", "/no/w.pth"],
                                   "MODEL.WEIGHTS /no/w.pth does not exist"),
    "robustness bad key": ("eval_robustness.py", ["--config-file", PRETRAIN], ["MIX.NOPE", "1"],
                           "Non-existent key: MIX.NOPE"),
    "export missing input": ("convert_to_d2.py", ["/no/model_final.pth", "OUT/backbone.pkl"], [], "/no/model_final.pth"),
    "compare missing runs": ("compare.py", ["/no/runs", "--output", "OUT"], [], "/no/runs: no such run folder"),
    "cost missing runs": ("cost_report.py", ["/no/run", "--output", "OUT/cost.json"], [],
                          "/no/run/config.yaml does not exist"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_error_line_with_exit_status_2(case, data, tmp_path):
    script, flags, overrides, message = CASES[case]
    output = tmp_path / "out"
    defaults = {"pretrain_net.py": pretrain_options, "eval_robustness.py": pretrain_options,
                "train_net.py": detect_options}.get(script)
    arguments = [*(flag.replace("OUT", str(output)) for flag in flags),
                 *(defaults(data, output) if defaults else []), *(value.format(**data) for value in overrides)]
    finished = run_tool(f"tools/{script}", *arguments)
    assert finished.returncode == 2, finished.stderr[-3000:]
    errors = finished.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), finished.stderr[-3000:]
    assert message in errors[0], errors[0]
    assert not output.exists()
