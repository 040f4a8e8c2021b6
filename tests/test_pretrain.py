"""The pretraining engine on a tiny synthetic ImageFolder: every method's config, DDP on the CPU,
exact kill-and-resume, corrupt images, NaN losses, schedules, samplers and checkpoints."""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from pretrain import checkpoint as ckpt
from pretrain.atomic_file import atomic_write
from pretrain.cli import UsageError
from pretrain.config import get_cfg
from pretrain.data import ResumableDistributedSampler, RobustImageFolder, ShardSampler, train_transform
from pretrain.engine import IMAGE_INDEX, PretrainTrainer, build_lr_schedule, mean_and_standard_error
from pretrain.image_index import build_index, load_index
from pretrain.validate import check_pretrain_cfg
from tool_process import run_tool

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "pretrain").glob("r*.yaml"))
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 8, 3


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """train/ and val/ with four classes of small textured JPEGs, plus one corrupt file."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for index in range(count):
                image = (rng.random((40, 48, 3)) * 80 + label * 40).astype(np.uint8)
                cv2.imwrite(str(folder / f"{index}.jpg"), image)
    (root / "train" / "n00000000" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


def tiny_cfg(root: Path, output: Path, config: Path = REPO / "configs/pretrain/r50_saliencymix.yaml", **overrides):
    """A real config file, shrunk to tiny images, batches and (unless the depth is the point) ResNet-18."""
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    arch = cfg.MODEL.ARCH if cfg.MODEL.ARCH == "resnet101" else "resnet18"
    settings = {"DATA.ROOT": str(root), "OUTPUT_DIR": str(output), "MODEL.ARCH": arch,
                "MODEL.NUM_CLASSES": CLASSES, "DATA.IMAGE_SIZE": 32, "DATA.VAL_RESIZE": 36,
                "SOLVER.BATCH_SIZE": 8, "TEST.BATCH_SIZE": 8, "SOLVER.EPOCHS": 2, "SOLVER.STEP_EPOCHS": (1,),
                "DATA.NUM_WORKERS": 0, "LOG_PERIOD": 1, "CHECKPOINT.PERIOD": 3, "CHECKPOINT.EPOCH_END": True,
                **overrides}
    cfg.merge_from_list([item for pair in settings.items() for item in pair])
    return cfg


def cli_overrides(root: Path, output: Path) -> list[str]:
    return ["DATA.ROOT", str(root), "OUTPUT_DIR", str(output), "MODEL.ARCH", "resnet18", "MODEL.NUM_CLASSES",
            str(CLASSES), "DATA.IMAGE_SIZE", "32", "DATA.VAL_RESIZE", "36", "SOLVER.BATCH_SIZE", "8",
            "TEST.BATCH_SIZE", "8", "SOLVER.EPOCHS", "2", "SOLVER.STEP_EPOCHS", "(1,)", "DATA.NUM_WORKERS", "0",
            "LOG_PERIOD", "2", "CHECKPOINT.PERIOD", "3", "CHECKPOINT.EPOCH_END", "True"]


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]


def test_a_loss_windows_standard_error_comes_from_the_sums_all_processes_reduce_to():
    losses = [1.9, 1.2, 2.4, 0.7, 1.6]  # a mixing arm's window: mixed and plain batches
    mean, error = mean_and_standard_error(sum(losses), sum(x * x for x in losses), len(losses))
    assert mean == pytest.approx(statistics.mean(losses))
    assert error == pytest.approx(statistics.stdev(losses) / math.sqrt(len(losses)))
    assert mean_and_standard_error(1.5, 2.25, 1) == (1.5, 0.0)  # one loss: no spread to measure


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_every_method_config_trains_and_evaluates(imagenet, tmp_path, config):
    cfg = tiny_cfg(imagenet, tmp_path, config, **{"SOLVER.MAX_ITER": 2})
    result = PretrainTrainer(cfg).train()
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert {"lr", "images_per_second", "data_time", "window_seconds", "window_iterations",
            "loss_standard_error"} <= set(records[0])
    assert 0 <= result["top1_error"] <= 100 and result["val_images"] == CLASSES * VAL_PER_CLASS
    state = ckpt.load(ckpt.Checkpointer(tmp_path, 3).last())
    assert state["iteration"] == 2 and state["cfg"].count(f"NAME: {cfg.MIX.NAME}") == 1
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / ckpt.BEST_NAME).is_file()


class Killed(Exception):
    pass


@pytest.mark.parametrize("backend", ["pil", "device"])
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_mid_epoch_and_resumed_ends_with_identical_weights_and_metrics(imagenet, tmp_path, workers, backend):
    options = {"DATA.NUM_WORKERS": workers, "MIX.BOX": "sample", "DATA.BACKEND": backend}
    uninterrupted = PretrainTrainer(tiny_cfg(imagenet, tmp_path / "a", **options))
    uninterrupted.train()

    def kill_at_eight(trainer):
        if trainer.iteration == 8:
            raise Killed

    interrupted = PretrainTrainer(tiny_cfg(imagenet, tmp_path / "b", **options))
    interrupted.after_step.append(kill_at_eight)
    with pytest.raises(Killed):
        interrupted.train()
    assert read_metrics(tmp_path / "b")[-1]["iteration"] == 7  # logged after the checkpoint at 6
    resumed = PretrainTrainer(tiny_cfg(imagenet, tmp_path / "b", **options), resume=True)
    assert resumed.iteration == 6  # the periodic checkpoint in the middle of epoch 1
    resumed.train()
    expected, actual = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert resumed.optimizer.state_dict()["state"].keys() == uninterrupted.optimizer.state_dict()["state"].keys()
    # the records the kill left after the checkpoint are logged once, by the resumed run: the cost
    # report and the convergence checks read what an uninterrupted run would have written
    timing = {"images_per_second", "data_time", "window_seconds"}
    untimed = [[{k: v for k, v in row.items() if k not in timing} for row in read_metrics(tmp_path / folder)]
               for folder in ("a", "b")]
    assert untimed[0] == untimed[1]


def test_checkpoints_follow_the_clock_and_best_and_final_hold_weights_only(imagenet, tmp_path):
    cfg = tiny_cfg(imagenet, tmp_path, **{"CHECKPOINT.PERIOD": 0, "CHECKPOINT.EPOCH_END": False,
                                          "CHECKPOINT.PERIOD_MINUTES": 1e-6, "CHECKPOINT.KEEP_LAST": 10})
    PretrainTrainer(cfg).train()
    assert len(list(tmp_path.glob("checkpoint_*.pth"))) == 8  # each iteration: a microsecond has passed
    hourly = tmp_path / "hourly"
    PretrainTrainer(tiny_cfg(imagenet, hourly, **{"CHECKPOINT.PERIOD": 0, "CHECKPOINT.EPOCH_END": False,
                                                  "CHECKPOINT.PERIOD_MINUTES": 60.0})).train()
    assert [path.name for path in hourly.glob("checkpoint_*.pth")] == [ckpt.checkpoint_name(8)]  # the end only
    for name in (ckpt.BEST_NAME, ckpt.FINAL_NAME):
        state = ckpt.load(tmp_path / name)
        assert "optimizer" not in state and "scaler" not in state and state["iteration"] > 0


def test_corrupt_images_are_counted_and_replaced(imagenet, tmp_path, caplog):
    result = PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"SOLVER.EPOCHS": 1, "SOLVER.SCHEDULE": "cosine"})).train()
    assert result["bad_train_images"] == 1  # seen once per epoch
    assert "broken.jpg" in caplog.text
    index = build_index(imagenet / "train")
    dataset = RobustImageFolder(index, train_transform(tiny_cfg(imagenet, tmp_path)), 0, 3)
    broken = next(i for i in range(len(index)) if index.path(i).endswith("broken.jpg"))
    image, label, unreadable = dataset[broken]
    assert unreadable == index.path(broken) and image.shape == (3, 32, 32)
    assert label == index.label(broken + 1)


def test_the_image_index_lists_what_imagefolder_lists_once_per_run(imagenet, tmp_path):
    reference = torchvision.datasets.ImageFolder(str(imagenet / "train"))
    index = build_index(imagenet / "train")
    assert index.classes == reference.classes and index.labels.dtype == np.int16
    assert [(index.path(i), index.label(i)) for i in range(len(index))] == reference.samples
    trainer = PretrainTrainer(tiny_cfg(imagenet, tmp_path))
    cache = tmp_path / IMAGE_INDEX / "train"
    assert isinstance(trainer.dataset.index.paths, np.memmap) and len(trainer.dataset) == len(reference)
    (imagenet / "train" / "n00000000" / "added.jpg").write_bytes((imagenet / "train" / "n00000000" / "0.jpg").read_bytes())
    try:  # a later attempt reads the run's index: the folder is not walked again
        assert len(load_index(cache, imagenet / "train")) == len(reference)
        assert load_index(cache, imagenet / "other") is None
    finally:
        (imagenet / "train" / "n00000000" / "added.jpg").unlink()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(imagenet, tmp_path):
    """Train a little, then resume with an exploding learning rate: the run stops with a message
    naming the last checkpoint, which was written before the first bad loss and is intact."""
    PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"SOLVER.MAX_ITER": 3})).train()
    exploding = tiny_cfg(imagenet, tmp_path, **{"SOLVER.BASE_LR": 1e12})
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) at iteration \d+") as stopped:
        PretrainTrainer(exploding, resume=True).train()
    bad_iteration = int(str(stopped.value).split("at iteration ")[1].split(";")[0])
    good = ckpt.Checkpointer(tmp_path, 3).last()
    assert good.name in str(stopped.value)
    state = ckpt.load(good)
    assert 3 <= state["iteration"] < bad_iteration
    weights = state["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())


def test_step_schedule_warmup_and_batch_scaling(imagenet, tmp_path):
    cfg = tiny_cfg(imagenet, tmp_path, **{"SOLVER.EPOCHS": 300, "SOLVER.STEP_EPOCHS": (75, 150, 225)})
    schedule = build_lr_schedule(cfg, iterations_per_epoch=10)
    assert [schedule(epoch / 300) for epoch in (0, 74.9, 75, 150, 224.9, 225, 299.9)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cfg.merge_from_list(["SOLVER.WARMUP_EPOCHS", 5.0, "SOLVER.WARMUP_FACTOR", 0.1])
    warm = build_lr_schedule(cfg, iterations_per_epoch=10)
    assert warm(0.0) == pytest.approx(0.1) and warm(2.5 / 300) == pytest.approx(0.55) and warm(10 / 300) == 1
    cfg.merge_from_list(["SOLVER.SCHEDULE", "cosine", "SOLVER.WARMUP_EPOCHS", 0.0])
    cosine = build_lr_schedule(cfg, iterations_per_epoch=10)
    assert cosine(0.0) == 1 and cosine(0.5) == pytest.approx(0.5) and cosine(0.999) < 1e-4
    trainer = PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"SOLVER.BATCH_SIZE": 16}))
    assert trainer.base_lr == pytest.approx(0.1 * 16 / 256)


def test_the_classifier_learns_at_its_own_lr_factor(imagenet, tmp_path):
    trainer = PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"SOLVER.HEAD_LR_FACTOR": 0.1, "SOLVER.MAX_ITER": 2}))
    head = {id(parameter) for parameter in trainer.model.fc.parameters()}
    body, classifier = trainer.optimizer.param_groups
    assert {id(parameter) for parameter in classifier["params"]} == head
    assert not head & {id(parameter) for parameter in body["params"]}
    assert len(body["params"]) + len(classifier["params"]) == len(list(trainer.model.parameters()))
    trainer.train()
    assert body["lr"] > 0 and classifier["lr"] == pytest.approx(0.1 * body["lr"])


@pytest.mark.parametrize("amp,dtype", [(True, "bfloat16"), (True, "float16"), (False, "bfloat16")])
def test_training_autocasts_to_bfloat16_only_where_the_cpu_computes_in_it(imagenet, tmp_path, amp, dtype):
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = torch.bfloat16 if amp and dtype == "bfloat16" and native else torch.float32
    trainer = PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"SOLVER.AMP": amp, "SOLVER.AMP_DTYPE": dtype,
                                                                "SOLVER.MAX_ITER": 1}))
    computed = []
    trainer.model.conv1.register_forward_hook(lambda module, inputs, output: computed.append(output.dtype))
    trainer.train()
    assert computed[0] == expected  # the training step's first convolution
    assert {parameter.dtype for parameter in trainer.model.parameters()} == {torch.float32}


def test_bad_configuration_values_are_named(imagenet, tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match="SOLVER.LEARNING_RATE"):  # fvcore's unknown-key error
        tiny_cfg(imagenet, tmp_path, **{"SOLVER.LEARNING_RATE": 0.1})
    with pytest.raises(ValueError, match="'vgg16'"):
        PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"MODEL.ARCH": "vgg16"}))
    with pytest.raises(ValueError, match=r"STEP_EPOCHS \[5\]"):
        PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"SOLVER.STEP_EPOCHS": (5,)}))
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    with pytest.raises(ValueError, match=r"DATA.ROOT.*\$IMAGENET_ROOT"):
        PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"DATA.ROOT": ""}))
    monkeypatch.setenv("IMAGENET_ROOT", str(imagenet))
    assert PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"DATA.ROOT": ""})).iterations_per_epoch == 4
    with pytest.raises(FileNotFoundError, match="missing"):
        PretrainTrainer(tiny_cfg(imagenet, tmp_path, **{"DATA.ROOT": str(tmp_path / "missing")}))


def test_a_validation_folder_whose_classes_differ_from_trainings_is_refused(imagenet, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet, root)
    shutil.rmtree(root / "val" / "n00000001")  # every later validation label would shift by one
    with pytest.raises(UsageError, match=r"missing from validation: n00000001; not in training: none"):
        check_pretrain_cfg(tiny_cfg(root, tmp_path / "run"))
    check_pretrain_cfg(tiny_cfg(root, tmp_path / "run"), train=False)  # evaluating a file: no training folder to match


def test_sampler_deals_disjoint_shares_and_resumes_part_way():
    shares = [list(ResumableDistributedSampler(10, 3, rank, seed=7)) for rank in range(3)]
    assert all(len(share) == 3 for share in shares)
    assert len(set(sum(shares, []))) == 9
    sampler = ResumableDistributedSampler(10, 3, 1, seed=7)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=2)
    assert list(sampler) == whole[2:] and len(sampler) == 1
    sampler.set_epoch(5)
    assert list(sampler) != whole
    assert sorted(sum((list(ShardSampler(10, 3, r)) for r in range(3)), [])) == list(range(10))


def test_augmentation_depends_on_seed_epoch_and_index_only(imagenet, tmp_path):
    dataset = RobustImageFolder(build_index(imagenet / "train"), train_transform(tiny_cfg(imagenet, tmp_path)), 0, 3)
    first = dataset[5][0]
    torch.rand(100)  # the global random state must not matter
    assert torch.equal(dataset[5][0], first)
    assert torch.equal(dataset[(0, 5)][0], first)
    assert not torch.equal(dataset[(1, 5)][0], first)


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "state.pth"
    ckpt.save(path, {"weights": torch.ones(3)})

    def failing_write(stream):
        stream.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing_write)
    assert torch.equal(ckpt.load(path)["weights"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pth"]
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*garbage.pth"):
        (tmp_path / "garbage.pth").write_bytes(b"nope")
        ckpt.load(tmp_path / "garbage.pth")


def test_two_process_ddp_lists_distinct_unreadable_files_across_processes_epochs_and_resumes(imagenet, tmp_path):
    """Through the command line, 2 processes (gloo): the unreadable files both ranks met, once
    each; evaluation alone gives the error training ended with; a resumed run goes on counting."""
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet, root)
    (root / "train" / "n00000002" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    command = ["--config-file", REPO / "configs/pretrain/r50_cutmix.yaml", "--num-gpus", "2",
               *cli_overrides(root, tmp_path / "run"), "SOLVER.EPOCHS", "3", "SOLVER.STEP_EPOCHS", "(2,)"]
    run = run_tool("tools/pretrain_net.py", *command)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # 34 training files over 2 processes x 4 images per batch: 4 iterations per epoch.
    assert result["iteration"] == 12 and result["val_images"] == CLASSES * VAL_PER_CLASS
    assert result["bad_train_images"] == 2 and result["train_image_replacements"] == 6  # 2 files x 3 epochs
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert sorted(Path(path).name for path in listed) == ["broken.jpg", "truncated.jpg"]
    state = ckpt.load(tmp_path / "run" / ckpt.checkpoint_name(8))
    assert state["world_size"] == 2 and len(state["rng"]["mixers"]) == 2
    final = ckpt.load(tmp_path / "run" / ckpt.FINAL_NAME)
    assert len(final["rng"]["torch"]) == 2 and not torch.equal(*final["rng"]["torch"])  # one state per rank
    evaluation = run_tool("tools/pretrain_net.py", "--eval-only", *command)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["top1_error"] == result["top1_error"]

    # Resumed from the end of epoch 2: the list keeps both files, the counts go on from there.
    (tmp_path / "run" / ckpt.LAST_POINTER).write_text(ckpt.checkpoint_name(8))
    (tmp_path / "run" / "bad_images.txt").unlink()
    resumed = run_tool("tools/pretrain_net.py", "--resume", *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert again["bad_train_images"] == 2 and again["train_image_replacements"] == 6
    assert len((tmp_path / "run" / "bad_images.txt").read_text().splitlines()) == 2
