"""COCO transfer with Detectron2 (skipped without it): the exported pickle in every COCO config,
a tiny COCO-format set through tools/train_net.py with Mask R-CNN, and COCOEvaluator scoring
predictions made from the ground truth."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coco_tree import CLASSES, write_coco_tree
from detection import records
from pretrain.export import convert
from test_export import TENSOR_COUNTS, random_resnet_state, read_pickle, resnet_tensors_in

detectron2 = pytest.importorskip("detectron2")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "detection" / "coco"
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny COCO-format set and a ResNet-50 with random weights and BN statistics, exported."""
    folder = tmp_path_factory.mktemp("coco_transfer")
    checkpoint = folder / "resnet50.pth"
    torch.save(random_resnet_state(50, seed=0), checkpoint)
    convert(checkpoint, folder / "backbone.pkl")
    return {"coco": write_coco_tree(folder / "coco", train=6, test=4), "pkl": folder / "backbone.pkl"}


def coco_cfg(config: str, *overrides):
    from detection.config import get_detection_cfg

    cfg = get_detection_cfg("detectron2")
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *overrides])
    return cfg


@pytest.mark.parametrize("config", ["mask_rcnn_R50_FPN_1x.yaml", "mask_rcnn_R50_FPN_2x.yaml",
                                    "mask_rcnn_R50_C4_1x.yaml", "faster_rcnn_R50_FPN_1x.yaml"])
def test_exported_pickle_fills_every_backbone_tensor_of_each_coco_config(data, config):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import detection.detectron2_engine  # noqa: F401  (registers the extra-norm C4 head)

    model = build_model(coco_cfg(config))
    DetectionCheckpointer(model).load(str(data["pkl"]))
    state = model.state_dict()
    # New in the model, not from ImageNet: the C4 head's extra norm, SyncBN's batch counters.
    placed = {name: key for name, key in resnet_tensors_in(state, fpn="FPN" in config).items()
              if not name.startswith("res5.norm.") and not name.endswith("num_batches_tracked")}
    exported = read_pickle(data["pkl"])["model"]
    assert set(placed) == set(exported) and len(placed) == TENSOR_COUNTS[50]
    unequal = [name for name, array in exported.items() if not torch.equal(state[placed[name]], torch.from_numpy(array))]
    assert not unequal, f"{len(unequal)} tensors not loaded, e.g. {unequal[:5]}"
    assert ("mask_head" in str(list(state))) == ("mask_rcnn" in config)


TINY = ["TRANSFER.DATASET_NAME", "tiny", "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(CLASSES)), "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False", "TRANSFER.METHOD", "saliencymix",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]


def test_mask_rcnn_fine_tunes_on_a_coco_format_set_and_reports_box_and_mask_ap(data, tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools/train_net.py"), "--engine", "detectron2",
                          "--config-file", str(CONFIGS / "mask_rcnn_R50_FPN_1x.yaml"), *TINY,
                          "TRANSFER.COCO_ROOT", str(data["coco"]), "MODEL.WEIGHTS", str(data["pkl"]),
                          "OUTPUT_DIR", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    finished = records.read_run(tmp_path)
    assert finished["info"]["test_datasets"] == ["tiny_val"] and finished["info"]["engine"] == "detectron2"
    assert finished["info"]["dataset_kind"] == "coco"
    for task in ("bbox", "segm"):
        scores = finished["results"][task]
        assert set(COCO_METRICS) <= set(scores)  # (and AP-<class> when the model predicted anything)
        assert all(scores[metric] is None or 0 <= scores[metric] <= 100 for metric in scores), scores
        assert scores["APl"] is None  # no large objects: COCOEvaluator's NaN, written as null
    # COCOEvaluator's predictions name the json's category ids, not the contiguous indices.
    predictions = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert {prediction["category_id"] for prediction in predictions} <= {1, 2, 3}


def test_coco_evaluator_gives_100_to_predictions_equal_to_the_ground_truth(data, tmp_path):
    from detectron2.structures import Boxes, Instances
    from pycocotools.coco import COCO

    from detection.coco import load_coco_records
    from detection.detectron2_engine import TransferTrainer
    from detection.register import register_config_datasets

    cfg = coco_cfg("mask_rcnn_R50_FPN_1x.yaml", *TINY, "TRANSFER.COCO_ROOT", str(data["coco"]),
                   "OUTPUT_DIR", str(tmp_path))
    assert register_config_datasets(cfg) == ["tiny_train", "tiny_val"]
    evaluator = TransferTrainer.build_evaluator(cfg, "tiny_val")
    evaluator.reset()
    json_file = data["coco"] / "annotations" / "instances_val.json"
    api = COCO(str(json_file))
    for record in load_coco_records(json_file, data["coco"] / "val"):
        annotations = api.loadAnns(api.getAnnIds(imgIds=[record["image_id"]]))
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in record["annotations"]]))
        instances.scores = torch.ones(len(annotations))
        instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
        instances.pred_masks = torch.stack([torch.from_numpy(api.annToMask(a)).bool() for a in annotations])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == results[task]["AP50"] == results[task]["AP75"] == 100, results[task]
