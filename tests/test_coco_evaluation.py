"""COCO box and mask AP of constructed detections (detection/coco_evaluation.py): perfect ones
give 100, worse ones less; the category mapping, the mask area, the gathering over processes,
and (with Detectron2 installed) agreement with Detectron2's COCOEvaluator."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detection.coco_evaluation import METRICS, RESULTS_FILE, COCOEvaluator

HEIGHT, WIDTH = 160, 200
# Non-contiguous category ids, listed out of order: contiguous index 0 is id 3, index 1 is id 7.
CATEGORIES = [{"id": 7, "name": "triangle"}, {"id": 3, "name": "square"}]
# Per image: (category id, polygon); a small (< 32²), a medium and a large (> 96²) object in all.
OBJECTS = {
    11: [(3, [10, 10, 30, 10, 30, 30, 10, 30]), (7, [60, 20, 120, 20, 90, 80])],
    12: [(7, [10, 5, 190, 5, 100, 155]), (3, [160, 100, 180, 100, 180, 125, 160, 125])],
    13: [(3, [30, 40, 90, 40, 90, 100, 30, 100])],
}


def polygon_mask(polygon: list[float]) -> np.ndarray:
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects([polygon], HEIGHT, WIDTH)))


def xyxy(polygon: list[float]) -> list[float]:
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


@pytest.fixture(scope="module")
def json_file(tmp_path_factory) -> Path:
    images, annotations = [], []
    for image_id, objects in OBJECTS.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": HEIGHT, "width": WIDTH})
        for category, polygon in objects:
            x0, y0, x1, y1 = xyxy(polygon)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [polygon], "iscrowd": 0,
                                "area": float(polygon_mask(polygon).sum())})
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def contiguous(category_id: int) -> int:
    return sorted(category["id"] for category in CATEGORIES).index(category_id)


def perfect_output(image_id: int) -> dict:
    """The ground truth as a torchvision-style output: labels 0-based, masks (N, 1, H, W)."""
    objects = OBJECTS[image_id]
    return {"boxes": torch.tensor([xyxy(polygon) for _, polygon in objects], dtype=torch.float32),
            "scores": torch.linspace(0.9, 0.8, len(objects)),
            "labels": torch.tensor([contiguous(category) for category, _ in objects]),
            "masks": torch.from_numpy(np.stack([polygon_mask(p) for _, p in objects])).float()[:, None]}


def evaluate(json_file: Path, outputs: dict[int, dict], tasks=("bbox", "segm"), **options) -> dict:
    evaluator = COCOEvaluator(json_file, tasks, **options)
    for image_id, output in outputs.items():
        evaluator.process([{"image_id": image_id}], [output])
    return evaluator.evaluate()


def test_perfect_boxes_and_masks_give_100_in_every_metric_and_category(json_file):
    results = evaluate(json_file, {image_id: perfect_output(image_id) for image_id in OBJECTS})
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert set(results[task]) == {*METRICS, "AP-square", "AP-triangle"}
        assert all(value == pytest.approx(100) for value in results[task].values()), (task, results[task])


def test_a_shifted_box_lowers_box_ap_but_not_mask_ap(json_file):
    outputs = {image_id: perfect_output(image_id) for image_id in OBJECTS}
    outputs[12]["boxes"][0] += torch.tensor([40.0, 0.0, 40.0, 0.0])  # the large triangle's box
    results = evaluate(json_file, outputs)
    assert results["bbox"]["AP"] < 100 and results["bbox"]["APl"] < 100 and results["bbox"]["AP-triangle"] < 100
    assert results["bbox"]["APs"] == pytest.approx(100) and results["bbox"]["AP-square"] == pytest.approx(100)
    assert results["segm"]["AP"] == pytest.approx(100)  # the mask, its area included, is untouched


def test_swapped_classes_score_zero(json_file):
    outputs = {image_id: perfect_output(image_id) for image_id in OBJECTS}
    for output in outputs.values():
        output["labels"] = 1 - output["labels"]
    results = evaluate(json_file, outputs, tasks=("bbox",))
    assert set(results) == {"bbox"} and results["bbox"]["AP"] == 0


def test_masks_are_probabilities_thresholded_at_one_half(json_file):
    outputs = {image_id: perfect_output(image_id) for image_id in OBJECTS}
    for output in outputs.values():
        output["masks"] = output["masks"] * 0.2 + 0.4  # 0.6 inside, 0.4 outside
    outputs[13]["masks"][0, 0, :80] = 0.45  # two thirds of the square (rows 40 to 99) lost
    results = evaluate(json_file, outputs)
    assert results["segm"]["AP-triangle"] == pytest.approx(100) and results["segm"]["AP-square"] < 100
    assert results["bbox"]["AP"] == pytest.approx(100)


def test_no_detections_give_nan_and_a_missed_image_lowers_recall(json_file):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 1, HEIGHT, WIDTH)}
    nothing = evaluate(json_file, {image_id: empty for image_id in OBJECTS})
    assert all(math.isnan(value) for task in nothing.values() for value in task.values())
    missed = evaluate(json_file, {11: perfect_output(11), 12: perfect_output(12), 13: empty})
    assert missed["bbox"]["AP-square"] < 100 and missed["bbox"]["AP-triangle"] == pytest.approx(100)


def test_results_are_written_as_coco_results_with_the_json_category_ids(json_file, tmp_path):
    evaluate(json_file, {11: perfect_output(11)}, output_dir=tmp_path)
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert [(r["image_id"], r["category_id"]) for r in written] == [(11, 3), (11, 7)]
    assert written[0]["bbox"] == [10, 10, 20, 20]  # XYWH
    assert mask_util.area(written[1]["segmentation"]) == polygon_mask(OBJECTS[11][1][1]).sum()


def test_unknown_images_classes_and_missing_masks_are_named(json_file):
    with pytest.raises(ValueError, match=rf"image_id 99 is not an image of {json_file}"):
        evaluate(json_file, {99: perfect_output(11)})
    outside = perfect_output(11)
    outside["labels"][1] = 2
    with pytest.raises(ValueError, match=r"image 11: class index 2 is outside the 2 categories"):
        evaluate(json_file, {11: outside})
    with pytest.raises(KeyError, match=r"image 11: .*lacks \['masks'\]"):
        evaluate(json_file, {11: {key: value for key, value in perfect_output(11).items() if key != "masks"}})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate(json_file.with_name("missing.json"), {11: perfect_output(11)})


def test_ground_truth_without_what_cocoeval_reads_is_named(json_file, tmp_path):
    data = json.loads(json_file.read_text())
    del data["annotations"][2]["segmentation"]
    boxes_only = tmp_path / "boxes_only.json"
    boxes_only.write_text(json.dumps(data))
    assert evaluate(boxes_only, {11: perfect_output(11)}, tasks=("bbox",))["bbox"]["AP-square"] > 0
    with pytest.raises(ValueError, match=r"boxes_only.json: annotation 3 has no segmentation"):
        evaluate(boxes_only, {11: perfect_output(11)})


def distributed_worker(rank: int, world_size: int, init_file: str, json_file: str, result_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        image_ids = sorted(OBJECTS)[rank::world_size]
        outputs = {image_id: perfect_output(image_id) for image_id in image_ids}
        if rank == 1:
            outputs[image_ids[0]]["boxes"][0, 2:] += 25.0  # one worse box, on rank 1 only
        torch.save(evaluate(Path(json_file), outputs), Path(result_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_evaluation_gathers_every_process_on_rank_0(json_file, tmp_path):
    torch.multiprocessing.spawn(distributed_worker, nprocs=2,
                                args=(2, str(tmp_path / "init"), str(json_file), str(tmp_path)))
    outputs = {image_id: perfect_output(image_id) for image_id in OBJECTS}
    outputs[12]["boxes"][0, 2:] += 25.0
    assert torch.load(tmp_path / "rank0.pt") == evaluate(json_file, outputs)
    assert torch.load(tmp_path / "rank1.pt") == {}


def test_agrees_with_detectron2s_coco_evaluator(json_file):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator as Detectron2COCOEvaluator
    from detectron2.structures import Boxes, Instances

    name = f"coco_evaluation_{json_file.parent.name}"
    register_coco_instances(name, {}, str(json_file), str(json_file.parent))
    DatasetCatalog.get(name)  # sets the metadata's category id mapping
    rng = np.random.default_rng(0)
    ours, theirs = {}, {}
    for image_id in OBJECTS:  # noisy copies of the ground truth plus random boxes, random classes
        output = perfect_output(image_id)
        count = len(output["scores"])
        noise = torch.from_numpy(rng.normal(0, 6, (count, 4))).float()
        extra = torch.from_numpy(np.sort(rng.uniform(0, 150, (3, 2, 2)), axis=1).reshape(3, 4)).float()
        boxes = torch.cat([output["boxes"] + noise, extra])
        masks = torch.cat([output["masks"].roll(int(rng.integers(-8, 8)), dims=-1),
                           torch.from_numpy(rng.random((3, 1, HEIGHT, WIDTH)) > 0.7).float()])
        ours[image_id] = {"boxes": boxes, "scores": torch.from_numpy(rng.random(count + 3)).float(),
                          "labels": torch.from_numpy(rng.integers(0, 2, count + 3)), "masks": masks}
        instances = Instances((HEIGHT, WIDTH), pred_boxes=Boxes(boxes), scores=ours[image_id]["scores"],
                              pred_classes=ours[image_id]["labels"], pred_masks=masks[:, 0] >= 0.5)
        theirs[image_id] = {"instances": instances}
    detectron2 = Detectron2COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False)
    detectron2.reset()
    for image_id, output in theirs.items():
        detectron2.process([{"image_id": image_id}], [output])
    expected = detectron2.evaluate()
    actual = evaluate(json_file, ours)
    MetadataCatalog.remove(name)
    DatasetCatalog.remove(name)
    for task in ("bbox", "segm"):
        assert set(actual[task]) == set(expected[task])
        for metric, value in expected[task].items():
            assert actual[task][metric] == pytest.approx(value, abs=1e-6, nan_ok=True), (task, metric)
    assert 5 < actual["bbox"]["AP"] < 95 and 5 < actual["segm"]["AP"] < 95  # neither all nor nothing
