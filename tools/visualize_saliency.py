#!/usr/bin/env python
"""Draw what SaliencyMix sees: each photograph, its saliency maps, the patch around the
fine-grained peak, and that patch pasted into the next photograph.

    python tools/visualize_saliency.py --output saliency.png            # scikit-image photos
    python tools/visualize_saliency.py path/to/folder --output grid.png  # your own images
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch


from pretrain.mix import box_masks, centred_boxes, cut_size
from pretrain.saliency import BACKENDS, METHODS, compute_saliency, saliency_peaks

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SKIMAGE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def read_images(paths: list[str], limit: int) -> tuple[list[str], list[np.ndarray]]:
    """Names and RGB uint8 arrays of (at most ``limit`` of) the given image files and folders,
    or of scikit-image's bundled photographs when no path is given."""
    if not paths:
        try:
            import skimage.data
        except ImportError:
            raise SystemExit("error: give image paths, or install scikit-image for its bundled photos")
        return list(SKIMAGE_PHOTOS), [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"error: no such image file or folder: {path}")
    if not files:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {paths}")
    names, arrays = [], []
    for file in files[:limit]:
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"error: cannot read image {file}")
        names.append(file.name)
        arrays.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return names, arrays


def load_photographs(paths: list[str], size: int, limit: int) -> tuple[list[str], torch.Tensor]:
    """Names and a ``N x 3 x size x size`` float batch of the images ``read_images`` reads."""
    names, arrays = read_images(paths, limit)
    resized = [cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA) for a in arrays]
    batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255
    return names, batch


def save_figure(fig, output: Path, dpi: int) -> None:
    """Lay out, write (the folder made if needed) and release a pyplot figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)


def draw_grid(names, images, maps, boxes, mixed, output: Path, lam: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    columns = ["photograph", *METHODS, f"fine_grained box (lam={lam:g})", "pasted into next"]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.4 * len(columns), 2.4 * len(names)),
                             squeeze=False)
    for row, name in enumerate(names):
        panels = [images[row], *(maps[m][row] for m in METHODS), images[row], mixed[row]]
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            if panel.dim() == 3:
                ax.imshow(panel.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                ax.imshow(panel.numpy(), cmap="inferno", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
        top, left, bottom, right = boxes[row].tolist()
        axes[row][len(METHODS) + 1].add_patch(
            Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, color="lime", lw=2))
        axes[row][0].set_ylabel(name, fontsize=8)
    save_figure(fig, output, dpi=100)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders (default: scikit-image photos)")
    parser.add_argument("--output", default="saliency.png", help="PNG file to write")
    parser.add_argument("--size", type=int, default=224, help="side the images are resized to")
    parser.add_argument("--lam", type=float, default=0.6, help="mixing ratio that sets the patch size")
    parser.add_argument("--backend", default="torch", choices=BACKENDS)
    parser.add_argument("--limit", type=int, default=8, help="at most this many images from the paths given")
    args = parser.parse_args(argv)
    if not 0.0 <= args.lam < 1.0:
        parser.error(f"--lam must lie in [0, 1), got {args.lam}")

    names, images = load_photographs(args.images, args.size, args.limit)
    maps = {method: compute_saliency(images, method, args.backend) for method in METHODS}
    count, _, height, width = images.shape
    boxes = centred_boxes(saliency_peaks(maps["fine_grained"]),
                          cut_size(args.lam, height, width).expand(count, 2), height, width)
    # Sal to Corr: photo i's salient patch lands at the same place in photo i + 1.
    targets = images.roll(-1, dims=0)
    mixed = torch.where(box_masks(boxes, height, width), images, targets)
    output = Path(args.output)
    draw_grid(names, images, maps, boxes, mixed, output, args.lam)
    print(f"wrote {output} ({count} images, methods: {', '.join(METHODS)}, backend: {args.backend})")
    return output


if __name__ == "__main__":
    main()
