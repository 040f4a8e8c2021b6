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


def _reflect_source(position: int, n: int) -> int:
    """Source index of ``position`` (from ``-pad`` to ``n + pad - 1``) on an axis of length
    ``n``, as OpenCV's BORDER_REFLECT_101 (its default border) picks it, for any ``n``."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    folded = position % period
    return period - folded if folded >= n else folded


def _border_sources(n: int, pad: int) -> list[tuple[int, int]]:
    """(padded index, padded index of its source) of each border position of an axis."""
    border = [*range(-pad, 0), *range(n, n + pad)]
    return [(position + pad, _reflect_source(position, n) + pad) for position in border]


def _reflect_pad(x: torch.Tensor, pad: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``B x H x W`` padded by ``pad`` on both sides of the last two axes, OpenCV-style."""
    height, width = x.shape[-2:]
    if out is None:
        out = x.new_empty(*x.shape[:-2], height + 2 * pad, width + 2 * pad)
    out[..., pad:pad + height, pad:pad + width] = x
    return _reflect_borders(out, pad)


def _reflect_borders(padded: torch.Tensor, pad: int) -> torch.Tensor:
    """Fill the ``pad``-wide borders of ``padded`` from its interior, in place, OpenCV-style.

    Each border column, then each border row, is one slice copy (gathering the borders by
    tensor indexing cost more than a whole blur).
    """
    height, width = padded.shape[-2] - 2 * pad, padded.shape[-1] - 2 * pad
    middle = padded[..., pad:pad + height, :]
    for column, source in _border_sources(width, pad):
        middle[..., column] = middle[..., source]
    for row, source in _border_sources(height, pad):
        padded[..., row, :] = padded[..., source, :]
    return padded


def _separable_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate ``B x H x W`` with ``kernel`` on both axes, borders as OpenCV reflects them.

    Weighted sums of shifted slices: for the few taps used here this is far cheaper on the CPU
    than a convolution call, and it is exact in the same order on every device.
    """
    radius = kernel.numel() // 2
    weights = kernel.tolist()
    padded = _reflect_pad(x, radius)
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
        _reflect_pad(grey, 1, out=padded)
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


# sRGB (D65) -> XYZ, and the white point, with the constants OpenCV's COLOR_RGB2Lab uses.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)
_LAB_EPSILON = 0.008856
_LAB_SLOPE = 7.787  # slope of the cube root at the epsilon: its linear branch is the tangent there
# a, L, b are 500 (f(X) - f(Y)), 116 f(Y) - 16, 200 (f(Y) - f(Z)): the weights of f(X) - f(Y),
# f(Y) and f(Y) - f(Z) in a distance measured in units of a.
_OPPONENT_WEIGHTS = (1.0, 116 / 500, 200 / 500)
# The sRGB curve below is computed times this factor, which the XYZ weights take back.
_SRGB_GAIN = 1.055 ** 2.4
# On the CPU, frequency tuned goes through the batch in chunks of about this many pixels: its
# steps are passes over memory, and a chunk's two buffers (25 bytes a pixel) stay in the
# cache from one pass to the next, where whole-batch planes would not.
_CPU_CHUNK_PIXELS = 1 << 18


def _power_(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` in place for positive ``x``, as ``exp2(exponent * log2(x))``: on the
    CPU that costs 60% of a ``pow`` (the bulk of frequency tuned's time) and stays within a
    few float32 ulps of it."""
    return x.log2_().mul_(exponent).exp2_()


def _srgb_to_linear_(values: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """``_SRGB_GAIN`` times the sRGB curve, in place on values in [0, 1]; ``spare`` (as large)
    is overwritten.

    Written without masks: the curve ``((x + 0.055) / 1.055) ** 2.4`` meets its linear
    segment ``x / 12.92`` at 0.04045, so ``(max(x, knee) + 0.055) ** 2.4 + _SRGB_GAIN *
    min(x - knee, 0) / 12.92`` gives either branch, without the division by 1.055 ** 2.4.
    """
    below_knee = torch.clamp(values, max=0.04045, out=spare).sub_(0.04045)
    curve = _power_(values.clamp_(min=0.04045).add_(0.055), 2.4)
    return curve.add_(below_knee, alpha=_SRGB_GAIN / 12.92)


def _srgb_table(device) -> torch.Tensor:
    """The curve above at the 256 8-bit levels: uint8 images then take one lookup per value
    instead of the powers, with the same result."""
    levels = torch.arange(256, dtype=torch.float32, device=device).div_(255)
    return _srgb_to_linear_(levels, torch.empty_like(levels))


def _linear_rgb(images: torch.Tensor, planes: torch.Tensor, spare: torch.Tensor) -> None:
    """``_SRGB_GAIN`` times the linear R, G, B of ``images`` (``n x 3 x H x W``, float in
    [0, 1], clipped, or uint8) into ``planes`` (``3 x n x H x W``, contiguous); ``spare`` (as
    large) is overwritten, with the lookup's index for uint8 images.

    The lookup is a ``gather`` from the table repeated along rows (``index_select`` runs on
    one thread), one channel at a time: a channel's int64 index fits in ``spare``.
    """
    channels = images.transpose(0, 1)
    if images.dtype == torch.uint8:
        count, height, width = planes.shape[1:]
        rows = _srgb_table(images.device).expand(count * height, 256)
        index = spare.view(-1)[:2 * planes[0].numel()].view(torch.int64).view(count * height, width)
        for plane, channel in zip(planes, channels):
            index.view_as(channel).copy_(channel)
            torch.gather(rows, 1, index, out=plane.view(count * height, width))
    elif images.dtype == planes.dtype:
        _srgb_to_linear_(torch.clamp(channels, 0, 1, out=planes), spare)
    else:
        _srgb_to_linear_(planes.copy_(channels).clamp_(0, 1), spare)


def _opponent_planes(images: torch.Tensor, planes: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """``f(X) - f(Y)``, ``f(Y)`` and ``f(Y) - f(Z)`` of RGB images (CIE a, L, b less their
    fixed scales and offset, which the distance to the mean colour does without), with the
    constants of OpenCV's float COLOR_RGB2Lab, into ``planes``; ``spare`` is overwritten.

    The cube root's linear branch is its tangent at the epsilon, so, as for the sRGB curve,
    ``root(max(t, eps)) + slope * min(t - eps, 0)`` gives either branch without a mask.
    """
    _linear_rgb(images, planes, spare)
    for out, row, white in zip(spare, _RGB_TO_XYZ, _WHITE):  # X, Y, Z relative to white
        weights = [weight / (white * _SRGB_GAIN) for weight in row]
        torch.mul(planes[0], weights[0], out=out)
        out.add_(planes[1], alpha=weights[1]).add_(planes[2], alpha=weights[2])
    roots = _power_(torch.clamp(spare, min=_LAB_EPSILON, out=planes), 1 / 3)
    roots.add_(spare.sub_(_LAB_EPSILON).clamp_max_(0), alpha=_LAB_SLOPE)
    fx, fy, fz = roots
    fx.sub_(fy)
    torch.sub(fy, fz, out=fz)
    return roots


def _binomial5_sums(padded: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """256 x OpenCV's 5 x 5 GaussianBlur with sigma 0 (``[1 4 6 4 1] / 16`` on both axes) of
    planes already padded by 2, as a view into ``padded``; ``other`` (as large) is overwritten.

    ``[1 4 6 4 1]`` is ``[1 1]`` applied four times: each axis takes four additions of
    neighbours, from one buffer into the other, and no multiplication.
    """
    height, width = padded.shape[-2] - 4, padded.shape[-1] - 4
    passes = [(-1, size) for size in range(width + 3, width - 1, -1)]
    passes += [(-2, size) for size in range(height + 3, height - 1, -1)]
    source, buffers = padded, (other, padded)
    for step, (dim, size) in enumerate(passes):
        target = buffers[step % 2][..., :source.shape[-2], :source.shape[-1]].narrow(dim, 0, size)
        source = torch.add(source.narrow(dim, 0, size), source.narrow(dim, 1, size), out=target)
    return source


def _frequency_tuned_chunk(images: torch.Tensor, memory: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Frequency-tuned maps of ``images`` (``n x 3 x H x W``) into ``out``, in the two flat
    float32 buffers of ``memory`` (each of at least ``3 n (H + 4) (W + 4)`` values).

    The colour conversion works on contiguous ``3 x n x H x W`` planes at the start of each
    buffer, and the blur on planes padded by 2, from one buffer to the other. The opponent
    planes go into the padded ones less their means (the blur of a constant is itself); the
    distances come out in units of a and 256 times too large, scales the peak cancels.
    """
    count, _, height, width = images.shape
    planes, spare = (flat[:3 * count * height * width].view(3, count, height, width) for flat in memory)
    padded, other = (flat[:3 * count * (height + 4) * (width + 4)].view(3, count, height + 4, width + 4)
                     for flat in (memory[1], memory[0]))
    opponents = _opponent_planes(images, planes, spare)
    mean = opponents.mean(dim=(2, 3), keepdim=True)
    torch.sub(opponents, mean, out=padded[..., 2:2 + height, 2:2 + width])
    offsets = _binomial5_sums(_reflect_borders(padded, 2), other)
    torch.mul(offsets[0], offsets[0], out=out)
    for plane, weight in zip(offsets[1:], _OPPONENT_WEIGHTS[1:]):
        out.addcmul_(plane, plane, value=weight ** 2)
    out.sqrt_()
    return out.div_(out.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12))


def _torch_frequency_tuned(images: torch.Tensor) -> torch.Tensor:
    """Achanta et al. 2009: distance of the 5 x 5 binomial-blurred Lab image to its mean colour.

    The batch goes through in chunks on the CPU (see ``_CPU_CHUNK_PIXELS``), whole elsewhere;
    the chunks share one pair of buffers.
    """
    batch, _, height, width = images.shape
    step = batch
    if images.device.type == "cpu":
        step = min(batch, max(1, _CPU_CHUNK_PIXELS // (height * width)))
    memory = images.new_empty(2, 3 * step * (height + 4) * (width + 4), dtype=torch.float32)
    maps = images.new_empty(batch, height, width, dtype=torch.float32)
    for start in range(0, batch, step):
        count = min(step, batch - start)
        _frequency_tuned_chunk(images[start:start + count], memory, out=maps[start:start + count])
    return maps


_TORCH_METHODS = {
    "fine_grained": _torch_fine_grained,
    "spectral_residual": _torch_spectral_residual,
    "frequency_tuned": _torch_frequency_tuned,
}


def saliency_peaks(maps: torch.Tensor, lowest: bool = False) -> torch.Tensor:
    """``B x 2`` (row, column) of each map's first maximum, or first minimum with ``lowest``."""
    flat = maps.flatten(1)
    index = flat.argmin(dim=1) if lowest else flat.argmax(dim=1)
    width = maps.shape[-1]
    return torch.stack([index // width, index % width], dim=1)
