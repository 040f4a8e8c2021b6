"""SaliencyMix as published: ``saliency_on="official"`` with ``box="batch"`` places the box, pastes
and mixes the targets exactly as the official ImageNet / CIFAR training code does.

The reference below is that code's ``saliency_bbox`` and mixing step written out again here,
step for step (numpy and OpenCV, nothing from the project), and it is compared box for box on
scikit-image photographs prepared as the official transforms prepare them and on random tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.mix import build_mixer

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

K = 10
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def official_saliency_bbox(img: torch.Tensor, lam: float):
    """The official code's ``saliency_bbox(input[rand_index[0]], lam)``."""
    size = img.size()
    W = size[1]
    H = size[2]
    cut_rat = np.sqrt(1. - lam)
    cut_w = int(W * cut_rat)
    cut_h = int(H * cut_rat)
    temp_img = img.cpu().numpy().transpose(1, 2, 0)
    saliency = cv2.saliency.StaticSaliencyFineGrained_create()
    (success, saliencyMap) = saliency.computeSaliency(temp_img)
    saliencyMap = (saliencyMap * 255).astype("uint8")
    maximum_indices = np.unravel_index(np.argmax(saliencyMap, axis=None), saliencyMap.shape)
    x = maximum_indices[0]
    y = maximum_indices[1]
    bbx1 = np.clip(x - cut_w // 2, 0, W)
    bby1 = np.clip(y - cut_h // 2, 0, H)
    bbx2 = np.clip(x + cut_w // 2, 0, W)
    bby2 = np.clip(y + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def official_step(input: torch.Tensor, target: torch.Tensor, lam: float, rand_index: torch.Tensor):
    """The official training step's mixing: the box of the first permuted image pasted for the
    whole batch, ``lam`` recomputed from it; the loss ``lam * CE(target) + (1 - lam) *
    CE(target[rand_index])`` written as mixed one-hot targets. Returns images, targets, box."""
    input = input.clone()
    bbx1, bby1, bbx2, bby2 = official_saliency_bbox(input[rand_index[0]], lam)
    input[:, :, bbx1:bbx2, bby1:bby2] = input[rand_index, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (input.size()[-1] * input.size()[-2]))
    one_hot = F.one_hot(target, K).float()
    targets = one_hot * float(lam) + one_hot[rand_index] * (1 - float(lam))
    return input, targets, tuple(int(v) for v in (bbx1, bby1, bbx2, bby2))


def photograph_crops(count: int, seed: int, size: int = 224) -> torch.Tensor:
    """Random square crops (half to all of the shorter side) of the scikit-image photographs,
    resized to ``size`` and normalised with the ImageNet mean and std, as float32 ``N x 3 x S x S``."""
    rng = np.random.default_rng(seed)
    crops = []
    for k in range(count):
        photo = getattr(skimage_data, PHOTOS[k % len(PHOTOS)])()
        side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = cv2.resize(photo[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)
        crops.append((crop.astype(np.float32) / 255 - MEAN) / STD)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def record_boxes(monkeypatch, mixer) -> list:
    """The ``(source, target)`` boxes ``mixer`` places, appended call by call."""
    placed, place = [], mixer._boxes

    def recording(*args):
        placed.append(place(*args))
        return placed[-1]

    monkeypatch.setattr(mixer, "_boxes", recording)
    return placed


def mix_as_published(monkeypatch, images, labels, lam, permutation):
    """The project's official mode with these draws; returns images, targets and the box
    ``(top, left, bottom, right)`` it pasted at."""
    mixer = build_mixer("saliencymix", num_classes=K, box="batch", saliency_on="official",
                        mean=tuple(MEAN.tolist()), std=tuple(STD.tolist()))
    monkeypatch.setattr(mixer, "_beta", lambda: lam)
    monkeypatch.setattr(mixer, "_permutation", lambda batch: permutation)
    boxes = record_boxes(monkeypatch, mixer)
    out, targets = mixer(images, labels)
    (source_box, target_box), = boxes
    assert torch.equal(source_box, target_box)
    return out, targets, tuple(source_box[0].tolist())


def check_as_published(monkeypatch, images, seed):
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(0, K, images.shape[0]))
    for _ in range(3):
        lam = float(rng.beta(1.0, 1.0))
        permutation = torch.from_numpy(rng.permutation(images.shape[0]))
        want_images, want_targets, (bbx1, bby1, bbx2, bby2) = official_step(images, labels, lam, permutation)
        out, targets, box = mix_as_published(monkeypatch, images, labels, lam, permutation)
        assert box == (bbx1, bby1, bbx2, bby2), f"lam {lam}, permutation {permutation.tolist()}"
        assert torch.equal(out, want_images)
        assert torch.equal(targets, want_targets)


@pytest.mark.parametrize("seed", range(4))
def test_official_box_on_photographs(monkeypatch, seed):
    """Normalised 224 x 224 crops of real photographs: the same box, images and targets."""
    check_as_published(monkeypatch, photograph_crops(8, seed), seed)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(224, 224), (32, 32), (40, 56)], ids=["224", "32", "40x56"])
def test_official_box_on_random_tensors(monkeypatch, seed, shape):
    """Random normal tensors, square (ImageNet, CIFAR sizes) and not: the same box, images and
    targets."""
    images = torch.randn(6, 3, *shape, generator=torch.Generator().manual_seed(seed))
    check_as_published(monkeypatch, images, seed)


def test_official_mode_reads_the_input_not_the_pixels(monkeypatch):
    """The official map is not the map of the pixels: on most photograph crops the official box
    differs from the one ``saliency_on="pixels"`` places (guards against a silent fallback)."""
    images = photograph_crops(8, seed=0)
    boxes = {}
    for saliency_on in ("official", "pixels"):
        mixer = build_mixer("saliencymix", num_classes=K, box="sample", saliency_on=saliency_on,
                            mean=tuple(MEAN.tolist()), std=tuple(STD.tolist()))
        monkeypatch.setattr(mixer, "_beta", lambda: 0.75)
        monkeypatch.setattr(mixer, "_permutation", lambda batch: torch.arange(batch).roll(1))
        found = record_boxes(monkeypatch, mixer)
        mixer(images, torch.zeros(8, dtype=torch.long))
        boxes[saliency_on] = found[0][0]
    differ = (boxes["official"] != boxes["pixels"]).any(1)
    assert int(differ.sum()) >= 6, boxes
