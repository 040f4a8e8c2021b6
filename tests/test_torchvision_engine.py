"""The torchvision engine on a tiny VOC-format tree: backbone loading from the exporter's
torchvision format, the training data, Detectron2's schedule, training, resuming, evaluation."""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from fvcore.common.config import CfgNode as CN
from torchvision.ops.misc import FrozenBatchNorm2d

from detection import torchvision_engine as engine
from detection.config import get_detection_cfg
from detection.torchvision_engine.data import (TrainingImages, TrainingSampler, read_image, training_records,
                                              training_target)
from detection.torchvision_engine.model import build_detector, build_model, load_backbone, pixel_statistics
from detection.torchvision_engine.solver import build_optimizer, lr_multiplier
from detection.voc import load_voc_split, write_annotation
from pretrain import checkpoint as ckpt
from pretrain.data import ShardSampler
from helpers.distributed import launch
from pretrain.export import convert
from voc_tree import CLASSES, write_voc_tree


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny VOC tree and a random ResNet-50 exported through the real path (our checkpoint
    dict -> ``convert(..., fmt="torchvision")``)."""
    folder = tmp_path_factory.mktemp("engine")
    checkpoint = folder / "pretrain_final.pth"
    torch.save({"model": torchvision.models.resnet50().state_dict(), "iteration": 1}, checkpoint)
    convert(checkpoint, folder / "backbone.pth", fmt="torchvision")
    return {"voc": write_voc_tree(folder / "voc", train=12, test=4, size=(64, 80)),
            "backbone": folder / "backbone.pth"}


def nested(flat: dict) -> dict:
    """``{"A.B": v}`` -> ``{"A": {"B": v}}``."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def tiny_config(files: dict, output: Path, **overrides) -> CN:
    """Tiny sizes and schedule on the CPU; ``overrides`` use ``__`` for dots (Detectron2-only
    keys such as MODEL__RESNETS__NORM allowed)."""
    values = {
        "TRANSFER.VOC_ROOT": str(files["voc"]), "TRANSFER.DATASET_NAME": "tiny_voc",
        "TRANSFER.CLASS_NAMES": list(CLASSES), "DATASETS.TRAIN": ("tiny_voc_trainval",),
        "DATASETS.TEST": ("tiny_voc_test",), "MODEL.ROI_HEADS.NUM_CLASSES": len(CLASSES),
        "MODEL.WEIGHTS": str(files["backbone"]), "MODEL.DEVICE": "cpu", "OUTPUT_DIR": str(output),
        "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530], "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
        "INPUT.FORMAT": "RGB", "INPUT.MIN_SIZE_TRAIN": (64,), "INPUT.MAX_SIZE_TRAIN": 128,
        "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 128, "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.BASE_LR": 0.01, "SOLVER.MAX_ITER": 4, "SOLVER.STEPS": (3,), "SOLVER.WARMUP_ITERS": 2,
        "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.CHECKPOINT_PERIOD": 2, "DATALOADER.NUM_WORKERS": 0, "SEED": 3,
        "MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": 0,
        # what the engine builds, named as an FPN config names it (Detectron2's defaults are C4)
        "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone", "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64, "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 64,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    cfg = get_detection_cfg("torchvision")
    cfg.merge_from_other_cfg(CN(nested(values)))
    return cfg


def exported_backbone(files: dict) -> dict[str, torch.Tensor]:
    return torch.load(files["backbone"], weights_only=True)


# ------------------------------------------------------------------------------------- model
def test_build_model_loads_every_exported_backbone_tensor(files, tmp_path):
    model = build_model(tiny_config(files, tmp_path))
    body = model.backbone.body.state_dict()
    exported = exported_backbone(files)
    backbone = {name: tensor for name, tensor in exported.items() if not name.startswith("fc.")}
    assert set(body) == set(backbone)
    for name, tensor in backbone.items():
        assert torch.equal(body[name], tensor), name
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(parameter.requires_grad for parameter in model.backbone.body.parameters())


def test_frozen_bn_and_frozen_stages_follow_detectron2_keys(files, tmp_path):
    frozen = build_detector(tiny_config(files, tmp_path, MODEL__RESNETS__NORM="FrozenBN"))
    assert load_backbone(frozen, files["backbone"], 50) == 265  # no BN batch counters to receive
    assert isinstance(frozen.backbone.body.layer4[2].bn3, FrozenBatchNorm2d)

    body = build_detector(tiny_config(files, tmp_path, MODEL__BACKBONE__FREEZE_AT=2)).backbone.body
    assert not any(p.requires_grad for p in [*body.conv1.parameters(), *body.layer1.parameters()])
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert type(body.layer2[0].bn1) is torch.nn.BatchNorm2d


def test_proposals_kept_per_image_follow_detectron2s_rpn_keys(files, tmp_path):
    rpn = build_detector(tiny_config(files, tmp_path, MODEL__RPN__POST_NMS_TOPK_TRAIN=100,
                                     MODEL__RPN__POST_NMS_TOPK_TEST=50)).rpn
    assert rpn.post_nms_top_n() == 100
    rpn.eval()
    assert rpn.post_nms_top_n() == 50
    model = build_detector(tiny_config(files, tmp_path, MODEL__RPN__POST_NMS_TOPK_TEST=7)).eval()
    images, _ = model.transform([torch.rand(3, 64, 64)])
    with torch.no_grad():
        proposals, _ = model.rpn(images, model.backbone(images.tensors))
    assert len(proposals[0]) == 7


def test_pixel_statistics_are_rgb_in_unit_range(files, tmp_path):
    bgr = tiny_config(files, tmp_path, INPUT__FORMAT="BGR", MODEL__PIXEL_MEAN=[103.53, 116.28, 123.675],
                      MODEL__PIXEL_STD=[57.375, 57.12, 58.395])
    mean, std = pixel_statistics(bgr)
    assert mean == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    assert std == pytest.approx([0.229, 0.224, 0.225], abs=1e-6)


def test_a_detectron2_pickle_is_refused_with_the_export_command(files, tmp_path):
    with pytest.raises(ValueError, match="--format torchvision"):
        build_model(tiny_config(files, tmp_path, MODEL__WEIGHTS=str(tmp_path / "r50.pkl")))


def test_a_backbone_missing_a_tensor_is_refused_naming_it(files, tmp_path):
    state = exported_backbone(files)
    del state["layer2.3.bn3.running_var"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth.*missing layer2\.3\.bn3\.running_var"):
        build_model(tiny_config(files, tmp_path, MODEL__WEIGHTS=str(tmp_path / "broken.pth")))


def test_norm_layers_get_detectron2s_weight_decay(files, tmp_path):
    model = build_detector(tiny_config(files, tmp_path, SOLVER__WEIGHT_DECAY=1e-4))
    decay = {id(p): group["weight_decay"] for group in build_optimizer(
        tiny_config(files, tmp_path), model).param_groups for p in group["params"]}
    assert decay[id(model.backbone.body.bn1.weight)] == 0.0  # SOLVER.WEIGHT_DECAY_NORM
    assert decay[id(model.backbone.body.conv1.weight)] == 1e-4
    assert len(decay) == sum(1 for p in model.parameters() if p.requires_grad)


# -------------------------------------------------------------------------------------- data
def test_training_targets_keep_difficult_objects_and_mirror_boxes(files):
    records = load_voc_split(files["voc"], "trainval", CLASSES)
    record = next(r for r in records if any(a["difficult"] for a in r["annotations"]))
    plain = training_target(record, flip=False)
    assert len(plain["boxes"]) == len(record["annotations"])
    assert plain["labels"].tolist() == [a["category_id"] + 1 for a in record["annotations"]]
    flipped = training_target(record, flip=True)
    width = record["width"]
    assert torch.equal(flipped["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [width, 0, width, 0]), plain["boxes"])
    image, target = TrainingImages([record])[0, True]
    assert image.shape == (3, record["height"], width) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, read_image(record).flip(-1)) and torch.equal(target["boxes"], flipped["boxes"])


def test_degenerate_boxes_are_clipped_or_dropped():
    record = {"width": 50, "height": 40, "annotations": [
        {"bbox": [-3.0, 5.0, 20.0, 60.0], "category_id": 0}, {"bbox": [10.0, 10.0, 10.0, 20.0], "category_id": 1}]}
    target = training_target(record, flip=False)
    assert target["boxes"].tolist() == [[0.0, 5.0, 20.0, 40.0]] and target["labels"].tolist() == [1]


def test_images_without_annotations_are_not_trained_on(files, tmp_path):
    voc = tmp_path / "voc"
    shutil.copytree(files["voc"], voc)
    write_annotation(voc, "empty", 80, 64, [])
    shutil.copy(voc / "JPEGImages" / "000000.jpg", voc / "JPEGImages" / "empty.jpg")
    with open(voc / "ImageSets" / "Main" / "trainval.txt", "a") as split:
        split.write("empty\n")
    records = training_records(tiny_config({**files, "voc": voc}, tmp_path))
    assert len(records) == 12 and "empty" not in {r["image_id"] for r in records}


def test_sampler_deals_one_seeded_stream_and_resumes_inside_it():
    whole = list(_take(TrainingSampler(5, seed=7, rank=0, world_size=1, flip=True), 20))
    ranks = [list(_take(TrainingSampler(5, seed=7, rank=r, world_size=2, flip=True), 10)) for r in (0, 1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]
    assert sorted(index for index, _ in whole[:5]) == list(range(5))  # each epoch a permutation
    assert {flip for _, flip in whole} == {True, False}
    resumed = list(_take(TrainingSampler(5, seed=7, rank=1, world_size=2, flip=True, start=6), 4))
    assert resumed == whole[7:15:2]
    assert not any(flip for _, flip in _take(TrainingSampler(5, 7, 0, 1, flip=False), 20))


def _take(sampler, count: int) -> list:
    return list(itertools.islice(sampler, count))


def test_test_images_are_shared_contiguously_and_exactly_once():
    shares = [list(ShardSampler(7, 3, rank)) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]


# ------------------------------------------------------------------------------ the schedule
SCHEDULE = {"SOLVER.MAX_ITER": 10, "SOLVER.STEPS": (6, 8, 20), "SOLVER.WARMUP_ITERS": 4,
            "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.GAMMA": 0.5}


def test_lr_warms_up_linearly_then_decays_at_each_step():
    cfg = get_detection_cfg("torchvision")
    cfg.merge_from_other_cfg(CN(nested(SCHEDULE)))
    got = [lr_multiplier(cfg, iteration) for iteration in range(10)]
    expected = [0.1, 0.325, 0.55, 0.775, 1, 1, 0.5, 0.5, 0.25, 0.25]  # step 20 > MAX_ITER: ignored
    assert got == pytest.approx(expected)


def test_lr_matches_detectron2s_warmup_multistep_schedule():
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.solver import build_lr_scheduler

    d2 = get_cfg()
    d2.merge_from_other_cfg(CN(nested({**SCHEDULE, "SOLVER.BASE_LR": 1.0})))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(d2, optimizer)
    ours = get_detection_cfg("torchvision")
    ours.merge_from_other_cfg(CN(nested(SCHEDULE)))
    for iteration in range(10):
        assert lr_multiplier(ours, iteration) == pytest.approx(optimizer.param_groups[0]["lr"]), iteration
        optimizer.step()
        scheduler.step()


# ---------------------------------------------------------------------- training, evaluation
TRAINING = dict(TEST__EVAL_PERIOD=2, TEST__PRECISE_BN__ENABLED=True, TEST__PRECISE_BN__NUM_ITER=2,
                DATALOADER__NUM_WORKERS=1)


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> Path:
    """Four iterations: warmup over two, a step at three, a checkpoint, PreciseBN and an
    evaluation at two, PreciseBN and model_final.pth at four."""
    output = tmp_path_factory.mktemp("run")
    engine.train(tiny_config(files, output, **TRAINING), resume=False)
    return output


def metrics_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]


def test_training_writes_checkpoints_and_detectron2_style_metrics(trained):
    assert (trained / "checkpoint_00000002.pth").is_file() and (trained / "model_final.pth").is_file()
    assert (trained / ckpt.LAST_POINTER).read_text() == "model_final.pth"
    final = ckpt.load(trained / "model_final.pth")
    assert final["iteration"] == 4 and final["engine"] == "torchvision" and final["seed"] == 3
    evaluation, training = metrics_rows(trained)
    assert evaluation["iteration"] == 1 and 0 <= evaluation["bbox/AP50"] <= 100
    assert training["iteration"] == 3
    assert training["lr"] == pytest.approx(0.01 * 0.1)  # past the step at iteration 3
    for name in ("total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "time"):
        assert math.isfinite(training[name]), name


def test_evaluate_returns_voc_ap_of_the_final_model(files, trained):
    results = engine.evaluate(tiny_config(files, trained))
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"}
    assert all(0 <= value <= 100 for value in results["bbox"].values())
    assert set(results["per_class_AP50"]) == set(CLASSES)


def test_evaluate_returns_one_result_per_dataset_when_several(files, trained, tmp_path):
    voc = tmp_path / "voc"
    shutil.copytree(files["voc"], voc)
    test_ids = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()
    (voc / "ImageSets" / "Main" / "few.txt").write_text("\n".join(test_ids[:2]) + "\n")
    cfg = tiny_config({**files, "voc": voc}, trained, DATASETS__TEST=("tiny_voc_test", "tiny_voc_few"))
    results = engine.evaluate(cfg, str(trained / "checkpoint_00000002.pth"))
    assert list(results) == ["tiny_voc_test", "tiny_voc_few"]
    assert all("AP50" in result["bbox"] for result in results.values())


def test_resume_continues_from_the_last_checkpoint_to_the_same_weights(files, trained, tmp_path):
    shutil.copy(trained / "checkpoint_00000002.pth", tmp_path / "checkpoint_00000002.pth")
    (tmp_path / ckpt.LAST_POINTER).write_text("checkpoint_00000002.pth")
    engine.train(tiny_config(files, tmp_path, **TRAINING), resume=True)
    assert [row["iteration"] for row in metrics_rows(tmp_path)] == [3]  # iterations 2 and 3 only
    resumed, uninterrupted = (ckpt.load(folder / "model_final.pth")["model"] for folder in (tmp_path, trained))
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_evaluating_a_backbone_file_says_it_is_not_a_detector_checkpoint(files, tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint of the torchvision engine"):
        engine.evaluate(tiny_config(files, tmp_path), str(files["backbone"]))


def train_and_evaluate(cfg: CN, results_file: Path) -> None:
    """One process of a distributed run; rank 0 keeps the evaluation."""
    torch.set_num_threads(1)  # two processes on a small machine
    engine.train(cfg, resume=False)
    results = engine.evaluate(cfg)
    if torch.distributed.get_rank() == 0:
        results_file.write_text(json.dumps(results))


def test_two_processes_train_with_ddp_and_evaluate_every_image_once(files, tmp_path):
    cfg = tiny_config(files, tmp_path, SOLVER__MAX_ITER=2, SOLVER__STEPS=(1,), SEED=-1, MODEL__RESNETS__NORM="SyncBN")
    launch(train_and_evaluate, (cfg, tmp_path / "results.json"), num_processes=2)
    final = ckpt.load(tmp_path / "model_final.pth")
    assert final["world_size"] == 2 and len(final["rng"]) == 2 and final["seed"] >= 0
    assert final["iteration"] == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(0 <= value <= 100 for value in results["bbox"].values())
    assert math.isfinite(metrics_rows(tmp_path)[-1]["total_loss"])
