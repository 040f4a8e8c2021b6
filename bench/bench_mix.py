#!/usr/bin/env python
"""Speed of the saliency backends and of the mixers, measured side by side in one run.

1. For each saliency method: the OpenCV per-image loop against the batched torch backend on
   the same batch (time ratio; target on a 2-core CPU: torch >= 5x faster for fine_grained
   and frequency_tuned).
2. Each mixer's cost per batch as a fraction of one ResNet-50 forward and backward pass on the
   same batch and device (targets: SaliencyMix box="batch" <= 1%, box="sample" <= 2%).

    python bench/bench_mix.py                       # 64 x 224 x 224 (and 64 x 256 x 256 on a GPU)
    python bench/bench_mix.py --sizes 224 --repeats 5 --device cuda
    python bench/bench_mix.py --skip-model --methods frequency_tuned --uint8   # one detector, float and 8-bit
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision


from common import BENCH_MIXERS, normalise
from pretrain.mix import build_mixer
from pretrain.saliency import METHODS, compute_saliency, to_uint8

SPEEDUP_TARGETS = {"fine_grained": 5.0, "frequency_tuned": 5.0}


def timed(function, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``function()`` in seconds, after ``warmup`` untimed calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        function()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def verdict(value: float, target: float | None, higher_is_better: bool) -> str:
    if target is None:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return f"target {'>=' if higher_is_better else '<='} {target:g}: {'met' if ok else 'NOT met'}"


def bench_saliency(pixels: torch.Tensor, device: torch.device, repeats: int, methods, uint8: bool) -> None:
    print(f"\nsaliency of {tuple(pixels.shape)} on {device}: OpenCV loop (CPU) vs torch batched")
    print(f"{'method':<28}{'opencv ms':>11}{'torch ms':>11}{'speed-up':>10}  ")
    inputs = [("", pixels)] + ([(" (uint8)", to_uint8(pixels))] if uint8 else [])
    for method in methods:
        for suffix, images in inputs:
            on_device = images.to(device)
            opencv = timed(lambda: compute_saliency(images, method, "opencv"), torch.device("cpu"), repeats)
            batched = timed(lambda: compute_saliency(on_device, method, "torch"), device, repeats)
            ratio = opencv / batched
            target = SPEEDUP_TARGETS.get(method)
            print(f"{method + suffix:<28}{opencv * 1e3:>11.1f}{batched * 1e3:>11.1f}{ratio:>9.1f}x  "
                  f"{verdict(ratio, target, higher_is_better=True)}")


def bench_mixers(images: torch.Tensor, labels: torch.Tensor, device: torch.device, repeats: int,
                 model_repeats: int) -> None:
    model = torchvision.models.resnet50(num_classes=1000).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def training_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()

    step = timed(training_step, device, model_repeats)
    print(f"\nmixers on {tuple(images.shape)} on {device}; ResNet-50 forward+backward: {step * 1e3:.0f} ms")
    print(f"{'mixer':<26}{'ms / batch':>11}{'of step':>10}  ")
    for label, (arguments, target) in BENCH_MIXERS.items():
        mixer = build_mixer(num_classes=1000, generator=torch.Generator().manual_seed(0), **arguments)
        cost = timed(lambda: mixer(images, labels), device, repeats)
        fraction = cost / step
        print(f"{label:<26}{cost * 1e3:>11.2f}{fraction * 100:>9.2f}%  "
              f"{verdict(fraction * 100, target and target * 100, higher_is_better=False)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides (default 224, plus 256 on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--model-repeats", type=int, default=3, help="timed ResNet-50 steps")
    parser.add_argument("--skip-model", action="store_true", help="only the saliency comparison")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="saliency methods to time (default all)")
    parser.add_argument("--uint8", action="store_true",
                        help="also time the saliency on the batch as 8-bit images")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or ([224, 256] if device.type == "cuda" else [224])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        pixels = torch.rand(args.batch_size, 3, size, size, generator=generator)
        bench_saliency(pixels, device, args.repeats, args.methods, args.uint8)
        if not args.skip_model:
            images = normalise(pixels).to(device)
            labels = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)
            bench_mixers(images, labels, device, args.repeats, args.model_repeats)


if __name__ == "__main__":
    main()
