#!/usr/bin/env python
"""Training-step throughput of a ResNet with each mixer against no mixing, measured side by side
in one run: same model, same batch, same device, the trainer's own step function.

Targets: SaliencyMix box="batch" within 1% of no mixing, box="sample" within 2% (the paper's own
implementation cost 9.6% more than no mixing).

It also counts how often one step makes the host wait for the GPU (a value read back, a blocking
upload): on CUDA as its sync debug mode reports them over a whole step; without CUDA, counted for
the mixer alone on a stand-in device (common.SyncCounter).

Then the same step (no mixing) fed by the training loader over real photographs as ImageNet
JPEGs, with each DATA.BACKEND: images/s and the share of the step spent waiting for the loader
(the trainer's ``data_time``; the study's cost table marks arms above 10% as input-bound).

    python bench/bench_pretrain.py                          # ResNet-50; batch 128 on a GPU, 16 on a CPU
    python bench/bench_pretrain.py --batch-size 256 --steps 20 --amp --workers 8
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from common import BENCH_MIXERS, SyncCounter, normalise, synchronise, write_photographs

from pretrain.config import get_cfg
from pretrain.data import build_train_loader
from pretrain.device_pipeline import batch_preparer
from pretrain.engine import autocast_dtype, training_step
from pretrain.mix import build_mixer


def cuda_syncs(step) -> int:
    """Host-device synchronisations in one call of ``step()``, as CUDA's sync debug mode warns
    of them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(warning.message) for warning in caught)


def stand_in_syncs(mixer, images: torch.Tensor, labels: torch.Tensor) -> int:
    """The synchronisations ``mixer`` would make on a GPU, counted on the CPU (mixer only),
    given the batch on the device and, as the trainer gives it, on the host."""
    with SyncCounter() as counter:
        mixer(counter.on_device(images), counter.on_device(labels), images)
    return len(counter.syncs)


def loader_fed_steps(model, optimizer, scaler, mixer, args, batch: int, steps: int, amp_dtype,
                     device: torch.device) -> dict[str, tuple[float, float]]:
    """Per DATA.BACKEND: (images/s, share of the wall time spent waiting for the loader) over
    ``steps`` training steps after one warm-up step, each fed by the training loader."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        write_photographs(Path(folder), batch * (steps + 1))
        for backend in ("pil", "device"):
            cfg = get_cfg()
            cfg.merge_from_list(["DATA.ROOT", folder, "MODEL.NUM_CLASSES", "1", "DATA.BACKEND", backend,
                                 "DATA.IMAGE_SIZE", str(args.size), "DATA.NUM_WORKERS", str(args.workers),
                                 "SOLVER.BATCH_SIZE", str(batch)])
            _, sampler, loader = build_train_loader(cfg, pin_memory=device.type == "cuda")
            prepare = batch_preparer(cfg, train=True, device=device)
            sampler.set_epoch(0)
            waited, batches = 0.0, iter(loader)
            for step in range(steps + 1):
                if step == 1:  # the first step pays for the workers' start
                    synchronise(device)
                    start, waited = time.perf_counter(), 0.0
                fetch = time.perf_counter()
                encoded, labels, _ = next(batches)
                waited += time.perf_counter() - fetch
                images, labels, _, host_images = prepare(encoded, labels)
                training_step(model, optimizer, scaler, mixer, images.contiguous(memory_format=torch.channels_last),
                              labels, amp_dtype, host_images)
            synchronise(device)
            seconds = time.perf_counter() - start
            results[backend] = (batch * steps / seconds, waited / seconds)
            del batches, loader
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, help="default 128 on a GPU, 16 on a CPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, help="timed steps per round (default 20 on a GPU, 2 on a CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all mixers, interleaved (median)")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 autocast where SOLVER.AMP uses it (CUDA, CPUs with native bfloat16)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the loader-fed steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch_size or (128 if on_gpu else 16)
    steps = args.steps or (20 if on_gpu else 2)
    amp_cfg = get_cfg()
    amp_cfg.SOLVER.AMP = args.amp
    amp_dtype = autocast_dtype(amp_cfg, device)

    model = getattr(torchvision.models, args.arch)(weights=None).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, args.size, args.size, generator=generator)
    host_images = normalise(pixels)  # the batch as the loader hands it over, before the trainer copies it
    images = host_images.to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    mixers = {label: build_mixer(num_classes=1000, generator=torch.Generator().manual_seed(1), **options)
              for label, (options, _) in BENCH_MIXERS.items()}

    def run(mixer, count):
        for _ in range(count):
            training_step(model, optimizer, scaler, mixer, images, labels, amp_dtype, host_images)
        synchronise(device)

    run(mixers["none"], 1 if not on_gpu else 3)  # warm up kernels and allocator
    seconds = {label: [] for label in mixers}
    for _ in range(args.rounds):  # interleaved so drifts (clocks, heat) hit every mixer alike
        for label, mixer in mixers.items():
            start = time.perf_counter()
            run(mixer, steps)
            seconds[label].append((time.perf_counter() - start) / steps)
    if on_gpu:
        syncs = {label: cuda_syncs(lambda: training_step(model, optimizer, scaler, mixer, images, labels, amp_dtype, host_images))
                 for label, mixer in mixers.items()}
    else:
        syncs = {label: stand_in_syncs(mixer, host_images, labels) for label, mixer in mixers.items()}

    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch} training step, batch {batch} x 3 x {args.size} x {args.size} on {device} ({name}), "
          f"{'bf16 autocast, ' if amp_dtype else ''}median of {args.rounds} rounds x {steps} steps")
    baseline = statistics.median(seconds["none"])
    print("syncs: host waits for the GPU per step, " + ("from CUDA's sync debug mode" if on_gpu else
          "no CUDA here: the mixer's alone, counted on a stand-in device"))
    print(f"{'mixer':<26}{'images/s':>10}{'vs none':>10}{'syncs':>7}  ")
    for label, (_, allowed) in BENCH_MIXERS.items():
        step = statistics.median(seconds[label])
        slowdown = step / baseline - 1
        verdict = "" if allowed is None else f"target <= {allowed:.0%}: {'met' if slowdown <= allowed else 'NOT met'}"
        print(f"{label:<26}{batch / step:>10.1f}{slowdown:>+9.2%}{syncs[label]:>7}  {verdict}")

    fed = loader_fed_steps(model, optimizer, scaler, mixers["none"], args, batch, steps, amp_dtype, device)
    print(f"fed by the training loader ({args.workers} workers, real photographs as 500 x 375 JPEGs), no mixing:")
    print(f"{'DATA.BACKEND':<26}{'images/s':>10}{'data wait':>11}")
    for backend, (rate, wait) in fed.items():
        print(f"{backend:<26}{rate:>10.1f}{wait:>11.1%}{'  input-bound (over 10%)' if wait > 0.10 else ''}")


if __name__ == "__main__":
    main()
