"""Tests of ``pretrain.mix``: the batch mixers (none, Cutout, Mixup, CutMix, SaliencyMix).

Most tests use *tagged* images: image ``k`` of the batch only takes values in a range of its
own, so every output pixel says which input image it was copied from, and any two images
differ at every pixel. Where exact geometry matters, ``lam`` and the permutation are fixed by
monkeypatching the mixer's ``_beta`` / ``_permutation`` methods; other draws are replayed from a
clone of the mixer's generator.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain import mix
from pretrain.mix import STRATEGIES, CutMix, Cutout, Mixup, NoMix, SaliencyMix, build_mixer
from pretrain.saliency import compute_saliency, saliency_peaks

K = 10            # classes
B = 8             # batch size of the tagged images
H, W = 32, 40     # default image size
LABELS = torch.arange(B)          # distinct labels, so mixed targets show both sources

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# One entry per mixer behaviour, for the tests that hold for all of them.
ALL_MIXERS = [
    ("none", {}),
    ("cutout", {}),
    ("mixup", {}),
    ("cutmix", {}),
    ("saliencymix", {"box": "batch"}),
    ("saliencymix", {"box": "sample"}),
]
MIXING = [entry for entry in ALL_MIXERS if entry[0] not in ("none", "cutout")]
PASTING = [entry for entry in MIXING if entry[0] != "mixup"]


def mixer_id(entry) -> str:
    name, options = entry
    return "-".join([name, *map(str, options.values())])


# ------------------------------------------------------------------------------- helpers

def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(name: str, options: dict | None = None, seed: int = 0, **extra):
    return build_mixer(name, num_classes=K, generator=seeded(seed), **(options or {}), **extra)


def tagged_images(batch: int = B, height: int = H, width: int = W, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random images in [0, 1] (uint8: [0, 255]); image k only takes values in a range of its
    own, ``((k + 0.1) / batch, (k + 0.9) / batch)`` (uint8: ``30 k + 1 .. 30 k + 28``)."""
    noise = torch.rand(batch, 3, height, width, generator=seeded(seed))
    k = torch.arange(batch).view(-1, 1, 1, 1)
    if dtype == torch.uint8:
        assert batch <= 8
        return (30 * k + 1 + (noise * 28).long()).to(torch.uint8)
    return ((k + 0.1 + 0.8 * noise) / batch).to(dtype)


def origins(images: torch.Tensor, batch: int) -> torch.Tensor:
    """``(N, H, W)``: which tagged input image each output pixel was copied from."""
    if images.dtype == torch.uint8:
        tag = images.long() // 30
    else:
        tag = (images.double() * batch).floor().long()
    assert (tag == tag[:, :1]).all(), "the channels of a pixel come from different images"
    return tag[:, 0]


def planted_images(spots, height: int, width: int) -> torch.Tensor:
    """Flat images, each with one salient 4 x 8 bright|dark pair at ``spots[k] = (row, col)``.

    Image k has grey level ``0.35 + 0.05 k`` (bright ``+0.4``, dark ``-0.3``), so any two of
    at most four images differ at every pixel."""
    assert len(spots) <= 4
    images = torch.empty(len(spots), 3, height, width)
    for k, (row, col) in enumerate(spots):
        level = 0.35 + 0.05 * k
        images[k] = level
        images[k, :, row:row + 4, col:col + 4] = level + 0.4
        images[k, :, row:row + 4, col + 4:col + 8] = level - 0.3
    return images


def corner_spots(height: int, width: int):
    """A spot near the middle, in the top-left and bottom-right corners, and near the top."""
    return [(height // 2 - 5, width // 2 - 9), (0, 0), (height - 4, width - 8), (3, width - 14)]


def fix_draws(monkeypatch, mixer, lam: float | None = None, permutation=None):
    """Make ``mixer`` draw exactly this ``lam`` and this permutation."""
    if lam is not None:
        monkeypatch.setattr(mixer, "_beta", lambda: lam)
    if permutation is not None:
        permutation = torch.as_tensor(permutation)
        monkeypatch.setattr(mixer, "_permutation", lambda batch: permutation)


def derangement(batch: int, shift: int = 3) -> torch.Tensor:
    """A permutation with no fixed point, so every sample gets a different source."""
    return (torch.arange(batch) + shift) % batch


def one_hot(labels: torch.Tensor, num_classes: int = K) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


def mixed_one_hot(labels, permutation, pasted) -> torch.Tensor:
    """``(1 - pasted) onehot(y) + pasted onehot(y[perm])``, ``pasted`` per sample."""
    pasted = torch.as_tensor(pasted, dtype=torch.float32).view(-1, 1)
    return (1 - pasted) * one_hot(labels) + pasted * one_hot(labels[permutation])


def reference_cut(lam: float, height: int, width: int) -> tuple[int, int]:
    """CutMix's patch size: ``int(side * sqrt(1 - lam))`` per axis."""
    ratio = math.sqrt(1.0 - lam)
    return int(height * ratio), int(width * ratio)


def reference_box(centre, cut, height: int, width: int) -> tuple[int, int, int, int]:
    """The reference code's box ``centre -+ cut // 2`` per axis, clipped to the image:
    ``(top, left, bottom, right)``."""
    (row, col), (cut_h, cut_w) = [int(v) for v in centre], cut
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return (clip(row - cut_h // 2, height), clip(col - cut_w // 2, width),
            clip(row + cut_h // 2, height), clip(col + cut_w // 2, width))


def box_mask(box, height: int, width: int) -> torch.Tensor:
    top, left, bottom, right = box
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def rectangle(mask: torch.Tensor):
    """The ``(top, left, bottom, right)`` box that ``mask`` fills exactly (None if empty);
    fails when the mask is not a filled rectangle."""
    if not mask.any():
        return None
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    assert torch.equal(mask, box_mask(box, *mask.shape)), f"pasted region is not a box: {box}"
    return box


def box_area(box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def crop(image: torch.Tensor, box) -> torch.Tensor:
    top, left, bottom, right = box
    return image[..., top:bottom, left:right]


def expected_saliency_boxes(detector_images, permutation, lam, box, strategy,
                            method="fine_grained"):
    """Per sample ``(source_box, target_box)`` as the paper places them, from saliency maps
    computed here: "sal" = around the peak, "nonsal" = around the minimum, "center" = the image
    centre, "corr" = the source box's coordinates. The source box is clipped at the border; a
    target box of the same size is moved inside the image. ``box="batch"``: source
    ``permutation[0]`` and target 0 place one box for every sample."""
    batch, _, height, width = detector_images.shape
    cut = reference_cut(lam, height, width)
    maps = compute_saliency(detector_images, method)
    peaks = {"sal": saliency_peaks(maps).tolist(), "nonsal": saliency_peaks(maps, lowest=True).tolist()}
    source_kind, target_kind = strategy.split("2")

    def centre(index, kind):
        return (height // 2, width // 2) if kind == "center" else peaks[kind][index]

    boxes = []
    for i in range(batch):
        source, target = (int(permutation[0]), 0) if box == "batch" else (int(permutation[i]), i)
        source_box = reference_box(centre(source, source_kind), cut, height, width)
        if target_kind in ("corr", "center"):
            target_box = source_box
        else:
            size_h, size_w = source_box[2] - source_box[0], source_box[3] - source_box[1]
            row, col = centre(target, target_kind)
            top = min(max(row - size_h // 2, 0), height - size_h)
            left = min(max(col - size_w // 2, 0), width - size_w)
            target_box = (top, left, top + size_h, left + size_w)
        boxes.append((source_box, target_box))
    return boxes


def check_pasted(out, images, permutation, boxes):
    """Each sample ``i`` equals ``images[i]`` outside its target box and ``images[perm[i]]``'s
    source box inside it; the pasted region is read off the output. Returns the fraction of
    pixels of each sample that came from its source."""
    batch, _, height, width = images.shape
    fractions = []
    for i, (source_box, target_box) in enumerate(boxes):
        source = int(permutation[i])
        changed = (out[i] != images[i]).any(0)
        if source == i:
            assert not changed.any(), f"sample {i} is its own source but changed"
            fractions.append(0.0)
            continue
        region = rectangle(changed)
        expected = target_box if box_area(target_box) else None
        assert region == expected, f"sample {i}: pasted {region}, expected {expected}"
        if region is not None:
            assert torch.equal(crop(out[i], target_box), crop(images[source], source_box)), (
                f"sample {i}: box content is not image {source}'s {source_box}")
        outside = ~changed
        assert torch.equal(out[i][:, outside], images[i][:, outside])
        fractions.append(changed.sum().item() / (height * width))
    return fractions


def source_fraction(out, images, permutation):
    """Fraction of each sample's pixels copied from its source, counted from tagged images."""
    batch = images.shape[0]
    tags = origins(out, batch)
    own = torch.arange(batch).view(-1, 1, 1)
    source = torch.as_tensor(permutation).view(-1, 1, 1)
    assert ((tags == own) | (tags == source)).all(), "a pixel came from neither image"
    from_source = (tags == source) & (tags != own)
    return from_source.flatten(1).float().mean(1)


def replayed_draws(name, options, seed):
    """The ``lam`` and permutation a fresh mixer with ``seed`` draws first."""
    twin = make(name, options, seed=seed)
    lam = twin._beta()
    return lam, twin._permutation(B)


# --------------------------------------------------------------------- 1. where pixels go

@pytest.mark.parametrize("lam", [0.75, 0.4])
@pytest.mark.parametrize("shape", [(H, W), (24, 56)], ids=["32x40", "24x56"])
def test_cutmix_pastes_source_box_at_same_place(monkeypatch, lam, shape):
    """CutMix: one box (side int(side * sqrt(1 - lam)), uniform centre, clipped) for the
    batch; inside it the source's pixels at the same coordinates, outside the target's."""
    height, width = shape
    images = tagged_images(height=height, width=width)
    permutation = derangement(B)
    for seed in range(4):
        mixer = make("cutmix", seed=seed)
        fix_draws(monkeypatch, mixer, lam, permutation)
        replay = seeded(seed)
        out, _ = mixer(images, LABELS)
        centre = (torch.rand(1, 2, generator=replay)[0] * torch.tensor([height, width])).long()
        box = reference_box(centre.tolist(), reference_cut(lam, height, width), height, width)
        check_pasted(out, images, permutation, [(box, box)] * B)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("box", ["batch", "sample"])
def test_saliencymix_pastes_where_the_strategy_says(monkeypatch, box, strategy):
    """SaliencyMix: the source box sits on the source's saliency peak (or minimum / the
    centre), is pasted at the same place (sal2corr, center2center) or around the target's
    peak / minimum; the target keeps every other pixel."""
    images = tagged_images()
    permutation = derangement(B)
    lam = 0.75
    mixer = make("saliencymix", {"box": box, "strategy": strategy})
    fix_draws(monkeypatch, mixer, lam, permutation)
    out, _ = mixer(images, LABELS)
    boxes = expected_saliency_boxes(images, permutation, lam, box, strategy)
    check_pasted(out, images, permutation, boxes)
    if box == "batch":
        assert len({target for _, target in boxes}) == 1


@pytest.mark.parametrize("strategy", ["sal2corr", "sal2sal", "nonsal2nonsal"])
def test_saliencymix_non_square_images(monkeypatch, strategy):
    """Rows and columns are not swapped on 24 x 56 images (per-sample boxes)."""
    images = tagged_images(height=24, width=56)
    permutation = derangement(B)
    mixer = make("saliencymix", {"box": "sample", "strategy": strategy})
    fix_draws(monkeypatch, mixer, 0.5, permutation)
    out, _ = mixer(images, LABELS)
    boxes = expected_saliency_boxes(images, permutation, 0.5, "sample", strategy)
    check_pasted(out, images, permutation, boxes)


@pytest.mark.parametrize("size", [0.5, 0.35])
@pytest.mark.parametrize("shape", [(H, W), (24, 56)], ids=["32x40", "24x56"])
def test_cutout_zeroes_one_box_per_image(size, shape):
    """Cutout: each image gets its own box (side round(size * shorter side), uniform centre,
    clipped) set to 0, every other pixel unchanged, and the targets stay one-hot."""
    height, width = shape
    images = tagged_images(height=height, width=width)     # no pixel is 0
    mixer = make("cutout", seed=5, size=size)
    replay = seeded(5)
    out, targets = mixer(images, LABELS)
    centres = (torch.rand(B, 2, generator=replay) * torch.tensor([height, width])).long()
    side = max(1, round(size * min(height, width)))
    for i in range(B):
        box = reference_box(centres[i].tolist(), (side, side), height, width)
        zeroed = (out[i] == 0).all(0)
        assert rectangle(zeroed) == box
        assert torch.equal(out[i][:, ~zeroed], images[i][:, ~zeroed])
    assert torch.equal(targets, one_hot(LABELS))


# ------------------------------------------------------------------ 2. targets and areas

@pytest.mark.parametrize("entry", PASTING + [
    ("saliencymix", {"box": "sample", "strategy": "nonsal2sal"}),
    ("saliencymix", {"box": "batch", "strategy": "sal2nonsal"}),
], ids=mixer_id)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_targets_equal_pasted_area(entry, seed):
    """targets[i] = lam_i onehot(y_i) + (1 - lam_i) onehot(y_perm[i]), with 1 - lam_i the
    fraction of sample i's pixels counted as copied from its source (real random draws)."""
    name, options = entry
    images = tagged_images(seed=seed)
    _, permutation = replayed_draws(name, options, seed)
    out, targets = make(name, options, seed=seed)(images, LABELS)
    pasted = source_fraction(out, images, permutation)
    torch.testing.assert_close(targets, mixed_one_hot(LABELS, permutation, pasted), rtol=0, atol=1e-6)
    assert pasted.sum() > 0, "nothing was pasted: the test would prove nothing"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_blends_images_and_targets_with_drawn_lam(seed):
    """Mixup: images = lam x + (1 - lam) x[perm] and targets likewise, where lam and perm are
    the mixer's own draws (replayed from a clone of its generator: beta, then permutation)."""
    images = tagged_images(seed=seed)
    mixer = make("mixup", seed=seed)
    twin = make("mixup")
    twin.generator.set_state(mixer.generator.get_state())
    out, targets = mixer(images, LABELS)
    lam = twin._beta()
    permutation = twin._permutation(B)
    torch.testing.assert_close(out, lam * images + (1 - lam) * images[permutation])
    torch.testing.assert_close(targets, mixed_one_hot(LABELS, permutation, [1 - lam] * B))
    assert 0 < lam < 1


# --------------------------------------------------------------------------- 3. prob

@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
def test_prob_zero_returns_inputs(entry):
    """prob=0: the images come back unchanged and the targets are plain one-hot rows."""
    name, options = entry
    images = tagged_images()
    mixer = make(name, options, prob=0.0)
    for _ in range(5):
        out, targets = mixer(images, LABELS)
        assert torch.equal(out, images)
        assert torch.equal(targets, one_hot(LABELS))


@pytest.mark.parametrize("entry", ALL_MIXERS[1:], ids=mixer_id)
def test_prob_one_always_mixes(monkeypatch, entry):
    """prob=1: every call mixes (no coin is tossed)."""
    name, options = entry
    images = tagged_images()
    mixer = make(name, options, prob=1.0)
    fix_draws(monkeypatch, mixer, 0.5, derangement(B))
    for _ in range(10):
        out, _ = mixer(images, LABELS)
        assert not torch.equal(out, images)


@pytest.mark.parametrize("prob", [0.3, 0.7])
def test_prob_decided_by_first_uniform(monkeypatch, prob):
    """0 < prob < 1: a batch is mixed exactly when the first uniform draw is below prob."""
    images = tagged_images()
    mixer = make("mixup", prob=prob, seed=11)
    fix_draws(monkeypatch, mixer, 0.5, derangement(B))
    decisions = []
    for _ in range(60):
        state = mixer.generator.get_state()
        coin = float(torch.rand(1, generator=torch.Generator().set_state(state)))
        _, targets = mixer(images, LABELS)
        mixed = not torch.equal(targets, one_hot(LABELS))
        assert mixed == (coin < prob)
        decisions.append(mixed)
    assert 0 < sum(decisions) < len(decisions)


# ---------------------------------------------------------------------- 4. lam ~ Beta

BETA_CDFS = {
    0.5: lambda x: 2 / np.pi * np.arcsin(np.sqrt(x)),
    1.0: lambda x: x,
    2.0: lambda x: 3 * x ** 2 - 2 * x ** 3,
}


def ks_distance(sample: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance of a sample to a continuous CDF."""
    x = np.sort(sample)
    n = len(x)
    values = cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - values), np.max(values - np.arange(n) / n)))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_lam_follows_beta(alpha):
    """_beta() draws Beta(alpha, alpha): mean 1/2, variance 1/(4(2 alpha + 1)), and the
    empirical CDF within the KS 0.1% bound of the exact one (and outside it for the others)."""
    n = 4000
    mixer = make("mixup", alpha=alpha, seed=123)
    lams = np.array([mixer._beta() for _ in range(n)])
    assert ((lams >= 0) & (lams <= 1)).all()
    variance = 1 / (4 * (2 * alpha + 1))
    assert abs(lams.mean() - 0.5) < 4 * math.sqrt(variance / n)
    assert abs(lams.var() / variance - 1) < 0.08
    bound = 1.95 / math.sqrt(n)
    assert ks_distance(lams, BETA_CDFS[alpha]) < bound
    for other, cdf in BETA_CDFS.items():
        if other != alpha:
            assert ks_distance(lams, cdf) > bound


# ------------------------------------------------------------- 5. boxes on planted peaks

@pytest.mark.parametrize("shape", [(H, W), (24, 56)], ids=["32x40", "24x56"])
def test_sample_box_centred_on_each_sources_peak(monkeypatch, shape):
    """box="sample": each sample's box is centred on its own source's saliency peak, of side
    int(side * sqrt(1 - lam)) (as cut // 2 either side), clipped at the border; a clipped box
    gives a larger lam."""
    height, width = shape
    spots = corner_spots(height, width)
    images = planted_images(spots, height, width)
    peaks = saliency_peaks(compute_saliency(images, "fine_grained")).tolist()
    for (row, col), (peak_row, peak_col) in zip(spots, peaks):   # the planted spot is the peak
        assert row <= peak_row < row + 4 and col <= peak_col < col + 8
    permutation = torch.tensor([1, 2, 3, 0])
    lam = 0.75
    cut = reference_cut(lam, height, width)
    mixer = make("saliencymix", {"box": "sample"})
    fix_draws(monkeypatch, mixer, lam, permutation)
    out, targets = mixer(images, torch.arange(4))
    lams = []
    for i, source in enumerate(permutation.tolist()):
        box = rectangle((out[i] != images[i]).any(0))
        assert box == reference_box(peaks[source], cut, height, width)
        assert torch.equal(crop(out[i], box), crop(images[source], box))
        lams.append(1 - box_area(box) / (height * width))
    torch.testing.assert_close(targets, mixed_one_hot(torch.arange(4), permutation,
                                                      [1 - lam_i for lam_i in lams]))
    unclipped = 1 - (cut[0] // 2 * 2) * (cut[1] // 2 * 2) / (height * width)
    assert lams[3] == pytest.approx(unclipped)          # source 0: spot in the middle
    assert lams[0] > unclipped and lams[1] > unclipped  # sources 1, 2: spots in corners


@pytest.mark.parametrize("strategy", ["sal2corr", "sal2sal"])
def test_batch_box_from_first_source(monkeypatch, strategy):
    """box="batch": one box for all samples, from the saliency of the first source
    (images[perm[0]]), and one lam for all."""
    spots = corner_spots(H, W)
    images = planted_images(spots, H, W)
    peaks = saliency_peaks(compute_saliency(images, "fine_grained")).tolist()
    permutation = torch.tensor([2, 0, 3, 1])
    lam = 0.6
    mixer = make("saliencymix", {"box": "batch", "strategy": strategy})
    fix_draws(monkeypatch, mixer, lam, permutation)
    out, targets = mixer(images, torch.arange(4))
    source_box = reference_box(peaks[2], reference_cut(lam, H, W), H, W)
    regions = {rectangle((out[i] != images[i]).any(0)) for i in range(4)}
    assert len(regions) == 1
    target_box = regions.pop()
    if strategy == "sal2corr":
        assert target_box == source_box
    else:   # placed around the first target's (image 0's) peak
        assert target_box != source_box
        assert target_box[0] <= peaks[0][0] < target_box[2] and target_box[1] <= peaks[0][1] < target_box[3]
    for i, source in enumerate(permutation.tolist()):
        assert torch.equal(crop(out[i], target_box), crop(images[source], source_box))
    batch_lam = 1 - box_area(source_box) / (H * W)
    torch.testing.assert_close(targets, mixed_one_hot(torch.arange(4), permutation, [1 - batch_lam] * 4))


@pytest.mark.parametrize("saliency_on", ["pixels", "input"])
def test_saliency_on_selects_what_the_detector_sees(monkeypatch, saliency_on):
    """With mean/std, "pixels" finds the box on the de-normalised images and "input" on the
    normalised tensor as given; the pasted pixels are the normalised ones either way."""
    pixels = planted_images(corner_spots(H, W), H, W)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    normalised = (pixels - mean) / std
    permutation = torch.tensor([1, 2, 3, 0])
    mixer = make("saliencymix", {"box": "sample", "strategy": "sal2sal", "saliency_on": saliency_on},
                 mean=MEAN, std=STD)
    fix_draws(monkeypatch, mixer, 0.75, permutation)
    out, _ = mixer(normalised, torch.arange(4))
    seen = {"pixels": pixels, "input": normalised}
    expected = expected_saliency_boxes(seen[saliency_on], permutation, 0.75, "sample", "sal2sal")
    other = expected_saliency_boxes(seen[{"pixels": "input", "input": "pixels"}[saliency_on]],
                                    permutation, 0.75, "sample", "sal2sal")
    assert expected != other, "both views give the same boxes: the test would prove nothing"
    check_pasted(out, normalised, permutation, expected)


def test_opencv_backend_gives_the_same_mix(monkeypatch):
    """backend="opencv" (the reference) and "torch" place the same boxes."""
    pytest.importorskip("cv2")
    images = planted_images(corner_spots(H, W), H, W)
    results = []
    for backend in ("torch", "opencv"):
        mixer = make("saliencymix", {"box": "sample", "backend": backend})
        fix_draws(monkeypatch, mixer, 0.75, torch.tensor([1, 2, 3, 0]))
        results.append(mixer(images, torch.arange(4)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------ 6. edge cases

@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
def test_batch_of_one(entry):
    """B = 1: the only source is the image itself, so mixing leaves it (and its one-hot
    target) as it is; Cutout still cuts."""
    name, options = entry
    images = tagged_images(batch=1)
    out, targets = make(name, options)(images, torch.tensor([4]))
    assert out.shape == images.shape and targets.shape == (1, K)
    assert torch.equal(targets, one_hot(torch.tensor([4])))
    if name == "cutout":
        assert (out == 0).any() and torch.equal(out[out != 0], images[out != 0])
    else:
        assert torch.equal(out, images)


@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
def test_empty_batch(entry):
    """B = 0 (batches of "any size"): empty images and (0, K) targets come back."""
    name, options = entry
    out, targets = make(name, options)(torch.rand(0, 3, H, W), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 3, H, W) and targets.shape == (0, K)


@pytest.mark.parametrize("entry", PASTING + [("cutout", {})], ids=mixer_id)
def test_uint8_images_are_pixel_copies(entry):
    """uint8 input stays uint8 and every output pixel is a copy of the target's or the
    source's pixel (0 for Cutout); targets still match the copied area."""
    name, options = entry
    images = tagged_images(dtype=torch.uint8)
    _, permutation = replayed_draws(name, options, seed=4)
    out, targets = make(name, options, seed=4)(images, LABELS)
    assert out.dtype == torch.uint8
    if name == "cutout":
        kept = (out != 0).all(1, keepdim=True).expand_as(out)
        assert torch.equal(out[kept], images[kept]) and (out == 0).any()
        return
    pasted = source_fraction(out, images, permutation)
    from_source = (origins(out, B) == permutation.view(-1, 1, 1)).unsqueeze(1).expand_as(out)
    assert torch.equal(out[from_source], images[permutation][from_source])
    assert torch.equal(out[~from_source], images[~from_source])
    torch.testing.assert_close(targets, mixed_one_hot(LABELS, permutation, pasted), rtol=0, atol=1e-6)


def test_mixup_uint8_rounds_to_nearest(monkeypatch):
    """Mixup on uint8: the blend is rounded to the nearest level, not truncated."""
    images = tagged_images(dtype=torch.uint8)
    permutation = derangement(B)
    mixer = make("mixup")
    fix_draws(monkeypatch, mixer, 0.37, permutation)
    out, _ = mixer(images, LABELS)
    assert out.dtype == torch.uint8
    exact = 0.37 * images.double() + 0.63 * images[permutation].double()
    error = (out.double() - exact).abs()
    assert error.max() <= 0.5 + 1e-6
    assert (exact - exact.floor() > 0.6).any(), "no value where truncation would be caught"


@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
def test_input_tensor_not_modified(monkeypatch, entry):
    """inplace=False (the default): the caller's tensor keeps its values."""
    name, options = entry
    images = tagged_images()
    original = images.clone()
    mixer = make(name, options)
    fix_draws(monkeypatch, mixer, 0.5, derangement(B))
    out, _ = mixer(images, LABELS)
    assert torch.equal(images, original)
    if name != "none":
        assert not torch.equal(out, original)


@pytest.mark.parametrize("entry", [
    ("cutout", {}), ("mixup", {}), ("cutmix", {}),
    ("saliencymix", {"box": "batch", "strategy": "sal2corr"}),
    ("saliencymix", {"box": "batch", "strategy": "sal2sal"}),
    ("saliencymix", {"box": "sample", "strategy": "sal2corr"}),
    ("saliencymix", {"box": "sample", "strategy": "nonsal2sal"}),
], ids=mixer_id)
def test_inplace_writes_into_the_input(monkeypatch, entry):
    """inplace=True: the mix is written into the caller's tensor and that tensor returned."""
    name, options = entry
    images = planted_images(corner_spots(H, W), H, W)
    original = images.clone()
    mixer = make(name, options, inplace=True)
    fix_draws(monkeypatch, mixer, 0.75, torch.tensor([1, 2, 3, 0]))
    out, _ = mixer(images, torch.arange(4))
    assert not torch.equal(out, original)
    assert torch.equal(images, out)
    assert out.data_ptr() == images.data_ptr()


@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
def test_soft_labels(monkeypatch, entry):
    """(B, K) soft labels are mixed with the same weights as class ids would be."""
    name, options = entry
    images = tagged_images()
    soft = torch.softmax(torch.randn(B, K, generator=seeded(9)), dim=1)
    permutation = derangement(B)
    mixer = make(name, options)
    fix_draws(monkeypatch, mixer, 0.6, permutation)
    out, targets = mixer(images, soft)
    if name in ("none", "cutout"):
        expected = soft
    elif name == "mixup":
        expected = 0.6 * soft + 0.4 * soft[permutation]
    else:
        pasted = source_fraction(out, images, permutation).unsqueeze(1)
        expected = (1 - pasted) * soft + pasted * soft[permutation]
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))


@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
def test_label_smoothing(monkeypatch, entry):
    """label_smoothing=eps: rows sum to 1, the smallest entry is eps / K, and without mixing
    the label's entry is 1 - eps + eps / K."""
    name, options = entry
    eps = 0.1
    mixer = make(name, options, label_smoothing=eps)
    fix_draws(monkeypatch, mixer, 0.6, derangement(B))
    _, targets = mixer(tagged_images(), LABELS)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    torch.testing.assert_close(targets.min(1).values, torch.full((B,), eps / K))
    if name in ("none", "cutout"):
        torch.testing.assert_close(targets, one_hot(LABELS) * (1 - eps) + eps / K)
    else:
        assert (targets.max(1).values < 1 - eps + eps / K).all()


def test_box_helpers_match_reference():
    """cut_size, centred_boxes, box_masks and paste_boxes follow the reference formulas."""
    for lam in (0.0, 0.3, 0.5, 0.75, 0.99, 1.0):
        assert mix.cut_size(lam, 24, 56).tolist() == [list(reference_cut(lam, 24, 56))]
    centres = torch.stack([torch.randint(0, 24, (50,), generator=seeded(1)),
                           torch.randint(0, 56, (50,), generator=seeded(2))], dim=1)
    size = torch.tensor([[13, 30]])
    boxes = mix.centred_boxes(centres, size, 24, 56)
    assert boxes.tolist() == [list(reference_box(c, (13, 30), 24, 56)) for c in centres.tolist()]
    masks = mix.box_masks(boxes, 24, 56)
    assert masks.shape == (50, 1, 24, 56)
    for box, mask in zip(boxes.tolist(), masks):
        assert torch.equal(mask[0], box_mask(box, 24, 56))
    images = tagged_images(batch=2, height=24, width=56)
    source_boxes = [(0, 0, 5, 7), (10, 40, 20, 56)]
    target_boxes = [(19, 49, 24, 56), (0, 3, 10, 19)]
    target = images.clone()
    out = mix.paste_boxes(target, images.flip(0), torch.tensor(source_boxes), torch.tensor(target_boxes))
    assert out.data_ptr() == target.data_ptr()  # written in place into the target
    check_pasted(out, images, [1, 0], list(zip(source_boxes, target_boxes)))


def test_build_mixer_names():
    """build_mixer maps each name (any case) to its class, with the options passed on."""
    classes = {"none": NoMix, "cutout": Cutout, "mixup": Mixup, "cutmix": CutMix,
               "saliencymix": SaliencyMix}
    for name, cls in classes.items():
        mixer = build_mixer(name.upper(), num_classes=7, prob=0.25, alpha=0.3)
        assert type(mixer) is cls
        assert (mixer.num_classes, mixer.prob, mixer.alpha) == (7, 0.25, 0.3)


# ----------------------------------------------------------------------- 7. bad values

@pytest.mark.parametrize("name, options, match", [
    ("cutmix", {"prob": 1.5}, r"prob .*1\.5"),
    ("mixup", {"prob": -0.1}, r"prob .*-0\.1"),
    ("cutmix", {"alpha": 0.0}, r"alpha.*0\.0"),
    ("saliencymix", {"alpha": -1.0}, r"alpha.*-1\.0"),
    ("mixup", {"num_classes": 0}, r"num_classes.*0"),
    ("cutmix", {"label_smoothing": 1.0}, r"label_smoothing.*1\.0"),
    ("cutout", {"size": 0.0}, r"size.*0\.0"),
    ("cutout", {"size": 1.5}, r"size.*1\.5"),
    ("saliencymix", {"strategy": "sal2foo"}, r"strategy 'sal2foo'"),
    ("saliencymix", {"box": "image"}, r"box mode 'image'"),
    ("saliencymix", {"saliency": "itti"}, r"saliency method 'itti'"),
    ("saliencymix", {"backend": "cuda"}, r"saliency backend 'cuda'"),
    ("saliencymix", {"saliency_on": "rgb"}, r"saliency_on 'rgb'"),
    ("saliencymix", {"saliency_on": "official", "saliency": "spectral_residual"}, r"official.*'spectral_residual'"),
    ("saliencymix", {"mean": MEAN}, r"mean and std"),
    ("saliencymix", {"mean": MEAN, "std": (0.2, 0.0, 0.2)}, r"std .*0\.0"),
    ("cutmixx", {}, r"mixing method 'cutmixx'"),
])
def test_bad_options_raise(name, options, match):
    """Invalid constructor options raise ValueError naming the option and value."""
    options = {"num_classes": K, **options}
    with pytest.raises(ValueError, match=match):
        build_mixer(name, **options)


@pytest.mark.parametrize("entry", ALL_MIXERS, ids=mixer_id)
@pytest.mark.parametrize("images, labels, match", [
    (tagged_images(), torch.tensor([0, 1, 2, 3, 4, 5, 6, 10]), r"label 10 .*num_classes=10"),
    (tagged_images(), torch.tensor([0, 1, 2, 3, -1, 5, 6, 7]), r"label -1 "),
    (tagged_images(), torch.arange(7), r"7 labels for a batch of 8 images"),
    (tagged_images(), torch.full((B, 5), 0.2), r"5 columns but num_classes=10"),
    (tagged_images(), torch.zeros(B), r"integers"),
    (tagged_images(), torch.zeros(B, K, 1), r"labels must be"),
    (tagged_images()[0], LABELS, r"B x C x H x W, got shape \(3, 32, 40\)"),
], ids=["label-10", "label-minus-1", "count", "soft-K", "float-ids", "3d-labels", "3d-images"])
def test_bad_inputs_raise(entry, images, labels, match):
    """Invalid labels or image shapes raise ValueError naming the offending value."""
    name, options = entry
    with pytest.raises(ValueError, match=match):
        make(name, options)(images, labels)


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_saliencymix_needs_rgb(box):
    """SaliencyMix rejects 1-channel images and mean/std of the wrong length."""
    with pytest.raises(ValueError, match=r"3-channel images, got 1 channels"):
        make("saliencymix", {"box": box})(torch.rand(B, 1, H, W), LABELS)
    with pytest.raises(ValueError, match=r"mean/std have 1 values for 3 channels"):
        make("saliencymix", {"box": box}, mean=(0.5,), std=(0.2,))(tagged_images(), LABELS)


# ---------------------------------------------------------------------------- 8. CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("entry", ALL_MIXERS + [
    ("saliencymix", {"box": "sample", "strategy": "nonsal2sal"}),
    ("saliencymix", {"box": "batch", "strategy": "sal2sal"}),
    ("saliencymix", {"box": "batch", "saliency_on": "official"}),
], ids=mixer_id)
def test_cuda_matches_cpu(entry):
    """On CUDA, with the same CPU generator state, every mixer gives the CPU result."""
    name, options = entry
    for dtype in (torch.float32, torch.uint8):
        images = tagged_images(dtype=dtype)
        cpu_out, cpu_targets = make(name, options, seed=21)(images, LABELS)
        cuda_out, cuda_targets = make(name, options, seed=21)(images.cuda(), LABELS.cuda())
        assert cuda_out.device.type == "cuda" and cuda_targets.device.type == "cuda"
        assert cuda_out.dtype == dtype
        if name == "mixup":   # blends may round differently by one ulp / one level
            torch.testing.assert_close(cuda_out.cpu(), cpu_out, **(
                {"rtol": 0, "atol": 1} if dtype == torch.uint8 else {}))
        else:
            assert torch.equal(cuda_out.cpu(), cpu_out)
        torch.testing.assert_close(cuda_targets.cpu(), cpu_targets)


# ---------------------------------------------------------------------- 9. determinism

@pytest.mark.parametrize("entry", ALL_MIXERS[1:], ids=mixer_id)
def test_same_seed_same_output(entry):
    """The generator alone fixes the draws: the same seed gives the same outputs call after
    call (whatever torch's global seed), and another seed gives different ones."""
    name, options = entry
    images = tagged_images()

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        mixer = make(name, options, seed=seed)
        return [mixer(images, LABELS) for _ in range(3)]

    first, second, other = run(7, 0), run(7, 1), run(8, 0)
    for (a, ta), (b, tb) in zip(first, second):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert any(not torch.equal(a, c) for (a, _), (c, _) in zip(first, other))
    assert not torch.equal(first[0][0], first[1][0]), "consecutive calls repeat their draws"


# ------------------------------------------------------- 10. host-device synchronisations

def bench_common():
    """``bench/common.py`` (not a package): its SyncCounter is what the benchmark reports with."""
    path = Path(__file__).resolve().parents[1] / "bench" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SyncCounter = bench_common().SyncCounter


def test_sync_counter_sees_each_kind_of_sync():
    """The counter is not blind: reads back, blocking uploads and literals made on the device
    count as syncs; a non-blocking upload does not."""
    with SyncCounter() as counter:
        x = counter.on_device(torch.arange(6.0))
        float(x.sum()), x.tolist(), torch.equal(x, x), x[x > 2], x.cpu()
        torch.arange(3).to(x.device), torch.tensor([1, 2], device=x.device)
        torch.zeros(6).copy_(x)
        torch.arange(3).to(x.device, non_blocking=True)
        torch.empty(3, device=x.device).copy_(torch.arange(3.0), non_blocking=True)
    assert len(counter.syncs) == 8, counter.syncs
    assert len(counter.uploads) == 2, counter.uploads


@pytest.mark.parametrize("labels_on", ["host", "device"])
@pytest.mark.parametrize("entry", ALL_MIXERS + [
    ("saliencymix", {"box": "batch", "strategy": "sal2sal"}),
    ("saliencymix", {"box": "batch", "strategy": "center2center"}),
    ("saliencymix", {"box": "sample", "strategy": "nonsal2sal"}),
    ("saliencymix", {"box": "sample", "strategy": "center2center"}),
    ("saliencymix", {"box": "batch", "saliency_on": "official"}),
], ids=mixer_id)
@pytest.mark.parametrize("given_host_batch", [False, True], ids=["device_only", "host_batch_too"])
def test_host_waits_for_the_device_at_most_once(entry, labels_on, given_host_batch):
    """On a GPU the host must not wait for the device inside a mixer, as ``.item()``, a blocking
    upload and the like make it: counted on a stand-in device (a CPU cannot time them), no
    mixer syncs, but SaliencyMix box="batch", which reads its box's centres back once (not for
    center2center, which needs no saliency) unless the trainer also hands it the batch as it
    was on the host: then none at all. Class ids already on the device are not range-checked
    (that would read them back). The results are those of a CPU run; the saliency maps count too."""
    name, options = entry
    extra = {"mean": MEAN, "std": STD} if name == "saliencymix" else {}
    images = tagged_images()
    expected = make(name, options, seed=3, **extra)(images, LABELS)
    with SyncCounter() as counter:
        labels = counter.on_device(LABELS) if labels_on == "device" else LABELS
        out = make(name, options, seed=3, **extra)(counter.on_device(images), labels,
                                                   images.clone() if given_host_batch else None)
    for got, want in zip(out, expected):
        assert torch.equal(counter.on_host(got), want)
    syncs = counter.syncs
    reads_box_back = name == "saliencymix" and options["box"] == "batch" and options.get("strategy") != "center2center"
    assert len(syncs) == int(reads_box_back and not given_host_batch), syncs
