"""OpenCV's default border (BORDER_REFLECT_101) for batched planes, as slice copies: the
saliency detectors must pad exactly as OpenCV does to give its maps."""
from __future__ import annotations

import torch


def reflect_source(position: int, n: int) -> int:
    """Source index of ``position`` (from ``-pad`` to ``n + pad - 1``) on an axis of length
    ``n``, as OpenCV's BORDER_REFLECT_101 (its default border) picks it, for any ``n``."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    folded = position % period
    return period - folded if folded >= n else folded


def border_sources(n: int, pad: int) -> list[tuple[int, int]]:
    """(padded index, padded index of its source) of each border position of an axis."""
    border = [*range(-pad, 0), *range(n, n + pad)]
    return [(position + pad, reflect_source(position, n) + pad) for position in border]


def reflect_pad(x: torch.Tensor, pad: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``B x H x W`` padded by ``pad`` on both sides of the last two axes, OpenCV-style."""
    height, width = x.shape[-2:]
    if out is None:
        out = x.new_empty(*x.shape[:-2], height + 2 * pad, width + 2 * pad)
    out[..., pad:pad + height, pad:pad + width] = x
    return reflect_borders(out, pad)


def reflect_borders(padded: torch.Tensor, pad: int) -> torch.Tensor:
    """Fill the ``pad``-wide borders of ``padded`` from its interior, in place, OpenCV-style.

    Each border column, then each border row, is one slice copy (gathering the borders by
    tensor indexing cost more than a whole blur).
    """
    height, width = padded.shape[-2] - 2 * pad, padded.shape[-1] - 2 * pad
    middle = padded[..., pad:pad + height, :]
    for column, source in border_sources(width, pad):
        middle[..., column] = middle[..., source]
    for row, source in border_sources(height, pad):
        padded[..., row, :] = padded[..., source, :]
    return padded
