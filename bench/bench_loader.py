#!/usr/bin/env python
"""The pretraining input pipeline with each DATA.BACKEND, side by side in one run over the same
folder of real photographs (scikit-image's, re-encoded as JPEGs at ImageNet's typical size and
quality):

- worker CPU time per image: what one loader worker spends on a training image (PIL: read,
  decode, crop, flip, jitter, lighting, normalise; device: read the bytes and draw the
  parameters), measured in this process;
- device time per image: what the training device spends decoding and augmenting a batch
  (nothing for PIL, whose batches arrive ready);
- images/s end to end: a DataLoader with ``--workers`` workers feeding the device step.

Target on the CPU: the device backend's worker time per image at most 1/20 of PIL's.

    python bench/bench_loader.py                         # CPU: 200 images, 2 workers
    python bench/bench_loader.py --device cuda --workers 8 --images 2000
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import JPEG_QUALITY, JPEG_SIZE, synchronise, write_photographs
from torch.utils.data import DataLoader

from pretrain.config import get_cfg
from pretrain.data import backend_dataset
from pretrain.device_pipeline import batch_preparer


def worker_seconds(dataset, count: int) -> float:
    """CPU seconds per item of ``dataset.__getitem__`` (what a loader worker does per image)."""
    start = time.process_time()
    for index in range(count):
        dataset[(0, index)]
    return (time.process_time() - start) / count


def measure(cfg, backend: str, device: torch.device, workers: int, batch: int, rounds: int) -> dict:
    cfg = cfg.clone()
    cfg.DATA.BACKEND = backend
    dataset, collate = backend_dataset(cfg, train=True)
    prepare = batch_preparer(cfg, train=True, device=device)
    per_worker = min(worker_seconds(dataset, len(dataset)) for _ in range(rounds))

    batches = [collate([dataset[(1, index)] for index in range(start, start + batch)]) if collate else None
               for start in range(0, len(dataset) - batch + 1, batch)]
    device_seconds = 0.0
    if backend == "device":
        timings = []
        for _ in range(rounds):
            synchronise(device)
            start = time.perf_counter()
            for encoded, labels, _ in batches:
                prepare(encoded, labels)
            synchronise(device)
            timings.append((time.perf_counter() - start) / (len(batches) * batch))
        device_seconds = min(timings)

    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate, drop_last=True,
                        sampler=[(2, index) for index in range(len(dataset))], persistent_workers=workers > 0)
    rates = []
    for _ in range(rounds):
        start, seen = time.perf_counter(), 0
        for images, labels, _ in loader:
            seen += prepare(images, labels)[0].shape[0]
        synchronise(device)
        rates.append(seen / (time.perf_counter() - start))
    return {"worker": per_worker, "device": device_seconds, "images_per_second": max(rates)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of each measurement (the best is kept)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        kilobytes = write_photographs(Path(folder), args.images)
        cfg = get_cfg()
        cfg.merge_from_list(["DATA.ROOT", folder, "MODEL.NUM_CLASSES", "1"])
        results = {backend: measure(cfg, backend, device, args.workers, args.batch_size, args.rounds)
                   for backend in ("pil", "device")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.images} JPEGs of {JPEG_SIZE[0]} x {JPEG_SIZE[1]} at quality {JPEG_QUALITY} "
          f"({kilobytes:.0f} KB on average), "
          f"{cfg.DATA.IMAGE_SIZE} px training crops, batches of {args.batch_size}, on {device} ({name}); "
          f"end to end with {args.workers} loader workers")
    print(f"{'backend':<9}{'worker ms/image':>17}{'device ms/image':>17}{'images/s':>10}")
    for backend, result in results.items():
        print(f"{backend:<9}{result['worker'] * 1e3:>17.3f}{result['device'] * 1e3:>17.3f}"
              f"{result['images_per_second']:>10.0f}")
    ratio = results["pil"]["worker"] / results["device"]["worker"]
    print(f"worker time, PIL / device: {ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'NOT met'})")


if __name__ == "__main__":
    main()
