"""CIFAR: the reader on synthetic archives in the real format (extracted and .tar.gz), its
errors, the 32 x 32 models, and the CIFAR configs training through the pretraining engine."""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_archive import COLOURS, cifar_cfg, write_cifar, write_pickle
from pretrain.cifar import LAYOUTS, CifarFormatError, read_cifar
from pretrain.config import get_cfg
from pretrain.engine import PretrainTrainer
from pretrain.models import WideResNet, build_model

REPO = Path(__file__).resolve().parents[1]
CIFAR_CONFIGS = sorted((REPO / "configs" / "pretrain" / "cifar").glob("cifar*.yaml"))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_reader_gives_the_same_split_from_the_folder_and_the_archive(tmp_path, dataset):
    folder = write_cifar(tmp_path / "folder", dataset, train=23, test=7, seed=3)
    packed = write_cifar(tmp_path / "packed", dataset, train=23, test=7, seed=3, archive=True)
    assert not (packed / LAYOUTS[dataset].folder).exists()
    for train, count in ((True, 23), (False, 7)):
        plain, unpacked = read_cifar(folder, dataset, train), read_cifar(packed, dataset, train)
        assert plain.images.shape == (count, 32, 32, 3) and plain.images.dtype == np.uint8
        assert np.array_equal(plain.images, unpacked.images) and np.array_equal(plain.labels, unpacked.labels)
        assert len(plain.classes) == (10 if dataset == "cifar10" else 100)


def test_reader_puts_the_red_green_and_blue_planes_in_the_channels(tmp_path):
    """A row of 3072 bytes is 1024 red, 1024 green, 1024 blue values, row by row."""
    root = write_cifar(tmp_path, train=10, test=5)
    split = read_cifar(root, "cifar10", train=True)
    raw = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="latin1")
    row = raw["data"][0]
    assert split.images[0, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert split.images[0, 1, 2].tolist() == [row[32 + 2], row[1024 + 32 + 2], row[2048 + 32 + 2]]
    # The class's coloured square is present in the decoded image.
    assert (split.images[0] == COLOURS[split.labels[0]]).all(axis=-1).sum() == 144


def test_reader_names_the_missing_or_malformed_file(tmp_path):
    with pytest.raises(CifarFormatError, match="cifar-10-batches-py/ or .*cifar-10-python.tar.gz"):
        read_cifar(tmp_path, "cifar10", train=True)
    root = write_cifar(tmp_path / "a")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CifarFormatError, match="data_batch_3 does not exist"):
        read_cifar(root, "cifar10", train=True)
    assert len(read_cifar(root, "cifar10", train=False).labels) == 20  # the test split is intact
    write_pickle(root / "cifar-10-batches-py" / "data_batch_3", {"data": np.zeros((4, 3072), np.float32),
                                                                  "labels": [0, 1, 2, 3]})
    with pytest.raises(CifarFormatError, match="data_batch_3: 'data' is float32"):
        read_cifar(root, "cifar10", train=True)
    write_pickle(root / "cifar-10-batches-py" / "data_batch_3", {"data": np.zeros((4, 3072), np.uint8)})
    with pytest.raises(CifarFormatError, match="data_batch_3: no 'labels' entry"):
        read_cifar(root, "cifar10", train=True)
    write_pickle(root / "cifar-10-batches-py" / "data_batch_3", {"data": np.zeros((2, 3072), np.uint8),
                                                                  "labels": [0, 10]})
    with pytest.raises(CifarFormatError, match="labels outside 0..9"):
        read_cifar(root, "cifar10", train=True)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_reader_refuses_pickles_that_would_run_code(tmp_path, monkeypatch):
    root = write_cifar(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_pickle(root / "cifar-10-batches-py" / "test_batch", {"data": RunsCode(), "labels": []})
    with pytest.raises(CifarFormatError, match="test_batch: not a CIFAR pickle .*system"):
        read_cifar(root, "cifar10", train=False)
    assert not (tmp_path / "pwned").exists()


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", CIFAR_CONFIGS, ids=lambda path: path.stem)
def test_cifar_configs_build_the_papers_networks(config):
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    model = build_model(cfg)
    # The parameter counts of the CIFAR papers' networks (ResNet with the 3x3 stem, WRN-28-10).
    expected = {("resnet18", 10): 11_173_962, ("resnet18", 100): 11_220_132,
                ("resnet50", 10): 23_520_842, ("resnet50", 100): 23_705_252,
                ("wideresnet28_10", 10): 36_479_194, ("wideresnet28_10", 100): 36_536_884}
    assert parameters(model) == expected[cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES]
    logits = model.eval()(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, cfg.MODEL.NUM_CLASSES)
    if cfg.MIX.NAME in ("saliencymix", "cutmix"):  # the official CIFAR code mixes half the batches, beta 1
        assert cfg.MIX.PROB == 0.5 and cfg.MIX.ALPHA == 1.0
    assert tuple(cfg.SOLVER.STEP_EPOCHS) == (60, 120, 160)
    assert cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256 == pytest.approx(0.1)


def test_wide_resnet_rejects_impossible_depths():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(27, 10, 10)
    cfg = get_cfg()
    cfg.MODEL.ARCH = "resnet_wide"
    with pytest.raises(ValueError, match="MODEL.ARCH 'resnet_wide'"):
        build_model(cfg)


@pytest.mark.parametrize("arch,method", [("resnet18", "saliencymix"), ("wideresnet10_1", "none")])
def test_cifar_config_trains_and_evaluates(tmp_path, arch, method):
    root = write_cifar(tmp_path / "data", train=48, test=16, archive=True)
    cfg = cifar_cfg(root, tmp_path / "run", "MODEL.ARCH", arch, "MIX.NAME", method, "MIX.PROB", "1.0",
                    "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "2", "SOLVER.STEP_EPOCHS", "(1,)", "LOG_PERIOD", "1")
    result = PretrainTrainer(cfg).train()
    assert result["val_images"] == 16 and 0 <= result["top1_error"] <= 100
    assert math.isfinite(result["top1_error"])


def test_too_few_classes_in_the_config_is_an_error(tmp_path):
    root = write_cifar(tmp_path / "data")
    cfg = cifar_cfg(root, tmp_path / "run", "MODEL.NUM_CLASSES", "5")
    with pytest.raises(ValueError, match="has 10 classes but MODEL.NUM_CLASSES is 5"):
        PretrainTrainer(cfg)
