"""Static saliency maps for batches of images, on any device.

Two backends compute the same three detectors:

* ``opencv``: one image at a time through OpenCV (``cv2.saliency`` for the two detectors it
  has); the reference the paper's code used.
* ``torch``: batched tensor code with no Python loop over images, so that saliency runs on the
  GPU inside the training step. It follows OpenCV's integer and rounding steps so that both
  backends give the same maps (see ``tests/test_saliency.py``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.frequency_tuned import frequency_tuned
from pretrain.reflect import reflect_pad

METHODS = ("fine_grained", "spectral_residual", "frequency_tuned")
BACKENDS = ("torch", "opencv")

# Montabone & Soto's neighbourhood half-sizes, as OpenCV's StaticSaliencyFineGrained uses them.
_FINE_GRAINED_NEIGHBOURHOODS = (12, 24, 48, 28, 56, 112)
# Hou & Zhang work on a fixed 64 x 64 thumbnail, as OpenCV's StaticSaliencySpectralResidual does.
_SPECTRAL_SIZE = 64
# OpenCV's fixed-point RGB -> grey weights for 8-bit images (sum 2**15).
_GREY_WEIGHTS_Q15 = (9798, 19235, 3735)
# OpenCV scales its 8-bit fine-grained map by this float32 factor, not by a division.


def compute_saliency(images: torch.Tensor, method: str = "fine_grained",
                     backend: str = "torch") -> torch.Tensor:
    """Saliency maps ``B x H x W`` in [0, 1] for RGB ``images`` ``B x 3 x H x W``.

    ``images`` are floats in [0, 1] (values outside are clipped) or uint8; the maps come back
    as float32 on the images' device.
    """
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown saliency backend {backend!r}; choose one of {BACKENDS}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"saliency needs RGB images of shape B x 3 x H x W, got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"saliency needs float or uint8 images, got dtype {images.dtype}")
    if images.shape[0] == 0:
        return images.new_zeros(images.shape[:1] + images.shape[2:], dtype=torch.float32)
    if backend == "opencv":
        return _opencv_saliency(images, method)
    return _TORCH_METHODS[method](images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise [0, 1] floats to uint8 the way an 8-bit image file would hold them."""
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- OpenCV backend

def _opencv_saliency(images: torch.Tensor, method: str) -> torch.Tensor:
    import cv2  # imported here so the torch backend needs no OpenCV

    if method == "frequency_tuned":
        batch = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        arrays = batch.permute(0, 2, 3, 1).cpu().numpy()
    else:
        arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    maps = []
    for rgb in arrays:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if method == "frequency_tuned":
            maps.append(_opencv_frequency_tuned(cv2, bgr))
            continue
        detector = (cv2.saliency.StaticSaliencyFineGrained_create() if method == "fine_grained"
                    else cv2.saliency.StaticSaliencySpectralResidual_create())
        ok, saliency_map = detector.computeSaliency(bgr)
        if not ok:
            raise RuntimeError(f"OpenCV {method} saliency failed on an image of shape {bgr.shape}")
        maps.append(np.clip(saliency_map.astype(np.float32), 0, 1))
    return torch.from_numpy(np.stack(maps)).to(images.device)


def official_fine_grained(images: torch.Tensor) -> torch.Tensor:
    """The official SaliencyMix code's fine-grained maps, on the CPU, as its ``saliency_bbox``
    makes them: each image's float tensor as given (the normalised input) handed to OpenCV as an
    H x W x C float32 array, the map cast with ``(map * 255).astype("uint8")``; those levels / 255.

    OpenCV's detector reads its grey image as 8-bit, so on float input it reads bytes rather than
    values: these maps say little about the picture (docs/saliencymix.md: SaliencyMix as
    published and as described). Only OpenCV itself reproduces that, one image at a time.
    """
    import cv2

    levels = []
    for image in images.float().cpu().numpy():
        ok, saliency_map = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(
            image.transpose(1, 2, 0))
        if not ok:
            raise RuntimeError(f"OpenCV fine-grained saliency failed on an image of shape {image.shape}")
        levels.append((saliency_map * 255).astype("uint8"))
    return torch.from_numpy(np.stack(levels)).float().div_(255)


def _opencv_frequency_tuned(cv2, bgr: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    mean = lab.reshape(-1, 3).mean(axis=0)
    blurred = cv2.GaussianBlur(lab, (5, 5), 0)
    distance = np.linalg.norm(blurred - mean, axis=2)
    peak = distance.max()
    return (distance / peak if peak > 0 else distance).astype(np.float32)


# ------------------------------------------------------------------------------ torch backend
# Every large temporary below is one B x H x W plane (frequency tuned: one pair of buffers for
# chunks of the batch): the CPU allocator then reuses its memory from call to call instead of
# mapping (and page-faulting) fresh pages for B x 3 x H x W copies.

def _grey_levels(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit COLOR_RGB2GRAY as float levels; every step is exact in float32."""
    grey = images.new_zeros(images.shape[0], *images.shape[2:], dtype=torch.float32)
    plane = torch.empty_like(grey)
    for channel, weight in enumerate(_GREY_WEIGHTS_Q15):
        plane.copy_(images[:, channel])
        if images.dtype != torch.uint8:
            plane.clamp_(0, 1).mul_(255).round_()
        grey.add_(plane, alpha=weight)
    return grey.add_(1 << 14).div_(1 << 15).floor_()


def _separable_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate ``B x H x W`` with ``kernel`` on both axes, borders as OpenCV reflects them.

    Weighted sums of shifted slices: for the few taps used here this is far cheaper on the CPU
    than a convolution call, and it is exact in the same order on every device.
    """
    radius = kernel.numel() // 2
    weights = kernel.tolist()
    padded = reflect_pad(x, radius)
    height, width = x.shape[-2:]
    rows = padded[:, :, 0:width] * weights[0]
    for tap in range(1, len(weights)):
        rows.add_(padded[:, :, tap:tap + width], alpha=weights[tap])
    out = rows[:, 0:height] * weights[0]
    for tap in range(1, len(weights)):
        out.add_(rows[:, tap:tap + height], alpha=weights[tap])
    return out


def _binomial3_levels(grey: torch.Tensor, passes: int) -> torch.Tensor:
    """OpenCV's bit-exact 8-bit GaussianBlur, 3 x 3 with sigma 0, ``passes`` times in place:
    ``([1 2 1]^T [1 2 1] * grey + 8) // 16``."""
    batch, height, width = grey.shape
    padded = grey.new_empty(batch, height + 2, width + 2)
    rows = grey.new_empty(batch, height + 2, width)
    for _ in range(passes):
        reflect_pad(grey, 1, out=padded)
        torch.add(padded[:, :, :-2], padded[:, :, 2:], out=rows).add_(padded[:, :, 1:-1], alpha=2)
        torch.add(rows[:, :-2], rows[:, 2:], out=grey).add_(rows[:, 1:-1], alpha=2)
        grey.add_(8).div_(16).floor_()
    return grey


def _window_sums(prefix: torch.Tensor, half: int, axis: int, out: torch.Tensor) -> torch.Tensor:
    """Sums over ``[i - half + 1, i + half]`` clamped to ``[0, n - 1]`` along ``axis``, from
    ``prefix`` (the inclusive running sum along that axis); written into ``out``.

    The window's upper end is ``prefix[min(i + half, n - 1)]``; from ``i = half`` on, the part
    before the window is ``prefix[i - half]``. Cutting the axis where either clamp starts turns
    the clamped lookups into a few slice operations.
    """
    n = prefix.shape[axis]
    no_lower_until = min(half, n)
    unclamped_upper_until = max(n - half, 0)
    cuts = sorted({0, no_lower_until, unclamped_upper_until, n})
    for start, stop in zip(cuts, cuts[1:]):
        segment = out.narrow(axis, start, stop - start)
        if start < unclamped_upper_until:
            upper = prefix.narrow(axis, start + half, stop - start)
        else:
            upper = prefix.narrow(axis, n - 1, 1).expand_as(segment)
        if start < no_lower_until:
            segment.copy_(upper)
        else:
            torch.sub(upper, prefix.narrow(axis, start - half, stop - start), out=segment)
    return out


def _window_lengths(n: int, half: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i + half + 1).clamp(0, n) - (i - half + 1).clamp(0, n)


def _torch_fine_grained(images: torch.Tensor) -> torch.Tensor:
    """Montabone & Soto, step for step as OpenCV's StaticSaliencyFineGrained computes it.

    OpenCV compares each pixel with the mean of its neighbourhood ``[i - n + 1, i + n]`` on both
    axes (clamped to the image, the pixel itself left out) at six sizes, keeps the truncated
    positive (on) and negative (off) differences, sums them over sizes, scales each to 255 and
    averages on and off. Box sums come from running sums; all values are whole numbers held
    exactly in float32 while the image has fewer than 2**24 / 255 pixels (as in OpenCV).
    """
    grey = _binomial3_levels(_grey_levels(images), passes=2)
    _, height, width = grey.shape
    # Window sums along rows of the 2-D running sum are the running sums (along columns) of
    # the row-window sums, so one integral image serves every scale, as in OpenCV.
    integral = grey.cumsum(1).cumsum_(2)
    band_prefix, difference, part, on_sum, off_sum = (torch.empty_like(grey) for _ in range(5))
    on_sum.zero_()
    off_sum.zero_()
    for half in _FINE_GRAINED_NEIGHBOURHOODS:
        count = (_window_lengths(height, half, grey.device)[:, None]
                 * _window_lengths(width, half, grey.device)[None, :] - 1).clamp_min(1).float()
        _window_sums(integral, half, axis=1, out=band_prefix)
        _window_sums(band_prefix, half, axis=2, out=difference)
        difference.sub_(grey).div_(count)             # mean of the neighbours
        torch.sub(grey, difference, out=difference)   # grey - mean
        on_sum.add_(torch.clamp(difference, min=0, out=part).floor_())  # (uchar) of > 0 only
        off_sum.add_(torch.neg(difference, out=part).clamp_(min=0).floor_())
    on = _scale_to_255(on_sum, scratch=(integral, part))
    off = _scale_to_255(off_sum, scratch=(band_prefix, difference))
    peak = torch.maximum(on.amax(dim=(1, 2), keepdim=True), off.amax(dim=(1, 2), keepdim=True))
    # (on + off) * 255 / peak never lies within float32 rounding of a whole number unless it is
    # one, so float32 floors it exactly as OpenCV's double arithmetic does.
    intensity = on.add_(off).mul_(255.0).div_(peak.clamp_min(1)).floor_().clamp_(max=255)
    return intensity.mul_(1 / 255)  # a Python scalar: no tensor to copy to the device


def _scale_to_255(summed: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """OpenCV's ``(uchar)(255. * (float)(sum / (float)max))`` without leaving float32; the
    result is written into ``scratch[0]`` and ``summed`` is overwritten.

    The ratio is rounded to float32 as in OpenCV; its exact product with 255 can sit just below
    a whole number that the float32 product rounds up to. ``256 * ratio - level`` is exact
    (Sterbenz) and is below ``ratio`` exactly when the true product is below ``level``.
    """
    level, excess = scratch
    ratio = summed.div_(summed.amax(dim=(1, 2), keepdim=True).clamp_min(1))
    torch.mul(ratio, 255, out=level).floor_()
    torch.mul(ratio, 256, out=excess).sub_(level)
    return level.sub_(excess.lt_(ratio))


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def _torch_spectral_residual(images: torch.Tensor) -> torch.Tensor:
    """Hou & Zhang on the 64 x 64 thumbnail, as OpenCV's StaticSaliencySpectralResidual does."""
    height, width = images.shape[-2:]
    thumb = F.interpolate(_grey_levels(images).unsqueeze(1), size=(_SPECTRAL_SIZE, _SPECTRAL_SIZE),
                          mode="bilinear", align_corners=False).round_().squeeze(1).double()
    spectrum = torch.fft.fft2(thumb)
    amplitude = spectrum.abs()
    # A floor keeps flat thumbnails (zero amplitude off DC) finite; real images stay above it.
    log_amplitude = amplitude.clamp_min(1e-12).log()
    residual = torch.exp(log_amplitude - _separable_filter(log_amplitude, torch.full((3,), 1 / 3)))
    phase = torch.where(amplitude > 0, spectrum / amplitude.clamp_min(1e-12), torch.ones_like(spectrum))
    response = torch.fft.ifft2(residual * phase).abs()
    smoothed = _separable_filter(response, _gaussian_kernel(5, 8.0)).square_()
    smoothed = smoothed / smoothed.amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
    full = F.interpolate(smoothed.float().unsqueeze(1), size=(height, width), mode="bilinear",
                         align_corners=False)
    return full.squeeze(1).clamp_(0, 1)


_TORCH_METHODS = {
    "fine_grained": _torch_fine_grained,
    "spectral_residual": _torch_spectral_residual,
    "frequency_tuned": frequency_tuned,
}


def saliency_peaks(maps: torch.Tensor, lowest: bool = False) -> torch.Tensor:
    """``B x 2`` (row, column) of each map's first maximum, or first minimum with ``lowest``."""
    flat = maps.flatten(1)
    index = flat.argmin(dim=1) if lowest else flat.argmax(dim=1)
    width = maps.shape[-1]
    return torch.stack([index // width, index % width], dim=1)
