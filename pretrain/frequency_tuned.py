"""Achanta et al.'s frequency-tuned saliency (not in OpenCV), batched: the distance of each
pixel's blurred Lab colour from the image's mean Lab colour, with OpenCV's colour constants."""
from __future__ import annotations

import torch

from pretrain.reflect import reflect_borders


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
    offsets = _binomial5_sums(reflect_borders(padded, 2), other)
    torch.mul(offsets[0], offsets[0], out=out)
    for plane, weight in zip(offsets[1:], _OPPONENT_WEIGHTS[1:]):
        out.addcmul_(plane, plane, value=weight ** 2)
    out.sqrt_()
    return out.div_(out.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12))


def frequency_tuned(images: torch.Tensor) -> torch.Tensor:
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
