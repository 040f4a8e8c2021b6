"""The torchvision engine on a tiny COCO-format set: Mask R-CNN's training targets (polygon masks
flipped with the image, crowd regions left out), the detector from the exported backbone, and
tools/train_net.py through training, box and mask evaluation, the run folder and resuming."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN

from coco_tree import CLASSES, write_coco_tree
from detection import records
from detection import torchvision_engine as engine
from detection.coco import load_coco_records
from detection.coco_evaluation import METRICS, RESULTS_FILE
from detection.config import get_detection_cfg
from detection.datasets import VOCDataset
from detection.torchvision_engine.data import TrainingImages, check_masks, training_records, training_target
from detection.torchvision_engine.inference import evaluate_model
from detection.torchvision_engine.model import build_detector, build_model
from pretrain import checkpoint as ckpt
from pretrain.export import convert
from tool_process import run_tool

REPO = Path(__file__).resolve().parents[1]
MASK_RCNN = REPO / "configs/detection/coco/mask_rcnn_R50_FPN_1x.yaml"
FASTER_RCNN = REPO / "configs/detection/coco/faster_rcnn_R50_FPN_1x.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny COCO-format set and a random ResNet-50 exported through the real path. Its residual
    branches start at zero, so that its untrained features keep an image's scale and a detector
    on it proposes boxes (a plain random ResNet-50's features grow with depth into thousands)."""
    folder = tmp_path_factory.mktemp("coco_engine")
    checkpoint = folder / "pretrain_final.pth"
    torch.manual_seed(0)
    torch.save({"model": torchvision.models.resnet50(zero_init_residual=True).state_dict(), "iteration": 1},
               checkpoint)
    convert(checkpoint, folder / "backbone.pth", fmt="torchvision")
    return {"coco": write_coco_tree(folder / "coco", train=6, test=3, size=(64, 80)),
            "backbone": folder / "backbone.pth"}


def tiny_overrides(files: dict, output: Path) -> list[str]:
    """The COCO configs cut down to a few CPU iterations on 64-pixel images, every box kept
    (SCORE_THRESH_TEST 0) so that three iterations give detections to evaluate, but only ten per
    image (the mask head's cost grows with them)."""
    return ["TRANSFER.COCO_ROOT", str(files["coco"]), "TRANSFER.DATASET_NAME", "tiny_coco",
            "DATASETS.TRAIN", "('tiny_coco_train',)", "DATASETS.TEST", "('tiny_coco_val',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(CLASSES)), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS",
            str(files["backbone"]), "OUTPUT_DIR", str(output), "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)",
            "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
            "TEST.PRECISE_BN.ENABLED", "False", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
            "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "TEST.DETECTIONS_PER_IMAGE", "10", "SEED", "3",
            "TRANSFER.METHOD", "saliencymix"]


def tiny_config(files: dict, output: Path, config_file: Path = MASK_RCNN, *extra: str):
    cfg = get_detection_cfg("torchvision")
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list([*tiny_overrides(files, output), *extra])
    return cfg


def train_records(files: dict) -> list[dict]:
    return load_coco_records(files["coco"] / "annotations" / "instances_train.json", files["coco"] / "train")


# -------------------------------------------------------------------------------------- data
def test_mask_targets_are_the_polygons_flipped_with_the_image_and_crowds_left_out(files):
    record = train_records(files)[0]
    plain = training_target(record, flip=False, with_masks=True)
    count = len(record["annotations"])
    assert plain["masks"].shape == (count, record["height"], record["width"]) and plain["masks"].dtype == torch.uint8
    for mask, box in zip(plain["masks"], plain["boxes"]):
        rows, columns = torch.nonzero(mask, as_tuple=True)
        bounds = torch.stack([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]).float()
        assert torch.allclose(bounds, box, atol=1.0), (bounds, box)  # the shape fills its box
    flipped = training_target(record, flip=True, with_masks=True)
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    image, target = TrainingImages([record], with_masks=True)[0, True]
    assert image.shape[-2:] == plain["masks"].shape[-2:] and torch.equal(target["masks"], flipped["masks"])

    crowd = {**record, "annotations": [*record["annotations"], {**record["annotations"][0], "iscrowd": 1}]}
    with_crowd = training_target(crowd, flip=False, with_masks=True)
    assert all(torch.equal(with_crowd[key], plain[key]) for key in plain)
    assert set(training_target(record, flip=False)) == {"boxes", "labels"}  # Faster R-CNN: no masks


def test_crowd_only_images_are_not_trained_on_and_mask_rcnn_needs_every_polygon(files, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(files["coco"], coco)
    json_file = coco / "annotations" / "instances_train.json"
    data = json.loads(json_file.read_text())
    crowd_image, bare_image = data["images"][0]["id"], data["images"][1]["id"]
    for annotation in data["annotations"]:
        annotation["iscrowd"] = int(annotation["image_id"] == crowd_image)
    json_file.write_text(json.dumps(data))
    kept = training_records(tiny_config({**files, "coco": coco}, tmp_path))
    assert len(kept) == len(data["images"]) - 1 and crowd_image not in {r["image_id"] for r in kept}

    next(a for a in data["annotations"] if a["image_id"] == bare_image).pop("segmentation")
    json_file.write_text(json.dumps(data))
    assert len(training_records(tiny_config({**files, "coco": coco}, tmp_path, FASTER_RCNN))) == len(kept)
    with pytest.raises(ValueError, match=rf"object 0 of image {bare_image} \(.*000001.jpg\) in .*instances_train"
                                         r".json has no polygon segmentation"):
        training_records(tiny_config({**files, "coco": coco}, tmp_path))
    with pytest.raises(ValueError, match="tiny_voc_trainval is a VOC tree, which has no instance masks"):
        check_masks(VOCDataset("tiny_voc_trainval", tmp_path, "trainval", 2007, ("a",)), [])


# ------------------------------------------------------------------------------------- model
def test_mask_on_builds_mask_rcnn_with_every_exported_backbone_tensor(files, tmp_path):
    model = build_model(tiny_config(files, tmp_path))
    assert isinstance(model, MaskRCNN)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == len(CLASSES) + 1
    exported = {name: tensor for name, tensor in torch.load(files["backbone"], weights_only=True).items()
                if not name.startswith("fc.")}
    body = model.backbone.body.state_dict()
    assert set(body) == set(exported) and all(torch.equal(body[name], exported[name]) for name in exported)
    faster = build_detector(tiny_config(files, tmp_path, FASTER_RCNN))
    assert isinstance(faster, FasterRCNN) and not isinstance(faster, MaskRCNN)


# ------------------------------------------------------------------------ training, evaluation
@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> Path:
    """tools/train_net.py with the Mask R-CNN R50-FPN config: three iterations, a checkpoint at
    two, then box and mask evaluation of model_final.pth."""
    output = tmp_path_factory.mktemp("coco_run")
    run = run_tool("tools/train_net.py", "--engine", "torchvision", "--config-file", MASK_RCNN,
                   *tiny_overrides(files, output), timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return output


def test_train_net_writes_box_and_mask_ap_and_the_run_records(trained):
    run = records.read_run(trained)
    assert run["info"]["engine"] == "torchvision" and run["info"]["method"] == "saliencymix"
    assert run["info"]["train_datasets"] == ["tiny_coco_train"] and run["info"]["max_iter"] == 3
    results = run["results"]
    assert results["iteration"] == 3 and {"bbox", "segm"} <= set(results)
    for task in ("bbox", "segm"):
        assert set(results[task]) == {*METRICS, *(f"AP-{name}" for name in CLASSES)}, task
        assert all(0 <= results[task][metric] <= 100 for metric in ("AP", "AP50", "AP75")), results[task]
        assert all(value is None or 0 <= value <= 100 for value in results[task].values())  # None: NaN
    detections = json.loads((trained / "inference" / RESULTS_FILE).read_text())
    assert detections and all("segmentation" in detection for detection in detections)

    rows = [json.loads(line) for line in (trained / "metrics.json").read_text().splitlines()]
    assert rows[-1]["iteration"] == 2 and math.isfinite(rows[-1]["loss_mask"])
    assert (trained / "checkpoint_00000002.pth").is_file() and (trained / "config.yaml").is_file()
    assert (trained / ckpt.LAST_POINTER).read_text() == ckpt.FINAL_NAME


def test_resume_continues_from_the_last_checkpoint_to_the_same_weights(files, trained, tmp_path):
    shutil.copy(trained / "checkpoint_00000002.pth", tmp_path / "checkpoint_00000002.pth")
    (tmp_path / ckpt.LAST_POINTER).write_text("checkpoint_00000002.pth")
    cfg = get_detection_cfg("torchvision")
    cfg.merge_from_file(str(trained / "config.yaml"))  # the run's own config
    cfg.OUTPUT_DIR = str(tmp_path)
    engine.TorchvisionTrainer(cfg, resume=True).train()  # train() would evaluate too
    resumed, uninterrupted = (ckpt.load(folder / ckpt.FINAL_NAME)["model"] for folder in (tmp_path, trained))
    assert any(name.startswith("roi_heads.mask_") for name in uninterrupted)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_faster_rcnn_on_coco_reports_boxes_only(files, tmp_path):
    cfg = tiny_config(files, tmp_path, FASTER_RCNN)
    results = evaluate_model(build_detector(cfg), cfg, torch.device("cpu"))
    assert set(results) == {"bbox"} and set(METRICS) <= set(results["bbox"])
