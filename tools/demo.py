#!/usr/bin/env python
"""The whole story on built-in data: pretrain a ResNet-50 with and without SaliencyMix, export
both backbones, fine-tune a Faster R-CNN on a VOC-format set from each, and compare their mAP.

    python tools/demo.py                      # what `make demo` runs, into output/demo
    python tools/demo.py --scale tiny         # the same pipeline in seconds (the tests use it)

Every stage runs the project's own tools (make_demo_data, pretrain, convert_to_d2, train_net,
compare) with the configs in configs/demo/, as a full-scale user would run them. Run again, it
skips finished stages and resumes an interrupted one. Detectron2 is used when installed, else
the torchvision engine.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CONFIGS = REPO / "configs" / "demo"
METHODS = ("none", "saliencymix")
MANIFEST = "manifest.json"  # make_demo_data.py writes it last

# Overrides that shrink the pipeline for the tests; "full" is the configs as they are.
SCALES = {
    "full": {"data": [], "pretrain": [], "detect": []},
    "tiny": {
        "data": ["--train-per-class", "6", "--val-per-class", "2", "--detection-train", "8",
                 "--detection-test", "4", "--classification-size", "32", "--detection-size", "64"],
        "pretrain": ["DATA.IMAGE_SIZE", "32", "DATA.VAL_RESIZE", "36", "SOLVER.EPOCHS", "1",
                     "SOLVER.BATCH_SIZE", "10", "SOLVER.WARMUP_EPOCHS", "0.0", "DATA.NUM_WORKERS", "0"],
        "detect": ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
                   "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
                   "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0"],
    },
}


class Stage:
    """One step of the pipeline: a tool run, skipped when its ``done`` file exists."""

    def __init__(self, title: str, command: list[str], done: Path, resumable: bool = False):
        self.title = title
        self.command = command
        self.done = done
        self.resumable = resumable

    def run(self, index: int, total: int, log: Path) -> None:
        header = f"[{index}/{total}] {self.title}"
        if self.done.exists():
            print(f"{header}: done already ({self.done}), skipped", flush=True)
            return
        resuming = self.resumable and self.done.parent.joinpath("last_checkpoint").exists()
        command = [*self.command[:2], "--resume", *self.command[2:]] if resuming else self.command
        print(f"{header}{' (resuming)' if resuming else ''}\n  $ {' '.join(command)}", flush=True)
        start = time.perf_counter()
        with open(log, "ab") as stream:
            stream.write(f"\n==== {header}\n$ {' '.join(command)}\n".encode())
            returncode = run_teed(command, stream)
        if returncode != 0:
            raise SystemExit(f"error: stage '{self.title}' failed (exit {returncode}); see {log}")
        if not self.done.exists():
            raise SystemExit(f"error: stage '{self.title}' finished without writing {self.done}; see {log}")
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def run_teed(command: list[str], log) -> int:
    """Run ``command``, showing its output (progress bars included) and appending it to ``log``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    for chunk in iter(lambda: process.stdout.read1(65536), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        log.write(chunk)
    return process.wait()


def tool(name: str, *arguments: str) -> list[str]:
    return [sys.executable, str(TOOLS / name), *arguments]


def build_stages(output: Path, scale: str, engine: str) -> list[Stage]:
    shrink = SCALES[scale]
    data = output / "data"
    device = ["MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"]
    stages = [Stage("generate the built-in data", tool("make_demo_data.py", "--output", str(data), *shrink["data"]),
                    data / MANIFEST)]
    for method in METHODS:
        run = output / f"pretrain_{method}"
        stages.append(Stage(f"pretrain ResNet-50, mixing: {method}",
                            tool("pretrain.py", "--config-file", str(CONFIGS / f"pretrain_{method}.yaml"),
                                 "DATA.ROOT", str(data / "classification"), "OUTPUT_DIR", str(run), *shrink["pretrain"]),
                            run / "model_final.pth", resumable=True))
    suffix = ".pkl" if engine == "detectron2" else ".pth"
    for method in METHODS:
        pretrained = output / f"pretrain_{method}"
        weights = pretrained / f"backbone{suffix}"
        export_format = [] if engine == "detectron2" else ["--format", "torchvision"]
        stages.append(Stage(f"export the {method} backbone for {engine}",
                            tool("convert_to_d2.py", str(pretrained / "model_final.pth"), str(weights), *export_format),
                            weights))
    for method in METHODS:
        run = output / f"detect_{method}"
        weights = output / f"pretrain_{method}" / f"backbone{suffix}"
        stages.append(Stage(f"fine-tune Faster R-CNN from the {method} backbone ({engine})",
                            tool("train_net.py", "--config-file", str(CONFIGS / "detection.yaml"), "--engine", engine,
                                 "MODEL.WEIGHTS", str(weights), "TRANSFER.METHOD", method,
                                 "TRANSFER.VOC_ROOT", str(data / "detection"), "OUTPUT_DIR", str(run),
                                 *device, *shrink["detect"]),
                            run / "eval_results.json", resumable=True))
    return stages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo", help="the run folder holding every stage's output")
    parser.add_argument("--scale", choices=tuple(SCALES), default="full")
    parser.add_argument("--engine", choices=("auto", "detectron2", "torchvision"), default="auto")
    args = parser.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        engine = "detectron2" if importlib.util.find_spec("detectron2") else "torchvision"
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    log = output / "demo.log"
    stages = build_stages(output, args.scale, engine)
    print(f"SaliencyMix transfer demo -> {output} (detection engine: {engine}; full logs: {log})", flush=True)
    start = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        stage.run(index, len(stages) + 1, log)
    print(f"[{len(stages) + 1}/{len(stages) + 1}] compare the detectors", flush=True)
    compare = subprocess.run(tool("compare.py", *(str(output / f"detect_{m}") for m in METHODS), "--baseline", "none",
                                  "--output", str(output)), cwd=REPO)
    if compare.returncode != 0:
        raise SystemExit(f"error: tools/compare.py failed (exit {compare.returncode})")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; chart: {output / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
