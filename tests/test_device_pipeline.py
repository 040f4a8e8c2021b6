"""DATA.BACKEND device against the PIL pipeline, on real photographs (scikit-image's, as JPEGs at
ImageNet's typical size): the same crops and flips for the same (SEED, epoch, index), pixels
within the measured rounding, the files the device decoder does not take, and training that
does not depend on the worker count (exact resume: test_pretrain.py, with both backends)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from pretrain.config import get_cfg
from pretrain.data import backend_dataset
from pretrain.device_pipeline import DeviceBatches, collate_encoded, read_encoded
from pretrain.engine import PretrainTrainer
from test_pretrain import imagenet, tiny_cfg  # noqa: F401  (a fixture)

PHOTOGRAPHS = (("astronaut", "coffee", "chelsea"), ("rocket", "hubble_deep_field", "immunohistochemistry"))


@pytest.fixture(scope="module")
def photographs(tmp_path_factory) -> Path:
    """train/ and val/ of two classes, three photographs each, 500 x 375 JPEGs at quality 90."""
    root = tmp_path_factory.mktemp("photographs")
    for split in ("train", "val"):
        for label, names in enumerate(PHOTOGRAPHS):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for name in names:
                Image.fromarray(getattr(skimage.data, name)()).resize((500, 375)).save(folder / f"{name}.JPEG",
                                                                                      quality=90)
    return root


def config(root: Path, **overrides):
    cfg = get_cfg()
    settings = {"DATA.ROOT": str(root), "MODEL.NUM_CLASSES": 2, **overrides}
    cfg.merge_from_list([item for pair in settings.items() for item in pair])
    return cfg


def both_backends(cfg, train: bool, epochs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the split through each backend, in pixel units (0-255), for ``epochs``."""
    pil, _ = backend_dataset(cfg, train)
    on_device = cfg.clone()
    on_device.DATA.BACKEND = "device"
    device, _ = backend_dataset(on_device, train)
    prepare = DeviceBatches(cfg, train, torch.device("cpu"))
    keys = [(epoch, index) for epoch in range(epochs) for index in range(len(pil))]
    by_pil = torch.stack([pil[key if train else key[1]][0] for key in keys])
    batch, labels, _ = collate_encoded([device[key if train else key[1]] for key in keys])
    by_device = prepare(batch, labels)[0]
    scale = torch.tensor(cfg.DATA.STD).view(1, 3, 1, 1) * 255
    return by_pil * scale, by_device * scale


def test_both_backends_crop_and_flip_the_same_boxes(photographs):
    """Without colour jitter and lighting the two differ by PIL's rounding to whole pixel values
    alone: at most 1 (measured 1.00), 0.03 on average. A different crop or flip would differ by
    tens."""
    by_pil, by_device = both_backends(config(photographs, **{"DATA.COLOR_JITTER": 0.0, "DATA.LIGHTING_STD": 0.0}),
                                      train=True, epochs=3)
    difference = (by_pil - by_device).abs()
    assert difference.max() <= 1.01 and difference.mean() <= 0.05


def test_with_jitter_and_lighting_the_backends_differ_by_rounding_only(photographs):
    """Both jitter whole pixel values and truncate each step as PIL does. Measured: at most 3 and
    0.02 on average (of 255); jittering in float instead left the device's images 1.4 brighter
    on average (at most 4.6 apart), which this test fails on."""
    by_pil, by_device = both_backends(config(photographs), train=True, epochs=3)
    difference = by_pil - by_device
    assert difference.abs().max() <= 4 and difference.abs().mean() <= 0.05 and abs(difference.mean()) <= 0.02


def test_the_evaluation_transform_is_the_same_on_both_backends(photographs):
    """Resize 256 and centre crop 224: at most 1 apart (rounding)."""
    by_pil, by_device = both_backends(config(photographs), train=False)
    difference = (by_pil - by_device).abs()
    assert difference.max() <= 1.01 and difference.mean() <= 0.05


def test_files_the_device_decoder_does_not_take_are_decoded_on_the_cpu_and_logged_once(photographs, tmp_path,
                                                                                     caplog):
    """ImageNet's train set holds CMYK JPEGs, a PNG under a .JPEG name and grayscale JPEGs; a
    truncated file is replaced by the batch's next image (with its label) and listed."""
    photo = Image.open(next(photographs.glob("train/*/*.JPEG")))
    photo.convert("CMYK").save(tmp_path / "cmyk.JPEG", quality=90)
    photo.save(tmp_path / "png.JPEG", format="PNG")
    photo.convert("L").save(tmp_path / "gray.JPEG", quality=90)
    photo.save(tmp_path / "good.JPEG", quality=90)
    whole = (tmp_path / "good.JPEG").read_bytes()
    (tmp_path / "truncated.JPEG").write_bytes(whole[:len(whole) // 2])
    names = ["cmyk", "png", "gray", "truncated", "good"]
    items = [((read_encoded(str(tmp_path / f"{name}.JPEG")), torch.zeros(0)), label, "")
             for label, name in enumerate(names)]
    assert [image.encoded for (image, _), _, _ in items] == [False, False, True, True, True]
    prepare = DeviceBatches(config(photographs), train=False, device=torch.device("cpu"))
    batch, labels, _ = collate_encoded(items)
    with caplog.at_level(logging.INFO, logger="pretrain.device_pipeline"):
        images, labels, unreadable, _ = prepare(batch, labels)
        prepare(batch, labels)  # the next epoch: nothing logged again
    assert images.shape == (5, 3, 224, 224) and unreadable == [str(tmp_path / "truncated.JPEG")]
    assert labels.tolist() == [0, 1, 2, 4, 4] and torch.equal(images[3], images[4])
    cpu = [record.getMessage() for record in caplog.records if "on the CPU" in record.getMessage()]
    assert len(cpu) == 2 and "cmyk.JPEG (JPEG CMYK)" in cpu[0] and "png.JPEG (PNG RGB)" in cpu[1]
    assert prepare(*collate_encoded(items[:2])[:2])[0].shape == (2, 3, 224, 224)  # none for the device decoder
    # the same pixels as PIL's loader gives them
    assert (images[0] - prepare(*collate_encoded([items[4]])[:2])[0][0]).abs().mean() < 0.1


def test_device_backend_training_does_not_depend_on_the_worker_count(imagenet, tmp_path):  # noqa: F811
    """Each sample's draws come from (SEED, epoch, index), not from the worker that reads it (a
    killed and resumed run: test_pretrain.py, with both backends); the fixture's file that is
    not an image is replaced by the worker, as with PIL."""
    weights = []
    for workers in (0, 2):
        trainer = PretrainTrainer(tiny_cfg(imagenet, tmp_path / str(workers), **{
            "DATA.BACKEND": "device", "DATA.NUM_WORKERS": workers, "MIX.BOX": "sample"}))
        assert trainer.train()["bad_train_images"] == 1
        weights.append(trainer.model.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
