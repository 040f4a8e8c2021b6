"""A stand-in for a project tool, for the study runner's scheduling tests: it notes when it ran,
with which GPUs and threads, works for ``--seconds``, saves a checkpoint and exits 75 on SIGTERM
as a trainer does, and writes its done file last."""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

# helpers.preemption.RESUME_EXIT_STATUS and study_runner.stages.LAST_CHECKPOINT (checked by
# tests/test_local_executor.py), written out: importing them would import torch, seconds per stage
RESUME_EXIT_STATUS = 75
LAST_CHECKPOINT = "last_checkpoint"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--folder", type=Path, required=True)  # the run folder; done.json is its done file
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    ran = {"start": time.time(), "resumed": args.resume, "threads": os.environ.get("OMP_NUM_THREADS"),
           "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    (args.folder / "started").write_text(json.dumps(ran))

    def save_and_stop(_signum, _frame):
        (args.folder / LAST_CHECKPOINT).write_text("checkpoint")
        sys.exit(RESUME_EXIT_STATUS)

    signal.signal(signal.SIGTERM, save_and_stop)
    time.sleep(args.seconds)
    (args.folder / "done.json").write_text(json.dumps({**ran, "end": time.time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
