#!/usr/bin/env python
"""Where SaliencyMix's box lands, as published and as described, over a folder of images.

Random square crops of each image, resized to --size and normalised with the ImageNet mean and
std as the official transforms do, get the fine-grained saliency peak two ways: as published
(the official code hands the normalised float tensor to OpenCV: ``saliency_on="official"``) and
as described (the map of the pixels: ``saliency_on="pixels"``). The figure shows, per mode, a
heat map of the box centres (the peaks) and how often each pixel lies inside the box (lam drawn
from Beta(1, 1)), then a few crops with both boxes; the figures printed are those
docs/saliencymix.md quotes.

    python tools/saliency_boxes.py --output docs/saliency_boxes.png   # scikit-image photos
    python tools/saliency_boxes.py path/to/folder --crops 4 --output boxes.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from pretrain.config import IMAGENET_MEAN, IMAGENET_STD
from pretrain.mix import box_masks, centred_boxes, cut_size
from pretrain.saliency import compute_saliency, official_fine_grained, saliency_peaks
from visualize_saliency import read_images, save_figure

MODES = {"official": "as published (official)", "pixels": "as described (pixels)"}
COLOURS = {"official": "red", "pixels": "lime"}


def random_crops(arrays: list[np.ndarray], crops: int, size: int, seed: int) -> torch.Tensor:
    """``crops`` random square crops per image (half to all of its shorter side) resized to
    ``size``, as a ``N x 3 x size x size`` batch in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for array in arrays:
        shorter = min(array.shape[:2])
        for _ in range(crops):
            side = int(rng.integers(shorter // 2, shorter + 1))
            top = int(rng.integers(0, array.shape[0] - side + 1))
            left = int(rng.integers(0, array.shape[1] - side + 1))
            crop = array[top:top + side, left:left + side]
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def saliency_maps(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fine-grained map each mode places the box by: of the normalised float input through
    OpenCV (official), and of the 8-bit pixels (described)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return {"official": official_fine_grained((pixels - mean) / std),
            "pixels": compute_saliency(pixels, "fine_grained")}


def correlations(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """Pearson r of each pair of maps."""
    a = first.flatten(1).double()
    b = second.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).numpy()


def findings(maps, peaks, top_rows: int, images: int) -> dict:
    """The figures docs/saliencymix.md quotes."""
    r = correlations(maps["official"], maps["pixels"])
    crops = len(r)
    summary = {"images": images, "crops": crops, "r_official_vs_pixels_mean": float(r.mean()),
               "r_official_vs_pixels_range": [float(r.min()), float(r.max())],
               "same_peak": int((peaks["official"] == peaks["pixels"]).all(1).sum())}
    for mode in MODES:
        rows = peaks[mode][:, 0]
        summary[f"{mode}_peaks_in_top_{top_rows}_rows"] = int((rows < top_rows).sum())
        summary[f"{mode}_peak_row_median"] = float(rows.float().median())
    return summary


def draw(pixels, peaks, boxes, examples: int, output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count, _, height, width = pixels.shape
    columns = max(4, examples)
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 4.6), squeeze=False)
    panels = []
    for mode, title in MODES.items():
        centres = torch.zeros(height, width)
        centres.index_put_((peaks[mode][:, 0], peaks[mode][:, 1]), torch.ones(count), accumulate=True)
        centres = torch.nn.functional.max_pool2d(centres[None, None], 9, 1, 4)[0, 0]  # visible dots
        covered = box_masks(boxes[mode], height, width).float().mean(0)[0]
        panels += [(f"{title}:\nbox centres ({count} crops)", centres, "magma"),
                   (f"{title}:\nshare of crops pasted over", covered, "viridis")]
    for ax, (title, image, cmap) in zip(axes[0], panels):
        ax.imshow(image.numpy(), cmap=cmap)
        ax.set_title(title, fontsize=7)
    for ax, index in zip(axes[1], np.linspace(0, count - 1, examples).round().astype(int)):
        ax.imshow(pixels[index].permute(1, 2, 0).numpy())
        for mode in MODES:
            top, left, bottom, right = boxes[mode][index].tolist()
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                   color=COLOURS[mode], lw=1.5))
        ax.set_title(f"crop {index}: {COLOURS['official']} published, {COLOURS['pixels']} described", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    save_figure(fig, output, dpi=64)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders (default: scikit-image photos)")
    parser.add_argument("--output", default="saliency_boxes.png", help="PNG file to write (and a .json beside it)")
    parser.add_argument("--crops", type=int, default=25, help="random crops per image")
    parser.add_argument("--size", type=int, default=224, help="side the crops are resized to")
    parser.add_argument("--top-rows", type=int, default=24, help="count the peaks in this many top rows")
    parser.add_argument("--examples", type=int, default=4, help="crops drawn with their boxes")
    parser.add_argument("--limit", type=int, default=64, help="at most this many images from the paths given")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.crops < 1 or args.examples < 1:
        parser.error("--crops and --examples must be at least 1")

    names, arrays = read_images(args.images, args.limit)
    pixels = random_crops(arrays, args.crops, args.size, args.seed)
    maps = saliency_maps(pixels)
    peaks = {mode: saliency_peaks(maps[mode]) for mode in MODES}
    lams = np.random.default_rng(args.seed).beta(1.0, 1.0, len(pixels))
    cuts = torch.cat([cut_size(lam, args.size, args.size) for lam in lams])
    boxes = {mode: centred_boxes(peaks[mode], cuts, args.size, args.size) for mode in MODES}
    summary = findings(maps, peaks, args.top_rows, len(names))
    output = Path(args.output)
    draw(pixels, peaks, boxes, min(args.examples, len(pixels)), output)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {output} and {output.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    main()
