"""Batch augmentations that mix images and labels: Cutout, Mixup, CutMix and SaliencyMix.

Every mixer is a callable with one convention, ``images, targets = mixer(images, labels)``:
``images`` is ``B x C x H x W`` (float or uint8, any device), ``labels`` are class ids ``(B,)``
or soft targets ``(B, K)``, and ``targets`` come back as ``(B, K)`` float rows summing to 1.
Mixers see the normalised training tensors; those that need pixel values (SaliencyMix) take
the normalisation ``mean`` and ``std``. A trainer that copies each batch to the GPU may also
pass the batch as it was on the host (``host_images``): a mixer that must look at the images
to place its box (SaliencyMix with one box per batch) reads them there instead of waiting for
the GPU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pretrain.saliency import BACKENDS, METHODS, compute_saliency, official_fine_grained, saliency_peaks

# Where each SaliencyMix strategy (the paper's ablation) cuts the patch from the source and
# pastes it into the target: around the most ("peak") or least ("lowest") salient pixel, at the
# image "centre", or, for the target, at the source box's own coordinates ("same").
PLACEMENTS = {
    "sal2corr": ("peak", "same"),
    "sal2sal": ("peak", "peak"),
    "sal2nonsal": ("peak", "lowest"),
    "nonsal2sal": ("lowest", "peak"),
    "nonsal2nonsal": ("lowest", "lowest"),
    "center2center": ("centre", "same"),
}
STRATEGIES = tuple(PLACEMENTS)
BOX_MODES = ("batch", "sample")
# What the saliency detector sees: the de-normalised "pixels", the "input" tensor as given (in
# [0, 1], clipped), or the input as the official code hands it to OpenCV ("official", float bytes).
SALIENCY_INPUTS = ("pixels", "input", "official")


# ------------------------------------------------------------------------- plain tensor helpers

def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: a plain ``.to(device)`` of a CPU
    tensor waits for the GPU's queued work; a pinned, non-blocking copy is queued behind it."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def one_hot_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0,
                    batch_size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """``(B, K)`` float targets on ``device`` (default: the labels') from class ids or soft
    rows, smoothed towards uniform.

    Class ids are range-checked only while they are on the CPU: checking them on the GPU would
    read values back and stall the step; there an id out of range trips scatter's device-side
    assertion instead of this ValueError.
    """
    device = labels.device if device is None else device
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise ValueError(f"class-id labels must be integers, got dtype {labels.dtype}")
        if labels.device.type == "cpu" and labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"label {bad} is out of range for num_classes={num_classes}")
        targets = torch.zeros(labels.shape[0], num_classes, device=device)
        targets.scatter_(1, to_device(labels, device).long().unsqueeze(1), 1.0)
    elif labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"soft labels have {labels.shape[1]} columns but num_classes={num_classes}")
        targets = to_device(labels, device).float()
    else:
        raise ValueError(f"labels must be (B,) class ids or (B, K) soft targets, got shape {tuple(labels.shape)}")
    if batch_size is not None and targets.shape[0] != batch_size:
        raise ValueError(f"{targets.shape[0]} labels for a batch of {batch_size} images")
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return targets


def mix_targets(targets: torch.Tensor, permutation: torch.Tensor, lam) -> torch.Tensor:
    """``lam * y + (1 - lam) * y[permutation]``; ``lam`` a float or one value per sample."""
    if isinstance(lam, torch.Tensor):
        lam = lam.to(targets.device, targets.dtype).unsqueeze(1)
    return targets * lam + targets[permutation] * (1 - lam)


def centred_boxes(centres: torch.Tensor, size: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 4)`` boxes ``(top, left, bottom, right)`` of ``size = (h, w)`` centred on
    ``centres`` (row, column), clipped to the image as CutMix and SaliencyMix clip them."""
    half = size // 2
    return torch.cat([clamp_to_image(centres - half, height, width),
                      clamp_to_image(centres + half, height, width)], dim=1)


def clamp_to_image(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 2)`` (row, column) ``points`` clamped into ``[0, height] x [0, width]`` in place,
    one axis at a time, so that no tensor of limits has to be copied to the device."""
    points[:, 0].clamp_(0, height)
    points[:, 1].clamp_(0, width)
    return points


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 1, H, W)`` boolean masks of ``(top, left, bottom, right)`` boxes."""
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    top, left, bottom, right = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside.unsqueeze(1)


def box_area_ratio(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / (height * width)


def paste_boxes(target: torch.Tensor, source: torch.Tensor, source_boxes: torch.Tensor,
                target_boxes: torch.Tensor) -> torch.Tensor:
    """Copy ``source[b]`` inside ``source_boxes[b]`` onto ``target[b]`` at ``target_boxes[b]``
    (boxes of equal size per sample), for all samples at once, in place into ``target``."""
    batch, channels, height, width = target.shape
    inside = box_masks(target_boxes, height, width)
    shift = (source_boxes[:, :2] - target_boxes[:, :2]).view(batch, 2, 1, 1)
    rows = torch.arange(height, device=target.device).view(1, height, 1) + shift[:, 0]
    cols = torch.arange(width, device=target.device).view(1, 1, width) + shift[:, 1]
    index = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).view(batch, 1, -1)
    moved = source.flatten(2).gather(2, index.expand(batch, channels, -1)).view_as(target)
    return torch.where(inside, moved, target, out=target)


# ------------------------------------------------------------------------------- the mixers

class BatchMixer:
    """Shared arguments, checks and randomness of the mixers; subclasses implement ``mix``.

    ``CONFIG_KEYS`` maps constructor options to the config keys that set them, so that a
    config builds any mixer (``build_mixer_from_config``) without knowing its options.
    """

    CONFIG_KEYS = {"num_classes": "MODEL.NUM_CLASSES", "prob": "MIX.PROB", "alpha": "MIX.ALPHA",
                   "label_smoothing": "MIX.LABEL_SMOOTHING"}

    def __init__(self, num_classes: int, prob: float = 1.0, alpha: float = 1.0,
                 label_smoothing: float = 0.0, generator: torch.Generator | None = None,
                 inplace: bool = False):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob!r}")
        if not alpha > 0:
            raise ValueError(f"alpha (the Beta parameter) must be > 0, got {alpha!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.num_classes = num_classes
        self.prob = prob
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.generator = generator
        self.inplace = inplace

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 host_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        targets = self._targets(images, labels)
        if images.shape[0] == 0 or (self.prob < 1.0 and not self._uniform() < self.prob):
            return images, targets
        return self.mix(images if self.inplace else images.clone(), targets, host_images)

    def mix(self, images: torch.Tensor, targets: torch.Tensor,
            host_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _targets(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Targets on the images' device, the labels checked before they are copied there."""
        if images.dim() != 4:
            raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
        return one_hot_targets(labels, self.num_classes, self.label_smoothing,
                               batch_size=images.shape[0], device=images.device)

    # Randomness comes from ``generator`` (or torch's global generator) so that a seed fixes
    # every draw, and stays on the CPU so that no draw waits for the GPU; what the GPU needs
    # of it is copied there without waiting.
    def _uniform(self, *size: int) -> torch.Tensor | float:
        values = torch.rand(size or (1,), generator=self.generator)
        return values if size else float(values)

    def _permutation(self, batch: int) -> torch.Tensor:
        """Which sample each one takes its patch (or blend) from, drawn on the host."""
        return torch.randperm(batch, generator=self.generator)

    def _beta(self) -> float:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))
        return float(np.random.default_rng(seed).beta(self.alpha, self.alpha))


class NoMix(BatchMixer):
    """The baseline: images untouched (never copied), labels as (smoothed) one-hot targets."""

    def __call__(self, images, labels, host_images=None):
        return images, self._targets(images, labels)


class Cutout(BatchMixer):
    """DeVries & Taylor 2017: zero a square of side ``size`` x the shorter side at a uniformly
    random centre per image (clipped at the border); labels unchanged."""

    CONFIG_KEYS = {**BatchMixer.CONFIG_KEYS, "size": "MIX.CUTOUT_SIZE"}

    def __init__(self, num_classes: int, size: float = 0.5, **kwargs):
        super().__init__(num_classes, **kwargs)
        if not 0.0 < size <= 1.0:
            raise ValueError(f"cutout size must lie in (0, 1] of the shorter side, got {size!r}")
        self.size = size

    def mix(self, images, targets, host_images=None):
        batch, _, height, width = images.shape
        side = max(1, int(round(self.size * min(height, width))))
        centres = (self._uniform(batch, 2) * torch.tensor([height, width])).long()
        boxes = centred_boxes(centres, torch.tensor([[side, side]]), height, width)
        images.masked_fill_(box_masks(to_device(boxes, images.device), height, width), 0)
        return images, targets


class Mixup(BatchMixer):
    """Zhang et al. 2018: a convex blend of two images, ``lam ~ Beta(alpha, alpha)``."""

    def mix(self, images, targets, host_images=None):
        lam = self._beta()
        permutation = to_device(self._permutation(images.shape[0]), images.device)
        if images.is_floating_point():
            blended = images.mul(lam).add_(images[permutation], alpha=1 - lam)
        else:
            blended = (images.float() * lam + images[permutation].float() * (1 - lam)).round_()
        images.copy_(blended)
        return images, mix_targets(targets, permutation, lam)


class CutMix(BatchMixer):
    """Yun et al. 2019: paste a random box (side ``sqrt(1 - lam)``, centre uniform, one box for
    the batch) from a permuted image; ``lam`` recomputed from the clipped area."""

    def mix(self, images, targets, host_images=None):
        batch, _, height, width = images.shape
        lam = self._beta()
        permutation = to_device(self._permutation(batch), images.device)
        centre = (self._uniform(1, 2) * torch.tensor([height, width])).long()
        box = centred_boxes(centre, cut_size(lam, height, width), height, width)
        top, left, bottom, right = box[0].tolist()
        images[:, :, top:bottom, left:right] = images[permutation, :, top:bottom, left:right]
        lam = 1.0 - float(box_area_ratio(box, height, width))
        return images, mix_targets(targets, permutation, lam)


def cut_size(lam: float, height: int, width: int) -> torch.Tensor:
    """``(1, 2)`` patch size ``int(side * sqrt(1 - lam))`` per axis, as CutMix computes it."""
    ratio = float(np.sqrt(1.0 - lam))
    return torch.tensor([[int(height * ratio), int(width * ratio)]])


class SaliencyMix(BatchMixer):
    """Uddin et al. 2021: paste the most salient patch of a source image into a target.

    ``box="batch"`` takes one box from the first source's saliency and pastes it for the whole
    batch, as the official ImageNet code does; ``box="sample"`` gives each sample the box of its
    own source, as the paper describes. ``strategy`` picks where the patch is cut from and
    pasted to (the paper's ablation); ``saliency_on`` says whether the detector sees the
    de-normalised ``pixels``, the ``input`` tensor as given, or, with ``official``, the input as
    the official code hands it to OpenCV's fine-grained detector (through OpenCV whatever the
    backend). ``box="batch"`` with ``saliency_on="official"`` reproduces the official box.
    """

    CONFIG_KEYS = {**BatchMixer.CONFIG_KEYS, "saliency": "MIX.SALIENCY", "backend": "MIX.BACKEND",
                   "box": "MIX.BOX", "strategy": "MIX.STRATEGY", "saliency_on": "MIX.SALIENCY_ON",
                   "mean": "DATA.MEAN", "std": "DATA.STD"}

    def __init__(self, num_classes: int, saliency: str = "fine_grained", backend: str = "torch",
                 box: str = "batch", strategy: str = "sal2corr", saliency_on: str = "pixels",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **kwargs):
        super().__init__(num_classes, **kwargs)
        for name, value, choices in (("saliency method", saliency, METHODS),
                                     ("saliency backend", backend, BACKENDS),
                                     ("box mode", box, BOX_MODES),
                                     ("strategy", strategy, STRATEGIES),
                                     ("saliency_on", saliency_on, SALIENCY_INPUTS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
        if saliency_on == "official" and saliency != "fine_grained":
            raise ValueError(f"saliency_on 'official' is the official code's fine_grained detector, "
                             f"not {saliency!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for de-normalisation, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        self.saliency = saliency
        self.backend = backend
        self.box = box
        self.strategy = strategy
        self.source_at, self.target_at = PLACEMENTS[strategy]
        self.saliency_on = saliency_on
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._normalisation_on = {}  # device -> (mean, std) there, copied once per device

    def detector_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the saliency detector is shown: pixels in [0, 1], or the tensor as given."""
        if images.shape[1] != 3:
            raise ValueError(f"SaliencyMix needs 3-channel images, got {images.shape[1]} channels")
        if self.saliency_on != "pixels" or images.dtype == torch.uint8 or self.mean is None:
            return images
        if self.mean.shape[1] != images.shape[1]:
            raise ValueError(f"mean/std have {self.mean.shape[1]} values for {images.shape[1]} channels")
        if images.device not in self._normalisation_on:
            self._normalisation_on[images.device] = (to_device(self.mean, images.device),
                                                     to_device(self.std, images.device))
        mean, std = self._normalisation_on[images.device]
        return images.float() * std + mean

    def mix(self, images, targets, host_images=None):
        lam = self._beta()
        order = self._permutation(images.shape[0])
        permutation = to_device(order, images.device)
        cut = cut_size(lam, *images.shape[2:])
        if self.box == "batch":
            return self._mix_batch_box(images, targets, permutation, cut, order, host_images)
        return self._mix_sample_boxes(images, targets, permutation, cut)

    def _mix_batch_box(self, images, targets, permutation, cut, order, host_images):
        """One box, placed by the saliency of the first source image, for every sample. With
        ``host_images`` that image's saliency is found on the host and the step never waits
        for the GPU; otherwise its centres are read back from the images' device once. The box
        is then worked out in CPU tensors and pasted by slicing."""
        height, width = images.shape[2:]
        seen, first = (host_images, order[:1]) if host_images is not None else (images, permutation[:1])
        centres = self._centres(seen, first, torch.zeros_like(first)).cpu()
        source_box, target_box = self._boxes(centres, cut, height, width)
        top, left, bottom, right = source_box[0].tolist()
        to_top, to_left, to_bottom, to_right = target_box[0].tolist()
        images[:, :, to_top:to_bottom, to_left:to_right] = images[permutation, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # in float64, as the official code
        return images, mix_targets(targets, permutation, lam)

    def _mix_sample_boxes(self, images, targets, permutation, cut):
        """Each sample gets the box of its own source; the boxes never leave the device."""
        batch, _, height, width = images.shape
        centres = self._centres(images, permutation, torch.arange(batch, device=images.device))
        source_boxes, target_boxes = self._boxes(to_device(centres, images.device),
                                                 to_device(cut, images.device), height, width)
        source = images[permutation]
        if self.target_at == "same":
            torch.where(box_masks(source_boxes, height, width), source, images, out=images)
        else:
            paste_boxes(images, source, source_boxes, target_boxes)
        lam = 1.0 - box_area_ratio(source_boxes, height, width)
        return images, mix_targets(targets, permutation, lam)

    def _saliency(self, images, sources, targets):
        """Saliency maps of the source images, and of the target images when the strategy
        places the patch by the target's saliency; stacked as ``(sources, targets)``."""
        needed = sources if self.target_at == "same" else torch.cat([sources, targets])
        view = self.detector_view(images[needed])
        if self.saliency_on == "official":
            return official_fine_grained(view)
        return compute_saliency(view, self.saliency, self.backend)

    def _centres(self, images, sources, targets):
        """``(2, N, 2)``: the (row, column) centres of the source and the target box of each
        pair ``images[sources[i]] -> images[targets[i]]``, where the strategy puts them; on the
        images' device, or on the CPU for a centred patch, which needs no saliency."""
        count = sources.shape[0]
        if self.source_at == "centre":
            return torch.tensor([images.shape[2] // 2, images.shape[3] // 2]).repeat(2, count, 1)
        maps = self._saliency(images, sources, targets)
        source_centres = saliency_peaks(maps[:count], lowest=self.source_at == "lowest")
        if self.target_at == "same":
            return torch.stack([source_centres, source_centres])
        target_centres = saliency_peaks(maps[count:], lowest=self.target_at == "lowest")
        return torch.stack([source_centres, target_centres])

    def _boxes(self, centres, cut, height, width):
        """Source and target boxes around ``centres`` (``(2, N, 2)``, as ``_centres`` gives
        them), of size ``cut``: the source box clipped at the border, the target box of the
        same size moved inside the image."""
        source_boxes = centred_boxes(centres[0], cut, height, width)
        if self.target_at == "same":
            return source_boxes, source_boxes
        size = source_boxes[:, 2:] - source_boxes[:, :2]
        # Top left at max(centre - size // 2, 0), moved back so that the box ends inside the image.
        bottom_right = clamp_to_image((centres[1] - size // 2).clamp_min(0) + size, height, width)
        return source_boxes, torch.cat([bottom_right - size, bottom_right], dim=1)


MIXERS = {
    "none": NoMix,
    "cutout": Cutout,
    "mixup": Mixup,
    "cutmix": CutMix,
    "saliencymix": SaliencyMix,
}


def mixer_class(name: str) -> type[BatchMixer]:
    """The mixer registered under ``name`` (any case)."""
    if name.lower() not in MIXERS:
        raise ValueError(f"unknown mixing method {name!r}; choose one of {tuple(MIXERS)}")
    return MIXERS[name.lower()]


def build_mixer(name: str, **options) -> BatchMixer:
    """The mixer registered under ``name`` (``none``, ``cutout``, ``mixup``, ``cutmix``,
    ``saliencymix``), built with ``options``."""
    return mixer_class(name)(**options)


def build_mixer_from_config(cfg, generator: torch.Generator) -> BatchMixer:
    """The mixer ``cfg.MIX.NAME`` names, given the config values of its ``CONFIG_KEYS`` only."""
    mixer = mixer_class(cfg.MIX.NAME)
    options = {option: _config_value(cfg, key) for option, key in mixer.CONFIG_KEYS.items()}
    return mixer(generator=generator, **options)


def _config_value(cfg, key: str):
    """``cfg``'s value at a dotted ``key`` such as ``MIX.PROB``."""
    section, name = key.split(".")
    return cfg[section][name]
